"""Where the LM runs and in what arithmetic: the device and the autocast precision.

>>> import torch
>>> from bora.core.device import autocast_dtype, resolve_device
>>> autocast_dtype("fp32", torch.device("cpu")) is None
True
>>> autocast_dtype("bf16", resolve_device("cpu"))
torch.bfloat16

``precision='auto'`` (:class:`bora.core.config.FitConfig`) runs bfloat16 autocast on CUDA and on CPUs whose
bfloat16 matrix units torch can use (Intel AMX: :func:`cpu_has_bf16_matmul`), float32 elsewhere. Under
autocast the matmuls of the frozen base, the adapters and the LM head run in bfloat16, while the adapter
parameters, their gradients, the optimiser state, the Pyro sites and the log-softmax stay float32
(:mod:`bora.model.likelihood` upcasts the logits; :func:`bora.lora.head.chunked_nll` takes the log-sum-exp in float32).
On a 2-core AMX CPU a ``[1024 x 576] @ [576 x 49152]`` product (the LM head of the embedded default) takes
66 ms in bfloat16 against 264 ms in float32.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch

from .config import PRECISIONS, ConfigError

__all__ = ["resolve_device", "autocast_dtype", "autocast", "cpu_has_bf16_matmul", "keep_freed_memory"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` / ``'auto'``: CUDA if available, else CPU; a CUDA device without CUDA is a
    :class:`~bora.core.config.ConfigError`."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return d


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU has bfloat16 matrix units that torch uses (Intel AMX tiles); the environment variable
    ``BORA_CPU_BF16=0`` says no (``precision='auto'`` then keeps float32 on this CPU)."""
    if os.environ.get("BORA_CPU_BF16", "").strip() == "0":
        return False
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``precision`` ('auto', 'fp32', 'bf16') on ``device``; ``None``: no autocast."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16" or device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_matmul()):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: Optional[torch.dtype], lm=None):
    """``torch.autocast`` for ``dtype`` on ``device``'s type, or a no-op context for ``None``.

    With ``lm`` (a transformers model using PyTorch's SDPA attention) under bfloat16 on a CPU, the attention
    core (``softmax(q k^T) v``) runs in float32 inside it: PyTorch's CPU flash-attention backward is about 2.3x
    slower in bfloat16 than in float32 at the embedded default's shapes (16 x 9 heads x 64 tokens x 64: 17.4 ms
    against 7.7 ms for forward and backward), while the projections around it stay in bfloat16."""
    if dtype is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
    if lm is not None and device.type == "cpu" and dtype != torch.float32:
        stack.enter_context(_float32_attention(lm))
    return stack


_FP32_SDPA = "bora_sdpa_float32_core"


def _sdpa_float32_core(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    with torch.autocast(device_type=query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(dtype), weights


@functools.cache
def _register_float32_attention() -> None:
    """Register bora's float32-core SDPA with transformers (once; under a bora-specific name)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_FP32_SDPA, lambda *args, **kw: _sdpa_float32_core(*args, **kw))
    AttentionMaskInterface.register(_FP32_SDPA, sdpa_mask)


@contextlib.contextmanager
def _float32_attention(lm):
    """Within this context ``lm``'s SDPA attention runs its core in float32 (no-op for other attention)."""
    config = getattr(lm, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    _register_float32_attention()
    config._attn_implementation = _FP32_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Let freed blocks of any size stay in this process for reuse (glibc only; returns whether it applied).

    torch's CPU tensors come straight from ``malloc``, and glibc serves every block above its mmap threshold
    (at most 32 MB) with a fresh ``mmap``: each step of a fit then page-faults and zeroes its large
    temporaries (the LM head's ``[tokens x vocab]`` logits and their gradient, about 94 MB each on the embedded
    default) again, which showed up as a third of a fit's CPU time spent in the kernel. This sets
    ``mallopt(M_MMAP_MAX, 0)`` (no mmap'd blocks) and a 1 GiB trim threshold, for the whole process: memory
    that a step frees is reused by the next (the process's resident size stays at its peak). The ``bora``
    command calls it at start; library users may too. On the embedded default, a forward and backward pass
    of a 16-document batch took 691 ms instead of 809 ms (fp32) and 498 ms instead of 559-646 ms (bf16).
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
