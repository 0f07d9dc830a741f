"""Training Kandinsky 2.2: the published losses, a data-folder reader and a training loop
(AdamW, gradient accumulation, clipping, bf16, gradient checkpointing, EMA, resumable
checkpoints, validation pictures, loss log) that runs data-parallel under torchrun.

    from kandinsky.training import TrainConfig, train
    train(TrainConfig("decoder", data="pics", out="runs/dec", checkpoint="kandinsky-2-2-decoder",
                      prior="kandinsky-2-2-prior", steps=1000))

or ``kandinsky train decoder --data pics --out runs/dec ...`` (docs/training.md).

    kandinsky.training.config   TrainConfig (the settings), TASKS, TrainError
    kandinsky.training.data     the data folder: scan_folder, encodings, inpainting masks
    kandinsky.training.losses   prior_loss, decoder_loss, vlb_terms, condition dropout
    kandinsky.training.optim    the learning-rate schedule, the end of a step, the EMA (shared with train-demo)
    kandinsky.training.loop     train(config): the recipe
    kandinsky.training.plot     the loss curve

The names below are read from those modules when first used (this package imports none of them,
so ``import kandinsky.training.optim`` loads only that module).
"""
_LAZY = {
    "TASKS": "kandinsky.training.config",
    "TrainConfig": "kandinsky.training.config",
    "TrainError": "kandinsky.training.config",
    "DataError": "kandinsky.training.data",
    "scan_folder": "kandinsky.training.data",
    "NoiseSchedule": "kandinsky.sampling.schedule",  # the one schedule, which the losses read
    "prior_schedule": "kandinsky.training.losses",
    "prior_loss": "kandinsky.training.losses",
    "decoder_loss": "kandinsky.training.losses",
    "vlb_terms": "kandinsky.training.losses",
    "drop_text": "kandinsky.training.losses",
    "drop_image_embeds": "kandinsky.training.losses",
    "dropped_rows": "kandinsky.training.losses",
    "EMA": "kandinsky.training.optim",
    "lr_at": "kandinsky.training.optim",
    "train": "kandinsky.training.loop",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kandinsky.training' has no attribute {name!r}")


__all__ = list(_LAZY)
