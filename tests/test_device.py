"""Device and precision: what 'auto' resolves to, and bf16 autocast fits on CPU (as on CUDA)."""

import pytest
import torch

import bora.core.device
from bora.api import Bora
from bora.core.config import AdapterConfig, BoraConfig, ConfigError, FitConfig, PriorConfig
from bora.core.device import autocast_dtype, resolve_device
from bora.evaluation.evaluate import doc_loglik

from conftest import TinyTokenizer, task_data, tiny_llama

CPU = torch.device("cpu")


def test_precision_resolution(monkeypatch):
    assert autocast_dtype("fp32", CPU) is None
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    monkeypatch.setattr(bora.core.device, "cpu_has_bf16_matmul", lambda: False)
    assert autocast_dtype("auto", CPU) is None
    monkeypatch.setattr(bora.core.device, "cpu_has_bf16_matmul", lambda: True)
    assert autocast_dtype("auto", CPU) is torch.bfloat16
    assert autocast_dtype("fp32", CPU) is None  # an explicit fp32 wins over the CPU's units
    with pytest.raises(ConfigError, match="precision must be one of"):
        autocast_dtype("fp16", CPU)
    with pytest.raises(ConfigError, match="precision must be one of"):
        FitConfig(precision="half")
    assert resolve_device("cpu") == CPU


def test_environment_variable_keeps_fp32_under_auto(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setenv("BORA_CPU_BF16", "1")
    assert bora.core.device.cpu_has_bf16_matmul()
    monkeypatch.setenv("BORA_CPU_BF16", "0")
    assert not bora.core.device.cpu_has_bf16_matmul()
    assert autocast_dtype("auto", CPU) is None


def _config(precision):
    return BoraConfig(model="tiny", adapter=AdapterConfig(rank=2, targets=("q_proj", "v_proj"), layers=(-2, -1)),
                      prior=PriorConfig(tau_mode="learned", tau=10.0),
                      fit=FitConfig(steps=8, batch_size=8, lr=2e-2, warmup=0.0, patience=0, laplace_docs=4,
                                    precision=precision))


def test_bf16_on_cpu_fits_with_fp32_adapters_and_matches_fp32():
    train, val = task_data((24, 12, 6), seed=1), task_data((8, 6, 4), seed=2)
    runs = {}
    for precision in ("fp32", "bf16"):
        b = Bora(_config(precision), tiny_llama(), TinyTokenizer(), train.tasks, len(train), device="cpu")
        assert b.model.autocast_dtype == (torch.bfloat16 if precision == "bf16" else None)
        assert b.prefix is not None and b.prefix.autocast_dtype == b.model.autocast_dtype
        before = b.evaluate(val, base=True)["overall"]["nll_task_mean"]
        b.fit(train, val, progress=False)
        runs[precision] = (b, before, b.evaluate(val)["overall"]["nll_task_mean"])
    b16, before16, after16 = runs["bf16"]
    _, before32, after32 = runs["fp32"]
    assert after16 < before16
    assert all(p.dtype == torch.float32 for p in b16.guide.parameters())
    assert before16 == pytest.approx(before32, abs=0.02)  # bf16 rounding only
    assert after16 == pytest.approx(after32, abs=0.05)  # and the same optimum after 8 steps
    assert b16.laplace is not None and b16.laplace.median_task_sd() > 0
    # the cached prefix (computed under bf16) gives what the whole network gives under bf16
    feed = b16.feed(val)
    ll_cached, _ = doc_loglik(b16.model, b16.params(), feed, 8)
    b16.model.prefix = None
    plain = {k: v for k, v in feed.batch(torch.arange(len(val))).items() if k != "hidden"}
    ll_full = b16.model.loglik(plain, b16.params())
    assert ll_cached.dtype == torch.float32
    torch.testing.assert_close(ll_cached, ll_full.detach(), rtol=0.02, atol=0.05)


def test_linearised_predictive_runs_under_bf16():
    train = task_data((24, 12, 6), seed=1)
    b = Bora(_config("bf16"), tiny_llama(), TinyTokenizer(), train.tasks, len(train), device="cpu")
    b.fit(train, None, progress=False)
    post = b.posterior(2, seed=0, predictive="linear")
    feed = b.feed(train)
    batch = feed.batch(torch.arange(6))
    params, direction = post.predictive_args(0)
    lin = b.model.loglik(batch, params, direction)
    sampled = b.model.loglik(batch, post.params(0))
    assert lin.dtype == torch.float32 and torch.isfinite(lin).all()
    # one posterior step is small: the linearised and the sampled network agree to first order
    torch.testing.assert_close(lin, sampled.detach(), rtol=0.05, atol=0.5)


def test_keep_freed_memory_applies_on_glibc():
    import platform
    import sys

    from bora.core.device import keep_freed_memory

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc


def test_cpu_bf16_runs_the_attention_core_in_float32_and_restores_the_model(monkeypatch):
    calls = []
    real = bora.core.device._sdpa_float32_core

    def spy(module, query, key, value, attention_mask, **kw):
        out, w = real(module, query, key, value, attention_mask, **kw)
        calls.append((query.dtype, out.dtype))
        return out, w

    monkeypatch.setattr(bora.core.device, "_sdpa_float32_core", spy)
    train = task_data((8, 6, 4), seed=3)
    b = Bora(_config("bf16"), tiny_llama(), TinyTokenizer(), train.tasks, len(train), device="cpu")
    feed = b.feed(train)
    ll = b.model.loglik(feed.batch(torch.arange(len(train))), b.params())
    assert torch.isfinite(ll).all()
    assert calls and all(q == o for q, o in calls)  # the core ran in float32 and handed back the caller's dtype
    assert b.lm.config._attn_implementation == "sdpa"  # restored after the pass
