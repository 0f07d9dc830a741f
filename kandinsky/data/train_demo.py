"""Train the tiny demo Kandinsky on procedural shapes: ``kandinsky train-demo --out DIR``.

Every component of the real chain, at toy widths (kandinsky.demo's tiny configs, wider: CONFIGS),
trained from scratch on ``kandinsky.data.shapes`` (64 x 64 pictures, captions of the shapes grammar),
through kandinsky.training: its losses for the prior and the UNets, and for every stage its learning-
rate schedule, optimizer step and EMA (kandinsky.training.optim, as ``kandinsky train``). What is the
demo's own: the stage table (STAGES), the data each stage draws, which components it trains, how long.

    stage         trains                                       on
    clip          text + image towers, contrastive (InfoNCE)   (caption, picture) pairs
                  + attribute heads (shape weighted 6x)
    movq          MoVQ autoencoder, 8 latent channels: L1 +    32 x 32 crops of pictures
                  MSE reconstruction of slightly noisy latents,
                  codebook + commitment, latents kept ~N(0, 1)
    movq_decoder  the MoVQ decoder alone (encoder frozen)      whole pictures
    prior         diffusion prior, x0-prediction, cosine       (caption, CLIP image embedding)
    decoder       UNet, eps-prediction, linear betas           (MoVQ latents, CLIP image embedding)
    inpaint       17-channel UNet (9 for 4 latent channels)    (latents, masked latents, keep mask,
                  started from the decoder, random              CLIP image embedding)
                  rectangles to repaint

Captions are dropped to "" (prior) and image embeddings to the zero-image embedding
(decoders) 10% of the time, so classifier-free guidance works as the pipelines use it.
The result is written in the hub layout (``prior/``, ``decoder/``, ``decoder-inpaint/``,
fp16 safetensors) with a word-level BPE tokenizer that covers the grammar (16 tokens of
context instead of CLIP's 77).

Each stage trains for its STAGES minutes (187 in all, 110 of wall-clock with ``--jobs 2``; ``--minutes M`` shares M among the stages
run in the same proportions; ``--steps N``: N steps each, for tests) and saves a checkpoint in
``DIR/stages/<stage>.pt`` every 2 minutes; stages not named in
``--stages`` are loaded from there, so stages can run in parallel processes (clip and movq
first; then prior, decoder + inpaint and movq_decoder) and a stage can be trained longer
(``--resume``). The learning rate follows a cosine over the stage's time (after a 3% warm-up, never
below 2% of the stage's rate). The UNets and the prior keep an EMA of their weights (decay 0.999,
ramped up over the first steps); the EMA is what is saved. The hub folders are written by
kandinsky.demo.write_checkpoint_set, as the random demo checkpoints are.

    kandinsky train-demo --out demo-weights                      # everything, one after another
    kandinsky train-demo --out demo-weights --jobs 2             # two processes: about half the wall-clock
    kandinsky train-demo --out demo-weights --stages clip --minutes 8 --resume   # one stage, longer
    kandinsky train-demo --out demo-weights --write-only          # the hub folders from the stages
"""
from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import kandinsky.demo as demo
from kandinsky.clip.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from kandinsky.clip.tokenizer import Tokenizer
from kandinsky.data import shapes
from kandinsky.demo import TINY
from kandinsky.sampling.schedule import NoiseSchedule
from kandinsky.training.data import random_keep_masks
from kandinsky.training.losses import (decoder_loss, drop_image_embeds, drop_text, dropped_rows, prior_loss,
                                       prior_schedule)
from kandinsky.training.loop import interrupt_deferred
from kandinsky.training.optim import EMA, lr_at, optimizer_step, set_lr
from weights_convert import build_model
from weights_convert.io import load_torch

IMAGE_SIZE = 64  # pictures, and the CLIP image tower's input
MOVQ_FACTOR = 8  # pictures / latents (8 x 8 latents), as the shipped weights; --movq-factor 4 (16 x 16
#                  latents, a 3-level MoVQ) keeps the corners of small squares and triangles but needs a
#                  longer decoder training than a CPU session gives it (kandinsky/demo_weights/README.md)
LATENT_CHANNELS = 8  # MoVQ latent channels (the real MoVQ has 4): a small shape is 2 x 2 latent cells, and 8
#                     channels keep its corners (--latent-channels 4 rounds small squares and triangles)
EMBED = 64  # CLIP projection = prior embedding = UNet encoder_hid_dim
CONTEXT = 16  # text tokens (the real CLIP has 77): the longest caption is 11 words + 2 specials

