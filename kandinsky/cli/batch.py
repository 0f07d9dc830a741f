"""``kandinsky batch``: many prompts to PNGs, resumable, torchrun-aware (kandinsky.batch does the work).

    kandinsky batch prompts.jsonl --out pictures/ --demo --steps 2 --width 64 --height 64
    torchrun --nproc_per_node 8 -m kandinsky.cli batch prompts.jsonl --out pictures/ ...
"""
from __future__ import annotations

from pathlib import Path

from kandinsky.cli import common

DESCRIPTION = "many prompts to PNGs, resumable, on one process or many (torchrun)"


def add_arguments(parser) -> None:
    parser.add_argument("prompts", help="prompts file: .txt (one prompt per line) or .jsonl (one item per line)")
    parser.add_argument("--out", required=True, help="output folder (PNGs, manifest.jsonl, batch.json)")
    common.add_pipeline_arguments(
        parser, dtype=True, offload=True,
        demo_help="the tiny model trained on procedural shapes that ships in the package (64 x 64)")
    parser.add_argument("--seed", type=common.seed, default=0, help="base seed: item i's seed is a hash of (seed, i)")
    parser.add_argument("--negative-prompt", default=None,
                        help="what the pictures should not show, unless an item says (default: none)")
    common.add_size_arguments(parser, "512, unless an item says; --demo 64, --random-demo 256")
    parser.add_argument("--steps", type=common.at_least(1), default=50, help="decoder steps (default 50)")
    parser.add_argument("--prior-steps", type=common.at_least(2), default=25, help="prior steps, at least 2 (default 25)")
    parser.add_argument("--guidance-scale", type=float, default=4.0, help="decoder guidance scale (default 4)")
    parser.add_argument("--scheduler", default=None, help="decoder sampler name (default: the checkpoint's)")
    parser.add_argument("--limit", type=common.at_least(0), default=None, help="generate at most this many items per rank, then stop")
    parser.add_argument("--overwrite", action="store_true",
                        help="start the folder over when it holds another batch (its batch.json, manifest and "
                             "PNGs are replaced); without it such a folder is refused, and an item whose PNG "
                             "exists is kept (resumed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    import torch

    from kandinsky import batch

    rank, world, local = batch.distributed()
    out = Path(args.out)
    # not given: the model's own size, the command line's one rule (--demo 64, --random-demo 256, else 512)
    args.width, args.height = common.picture_size(args, "text2img", *common.width_height(args), picture=False)
    common.check_folder(out, f"--out {out}")  # before the prompts are read, long before any picture
    items = batch.make_items(batch.read_rows(Path(args.prompts)), args)
    if args.overwrite and rank == 0:
        batch.start_over(out)
    counts = {"done": 0}
    common.on_interrupt(lambda: f"the {counts['done']} pictures finished now and those before in {out} "
                                "(the same command resumes)")
    dist = None
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
        if args.overwrite:
            dist.barrier()  # rank 0 has cleared the folder
    try:
        default = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        counts.update(batch.run(args, items, lambda: common.pipeline(args, weights_seed=0, device_default=default),
                                counts))
        totals = dict(counts)
        if dist is not None:
            t = torch.tensor([counts["done"], counts["skipped"], counts["seconds"]], dtype=torch.float64)
            dist.all_reduce(t)  # also the barrier: every rank has finished writing
            totals.update(done=int(t[0]), skipped=int(t[1]), seconds=float(t[2]))
        if rank == 0:
            manifest = batch.merge_manifests(out, items)
            finished = sum((out / item.file).exists() for item in items)
            print(f"batch: {totals['items']} items, {totals['done']} generated now "
                  f"({totals['seconds']:.1f} s over {world} process(es)), {totals['skipped']} already there; "
                  f"{finished}/{totals['items']} finished in {out}; manifest {manifest}")
        return 0
    finally:
        if dist is not None:
            dist.destroy_process_group()
