"""Training Kandinsky 2.2: the published losses, a data-folder reader and a training loop
(AdamW, gradient accumulation, clipping, bf16, gradient checkpointing, EMA, resumable
checkpoints, validation pictures, loss log) that runs data-parallel under torchrun.

    from kandinsky.training import TrainConfig, train
    train(TrainConfig("decoder", data="pics", out="runs/dec", checkpoint="kandinsky-2-2-decoder",
                      prior="kandinsky-2-2-prior", steps=1000))

or ``kandinsky train decoder --data pics --out runs/dec ...`` (docs/training.md).
"""
from kandinsky.training.config import TASKS, TrainConfig, TrainError
from kandinsky.training.data import DataError, scan_folder
from kandinsky.training.losses import (
    NoiseSchedule,
    decoder_loss,
    drop_image_embeds,
    drop_text,
    dropped_rows,
    prior_loss,
    prior_schedule,
    vlb_terms,
)


def train(config: TrainConfig) -> dict:
    """Run a training (see kandinsky.training.loop)."""
    from kandinsky.training.loop import train as _train

    return _train(config)


__all__ = [
    "TASKS",
    "TrainConfig",
    "TrainError",
    "DataError",
    "scan_folder",
    "NoiseSchedule",
    "prior_schedule",
    "prior_loss",
    "decoder_loss",
    "vlb_terms",
    "drop_text",
    "drop_image_embeds",
    "dropped_rows",
    "train",
]
