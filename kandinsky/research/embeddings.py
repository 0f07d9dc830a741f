"""CLIP embedding tools with the bigG towers of a prior checkpoint.

    prior = PriorPipeline.from_pretrained("kandinsky-2-2-prior")
    similarity(prior, images=["cat.png"], prompts=["a cat", "a dog"])   # {"text": (1, 2), ...}
    slerp(a, b, [0, 0.5, 1])                                             # (3, D) on the sphere
    arithmetic(a, b, c)                                                  # a + b - c, at a's norm
    decode(pipe, embeds)                                                 # Kandinsky: embeddings -> images
    mix(pipe, ["cat.png", "dog.png"], ts=[0, 0.5, 1])                     # embed, slerp, decode
    strip(images)                                                        # pictures side by side

``kandinsky score IMAGE... PROMPT...`` prints (and with --json writes) the cosine matrices;
``kandinsky mix`` paints slerps and sums (``mix``); their command line is kandinsky/cli/research.py.

Text-image scores use the text tower's projected end-of-text state (``text_embeds``) and the
image tower's projected class token, both L2-normalised, as CLIP was trained; the decoder
instead consumes *image* embeddings, so ``embed`` turns a prompt into one with the prior.
"""
from __future__ import annotations

from pathlib import Path

import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# ----------------------------------------------------------------------------- maths
def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) cosine similarities (float32)."""
    a, b = a.float(), b.float()
    return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T


def slerp(a: torch.Tensor, b: torch.Tensor, t) -> torch.Tensor:
    """Spherical interpolation from ``a`` to ``b`` (each (D,) or (1, D)): the direction moves
    along the great circle, the norm linearly. ``t``: a number or a list -> (len(t), D)."""
    a, b = a.reshape(-1).float(), b.reshape(-1).float()
    if a.shape != b.shape:
        raise ValueError(f"slerp: a and b must have the same size, got {tuple(a.shape)} and {tuple(b.shape)}")
    ts = torch.as_tensor([t] if isinstance(t, (int, float)) else list(t), dtype=torch.float32)[:, None]  # (T, 1)
    na, nb = a.norm(), b.norm()
    ua, ub = a / na, b / nb
    omega = torch.arccos((ua @ ub).clamp(-1, 1))
    if omega.abs() < 1e-4:  # (nearly) parallel: the great circle is a line
        direction = (1 - ts) * ua + ts * ub
    else:
        direction = (torch.sin((1 - ts) * omega) * ua + torch.sin(ts * omega) * ub) / torch.sin(omega)
    return direction * ((1 - ts) * na + ts * nb)  # (T, D)


def arithmetic(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, keep_norm: bool = True) -> torch.Tensor:
    """a + b - c (each (D,) or (1, D)) -> (1, D); with keep_norm the result is scaled to a's norm,
    so the decoder sees an embedding of the size it was trained on."""
    a, b, c = (x.reshape(1, -1).float() for x in (a, b, c))
    out = a + b - c
    return out * (a.norm() / out.norm()) if keep_norm else out


# ----------------------------------------------------------------------------- with a prior pipeline
def is_image_path(item) -> bool:
    return isinstance(item, (str, Path)) and Path(item).suffix.lower() in IMAGE_SUFFIXES


def load_image(path):
    import PIL.Image
    import PIL.ImageOps

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    return PIL.ImageOps.exif_transpose(PIL.Image.open(path)).convert("RGB")


def image_embeds(prior, images) -> torch.Tensor:
    """CLIP image embeddings (N, D) of PIL images / arrays / image paths (``prior``: PriorPipeline)."""
    images = [load_image(x) if is_image_path(x) else x for x in (images if isinstance(images, list) else [images])]
    return prior.encode_image(images).float()


def text_embeds(prior, prompts) -> torch.Tensor:
    """CLIP text embeddings (N, D) (the projected end-of-text state) of prompts."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return prior.encode_text(prompts)[0].float()


