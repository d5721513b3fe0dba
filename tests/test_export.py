"""PEFT export: folders that peft.PeftModel.from_pretrained loads with logits equal to bora's."""

import copy
import json

import pytest
import torch

from bora.api import Bora
from bora.core.config import AdapterConfig, BoraConfig, ConfigError, FitConfig, PriorConfig
from bora.data.batching import collate
from bora.io.export import adapter_estimate, export_adapters, write_peft_adapter

from conftest import TinyTokenizer, task_data, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def make(base, targets, mode="fixed", guide="meanfield"):
    cfg = BoraConfig(model="tiny-base", adapter=AdapterConfig(rank=2, alpha=6.0, targets=targets, layers=(-2, -1)),
                     prior=PriorConfig(tau_mode=mode, tau=10.0), fit=FitConfig(guide=guide, init_scale=0.3))
    split = task_data((4, 3, 3), seed=1)
    return Bora(cfg, copy.deepcopy(base), TinyTokenizer(), split.tasks, len(split)), split


def peft_logits(base, folder, ids, mask):
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("make_base,targets", [
    (tiny_llama, ("q_proj", "v_proj", "down_proj")),
    (tiny_gpt2, ("c_attn", "c_proj")),  # transformers Conv1D: fan_in_fan_out
])
def test_peft_round_trip_matches_bora_logits(tmp_path, make_base, targets):
    base = make_base()
    bora, split = make(base, targets)
    k = 2
    paths = export_adapters(bora, tmp_path / "all", all_tasks=True, estimate="sample", sample_index=k, seed=3)
    params = bora.posterior(k + 1, seed=3).params(k)  # the same sample, all tasks: [T, ...]
    b = collate(split, torch.arange(len(split)))
    ids, mask, tids = b["input_ids"], b["attention_mask"], b["task_ids"]
    with torch.no_grad():
        with bora.adapters.use(params, tids):  # bora's own batched multi-task forward
            want = bora.lm(input_ids=ids, attention_mask=mask).logits
        plain = base(input_ids=ids, attention_mask=mask).logits
    m = mask.bool()
    for t, name in enumerate(split.tasks):
        rows = tids == t
        got = peft_logits(base, paths[name], ids[rows], mask[rows])
        torch.testing.assert_close(got[m[rows]], want[rows][m[rows]], atol=1e-5, rtol=0)
        assert (got - plain[rows])[m[rows]].abs().max() > 1e-2  # the adapter is not trivially zero
    # the global adapter
    values = bora.posterior(k + 1, seed=3).values(k)
    glob = {key: (A, B) for key, (A, B) in bora.model.global_from_values(values).items()}
    with torch.no_grad(), bora.adapters.use(glob, None):
        want_g = bora.lm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(peft_logits(base, paths["_global"], ids, mask)[m], want_g[m], atol=1e-5, rtol=0)
    cfg = json.loads((paths[split.tasks[0]] / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(bora.adapters.names.values())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 6.0 and cfg["base_model_name_or_path"] == "tiny-base"
    assert cfg["fan_in_fan_out"] == (make_base is tiny_gpt2)


def test_single_exports_estimates_and_errors(tmp_path):
    base = tiny_llama()
    bora, split = make(base, ("q_proj",))
    post = bora.posterior(2, seed=0)
    # a sample export equals the posterior's sample; the mean export equals the point estimate
    export_adapters(bora, tmp_path / "s1", task="task1", estimate="sample", sample_index=1)
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "s1" / "adapter_model.safetensors"))
    key = next(iter(bora.adapters.keys()))
    A = got[f"base_model.model.{bora.adapters.names[key]}.lora_A.weight"]
    assert torch.equal(A, post.task_adapter(1, "task1")[key][0])
    mean = adapter_estimate(bora, task="task1", estimate="mean")
    assert torch.equal(mean[key][0], bora.params()[key][0][1])
    assert torch.equal(adapter_estimate(bora, task="task1", estimate="map")[key][1], mean[key][1])
    # an earlier bora export is replaced whole, no temporary folders are left behind
    export_adapters(bora, tmp_path / "s1", task="task0")
    assert json.loads((tmp_path / "s1" / "bora_export.json").read_text())["task"] == "task0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1"]
    # ... but a folder holding anything bora did not write is refused and left alone
    (tmp_path / "s1" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt"):
        export_adapters(bora, tmp_path / "s1", task="task1")
    assert (tmp_path / "s1" / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "s1" / "bora_export.json").read_text())["task"] == "task0"
    (tmp_path / "s1" / "notes.txt").unlink()
    # a fitted-from-few-documents adapter goes through the same writer
    new = bora.fit_new_task(task_data((0, 0, 0, 4), seed=5), steps=2)
    write_peft_adapter(bora, new, tmp_path / "new")
    ids = split.input_ids[0].unsqueeze(0)
    with torch.no_grad(), bora.adapters.use(new, None):
        want = bora.lm(input_ids=ids).logits
    torch.testing.assert_close(peft_logits(base, tmp_path / "new", ids, torch.ones_like(ids)), want, atol=1e-5, rtol=0)
    # user errors
    with pytest.raises(ConfigError, match="not in this fit"):
        export_adapters(bora, tmp_path / "x", task="nope")
    with pytest.raises(ConfigError, match="exactly one"):
        export_adapters(bora, tmp_path / "x", task="task0", all_tasks=True)
    with pytest.raises(ConfigError, match="estimate"):
        export_adapters(bora, tmp_path / "x", task="task0", estimate="median")
    ind, _ = make(base, ("q_proj",), mode="uncoupled")
    with pytest.raises(ConfigError, match="no global adapter"):
        export_adapters(ind, tmp_path / "x", global_adapter=True)
    assert not (tmp_path / "x").exists()
