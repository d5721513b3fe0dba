"""Frozen-prefix cache: run the frozen decoder layers below the first adapted layer once per document.

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> from bora.lora.prefix import FrozenPrefix
>>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
...                                   num_hidden_layers=4, num_attention_heads=4)).eval()
>>> prefix = FrozenPrefix(lm, first_layer=3)
>>> ids = torch.randint(0, 64, (2, 7)); mask = torch.ones_like(ids)
>>> hidden = prefix.compute(ids, mask)            # input of decoder layer 3, [2, 7, 32]
>>> with torch.no_grad():
...     full = lm(input_ids=ids, attention_mask=mask).logits
...     with prefix.resume(hidden):
...         fast = lm(input_ids=ids, attention_mask=mask).logits
>>> torch.allclose(full, fast, atol=1e-5)
True

When adapters sit only in the top layers, everything below them is a fixed function of the
document. :meth:`FrozenPrefix.compute` captures the hidden states entering the first adapted
layer (stopping the forward pass there); inside :meth:`FrozenPrefix.resume` the LM's lower
layers are swapped for pass-throughs and the cached states are injected at the first adapted
layer, so the usual ``lm(...)`` call computes only the top of the network. The mechanism uses
module hooks only, so it works for any architecture whose decoder blocks take the hidden states
as their first argument (Llama, GPT-2, OPT, ...); position embeddings, masks and the LM head are
computed by the model's own forward.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from ..core.device import autocast
from .inject import decoder_layers

__all__ = ["FrozenPrefix"]


class _Stop(Exception):
    pass


class _PassThrough(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _replace_hidden(args, kwargs, hidden):
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = hidden
    return args, kwargs


class FrozenPrefix:
    """Capture and re-inject the hidden states entering decoder layer ``first_layer`` (computed under
    ``autocast_dtype`` autocast when given, as the layers above run: :mod:`bora.core.device`)."""

    def __init__(self, lm: nn.Module, first_layer: int, *, autocast_dtype: Optional[torch.dtype] = None):
        self.lm = lm
        self.autocast_dtype = autocast_dtype
        _, self.layers = decoder_layers(lm)
        if not 0 < first_layer < len(self.layers):
            raise ValueError(f"first_layer must be in 1..{len(self.layers) - 1}, got {first_layer}")
        self.first_layer = first_layer

    @torch.no_grad()
    def compute(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states entering layer ``first_layer`` for a padded batch, ``[N, L, H]``."""
        captured = {}

        def hook(module, args, kwargs):
            captured["h"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        handle = self.layers[self.first_layer].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with autocast(input_ids.device, self.autocast_dtype, self.lm):
                self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured["h"].detach()

    @contextlib.contextmanager
    def resume(self, hidden: torch.Tensor) -> Iterator[None]:
        """Within this context the LM starts from ``hidden`` at layer ``first_layer``."""
        saved = [self.layers[i] for i in range(self.first_layer)]
        skip = _PassThrough()

        def hook(module, args, kwargs):
            if hidden.shape[:2] != (args[0] if args else kwargs["hidden_states"]).shape[:2]:
                raise ValueError("cached hidden states do not match the batch's shape")
            return _replace_hidden(args, kwargs, hidden.to((args[0] if args else kwargs["hidden_states"]).dtype))

        for i in range(self.first_layer):
            self.layers[i] = skip
        handle = self.layers[self.first_layer].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            for i, layer in enumerate(saved):
                self.layers[i] = layer
