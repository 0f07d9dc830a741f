"""Low-memory mode (kandinsky.offload) on the tiny random demo checkpoints (the session's `random_demo`).

There is no accelerator here, so the tests run the offload code path with device="cpu"
and the weights "away" as empty meta tensors (``_home="meta"``): a weight that the hooks
did not move in before it is used makes the run fail, and outputs must equal the run
without offload exactly (same weights, same code, same device).
"""
from __future__ import annotations

import re

import pytest
import torch

from kandinsky import Kandinsky
from kandinsky.offload import disable_offload, enable_offload, offload_helps

RUN = dict(height=64, width=64, num_inference_steps=2, prior_num_inference_steps=2, output_type="pt",
           progress=False)


def load(folders) -> Kandinsky:
    return Kandinsky.from_pretrained(folders["decoder"], prior=folders["prior"])


def text2img(pipe, seed=0):
    return pipe.text2img("a red cat", generator=torch.Generator().manual_seed(seed), **RUN).images


@pytest.fixture(scope="module")
def expected(random_demo):
    return text2img(load(random_demo))


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_same_images_with_offload(random_demo, expected, mode):
    pipe = enable_offload(load(random_demo), mode=mode, device="cpu", _home="meta")
    images = text2img(pipe)
    assert torch.equal(images, expected)
    log = pipe.offloader.log
    if mode == "model":
        # each component moved in once, when it was needed (the image tower: for the zero-image negative)
        assert sorted(log) == sorted(["prior.text_encoder", "prior.prior", "prior.image_encoder", "decoder.unet",
                                      "decoder.movq"])
        assert log[0] == "prior.text_encoder" and log[-2:] == ["decoder.unet", "decoder.movq"]
        loaded = [name for name, w in pipe.offloader.weights.items() if w.loaded]
        assert loaded == ["decoder.movq"]  # only the last one stays
        assert all(p.is_meta for p in pipe.decoder.unet.parameters())
    else:
        # blocks move in one at a time and go again after their forward
        assert any(name.startswith("decoder.unet.") for name in log)
        assert any(name.startswith("prior.prior.") for name in log)
        assert any(name.startswith("decoder.movq.decoder.") for name in log)
        assert not any(w.loaded for name, w in pipe.offloader.weights.items() if name.count(".") > 1)
    disable_offload(pipe)
    assert all(not p.is_meta for p in pipe.decoder.unet.parameters())
    assert torch.equal(text2img(pipe), expected)


def test_components_are_usable_directly(random_demo):
    pipe = enable_offload(load(random_demo), mode="model", device="cpu", _home="meta")
    z = torch.randn(1, 4, 8, 8)
    images = pipe.decoder.movq.decode(z, force_not_quantize=True)  # an entry point besides forward
    assert images.shape == (1, 3, 64, 64)
    assert pipe.offloader.active == "decoder.movq"


def test_offload_errors(random_demo):
    pipe = load(random_demo)
    with pytest.raises(ValueError, match="mode must be one of"):
        enable_offload(pipe, mode="layers", device="cpu")
    with pytest.raises(TypeError, match="PriorPipeline, DecoderPipeline or Kandinsky"):
        enable_offload(object(), device="cpu")
    enable_offload(pipe, device="cpu", _home="meta")
    with pytest.raises(ValueError, match="already enabled"):
        enable_offload(pipe, device="cpu", _home="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            enable_offload(load(random_demo), device="cuda")
        with pytest.raises(ValueError, match="no CUDA device"):  # device=None offloads to CUDA: refused before loading
            Kandinsky.from_pretrained(random_demo["decoder"], prior=random_demo["prior"], offload="model")


# --------------------------------------------------------------------------- offload on a CPU: one rule at every door
CPU_WARNING = "does nothing on cpu (it keeps weights off the GPU until they run); running without it"


def test_offload_helps_only_on_cuda():
    """The rule itself: CUDA yes; any other device a warning naming the setting as spelled, and no."""
    assert offload_helps(None, "cpu") is False
    with pytest.warns(UserWarning, match=r"^offload='model' " + re.escape(CPU_WARNING)):
        assert offload_helps("model", "cpu") is False
    with pytest.warns(UserWarning, match=r"^--offload sequential " + re.escape(CPU_WARNING)):
        assert offload_helps("sequential", torch.device("cpu"), option="--offload sequential") is False
    with pytest.raises(ValueError, match="offload mode must be one of"):
        offload_helps("layers", "cpu")
    if torch.cuda.is_available():
        assert offload_helps("model", "cuda") is True


def test_enable_offload_on_a_cpu_warns_and_leaves_the_pipeline(random_demo, expected):
    pipe = load(random_demo)
    weights = [p.data_ptr() for p in pipe.decoder.unet.parameters()]
    with pytest.warns(UserWarning, match=r"^offload='sequential' " + re.escape(CPU_WARNING)) as record:
        assert enable_offload(pipe, mode="sequential", device="cpu") is pipe
    assert [w.filename for w in record] == [__file__]  # the caller's line
    assert pipe.offloader is None and pipe.decoder.execution_device is None
    assert [p.data_ptr() for p in pipe.decoder.unet.parameters()] == weights
    assert not pipe.decoder.unet._forward_pre_hooks  # no hooks
    assert torch.equal(text2img(pipe), expected)


def test_from_pretrained_offload_on_a_cpu_warns_and_runs_without(random_demo):
    """Kandinsky.from_pretrained(offload="model", device="cpu"): the same warning, a plain pipeline on the
    CPU, the same latents as one loaded without offload."""
    kw = dict(output_type="latent", prior_num_inference_steps=2, height=64, width=64, num_inference_steps=2,
              progress=False)
    plain = load(random_demo)
    with pytest.warns(UserWarning, match=r"^offload='model' " + re.escape(CPU_WARNING)) as record:
        off = Kandinsky.from_pretrained(random_demo["decoder"], prior=random_demo["prior"], device="cpu",
                                        offload="model")
    assert [w.filename for w in record] == [__file__]
    assert getattr(off, "offloader", None) is None and off.decoder.execution_device is None
    a = plain.text2img("a", generator=torch.Generator().manual_seed(4), **kw).images
    b = off.text2img("a", generator=torch.Generator().manual_seed(4), **kw).images
    assert torch.equal(a, b)


def test_from_pretrained_offload_wiring(random_demo, monkeypatch):
    """Where offload helps (CUDA; here the rule is told it helps on the CPU), from_pretrained(offload=) loads
    the weights on the CPU and hooks them: the same latents as a plain pipeline."""
    import kandinsky.offload

    monkeypatch.setattr(kandinsky.offload, "offload_helps", lambda mode, device, option=None: mode is not None)
    kw = dict(output_type="latent", prior_num_inference_steps=2, height=64, width=64, num_inference_steps=2,
              progress=False)
    plain = load(random_demo)
    off = Kandinsky.from_pretrained(random_demo["decoder"], prior=random_demo["prior"], device="cpu",
                                    offload="model")
    assert off.offloader is not None and off.offloader.mode == "model"
    a = plain.text2img("a", generator=torch.Generator().manual_seed(4), **kw).images
    b = off.text2img("a", generator=torch.Generator().manual_seed(4), **kw).images
    assert torch.equal(a, b)
    assert off.offloader.log[-1] == "decoder.unet"  # (latents: no MoVQ)
