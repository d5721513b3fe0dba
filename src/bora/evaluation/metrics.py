"""Predictive metrics as pure functions: NLL, accuracy, calibration (ECE), Brier score, entropy, MI.

>>> import torch
>>> from bora.evaluation.metrics import brier, expected_calibration_error, mutual_information
>>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
>>> labels = torch.tensor([0, 1, 1])
>>> [round(float(v), 2) for v in brier(probs, labels)]          # 1 - 2 p_y + sum p^2
[0.02, 0.72, 0.18]
>>> conf, correct = probs.max(-1).values, probs.argmax(-1) == labels
>>> round(expected_calibration_error(conf, correct, n_bins=15), 4)  # |0.9-1|, |0.6-0|, |0.7-1| over 3
0.3333
>>> same = torch.tensor([0.2, 0.8]).expand(4, 2)                  # 4 identical posterior samples
>>> float(mutual_information(same.log()))
0.0

Conventions: ``probs`` are ``[..., V]`` categorical distributions over the vocabulary and
``labels`` the observed next tokens. The Brier score is the multi-class one,
``sum_v (p_v - onehot_v)^2 = 1 - 2 p_y + sum_v p_v^2`` per token (0 for a confident correct
prediction, 2 for a confident wrong one). The expected calibration error uses ``n_bins``
equal-width bins ``(k/n, (k+1)/n]`` on the top-1 probability: ``sum_b (n_b / n) |acc_b - conf_b|``.
For ``S`` posterior samples with log-probabilities ``[S, ..., V]`` there are two different
Bayesian model averages, and bora labels them apart:

* the **token-level BMA** ``p_bar = mean_s p_s`` of the next-token distributions (this module:
  :func:`bma_probs`, :class:`SampleAverager`). Accuracy, ECE, Brier score and the entropy split
  below are computed from it, because they need one categorical prediction per token;
* the **document-level posterior predictive** ``log mean_s p(doc | adapter_s)``
  (:func:`log_mean_exp` of whole-document log-likelihoods; ``bma_doc`` in
  :func:`bora.evaluation.evaluate.evaluate_posterior`). This is the headline BMA NLL: it is the predictive
  probability of the document under the posterior, where every sample explains the whole document.

The entropy of the token-level BMA splits into the mean entropy of the samples (aleatoric) plus
the mutual information between the next token and the adapter (epistemic), ``MI = mean_s KL(p_s
|| p_bar)``, computed in float64 as a sum of KL terms (:func:`mutual_information`), zero exactly
when all samples agree. :class:`TokenMetrics` accumulates all of these over batches of tokens
without keeping per-token tensors.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["entropy", "brier", "bin_statistics", "expected_calibration_error", "bma_probs",
           "mutual_information", "SampleAverager", "log_mean_exp", "TokenMetrics"]


def entropy(probs: torch.Tensor, log_probs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Entropy ``-sum p log p`` over the last dim (nats); ``0 log 0 = 0``."""
    if log_probs is None:
        log_probs = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
    return -(probs * log_probs).nan_to_num(0.0).sum(-1)


