"""Export fitted adapters as PEFT LoRA adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``).

>>> import torch
>>> from bora.io.export import peft_state_dict
>>> A, B = torch.zeros(2, 8), torch.zeros(6, 2)
>>> sorted(peft_state_dict({"model_layers_0_q": (A, B)}, {"model_layers_0_q": "model.layers.0.q"}))
['base_model.model.model.layers.0.q.lora_A.weight', 'base_model.model.model.layers.0.q.lora_B.weight']

With a fit in memory (or ``Bora.load(fit_dir)``; ``bora`` is anything with the attributes of :class:`ExportSource`,
and :func:`write_peft_adapter` needs only those of :class:`PeftSource`: a :class:`bora.api.Bora` has them)::

    export_adapters(bora, "out/spk0", task="spk0")               # posterior mean (MAP for a MAP fit)
    export_adapters(bora, "out/glob", global_adapter=True)       # the global adapter Theta
    export_adapters(bora, "out/all", all_tasks=True)              # one folder per task (+ "_global")
    export_adapters(bora, "out/s3", task="spk0", estimate="sample", sample_index=3, seed=0)

and then, on the same base model (without bora's adapters)::

    from peft import PeftModel
    peft_lm = PeftModel.from_pretrained(base_lm, "out/spk0")      # logits equal bora's for spk0

PEFT's LoRA computes ``base(x) + lora_alpha / r * lora_B(lora_A(x))`` with ``lora_A.weight`` ``[r, in]``
and ``lora_B.weight`` ``[out, r]``: exactly bora's ``scale * x A^T B^T`` with ``scale = alpha / rank``, so
the factors are written unchanged. ``target_modules`` lists the exact module names; GPT-2 style
``Conv1D`` layers get ``fan_in_fan_out=True``. Estimates: ``mean`` and ``map`` are the guide's point
estimate (for AutoNormal the location, which is the mean, median and mode of each entry; for
AutoDelta the MAP value); ``sample`` is posterior sample ``sample_index`` drawn exactly as
:class:`bora.posterior.samples.Posterior` draws it for ``seed``. Every folder is written into a
temporary sibling and renamed into place (an existing folder is replaced only when the new one is
complete). An existing single-export folder is replaced only if it is an earlier bora export; an
``all_tasks`` export into an existing folder of bora exports adds or replaces only its own
sub-folders (and merges ``index.json``); a folder holding anything bora did not write is refused
(:func:`bora.core.files.check_output`). peft itself is not needed to export.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Protocol

import torch

from ..core.config import BoraConfig, ConfigError
from ..core.files import check_output, folder_kind, make_temp_dir, replace_dir, save_safetensors, write_json
from ..lora.layers import is_conv1d
from ..posterior.samples import Posterior, PosteriorSource

if TYPE_CHECKING:
    from ..lora.inject import AdapterSet

__all__ = ["PeftSource", "ExportSource", "peft_state_dict", "peft_config", "write_peft_adapter", "adapter_estimate",
           "export_adapters", "ESTIMATES"]

ESTIMATES = ("mean", "map", "sample")


class PeftSource(Protocol):
    """What :func:`peft_config` and :func:`write_peft_adapter` read of a fit: its adapter settings and layers."""

    config: BoraConfig
    adapters: AdapterSet


class ExportSource(PeftSource, PosteriorSource, Protocol):
    """What :func:`adapter_estimate` and :func:`export_adapters` read of a fit: its adapters, and what a
    :class:`~bora.posterior.samples.Posterior` reads (for ``estimate="sample"``); a :class:`bora.api.Bora` has it
    all."""


def peft_state_dict(adapter: Mapping[str, tuple[torch.Tensor, torch.Tensor]], names: Mapping[str, str]) -> dict:
    """PEFT's tensor names for ``key -> (A [r, in], B [out, r])``: ``base_model.model.<module>.lora_{A,B}.weight``."""
    out = {}
    for k, (A, B) in adapter.items():
        if A.dim() != 2 or B.dim() != 2:
            raise ValueError(f"adapter {k}: expected 2-D factors, got {tuple(A.shape)} / {tuple(B.shape)}")
        prefix = f"base_model.model.{names[k]}"
        out[f"{prefix}.lora_A.weight"] = A.detach().to("cpu", torch.float32).contiguous()
        out[f"{prefix}.lora_B.weight"] = B.detach().to("cpu", torch.float32).contiguous()
    return out


