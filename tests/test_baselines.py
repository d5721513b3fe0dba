"""The per-task LoRA baseline (analysis/per_task_lora.py) against PEFT's own LoRA trained alone on one task, and
its scoring against bora's."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))

peft = pytest.importorskip("peft")


def _setup():
    from bora.core.config import BoraConfig
    from bora.diagnostics.view import load_data
    from bora.lora.base import tiny_model

    lm, tok = tiny_model(layers=2)
    cfg = BoraConfig(model="tiny")
    cfg = cfg.replace(adapter=cfg.adapter.replace(targets=("q_proj", "v_proj"), layers=(-1,), rank=2),
                      data=cfg.data.replace(tasks=("hamlet/Ghost", "julius-caesar/PORTIA", "king-lear/EDMUND")))
    return cfg, lm, tok, load_data(cfg, tok)


def test_each_task_adapter_equals_peft_lora_trained_alone_on_its_task():
    import copy

    import per_task_lora as ptl

    cfg, lm, tok, data = _setup()
    pad = tok.pad_token_id
    kw = dict(lr=1e-2, epochs=3.0, patience=0, batch_size=4, seed=0)
    rows = [{k: (data[k].task_ids == t).nonzero().flatten() for k in ("train", "val")} for t in range(3)]
    n = lm.config.num_hidden_layers
    # several adapters in one PeftModel, each trained in turn (what the baseline does)
    many = None
    for t in range(3):
        torch.manual_seed(t)
        if many is None:
            many = peft.get_peft_model(copy.deepcopy(lm), ptl._peft_config(cfg, n), adapter_name=f"task{t}")
        else:
            many.add_adapter(f"task{t}", ptl._peft_config(cfg, n))
        many.set_adapter(f"task{t}")
        ptl.train_task(many, f"task{t}", data["train"], data["val"], rows[t]["train"], rows[t]["val"], pad, **kw)
    # the oracle: task 2's adapter alone in a fresh PeftModel, same initialisation and batches
    torch.manual_seed(2)
    alone = peft.get_peft_model(copy.deepcopy(lm), ptl._peft_config(cfg, n), adapter_name="task2")
    ptl.train_task(alone, "task2", data["train"], data["val"], rows[2]["train"], rows[2]["val"], pad, **kw)
    got = {k.replace(".task2.", "."): v for k, v in many.state_dict().items() if ".task2." in k}
    want = {k.replace(".task2.", "."): v for k, v in alone.state_dict().items() if ".task2." in k}
    assert got.keys() == want.keys() and got
    assert all(torch.equal(got[k], want[k]) for k in got)
    # training task 2 left task 0's adapter where its own training put it (adapters are isolated)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in many.state_dict().items()
               if ".task0." in k and "lora_B" in k)


def test_baseline_scores_documents_as_bora_does():
    import per_task_lora as ptl

    from bora.data.feed import Feed
    from bora.evaluation.evaluate import doc_loglik
    from bora.lora.inject import inject_adapters_
    from bora.model.hierarchy import BoraModel

    cfg, lm, tok, data = _setup()
    test = data["test"]
    nll, toks = ptl.doc_nll(lm, test, torch.arange(len(test)), tok.pad_token_id)
    adapters = inject_adapters_(lm, cfg.adapter)
    model = BoraModel(lm, adapters, test.tasks, len(test), cfg.prior)
    ll, btoks = doc_loglik(model, None, Feed(test, pad_id=tok.pad_token_id, prefix=None))
    assert torch.equal(toks, btoks.long())
    torch.testing.assert_close(nll, (-ll).double(), rtol=1e-5, atol=1e-4)


def _tiny_run(tmp_path, name, *flags):
    import per_task_lora as ptl

    return ptl.main(["--tiny", "--epochs", "2", *flags, "--out", str(tmp_path / f"{name}.json")])


def test_lr_grid_keeps_each_tasks_validation_best(tmp_path):
    """--lrs: per task the lr of the lowest validation NLL is kept, and its test NLL is that of the same adapter
    trained at that lr alone (--lr)."""
    lrs = [1e-3, 1e-2, 1e-1]
    out = _tiny_run(tmp_path, "grid", "--lrs", *map(str, lrs))
    assert out["lrs"] == lrs and out["lr"] is None
    toks, ids = torch.tensor(out["tokens"]), torch.tensor(out["task_ids"])
    nll = torch.tensor(out["doc_nll"], dtype=torch.float64)
    alone = {}
    for t, task in enumerate(out["tasks"]):
        fits = out["by_lr"][task]
        k = min(range(len(lrs)), key=lambda i: fits[i]["val_nll"])
        assert [x["lr"] for x in fits] == lrs and [x["chosen"] for x in fits] == [i == k for i in range(len(lrs))]
        assert out["lr_per_task"][task] == lrs[k] and out["val_nll"][task] == fits[k]["val_nll"]
        assert out["best_pass"][task] == fits[k]["best_pass"]
        rows = ids == t
        assert float(nll[rows].sum() / toks[rows].sum()) == pytest.approx(fits[k]["test_nll"], rel=1e-12)
        lr = lrs[k]
        if lr not in alone:
            alone[lr] = _tiny_run(tmp_path, f"lr{lr:g}", "--lr", str(lr))
        assert [x for x, i in zip(alone[lr]["doc_nll"], out["task_ids"]) if i == t] == nll[rows].tolist()


def test_lr_grid_never_chooses_on_test(tmp_path, monkeypatch):
    """Validation and test made to disagree: at lr 1e-1 the adapter really trains (a better test NLL) but is
    reported a bad validation NLL; at 1e-2 it stays at its initial state (B = 0: the base model's test NLL) with
    the best validation NLL reported. Per task the validation choice is kept and its (worse) test NLL reported."""
    import per_task_lora as ptl

    val = {1e-3: 2.0, 1e-2: 1.0, 1e-1: 3.0}
    train = ptl.train_task

    def fake_train(model, name, *a, lr, **k):
        if lr == 1e-1:
            train(model, name, *a, lr=lr, **k)
        return 0, val[lr]

    monkeypatch.setattr(ptl, "train_task", fake_train)
    out = _tiny_run(tmp_path, "grid", "--lrs", "1e-3", "1e-2", "1e-1")
    assert out["lr_per_task"] == {task: 1e-2 for task in out["tasks"]}
    for task in out["tasks"]:
        fits = {x["lr"]: x for x in out["by_lr"][task]}
        assert fits[1e-2]["chosen"] and fits[1e-1]["test_nll"] < fits[1e-2]["test_nll"]  # test disagrees
    assert out["ppl"] == pytest.approx(out["base_ppl"], rel=1e-6)  # the reported test numbers: the chosen fits'


def test_seed_changes_the_fit_not_the_documents(tmp_path):
    """--seed is the fitting seed: the same test documents, the seed recorded, other adapters."""
    a = _tiny_run(tmp_path, "s0", "--lr", "1e-2")
    b = _tiny_run(tmp_path, "s1", "--lr", "1e-2", "--seed", "1")
    assert a["config"]["fit"]["seed"] == 0 and b["config"]["fit"]["seed"] == 1
    assert a["task_ids"] == b["task_ids"] and a["tokens"] == b["tokens"] and a["base_ppl"] == b["base_ppl"]
    assert a["doc_nll"] != b["doc_nll"]
