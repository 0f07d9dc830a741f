"""Record every task x sampler's output, or compare a run against a recording, bit for bit.

A refactor that must not change a single number (issue 17: "outputs are bit-identical to before for every
task and sampler") is checked by recording before and comparing after:

    git worktree add /tmp/before <commit before>
    (cd /tmp/before && python benchmarks/golden_outputs.py --record /tmp/golden.pt --folders /tmp/random)
    python benchmarks/golden_outputs.py --compare /tmp/golden.pt --folders /tmp/random

The shipped shapes model runs every prompt-level task without ControlNet; tiny random checkpoints (built by
``--record`` into ``--folders`` and read back by ``--compare``, so both runs see the same weights) run the
two ControlNet tasks. Each task runs once per decoder sampler, 4 decoder and 3 prior steps, seed 0, fp32,
one thread, output_type="pt". The recording also holds the prior's image embeddings per prompt.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "euler", "euler_a", "heun")
PROMPT = "a red circle on a blue background"


def _picture(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def _mask(size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.float32)
    mask[:, size // 2:] = 1.0  # white = repaint the right half
    return mask


def _tasks(image, hint, mask):
    yield "text2img", dict(prompt=PROMPT, negative_prompt="a green square")
    yield "img2img", dict(prompt=PROMPT, image=image, strength=0.6)
    yield "inpaint", dict(prompt=PROMPT, image=image, mask_image=mask)
    yield "variations", dict(image=image)
    yield "interpolate", dict(images_and_prompts=[PROMPT, image], weights=[0.6, 0.4])
    yield "emb2emb", dict(prompt=PROMPT, image=image, prior_strength=0.5)
    yield "controlnet", dict(prompt=PROMPT, hint=hint)
    yield "controlnet_img2img", dict(prompt=PROMPT, image=image, hint=hint, strength=0.6)


def run_all(folders: dict) -> dict:
    from kandinsky.pipelines.combined import Kandinsky  # the public prompt-level API, the same before and after

    torch.set_num_threads(1)
    shapes = folders["shapes"]
    pipes = {
        "decoder": Kandinsky.from_pretrained(shapes["decoder"], prior=shapes["prior"]),
        "inpaint": Kandinsky.from_pretrained(shapes["inpaint"], prior=shapes["prior"]),
        "controlnet": Kandinsky.from_pretrained(folders["random"]["controlnet"], prior=folders["random"]["prior"]),
    }
    which = {"inpaint": "inpaint", "controlnet": "controlnet", "controlnet_img2img": "controlnet"}
    image, hint, mask = _picture(1), _picture(2), _mask()
    out = {}
    for task, kwargs in _tasks(image, hint, mask):
        pipe = pipes[which.get(task, "decoder")]
        for sampler in SAMPLERS:
            prior = {} if task == "variations" else dict(prior_num_inference_steps=3)  # variations runs no prior
            result = pipe.run(task, **kwargs, **prior, scheduler=sampler, num_inference_steps=4, height=64, width=64,
                              generator=torch.Generator().manual_seed(0), output_type="pt", progress=False)
            out[f"{task}/{sampler}"] = result.images.detach().clone()
    prior = pipes["decoder"].prior
    emb = prior(PROMPT, num_inference_steps=5, generator=torch.Generator().manual_seed(0), progress=False)
    out["prior/image_embeds"] = emb.image_embeds.detach().clone()
    return out


def folders_for(root: Path, build: bool) -> dict:
    from kandinsky.demo import demo_checkpoints

    shapes, _, _ = demo_checkpoints(random=False)
    random_root = root / "random"
    if build:
        from kandinsky.demo import build_demo_checkpoints

        built = build_demo_checkpoints(random_root, seed=0)
        assert built["controlnet"] == random_root / "controlnet-depth", built
    return {"shapes": shapes, "random": {"prior": random_root / "prior", "controlnet": random_root / "controlnet-depth"}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--record", type=Path, help="write every output to this .pt file")
    group.add_argument("--compare", type=Path, help="compare every output against this recording")
    parser.add_argument("--folders", type=Path, required=True,
                        help="where --record builds the random checkpoints and --compare reads them")
    args = parser.parse_args()
    outputs = run_all(folders_for(args.folders, build=args.record is not None))
    if args.record:
        torch.save(outputs, args.record)
        print(f"recorded {len(outputs)} outputs in {args.record}")
        return 0
    golden = torch.load(args.compare)
    missing = sorted(set(golden) - set(outputs))
    differ = [key for key in golden if key in outputs and not torch.equal(golden[key], outputs[key])]
    for key in differ:
        print(f"DIFFERS {key}: max |diff| {(golden[key] - outputs[key]).abs().max().item():.3e}")
    print(f"{len(golden) - len(differ) - len(missing)} of {len(golden)} outputs bit-identical"
          + (f"; missing: {', '.join(missing)}" if missing else ""))
    return 1 if differ or missing else 0


if __name__ == "__main__":
    sys.exit(main())
