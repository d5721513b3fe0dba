"""Find target modules in a transformers causal LM and wrap them with :class:`~bora.lora.layers.MultiTaskLoRA`.

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> from bora.core.config import AdapterConfig
>>> from bora.lora.inject import inject_adapters_
>>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
...                                   num_hidden_layers=4, num_attention_heads=4))
>>> adapters = inject_adapters_(lm, AdapterConfig(rank=2, targets=("q_proj", "v_proj"), layers=(-1,)))
>>> list(adapters.keys())
['model_layers_3_self_attn_q_proj', 'model_layers_3_self_attn_v_proj']
>>> adapters.first_layer      # lowest adapted decoder layer (layers below it are frozen)
3

Injection replaces each matching module in place by a wrapper that holds (never copies) the
frozen original; :func:`remove_adapters_` puts the originals back. Every base parameter has
``requires_grad=False``. Layer indices are read from module names (``...layers.<i>...`` /
``...h.<i>...``), negative indices count from the top.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections import OrderedDict
from typing import Callable, Iterator, Mapping, Optional

import torch
from torch import nn

from ..core.config import AdapterConfig, ConfigError
from .layers import MultiTaskLoRA, is_adaptable

__all__ = ["AdapterSet", "inject_adapters_", "remove_adapters_", "decoder_layers", "num_layers"]

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def num_layers(lm: nn.Module) -> int:
    cfg = getattr(lm, "config", None)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    if n is None:
        layers = decoder_layers(lm)
        n = len(layers)
    return int(n)


def decoder_layers(lm: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of decoder blocks (``model.layers``, ``transformer.h``, ``model.decoder.layers``)."""
    n = getattr(getattr(lm, "config", None), "num_hidden_layers", None)
    best = None
    for name, mod in lm.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            if best is None or len(name) < len(best[0]):
                best = (name, mod)
    if best is None:
        raise ConfigError("could not find the decoder layers of this model")
    return best


def _matches(name: str, patterns) -> bool:
    for p in patterns:
        if name == p or name.endswith("." + p):
            return True
        try:
            if re.fullmatch(p, name):
                return True
        except re.error:
            pass
    return False


def _layer_index(name: str, layers_prefix: str) -> Optional[int]:
    if not name.startswith(layers_prefix + "."):
        return None
    m = _LAYER_INDEX.search(name[len(layers_prefix):])
    return int(m.group(1)) if m else None


def _key(name: str) -> str:
    return name.replace(".", "_")


class AdapterSet:
    """The injected layers of one model, keyed by a site-safe name (dots replaced by ``_``)."""

    def __init__(self, lm: nn.Module, layers: "OrderedDict[str, MultiTaskLoRA]", names: dict, indices: dict,
                 config: AdapterConfig):
        self.lm = lm
        self.layers = layers
        self.names = names  # key -> module name in the LM
        self.indices = indices  # key -> decoder layer index (or None)
        self.config = config

    def keys(self):
        return self.layers.keys()

    def items(self):
        return self.layers.items()

    def __len__(self):
        return len(self.layers)

    def shapes(self) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
        """``key -> ((r, in), (out, r))``: the shapes of A and B."""
        r = self.config.rank
        return {k: ((r, layer.in_features), (layer.out_features, r)) for k, layer in self.layers.items()}

    def num_parameters(self) -> int:
        return sum(a[0] * a[1] + b[0] * b[1] for a, b in self.shapes().values())

    @property
    def first_layer(self) -> Optional[int]:
        idx = [i for i in self.indices.values()]
        if not idx or any(i is None for i in idx):
            return None
        return min(idx)

    def set_(self, params: Mapping[str, tuple[torch.Tensor, torch.Tensor]], task_ids: Optional[torch.Tensor]) -> None:
        for k, layer in self.layers.items():
            A, B = params[k]
            layer.set_adapter_(A, B, task_ids)

    def clear_(self) -> None:
        for layer in self.layers.values():
            layer.clear_adapter_()

    @contextlib.contextmanager
    def use(self, params: Optional[Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
            task_ids: Optional[torch.Tensor] = None) -> Iterator[None]:
        """Context in which the LM runs with ``params`` (``None``: the base model)."""
        if params is None:
            self.clear_()
        else:
            self.set_(params, task_ids)
        try:
            yield
        finally:
            self.clear_()

    @contextlib.contextmanager
    def record_task_grads(self, sink: Callable[[str, int, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
        """While active, backward passes through the adapters call ``sink(key, factor, grad, task_ids)``
        with every example's gradient of its task's adapter factor (0: ``A_t [N, r, in]``, 1: ``B_t
        [N, out, r]``; only task-level factors, i.e. 3-D ones)."""
        for k, layer in self.layers.items():
            layer.grad_sink = functools.partial(sink, k)
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.grad_sink = None

    def train(self, mode: bool = True) -> None:
        """Adapter dropout on/off (the base model always stays in eval mode)."""
        for layer in self.layers.values():
            layer.dropout.train(mode)


def inject_adapters_(lm: nn.Module, config: AdapterConfig) -> AdapterSet:
    """Wrap every module of ``lm`` matching ``config.targets`` (and ``config.layers``) in place."""
    for p in lm.parameters():
        p.requires_grad_(False)
    lm.eval()
    layers_name, _ = decoder_layers(lm)
    n = num_layers(lm)
    wanted = None
    if config.layers is not None:
        wanted = set()
        for i in config.layers:
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise ConfigError(f"layer index {i} is out of range for a model with {n} layers")
            wanted.add(j)
    found: "OrderedDict[str, MultiTaskLoRA]" = OrderedDict()
    names, indices = {}, {}
    for name, module in list(lm.named_modules()):
        if isinstance(module, MultiTaskLoRA):
            raise ConfigError("this model already has bora adapters; call remove_adapters_ first")
        if not _matches(name, config.targets) or not is_adaptable(module):
            continue
        idx = _layer_index(name, layers_name)
        if wanted is not None and idx not in wanted:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = lm.get_submodule(parent_name) if parent_name else lm
        wrapper = MultiTaskLoRA(module, config)
        setattr(parent, child, wrapper)
        k = _key(name)
        found[k], names[k], indices[k] = wrapper, name, idx
    if not found:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if is_adaptable(m)})
        raise ConfigError(f"no module matches targets {list(config.targets)} (layers {config.layers}); "
                          f"adaptable module names include {linear[:12]}")
    return AdapterSet(lm, found, names, indices, config)


def remove_adapters_(adapters: AdapterSet) -> nn.Module:
    """Put the original base layers back; returns the LM."""
    for k, layer in adapters.items():
        name = adapters.names[k]
        parent_name, _, child = name.rpartition(".")
        parent = adapters.lm.get_submodule(parent_name) if parent_name else adapters.lm
        setattr(parent, child, layer.base)
    return adapters.lm

