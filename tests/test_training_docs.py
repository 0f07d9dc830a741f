"""docs/training.md runs as written, on the tiny random demo checkpoints.

In a temporary folder holding the demo repos under their hub names (``./kandinsky-2-2-prior``,
...) and ``pics/`` (4 pictures with .txt captions), the page's ```python blocks run in one
namespace and its ```bash ``kandinsky train`` commands run through ``main(argv)``, in page order,
with sizes and step counts shrunk (torchrun lines are left to test_training_loop.py). The
settings table lists every TrainConfig field with its default.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from kandinsky.cli import main as kandinsky_main
from kandinsky.training.config import TrainConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"^```(python|bash)\n(.*?)^```", text, flags=re.S | re.M)


def small_steps(n: int) -> int:
    return max(2, n // 5) if n <= 20 else 3


def shrink(code: str) -> str:
    code = code.replace("kandinsky-community/", "./")
    code = re.sub(r"\b512\b", "64", code)
    # steps: 2000 -> 3; the resume example's 10 and 20 -> 2 and 4
    code = re.sub(r"(--steps |steps=)(\d+)", lambda m: m.group(1) + str(small_steps(int(m.group(2)))), code)
    code = re.sub(r"--save-every \d+", "--save-every 2", code)
    code = re.sub(r"(--batch |batch=)\d+", r"\g<1>4", code)
    return re.sub(r"num_inference_steps=\d+", "num_inference_steps=2", code)


def commands(bash: str) -> list[list[str]]:
    """The `kandinsky train` commands of a bash block (continuation lines joined)."""
    out = []
    for line in bash.replace("\\\n", " ").splitlines():
        words = shlex.split(line)
        if words[:2] == ["kandinsky", "train"]:
            out.append(words[2:] + ["--validation-steps", "2", "--device", "cpu"])
    return out


def test_training_doc_runs(tmp_path, demo_as_hub):
    rng = np.random.default_rng(0)
    (tmp_path / "pics").mkdir()
    for i, caption in enumerate(["a red cat", "a dog in the snow", "a blue house", "a green tree"]):
        PIL.Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "pics" / f"{i}.png")
        (tmp_path / "pics" / f"{i}.txt").write_text(caption)

    namespace: dict = {"__name__": "training_md"}
    found = blocks(DOC.read_text())
    ran, log_rows = 0, {}  # "--resume" / "--overwrite" -> log.csv rows after that command
    for i, (kind, block) in enumerate(found):
        code = shrink(block)
        if kind == "python":
            try:
                exec(compile(code, f"docs/training.md block {i}", "exec"), namespace)
            except Exception as e:
                pytest.fail(f"docs/training.md python block {i} failed: {e!r}\n---\n{block}")
        else:
            for argv in commands(code):
                assert kandinsky_main(["train", *argv]) == 0, f"docs/training.md: kandinsky train {shlex.join(argv)}"
                ran += 1
                for flag in ("--resume", "--overwrite"):
                    if flag in argv:
                        out = Path(argv[argv.index("--out") + 1])
                        log_rows[flag] = (out / "log.csv").read_text().count("\n")
    assert ran >= 6
    # a few documented results
    assert (tmp_path / "pics" / "metadata.jsonl").read_text().count("\n") == 4
    assert len(namespace["items"]) == 4 and [p.name for p in namespace["result"]["saved"]] == ["unet-no-ema", "unet"]
    assert len(namespace["losses"]) == 4 and namespace["image"].size == (64, 64)
    assert (tmp_path / "runs" / "decoder" / "validation" / "step-000003" / "01.png").is_file()
    assert (tmp_path / "runs" / "decoder-lora" / "lora" / "adapter_model.safetensors").is_file()
    assert log_rows["--resume"] == 1 + 4  # continued to --steps 20 (shrunk to 4)
    assert log_rows["--overwrite"] == 1 + 2  # started over: --steps 10 (shrunk to 2), not appended
    assert json.loads((tmp_path / "runs" / "prior-resume" / "train_config.json").read_text())["lr"] == 3e-4


def test_settings_table_lists_every_field():
    text = DOC.read_text()
    rows = dict(re.findall(r"^\| `(--[a-z0-9-]+)` \|([^|]*)\|", text, flags=re.M))
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("positional"):
            continue
        flag = "--" + f.name.replace("_", "-")
        assert flag in rows, f"docs/training.md: {flag} missing from the settings table"
        shown = rows[flag].strip()
        if f.metadata.get("required"):
            assert shown == "required", flag
        elif f.default in (None, ()):
            assert shown == "", flag
        elif isinstance(f.default, bool):
            assert shown == "off", flag
        else:
            assert shown == str(f.default), flag
