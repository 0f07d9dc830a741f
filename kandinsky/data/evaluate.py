"""``kandinsky eval shapes``: how well does a checkpoint draw what the shapes grammar says?

    kandinsky eval shapes --prior P --decoder D [--inpaint I] [--n 64] [--seed 0] [--steps 20]
                          [--scheduler ddpm] [--sweep] [--demo]

Six measurements, each on items drawn at random from the seed (not a hand-picked list):

  text2img    random prompts of the grammar -> prior -> decoder -> analyse(picture); for each
              attribute the prompt states: accuracy, and a confusion table (stated x found)
  prior       the prior alone: each sampled embedding classified per attribute by linear probes
              fitted on real pictures' CLIP embeddings
  retrieval   the CLIP towers: for n pictures and their full captions, is the nearest
              picture of each caption one that fits it (text -> image top-1), and back
  inpaint     a small shape on one side; the opposite side masked and prompted with another
              small shape: the masked area's dominant colour is the prompted one, and the
              picture outside the mask keeps its colours
  movq        real pictures through the MoVQ alone (encode, decode): the ceiling of the others
  variations  a picture's CLIP embedding decoded again: same shape, colours, size, position

``--sweep`` adds a table of text2img accuracy (mean over attributes) against steps for every
sampler. The functions (``text2img_report`` etc.) return plain dicts, so tests call them too.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import PIL.Image
import torch

from kandinsky.data import shapes
from kandinsky.data.analyse import analyse, judge

SWEEP_SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "unipc", "euler")
SWEEP_STEPS = (5, 10, 20, 50)
IMAGE_SIZE = 64
VALUES = {"shape": shapes.SHAPES, "colour": tuple(shapes.COLOURS), "background": tuple(shapes.COLOURS),
          "size": tuple(shapes.SIZES), "position": tuple(shapes.POSITIONS)}


def random_prompts(n: int, seed: int) -> list[tuple[str, dict[str, str]]]:
    rng = np.random.default_rng([seed, 11])
    return [shapes.random_prompt(rng) for _ in range(n)]


def score(pictures, stated: list[dict[str, str]]) -> dict:
    """Analyse pictures against the stated attributes -> {"accuracy": {attr: x}, "confusion": ..., "n": {attr: k}}."""
    right, total = Counter(), Counter()
    confusion = defaultdict(Counter)  # attr -> Counter((stated, found))
    for picture, wanted in zip(pictures, stated):
        found = analyse(picture)
        for name, ok in judge(found, wanted).items():
            right[name] += ok
            total[name] += 1
            confusion[name][(wanted[name], getattr(found, name))] += 1
    accuracy = {name: right[name] / total[name] for name in shapes.ATTRIBUTES if total[name]}
    return {"accuracy": accuracy, "n": dict(total), "confusion": {k: dict(v) for k, v in confusion.items()}}


def embed_prompts(prior, prompts: list[str], seed: int, prior_steps: int, prior_guidance: float, batch: int):
    """Prior embeddings (and the negative ones) of the prompts, in batches, seeded."""
    g = torch.Generator().manual_seed(seed)
    embeds, negatives = [], []
    for start in range(0, len(prompts), batch):
        out = prior(prompts[start:start + batch], num_inference_steps=prior_steps, guidance_scale=prior_guidance,
                    generator=g, progress=False)
        embeds.append(out.image_embeds)
        negatives.append(out.negative_image_embeds)
    return torch.cat(embeds), torch.cat(negatives)


def decode(decoder, embeds, negatives, seed: int, steps: int, sampler: str | None, guidance: float, batch: int,
           task: str = "text2img", **inputs):
    g = torch.Generator().manual_seed(seed)
    pictures = []
    for start in range(0, len(embeds), batch):
        part = {k: v[start:start + batch] for k, v in inputs.items()}
        out = decoder.run(task, embeds[start:start + batch], negatives[start:start + batch], height=IMAGE_SIZE,
                          width=IMAGE_SIZE, num_inference_steps=steps, guidance_scale=guidance, generator=g,
                          scheduler=sampler, progress=False, **part)
        pictures += list(out.images)
    return pictures


def text2img_report(prior, decoder, n=64, seed=0, steps=20, sampler=None, guidance=4.0, prior_steps=25,
                    prior_guidance=4.0, batch=16, embeddings=None) -> dict:
    """Accuracy of prior + decoder on n random prompts of the grammar."""
    items = random_prompts(n, seed)
    prompts = [text for text, _ in items]
    if embeddings is None:
        embeddings = embed_prompts(prior, prompts, seed, prior_steps, prior_guidance, batch)
    pictures = decode(decoder, *embeddings, seed, steps, sampler, guidance, batch)
    report = score(pictures, [stated for _, stated in items])
    report.update(prompts=prompts, pictures=pictures)
    return report


@torch.no_grad()
def retrieval_report(prior, n=64, seed=0) -> dict:
    """CLIP towers: top-1 text -> image and image -> text among n pictures with full captions.

    A retrieved item counts as right when its caption is the query's (equal captions are
    interchangeable)."""
    examples = [shapes.example(seed, i, IMAGE_SIZE, p_part=1.0) for i in range(n)]
    captions = [ex.text for ex in examples]
    text = prior.encode_text(captions)[0]  # (n, D)
    image = prior.encode_image([ex.image for ex in examples])  # (n, D)
    sim = torch.nn.functional.normalize(text, dim=-1) @ torch.nn.functional.normalize(image, dim=-1).T
    same = np.array([[a == b for b in captions] for a in captions])
    t2i = same[np.arange(n), sim.argmax(1).numpy()].mean()
    i2t = same[sim.argmax(0).numpy(), np.arange(n)].mean()
    return {"text_to_image": float(t2i), "image_to_text": float(i2t), "n": n}


@torch.no_grad()
def attribute_probe(prior, seed=0, references=2048, ridge=1e-2):
    """Linear classifiers of CLIP image embeddings (ridge regression onto one-hot values), one per
    attribute, fitted on real pictures' embeddings.

    Returns (classify(embeds) -> list of {attribute: value}, accuracy on 256 held-out real pictures)."""
    examples = [shapes.example(seed + 2, i, IMAGE_SIZE) for i in range(references + 256)]
    real = torch.cat([prior.encode_image([ex.image for ex in examples[k:k + 128]])
                      for k in range(0, len(examples), 128)]).double()  # (references + 256, D)
    mean, std = real[:references].mean(0), real[:references].std(0)

    def features(embeds):  # standardised, plus a constant
        x = (embeds.double() - mean) / std
        return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # (B, D + 1)

    X = features(real[:references])
    gram = X.T @ X + ridge * references * torch.eye(X.shape[1], dtype=X.dtype)
    weights = {}
    for name, values in VALUES.items():
        Y = torch.tensor([[getattr(ex.scene, name) == v for v in values] for ex in examples[:references]],
                         dtype=X.dtype)  # (references, values) one-hot
        weights[name] = (values, torch.linalg.solve(gram, X.T @ Y))  # (D + 1, values)

    def classify(embeds):
        x = features(embeds)
        found = {name: [values[k] for k in (x @ w).argmax(1).tolist()] for name, (values, w) in weights.items()}
        return [{name: found[name][k] for name in found} for k in range(x.shape[0])]

    truth = [ex.scene.attributes() for ex in examples[references:]]
    probed = classify(real[references:])
    ceiling = {name: float(np.mean([p[name] == t[name] for p, t in zip(probed, truth)])) for name in VALUES}
    return classify, ceiling


@torch.no_grad()
def prior_report(prior, n=64, seed=0, prior_steps=25, prior_guidance=4.0, batch=16) -> dict:
    """The prior alone: each sampled embedding classified per attribute by linear probes fitted on
    real pictures' CLIP embeddings (``attribute_probe``); "probe" is their accuracy on real pictures
    (the ceiling)."""
    classify, ceiling = attribute_probe(prior, seed)
    items = random_prompts(n, seed)
    embeds, _ = embed_prompts(prior, [text for text, _ in items], seed, prior_steps, prior_guidance, batch)
    right, total = Counter(), Counter()
    for (_, stated), found in zip(items, classify(embeds)):
        for name, value in stated.items():
            right[name] += found[name] == value
            total[name] += 1
    return {"accuracy": {name: right[name] / total[name] for name in shapes.ATTRIBUTES if total[name]},
            "n": dict(total), "probe": ceiling}


OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def inpaint_cases(n: int, seed: int):
    """(picture, mask, prompt, stated) with a small shape on one side and the opposite side to repaint."""
    rng = np.random.default_rng([seed, 13])
    cases = []
    for _ in range(n):
        keep_side = list(OPPOSITE)[rng.integers(4)]
        scene = shapes.random_scene(rng, size="small", position=keep_side)
        new = shapes.random_scene(rng, size="small", position=OPPOSITE[keep_side], background=scene.background)
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)  # 255 = repaint
        x0, y0, x1, y1 = _box(new.position)
        mask[y0:y1, x0:x1] = 255
        prompt = shapes.caption(new, ("size", "position", "background"))
        cases.append((shapes.render(scene, IMAGE_SIZE), PIL.Image.fromarray(mask), prompt, new))
    return cases


def _box(position: str) -> tuple[int, int, int, int]:
    """The repainted half (x0, y0, x1, y1) of the picture for a shape at ``position``."""
    half = IMAGE_SIZE // 2
    return {"left": (0, 0, half, IMAGE_SIZE), "right": (half, 0, IMAGE_SIZE, IMAGE_SIZE),
            "top": (0, 0, IMAGE_SIZE, half), "bottom": (0, half, IMAGE_SIZE, IMAGE_SIZE)}[position]


def inpaint_report(prior, inpainter, n=32, seed=0, steps=20, sampler=None, guidance=4.0, prior_steps=25,
                   prior_guidance=4.0, batch=16) -> dict:
    """Prompted colour inside the mask; unchanged colours outside it (the mask grown by 8 px)."""
    from kandinsky.data.analyse import NAMES, palette_indices, to_array

    cases = inpaint_cases(n, seed)
    embeds, negatives = embed_prompts(prior, [c[2] for c in cases], seed, prior_steps, prior_guidance, batch)
    pictures = decode(inpainter, embeds, negatives, seed, steps, sampler, guidance, batch, task="inpaint",
                      image=[c[0] for c in cases], mask_image=[c[1] for c in cases])
    colour_ok, kept = [], []
    for (original, mask, _, new), picture in zip(cases, pictures):
        inside = np.asarray(mask) > 0
        index = palette_indices(to_array(picture))
        background = NAMES.index(new.background)
        shape_pixels = index[inside][index[inside] != background]
        colour_ok.append(len(shape_pixels) > 0 and NAMES[np.bincount(shape_pixels).argmax()] == new.colour)
        grown = np.zeros_like(inside)
        ys, xs = np.nonzero(inside)
        grown[max(ys.min() - 8, 0):ys.max() + 9, max(xs.min() - 8, 0):xs.max() + 9] = True
        kept.append(float((index[~grown] == palette_indices(to_array(original))[~grown]).mean()))
    return {"colour": float(np.mean(colour_ok)), "kept": float(np.mean(kept)), "n": n, "pictures": pictures}


def variations_report(prior, decoder, n=32, seed=0, steps=20, sampler=None, guidance=4.0, batch=16) -> dict:
    """A picture's CLIP image embedding decoded: does the result show the same thing?"""
    examples = [shapes.example(seed + 1, i, IMAGE_SIZE) for i in range(n)]
    with torch.no_grad():
        embeds = prior.encode_image([ex.image for ex in examples])
    negatives = prior.zero_image_embeds(len(examples))
    pictures = decode(decoder, embeds, negatives, seed, steps, sampler, guidance, batch)
    report = score(pictures, [ex.scene.attributes() for ex in examples])
    report["pictures"] = pictures
    return report


