"""kandinsky/checks.py: every model's input checks, one wording. The common input mistakes (dtype,
device, layout) of every component get a clear error raised by our check (not deep inside torch)
that names the argument and says what to pass."""
from __future__ import annotations

import copy

import pytest
import torch

from kandinsky.checks import check_tensor, check_timestep, fail, with_article
from tests.refs.prior import prior_inputs


def _prior_args(dtype=torch.float32, batch=2):
    hidden, proj, text, mask = prior_inputs(batch)
    return hidden.to(dtype), 10, proj.to(dtype), text.to(dtype), mask


S, E = torch.randn(1, 4, 8, 8), torch.randn(1, 32)
IMG = torch.rand(1, 3, 32, 32) * 2 - 1
INPUT_MISTAKES = {
    # MoVQ
    "movq uint8 images": ("movq", lambda m: m.encode((IMG * 127 + 127).to(torch.uint8)), TypeError, r"x / 127.5 - 1"),
    "movq HWC images": ("movq", lambda m: m.encode(IMG.permute(0, 2, 3, 1)), ValueError, r"\(B, 3, H, W\)"),
    "movq numpy images": ("movq", lambda m: m.encode(IMG.numpy()), TypeError, "torch.Tensor"),
    "movq fp32 into fp16": ("movq", lambda m: m.half().encode(IMG), TypeError, r"float32.*float16.*movq.dtype"),
    "movq fp64 latents": ("movq", lambda m: m.decode(torch.randn(1, 4, 4, 4, dtype=torch.float64)), TypeError,
                          "latents is torch.float64"),
    "movq long latents": ("movq", lambda m: m.quantize(torch.zeros(1, 4, 4, 4, dtype=torch.long)), TypeError,
                          "floating-point"),
    # UNet
    "unet embeds too wide": ("unet", lambda m: m(S, 5, torch.randn(1, 1280)), ValueError, r"image_embeds must be.*1280"),
    "unet embeds 1-d": ("unet", lambda m: m(S, 5, torch.randn(32)), ValueError, r"image_embeds must be \(B"),
    "unet fp32 into fp16": ("unet", lambda m: m.half()(S, 5, E), TypeError, r"sample is torch.float32.*unet.dtype"),
    "unet long sample": ("unet", lambda m: m(S.long(), 5, E), TypeError, "sample must be a floating-point"),
    "unet uint8 hint": ("controlnet", lambda m: m(S, 5, E, hint=torch.zeros(1, 3, 64, 64, dtype=torch.uint8)),
                        TypeError, r"hint must be a floating-point tensor in \[0, 1\]"),
    "unet missing hint": ("controlnet", lambda m: m(S, 5, E), ValueError, "needs a `hint`"),
    "unet 2-d timestep": ("unet", lambda m: m(S, torch.ones(1, 1, 2), E), ValueError, "timestep must be"),
    # prior
    "prior fp32 into fp16": ("prior", lambda m: m.half()(*_prior_args()), TypeError,
                             r"hidden_states is torch.float32.*prior.dtype"),
    "prior 1-d embedding": ("prior", lambda m: m(torch.randn(16), 1, *_prior_args()[2:]), ValueError,
                            r"hidden_states \(noisy image embedding\) must be \(B, 16\)"),
    "prior no mask": ("prior", lambda m: m(*_prior_args()[:4], None), ValueError, "attention_mask must be"),
    "prior mask list": ("prior", lambda m: m(*_prior_args()[:4], [[True] * 77] * 2), TypeError,
                        "attention_mask must be a torch.Tensor"),
    "prior numpy": ("prior", lambda m: m(torch.randn(2, 16).numpy(), 1, *_prior_args()[2:]), TypeError,
                    "hidden_states must be a torch.Tensor"),
    # CLIP
    "text float ids": ("text", lambda m: m(torch.rand(1, 77)), TypeError, "integer tensor of token ids"),
    "text list ids": ("text", lambda m: m([[49406, 49407]]), TypeError, "input_ids must be a torch.Tensor of token ids"),
    "text 1-d ids": ("text", lambda m: m(torch.zeros(77, dtype=torch.long)), ValueError, r"input_ids must be \(B, L\)"),
    "text too long": ("text", lambda m: m(torch.zeros(1, 78, dtype=torch.long)), ValueError, "77 positions"),
    "vision uint8 pixels": ("vision", lambda m: m(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)), TypeError,
                            "ImagePreprocessor"),
    "vision HWC pixels": ("vision", lambda m: m(torch.zeros(1, 32, 32, 3)), ValueError, r"\(B, 3, 32, 32\)"),
    "vision 224px pixels": ("vision", lambda m: m(torch.zeros(1, 3, 224, 224)), ValueError, r"\(B, 3, 32, 32\)"),
    "vision 3-d pixels": ("vision", lambda m: m(torch.zeros(3, 32, 32)), ValueError, r"\(B, 3, 32, 32\)"),
}


