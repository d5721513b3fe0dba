"""Shared pieces of the bora benchmarks: models, batches and the training-step variants.

Every variant is an object with ``step()`` (one complete optimiser step on a fixed batch, synchronised
on CUDA) so that the runner can interleave variants inside one process and compare medians.

Variants (all on the same random-init LM, the same batch, rank, alpha, targets and AdamW settings):

``plain``      PEFT LoRA (``peft.get_peft_model``), one adapter, no prior; loss = token NLL sum / n_tokens.
``hand_map``   bora's gather layer (:class:`bora.lora.layers.MultiTaskLoRA`) with per-task torch tensors and the
               hierarchical Gaussian prior written by hand (no Pyro): the model's own cost.
``map``        bora MAP: ``Bora(...)`` + AutoDelta, one step exactly as :func:`bora.fit.loop.fit` does it.
``hand_mf``    ``hand_map`` with a hand-written reparameterised mean-field Gaussian (no Pyro).
``meanfield``  bora mean-field: AutoNormal (init_scale 1e-3), one step as in :func:`bora.fit.loop.fit`.
``loop``       PEFT with one named adapter per task; ``set_adapter`` per distinct task of the batch, forward and
               backward on that task's sub-batch, then one clip + AdamW step.
"""

from __future__ import annotations

import copy
import math
import dataclasses
import os
import platform
import resource
import sys
import json
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if os.path.join(ROOT, "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(ROOT, "src"))

import bora  # noqa: E402,F401
import pyro  # noqa: E402
from pyro.infer.autoguide import AutoNormal  # noqa: E402

from bora.api import Bora  # noqa: E402
from bora.core.config import AdapterConfig, BoraConfig, FitConfig, PriorConfig  # noqa: E402
from bora.fit.builder import build_step  # noqa: E402
from bora.fit.curvature import StepFisher  # noqa: E402
from bora.lora.inject import inject_adapters_  # noqa: E402
from bora.model.hierarchy import BoraModel  # noqa: E402

# ----------------------------------------------------------------------------- settings

LR = 2e-3  # FitConfig default
CLIP = 1.0  # FitConfig default
RANK, ALPHA = 8, 16.0  # AdapterConfig's defaults
TARGETS = ("q_proj", "v_proj")  # the setting (bora's AdapterConfig default was this until it became ALL7)
ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_targets(s: str) -> tuple:
    """``"q_proj,v_proj"``; ``"all7"`` for every linear layer of a Llama block; ``"bora"`` for AdapterConfig's default."""
    if s == "all7":
        return ALL7
    if s == "bora":
        return tuple(AdapterConfig().targets)
    return tuple(x.strip() for x in s.split(",") if x.strip())

#: random-init Llama configurations (``LlamaConfig`` keyword arguments)
PRESETS = {
    # the default CPU benchmark model (the small end of the range: hidden 256, 4 layers, 8k vocab,
    # 7.4M parameters): the LM is cheapest here, so bora's fixed per-step costs weigh the most
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=8192),
    # a larger CPU option (23M parameters; about 3x slower per step)
    "medium": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                   num_key_value_heads=6, vocab_size=16384),
    # the frozen-prefix benchmark: "small" with 8 layers, top 2 adapted
    "prefix": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=8192),
    # GPU mode: a 0.5B-class Llama (about 0.47B parameters)
    "gpu": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                num_key_value_heads=4, vocab_size=32000),
}


class Tok:
    """All bora needs from a tokenizer."""

    pad_token_id = 0