def movq_report(decoder, n=64, seed=0, batch=16) -> dict:
    """Real pictures through the MoVQ alone (encode, decode the raw latents as the pipelines do): the
    ceiling of every decoder measurement, since a UNet's latents are decoded by the same MoVQ. Adds
    "shape_by_size": {size: shape accuracy}."""
    examples = [shapes.example(seed + 2, i, IMAGE_SIZE) for i in range(n)]
    pixels = torch.from_numpy(np.stack([np.asarray(ex.image) for ex in examples])).permute(0, 3, 1, 2)
    images = pixels.float() / 127.5 - 1  # (n, 3, 64, 64)
    movq = decoder.movq
    dtype = next(movq.parameters()).dtype
    pictures = []
    with torch.no_grad():
        for start in range(0, n, batch):
            chunk = images[start:start + batch].to(dtype)
            out = movq.decode(movq.encode(chunk), force_not_quantize=True).float().clamp(-1, 1)
            array = ((out + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # (b, 64, 64, 3)
            pictures += [PIL.Image.fromarray(a) for a in array]
    report = score(pictures, [ex.scene.attributes() for ex in examples])
    by_size = defaultdict(list)
    for picture, ex in zip(pictures, examples):
        by_size[ex.scene.size].append(analyse(picture).shape == ex.scene.shape)
    report["shape_by_size"] = {size: float(np.mean(ok)) for size, ok in sorted(by_size.items())}
    report["pictures"] = pictures
    return report


# ----------------------------------------------------------------------------- printing


def format_accuracy(title: str, report: dict) -> str:
    accuracy = report["accuracy"]
    cells = "  ".join(f"{name} {accuracy[name]:6.1%} (n={report['n'][name]})" for name in accuracy)
    return f"{title}: {cells}"


def format_confusion(name: str, confusion: dict) -> str:
    """Rows: stated value; columns: what the analyser found ('-' = no shape)."""
    values = list(VALUES[name])
    columns = values + ["-"]
    width = max(len(v) for v in columns) + 1
    lines = [f"  {name}: stated \\ found", " " * (width + 2) + "".join(f"{c:>{width}}" for c in columns)]
    for stated in values:
        counts = [confusion.get((stated, found if found != "-" else None), 0) for found in columns]
        if sum(counts):
            lines.append(f"  {stated:>{width}}" + "".join(f"{c:>{width}}" for c in counts))
    return "\n".join(lines)


def save_grid(pictures, path, columns=8) -> None:
    import PIL.Image

    rows = (len(pictures) + columns - 1) // columns
    grid = PIL.Image.new("RGB", (columns * IMAGE_SIZE, rows * IMAGE_SIZE), (128, 128, 128))
    for k, picture in enumerate(pictures):
        grid.paste(picture, ((k % columns) * IMAGE_SIZE, (k // columns) * IMAGE_SIZE))
    grid.save(path)