@pytest.mark.parametrize("case", sorted(INPUT_MISTAKES))
def test_input_mistakes_get_clear_errors(tiny_models, case):
    """The error is raised by our check (not deep inside torch) and says what to pass."""
    which, call, exc, message = INPUT_MISTAKES[case]
    model = copy.deepcopy(tiny_models[which])
    with torch.no_grad(), pytest.raises(exc, match=message) as info:
        call(model)
    assert "/kandinsky/" in info.traceback[-1].path.as_posix(), f"raised in {info.traceback[-1].path}"


@pytest.mark.parametrize("which", ["text", "vision", "prior", "unet", "movq"])
def test_input_on_another_device_is_named(tiny_models, which):
    """Weights on one device, inputs on another (meta vs cpu here; cuda vs cpu in real life)."""
    with torch.device("meta"):
        model = copy.deepcopy(tiny_models[which]).to("meta")
    calls = {
        "text": (lambda m: m(torch.zeros(1, 77, dtype=torch.long)), "input_ids is on cpu"),
        "vision": (lambda m: m(torch.zeros(1, 3, 32, 32)), "pixel_values is on cpu"),
        "prior": (lambda m: m(*_prior_args()), "hidden_states is on cpu"),
        "unet": (lambda m: m(S, 5, E), "sample is on cpu"),
        "movq": (lambda m: m.encode(IMG), "images is on cpu"),
    }
    call, message = calls[which]
    with pytest.raises((ValueError, TypeError), match=message + ".*meta"):
        call(model)
    assert model.device == torch.device("meta")


def test_autocast_inputs_are_not_refused(tiny_models):
    """Under autocast the weights' and inputs' dtypes legitimately differ: no dtype refusal."""
    movq, unet = copy.deepcopy(tiny_models["movq"]).bfloat16(), copy.deepcopy(tiny_models["unet"]).bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert movq.decode(torch.randn(1, 4, 4, 4), force_not_quantize=True).shape == (1, 3, 32, 32)
        assert unet(S, 5, E).shape == (1, 8, 8, 8)




# ============================================================================ the helpers themselves
class _Model(torch.nn.Module):
    VARIABLE = "model"

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, dtype=dtype))

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def device(self):
        return self.w.device


@pytest.mark.parametrize("x, kind, exc, message", [
    ([1.0], "weights", TypeError, r"^x must be a torch.Tensor, got list\.$"),
    (torch.zeros(2, dtype=torch.long), "weights", TypeError, r"^x must be a floating-point tensor, got torch.int64\.$"),
    (torch.zeros(2), "int", TypeError, r"^x must be an integer tensor, got torch.float32\.$"),
    (torch.zeros(2, dtype=torch.bool), "int", TypeError, r"^x must be an integer tensor, got torch.bool\.$"),
    (torch.zeros(2, dtype=torch.float64), "weights", TypeError,
     r"^x is torch.float64 but the _Model weights are torch.float32; pass x.to\(model.dtype\)\.$"),
    (torch.zeros(2, device="meta"), "any", ValueError,
     r"^x is on meta but the _Model is on cpu; pass x.to\(model.device\)\.$"),
])
def test_check_tensor_wording(x, kind, exc, message):
    with pytest.raises(exc, match=message):
        check_tensor(_Model(), "x", x, kind=kind)


def test_check_tensor_accepts():
    model = _Model()
    check_tensor(model, "x", torch.zeros(2))
    check_tensor(model, "x", torch.zeros(2, dtype=torch.float64), kind="float")  # any precision
    check_tensor(model, "x", torch.zeros(2, dtype=torch.int32), kind="int")
    check_tensor(model, "x", torch.zeros(2, dtype=torch.bool), kind="any")
    check_tensor(model, "x", None, optional=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # dtypes legitimately differ under autocast
        check_tensor(_Model(torch.bfloat16), "x", torch.zeros(2))


def test_check_timestep_and_fail():
    for ok in (5, 2.5, torch.tensor(3), torch.tensor([3]), torch.tensor([1, 2, 3]), [1, 2, 3]):
        assert check_timestep(ok, 3) is None, ok
    assert check_timestep(torch.ones(3, 1), 3) == (
        "timestep must be a number, a 0-d tensor or a (3,) tensor for a batch of 3, got shape (3, 1)")
    assert "got shape (2,)" in check_timestep([1, 2], 3)
    fail(_Model(), [None, False, ""])  # no problem: no error
    with pytest.raises(ValueError, match=r"^_Model: a is wrong; b too\.$"):
        fail(_Model(), ["a is wrong", None, "b too"])


def test_with_article_is_the_written_a_an_rule():
    """"an" before a word starting with a vowel letter, else "a" (the one rule of the checks', the
    decoder pipeline's and the CLI's messages)."""
    words = ("integer", "inpaint", "Orange", "floating-point", "decoder", "controlnet")
    assert [with_article(w) for w in words] == [
        "an integer", "an inpaint", "an Orange", "a floating-point", "a decoder", "a controlnet"]
