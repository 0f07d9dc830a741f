"""``kandinsky train prior|decoder|inpaint --data DIR --out DIR --checkpoint FOLDER [options]``.

The flags are TrainConfig's fields (kandinsky/training/config.py). Run it under
``torchrun --nproc_per_node N`` to train data-parallel. ``python -m kandinsky.training.cli``
is the same command.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from kandinsky.training.config import TASKS, TrainConfig

EXAMPLES = """examples:
  kandinsky train decoder --data pics/ --out runs/dec --checkpoint kandinsky-2-2-decoder \\
      --prior kandinsky-2-2-prior --steps 2000 --batch 8 --lr 1e-5 --resolution 512
  kandinsky train prior --data pics/ --out runs/prior --checkpoint kandinsky-2-2-prior --lora 16
  torchrun --nproc_per_node 4 -m kandinsky.training.cli decoder ...   (data-parallel)
  kandinsky train decoder ... --resume                                  (continue a run)
"""


def _type(hint):
    """The argparse type of a field's type hint such as ``int | None``."""
    for t in typing.get_args(hint) or (hint,):
        if t in (int, float, str):
            return t
    return str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kandinsky train",
        description="Fine-tune Kandinsky 2.2's prior, decoder or inpainting UNet (full weights or LoRA) "
                    "on a folder of captioned images.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if meta.get("positional"):
            parser.add_argument(f.name, choices=meta["choices"], help=meta["help"] + ": " + ", ".join(
                f"{k} ({v.checkpoint_help})" for k, v in TASKS.items()))
            continue
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        flag = "--" + f.name.replace("_", "-")
        kwargs = {"help": meta["help"], "dest": f.name}
        if hints[f.name] is bool:
            group.add_argument(flag, action="store_true", **kwargs)
            continue
        kwargs["type"] = _type(hints[f.name])
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if "nargs" in meta:
            kwargs["nargs"] = meta["nargs"]
            kwargs["type"] = str
        if meta.get("required"):
            kwargs["required"] = True
            kwargs["metavar"] = "DIR" if f.name in ("data", "out") else "FOLDER"
        else:
            kwargs["default"] = f.default
            if f.default is not None and "nargs" not in meta:
                kwargs["help"] += f" (default {f.default})"
        group.add_argument(flag, **kwargs)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = vars(args)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in values.items() if k in fields})
    if isinstance(config.validation_prompts, list):
        config.validation_prompts = tuple(config.validation_prompts)
    return config


def main(argv=None) -> int:
    from kandinsky.config import ConfigError
    from kandinsky.training.config import TrainError
    from kandinsky.training.data import DataError
    from kandinsky.training.loop import train
    from weights_convert.io import WeightsError

    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        config.validate()
        train(config)
    except (TrainError, DataError, ConfigError, WeightsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
