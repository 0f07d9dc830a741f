"""``kandinsky train`` (kandinsky.training) and ``kandinsky train-demo`` (kandinsky.data.train_demo).

    kandinsky train prior|decoder|inpaint --data DIR --out DIR --checkpoint FOLDER [options]
    kandinsky train-demo --out demo-weights [--jobs 2] [--stages clip --minutes 8 --resume]

``kandinsky train``'s flags are TrainConfig's fields (kandinsky/training/config.py); run it under
``torchrun --nproc_per_node N -m kandinsky.cli train ...`` to train data-parallel.
"""
from __future__ import annotations

import dataclasses
import sys
import time
import typing
from pathlib import Path

from kandinsky.cli import common

TRAIN_DESCRIPTION = ("Fine-tune Kandinsky 2.2's prior, decoder or inpainting UNet (full weights or LoRA) "
                     "on a folder of captioned images.")
TRAIN_EXAMPLES = """examples:
  kandinsky train decoder --data pics/ --out runs/dec --checkpoint kandinsky-2-2-decoder \\
      --prior kandinsky-2-2-prior --steps 2000 --batch 8 --lr 1e-5 --resolution 512
  kandinsky train prior --data pics/ --out runs/prior --checkpoint kandinsky-2-2-prior --lora 16
  torchrun --nproc_per_node 4 -m kandinsky.cli train decoder ...   (data-parallel)
  kandinsky train decoder ... --resume                               (continue a run)
"""


def _type(hint):
    """The argparse type of a field's type hint such as ``int | None``."""
    for t in typing.get_args(hint) or (hint,):
        if t in (int, float, str):
            return t
    return str


def add_train_arguments(parser) -> None:
    """One flag per TrainConfig field, in its group (the task is the positional field)."""
    from kandinsky.training.config import TASKS, TrainConfig

    groups = {}
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
    groups["inputs"].add_argument(
        "--overwrite", action="store_true",
        help="start over in an --out that holds an earlier run (its train_config.json): its files are removed "
             "once every check has passed (data, pictures, checkpoint, settings; a failed start keeps them), all "
             "but cache/ (without it such a folder is refused; --resume continues the run instead)")


def config_from_args(args):
    """The TrainConfig of the parsed flags."""
    from kandinsky.training.config import TrainConfig

    values = vars(args)
    config = TrainConfig(**{f.name: values[f.name] for f in dataclasses.fields(TrainConfig) if f.name in values})
    if isinstance(config.validation_prompts, list):
        config.validation_prompts = tuple(config.validation_prompts)
    return config


def run_train(args) -> int:
    from kandinsky.training.loop import latest_checkpoint, train

    config = config_from_args(args)
    config.validate()
    common.check_folder(config.out, f"--out {config.out}")  # before any data or weights are read
    resume = "--resume in place of --overwrite" if args.overwrite else "--resume"

    def kept() -> str:  # the loop writes a checkpoint at the step a Ctrl-C reached
        last = latest_checkpoint(Path(config.out))
        if last is None and (Path(config.out) / "train_config.json").is_file():
            return f"no checkpoint yet in {config.out}; rerun the same command with {resume} to start it again"
        if last is None:
            return "nothing written (rerun the same command)"
        return f"the checkpoint {last}; rerun the same command with {resume} to continue from it"

    common.on_interrupt(kept)
    train(config, overwrite=args.overwrite)
    return 0


# ----------------------------------------------------------------------------- train-demo
REPOS = ("prior", "decoder", "decoder-inpaint")  # what train-demo writes into --out (train_demo.write_repos)
TRAIN_DEMO_DESCRIPTION = ("Train the tiny demo Kandinsky (CLIP towers, MoVQ, prior, decoder, inpainting UNet) "
                          "on procedural shapes and write it in the hub layout.")