# the shapes model: kandinsky.demo's tiny configs, wider (64-wide embeddings, 16 tokens of context, 64 x 64 pictures)
CONFIGS = {
    "text_encoder": {**TINY["text_encoder"], "vocab_size": None,  # set from the tokenizer
                     "hidden_size": EMBED, "intermediate_size": 128, "projection_dim": EMBED,
                     "max_position_embeddings": CONTEXT},
    "image_encoder": {**TINY["image_encoder"], "hidden_size": 64, "intermediate_size": 128, "projection_dim": EMBED,
                      "num_hidden_layers": 3, "image_size": IMAGE_SIZE},
    "prior": {**TINY["prior"], "attention_head_dim": 32, "num_layers": 4, "embedding_dim": EMBED,
              "num_embeddings": CONTEXT},
    "unet": {**TINY["unet"],
             "in_channels": None,  # LATENT_CHANNELS (build_models)
             "out_channels": None,  # 2 x LATENT_CHANNELS: eps and the variance interpolation
             "block_out_channels": [32, 64, 64, 96], "attention_head_dim": 32, "norm_num_groups": 16,
             "cross_attention_dim": 64, "encoder_hid_dim": EMBED, "sample_size": IMAGE_SIZE // MOVQ_FACTOR},
    "movq": {**TINY["movq"],
             "latent_channels": None,  # LATENT_CHANNELS (build_models)
             "vq_embed_dim": None,
             "num_vq_embeddings": 256},  # block_out_channels [32, 32, 64, 64]: 3 downsamplings = MOVQ_FACTOR
}

# stage: (minutes at the default --minutes, batch size, learning rate): the wall-clock minutes each stage
# of the shipped weights trained (187 in all, on a 2-core machine, two stages at a time); another --minutes scales them
# all alike
STAGES = {
    "clip": (22.0, 128, 1e-3),
    "movq": (25.0, 16, 1e-3),
    "movq_decoder": (25.0, 8, 3e-4),
    "prior": (30.0, 128, 5e-4),
    "decoder": (72.0, 64, 5e-4),  # shipped: 47, then 25 more with --resume
    "inpaint": (13.0, 64, 3e-4),
}
DEFAULT_MINUTES = sum(minutes for minutes, _, _ in STAGES.values())  # 187
# --movq-factor 4: 16 x 16 latents (a small shape, 16 pixels, is 4 x 4 latent cells instead of 2 x 2)
MOVQ_FACTOR_4 = {"block_out_channels": [32, 64, 64],
                 "down_block_types": ["DownEncoderBlock2D"] * 2 + ["AttnDownEncoderBlock2D"],
                 "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 2}
MOVQ_CROP = 32  # the autoencoder trains on crops of this side (4x cheaper steps than whole pictures)
DATA_SIZE = 8192  # pictures whose latents and embeddings the prior and decoders train on
# --jobs 2: the stages in two processes, phase after phase (a phase starts when the last one is done)
PHASES = ((("clip",), ("movq",)), (("prior", "movq_decoder"), ("decoder", "inpaint")))
NEEDS = {"prior": ("clip",), "decoder": ("clip", "movq"), "inpaint": ("clip", "movq")}  # stage -> encodings
DROP_CONDITION = 0.1  # classifier-free guidance dropout
EMA_DECAY = 0.999


# ----------------------------------------------------------------------------- tokenizer


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges that make every word one token (most frequent pair first, ties by name)."""
    pieces = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in words]
    merges = []
    while any(len(p) > 1 for p in pieces):
        pairs = Counter((p[i], p[i + 1]) for p in pieces for i in range(len(p) - 1))
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged = []
        for p in pieces:
            out, i = [], 0
            while i < len(p):
                if i + 1 < len(p) and (p[i], p[i + 1]) == best:
                    out.append(p[i] + p[i + 1])
                    i += 2
                else:
                    out.append(p[i])
                    i += 1
            merged.append(tuple(out))
        pieces = merged
    return merges


def write_tokenizer(folder: Path) -> int:
    """A CLIP tokenizer folder: byte tokens, the grammar's words as merges, specials last. -> vocab size."""
    return demo.write_tokenizer(folder, learn_merges(shapes.VOCABULARY), CONTEXT)


# ----------------------------------------------------------------------------- data


def batch(seed: int, start: int, n: int, p_part: float = 0.5, with_scenes: bool = False):
    """Examples start .. start+n of data set ``seed`` -> (pictures (n, 3, 64, 64) in [-1, 1], captions
    [, scenes])."""
    examples = [shapes.example(seed, i, IMAGE_SIZE, p_part) for i in range(start, start + n)]
    pixels = np.stack([np.asarray(ex.image) for ex in examples])  # (n, 64, 64, 3) uint8
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1  # (n, 3, 64, 64)
    captions = [ex.text for ex in examples]
    return (images, captions, [ex.scene for ex in examples]) if with_scenes else (images, captions)


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pictures -> the image tower's pixel_values (what the image processor gives at 64 px)."""
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


# ----------------------------------------------------------------------------- training loop


class Clock:
    """Progress of a stage: by steps (tests) or by wall-clock seconds (runs)."""

    def __init__(self, steps: int | None, seconds: float):
        self.steps, self.seconds, self.start, self.step = steps, seconds, time.time(), 0

    def fraction(self) -> float:
        if self.steps is not None:
            return self.step / self.steps
        return (time.time() - self.start) / self.seconds

    def running(self) -> bool:
        return self.fraction() < 1


def train(stage: str, params, loss_fn, clock: Clock, log, save, ema: bool = False) -> None:
    """AdamW steps of loss_fn(step) on ``params`` until the clock runs out, through kandinsky.training.optim:
    a cosine learning rate over the clock (after a 3% warm-up, never below 2% of the stage's rate), gradients
    clipped to norm 1, with ``ema`` an EMA of ``params`` (decay EMA_DECAY, ramped up); save() every 2 minutes.
    With ``ema`` the EMA weights are the result: save() runs with them in place, and ``params`` end holding them."""
    _, _, lr = STAGES[stage]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    optimizer.zero_grad(set_to_none=True)
    average = EMA(params, EMA_DECAY, ramp=True) if ema else None
    last_save, running, saved_at = time.time(), None, 0
    try:
        while clock.running():
            set_lr(optimizer, lr_at(clock.fraction(), lr, warmup=0.03, end=1.0, floor=0.02))
            loss, parts = loss_fn(clock.step)
            loss.backward()
            with interrupt_deferred():  # the weights and the EMA change together or not at all
                optimizer_step(optimizer, params, max_grad_norm=1.0, ema=average)
                clock.step += 1
            running = parts if running is None else {k: 0.98 * running[k] + 0.02 * v for k, v in parts.items()}
            if clock.step % 50 == 0 or not clock.running():
                log(f"{stage} step {clock.step} ({clock.fraction():.0%}) "
                    + " ".join(f"{k} {v:.4f}" for k, v in running.items()))
            if time.time() - last_save > 120 or not clock.running():
                with average.applied(params) if average else contextlib.nullcontext():
                    save()
                last_save, saved_at = time.time(), clock.step
    except KeyboardInterrupt:  # Ctrl-C: keep the steps done (an unfinished stage --resume continues)
        if clock.step > saved_at:
            with average.applied(params) if average else contextlib.nullcontext():
                save()
        raise
    if average:
        average.copy_to(params)


# ----------------------------------------------------------------------------- stages


def build(name: str, **overrides):
    return build_model({**CONFIGS[name], **overrides})


# weight of each attribute head in the CLIP loss (1 where absent). The shape is the one attribute contrast
# barely teaches (a 16-pixel triangle and circle share colour, size and place): the shipped weights used 1,
# --shape-weight 6 puts the shape into the embedding (kandinsky/demo_weights/README.md)
HEAD_WEIGHTS = {"shape": 6.0}
ATTRIBUTE_VALUES = {"shape": shapes.SHAPES, "colour": tuple(shapes.COLOURS), "background": tuple(shapes.COLOURS),
                    "size": tuple(shapes.SIZES), "position": tuple(shapes.POSITIONS)}


def train_clip(models, clock, log, save, seed):
    """Contrastive (InfoNCE) loss, plus linear attribute heads on the image embedding (dropped after
    training): in a batch, captions that differ only in position or shape are rare, so contrast
    alone leaves those out of the embedding the decoder is conditioned on."""
    text, image, tokenizer = models["text_encoder"], models["image_encoder"], models["tokenizer"]
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    heads = torch.nn.ModuleDict({name: torch.nn.Linear(EMBED, len(v)) for name, v in ATTRIBUTE_VALUES.items()})
    n = STAGES["clip"][1]

    def loss_fn(step):
        images, captions, scenes = batch(seed, step * n, n, p_part=0.8, with_scenes=True)
        ids, mask = tokenizer(captions)
        t = F.normalize(text(ids, mask).text_embeds, dim=-1)  # (n, D)
        embeds = image(clip_pixels(images))  # (n, D)
        i = F.normalize(embeds, dim=-1)
        logits = logit_scale.clamp(max=math.log(100)).exp() * t @ i.T  # (n, n)
        # captions that say the same thing are all right answers
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        contrastive = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T)) / 2
        labels = {name: torch.tensor([values.index(getattr(s, name)) for s in scenes])
                  for name, values in ATTRIBUTE_VALUES.items()}
        attributes = sum(HEAD_WEIGHTS.get(name, 1.0) * F.cross_entropy(heads[name](embeds), labels[name])
                         for name in heads)
        accuracy = (logits.argmax(1) == torch.arange(n)).float().mean()
        position = (heads["position"](embeds).argmax(1) == labels["position"]).float().mean()
        shape = (heads["shape"](embeds).argmax(1) == labels["shape"]).float().mean()
        loss = contrastive + attributes
        return loss, {"loss": contrastive.item(), "acc": accuracy.item(), "attr": attributes.item(),
                      "pos_acc": position.item(), "shape_acc": shape.item()}

    params = list(text.parameters()) + list(image.parameters()) + [logit_scale] + list(heads.parameters())
    train("clip", params, loss_fn, clock, log, lambda: save(["text_encoder", "image_encoder"]))