def brier(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-class Brier score per row: ``1 - 2 p_y + sum_v p_v^2`` (no one-hot tensor is built)."""
    p_y = probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return 1.0 - 2.0 * p_y + probs.square().sum(-1)


def bin_statistics(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """``[n_bins, 3]`` float64: per equal-width bin ``(k/n, (k+1)/n]`` the count, sum of confidences and of hits."""
    conf = confidence.detach().reshape(-1).double()
    hit = correct.detach().reshape(-1).double()
    idx = ((conf * n_bins).ceil().long() - 1).clamp(0, n_bins - 1)
    out = torch.zeros(n_bins, 3, dtype=torch.float64, device=conf.device)
    out[:, 0].index_add_(0, idx, torch.ones_like(conf))
    out[:, 1].index_add_(0, idx, conf)
    out[:, 2].index_add_(0, idx, hit)
    return out.cpu()


def _ece_from_bins(bins: torch.Tensor) -> float:
    n = float(bins[:, 0].sum())
    if n == 0:
        return math.nan
    return float((bins[:, 1] - bins[:, 2]).abs().sum() / n)  # sum_b n_b/n |conf_b - acc_b|


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """ECE with ``n_bins`` equal-width bins on the top-1 probability ``confidence`` (``correct``: top-1 hit)."""
    return _ece_from_bins(bin_statistics(confidence, correct, n_bins))


def bma_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """Bayesian-model-average prediction: mean over the leading sample dim of ``exp(log_probs)``."""
    return log_probs.exp().mean(0)


def mutual_information(log_probs: torch.Tensor) -> torch.Tensor:
    """Epistemic uncertainty ``mean_s KL(p_s || p_bar)`` from ``[S, ..., V]`` log-probabilities, in float64.

    ``p_bar = mean_s p_s`` is the token-level BMA prediction. This equals ``H(p_bar) - mean_s H(p_s)``
    but is computed as a sum of non-negative KL terms in float64 (``log p_bar`` by logsumexp), so it
    is not the round-off of a difference of two nearly equal entropies; nothing is clamped.
    """
    lp = log_probs.double()
    log_bar = torch.logsumexp(lp, 0) - math.log(lp.shape[0])
    p = lp.exp()
    kl = torch.where(p > 0, p * (lp - log_bar), torch.zeros((), dtype=lp.dtype, device=lp.device)).sum(-1)
    return kl.mean(0)


class SampleAverager:
    """Streaming token-level BMA over samples, one sample's ``[..., V]`` log-probabilities at a time.

    Keeps ``sum_s p_s`` and ``sum_s sum_v p_s log p_s`` in float64, so that after all samples
    :meth:`mutual_information` is ``mean_s KL(p_s || p_bar) = mean_s sum_v p_s log p_s - sum_v p_bar
    log p_bar`` (the same quantity as :func:`mutual_information`; the float64 sums keep the
    cancellation of the two ~entropy-sized terms at ~1e-15 nats, far below any MI of interest).

    >>> import torch
    >>> lp = torch.log_softmax(torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)), -1)
    >>> acc = SampleAverager()
    >>> for s in range(3):
    ...     acc.add(lp[s])
    >>> bool(torch.allclose(acc.mutual_information(), mutual_information(lp), atol=1e-12))
    True
    """

    def __init__(self):
        self.S = 0
        self.p_sum: Optional[torch.Tensor] = None
        self.neg_h_sum: Optional[torch.Tensor] = None

    @torch.no_grad()
    def add(self, log_probs: torch.Tensor) -> None:
        lp = log_probs.double()
        p = lp.exp()
        neg_h = torch.where(p > 0, p * lp, torch.zeros((), dtype=lp.dtype, device=lp.device)).sum(-1)
        self.p_sum = p if self.p_sum is None else self.p_sum.add_(p)
        self.neg_h_sum = neg_h if self.neg_h_sum is None else self.neg_h_sum.add_(neg_h)
        self.S += 1

    def probs(self) -> torch.Tensor:
        """The token-level BMA prediction ``p_bar = mean_s p_s`` (float64)."""
        return self.p_sum / self.S

    def expected_entropy(self) -> torch.Tensor:
        """``mean_s H(p_s)`` per position (float64)."""
        return -self.neg_h_sum / self.S

    def entropy(self) -> torch.Tensor:
        """``H(p_bar)`` per position (float64)."""
        return entropy(self.probs())

    def mutual_information(self) -> torch.Tensor:
        """``mean_s KL(p_s || p_bar)`` per position (float64, not clamped)."""
        p_bar = self.probs()
        neg_h_bar = torch.where(p_bar > 0, p_bar * p_bar.log(), torch.zeros((), dtype=p_bar.dtype,
                                                                            device=p_bar.device)).sum(-1)
        return self.neg_h_sum / self.S - neg_h_bar


def log_mean_exp(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``log(mean(exp(x)))`` along ``dim``, computed stably."""
    return torch.logsumexp(x, dim) - math.log(x.shape[dim])


class TokenMetrics:
    """Streaming token-level metrics of one predictive distribution (point or BMA).

    Call :meth:`add` with ``probs [n, V]`` and ``labels [n]`` (and optionally per-token mean
    sample entropy and MI) for every batch; :meth:`result` returns the averages per token.
    """

    def __init__(self, n_bins: int = 15):
        self.n_bins = n_bins
        self.bins = torch.zeros(n_bins, 3, dtype=torch.float64)
        self.n = 0
        self.sums = {"nll": 0.0, "correct": 0.0, "brier": 0.0, "entropy": 0.0, "expected_entropy": 0.0,
                     "mutual_information": 0.0}

    @torch.no_grad()
    def add(self, probs: torch.Tensor, labels: torch.Tensor, *, expected_entropy: Optional[torch.Tensor] = None,
            mi: Optional[torch.Tensor] = None) -> None:
        """Count one batch: ``probs [n, V]``, ``labels [n]``, and optionally per-token mean sample entropy and MI."""
        conf, top = probs.max(-1)
        hit = top == labels
        p_y = probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        H = entropy(probs)  # per-token values in the input precision, sums in float64
        self.n += int(labels.numel())
        self.sums["nll"] += float(-p_y.double().clamp_min(1e-300).log().sum())
        self.sums["correct"] += float(hit.sum())
        self.sums["brier"] += float(brier(probs, labels).double().sum())
        self.sums["entropy"] += float(H.double().sum())
        self.sums["expected_entropy"] += float((H if expected_entropy is None else expected_entropy).double().sum())
        self.sums["mutual_information"] += float(0.0 if mi is None else mi.double().sum())
        self.bins += bin_statistics(conf, hit, self.n_bins)

    def result(self) -> dict:
        """Per-token averages of everything added so far (NLL, accuracy, Brier, entropies, MI) and the ECE."""
        n = max(1, self.n)
        s = self.sums
        nll = s["nll"] / n
        return {"tokens": self.n, "nll": nll, "ppl": math.exp(nll) if nll < 700 else math.inf,
                "accuracy": s["correct"] / n, "ece": _ece_from_bins(self.bins), "brier": s["brier"] / n,
                "entropy": s["entropy"] / n, "expected_entropy": s["expected_entropy"] / n,
                "mutual_information": s["mutual_information"] / n}
