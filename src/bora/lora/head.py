"""The LM head and the next-token NLL in chunks of tokens: the ``[tokens x vocab]`` logits never exist whole.

>>> import torch
>>> from bora.lora.head import chunked_nll
>>> g = torch.Generator().manual_seed(0)
>>> h = torch.randn(300, 16, generator=g, requires_grad=True)
>>> W, y = torch.randn(1000, 16, generator=g), torch.randint(0, 1000, (300,), generator=g)
>>> nll = chunked_nll(h, W, y, rows=64)                       # five chunks of at most 64 tokens
>>> ref = torch.nn.functional.cross_entropy(h @ W.T, y, reduction="none")
>>> torch.allclose(nll, ref, atol=1e-5)
True
>>> gh, = torch.autograd.grad((nll * torch.linspace(0, 1, 300)).sum(), h)
>>> rh, = torch.autograd.grad((ref * torch.linspace(0, 1, 300)).sum(), h)
>>> torch.allclose(gh, rh, atol=1e-5, rtol=1e-4)
True

A small LM's head is its largest matmul (SmolLM2: 49,152 x 576), and the usual ``cross_entropy(lm_head(h))``
materialises the logits, their log-softmax and its gradient, three ``[n x V]`` float32 tensors of about 100 MB
each for a 16-document batch of the embedded default, written and read once per step. Here each chunk of
tokens computes its logits, their log-sum-exp, the NLL and, when ``h`` needs a gradient, ``d NLL / d h =
(softmax - onehot) W`` at once (the gradient of token ``i``'s NLL involves only row ``i``), so the backward
pass is one multiplication by the incoming per-token weights: the same two head matmuls as autograd's, no
``[n x V]`` tensor beyond a chunk, and no second pass over the logits. The head's weight is frozen (it
gets no gradient); under bfloat16 autocast pass its bfloat16 copy and the matmuls run in bfloat16 with
float32 log-sum-exp (the logits are rounded to bfloat16 as autocast's head would round them).
"""

from __future__ import annotations

import torch

__all__ = ["chunked_nll", "CHUNK_ELEMENTS"]

CHUNK_ELEMENTS = 1 << 26  # logits per chunk (256 MB in float32)


class _ChunkedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int) -> torch.Tensor:
        n = h.shape[0]
        want_grad = ctx.needs_input_grad[0]
        nll = torch.empty(n, dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h) if want_grad else None
        for s in range(0, n, rows):
            x, y = h[s:s + rows], labels[s:s + rows]
            logits = (x.to(weight.dtype) @ weight.T).float()
            lse = torch.logsumexp(logits, 1)
            nll[s:s + rows] = lse - logits.gather(1, y[:, None]).squeeze(1)
            if want_grad:
                p = logits.sub_(lse[:, None]).exp_()  # the softmax, in place of the logits
                p[torch.arange(len(y), device=p.device), y] -= 1.0
                grad[s:s + rows] = (p.to(weight.dtype) @ weight).to(h.dtype)
        ctx.save_for_backward(grad)
        return nll

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * g[:, None].to(grad.dtype), None, None, None


def chunked_nll(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                rows: int | None = None) -> torch.Tensor:
    """``-log softmax(h W^T)[labels]`` per row of ``h`` (``[n, H]``; ``weight`` ``[V, H]``, frozen), float32 ``[n]``,
    computed ``rows`` tokens at a time (default: ``CHUNK_ELEMENTS / V`` rows). Differentiable in ``h`` only."""
    if weight.requires_grad:
        raise ValueError("chunked_nll gives no gradient for the head's weight; it must be frozen")
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or labels.shape != h.shape[:1]:
        raise ValueError(f"chunked_nll: h {tuple(h.shape)}, weight {tuple(weight.shape)} and labels "
                         f"{tuple(labels.shape)} do not fit ([n, H], [V, H], [n])")
    rows = max(1, CHUNK_ELEMENTS // weight.shape[0]) if rows is None else int(rows)
    return _ChunkedNLL.apply(h, weight, labels, rows)