def _base_path(name: str) -> str:
    from ..lora.base import EMBEDDED, cache_dir

    return str(cache_dir() / EMBEDDED[name][2]) if name in EMBEDDED else name


def peft_config(bora: PeftSource, keys=None) -> dict:
    """The ``adapter_config.json`` content for ``bora``'s adapters (the fields PEFT's ``LoraConfig`` reads)."""
    keys = list(bora.adapters.keys()) if keys is None else list(keys)
    cfg = bora.config.adapter
    conv = [is_conv1d(bora.adapters.layers[k].base) for k in keys]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        # the embedded model's converted folder, so AutoPeftModelForCausalLM can find the base
        "base_model_name_or_path": _base_path(bora.config.model),
        "r": int(cfg.rank),
        "lora_alpha": float(cfg.alpha),
        "lora_dropout": float(cfg.dropout),
        "target_modules": sorted(bora.adapters.names[k] for k in keys),
        "fan_in_fan_out": bool(conv) and all(conv),
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def check_export_output(path, *, all_tasks: bool = False) -> str:
    """ConfigError unless ``path`` is new, empty, or bora's own export output of the same kind."""
    return check_output(Path(path), "export-all" if all_tasks else "export")


def _write_into(folder: Path, bora: PeftSource, adapter, info: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(peft_config(bora, adapter.keys()), indent=2,
                                                           sort_keys=True) + "\n")
    save_safetensors(peft_state_dict(adapter, bora.adapters.names), folder / "adapter_model.safetensors",
                     metadata={"format": "pt"})
    (folder / "bora_export.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def _write_folder(bora: PeftSource, adapter, path: Path, info: dict) -> None:
    tmp = make_temp_dir(path.parent, f".{path.name}.tmp-")
    try:
        _write_into(tmp, bora, adapter, info)
        replace_dir(tmp, path, "export")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_peft_adapter(bora: PeftSource, adapter: Mapping[str, tuple[torch.Tensor, torch.Tensor]], path, *,
                       info: Optional[dict] = None) -> Path:
    """Write one 2-D adapter ``key -> (A, B)`` (e.g. from :func:`bora.fit.newtask.fit_new_task`) as a PEFT folder."""
    path = Path(path)
    check_output(path, "export")
    _write_folder(bora, adapter, path, dict(info or {}))
    return path


def _values(bora: ExportSource, estimate: str, sample_index: int, seed: int) -> dict:
    if estimate not in ESTIMATES:
        raise ConfigError(f"estimate must be one of {ESTIMATES}, got {estimate!r}")
    if estimate == "sample":
        if not isinstance(sample_index, int) or sample_index < 0:
            raise ConfigError(f"sample_index must be a non-negative integer, got {sample_index!r}")
        return Posterior(bora, sample_index + 1, seed=seed).values(sample_index)
    return bora.point()


def adapter_estimate(bora: ExportSource, *, task: Optional[str] = None, global_adapter: bool = False,
                     estimate: str = "mean", sample_index: int = 0, seed: int = 0,
                     values: Optional[dict] = None) -> dict:
    """The 2-D adapter ``key -> (A [r, in], B [out, r])`` of ``task`` (or the global adapter)."""
    model = bora.model
    vals = values if values is not None else _values(bora, estimate, sample_index, seed)
    if global_adapter:
        glob = model.global_from_values(vals)
        if glob is None:
            raise ConfigError("tau_mode='uncoupled' has no global adapter to export")
        return {k: (A, B) for k, (A, B) in glob.items()}
    if task not in bora.tasks:
        raise ConfigError(f"task {task!r} is not in this fit (tasks: {', '.join(bora.tasks[:8])}"
                          f"{', ...' if len(bora.tasks) > 8 else ''}); --global exports the global adapter")
    t = bora.tasks.index(task)
    return {k: (A[t] if A.dim() == 3 else A, B[t] if B.dim() == 3 else B)
            for k, (A, B) in model.params_from_values(vals).items()}


def _folder_name(name: str, used: set) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "task"
    out, i = base, 1
    while out in used:
        i += 1
        out = f"{base}-{i}"
    used.add(out)
    return out


def export_adapters(bora: ExportSource, path, *, task: Optional[str] = None, global_adapter: bool = False,
                    all_tasks: bool = False, estimate: str = "mean", sample_index: int = 0, seed: int = 0,
                    source: Optional[str] = None) -> dict:
    """Write PEFT adapter folder(s) to ``path``; returns ``{name: folder}``.

    Exactly one of ``task``, ``global_adapter``, ``all_tasks``. ``all_tasks`` writes ``path/<task>/``
    for every task (names made filesystem-safe), ``path/_global/`` when the prior has a global
    adapter, and ``path/index.json`` mapping task names to folders."""
    if sum([task is not None, bool(global_adapter), bool(all_tasks)]) != 1:
        raise ConfigError("export needs exactly one of --task NAME, --global, --all")
    vals = _values(bora, estimate, sample_index, seed)
    info = {"fit": source, "estimate": estimate, "model": bora.config.model, "guide": bora.config.fit.guide,
            "tau_mode": bora.config.prior.tau_mode}
    if estimate == "sample":
        info.update(sample_index=sample_index, seed=seed)
    path = Path(path)
    if not all_tasks:
        adapter = adapter_estimate(bora, task=task, global_adapter=global_adapter, values=vals)
        name = "_global" if global_adapter else task
        write_peft_adapter(bora, adapter, path, info={**info, "task": None if global_adapter else task,
                                                      "global": bool(global_adapter)})
        return {name: path}
    kind = check_output(path, "export-all")
    used = {"_global"}
    index = {t: _folder_name(t, used) for t in bora.tasks}
    glob = "_global" if bora.model.has_global else None
    adapters = {folder: (adapter_estimate(bora, task=t, values=vals), {**info, "task": t, "global": False})
                for t, folder in index.items()}
    if glob:
        adapters[glob] = (adapter_estimate(bora, global_adapter=True, values=vals),
                          {**info, "task": None, "global": True})
    if kind in ("missing", "empty"):  # one new folder: write it whole, then rename it into place
        tmp = make_temp_dir(path.parent, f".{path.name}.tmp-")
        try:
            for folder, (adapter, meta) in adapters.items():
                _write_into(tmp / folder, bora, adapter, meta)
            write_json(tmp / "index.json", {"tasks": index, "global": glob, **info})
            replace_dir(tmp, path, "export-all")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    else:  # a folder of earlier exports: add or replace this fit's sub-folders only
        for folder in adapters:
            if folder_kind(path / folder) not in ("missing", "empty", "export"):
                check_output(path / folder, "export")
        for folder, (adapter, meta) in adapters.items():
            _write_folder(bora, adapter, path / folder, meta)
        old = {}
        if (path / "index.json").exists():
            try:
                old = json.loads((path / "index.json").read_text())
            except (ValueError, OSError):
                old = {}
        tasks = {**(old.get("tasks") or {} if isinstance(old, dict) else {}), **index}
        write_json(path / "index.json", {"tasks": tasks, "global": glob or (old.get("global") if isinstance(old, dict)
                                                                             else None), **info})
    out = {t: path / f for t, f in index.items()}
    if glob:
        out["_global"] = path / glob
    return out