def make_lm(preset: str | dict, seed: int = 0, device: str = "cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = PRESETS[preset] if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    cfg = LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=False, **kw)
    lm = LlamaForCausalLM(cfg).to(device).eval()
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm


def shared_copy(lm):
    """A deep copy of the module tree that shares every parameter and buffer with ``lm``.

    Variants inject adapters in place, so each needs its own module tree, but the frozen weights
    (and the memory they occupy) are shared: every variant reads the same tensors."""
    memo = {id(t): t for t in list(lm.parameters()) + list(lm.buffers())}
    return copy.deepcopy(lm, memo)


def count_params(lm) -> int:
    return sum(p.numel() for p in lm.parameters())


def make_batch(vocab: int, num_tasks: int, distinct: int, *, batch_size: int = 16, seq_len: int = 128,
               num_docs: int = 4096, seed: int = 0, device: str = "cpu") -> dict:
    """A full (unpadded) batch whose examples use ``distinct`` different tasks of ``num_tasks``, round robin."""
    if distinct > num_tasks:
        raise ValueError("more distinct tasks than tasks")
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(num_tasks, generator=g)[:distinct]
    task_ids = chosen[torch.arange(batch_size) % distinct]
    ids = torch.randint(1, vocab, (batch_size, seq_len), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "task_ids": task_ids.to(device), "index": torch.randperm(num_docs, generator=g)[:batch_size].to(device)}


def n_tokens(batch) -> int:
    m = batch["attention_mask"]
    return int((m[:, 1:].bool() & m[:, :-1].bool()).sum())


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def autocast(device):
    import contextlib

    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def token_nll_sum(causal_lm, batch, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum of next-token NLLs of ``batch`` (or of its ``rows``) for a transformers causal LM.

    Mirrors :meth:`bora.model.likelihood.LMLikelihood.loglik`: the decoder runs on the whole sequences and the LM
    head only on the scored positions, through bora's chunked head and NLL (:func:`bora.lora.head.chunked_nll`) when
    the head is frozen and bias-free, so the baseline does exactly the LM work bora does."""
    from bora.lora.head import chunked_nll

    ids, mask = batch["input_ids"], batch["attention_mask"]
    if rows is not None:
        ids, mask = ids[rows], mask[rows]
    scored = mask[:, 1:].bool() & mask[:, :-1].bool()
    h = causal_lm.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1][scored]
    head, labels = causal_lm.lm_head, ids[:, 1:][scored]
    if head.bias is None and not head.weight.requires_grad:
        W = head.weight if not torch.is_autocast_enabled(h.device.type) else head.weight.to(torch.bfloat16)
        return chunked_nll(h, W, labels).sum()
    return F.cross_entropy(head(h).float(), labels, reduction="sum")


def adapter_layers(num_layers: int, top: Optional[int]) -> Optional[tuple]:
    return None if not top else tuple(range(num_layers - top, num_layers))


# ----------------------------------------------------------------------------- variants


class Variant:
    name = "?"

    def __init__(self, device):
        self.device = device
        self.last_loss = math.nan

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    def _finish_step(self, loss) -> None:
        """backward, clip, optimiser and schedule step, device sync: the same tail for every variant."""
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.opt.step()
        self.sched.step()
        sync(self.device)
        self.last_loss = float(loss.detach())

    def step(self) -> None:
        raise NotImplementedError


class Plain(Variant):
    """PEFT LoRA, one adapter, plain PyTorch step: loss = token NLL sum / n_tokens."""

    name = "plain"

    def __init__(self, lm, batch, *, layers=None, device="cpu", rank=RANK, alpha=ALPHA, targets=TARGETS):
        super().__init__(device)
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets),
                         layers_to_transform=list(layers) if layers else None, bias="none", task_type="CAUSAL_LM")
        self.peft = get_peft_model(lm, cfg)
        self.inner = self.peft.base_model.model  # the LlamaForCausalLM, with LoRA layers injected
        self.batch = batch
        self.ntok = n_tokens(batch)
        self.params = [p for p in self.peft.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0)

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        with autocast(self.device):
            loss = token_nll_sum(self.inner, self.batch) / self.ntok
        self._finish_step(loss)


class Loop(Variant):
    """PEFT with one named adapter per task; a loop over the batch's distinct tasks (``set_adapter``)."""

    name = "loop"

    def __init__(self, lm, batch, num_tasks, *, layers=None, device="cpu", rank=RANK, alpha=ALPHA,
                 targets=TARGETS):
        super().__init__(device)
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets),
                         layers_to_transform=list(layers) if layers else None, bias="none", task_type="CAUSAL_LM")
        self.peft = get_peft_model(lm, cfg, adapter_name="task0")
        for t in range(1, num_tasks):
            self.peft.add_adapter(f"task{t}", cfg)
        self.inner = self.peft.base_model.model
        self.params = [p for n, p in self.peft.named_parameters() if "lora_" in n]
        for p in self.params:
            p.requires_grad_(True)
        self.batch = batch
        self.opt = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0)

    def step(self, batch=None):
        batch = self.batch if batch is None else batch
        ntok = n_tokens(batch)
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        tids = batch["task_ids"]
        for t in torch.unique(tids).tolist():
            rows = (tids == t).nonzero().reshape(-1)
            self.peft.set_adapter(f"task{t}")
            with autocast(self.device):
                loss = token_nll_sum(self.inner, batch, rows) / ntok
            loss.backward()
            total += float(loss.detach())
        grads = [p for p in self.params if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(grads, CLIP)
        self.opt.step()
        self.sched.step()
        sync(self.device)
        self.last_loss = total


def bora_config(guide: str, *, layers=None, tau_mode: str = "learned", cache_prefix: bool = False,
                rank=RANK, alpha=ALPHA, targets=TARGETS, init_scale: float = 1e-3, device="cpu",
                task_updates: str = "eager") -> BoraConfig:
    # the arithmetic of the baselines: float32 on CPU (bora's default would run bf16 on an AMX CPU), bf16 on CUDA
    precision = "bf16" if torch.device(device).type == "cuda" else "fp32"
    return BoraConfig(
        adapter=AdapterConfig(rank=rank, alpha=alpha, targets=tuple(targets), layers=layers),
        prior=PriorConfig(tau_mode=tau_mode),
        fit=FitConfig(guide=guide, lr=LR, clip_norm=CLIP, init_scale=init_scale, cache_prefix=cache_prefix,
                      precision=precision, task_updates=task_updates),
    )


class BoraStep(Variant):
    """One optimiser step of a :class:`bora.api.Bora`, exactly as :func:`bora.fit.loop.fit` runs it."""

    def __init__(self, lm, batch, num_tasks, guide: str, *, layers=None, device="cpu", tau_mode="learned",
                 num_docs=4096, cache_prefix=False, bora_obj: Optional[Bora] = None,
                 ntok_total: Optional[int] = None, targets=TARGETS, task_updates: str = "eager"):
        super().__init__(device)
        self.name = guide if task_updates == "eager" else f"{guide}_{task_updates}"
        if bora_obj is None:
            bora_obj = Bora(bora_config(guide, layers=layers, tau_mode=tau_mode, cache_prefix=cache_prefix,
                                        targets=targets, device=device, task_updates=task_updates), lm, Tok(),
                            [f"task{t}" for t in range(num_tasks)], num_docs, device=device)
        self.bora = bora_obj
        self.model = bora_obj.model
        target = bora_obj.tau.model if bora_obj.tau is not None else bora_obj.model
        pyro.set_rng_seed(0)
        cfg = bora_obj.config.fit
        # fit divides by the training split's token count (a constant)
        self.ntok_total = ntok_total or num_docs * (batch["input_ids"].shape[1] - 1)
        # the step bora.fit.loop.FitLoop runs, from the same builder (constant schedule: no warm-up in a benchmark)
        self.train_step = build_step(bora_obj.model, bora_obj.guide,
                                     dataclasses.replace(cfg, schedule="constant", warmup=0.0, num_particles=1),
                                     total=1, n_tokens=self.ntok_total, target=target,
                                     tau_values=bora_obj.tau.values if bora_obj.tau is not None else None)
        self.params, self.opt, self.sched = self.train_step.params, self.train_step.optimizer, \
            self.train_step.scheduler
        self.k = 0
        self.batch = batch
        self.num_docs = num_docs
        # a learned-tau point fit also hands every step's per-document gradients to the tau update's Fisher
        self.curv = None
        if bora_obj.tau is not None and not isinstance(bora_obj.guide, AutoNormal) and cfg.tau_curvature == "steps":
            sizes = torch.full((num_tasks,), max(1, num_docs // num_tasks), dtype=torch.long)
            self.curv = StepFisher.for_model(self.model, sizes)

    def num_trainable(self) -> int:
        """The guide's values (a lazy step optimises the task rows outside ``params``)."""
        return sum(p.numel() for p in self.bora.guide.parameters())

    def step(self, batch=None):
        batch = self.batch if batch is None else batch
        model = self.model
        model.adapters.train(True)
        self.k += 1
        recording = None
        if self.curv is not None:  # as bora.infer.fit does (no probe documents in a synthetic batch)
            w = self.num_docs / (len(batch["task_ids"]) * self.ntok_total)
            self.curv.begin_step(w, batch["task_ids"], 1, index=batch.get("index"))
            recording = model.adapters.record_task_grads(self.curv.sink)
        loss, _ = self.train_step(batch, self.k, backward_context=recording)
        model.adapters.train(False)
        sync(self.device)
        self.last_loss = float(loss)


class Hand(Variant):
    """The same hierarchical model without Pyro: torch tensors, a hand-written Gaussian prior, bora's gather layer.

    ``guide="map"``: point estimates (= bora MAP with a fixed tau).
    ``guide="meanfield"``: reparameterised diagonal Gaussians (softplus scale, init 1e-3), single-sample ELBO
    with ``log q`` of the sample, as Pyro's Trace_ELBO computes it for AutoNormal.
    ``guide="meanfield_rb"`` (a prototype, not in ``src/``): the same ELBO with the task sites' prior and entropy
    terms in closed form (given the sampled global adapters) and only the batch's tasks drawn for the likelihood:
    the same expectation, a lower-variance gradient, fewer draws."""

    def __init__(self, lm, batch, num_tasks, guide="map", *, layers=None, device="cpu", num_docs=4096,
                 tau=1000.0, global_scale=1.0, rank=RANK, alpha=ALPHA, targets=TARGETS, init_scale=1e-3):
        super().__init__(device)
        self.name = {"map": "hand_map", "meanfield": "hand_mf", "meanfield_rb": "hand_mf_rb"}[guide]
        self.guide = guide
        self.adapters = inject_adapters_(lm, AdapterConfig(rank=rank, alpha=alpha, targets=tuple(targets), layers=layers))
        self.model = BoraModel(lm, self.adapters, [f"task{t}" for t in range(num_tasks)], num_docs,
                               PriorConfig(tau_mode="fixed", tau=tau, global_scale=global_scale),
                               autocast_dtype=torch.bfloat16 if torch.device(device).type == "cuda" else None)
        T = num_tasks
        self.T, self.N = T, num_docs
        self.s, self.task_sd = global_scale, tau ** -0.5
        P = torch.nn.Parameter
        self.loc, self.uscale = {}, {}
        for k, (sa, sb) in self.model.shapes.items():
            A0 = self.model.init_A[k]
            self.loc[k] = [P(A0.clone()), P(torch.zeros(sb, device=device)),
                           P(A0.expand(T, *sa).clone()), P(torch.zeros(T, *sb, device=device))]
            if guide != "map":
                u = math.log(math.expm1(init_scale))  # softplus^-1
                self.uscale[k] = [P(torch.full_like(x, u)) for x in self.loc[k]]
        self.params = [p for v in self.loc.values() for p in v] + [p for v in self.uscale.values() for p in v]
        self.opt = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0)
        self.batch = batch
        self.ntok_total = num_docs * (batch["input_ids"].shape[1] - 1)

    @staticmethod
    def _normal_lp(x, mean, sd) -> torch.Tensor:
        return -0.5 * ((x - mean) / sd).square().sum() - x.numel() * (math.log(sd) + 0.5 * math.log(2 * math.pi))

    def _loss_rb(self) -> torch.Tensor:
        """Globals drawn; task sites: E_q[log p(theta_t | Theta)] - E_q[log q(theta_t)] in closed form, and only
        the rows of the batch's tasks drawn for the likelihood."""
        tids = self.batch["task_ids"]
        rows, local = torch.unique(tids, return_inverse=True)
        half_log_2pi = 0.5 * math.log(2 * math.pi)
        elbo_prior, params = 0.0, {}
        for k, locs in self.loc.items():
            us = self.uscale[k]
            g = []
            for loc, u in zip(locs[:2], us[:2]):  # global sites: one draw each, scored as Trace_ELBO does
                sd = F.softplus(u)
                eps = torch.randn_like(loc)
                z = loc + sd * eps
                elbo_prior = elbo_prior + self._normal_lp(z, 0.0, self.s) - (
                    -0.5 * eps.square().sum() - sd.log().sum() - z.numel() * half_log_2pi)
                g.append(z)
            drawn = []
            for (loc, u), G in zip(zip(locs[2:], us[2:]), g):
                sd = F.softplus(u)
                v = self.task_sd ** 2
                # E_q log N(theta; G, v) + entropy of q, summed over all tasks
                elbo_prior = elbo_prior + (-0.5 / v * ((loc - G).square().sum() + sd.square().sum())
                                           - loc.numel() * (0.5 * math.log(v) + half_log_2pi))
                elbo_prior = elbo_prior + sd.log().sum() + loc.numel() * (0.5 + half_log_2pi)
                drawn.append(loc[rows] + sd[rows] * torch.randn_like(loc[rows]))
            params[k] = tuple(drawn)
        b = dict(self.batch, task_ids=local)
        ll = self.model.loglik(b, params)
        scale = self.N / ll.shape[0]
        return -(elbo_prior + scale * ll.sum()) / self.ntok_total

    def _loss(self) -> torch.Tensor:
        if self.guide == "meanfield_rb":
            return self._loss_rb()
        logq = 0.0
        values = {}
        for k, locs in self.loc.items():
            if self.guide == "map":
                values[k] = locs
            else:
                vs = []
                for loc, u in zip(locs, self.uscale[k]):
                    sd = F.softplus(u)
                    eps = torch.randn_like(loc)
                    z = loc + sd * eps
                    # log Normal(z; loc, sd) with z - loc = sd * eps
                    logq = logq + (-0.5 * eps.square().sum() - sd.log().sum() - z.numel() * 0.5 * math.log(2 * math.pi))
                    vs.append(z)
                values[k] = vs
        logp = 0.0
        for k, (GA, GB, tA, tB) in values.items():
            logp = logp + self._normal_lp(GA, 0.0, self.s) + self._normal_lp(GB, 0.0, self.s)
            logp = logp + self._normal_lp(tA, GA, self.task_sd) + self._normal_lp(tB, GB, self.task_sd)
        params = {k: (v[2], v[3]) for k, v in values.items()}
        ll = self.model.loglik(self.batch, params)
        scale = self.N / ll.shape[0]
        return (logq - logp - scale * ll.sum()) / self.ntok_total

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss()
        self._finish_step(loss)


def make_variant(kind: str, lm, batch, num_tasks, *, layers=None, device="cpu", tau_mode="learned",
                 num_docs=4096, targets=TARGETS) -> Variant:
    if kind == "plain":
        return Plain(lm, batch, layers=layers, device=device, targets=targets)
    if kind == "loop":
        return Loop(lm, batch, num_tasks, layers=layers, device=device, targets=targets)
    if kind in ("map", "meanfield"):
        return BoraStep(lm, batch, num_tasks, kind, layers=layers, device=device, tau_mode=tau_mode, num_docs=num_docs,
                        targets=targets)
    if kind == "map_lazy":  # --task-updates lazy: only the batch's tasks are touched (bora.fit.lazy)
        return BoraStep(lm, batch, num_tasks, "map", layers=layers, device=device, tau_mode=tau_mode,
                        num_docs=num_docs, targets=targets, task_updates="lazy")
    if kind in ("hand_map", "hand_mf", "hand_mf_rb"):
        guide = {"hand_map": "map", "hand_mf": "meanfield", "hand_mf_rb": "meanfield_rb"}[kind]
        return Hand(lm, batch, num_tasks, guide, layers=layers, device=device, num_docs=num_docs, targets=targets)
    raise ValueError(f"unknown variant {kind!r}")


# ----------------------------------------------------------------------------- timing


def interleave(steps: dict[str, Callable[[], None]], *, warmup: int, repeats: int, seed: int = 0,
               log: Optional[Callable[[str], None]] = None) -> dict[str, list[float]]:
    """Wall time of ``repeats`` calls of each function, interleaved in a fresh random order every round.

    Interleaving spreads the load of other processes on a shared machine evenly over the variants;
    the per-round ratios (same round, so nearly the same load) are the robust comparison."""
    import random

    rng = random.Random(seed)
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    times = {n: [] for n in names}
    for r in range(repeats):
        order = names[:]
        rng.shuffle(order)
        for n in order:
            t0 = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t0)
        if log and (r + 1) % max(1, repeats // 4) == 0:
            log(f"    round {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f}ms" for n in names))
    return times


def median(xs: Sequence[float]) -> float:
    import statistics

    return statistics.median(xs)


def quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return math.nan
    i = q * (len(s) - 1)
    lo, hi = int(math.floor(i)), int(math.ceil(i))
    return s[lo] + (s[hi] - s[lo]) * (i - lo)


def summarize(times: dict[str, list[float]], ref: Optional[str]) -> dict:
    """Medians (ms), quartiles, and ratios against ``ref``: of medians and the median of per-round ratios."""
    out = {}
    for n, ts in times.items():
        e = {"median_ms": median(ts) * 1e3, "q25_ms": quantile(ts, 0.25) * 1e3, "q75_ms": quantile(ts, 0.75) * 1e3,
             "n": len(ts)}
        if ref is not None and ref in times:
            rs = [a / b for a, b in zip(ts, times[ref])]
            e["ratio_of_medians"] = median(ts) / median(times[ref])
            e["paired_ratio"] = median(rs)
            e["paired_ratio_q25"] = quantile(rs, 0.25)
            e["paired_ratio_q75"] = quantile(rs, 0.75)
        out[n] = e
    return out


# ----------------------------------------------------------------------------- machine


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def peak_rss_mb() -> float:
    """High-water mark of this process's resident set (``VmHWM``), in MiB; ``ru_maxrss`` where unavailable.

    Unlike ``ru_maxrss`` it starts afresh at ``exec``, so it does not inherit the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return maxrss_mb()


def machine_info() -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import peft
    import transformers

    info = {
        "nproc": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bora": bora.__version__,
        "pyro_validation": pyro.infer.util.is_validation_enabled(),
        "platform": platform.platform(),
        "loadavg": os.getloadavg(),
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import subprocess

        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "src"], capture_output=True, text=True)
        if head.returncode == 0:
            info["git"] = head.stdout.strip() + (" (src/ modified)" if dirty.stdout.strip() else "")
    except OSError:
        pass
    return info


def run_json(argv: list, threads: int = 1) -> dict:
    """Run ``python argv...`` in a fresh process (``threads`` torch/OMP threads) and return the JSON object its last
    line of stdout prints; its stderr ends the benchmark if it fails (one process per memory point)."""
    import subprocess

    r = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])
