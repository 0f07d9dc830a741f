"""Low-memory mode (kandinsky.offload) on the tiny random demo checkpoints (the session's `random_demo`).

There is no accelerator here, so the tests run the offload code path with device="cpu"
and the weights "away" as empty meta tensors (``_home="meta"``): a weight that the hooks
did not move in before it is used makes the run fail, and outputs must equal the run
without offload exactly (same weights, same code, same device).
"""
from __future__ import annotations

import pytest
import torch

from kandinsky import Kandinsky
from kandinsky.offload import disable_offload, enable_offload

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
    enable_offload(pipe, device="cpu")
    with pytest.raises(ValueError, match="already enabled"):
        enable_offload(pipe, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            enable_offload(load(random_demo), device="cuda")


def test_from_pretrained_offload(random_demo):
    """Kandinsky.from_pretrained(offload="model") keeps the weights on the CPU between calls and gives
    the same latents as a plain pipeline (here the target device is the CPU itself)."""
    kw = dict(output_type="latent", prior_num_inference_steps=2, height=64, width=64, num_inference_steps=2,
              progress=False)
    plain = load(random_demo)
    off = Kandinsky.from_pretrained(random_demo["decoder"], prior=random_demo["prior"], device="cpu",
                                    offload="model")
    assert off.offloader is not None
    a = plain.text2img("a", generator=torch.Generator().manual_seed(4), **kw).images
    b = off.text2img("a", generator=torch.Generator().manual_seed(4), **kw).images
    assert torch.equal(a, b)
