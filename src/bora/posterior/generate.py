"""Free text under a posterior: per-token uncertainty and one continuation per adapter sample.

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> from bora.api import Bora
>>> from bora.posterior.generate import generate, token_uncertainty
>>> from bora.core.config import AdapterConfig, BoraConfig, FitConfig, PriorConfig
>>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
...                                   num_hidden_layers=2, num_attention_heads=4))
>>> config = BoraConfig(adapter=AdapterConfig(rank=2, targets=("q_proj",), layers=(-1,)),
...                     prior=PriorConfig(tau_mode="fixed", tau=100.0),
...                     fit=FitConfig(guide="meanfield", init_scale=0.1))
>>> post = Bora(config, lm, None, tasks=("a", "b"), num_docs=10).posterior(3, seed=0)
>>> u = token_uncertainty(post, "a", torch.arange(1, 9))      # [B, L-1] per next-token position
>>> sorted(u), u["entropy"].shape
(['entropy', 'expected_entropy', 'mutual_information', 'nll'], torch.Size([1, 7]))
>>> len(generate(post, "a", torch.arange(1, 5), max_new_tokens=3)["ids"])   # one continuation per sample
3

:meth:`bora.posterior.samples.Posterior.token_uncertainty` and :meth:`bora.posterior.samples.Posterior.generate`
call these functions.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from ..core.config import ConfigError
from ..lora.linearize import linearized
from ..evaluation.metrics import SampleAverager
from ..core.seeding import STREAMS, sample_seed, seeded

__all__ = ["encode", "token_uncertainty", "generate"]


def encode(post, text: str) -> torch.Tensor:
    """Token ids of ``text`` as the fit's documents were tokenised (special tokens added)."""
    tok = post.bora.tokenizer
    if tok is None:
        raise ConfigError("this fit has no tokenizer")
    ids = list(tok(text, add_special_tokens=True)["input_ids"])
    if not ids:
        bos = getattr(tok, "bos_token_id", None)
        if bos is None:
            raise ConfigError("the prompt is empty and the tokenizer has no BOS token to start from")
        ids = [bos]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def token_uncertainty(post, task: str, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per position of ``input_ids`` (``[B, L]``, no padding) the uncertainty about the next token.

    Returns ``[B, L-1]`` float64 tensors: ``entropy`` (of the token-level BMA prediction, nats),
    ``expected_entropy`` (mean of each sample's entropy), ``mutual_information`` (``mean_s
    KL(p_s || p_bar)``, their difference: the epistemic part) and ``nll`` (``-log`` token-level
    BMA probability of the token that follows)."""
    model = post.model
    ids = input_ids.to(post.bora.device)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    S = post.distinct_samples
    avg = SampleAverager()
    model.adapters.train(False)

    def logits_at(adapter):
        with model.adapters.use(adapter, None), model.autocast():
            return model.lm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits

    for k in range(S):
        adapter, direction = post.task_predictive_args(k, task)
        logits = logits_at(adapter) if direction is None else linearized(logits_at, adapter, direction)
        avg.add(F.log_softmax(logits[:, :-1].float(), -1))
    p_bar = avg.probs()
    nll = -p_bar.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).clamp_min(1e-300).log()
    return {"entropy": avg.entropy().cpu(), "expected_entropy": avg.expected_entropy().cpu(),
            "mutual_information": avg.mutual_information().cpu(), "nll": nll.cpu()}


@torch.no_grad()
def generate(post, task: str, prompt: Union[str, torch.Tensor], *, max_new_tokens: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             seed: Optional[int] = None) -> dict:
    """``S`` continuations of ``prompt``; continuation ``i`` is generated with sample ``i``'s adapter.

    Greedy by default (``do_sample=True`` samples with ``temperature`` / ``top_p``, seeded). The
    whole model runs (no frozen-prefix cache). Returns ``{"prompt_ids", "ids" (list of new-token
    lists), "texts"}``."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise ConfigError("temperature must be > 0 and top_p in (0, 1]")
    bora, model = post.bora, post.model
    prompt_ids = encode(post, prompt) if isinstance(prompt, str) else torch.as_tensor(prompt).reshape(-1)
    S = post.num_samples
    dev = bora.device
    ids = prompt_ids.to(dev).unsqueeze(0).expand(S, -1).contiguous()
    kw = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": bora.pad_id}
    if do_sample:
        kw.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    stacked = post.task_adapters(task)
    model.adapters.train(False)
    with seeded(dev, sample_seed(post.seed if seed is None else seed, STREAMS["generate"])), \
            model.adapters.use(stacked, torch.arange(S, device=dev)), model.autocast():
        out = model.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    new = out[:, ids.shape[1]:].cpu()
    eos = _eos_ids(model.lm, bora.tokenizer)
    seqs = []
    for row in new.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        seqs.append(row[:cut])
    decode = getattr(bora.tokenizer, "decode", None)
    texts = [decode(s, skip_special_tokens=True) if decode is not None else " ".join(map(str, s)) for s in seqs]
    return {"prompt_ids": prompt_ids.tolist(), "ids": seqs, "texts": texts}


def _eos_ids(lm, tokenizer) -> set:
    out = set()
    for src in (getattr(lm, "generation_config", None), getattr(lm, "config", None), tokenizer):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(e, int):
            out.add(e)
        elif isinstance(e, (list, tuple)):
            out.update(int(x) for x in e)
    return out
