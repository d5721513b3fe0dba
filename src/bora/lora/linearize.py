"""The linearised (GLM) predictive: a network's output at a posterior sample, to first order around the point estimate.

>>> import torch
>>> from bora.lora.linearize import linearized
>>> W0, dW = torch.randn(3, 4), torch.randn(3, 4)
>>> x = torch.randn(4)
>>> f = lambda p: torch.tanh(p["w"][0] @ x)                   # any function of the adapters
>>> out = linearized(f, {"w": (W0,)}, {"w": (dW,)})           # f(W0) + J_f(W0) dW, one forward pass
>>> expected = torch.tanh(W0 @ x) + (1 - torch.tanh(W0 @ x) ** 2) * (dW @ x)
>>> torch.allclose(out, expected, atol=1e-6)
True

The "sampled" predictive runs the network at each sampled adapter ``theta_s``. The GLM predictive of
Immer, Korzepa & Bauer (2021, "Improving predictions of Bayesian neural nets via local
linearization"), which Laplace-LoRA (Yang et al. 2024) and ``laplace-torch`` (``pred_type="glm"``)
use, evaluates the network linearised at the point estimate instead:
``f_lin(x; theta_s) = f(x; theta*) + J(x) (theta_s - theta*)``. It is the model whose curvature the
Laplace approximation uses (the Gauss-Newton matrix), so it removes the network's second-order
terms from the samples' predictions. On the embedded default the two give the same picture
(``analysis/README.md``: document-level BMA 4.528 vs 4.513 nats/token, MAP 4.422; mean MI
0.196 vs 0.184) at twice the cost, so ``"sample"`` is bora's default and ``"linear"`` an option
(``bora evaluate --predictive linear``).

``J (theta_s - theta*)`` is one Jacobian-vector product, computed here by forward-mode automatic
differentiation (``torch.autograd.forward_ad``): one forward pass carrying a tangent, about twice the
cost of a plain forward and no backward pass. Attention runs in PyTorch's math kernel while
linearising (the fused CPU kernels have no forward-mode derivative).
"""

from __future__ import annotations

import warnings
from typing import Callable, Mapping, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["linearized", "tangent"]

Pairs = Mapping[str, Sequence[torch.Tensor]]


def tangent(sample: Pairs, point: Pairs) -> dict[str, tuple[torch.Tensor, ...]]:
    """``sample - point`` for every tensor of two adapter mappings with the same keys and shapes."""
    if sample.keys() != point.keys():
        raise ValueError("sample and point adapters must have the same keys")
    return {k: tuple(s - p for s, p in zip(sample[k], point[k])) for k in point}


def linearized(fn: Callable[[Pairs], torch.Tensor], point: Pairs, direction: Pairs) -> torch.Tensor:
    """``fn`` linearised at ``point``, one step along ``direction``: ``fn(point) + J_fn(point) direction``.

    ``fn`` maps an adapter mapping (``key -> tensors``, the shapes of ``point``) to one tensor
    (e.g. next-token logits); ``direction`` has the same keys and shapes (``theta_s - theta*``, see
    :func:`tangent`). Gradients are not tracked."""
    if point.keys() != direction.keys():
        raise ValueError("point and direction must have the same keys")
    with torch.no_grad(), fwAD.dual_level(), sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
        # torch scripts its forward-AD decompositions on first use and warns that torch.jit.script is deprecated
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning)
        dual = {}
        for k, tensors in point.items():
            if len(tensors) != len(direction[k]):
                raise ValueError(f"{k}: point and direction hold different numbers of tensors")
            pairs = []
            for p, d in zip(tensors, direction[k]):
                if p.shape != d.shape:
                    raise ValueError(f"{k}: direction shape {tuple(d.shape)} differs from {tuple(p.shape)}")
                # make_dual needs tensors that own their memory (a shared A may be an expanded view)
                pairs.append(fwAD.make_dual(p.contiguous().clone(), d.to(p.dtype).contiguous().clone()))
            dual[k] = tuple(pairs)
        out = fn(dual)
        primal, tan = fwAD.unpack_dual(out)
        return primal.clone() if tan is None else primal + tan
