"""The training settings, declared once: ``TrainConfig``'s fields are the Python API, the
``kandinsky train`` flags (``--grad-accum`` for ``grad_accum``) and the table in docs/training.md."""
from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Callable


class TrainError(ValueError):
    """A training setting or folder cannot be used (the message says which and how to fix it)."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    component: str  # the folder the trained model is saved to (the hub's name)
    in_channels: Callable[[int], int] | None  # the UNet's input channels for C latent channels (None: the prior)
    needs_text: bool  # captions required for every image
    checkpoint_help: str


TASKS = {
    "prior": TaskSpec("prior", None, True, "a prior checkpoint (kandinsky-2-2-prior layout)"),
    # the noisy latents (C channels) | + the masked picture's latents (C) and the mask (1)
    "decoder": TaskSpec("unet", lambda c: c, False, "a text2img decoder checkpoint (kandinsky-2-2-decoder layout)"),
    "inpaint": TaskSpec("unet", lambda c: 2 * c + 1, False,
                        "an inpainting decoder checkpoint (kandinsky-2-2-decoder-inpaint layout)"),
}


def _f(default, help: str, group: str = "training", **extra):
    return field(default=default, metadata={"help": help, "group": group, **extra})


@dataclasses.dataclass
class TrainConfig:
    """Everything one training run depends on (saved to OUT/train_config.json)."""

    task: str = field(default="decoder",
                      metadata={"help": "what to train", "choices": tuple(TASKS), "positional": True})
    data: str = _f(None, "folder of images with metadata.jsonl (file_name, text) or a .txt caption beside each image",
                   "inputs", required=True)
    out: str = _f(None, "output folder (logs, checkpoints, validation pictures, trained weights); "
                  "must be new or empty unless --resume", "inputs", required=True)
    checkpoint: str = _f(None, "base weights: the checkpoint folder (hub layout) of the model to train", "inputs",
                         required=True)
    prior: str | None = _f(None, "decoder / inpaint: the prior checkpoint folder (its CLIP image encoder makes the "
                           "image embeddings; validation samples prompts with it)", "inputs")
    decoder: str | None = _f(None, "prior: a decoder checkpoint folder, to draw validation pictures", "inputs")
    steps: int = _f(1000, "optimizer steps in all (a resumed run continues up to this number)")
    batch: int = _f(4, "global batch of one optimizer step (split over --grad-accum micro-steps and the processes)")
    grad_accum: int = _f(1, "micro-steps whose gradients add up to one optimizer step")
    lr: float = _f(1e-4, "AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(0, "linear learning-rate warm-up steps")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (0: no clipping)")
    resolution: int = _f(512, "decoder / inpaint: training picture size (shorter side resized, centre crop; "
                         "a multiple of 64)")
    min_size: int | None = _f(None, "images whose shorter side is smaller are bad data (default: --resolution; "
                              "the prior: the CLIP input size)", "data")
    on_bad_data: str = _f("error", "bad items (unreadable, no caption, too small): refuse the folder, or skip them "
                          "(each is reported)", "data", choices=("error", "skip"))
    cache: bool = _f(False, "keep the encodings in OUT/cache and reuse them on --resume", "data")
    snr_gamma: float | None = _f(None, "Min-SNR-gamma loss weighting (5.0 is the paper's)", "loss")
    vlb_weight: float = _f(0.0, "decoder: weight of the variational-bound term that trains the variance channels "
                           "(the original authors used 1.0)", "loss")
    cond_drop: float = _f(0.0, "probability of dropping the condition (text for the prior, image embedding for "
                          "the decoder) for classifier-free guidance", "loss")
    ema_decay: float | None = _f(None, "keep an exponential moving average of the weights (e.g. 0.9999); the saved "
                                 "model is the EMA, the raw weights go to <name>-no-ema", "loss")
    bf16: bool = _f(False, "bfloat16 autocast for the forward pass", "speed")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass (less memory)", "speed")
    lora: int | None = _f(None, "train LoRA adapters of this rank instead of all weights (kandinsky.lora)", "lora")
    lora_alpha: float | None = _f(None, "LoRA alpha (default: the rank)", "lora")
    seed: int = _f(0, "seed of the data order, noise and timesteps")
    device: str | None = _f(None, "device (default: cuda:LOCAL_RANK when CUDA is available, else cpu)", "speed")
    log_every: int = _f(10, "print the loss every N steps (log.csv gets every step)", "outputs")
    save_every: int = _f(0, "write a resumable checkpoint every N steps (0: only at the end)", "outputs")
    keep_checkpoints: int = _f(2, "how many of the latest checkpoints to keep", "outputs")
    validate_every: int = _f(0, "draw validation pictures every N steps and at the end (0: never)", "outputs")
    validation_prompts: tuple[str, ...] = _f((), "prompts of the validation pictures (default: the first two captions)",
                                             "outputs", nargs="+")
    validation_steps: int = _f(25, "sampler steps for the validation pictures", "outputs")
    resume: bool = _f(False, "continue the run in --out from its last checkpoint", "outputs")

    def validate(self) -> None:
        """Clear errors naming the setting, before anything is loaded."""
        problems = []
        if self.task not in TASKS:
            problems.append(f"task {self.task!r}: expected one of {', '.join(TASKS)}")
        for name in ("data", "out", "checkpoint"):
            if not getattr(self, name):
                problems.append(f"--{name} is required")
        for name in ("steps", "batch", "grad_accum", "resolution", "log_every", "keep_checkpoints", "validation_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "save_every", "validate_every"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0")
        if self.lr <= 0:
            problems.append(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.cond_drop < 1:
            problems.append(f"--cond-drop must be in [0, 1), got {self.cond_drop}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            problems.append(f"--ema-decay must be in (0, 1), got {self.ema_decay}")
        if self.vlb_weight < 0 or (self.vlb_weight and self.task == "prior"):
            problems.append("--vlb-weight must be >= 0 and applies to the decoder / inpaint only")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            problems.append(f"--snr-gamma must be > 0, got {self.snr_gamma}")
        if self.lora is not None and self.lora < 1:
            problems.append(f"--lora RANK must be a positive integer, got {self.lora}")
        if self.task != "prior" and isinstance(self.resolution, int) and self.resolution % 64:
            problems.append(f"--resolution must be a multiple of 64 (MoVQ x8, UNet x8), got {self.resolution}")
        if self.on_bad_data not in ("error", "skip"):
            problems.append(f"--on-bad-data must be error or skip, got {self.on_bad_data!r}")
        if problems:
            raise TrainError("; ".join(problems) + ".")

    def check_world(self, world: int) -> None:
        """The global batch must split evenly over micro-steps and processes."""
        if self.batch % (self.grad_accum * world):
            raise TrainError(f"--batch {self.batch} must be a multiple of --grad-accum ({self.grad_accum}) x "
                             f"the number of processes ({world}) = {self.grad_accum * world}: each micro-batch has "
                             "the same size.")
