"""The chunked LM head + NLL against cross_entropy, alone and inside the model's likelihood."""

import pytest
import torch
import torch.nn.functional as F

from bora.api import Bora
from bora.core.config import AdapterConfig, BoraConfig, FitConfig, PriorConfig
from bora.lora.head import chunked_nll

from conftest import TinyTokenizer, task_data, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
def test_chunked_nll_matches_cross_entropy_values_and_gradients(rows):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(50, 12, generator=g, requires_grad=True)
    W, y = torch.randn(300, 12, generator=g), torch.randint(0, 300, (50,), generator=g)
    w = torch.rand(50, generator=g)  # arbitrary weights on the tokens' NLLs, as the ELBO's scaling gives
    nll = chunked_nll(h, W, y, rows=rows)
    ref = F.cross_entropy(h @ W.T, y, reduction="none")
    torch.testing.assert_close(nll, ref, atol=1e-5, rtol=1e-5)
    gh, = torch.autograd.grad((w * nll).sum(), h)
    rh, = torch.autograd.grad((w * ref).sum(), h)
    torch.testing.assert_close(gh, rh, atol=1e-5, rtol=1e-4)


def test_chunked_nll_in_bfloat16_is_close_and_refuses_bad_input():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(40, 16, generator=g)
    W, y = torch.randn(200, 16, generator=g), torch.randint(0, 200, (40,), generator=g)
    ref = F.cross_entropy(h @ W.T, y, reduction="none")
    low = chunked_nll(h, W.bfloat16(), y, rows=16)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, atol=0.1, rtol=0.02)  # bfloat16 logits, float32 log-sum-exp
    with pytest.raises(ValueError, match="must be frozen"):
        chunked_nll(h, W.clone().requires_grad_(True), y)
    with pytest.raises(ValueError, match="do not fit"):
        chunked_nll(h, W[:, :8], y)


def _bora(lm, precision="fp32"):
    train = task_data((8, 6, 4), seed=3)
    cfg = BoraConfig(model="tiny", adapter=AdapterConfig(rank=2, targets=("q_proj", "v_proj", "c_attn"),
                                                         layers=(-2, -1)),
                     prior=PriorConfig(tau_mode="fixed", tau=10.0),
                     fit=FitConfig(steps=2, precision=precision, guide="map"))
    return Bora(cfg, lm, TinyTokenizer(), train.tasks, len(train), device="cpu"), train


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_model_loglik_uses_the_chunked_head_and_matches_the_logits_path(make):
    bora, train = _bora(make())
    feed = bora.feed(train)
    batch = feed.batch(torch.arange(len(train)))
    point = bora.params()
    params = {k: tuple(p.detach().clone().requires_grad_(True) for p in v) for k, v in point.items()}
    assert bora.model._head_weight() is not None  # the fused path is taken for these heads
    ll = bora.model.loglik(batch, params)
    logits, labels, rows = bora.model.scored_logits(batch, params)
    nll = F.cross_entropy(logits, labels, reduction="none")
    ref = -torch.zeros(len(train)).index_add_(0, rows, nll)
    torch.testing.assert_close(ll, ref, atol=1e-5, rtol=1e-5)
    flat = [p for v in params.values() for p in v]
    got = torch.autograd.grad(ll.sum(), flat)
    want = torch.autograd.grad(ref.sum(), flat)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_bf16_head_copy_is_made_once_and_follows_the_weight():
    bora, _ = _bora(tiny_llama(), precision="bf16")
    W = bora.model._head_weight()
    assert W.dtype == torch.bfloat16 and bora.model._head_weight() is W  # cached
    with torch.no_grad():
        bora.lm.get_output_embeddings().weight.mul_(2.0)  # an in-place change: a new copy
    W2 = bora.model._head_weight()
    assert W2 is not W
    torch.testing.assert_close(W2.float(), 2 * W.float(), atol=0, rtol=0)
