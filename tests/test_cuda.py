"""GPU paths: bf16 autocast fits and bitsandbytes-quantised base models (skipped without CUDA).

Run by ``benchmarks/gpu_check.sh`` on a GPU machine; on CPU every test here is skipped with its reason.
"""

import importlib.util

import pytest
import torch

from bora.api import Bora
from bora.core.config import AdapterConfig, BoraConfig, FitConfig, PriorConfig

from conftest import TinyTokenizer, task_data, tiny_llama, tiny_model_dir

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")


def _config(**kw):
    return BoraConfig(model="tiny", adapter=AdapterConfig(rank=2, targets=("q_proj", "v_proj"), layers=(-2, -1)),
                      prior=PriorConfig(tau_mode="learned", tau=10.0),
                      fit=FitConfig(steps=6, batch_size=8, lr=2e-2, warmup=0.0, patience=0, laplace_docs=4), **kw)


def _fit(bora):
    train, val = task_data((24, 12, 6), seed=1), task_data((8, 6, 4), seed=2)
    before = bora.evaluate(val, base=True)["overall"]["nll_task_mean"]
    bora.fit(train, val, progress=False)
    after = bora.evaluate(val)["overall"]["nll_task_mean"]
    return before, after


@cuda
def test_bf16_fit_on_cuda_keeps_fp32_adapters_and_matches_cpu():
    train = task_data((24, 12, 6), seed=1)
    gpu = Bora(_config(), tiny_llama(), TinyTokenizer(), train.tasks, len(train), device="cuda")
    assert gpu.model.autocast_dtype == torch.bfloat16
    before, after = _fit(gpu)
    assert after < before
    assert all(p.dtype == torch.float32 and p.is_cuda for p in gpu.guide.parameters())
    cpu = Bora(_config(), tiny_llama(), TinyTokenizer(), train.tasks, len(train), device="cpu")
    _, after_cpu = _fit(cpu)
    assert after == pytest.approx(after_cpu, abs=0.05)  # bf16 rounding, same optimum
    assert gpu.laplace is not None and gpu.laplace.median_task_sd() > 0


@cuda
@bnb
@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_quantised_base_model_fits(tmp_path, quantize):
    from bora.lora.base import load_base_model

    path = tiny_model_dir(tmp_path / "m")
    lm, tok = load_base_model(str(path), device="cuda", quantize=quantize)
    assert getattr(lm, "is_quantized", False)
    train = task_data((24, 12, 6), seed=1)
    bora = Bora(_config(quantize=quantize), lm, tok, train.tasks, len(train), device="cuda")
    before, after = _fit(bora)
    assert after < before
    assert all(p.dtype == torch.float32 for p in bora.guide.parameters())


def test_quantised_base_model_errors_clearly_on_cpu():
    from bora.lora.base import load_base_model
    from bora.core.config import ConfigError

    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        load_base_model("smollm2", device="cpu", quantize="4bit")
    with pytest.raises(ConfigError, match="quantize must be one of"):
        _config(quantize="3bit")
    assert BoraConfig.from_json(_config(quantize="8bit").to_json()).quantize == "8bit"