def add_train_demo_arguments(parser) -> None:
    from kandinsky.data.train_demo import DATA_SIZE, DEFAULT_MINUTES, HEAD_WEIGHTS, LATENT_CHANNELS, STAGES

    parser.add_argument("--out", required=True,
                        help="folder for the checkpoints (prior/, decoder/, decoder-inpaint/)")
    parser.add_argument("--minutes", type=float, default=None,
                        help=f"total training time (CPU minutes), shared by the stages run in proportion to "
                             f"their STAGES minutes (default: each stage its STAGES minutes, as the shipped "
                             f"weights trained; {DEFAULT_MINUTES:g} for all)")
    parser.add_argument("--steps", type=int, default=None, help="train each stage this many steps instead (tests)")
    parser.add_argument("--stages", nargs="+", default=None, choices=list(STAGES),
                        help="stages to (re)train; the others are loaded from OUT/stages/ (default: all)")
    parser.add_argument("--seed", type=common.seed, default=0,
                        help="seed of the data, the weights and the noise (default 0)")
    parser.add_argument("--data-size", type=int, default=DATA_SIZE,
                        help=f"pictures the prior and decoders train on (default {DATA_SIZE})")
    parser.add_argument("--write-only", action="store_true",
                        help="train nothing: write the hub folders from the checkpoints in OUT/stages/")
    parser.add_argument("--resume", action="store_true",
                        help="start each trained stage from its checkpoint in OUT/stages/ (train it longer)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--movq-factor", type=int, default=8, choices=(8, 4),
                        help="pictures / latents: 8 (8 x 8 latents, the shipped weights) or 4 (16 x 16 latents, "
                             "a 3-level MoVQ: sharper small shapes, a slower decoder to train)")
    parser.add_argument("--latent-channels", type=int, default=LATENT_CHANNELS, choices=(4, 8, 16),
                        help=f"MoVQ latent channels (default {LATENT_CHANNELS}, the shipped weights; the real "
                             f"MoVQ has 4, which rounds the corners of small shapes at 8 x 8 latents)")
    parser.add_argument("--shape-weight", type=float, default=HEAD_WEIGHTS["shape"],
                        help=f"weight of the CLIP image tower's shape head (default {HEAD_WEIGHTS['shape']:g}, the "
                             "shipped weights: it puts the shape into the embedding; 1 weighs it like colour and "
                             "position: see kandinsky/demo_weights/README.md)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the hub folders (prior/, decoder/, decoder-inpaint/) OUT holds from an earlier "
                             "run (without it, or --resume, such an OUT is refused before any training)")
    parser.add_argument("--jobs", type=int, default=1, choices=(1, 2),
                        help="2: train in two processes of one thread each, clip beside movq, then prior and "
                             "movq_decoder beside decoder and inpaint (each stage gets the same time as with 1; "
                             "the wall-clock time is about half)")


def run_parallel(args, stages: list[str], log) -> None:
    """The PHASES in two child processes each (one thread each); each child trains its stages for
    their share of --minutes, as a single process would. Raises when a child fails."""
    import subprocess

    from kandinsky.data.train_demo import PHASES, STAGES

    total = sum(STAGES[name][0] for name in stages)
    for phase in PHASES:
        children = []
        for group in phase:
            group = [name for name in group if name in stages]
            if not group:
                continue
            argv = [sys.executable, "-m", "kandinsky.cli", "train-demo", "--out", args.out, "--stages", *group,
                    "--seed", str(args.seed), "--data-size", str(args.data_size), "--threads", "1"]
            if args.minutes is not None:  # else each stage its STAGES minutes
                argv += ["--minutes", str(args.minutes * sum(STAGES[name][0] for name in group) / total)]
            argv += ["--steps", str(args.steps)] if args.steps else []
            argv += ["--movq-factor", str(args.movq_factor), "--shape-weight", str(args.shape_weight),
                     "--latent-channels", str(args.latent_channels)]
            argv += ["--resume"] if args.resume else []
            argv += ["--overwrite"] if args.overwrite else []
            log(f"started {' + '.join(group)}")
            children.append((group, subprocess.Popen(argv)))
        failed = [group for group, child in children if child.wait() != 0]
        if failed:
            raise RuntimeError(f"train-demo: stages {failed} failed (their output is above); fix and rerun them "
                               f"with --stages, the finished ones are kept in {args.out}/stages/")


def run_train_demo(args) -> int:
    import torch

    from kandinsky.data import train_demo

    if (args.minutes is not None and args.minutes <= 0) or (args.steps is not None and args.steps < 1):
        raise common.InputError("--minutes must be > 0 and --steps >= 1")
    common.check_folder(args.out, f"--out {args.out}")  # before any training
    written = [path for path in (Path(args.out) / name for name in REPOS) if path.exists()]
    if written and not (args.overwrite or args.resume):
        raise common.InputError(f"{written[0]} exists (an earlier train-demo's hub folders); pass --overwrite to "
                                "replace them, --resume to continue that run, or choose another --out")
    if args.threads:
        torch.set_num_threads(args.threads)
    train_demo.MOVQ_FACTOR, train_demo.LATENT_CHANNELS = args.movq_factor, args.latent_channels
    train_demo.HEAD_WEIGHTS["shape"] = args.shape_weight
    common.on_interrupt(f"the stage checkpoints saved so far in {Path(args.out) / 'stages'} (--resume continues)")
    start = time.time()

    def log(message):
        print(f"[{time.time() - start:7.1f}s] {message}", flush=True)

    stages = [] if args.write_only else args.stages or list(train_demo.STAGES)
    if args.jobs == 2 and stages:
        run_parallel(args, stages, log)
        stages = []  # everything trained: write the hub folders here
    folders = train_demo.run(Path(args.out), args.minutes, args.steps, stages, args.seed, log,
                             args.data_size, args.resume)
    if folders:
        log("wrote " + ", ".join(str(f) for f in folders.values()))
    return 0
