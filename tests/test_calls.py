"""kandinsky/calls.py: the call in progress (the model evaluation the denoisers mark, the hooked
attention layer running now) is set for the length of a call, put back after it, and kept apart
between threads; the denoisers mark each model forward with its stage, step, timestep and branches."""
from __future__ import annotations

import threading

import torch

from kandinsky import calls
from kandinsky.calls import BRANCHES_GUIDED, BRANCHES_SINGLE, ModelCall, current_call, model_call
from kandinsky.sampling import state
from kandinsky.sampling.denoisers import DecoderDenoiser


def test_model_call_is_set_inside_and_put_back_after():
    assert current_call() is None
    with model_call("decoder", 3, torch.tensor(500), BRANCHES_GUIDED):
        assert current_call() == ModelCall("decoder", 3, 500.0, ("uncond", "cond"))
        with model_call("prior", 0, 999):  # nested: the inner call, then the outer again
            assert current_call() == ModelCall("prior", 0, 999.0, BRANCHES_SINGLE)
        assert current_call().step == 3 and current_call().timestep == 500.0
        assert calls.now().layer is None  # a model call leaves the layer field alone
    assert current_call() is None and calls.now() == calls.InProgress()
    try:
        with model_call("decoder", 1, 10):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert current_call() is None  # put back on errors too
    assert state.model_call is model_call and state.current_call is current_call  # one home, re-exported


def test_threads_see_their_own_call():
    seen = {}
    inside, done = threading.Event(), threading.Event()

    def other():
        inside.wait()
        seen["other"] = current_call()
        with model_call("prior", 7, 1):
            seen["other_inside"] = current_call().step
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with model_call("decoder", 2, 3):
        inside.set()
        done.wait()
        seen["main"] = current_call().step
    t.join()
    assert seen == {"other": None, "other_inside": 7, "main": 2}


def test_decoder_denoiser_marks_each_model_forward():
    seen = []

    class Model(torch.nn.Module):
        def forward(self, x, t, embeds, hint=None):
            seen.append((current_call(), x.shape[0]))
            return torch.cat([x, x], dim=1)  # (., 8, h, w): eps and the dropped variance channels

    x = torch.randn(2, 4, 3, 3)
    guided = DecoderDenoiser(Model(), torch.zeros(4, 8), guidance_scale=4.0)(x, 250, step=5)
    single = DecoderDenoiser(Model(), torch.zeros(2, 8), guidance_scale=1.0)(x, 100, step=6)
    assert seen == [(ModelCall("decoder", 5, 250.0, BRANCHES_GUIDED), 4), (ModelCall("decoder", 6, 100.0), 2)]
    torch.testing.assert_close(guided.output, x)  # uncond + 4 (cond - uncond) with cond == uncond
    assert torch.equal(single.output, x) and current_call() is None