def crop(images: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """One random size x size crop per picture, on the 8-pixel latent grid."""
    g = torch.Generator().manual_seed(seed)
    cells = (images.shape[-1] - size) // 8 + 1
    y, x = (torch.randint(0, cells, (images.shape[0],), generator=g) * 8 for _ in range(2))
    return torch.stack([im[:, i:i + size, j:j + size] for im, i, j in zip(images, y.tolist(), x.tolist())])


COMMITMENT = 0.05  # pull of the latents towards their nearest codebook vector (weak: nothing decodes codes)
LATENT_NOISE = 0.1  # std of the noise added to the latents the MoVQ decoder learns from


def decode_noisy(movq, z: torch.Tensor, step: int) -> torch.Tensor:
    """Pictures from latents plus a little noise: the decoder UNet's samples are never exact latents, and a
    decoder trained on exact ones turns small errors into blots (the encoder learns to keep its code
    robust). The raw latents, as the pipelines decode them (force_not_quantize=True); no codebook."""
    g = torch.Generator().manual_seed(10_000 + step)
    zn = z + LATENT_NOISE * torch.randn(z.shape, generator=g)  # (n, L, h, w)
    return movq.decoder(movq.post_quant_conv(zn), zn)


def train_movq(models, clock, log, save, seed):
    movq = models["movq"]
    n = STAGES["movq"][1]

    def loss_fn(step):
        images, _ = batch(seed + 1, step * n, n)
        images = crop(images, MOVQ_CROP, step)  # (n, 3, 32, 32): flat colours and edges are local
        z = movq.encode(images)  # (n, L, 32/f, 32/f), f = MOVQ_FACTOR, L = LATENT_CHANNELS
        codes = movq.quantizer.codebook(movq.quantize(z.detach())[1])  # (n, 32/f, 32/f, L) nearest codebook vectors
        codes = codes.permute(0, 3, 1, 2)
        codebook = F.mse_loss(codes, z.detach())  # the codebook follows the latents (pipelines never quantize)
        commitment = F.mse_loss(z, codes.detach())
        # the decoder UNet's noise is N(0, 1): keep each latent channel near mean 0, std 1
        scale = z.mean((0, 2, 3)).pow(2).mean() + (z.std((0, 2, 3)) - 1).pow(2).mean()
        recon = decode_noisy(movq, z, step)
        l1, l2 = F.l1_loss(recon, images), F.mse_loss(recon, images)
        loss = l1 + l2 + codebook + COMMITMENT * commitment + 0.1 * scale
        return loss, {"l1": l1.item(), "mse": l2.item(), "vq": codebook.item(), "scale": scale.item()}

    train("movq", list(movq.parameters()), loss_fn, clock, log, lambda: save(["movq"]))


def train_movq_decoder(models, clock, log, save, seed):
    """The MoVQ decoder alone on whole pictures, the encoder frozen: the latents the decoder UNet
    trains on do not change, so this stage may run alongside the UNet's."""
    movq = models["movq"]
    n = STAGES["movq_decoder"][1]

    def loss_fn(step):
        images, _ = batch(seed + 3, step * n, n)  # (n, 3, 64, 64)
        with torch.no_grad():
            z = movq.encode(images)  # (n, L, 64/f, 64/f): 8 x 8 for the shipped f = 8
        recon = decode_noisy(movq, z, step)
        l1, l2 = F.l1_loss(recon, images), F.mse_loss(recon, images)
        return l1 + l2, {"l1": l1.item(), "mse": l2.item()}

    params = list(movq.decoder.parameters()) + list(movq.post_quant_conv.parameters())
    train("movq_decoder", params, loss_fn, clock, log, lambda: save(["movq"]))


# what each encoded part is made with: part -> (the stage whose model makes it, function)
@torch.no_grad()
def encode_embeds(models, images, captions) -> dict:
    """CLIP image embeddings (what the prior learns to sample and the decoders are conditioned on)."""
    return {"embeds": models["image_encoder"](clip_pixels(images)), "captions": captions}


@torch.no_grad()
def encode_latents(models, images, captions) -> dict:
    """MoVQ latents (what the decoders learn to sample)."""
    return {"latents": models["movq"].encode(images)}


ENCODINGS = {"clip": encode_embeds, "movq": encode_latents}


def encoded_data(models, work: Path, seed: int, size: int, parts: tuple[str, ...], log) -> dict:
    """The training pictures encoded by the ``parts`` stages' models, cached in ``work/data-<part>.pt``
    (stages running in parallel processes share them; remade when the stage's checkpoint is newer)."""
    data = {}
    for part in parts:
        path, source = work / f"data-{part}.pt", work / f"{part}.pt"
        if path.exists() and path.stat().st_mtime > source.stat().st_mtime:
            cached = load_torch(path)
            if cached["size"] == size:
                data.update(cached["data"])
                continue
        chunks = []
        for start in range(0, size, 256):
            images, captions = batch(seed + 2, start, min(256, size - start))
            chunks.append(ENCODINGS[part](models, images, captions))
        encoded = {k: sum((c[k] for c in chunks), []) if k == "captions" else torch.cat([c[k] for c in chunks])
                   for k in chunks[0]}
        torch.save({"size": size, "data": encoded}, path.with_suffix(".partial"))
        path.with_suffix(".partial").replace(path)
        log(f"encoded {size} pictures with the {part} stage's model")
        data.update(encoded)
    with torch.no_grad():  # (1, D): the negative embedding (CLIP embedding of all-zero pixel_values)
        data["zero"] = models["image_encoder"](torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    return data


def train_prior(models, data, clock, log, save, seed):
    prior, text, tokenizer = models["prior"], models["text_encoder"], models["tokenizer"]
    with torch.no_grad():
        prior.clip_mean.copy_(data["embeds"].mean(0, keepdim=True))
        prior.clip_std.copy_(data["embeds"].std(0, keepdim=True))
        ids, mask = tokenizer([""])
        out = text(ids, mask)
        empty = (out.text_embeds, out.last_hidden_state, mask)  # the encoding of "" (the unconditional branch)
    schedule = prior_schedule()
    g = torch.Generator().manual_seed(seed)
    n = STAGES["prior"][1]

    def loss_fn(step):
        rows = torch.randint(0, len(data["captions"]), (n,), generator=g)
        ids, mask = tokenizer([data["captions"][i] for i in rows])
        with torch.no_grad():
            out = text(ids, mask)
        drop = dropped_rows(n, DROP_CONDITION, g)  # (n,) rows trained unconditionally
        condition = drop_text(out.text_embeds, out.last_hidden_state, mask, empty, drop)
        loss = prior_loss(prior, schedule, data["embeds"][rows], *condition, generator=g)
        return loss, {"mse": loss.item()}

    params = [p for name, p in prior.named_parameters() if name not in ("clip_mean", "clip_std")]
    train("prior", params, loss_fn, clock, log, lambda: save(["prior"]), ema=True)


def train_unet(stage, models, data, clock, log, save, seed):
    name = "inpaint" if stage == "inpaint" else "unet"
    unet = models[name]
    schedule = NoiseSchedule.from_config(demo.DECODER_SCHEDULER)  # the decoder checkpoint's own
    g = torch.Generator().manual_seed(seed)
    n = STAGES[stage][1]

    def loss_fn(step):
        rows = torch.randint(0, len(data["captions"]), (n,), generator=g)
        x0 = data["latents"][rows]  # (n, L, 64/f, 64/f)
        drop = dropped_rows(n, DROP_CONDITION, g)  # (n,) rows trained unconditionally
        embeds = drop_image_embeds(data["embeds"][rows], data["zero"], drop)
        inpaint = {}
        if stage == "inpaint":
            keep = random_keep_masks(n, *x0.shape[-2:], g)  # (n, 1, 64/f, 64/f), 1 = keep, 0 = repaint
            inpaint = {"masked_latents": x0 * keep, "mask": keep}
        loss = decoder_loss(unet, schedule, x0, embeds, generator=g, **inpaint)
        return loss, {"mse": loss.item()}

    train(stage, list(unet.parameters()), loss_fn, clock, log, lambda: save([name]), ema=True)


@torch.no_grad()
def inpaint_from_decoder(unet, inpaint) -> None:
    """Start the 9-channel UNet from the decoder: same weights, the extra input channels at zero."""
    state = unet.state_dict()
    for name, value in inpaint.state_dict().items():
        if value.shape == state[name].shape:
            value.copy_(state[name])
        else:  # conv_in: (C0, 2L + 1, 3, 3) <- (C0, L, 3, 3)
            value.zero_()
            value[:, : state[name].shape[1]] = state[name]


# ----------------------------------------------------------------------------- writing the repos


def write_repos(models, root: Path) -> dict[str, Path]:
    """The hub folders (kandinsky.demo.write_checkpoint_set, fp16): prior/ (prior, towers, tokenizer, scheduler,
    image processor), decoder/, decoder-inpaint/; and a README."""
    unets = {"decoder": models["unet"], "inpaint": models["inpaint"]}
    folders = demo.write_checkpoint_set(root, {**models, **unets}, IMAGE_SIZE, learn_merges(shapes.VOCABULARY),
                                        CONTEXT, dtype=torch.float16)
    (root / "README.md").write_text(
        "# Tiny Kandinsky 2.2 trained on procedural shapes\n\n"
        "Pictures 64 x 64 of one circle, square or triangle on a plain background; prompts of the grammar\n"
        "'a [small|large] <colour> <shape> [position] [on a <colour> background]'. Reproduce with\n"
        "`kandinsky train-demo --out DIR`; measure with `kandinsky eval shapes`.\n"
    )
    return folders


# ----------------------------------------------------------------------------- main


def build_models(tokenizer_dir: Path) -> dict:
    vocab_size = write_tokenizer(tokenizer_dir)
    L = LATENT_CHANNELS
    models = {
        "tokenizer": Tokenizer.from_folder(tokenizer_dir),
        "text_encoder": build("text_encoder", vocab_size=vocab_size),
        "image_encoder": build("image_encoder"),
        "movq": build("movq", latent_channels=L, vq_embed_dim=L, **(MOVQ_FACTOR_4 if MOVQ_FACTOR == 4 else {})),
        "prior": build("prior"),
        "unet": build("unet", in_channels=L, out_channels=2 * L, sample_size=IMAGE_SIZE // MOVQ_FACTOR),
        # inpainting: noisy latents, masked picture latents, keep mask (9 channels for the real 4)
        "inpaint": build("unet", in_channels=2 * L + 1, out_channels=2 * L, sample_size=IMAGE_SIZE // MOVQ_FACTOR),
    }
    return models


def run(out: Path, minutes: float | None, steps: int | None, stages: list[str], seed: int, log,
        data_size: int = DATA_SIZE, resume: bool = False) -> dict[str, Path]:
    """Train ``stages`` (each its STAGES minutes, or ``minutes`` shared in those proportions), load the others from
    ``out/stages/``, and write the hub folders when every stage is trained."""
    torch.manual_seed(seed)
    work = out / "stages"
    work.mkdir(parents=True, exist_ok=True)
    models = build_models(work / "tokenizer")
    done = {}

    def checkpoint_path(stage):
        return work / f"{stage}.pt"

    def saver(stage):
        def save(names, final=False):
            state = {name: models[name].state_dict() for name in names}
            partial = checkpoint_path(stage).with_suffix(".partial")
            torch.save({"state": state, "done": final}, partial)
            partial.replace(checkpoint_path(stage))  # atomic: a parallel stage never reads half a file
        return save

    unfinished = []

    def load(stage) -> bool:
        path = checkpoint_path(stage)
        if not path.exists():
            return False
        ckpt = load_torch(path)  # (objects other than tensors: refused, never unpickled)
        for name, state in ckpt["state"].items():
            models[name].load_state_dict(state)
        log(f"{stage}: loaded {path} ({'done' if ckpt['done'] else 'unfinished'})")
        if not ckpt["done"]:
            unfinished.append(stage)
        return True

    missing = []
    for stage in STAGES:
        if stage not in stages:
            if not load(stage):
                missing.append(stage)
            continue
        needs = [m for m in NEEDS.get(stage, ()) if m in missing]
        if needs:
            raise FileNotFoundError(f"stage {stage!r} needs the trained {needs} ({work}/<stage>.pt is missing): "
                                    f"add them to --stages.")
        if stage in NEEDS:
            data = encoded_data(models, work, seed, data_size, NEEDS[stage], log)
        if resume and load(stage):
            if stage in unfinished:
                unfinished.remove(stage)  # trained to its end below
        elif stage == "inpaint" and "decoder" not in missing:
            inpaint_from_decoder(models["unet"], models["inpaint"])
        stage_minutes = STAGES[stage][0] if minutes is None else \
            minutes * STAGES[stage][0] / sum(STAGES[name][0] for name in stages)
        clock = Clock(steps, stage_minutes * 60)
        save = saver(stage)
        log(f"{stage}: training ({steps} steps)" if steps else f"{stage}: training {stage_minutes:.1f} min")
        if stage == "clip":
            train_clip(models, clock, log, save, seed)
            save(["text_encoder", "image_encoder"], final=True)
        elif stage == "movq":
            train_movq(models, clock, log, save, seed)
            save(["movq"], final=True)
        elif stage == "movq_decoder":
            train_movq_decoder(models, clock, log, save, seed)
            save(["movq"], final=True)
        elif stage == "prior":
            train_prior(models, data, clock, log, save, seed)
            save(["prior"], final=True)
        elif stage == "decoder":
            train_unet("decoder", models, data, clock, log, save, seed)
            save(["unet"], final=True)
        else:
            train_unet("inpaint", models, data, clock, log, save, seed)
            save(["inpaint"], final=True)
    if missing or unfinished:  # e.g. a --jobs 2 child whose sibling is still training
        log(f"not writing the repos: stages {missing + unfinished} are not trained yet")
        return {}
    return write_repos(models, out)
