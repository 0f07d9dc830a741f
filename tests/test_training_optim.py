"""kandinsky.training.optim: the one learning-rate schedule, the end of a step and the one EMA that
``kandinsky train`` (training/loop.py) and ``kandinsky train-demo`` (data/train_demo.py) share.
Every number here is worked out by hand from the formulas in the module's docstrings."""
from __future__ import annotations

import math

import pytest
import torch

from kandinsky.training.optim import EMA, lr_at, optimizer_step, set_lr


def test_warmup_then_constant():
    """kandinsky train: lr_at(step + 1, lr, warmup_steps): linear up to the rate, then the rate."""
    assert lr_at(1, 1e-3, warmup=4) == 1e-3 * 0.25
    assert lr_at(3, 1e-3, warmup=4) == 1e-3 * 0.75
    assert [lr_at(t, 1e-3, warmup=4) for t in (4, 5, 1000)] == [1e-3] * 3
    assert lr_at(1, 1e-3) == lr_at(1, 1e-3, warmup=0) == 1e-3  # no warm-up


def test_warmup_then_cosine_with_a_floor():
    """kandinsky train-demo: t the stage's fraction done, a 3% warm-up, a cosine to 2% of the rate."""
    kw = dict(warmup=0.03, end=1.0, floor=0.02)
    assert lr_at(0.015, 1.0, **kw) == pytest.approx(0.5)  # half-way up
    assert lr_at(0.0, 1.0, **kw) == 0.02  # the floor, not 0
    assert lr_at(0.5, 1.0, **kw) == pytest.approx(0.5)  # (1 + cos(pi / 2)) / 2
    assert lr_at(0.25, 2.0, **kw) == pytest.approx(1 + math.cos(math.pi / 4))  # 1.7071
    assert lr_at(0.99, 1.0, **kw) == 0.02  # (1 + cos(0.99 pi)) / 2 = 0.00025 < the floor
    assert lr_at(3.0, 1.0, **kw) == 0.02  # past the end: stays at the floor
    assert lr_at(50, 1.0, warmup=0, end=100) == pytest.approx(0.5)  # in steps, no warm-up


def test_set_lr_sets_every_group():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 5.0}], lr=1.0)
    assert set_lr(opt, 0.25) == 0.25
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]


def test_optimizer_step_clips_steps_zeroes_and_updates_the_ema():
    p = torch.nn.Parameter(torch.zeros(2))
    ema = EMA([p], decay=0.5)
    opt = torch.optim.SGD([p], lr=1.0)
    (p * torch.tensor([3.0, 4.0])).sum().backward()  # gradient (3, 4), norm 5
    assert optimizer_step(opt, [p], max_grad_norm=1.0, ema=ema) == pytest.approx(5.0)
    assert torch.allclose(p.detach(), torch.tensor([-0.6, -0.8]))  # clipped to norm 1, then one SGD step
    assert p.grad is None
    assert torch.allclose(ema.shadow[0], torch.tensor([-0.3, -0.4]))  # 0.5 * 0 + 0.5 * p
    (p * torch.tensor([3.0, 4.0])).sum().backward()
    assert optimizer_step(opt, [p], max_grad_norm=None) == pytest.approx(5.0)  # None: not clipped
    assert torch.allclose(p.detach(), torch.tensor([-3.6, -4.8]))
    assert ema.updates == 1  # no EMA given: none updated


def test_ema_constant_decay_and_its_state():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    ema = EMA([p], decay=0.75)
    for value in (5.0, 9.0):
        with torch.no_grad():
            p.fill_(value)
        ema.update([p])
    assert ema.shadow[0].item() == 0.75 * (0.75 * 1 + 0.25 * 5) + 0.25 * 9  # 3.75
    with ema.applied([p]):
        assert p.item() == 3.75
    assert p.item() == 9.0  # restored
    other = EMA([p], decay=0.75)
    other.load_state_dict(ema.state_dict())
    assert other.shadow[0].item() == 3.75 and other.updates == 2
    other.copy_to([p])
    assert p.item() == 3.75


def test_ema_ramp_follows_the_first_updates():
    """ramp=True: decay min(decay, (1 + n) / (10 + n)) after n updates: 0.1, 2/11, 0.25, ..., 0.999."""
    p = torch.nn.Parameter(torch.tensor([0.0]))
    ema = EMA([p], decay=0.999, ramp=True)
    assert ema.decay_now() == 0.1
    with torch.no_grad():
        p.fill_(10.0)
    ema.update([p])
    assert ema.shadow[0].item() == pytest.approx(9.0)  # 0.1 * 0 + 0.9 * 10
    assert ema.decay_now() == 2 / 11
    ema.updates = 10_000
    assert ema.decay_now() == 0.999  # (1 + n) / (10 + n) = 0.9991 is past the cap
    assert EMA([p], decay=0.999).decay_now() == 0.999  # no ramp: the decay from the first update