def similarity(prior, images=(), prompts=()) -> dict[str, torch.Tensor]:
    """{"text": (images, prompts) text-image cosines, "image": (images, images) image-image
    cosines} (keys present when they have both sides)."""
    images, prompts = list(images), list(prompts)
    out = {}
    if images:
        ie = image_embeds(prior, images)
        out["image"] = cosine(ie, ie)
        if prompts:
            out["text"] = cosine(ie, text_embeds(prior, prompts))
    elif prompts:
        te = text_embeds(prior, prompts)
        out["prompt"] = cosine(te, te)
    return out


def embed(pipe, items, generator: torch.Generator | None = None, prior_steps: int = 25) -> torch.Tensor:
    """Image embeddings (N, D) the decoder can paint: an image (path, PIL, array) through the
    CLIP image tower, a prompt through the prior (``pipe``: Kandinsky)."""
    rows = []
    for item in items:
        if isinstance(item, str) and not is_image_path(item):
            out = pipe.prior(item, num_inference_steps=prior_steps, generator=generator, progress=False)
            rows.append(out.image_embeds.float())
        else:
            rows.append(image_embeds(pipe.prior, [item]))
    return torch.cat(rows)


def decode(pipe, embeds: torch.Tensor, **options):
    """Paint image embeddings (N, D) with the decoder, guided away from the embedding of an
    all-zero image (as Kandinsky's variations). Returns the decoder's output (``.images``)."""
    prior, decoder = pipe.prior, pipe.decoder
    embeds = embeds.to(device=decoder.device, dtype=decoder.dtype)
    negative = prior.zero_image_embeds(embeds.shape[0]).to(device=decoder.device, dtype=decoder.dtype)
    return decoder.text2img(embeds, negative, **options)


# ----------------------------------------------------------------------------- mix: slerps and sums, painted
def mix(pipe, items: list, ts=None, generator=None, prior_steps: int = 25, **options) -> list[PIL.Image.Image]:
    """Two items and ``ts``: the slerp pictures at each t; three items: the picture of a + b - c."""
    if ts is not None and len(items) != 2:
        raise ValueError(f"a slerp needs exactly 2 items (a b), got {len(items)}")
    if ts is None and len(items) != 3:
        raise ValueError(f"embedding arithmetic needs exactly 3 items (a + b - c), got {len(items)}; "
                         "for an interpolation give 2 items and --slerp")
    e = embed(pipe, items, generator=generator, prior_steps=prior_steps)  # (N, D)
    embeds = slerp(e[0], e[1], ts) if ts is not None else arithmetic(e[0], e[1], e[2])
    return decode(pipe, embeds, generator=generator, **options).images


def strip(images: list[PIL.Image.Image], pad: int = 4, columns: int | None = None) -> PIL.Image.Image:
    """Pictures side by side on white; with ``columns``, in rows of that many (a grid)."""
    import PIL.Image

    W, H = images[0].size
    columns = columns or len(images)
    rows = -(-len(images) // columns)
    canvas = PIL.Image.new("RGB", (columns * (W + pad) + pad, rows * (H + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        canvas.paste(im.convert("RGB"), (pad + (i % columns) * (W + pad), pad + (i // columns) * (H + pad)))
    return canvas

# ----------------------------------------------------------------------------- kandinsky score
def format_matrix(matrix: torch.Tensor, rows: list[str], cols: list[str]) -> str:
    short = lambda s: s if len(s) <= 28 else s[:25] + "..."  # noqa: E731
    width = max(len(short(r)) for r in rows) + 2
    colw = max(8, *(len(short(c)) + 2 for c in cols))
    lines = [" " * width + "".join(f"{short(c):>{colw}}" for c in cols)]
    for r, values in zip(rows, matrix.tolist()):
        lines.append(f"{short(r):<{width}}" + "".join(f"{v:>{colw}.4f}" for v in values))
    return "\n".join(lines)
