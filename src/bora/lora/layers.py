"""Multi-task LoRA layer: a frozen base linear layer plus ``scale * B_t A_t x`` per example.

>>> import torch
>>> from bora.core.config import AdapterConfig
>>> from bora.lora.layers import MultiTaskLoRA
>>> base = torch.nn.Linear(8, 6)
>>> layer = MultiTaskLoRA(base, AdapterConfig(rank=2, alpha=2.0))
>>> A, B = torch.randn(3, 2, 8), torch.randn(3, 6, 2)     # 3 tasks
>>> x, task_ids = torch.randn(4, 5, 8), torch.tensor([0, 2, 2, 1])
>>> layer.set_adapter_(A, B, task_ids)
>>> y = layer(x)                       # example i uses task task_ids[i]'s adapter
>>> torch.allclose(y[1], base(x[1]) + x[1] @ A[2].T @ B[2].T)
True
>>> layer.clear_adapter_(); torch.equal(layer(x), base(x))
True

The layer never owns adapter weights: the Pyro model samples them (global and per-task sites)
and hands them in with :meth:`MultiTaskLoRA.set_adapter_` before the language model runs. A
minibatch that mixes tasks is computed in one batched operation: each example's factors are
gathered (``A.index_select(0, task_ids)``) and applied with batched matmuls, never with a loop over tasks.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..core.config import AdapterConfig

__all__ = ["MultiTaskLoRA", "base_shape", "is_adaptable", "is_conv1d"]


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style ``Conv1D`` (weight ``[in, out]``, ``y = x @ W + b``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_adaptable(module: nn.Module) -> bool:
    """True for the layer types bora can wrap (``nn.Linear`` and transformers' ``Conv1D``)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def base_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear or Conv1D layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        w = module.weight
        return int(w.shape[0]), int(w.shape[1])
    raise TypeError(f"cannot adapt a {type(module).__name__}; only nn.Linear and Conv1D are supported")


class MultiTaskLoRA(nn.Module):
    """Wraps a frozen base layer; adds ``scale * (dropout(x) A_t^T) B_t^T`` for each example's task.

    Adapters are set per forward pass with :meth:`set_adapter_`:
    ``A`` is ``[T, r, in]`` (or ``[r, in]`` for one adapter shared by every example) and
    ``B`` is ``[T, out, r]`` (or ``[out, r]``); ``task_ids`` (``[N]``) picks each example's row.
    With no adapter set the layer is exactly the base layer.
    """

    def __init__(self, base: nn.Module, config: AdapterConfig):
        super().__init__()
        self.in_features, self.out_features = base_shape(base)
        self.base = base  # registered, never copied
        for p in base.parameters():
            p.requires_grad_(False)
        self.config = config
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self._A: Optional[torch.Tensor] = None
        self._B: Optional[torch.Tensor] = None
        self._task_ids: Optional[torch.Tensor] = None
        # sink(factor, grad [N, ...], task_ids): receives each example's gradient of its gathered task
        # adapter (factor 0: A_t, 1: B_t) in backward passes (bora.curvature); a plain attribute
        self.grad_sink: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None

    def set_adapter_(self, A: torch.Tensor, B: torch.Tensor, task_ids: Optional[torch.Tensor] = None) -> None:
        """Use ``A`` and ``B`` (one row per task, picked by ``task_ids``; or one shared adapter) from now on."""
        r = self.config.rank
        if A.shape[-2:] != (r, self.in_features) or B.shape[-2:] != (self.out_features, r):
            raise ValueError(
                f"adapter shapes {tuple(A.shape)} / {tuple(B.shape)} do not fit a rank-{r} adapter of a "
                f"{self.in_features}->{self.out_features} layer"
            )
        if (A.dim() == 3 or B.dim() == 3) and task_ids is None:
            raise ValueError("per-task adapters need task_ids")
        # plain attributes, never registered: an nn.Parameter passed in must not become the layer's
        object.__setattr__(self, "_A", A)
        object.__setattr__(self, "_B", B)
        object.__setattr__(self, "_task_ids", task_ids)

    def clear_adapter_(self) -> None:
        for name in ("_A", "_B", "_task_ids"):
            object.__setattr__(self, name, None)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution for input ``x`` of shape ``[N, ..., in]``."""
        return self._lora(x, None)

    def _lora(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        """``y + delta(x)`` (``delta(x)`` when ``y`` is None), the add and the scale fused into the last product."""
        A, B = self._A, self._B
        x = self.dropout(x)
        if A.dim() == 3 or B.dim() == 3:
            ids = self._task_ids
            if ids.shape[0] != x.shape[0]:
                raise ValueError(f"task_ids has {ids.shape[0]} entries for a batch of {x.shape[0]}")
            shape = x.shape
            x3 = x.reshape(shape[0], -1, shape[-1])  # [N, L, in]
            # index_select, not A[ids]: its backward (index_add_) sums a task's rows in a fixed order, where
            # indexing's (index_put_ with accumulate) varied from run to run on multi-threaded CPUs
            Ag = A.index_select(0, ids) if A.dim() == 3 else A  # [N, r, in], or one shared [r, in]
            Bg = B.index_select(0, ids) if B.dim() == 3 else B.expand(ids.shape[0], *B.shape)  # [N, out, r]
            sink = self.grad_sink
            if sink is not None and torch.is_grad_enabled():  # per-example gradients, free in the backward pass
                for f, (full, g) in enumerate(((A, Ag), (B, Bg))):
                    if full.dim() == 3 and g.requires_grad:
                        g.register_hook(lambda grad, f=f: sink(f, grad, ids))
            # [N, L, r]: one matrix product for a shared A, a batched one for per-example A_t
            h = torch.bmm(x3, Ag.transpose(1, 2).to(x3.dtype)) if Ag.dim() == 3 else x3 @ Ag.t().to(x3.dtype)
            dtype = x3.dtype if y is None else y.dtype
            Bt = Bg.transpose(1, 2).to(dtype)  # [N, r, out]
            if y is None:
                out = torch.bmm(h, Bt) * self.scale
            else:  # one kernel for y + scale * h @ Bt: no separate scaled product and sum
                out = torch.baddbmm(y.reshape(shape[0], -1, self.out_features), h.to(dtype), Bt, alpha=self.scale)
            return out.reshape(*shape[:-1], self.out_features)
        out = (x @ A.t().to(x.dtype)) @ B.t().to(x.dtype) * self.scale
        return out if y is None else y + out.to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self._A is None:
            return y
        return self._lora(x, y)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.config.rank}, scale={self.scale:g}"
