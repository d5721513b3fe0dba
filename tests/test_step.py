"""bora.fit.step.TrainStep against torch's own clipping (oracle) and its finite checks."""

import pytest
import torch

from bora.core.config import FitConfig
from bora.fit.step import NumericalError, TrainStep, make_optimizer


@pytest.mark.parametrize("target", [0.5, 100.0])  # gradient norm below and above the clip
def test_train_step_clips_exactly_as_clip_grad_norm(target):
    g = torch.Generator().manual_seed(0)
    data = torch.randn(6, generator=g)
    ws = [torch.nn.Parameter(torch.randn(6, generator=g)) for _ in range(2)]
    ref = [torch.nn.Parameter(w.detach().clone()) for w in ws]

    def loss(params, batch):
        return target * sum(((p - batch) ** 2).sum() for p in params) / 10

    cfg = FitConfig(lr=0.1, steps=5, warmup=0.0)
    ours = TrainStep(lambda b: loss(ws, b), ws, make_optimizer(ws, cfg), clip_norm=1.0)
    opt = make_optimizer(ref, cfg)
    for k in range(1, 4):
        _, norm = ours(data, k)
        opt.zero_grad()
        loss(ref, data).backward()
        want = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        opt.step()
        torch.testing.assert_close(norm, want)
        for a, b in zip(ws, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (float(norm) > 1.0) == (target > 1.0)


def test_train_step_refuses_a_non_finite_gradient():
    w = torch.nn.Parameter(torch.tensor([1.0]))
    # sqrt(w - 1) at w = 1: a finite loss (0) with an infinite gradient
    step = TrainStep(lambda b: (w - b).sqrt().sum(), [w], make_optimizer([w], FitConfig(lr=0.1, steps=2)),
                     clip_norm=1.0)
    with pytest.raises(NumericalError, match="gradient norm"):
        step(torch.tensor([1.0]), 1)
    assert float(w.detach()) == 1.0  # nothing applied
