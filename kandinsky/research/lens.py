"""A lens on the text encoder: pictures generated from the prompt's hidden states at each CLIP text layer.

The prior reads two things from the CLIP text tower (kandinsky/clip/model.py): the projected state of
the end-of-text token (``text_embeds``) and every token's state (``last_hidden_state``), both after
the tower's final LayerNorm. The lens at layer L gives the prior the same two things made from the
hidden states after block L instead of after the last block:

    x_L = blocks[:L](token_embedding(ids) + positions)     (B, 77, width); L = 0: the embeddings alone
    hidden = final_norm(x_L)                                (B, 77, width)   -> the prior's text tokens
    text_embeds = text_projection(hidden[end of text])      (B, projection_dim)

then runs the prior and the decoder as usual (Toker et al. 2024, "Diffusion Lens", for Stable
Diffusion's text encoders; the "logit lens" of language models). L = the number of blocks is the
tower's own output, so that column of the lens is the plain run.

:func:`exit_after` does it with plain PyTorch forward hooks on the blocks after L, each returning its
input (the block becomes the identity) for the rows that hold the prompts' tokens: the tower's own
forward runs, with its final norm, pooling and projection; nothing of it is copied here. Only the
prompts' rows are read through the lens; the unconditional text (and a negative prompt) the prior is
guided against goes through the whole tower, as in a plain run.

    lens = kandinsky.research.text_lens(pipe, ["a red circle on a blue background"], measure=("shapes", "clip"))
    lens.picture().save("lens.png")     # rows = prompts, columns = layers 0 .. N
    lens.scores["colour"]               # (prompts, layers): 1 where the picture shows the stated colour
"""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from torch import nn

from kandinsky.research.targets import components

MEASURES = ("clip", "shapes")  # clip: any model; shapes: the shipped shapes model's analyser
SHORT = {"shape": "sh", "colour": "co", "background": "bg", "size": "sz", "position": "po"}  # the picture's labels


def find_text_encoder(target) -> nn.Module:
    """The CLIP text tower of a Kandinsky / PriorPipeline, or ``target`` itself when it is one."""
    for prefix, model in components(target):
        if prefix in ("", "text_encoder") and all(hasattr(model, a) for a in ("blocks", "final_norm",
                                                                                "text_projection")):
            return model
    raise TypeError(f"the text lens needs a Kandinsky, a PriorPipeline or the CLIP text encoder, got "
                    f"{type(target).__name__}")


def _check_layer(layer, depth: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer <= depth:
        raise ValueError(f"a text-encoder layer must be an integer in 0..{depth} (0 = the token and position "
                         f"embeddings, {depth} = the tower's output: it has {depth} blocks), got {layer!r}")
    return int(layer)


@contextlib.contextmanager
def exit_after(target, layer: int, input_ids: torch.Tensor | None = None):
    """Inside the block, the text tower's outputs for the rows whose token ids equal a row of ``input_ids``
    ((P, L) long; None = every row) are made from the hidden states after block ``layer`` (0 = the
    embeddings): its blocks after ``layer`` return their input there. ``layer`` = the number of blocks
    changes nothing (no hook is installed).

    target  a Kandinsky, a PriorPipeline or the CLIP text encoder (kandinsky.clip.TextEncoder)

    Yields a list that counts, per text-tower call, how many rows went through the lens.
    """
    encoder = find_text_encoder(target)
    layer = _check_layer(layer, len(encoder.blocks))
    seen: list[int] = []
    state: dict = {}

    def start(module, args, kwargs):  # which rows of this call are the prompts'
        ids = args[0] if args else kwargs["input_ids"]  # (B, L)
        if input_ids is None:
            rows = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
        else:
            wanted = input_ids.to(ids.device)
            same = ids.shape[1] == wanted.shape[1]
            rows = ((ids[:, None, :] == wanted[None]).all(-1).any(-1) if same
                    else torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device))  # (B,)
        state["rows"] = rows
        seen.append(int(rows.sum()))

    def identity(module, args, out):  # a block after `layer`: its input, on the lens rows
        rows = state["rows"]
        return args[0] if bool(rows.all()) else torch.where(rows[:, None, None], args[0], out)

    handles = []
    if layer < len(encoder.blocks):
        handles.append(encoder.register_forward_pre_hook(start, with_kwargs=True))
        handles += [block.register_forward_hook(identity) for block in encoder.blocks[layer:]]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
        state.clear()


