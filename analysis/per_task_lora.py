"""The per-task LoRA baseline: one PEFT LoRA adapter per task (its own A and B), each trained alone on its task's
training documents and early-stopped on its own validation documents.

    python analysis/per_task_lora.py --lr 2e-3 --out analysis/results/baselines/per_task_lora_lr2e-3.json
    python analysis/per_task_lora.py --lrs 1e-3 2e-3 4e-3 --out ...   # each task's lr chosen on its validation
    python analysis/per_task_lora.py --tiny --out /tmp/smoke.json            # tiny random model, seconds
    python analysis/per_task_lora.py --data shakespeare-all --sample-tasks 128 --out ...   # tau_sweep's sample

The data, split, tokenisation, adapter targets, layers, rank and alpha are bora's defaults (a ``BoraConfig``),
so the test documents are exactly those of ``bora fit`` with the same data settings. Each task gets a fresh
adapter (``PeftModel.add_adapter``, then ``set_adapter``: only that adapter trains) with bora's optimiser
settings (AdamW at ``--lr``, 5% warm-up then cosine to 0.1 over the task's own step budget of ``--epochs``
passes, gradient clipping at 1.0), minibatches of the task's own documents, the loss of ``labels=`` (mean NLL of
the batch's next tokens), validation once per pass over the task's documents and early stopping after
``--patience`` passes without improvement (the best state is kept). The JSON holds every test document's NLL in
bora's test order (``doc_nll``), the tokens and task ids to bootstrap against a bora fit
(``analysis/compare_fits.py`` style), each task's best pass, and the base model's test perplexity, which
must equal ``bora fit``'s base column (a check that the scoring is bora's).

``--lrs LR [LR ...]`` (instead of ``--lr``) trains each task's adapter at every learning rate (the same initial
adapter and batches) and keeps, per task, the one whose best validation NLL is lowest for that task (a practitioner
tuning each adapter; test is never looked at to choose): ``lr_per_task`` holds the chosen lr of every task,
``by_lr`` every (task, lr) fit's best pass, validation NLL and test NLL per token (for auditing the choice), and
``doc_nll``, ``val_nll`` and ``best_pass`` are those of the chosen fits.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from tau_sweep import choose_lr  # noqa: E402  (the same rule as the sweep: lowest validation NLL)


def _peft_config(cfg, num_layers: int):
    from peft import LoraConfig

    layers = cfg.adapter.layers
    layers = None if layers is None else sorted(i % num_layers for i in layers)
    return LoraConfig(r=cfg.adapter.rank, lora_alpha=cfg.adapter.alpha, lora_dropout=cfg.adapter.dropout,
                      target_modules=list(cfg.adapter.targets), layers_to_transform=layers, bias="none")


def doc_nll(model, split, rows, pad_id: int, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-document NLL sums and scored tokens of ``rows`` of ``split`` (next tokens after the first, as bora)."""
    from bora.data.batching import collate

    out, toks = [], []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            b = collate(split, rows[i:i + batch_size], pad_id)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            target, mask = b["input_ids"][:, 1:], b["attention_mask"][:, 1:].float()
            nll = -torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
            out.append((nll * mask).sum(1).double())
            toks.append(mask.sum(1).long())
    return torch.cat(out), torch.cat(toks)


def train_task(model, name: str, split_tr, split_va, rows_tr, rows_va, pad_id: int, *, lr: float, epochs: float,
               patience: int, batch_size: int, seed: int) -> tuple[int, float]:
    """Train adapter ``name`` (already added and set) on its rows; returns the best pass (0: the adapter's
    initial state, whose product is zero: the base model) and its validation NLL per token."""
    from bora.core.config import FitConfig
    from bora.data.batching import collate
    from bora.fit.step import lr_factor

    params = [p for n, p in model.named_parameters() if p.requires_grad and f".{name}." in n]
    per_pass = max(1, math.ceil(len(rows_tr) / batch_size))
    total = max(1, math.ceil(epochs * per_pass))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(FitConfig(lr=lr, steps=total), total))
    gen = torch.Generator().manual_seed(seed)

    def val_nll() -> float:
        nll, toks = doc_nll(model, split_va, rows_va, pad_id)
        return float(nll.sum() / toks.sum())

    best, best_pass, bad = val_nll(), 0, 0
    keep = {id(p): p.detach().clone() for p in params}
    order = torch.zeros(0, dtype=torch.long)
    for step in range(1, total + 1):
        if len(order) == 0:
            order = rows_tr[torch.randperm(len(rows_tr), generator=gen)]
        idx, order = order[:batch_size], order[batch_size:]
        b = collate(split_tr, idx, pad_id)
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        model.train()
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % per_pass == 0 or step == total:
            v = val_nll()
            if v < best - 1e-6:
                best, best_pass, bad = v, math.ceil(step / per_pass), 0
                keep = {id(p): p.detach().clone() for p in params}
            else:
                bad += 1
                if patience and bad >= patience:
                    break
    with torch.no_grad():
        for p in params:
            p.copy_(keep[id(p)])
    return best_pass, best


