"""The training loop: a recipe, top-down.

    train(config)
      setup_distributed          torchrun's environment -> rank, world size (gloo on CPU, NCCL on GPUs)
      open_out_folder            refuse a used folder unless resuming (or, overwrite, starting an earlier run over)
      load_task                  the model to train + the frozen encoders, from checkpoint folders
      load_dataset               scan the data folder, encode each image once (each rank its shard)
      make_trainable             full fine-tuning or LoRA; gradient checkpointing
      AdamW, EMA, resume         optimizer / EMA / step / RNG state from the last good checkpoint
      start_over                 overwrite: only now is the earlier run removed (a failed start keeps it)
      write_train_config         only now: a start that fails (or is Ctrl-C'd) leaves a fresh folder empty
      for each step:
        for each micro-batch:    loss (kandinsky.training.losses) -> backward (DDP all-reduces)
        clip, step, EMA update, log (CSV + PNG curve), checkpoint, validation images
        Ctrl-C:                  a checkpoint at the step reached, then KeyboardInterrupt (kandinsky.exits)
      save_outputs               the trained component in the hub layout (or the LoRA file)
      summary                    one closing line

Checkpoints and train_config.json are written atomically (a temporary file, then os.replace);
--resume passes over a damaged last checkpoint for the one before it, with a warning.

Batches are world-size invariant: ``batch`` is the global batch of one optimizer step, split
over ``grad_accum`` micro-steps and the ranks. Which samples, which noise, which timesteps and
which dropped conditions a step uses depend only on (seed, step), never on the number of
processes or on where a run was resumed: 2 processes follow 1 process, and a resumed run the
uninterrupted one.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import kandinsky.training.losses as losses
from kandinsky.threads import parameters, threads_for
from kandinsky.training.config import TASKS, TrainConfig, TrainError
from kandinsky.training.data import (
    encode_decoder_data,
    encode_prior_data,
    fingerprint,
    load_rgb,
    random_keep_masks,
    scan_folder,
)
from kandinsky.training.optim import EMA, lr_at, optimizer_step, set_lr
from kandinsky.training.plot import plot_loss_curve
from weights_convert.io import load_torch

LOG_COLUMNS = ("step", "loss", "lr", "grad_norm", "seconds")


# --------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------


def train(config: TrainConfig, overwrite: bool = False) -> dict:
    """Train as ``config`` says; returns {"step", "loss", "out", "saved"} (rank 0's view).

    ``overwrite`` (``kandinsky train --overwrite``): start over in an ``out`` that holds an earlier run
    (its train_config.json). The earlier run is removed only once every check and load of this one has
    passed (settings, checkpoint, data folder, pictures): a start that fails or is Ctrl-C'd keeps it as it was."""
    config.validate()
    if overwrite and config.resume:
        raise TrainError("--overwrite starts the run in --out over, --resume continues it: give one of them.")
    ctx = setup_distributed(config)
    try:
        config.check_world(ctx.world)
        return _train(config, ctx, overwrite)
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


def _train(config: TrainConfig, ctx, overwrite: bool = False) -> dict:
    out, fresh = open_out_folder(config, ctx, overwrite)
    try:  # every check and load before train_config.json: a failed start leaves nothing behind
        task = load_task(config, ctx.device)
        # kandinsky.threads: a small model's encoding and steps run on one thread (parameters x positions of one item)
        positions = task.model.config.num_embeddings if config.task == "prior" else (config.resolution // 8) ** 2
        work = parameters(task.model) * positions
        with threads_for(work, ctx.device):
            data = load_dataset(config, task, out, ctx)
        model = task.model
        params = make_trainable(model, config)
        optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay,
                                      eps=1e-8)
        ema = EMA(params, config.ema_decay) if config.ema_decay else None
        start, seconds = resume(config, out, model, optimizer, ema, ctx) if config.resume else (0, 0.0)
        ddp_model = wrap_ddp(model, ctx)
        with interrupt_deferred():  # the earlier run goes (overwrite) and this one's settings come together
            if overwrite:
                start_over(out, ctx)
            write_train_config(out, config, ctx)
    except BaseException:  # Ctrl-C included
        if fresh:
            remove_failed_start(out, ctx)
        raise

    loss, done, saved_at = float("nan"), start, start
    t0 = time.time() - seconds  # log.csv's seconds continue those of the run resumed
    try:
        for step in range(start, config.steps):
            lr = set_lr(optimizer, lr_at(step + 1, config.lr, config.warmup_steps))  # constant after the warm-up
            with threads_for(work, ctx.device):
                loss, grad_norm = train_step(ddp_model, task, data, optimizer, params, config, step, ctx, ema)
            done = step + 1
            if ctx.rank == 0:
                append_log(out, done, loss, lr, grad_norm, time.time() - t0)
                if done % config.log_every == 0 or done == config.steps:
                    print(f"step {done}/{config.steps}  loss {loss:.5f}  lr {lr:.2e}", file=sys.stderr, flush=True)
            if (config.save_every and done % config.save_every == 0) or done == config.steps:
                save_checkpoint(out, done, model, params, optimizer, ema, config, ctx)
                saved_at = done
            if config.validate_every and (done % config.validate_every == 0 or done == config.steps) \
                    and ctx.rank == 0:
                with ema.applied(params) if ema else contextlib.nullcontext():
                    validate(config, task, data, out / "validation" / f"step-{done:06d}", ctx.device)
    except KeyboardInterrupt:
        # Ctrl-C: keep the steps done (the weights change only in optimizer_step, which finishes
        # before a Ctrl-C lands, see train_step), then stop as the shared rule says (kandinsky.exits)
        if done > saved_at:
            save_checkpoint(out, done, model, params, optimizer, ema, config, ctx, world_barrier=False)
        raise
    saved = save_outputs(config, out, model, params, ema, ctx)
    if ctx.rank == 0:
        plot_loss_curve(out / "log.csv", out / "loss.png")
        print(summary(out, start, config.steps, time.time() - t0 - seconds, saved), file=sys.stderr, flush=True)
    return {"step": config.steps, "loss": loss, "out": out, "saved": saved}


def summary(out: Path, start: int, steps: int, seconds: float, saved: list[Path]) -> str:
    """The closing line: steps, time, the loss at the first and last step (log.csv), what was written."""
    with (out / "log.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    first, last = (float(rows[0]["loss"]), float(rows[-1]["loss"])) if rows else (float("nan"),) * 2
    this_run = f"steps {start + 1}-{steps} " if start else ""
    return (f"done: {steps} steps ({this_run}in {seconds:.1f} s), loss {first:.5f} at step 1 -> {last:.5f} at "
            f"step {steps}; wrote {', '.join(str(p) for p in saved) or 'nothing'} and {out / 'log.csv'}")


# --------------------------------------------------------------------------------------
# Processes and devices
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we initialised the process group (and destroy it at the end)


def setup_distributed(config: TrainConfig) -> DistContext:
    """One process, or one of torchrun's (WORLD_SIZE / RANK / LOCAL_RANK in the environment)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if config.device:
        device = torch.device(config.device)
    else:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), device, owns)
    return DistContext(0, 1, device, False)


def wrap_ddp(model, ctx: DistContext):
    if ctx.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def all_mean(value: float, ctx: DistContext) -> float:
    if ctx.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.item() / ctx.world


# --------------------------------------------------------------------------------------
# The output folder
# --------------------------------------------------------------------------------------

# Settings a resumed run must share with the run it continues.
SAME_ON_RESUME = ("task", "checkpoint", "data", "batch", "seed", "resolution", "lora", "lora_alpha", "ema_decay")


def open_out_folder(config: TrainConfig, ctx: DistContext, overwrite: bool = False) -> tuple[Path, bool]:
    """Check --out (a new or empty folder, the run --resume continues, or with ``overwrite`` an earlier
    run to start over; nothing is removed here) and create it; returns (out, fresh): fresh when the
    folder held nothing, so a failed start may remove what it wrote."""
    out = Path(config.out)
    saved = out / "train_config.json"
    if out.resolve().is_relative_to(Path(config.data).resolve()):
        raise TrainError(f"--out {out} is inside --data {config.data}: its pictures would become training data; "
                         "choose an output folder elsewhere.")
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file; choose a folder (new or empty).")
    if config.resume:
        if not saved.is_file():
            raise TrainError(f"--resume: {out} holds no training run (no train_config.json); "
                             "drop --resume to start one there.")
        before = json.loads(saved.read_text())
        changed = [k for k in SAME_ON_RESUME if before.get(k) != getattr(config, k)]
        if changed:
            shown = ", ".join(f"{k}: {before.get(k)!r} -> {getattr(config, k)!r}" for k in changed)
            raise TrainError(f"--resume: these settings differ from the run in {out}: {shown}. "
                             "Use the same values to continue it, or a new --out folder.")
    elif out.exists() and any(out.iterdir()):
        if not saved.is_file():
            raise TrainError(f"--out {out} is not empty and holds no training run (no train_config.json), so "
                             "neither --resume nor --overwrite takes it; choose a new or empty folder (nothing "
                             "is overwritten).")
        if not overwrite:
            raise TrainError(f"--out {out} is not empty (it holds an earlier run); pass --resume to continue "
                             "that run, --overwrite to start it over (its files are removed once this run's "
                             "checks have passed), or choose a new folder (nothing is overwritten unasked).")
    # fresh: nothing there before this run (with overwrite the earlier run stays until start_over)
    fresh = not config.resume and not (out.exists() and any(out.iterdir()))
    if ctx.world > 1:
        dist.barrier()  # every rank has looked at the folder before rank 0 writes to it
    if ctx.rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainError(f"--out {out}: cannot create it ({e.strerror}); choose a folder you can write to.") from e
    return out, fresh


def write_train_config(out: Path, config: TrainConfig, ctx: DistContext) -> None:
    """OUT/train_config.json, written once every check and load has passed (atomically)."""
    if ctx.rank == 0:
        atomic_write(out / "train_config.json", lambda tmp: tmp.write_text(
            json.dumps(dataclasses.asdict(config), indent=2) + "\n"))


def start_over(out: Path, ctx: DistContext) -> None:
    """--overwrite, once every check and load has passed: remove the earlier run in ``out`` (rank 0), all
    but cache/ (the encodings, keyed by the pictures, checkpoints and resolution: this run's own ones)."""
    if ctx.rank != 0:
        return
    for child in out.iterdir():
        if child.name != "cache":
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def remove_failed_start(out: Path, ctx: DistContext) -> None:
    """Empty the folder a fresh run created or found empty (all of it is that run's), so the
    corrected rerun starts there."""
    if ctx.rank != 0 or not out.is_dir():
        return
    for child in out.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    with contextlib.suppress(OSError):
        out.rmdir()


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then os.replace: ``path`` is the old file or the
    whole new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def append_log(out: Path, step: int, loss: float, lr: float, grad_norm: float, seconds: float) -> None:
    path = out / "log.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(LOG_COLUMNS)
        writer.writerow([step, f"{loss:.8g}", f"{lr:.6g}", f"{grad_norm:.6g}", f"{seconds:.2f}"])


def truncate_log(out: Path, step: int) -> float:
    """Drop log rows after ``step`` (written by a run that stopped after its last checkpoint); returns
    the seconds logged at ``step`` (where the resumed run's clock continues)."""
    path = out / "log.csv"
    if not path.exists():
        return 0.0
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    keep = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= step]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            csv.writer(f).writerows(keep)

    atomic_write(path, write)
    return float(keep[-1][LOG_COLUMNS.index("seconds")]) if len(keep) > 1 else 0.0


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Task:
    """What one training task needs: the model to train and the frozen parts around it."""

    name: str
    model: torch.nn.Module  # the prior or the UNet
    schedule: object  # the training noise schedule (alphas_cumprod, betas, add_noise)
    encoders: dict  # frozen: text_encoder, tokenizer, image_encoder, image_processor, movq
    folders: dict  # checkpoint folders: "prior", "decoder" (None where not given)


def _folder(path, what: str, subfolders: tuple[str, ...], flag: str) -> Path:
    """A checkpoint folder in the hub layout (a local folder, or a hub id downloaded / cached)."""
    from kandinsky.hub import resolve

    root = resolve(path, f"{flag} ({what} checkpoint)")
    missing = [s for s in subfolders if not (root / s).is_dir()]
    if missing:
        raise TrainError(f"{flag} {root}: not a {what} checkpoint folder (missing {', '.join(missing)}/; "
                         f"expected the hub layout with {', '.join(s + '/' for s in subfolders)}).")
    return root


def load_task(config: TrainConfig, device) -> Task:
    from kandinsky.clip import ImagePreprocessor, Tokenizer
    from kandinsky.sampling.schedule import NoiseSchedule
    from weights_convert import load_component

    spec = TASKS[config.task]
    prior_dir = config.checkpoint if config.task == "prior" else config.prior
    decoder_dir = config.checkpoint if config.task != "prior" else config.decoder
    if prior_dir is None:
        raise TrainError(f"`train {config.task}` needs --prior FOLDER: the prior checkpoint whose CLIP image "
                         "encoder makes the image embeddings the UNet is conditioned on.")
    prior_root = _folder(prior_dir, "prior", ("prior", "text_encoder", "image_encoder", "tokenizer", "image_processor"),
                         "--checkpoint" if config.task == "prior" else "--prior")
    decoder_root = None
    if decoder_dir is not None:
        decoder_root = _folder(decoder_dir, "decoder", ("unet", "movq", "scheduler"),
                               "--checkpoint" if config.task != "prior" else "--decoder")
    encoders = {
        "image_encoder": load_component(prior_root / "image_encoder", device=device),
        "image_processor": ImagePreprocessor.from_folder(prior_root / "image_processor"),
    }
    if config.task == "prior":
        encoders["text_encoder"] = load_component(prior_root / "text_encoder", device=device)
        encoders["tokenizer"] = Tokenizer.from_folder(prior_root / "tokenizer")
        model = load_component(prior_root / "prior", device=device)
        schedule = losses.prior_schedule()
    else:
        encoders["movq"] = load_component(decoder_root / "movq", device=device)
        model = load_component(decoder_root / "unet", device=device)
        schedule = NoiseSchedule.from_folder(decoder_root / "scheduler")
        latent = encoders["movq"].config.latent_channels
        channels, wanted = model.config.in_channels, spec.in_channels(latent)
        if channels != wanted:
            raise TrainError(f"`train {config.task}` needs a UNet with {wanted} input channels (for the MoVQ's "
                             f"{latent} latent channels), but {decoder_root}/unet has {channels}: "
                             f"{spec.checkpoint_help}.")
    return Task(config.task, model, schedule, encoders, {"prior": prior_root, "decoder": decoder_root})


GRADIENT_CHECKPOINTED = {
    # module class name -> blocks whose forward is recomputed in the backward pass (the pure
    # blocks: not the UNet's down / up levels, which push to and pop from the skip list)
    "DiffusionPrior": ("TransformerBlock",),
    "UNet": ("ResBlock", "AddedKVAttention"),
}


def enable_gradient_checkpointing(model) -> int:
    """Recompute the pure blocks' activations in the backward pass; returns how many blocks."""
    from torch.utils.checkpoint import checkpoint

    names = GRADIENT_CHECKPOINTED.get(type(model).__name__, ())
    n = 0
    for module in model.modules():
        if type(module).__name__ in names:
            module.forward = (lambda f: lambda *a: checkpoint(f, *a, use_reentrant=False))(module.forward)
            n += 1
    return n


def make_trainable(model, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Full fine-tuning (every weight but the prior's fixed clip_mean / clip_std) or LoRA adapters."""
    model.train()
    if config.lora:
        try:
            from kandinsky.lora import add_lora
        except ImportError as e:
            raise TrainError(f"--lora needs kandinsky.lora, which is not available here ({e}).") from e
        params = add_lora(model, config.lora, config.lora_alpha)  # freezes the model; the adapters' parameters
    else:
        model.requires_grad_(True)
        for name in ("clip_mean", "clip_std"):  # statistics of the CLIP space, not learned
            if hasattr(model, name):
                getattr(model, name).requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
    if config.gradient_checkpointing and not enable_gradient_checkpointing(model):
        raise TrainError(f"--gradient-checkpointing: no checkpointable blocks in {type(model).__name__}.")
    return params


def param_names(model, params) -> list[str]:
    """Stable names of the trained parameters (for checkpoints)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id.get(id(p), f"param.{i}") for i, p in enumerate(params)]


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dataset:
    tensors: dict  # name -> (N, ...) float32 / bool CPU tensors, in item order
    captions: list[str]
    paths: list[Path]
    extra: dict  # "empty_text" (prior) or "zero_embeds" (decoder): the dropped condition

    def __len__(self) -> int:
        return len(self.captions)


def load_dataset(config: TrainConfig, task: Task, out: Path, ctx: DistContext) -> Dataset:
    spec = TASKS[config.task]
    image_size = task.encoders["image_processor"].config.crop_size
    min_size = config.min_size
    if min_size is None:  # what the encoders would have to upscale
        min_size = image_size if config.task == "prior" else config.resolution
    log = (lambda m: print(m, file=sys.stderr)) if ctx.rank == 0 else (lambda m: None)
    items = scan_folder(config.data, need_text=spec.needs_text, min_size=min_size, on_bad=config.on_bad_data, log=log)

    if len(items) < ctx.world:
        raise TrainError(f"{len(items)} usable picture(s) in {config.data} for {ctx.world} processes; "
                         "each process needs at least one (use fewer processes).")
    key = fingerprint(items, config.task, str(task.folders["prior"]), str(task.folders["decoder"]), config.resolution)
    cache = out / "cache" / f"encodings-{key}.pt"
    if config.cache and cache.is_file():
        tensors = load_torch(cache)
    else:
        shard = items[ctx.rank :: ctx.world]  # each rank encodes its share, then all share all
        tensors = encode_items(config, task, shard)
        if ctx.world > 1:
            gathered = [None] * ctx.world
            dist.all_gather_object(gathered, tensors)
            tensors = {k: interleave([g[k] for g in gathered], len(items)) for k in tensors}
        if config.cache and ctx.rank == 0:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(tensors, cache.with_suffix(".tmp"))
            cache.with_suffix(".tmp").replace(cache)
    return Dataset(tensors, [i.text for i in items], [i.path for i in items], dropped_conditions(config, task))


def interleave(shards: list[torch.Tensor], n: int) -> torch.Tensor:
    """Inverse of items[rank::world]: shard r holds items r, r + world, ..."""
    out = torch.empty((n,) + tuple(shards[0].shape[1:]), dtype=shards[0].dtype)
    for r, shard in enumerate(shards):
        out[r :: len(shards)] = shard
    return out


def encode_items(config: TrainConfig, task: Task, items) -> dict:
    e, device = task.encoders, next(task.model.parameters()).device
    if config.task == "prior":
        return encode_prior_data(items, e["text_encoder"], e["tokenizer"], e["image_encoder"], e["image_processor"],
                                 device)
    return encode_decoder_data(items, e["movq"], e["image_encoder"], e["image_processor"], config.resolution, device)


@torch.no_grad()
def dropped_conditions(config: TrainConfig, task: Task) -> dict:
    """What a dropped condition becomes: the empty prompt's encoding, or the zero-image embedding."""
    if not config.cond_drop:
        return {}
    e = task.encoders
    device = next(task.model.parameters()).device
    if config.task == "prior":
        ids, mask = e["tokenizer"]([""])
        enc = e["text_encoder"](ids.to(device))
        return {"empty_text": (enc.text_embeds.float(), enc.last_hidden_state.float(), mask.to(device))}
    size = e["image_encoder"].config.image_size
    zero = torch.zeros(1, 3, size, size, device=device, dtype=e["image_encoder"].dtype)
    return {"zero_embeds": e["image_encoder"](zero).float()}


def step_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """The ``batch`` dataset indices of optimizer step ``step``: consecutive positions of an endless
    sequence of shuffled epochs (epoch e is a permutation drawn with seed (seed, e))."""
    positions = torch.arange(step * batch, (step + 1) * batch)
    out = torch.empty(batch, dtype=torch.long)
    for epoch in positions.div(n, rounding_mode="floor").unique().tolist():
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
        sel = positions.div(n, rounding_mode="floor") == epoch
        out[sel] = perm[positions[sel] % n]
    return out


# --------------------------------------------------------------------------------------
# One optimizer step
# --------------------------------------------------------------------------------------


def step_generator(config: TrainConfig, step: int) -> torch.Generator:
    """The randomness of one step (noise, timesteps, dropout, masks): a function of (seed, step)."""
    return torch.Generator().manual_seed(config.seed * 7_919 + 1_000_003 * (step + 1))


def train_step(model, task: Task, data: Dataset, optimizer, params, config: TrainConfig, step: int, ctx: DistContext,
               ema: EMA | None = None):
    """Forward / backward over the micro-batches of this rank, then the optimizer step (and the EMA
    update); returns (global mean loss, grad norm)."""
    B = config.batch
    idx = step_indices(step, len(data), B, config.seed)  # (B,) the global batch
    batch = {k: v[idx] for k, v in data.tensors.items()}
    draws = draw_step(task, config, batch, step)  # the whole global batch's randomness
    rows_per_micro = B // config.grad_accum
    per_rank = rows_per_micro // ctx.world
    total = 0.0
    for micro in range(config.grad_accum):
        lo = micro * rows_per_micro + ctx.rank * per_rank
        rows = slice(lo, lo + per_rank)
        last = micro == config.grad_accum - 1
        sync = contextlib.nullcontext() if (last or ctx.world == 1) else model.no_sync()
        with sync:
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=config.bf16):
                loss = task_loss(model, task, data, batch, draws, rows, config, ctx.device)
            (loss / config.grad_accum).backward()
        total += loss.item() / config.grad_accum
    with interrupt_deferred():  # the weights, the optimizer and the EMA change together or not at all
        grad_norm = optimizer_step(optimizer, params, config.max_grad_norm, ema)
    return all_mean(total, ctx), grad_norm


@contextlib.contextmanager
def interrupt_deferred():
    """A Ctrl-C (SIGINT) during the block lands as KeyboardInterrupt when it ends (main thread only;
    elsewhere the block runs as is)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *a: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def draw_step(task: Task, config: TrainConfig, batch: dict, step: int) -> dict:
    """Noise, timesteps, dropped rows and inpainting masks for every row of the global batch."""
    g = step_generator(config, step)
    x0 = batch["image_embeds"] if config.task == "prior" else batch["latents"]
    draws = {
        "noise": torch.randn(x0.shape, generator=g),
        "timesteps": torch.randint(0, task.schedule.num_train_timesteps, (x0.shape[0],), generator=g),
        "drop": losses.dropped_rows(x0.shape[0], config.cond_drop, g),
    }
    if config.task == "inpaint":
        draws["keep"] = random_keep_masks(x0.shape[0], x0.shape[2], x0.shape[3], g)
    return draws


def task_loss(model, task: Task, data: Dataset, batch: dict, draws: dict, rows: slice, config: TrainConfig,
              device) -> torch.Tensor:
    """The loss of this micro-batch's ``rows`` of the global batch."""
    b = {k: v[rows].to(device) for k, v in batch.items()}
    d = {k: v[rows].to(device) for k, v in draws.items()}
    if config.task == "prior":
        embeds, hidden, mask = b["text_embeds"], b["text_hidden"], b["text_mask"]
        if config.cond_drop:
            embeds, hidden, mask = losses.drop_text(embeds, hidden, mask, data.extra["empty_text"], d["drop"])
        return losses.prior_loss(model, task.schedule, b["image_embeds"], embeds, hidden, mask,
                                 noise=d["noise"], timesteps=d["timesteps"], snr_gamma=config.snr_gamma)
    image_embeds = b["image_embeds"]
    if config.cond_drop:
        image_embeds = losses.drop_image_embeds(image_embeds, data.extra["zero_embeds"], d["drop"])
    extra = {}
    if config.task == "inpaint":
        extra = {"masked_latents": b["latents"] * d["keep"], "mask": d["keep"]}
    return losses.decoder_loss(model, task.schedule, b["latents"], image_embeds, noise=d["noise"],
                               timesteps=d["timesteps"], snr_gamma=config.snr_gamma,
                               vlb_weight=config.vlb_weight, **extra)


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def rng_state() -> dict:
    """Every generator's state as tensors and plain containers, so a checkpoint reads back with
    ``weights_only=True`` (numpy's state is a tuple holding an array: its keys go in as a tensor)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)  # a tuple: a checkpoint written before the states were tensors
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_array_globals() -> list:
    """What a numpy array needs to be read back with ``weights_only=True`` (checkpoints written before
    ``rng_state`` stored numpy's state as a tensor): numpy's array constructor, never arbitrary code."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def save_checkpoint(out: Path, step: int, model, params, optimizer, ema, config: TrainConfig, ctx,
                    world_barrier: bool = True) -> None:
    """out/checkpoints/step-NNNNNN.pt (rank 0 only): trained weights, optimizer, EMA, step, RNG;
    written atomically (a temporary file, then os.replace), the oldest beyond --keep-checkpoints removed."""
    if ctx.rank == 0:
        folder = out / "checkpoints"
        folder.mkdir(exist_ok=True)
        state = {
            "step": step,
            "params": dict(zip(param_names(model, params), [p.detach().cpu() for p in params])),
            "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema else None,
            "rng": rng_state(),
        }
        with interrupt_deferred():
            atomic_write(folder / f"step-{step:06d}.pt", lambda tmp: torch.save(state, tmp))
        for old in sorted(folder.glob("step-*.pt"))[: -config.keep_checkpoints]:
            old.unlink()
        plot_loss_curve(out / "log.csv", out / "loss.png")
    if ctx.world > 1 and world_barrier:
        dist.barrier()


def checkpoints(out: Path) -> list[Path]:
    """OUT/checkpoints/step-*.pt, oldest first."""
    return sorted((out / "checkpoints").glob("step-*.pt"))


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoints(out)
    return found[-1] if found else None


def load_checkpoint(out: Path) -> tuple[Path, dict] | None:
    """The newest readable checkpoint of ``out`` and its state (None: none yet). A truncated or corrupt
    one is passed over for the one before it, with a warning."""
    import warnings

    for path in reversed(checkpoints(out)):
        try:
            with torch.serialization.safe_globals(_numpy_array_globals()):
                state = load_torch(path)  # weights_only: a file holding other objects is refused, never run
            if not isinstance(state, dict) or not {"step", "params", "optimizer", "rng"} <= state.keys():
                raise ValueError("not a training checkpoint")
            return path, state
        except Exception as e:  # torch's zip reader, pickle and EOF errors: a damaged file
            reason = str(e).splitlines()[0].removeprefix(f"{path}: ")  # WeightsError names the path first
            warnings.warn(f"--resume: {path} cannot be read ({reason[:160]}); trying the checkpoint before it",
                          stacklevel=2)
    return None


def resume(config: TrainConfig, out: Path, model, optimizer, ema, ctx) -> tuple[int, float]:
    """Restore the last good checkpoint of ``out``; returns the step it was saved at and the seconds
    log.csv had reached there."""
    import warnings

    found = load_checkpoint(out)
    if found is None:  # stopped before its first checkpoint: the same settings start it again
        warnings.warn(f"--resume: no {'readable ' if checkpoints(out) else ''}checkpoint in {out / 'checkpoints'} "
                      "yet; starting from step 0", stacklevel=2)
        return 0, (truncate_log(out, 0) if ctx.rank == 0 else 0.0)
    path, state = found
    named = dict(model.named_parameters())
    missing = [n for n in state["params"] if n not in named]
    if missing:
        raise TrainError(f"--resume: {path} holds parameters the model does not have: {missing[:5]}.")
    step = state["step"]
    if step > config.steps:
        raise TrainError(f"--resume: the checkpoint is at step {step}, beyond --steps {config.steps}.")
    with torch.no_grad():
        for name, value in state["params"].items():
            named[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])
    set_rng_state(state["rng"])
    seconds = 0.0
    if ctx.rank == 0:
        seconds = truncate_log(out, step)
        print(f"resumed from {path} (step {step})", file=sys.stderr)
    return step, seconds


# --------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------


def save_outputs(config: TrainConfig, out: Path, model, params, ema, ctx) -> list[Path]:
    """OUT/prior or OUT/unet: the trained component in the hub layout; OUT/lora with ``lora``: the
    adapters (kandinsky.lora.save_lora, PEFT layout). EMA weights when EMA is on (the raw ones
    in ``<name>-no-ema``)."""
    if ctx.rank != 0:
        return []
    from weights_convert import save_component

    name = "lora" if config.lora else TASKS[config.task].component
    model.eval()
    saved = []

    def write(folder: Path):
        if folder.exists():
            shutil.rmtree(folder)  # our own output of an earlier (resumed) run of this folder
        if config.lora:
            from kandinsky.lora import save_lora

            save_lora(model, folder)
        else:
            save_component(model, folder, layout="hub")
        saved.append(folder)

    if ema is not None:
        write(out / f"{name}-no-ema")
        with ema.applied(params):
            write(out / name)
    else:
        write(out / name)
    return saved


@torch.no_grad()
def validate(config: TrainConfig, task: Task, data: Dataset, folder: Path, device) -> list[Path]:
    """Sample pictures of the validation prompts with the model being trained (PNGs in ``folder``)."""
    from kandinsky.clip import Tokenizer
    from kandinsky.pipelines.decoder import DecoderPipeline
    from kandinsky.pipelines.prior import PriorPipeline
    from kandinsky.sampling.schedule import NoiseSchedule
    from weights_convert import load_component

    prompts = list(config.validation_prompts) or [c for c in data.captions if c][:2] or ["a picture"]
    model = task.model
    model.eval()
    try:
        g = torch.Generator().manual_seed(config.seed)
        prior_root, decoder_root = task.folders["prior"], task.folders["decoder"]
        if decoder_root is None:
            print("validation: no --decoder checkpoint to turn the prior's embeddings into pictures; skipped",
                  file=sys.stderr)
            return []
        e = task.encoders
        prior = PriorPipeline(
            model if config.task == "prior" else load_component(prior_root / "prior", device=device),
            e.get("text_encoder") or load_component(prior_root / "text_encoder", device=device),
            e["image_encoder"],
            e.get("tokenizer") or Tokenizer.from_folder(prior_root / "tokenizer"),
            NoiseSchedule.from_folder(prior_root / "scheduler"),
            e["image_processor"],
        )
        embeds = prior(prompts, num_inference_steps=config.validation_steps, generator=g, progress=False)
        if config.task == "prior":
            decoder = DecoderPipeline.from_pretrained(decoder_root, device=device)
        else:
            decoder = DecoderPipeline(model, e["movq"], NoiseSchedule.from_folder(decoder_root / "scheduler"))
        size = config.resolution
        common = dict(height=size, width=size, num_inference_steps=config.validation_steps, generator=g, progress=False)
        if config.task == "inpaint":
            image = load_rgb(data.paths[0]).resize((size, size))
            mask = np.zeros((size, size), dtype=np.float32)
            mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1  # repaint the centre
            images = decoder.inpaint(embeds.image_embeds, image, mask, embeds.negative_image_embeds, **common).images
        else:
            images = decoder.text2img(embeds.image_embeds, embeds.negative_image_embeds, **common).images
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, (prompt, image) in enumerate(zip(prompts, images)):
            path = folder / f"{i:02d}.png"
            image.save(path)
            paths.append(path)
        (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
        return paths
    finally:
        model.train()
