"""kandinsky.threads: small models run on one intra-op thread for the duration of a pipeline call.

The rule's decision on the real configs (meta device: full-size Kandinsky 2.2 stays on the caller's
threads, the tiny demo models drop to one), the restore afterwards (also after an error), and the
caller's overrides (KANDINSKY_THREADS, OMP_NUM_THREADS, an explicit torch.set_num_threads).
"""
from __future__ import annotations

import pytest
import torch

from kandinsky import threads
from kandinsky.threads import parameters, threads_for, wanted_threads


@pytest.fixture
def two_threads(monkeypatch):
    """torch on 2 threads, as it started (the tests run on 1: conftest.py); restored afterwards."""
    before = torch.get_num_threads()
    for name in (threads.ENV, *threads.TORCH_ENV):
        monkeypatch.delenv(name, raising=False)
    torch.set_num_threads(2)
    monkeypatch.setattr(threads, "_START", 2)
    yield
    torch.set_num_threads(before)


def meta_parameters(component: str, **changes) -> int:
    from kandinsky.research.inspect import meta_model, shipped_config

    return parameters(meta_model({**shipped_config(component), **changes}))


def test_full_size_keeps_the_callers_threads(two_threads):
    unet = meta_parameters("unet")  # 1.25e9 parameters
    assert unet > 1e9
    assert wanted_threads(unet * 8 * 8) is None  # the smallest picture the pipeline makes (64 px)
    prior = meta_parameters("prior") + meta_parameters("text_encoder")
    assert wanted_threads(prior * 77) is None


def test_tiny_models_run_on_one_thread(two_threads):
    from kandinsky.demo import TINY

    unet = meta_parameters("unet", **TINY["unet"])  # the demo UNet's config (2.1e6 parameters)
    assert unet < 1e7
    for side in (64, 256, 512):  # the demo's pictures, up to the default size of the full model
        assert wanted_threads(unet * (side // 8) ** 2) == 1
    assert wanted_threads(unet * 8 * 8, device="cuda") is None  # intra-op threads are the CPU's
    assert wanted_threads(threads.SMALL_WORK) is None  # the threshold itself: the caller's


def test_restored_after_the_call_and_after_an_error(two_threads):
    with threads_for(1.0):
        assert torch.get_num_threads() == 1
        with threads_for(1e20):  # nested: the outer call decided
            assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError):
        with threads_for(1.0):
            raise RuntimeError("inside")
    assert torch.get_num_threads() == 2
    with threads_for(1e20):
        assert torch.get_num_threads() == 2


def test_the_caller_wins(two_threads, monkeypatch):
    torch.set_num_threads(3)  # set by the caller: another number than torch started with
    with threads_for(1.0):
        assert torch.get_num_threads() == 3
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with threads_for(1.0):
        assert torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv(threads.ENV, "3")  # every call, whatever its size
    with threads_for(1e20):
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == 2
    monkeypatch.setenv(threads.ENV, "many")
    with pytest.raises(ValueError, match="KANDINSKY_THREADS='many'.*positive number"):
        wanted_threads(1.0)


@pytest.mark.filterwarnings("ignore:.*too few for a usable picture")
def test_pipeline_calls_apply_the_rule(two_threads, random_demo_kandinsky):
    pipe = random_demo_kandinsky
    seen = []

    def record(state):
        seen.append(torch.get_num_threads())

    run = dict(height=64, width=64, num_inference_steps=2, prior_num_inference_steps=2, progress=False,
               callback_on_step_end=record)
    pipe.text2img("a red circle", **run)
    pipe.prior("a red circle", num_inference_steps=2, progress=False, callback_on_step_end=record)
    embeds = torch.zeros(1, pipe.decoder.unet.config.encoder_hid_dim)
    pipe.decoder.text2img(embeds, guidance_scale=1.0, height=64, width=64, num_inference_steps=2, progress=False,
                          callback_on_step_end=record)
    assert seen == [1] * 8  # 2 + 2 steps of the combined call, 2 prior steps, 2 decoder steps
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError):
        pipe.text2img("a red circle", **{**run, "num_inference_steps": 0})
    assert torch.get_num_threads() == 2


def test_training_steps_apply_the_rule(two_threads, tmp_path, monkeypatch):
    import kandinsky.training.loop as loop
    from kandinsky.data import shapes
    from kandinsky.demo import demo_folders
    from kandinsky.training import TrainConfig, train

    seen = []
    step = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: (seen.append(torch.get_num_threads()), step(*a, **k))[1])
    shapes.write_folder(tmp_path / "data", n=8, seed=1)
    train(TrainConfig(task="prior", data=str(tmp_path / "data"), out=str(tmp_path / "out"),
                      checkpoint=str(demo_folders()["prior"]), lora=4, steps=2, batch=4, seed=0))
    assert seen == [1, 1]  # the shipped prior: 2.3e5 parameters x 16 tokens
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("command", ["score", "mix", "eval"])
def test_demo_commands_run_their_own_model_calls_on_one_thread(command, two_threads, tmp_path, monkeypatch):
    """A --demo command's direct model calls (score's and mix's CLIP image tower, eval's MoVQ round trip) run on
    one thread, as its pipeline calls do (cli.common.keep_threads: the pipeline's own measure); the caller's
    2 threads are back when the command ends (cli.common.run)."""
    import PIL.Image

    from kandinsky.cli import main
    from kandinsky.movq.model import MoVQ
    from kandinsky.pipelines.prior import PriorPipeline

    seen = []
    for cls, name in [(PriorPipeline, "encode_image"), (MoVQ, "decode")]:
        original = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda *a, _f=original, **k: (seen.append(torch.get_num_threads()),
                                                                     _f(*a, **k))[1])
    picture = tmp_path / "a.png"
    PIL.Image.new("RGB", (64, 64), (200, 30, 30)).save(picture)
    argv = {"score": ["score", "--demo", str(picture), "a red circle"],
            "mix": ["mix", "--demo", str(picture), "a blue square", "--slerp", "0,1", "--steps", "2",
                    "--prior-steps", "2", "-o", str(tmp_path / "mix.png")],
            "eval": ["eval", "shapes", "--demo", "--n", "2", "--steps", "2", "--prior-steps", "2", "--batch", "2"]}
    assert main(argv[command]) == 0  # (2 steps: a `warning:` line says they are too few)
    assert seen and set(seen) == {1}, seen
    assert torch.get_num_threads() == 2