def run(cfg, lm, tok, *, lr: float | None = None, epochs: float, patience: int, batch_size: int,
        progress: bool = True, lrs: list[float] | None = None) -> dict:
    """Fit one adapter per task of ``cfg``'s data on ``lm``; per-document test NLL in bora's test order. With
    ``lrs``, each task's adapter is trained at every learning rate and the one of the lowest validation NLL kept."""
    from peft import get_peft_model

    from bora.diagnostics.view import load_data
    from bora.evaluation.evaluate import summarize

    data = load_data(cfg, tok)
    test = data["test"]
    pad_id = int(tok.pad_token_id) if getattr(tok, "pad_token_id", None) is not None else 0
    base_nll, toks = doc_nll(lm, test, torch.arange(len(test)), pad_id)
    base = summarize(base_nll, toks, test.task_ids, test.tasks)["overall"]["ppl_task_mean"]
    num_layers = lm.config.num_hidden_layers
    grid = bool(lrs)
    lrs = [float(x) for x in lrs] if grid else [float(lr)]
    model, nll, best, val = None, torch.zeros(len(test), dtype=torch.float64), {}, {}
    chosen_lr, by_lr = {}, {}
    for t, name in enumerate(test.tasks):
        rows = {k: (data[k].task_ids == t).nonzero().flatten() for k in ("train", "val", "test")}
        tries = []  # (adapter, best pass, validation NLL, test NLL per document) per learning rate
        for k, lr_k in enumerate(lrs):
            adapter = f"task{t}_lr{k}" if grid else f"task{t}"
            torch.manual_seed(cfg.fit.seed + t)  # each adapter's own A initialisation (the same at every lr)
            if model is None:
                model = get_peft_model(lm, _peft_config(cfg, num_layers), adapter_name=adapter)
            else:
                model.add_adapter(adapter, _peft_config(cfg, num_layers))
            model.set_adapter(adapter)
            t0 = time.perf_counter()
            bp, v = train_task(model, adapter, data["train"], data["val"], rows["train"], rows["val"], pad_id,
                               lr=lr_k, epochs=epochs, patience=patience, batch_size=batch_size, seed=cfg.fit.seed)
            tries.append((adapter, bp, v, doc_nll(model, test, rows["test"], pad_id)[0]))
            if progress:
                print(f"{name}" + (f" @ lr {lr_k:g}" if grid else "") + f": best pass {bp}, val NLL {v:.4f}, "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
        k = choose_lr([x[2] for x in tries])  # validation only: the test NLL of tries is never looked at
        adapter, best[name], val[name], nll[rows["test"]] = tries[k]
        chosen_lr[name] = lrs[k]
        test_tokens = toks[rows["test"]].sum().clamp(min=1)
        by_lr[name] = [{"lr": lrs[i], "best_pass": x[1], "val_nll": x[2],
                        "test_nll": float(x[3].sum() / test_tokens), "chosen": i == k} for i, x in enumerate(tries)]
        if grid:  # keep only the chosen adapter
            model.set_adapter(adapter)
            for other, *_ in tries:
                if other != adapter:
                    model.delete_adapter(other)
            if progress:
                print(f"{name}: lr {lrs[k]:g} chosen on validation", flush=True)
    ppl = summarize(nll, toks, test.task_ids, test.tasks)["overall"]["ppl_task_mean"]
    return {"base_ppl": base, "ppl": ppl, "val_nll_task_mean": sum(val.values()) / len(val), "val_nll": val,
            "best_pass": best, "lr_per_task": chosen_lr, "by_lr": by_lr, "tasks": list(test.tasks),
            "task_ids": test.task_ids.tolist(), "tokens": toks.tolist(), "doc_nll": nll.tolist()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lrs", type=float, nargs="+", default=None,
                   help="a learning-rate grid instead of --lr: each task's lr chosen on its validation NLL")
    p.add_argument("--epochs", type=float, default=4.0, help="passes over each task's training documents")
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--tiny", action="store_true", help="a tiny random model (smoke run; numbers mean nothing)")
    p.add_argument("--out", required=True)
    p.add_argument("--sample-tasks", type=int, default=0, help="keep a random this many of the source's tasks "
                   "(as analysis/tau_sweep.py --sample-tasks: the same seed gives the same tasks)")
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="fitting seed (each adapter's initialisation and batch order; "
                   "the split is --data's and does not depend on it), as bora fit --seed")
    a = p.parse_args(argv)
    from bora.core.config import BoraConfig, DataConfig
    from bora.core.files import write_json
    from bora.lora.base import load_base_model, tiny_model

    cfg = BoraConfig(data=DataConfig(source=a.data))
    cfg = cfg.replace(fit=cfg.fit.replace(seed=a.seed))
    if a.sample_tasks:
        from bora.data.documents import load_documents, sample_tasks

        cfg = cfg.replace(data=cfg.data.replace(tasks=sample_tasks(load_documents(cfg.data), a.sample_tasks,
                                                                   a.sample_seed)))
    if a.tiny:
        lm, tok = tiny_model()
        cfg = cfg.replace(model="tiny", adapter=cfg.adapter.replace(targets=("q_proj", "v_proj"), layers=(-1,)),
                          data=cfg.data.replace(tasks=("hamlet/Ghost", "julius-caesar/PORTIA")))
    else:
        lm, tok = load_base_model(cfg.model)
    out = run(cfg, lm, tok, lr=a.lr, lrs=a.lrs, epochs=a.epochs, patience=a.patience, batch_size=a.batch_size)
    out = {"command": "python analysis/per_task_lora.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "lr": None if a.lrs else a.lr, "lrs": a.lrs,
           "lr_selection": "per task, the lr of the lowest validation NLL (never test)" if a.lrs else None,
           "epochs": a.epochs, "patience": a.patience, "batch_size": a.batch_size,
           "config": cfg.to_dict(), **out}
    write_json(a.out, out)
    print(json.dumps({"base_ppl": out["base_ppl"], "ppl": out["ppl"]}))
    return out


if __name__ == "__main__":
    main()