@dataclasses.dataclass
class Lens:
    """What :func:`text_lens` made. ``images[p][k]``: prompt p's picture from layer ``layers[k]``;
    ``text_embeds[k]``: the prompts' projected text embeddings (P, D) at that layer (what the prior
    read); ``scores[name]``: (P, len(layers)) arrays, one per measure ("clip": the cosine of the
    picture's CLIP image embedding with the prompt's final text embedding; "shapes": one array per
    attribute, 1 where the analyser finds the stated value, 0 where not, NaN where the prompt states
    none)."""

    prompts: list[str]
    layers: list[int]
    depth: int  # the text tower's blocks: layer `depth` is its own output
    seed: int
    images: list[list[PIL.Image.Image]]
    text_embeds: list[torch.Tensor]
    scores: dict[str, np.ndarray]

    def picture(self, cell: int = 112) -> PIL.Image.Image:
        """One grid: rows = prompts, columns = layers (0 = embeddings, the last = the tower's output),
        each picture with its scores under it (clip: the cosine; shapes: how many of the stated
        attributes the analyser finds, and which)."""
        import textwrap

        from kandinsky.research.viz import BACKGROUND, _text

        label_w, head, line = 200, 22, 12
        names = [n for n in self.scores if n != "clip"]
        text_h = line * (("clip" in self.scores) + bool(names)) + 4
        legend = [f"seed {self.seed}; column L: the prompt read after CLIP text layer L (final norm and projection "
                  "applied there)"]
        if names:
            legend.append("k/n: stated attributes the picture shows: " + ", ".join(f"{SHORT[n]} = {n}" for n in names))
        W = max(label_w + len(self.layers) * (cell + 6), 6 * max(map(len, legend)) + 8)
        H = head + len(self.prompts) * (cell + text_h + 6) + line * len(legend) + 4
        canvas = PIL.Image.new("RGB", (W, H), BACKGROUND)
        draw = PIL.ImageDraw.Draw(canvas)
        for k, layer in enumerate(self.layers):
            label = "embeddings" if layer == 0 else f"layer {layer}" + (" (output)" if layer == self.depth else "")
            _text(draw, (label_w + k * (cell + 6) + cell // 2, head // 2), label, anchor="mm")
        for p, prompt in enumerate(self.prompts):
            y = head + p * (cell + text_h + 6)
            for i, text in enumerate(textwrap.wrap(prompt, 31)[: (cell + text_h) // line]):
                _text(draw, (4, y + 2 + i * line), text)
            for k in range(len(self.layers)):
                x = label_w + k * (cell + 6)
                canvas.paste(self.images[p][k].convert("RGB").resize((cell, cell), PIL.Image.NEAREST), (x, y))
                row = y + cell + 2
                if "clip" in self.scores:
                    _text(draw, (x, row), f"clip {self.scores['clip'][p, k]:.2f}")
                    row += line
                stated = [n for n in names if np.isfinite(self.scores[n][p, k])]
                if stated:
                    shown = [n for n in stated if self.scores[n][p, k]]
                    _text(draw, (x, row), f"{len(shown)}/{len(stated)} " + " ".join(SHORT[n] for n in shown))
        for i, text in enumerate(legend):
            _text(draw, (4, H - line * (len(legend) - i) - 2), text)
        return canvas


def _measures(measure) -> tuple[str, ...]:
    chosen = (measure,) if isinstance(measure, str) else tuple(measure)
    bad = [m for m in chosen if m not in MEASURES]
    if bad or not chosen:
        raise ValueError(f"measure must be one of {MEASURES} or a list of them, got {measure!r}")
    return chosen


def text_lens(pipe, prompt, *, layers=None, seed: int = 0, measure="clip", **options) -> Lens:
    """Generate each prompt from its hidden states after each CLIP text layer (:func:`exit_after`: the
    tower's final norm and projection applied there, then the prior and the decoder), every layer from
    the same seed, and measure the pictures.

    pipe     a Kandinsky pipeline
    prompt   a prompt or a list (the rows of the grid)
    layers   text-tower layers, 0 (the embeddings) .. N (its output, = the plain run); None = all
    seed     one generator seeded with it per layer, shared by the prior and the decoder (as text2img)
    measure  "clip" (any model), "shapes" (the shipped shapes model's analyser; prompts of its grammar)
             or a list of both
    options  text2img's (height, width, num_inference_steps, prior_num_inference_steps, guidance_scale,
             negative_prompt, ...)
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    if "generator" in options:
        raise TypeError("text_lens draws every layer from `seed` (one generator per layer); do not pass generator")
    if options.get("num_images_per_prompt", 1) != 1:
        raise ValueError("text_lens makes one picture per prompt and layer; for more, call it again with other seeds")
    encoder = find_text_encoder(pipe)
    depth = len(encoder.blocks)
    layers = list(range(depth + 1)) if layers is None else [_check_layer(L, depth) for L in
                                                             ([layers] if isinstance(layers, int) else layers)]
    if not layers:
        raise ValueError("layers is empty; give text-encoder layers like [0, 1, 2], or None for all")
    chosen = _measures(measure)
    stated = _stated(prompts) if "shapes" in chosen else None
    ids = pipe.prior.tokenizer(prompts)[0]  # (P, L): the rows the lens reads
    columns, embeds = [], []
    for layer in layers:
        with exit_after(encoder, layer, ids) as seen:
            embeds.append(pipe.prior.encode_text(prompts)[0].float().cpu())  # (P, D)
            out = pipe.text2img(prompts, generator=torch.Generator().manual_seed(seed), **options)
        if layer < depth and not (seen and all(seen)):
            raise RuntimeError("the text lens saw a text-encoder call without the prompts' rows (is the text "
                               "encoder compiled, or replaced?)")
        columns.append(out.images)
    images = [[columns[k][p] for k in range(len(layers))] for p in range(len(prompts))]
    scores = {}
    if "clip" in chosen:
        scores["clip"] = _clip_scores(pipe, prompts, images)
    if stated is not None:
        scores.update(_shapes_scores(images, stated))
    return Lens(prompts, layers, depth, seed, images, embeds, scores)


def _stated(prompts: list[str]) -> list[dict[str, str]]:
    from kandinsky.data.shapes import parse_caption

    try:
        return [parse_caption(p) for p in prompts]
    except ValueError as e:
        raise ValueError(f"measure 'shapes' reads prompts of the shapes model's grammar: {e} (measure 'clip' takes "
                         "any prompt)") from None


def _clip_scores(pipe, prompts, images) -> np.ndarray:
    """(P, layers): cosine of each picture's CLIP image embedding with its prompt's (full-tower) text embedding."""
    from kandinsky.research.embeddings import cosine, image_embeds, text_embeds

    text = text_embeds(pipe.prior, prompts)  # (P, D)
    flat = image_embeds(pipe.prior, [im for row in images for im in row])  # (P * layers, D)
    sims = cosine(flat, text).reshape(len(prompts), len(images[0]), len(prompts))  # (P, layers, P)
    return sims[torch.arange(len(prompts)), :, torch.arange(len(prompts))].numpy().astype(np.float64)


def _shapes_scores(images, stated) -> dict[str, np.ndarray]:
    """{attribute: (P, layers)}: 1 / 0 where the analyser does / does not find the stated value, NaN unstated."""
    from kandinsky.data.analyse import analyse, judge
    from kandinsky.data.shapes import ATTRIBUTES

    out = {n: np.full((len(images), len(images[0])), np.nan) for n in ATTRIBUTES if any(n in s for s in stated)}
    for p, row in enumerate(images):
        for k, picture in enumerate(row):
            for name, ok in judge(analyse(picture), stated[p]).items():
                out[name][p, k] = float(ok)
    return out
