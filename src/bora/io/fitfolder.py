"""A fit as a folder of JSON and safetensors (no pickle: loading never runs code).

>>> from bora.io.fitfolder import FORMAT_VERSION, config_sha256
>>> from bora.core.config import BoraConfig
>>> FORMAT_VERSION, len(config_sha256(BoraConfig()))    # the checksum of the adapter, prior and fit settings
(1, 64)

From a fit in memory (``Bora.save`` / ``Bora.load`` call these)::

    save_fit(bora, "runs/demo")                           # atomically, into a temporary sibling first
    config, meta, state, tensors = read_fit_files("runs/demo")   # validated; runs no code

``bora`` is anything with the attributes of :class:`FitFolderSource` (:class:`BaseModelSource` for the base-model
checks); a :class:`bora.api.Bora` has them.

Layout of a fit folder::

    config.json        the full BoraConfig (base model reference, adapters, prior, fit, data)
    tasks.json         format version, task names in model order, training documents and tokens per
                       task, the base model's fingerprint and checksums of the guide and the config
    guide.safetensors  every guide parameter (MAP point estimates or variational locs/scales)
    state.json         tau estimate, fit summary and training history
    metrics.json       evaluations written by the CLI (optional)
    estimates.safetensors  the point estimate of every adapter and tau site in natural coordinates
                       (read by warm starts, whatever the guide)
    laplace.safetensors  the Laplace posterior's curvature (optional; `bora fit --guide laplace` or `bora laplace`)
    checkpoints/       while a fit runs (or after it was interrupted): see :mod:`bora.io.checkpoint`
    report/            written by ``bora report`` (optional)

A save writes everything into a temporary sibling folder and renames it into place
(:func:`bora.core.files.replace_dir`), so a crash or kill never leaves a half-written fit (an older fit at
the same path is replaced only after the new one is complete); a folder holding anything bora did
not write is refused (:func:`bora.core.files.check_output`). Loading (:meth:`bora.api.Bora.load`: build the
model, then :func:`restore_fit_`) reads JSON and safetensors only, verifies the checksums (a corrupt
or truncated ``guide.safetensors``, an edited adapter/prior/fit section of ``config.json``) and the
base model's fingerprint (its name is free to change, e.g. a moved folder, but its configuration and
the weights of every adapted module must be the same); the ``data`` section of ``config.json`` may be
edited (e.g. to point at a local copy of the documents).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Protocol, Union

import torch

from ..core.config import BoraConfig, ConfigError
from ..model.distributions import natural_site
from ..core.files import (check_output, file_sha256, fsync_tree, json_safe, make_temp_dir, read_json, read_safetensors,
                 replace_dir, save_safetensors, write_json)

if TYPE_CHECKING:
    from ..fit.loop import FitResult
    from ..fit.tau import EmpiricalBayesTau
    from ..lora.inject import AdapterSet
    from ..model.guides import AutoDelta, AutoNormal
    from ..posterior.laplace import HierarchicalLaplace

__all__ = ["BaseModelSource", "FitFolderSource", "FORMAT_VERSION", "save_fit", "read_fit_files", "restore_fit_",
           "base_fingerprint", "config_sha256", "check_base", "check_finite", "natural_estimates", "write_laplace",
           "read_laplace"]

FORMAT_VERSION = 1


class BaseModelSource(Protocol):
    """What :func:`base_fingerprint` and :func:`check_base` read of a fit: its base model and adapters."""

    config: BoraConfig
    lm: torch.nn.Module
    adapters: AdapterSet


class FitFolderSource(BaseModelSource, Protocol):
    """What :func:`save_fit` reads of a fit and :func:`restore_fit_` sets (``result``, ``metrics``, ``laplace``, the
    guide's parameters, tau); a :class:`bora.api.Bora` has it all."""

    device: torch.device
    tasks: tuple[str, ...]
    num_docs: int
    task_sizes: Optional[list[int]]
    guide: Union[AutoDelta, AutoNormal]
    tau: Optional[EmpiricalBayesTau]
    result: Optional[FitResult]
    metrics: dict
    laplace: Optional[HierarchicalLaplace]

    def point(self) -> dict[str, torch.Tensor]: ...


# ---------------------------------------------------------------- base model fingerprint

_VOLATILE = {"architectures", "dtype", "torch_dtype", "transformers_version", "use_cache", "return_dict",
             "output_attentions", "output_hidden_states"}


def base_fingerprint(bora: BaseModelSource) -> dict:
    """``{"name", "config_sha256", "weights_sha256"}`` of the base model: its configuration (without
    paths, versions and runtime flags) and the weights of every adapted module."""
    cfg = getattr(bora.lm, "config", None)
    d = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else {}
    d = {k: v for k, v in d.items() if not k.startswith("_") and k not in _VOLATILE}
    h = hashlib.sha256()
    for k in sorted(bora.adapters.keys()):
        h.update(k.encode())
        for name, p in sorted(bora.adapters.layers[k].base.named_parameters()):
            t = p.detach().to("cpu", torch.float32).contiguous()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
    return {"name": bora.config.model,
            "config_sha256": hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest(),
            "weights_sha256": h.hexdigest()}


def config_sha256(config) -> str:
    """Checksum of the sections that define the fitted parameters (adapter, prior, fit), of a
    :class:`~bora.core.config.BoraConfig` or of a config as stored (a JSON dict: settings added to bora later, absent
    from an older file, then do not change its checksum)."""
    d = config.to_dict() if isinstance(config, BoraConfig) else config
    return hashlib.sha256(json.dumps({k: d[k] for k in ("adapter", "prior", "fit")}, sort_keys=True).encode()
                          ).hexdigest()


def check_base(bora: BaseModelSource, meta: dict, path) -> None:
    """ConfigError unless ``bora``'s base model has the fingerprint recorded in ``meta``."""
    want = meta.get("base_model")
    if not want:
        return  # a fit saved before fingerprints were recorded
    have = base_fingerprint(bora)
    for key, what in (("config_sha256", "configuration"), ("weights_sha256", "weights of the adapted modules")):
        if want.get(key) != have[key]:
            raise ConfigError(f"base model {bora.config.model!r} does not match the fit in {path}: its {what} "
                              f"differ from those of the model it was fitted on ({want.get('name')!r})")


# ---------------------------------------------------------------- fit folders

def _check_meta(meta, path: Path) -> dict:
    if not isinstance(meta, dict):
        raise ConfigError(f"corrupt {path / 'tasks.json'}: expected a JSON object")
    if meta.get("format") != FORMAT_VERSION:
        raise ConfigError(f"{path} was written by another bora format version ({meta.get('format')!r}; "
                          f"this bora reads format {FORMAT_VERSION})")
    tasks, n = meta.get("tasks"), meta.get("num_docs")
    if (not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks)
            or len(set(tasks)) != len(tasks)):
        raise ConfigError(f"corrupt {path / 'tasks.json'}: 'tasks' must be a list of distinct task names")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"corrupt {path / 'tasks.json'}: 'num_docs' must be a positive integer")
    sizes = meta.get("task_sizes")
    if sizes is not None and (not isinstance(sizes, list) or len(sizes) != len(tasks)
                              or not all(isinstance(s, int) and s >= 0 for s in sizes)):
        raise ConfigError(f"corrupt {path / 'tasks.json'}: 'task_sizes' must list one count per task")
    return meta


def read_fit_files(path) -> tuple[BoraConfig, dict, dict, dict]:
    """``(config, tasks meta, state, guide tensors)`` of a fit folder, validated; runs no code."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"fit folder not found: {path}" if not path.exists() else f"not a folder: {path}")
    if not (path / "tasks.json").exists() and (path / "checkpoints").is_dir():
        raise ConfigError(f"{path} holds an interrupted fit, not a finished one: continue it with "
                          f"'bora fit --resume {path}'")
    try:
        text = (path / "config.json").read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"not a bora fit folder (missing config.json): {path}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"cannot read {path / 'config.json'}: {e}") from None
    config = BoraConfig.from_json(text)
    meta = _check_meta(read_json(path / "tasks.json"), path)
    guide_file = path / "guide.safetensors"
    if not guide_file.exists():
        raise ConfigError(f"not a bora fit folder (missing guide.safetensors): {path}")
    sums = meta.get("checksums") or {}
    if sums.get("config") and sums["config"] != config_sha256(json.loads(text)):
        raise ConfigError(f"{path / 'config.json'} was edited after the fit was saved (its adapter, prior or fit "
                          "settings no longer match the fitted parameters)")
    if sums.get("guide.safetensors") and sums["guide.safetensors"] != file_sha256(guide_file):
        raise ConfigError(f"corrupt or truncated {guide_file}: checksum mismatch")
    state = read_json(path / "state.json") if (path / "state.json").exists() else {}
    if not isinstance(state, dict):
        raise ConfigError(f"corrupt {path / 'state.json'}: expected a JSON object")
    tensors = read_safetensors(guide_file)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ConfigError(f"{guide_file} holds non-finite values (in {bad[0]})")
    return config, meta, state, tensors


def check_finite(bora: FitFolderSource) -> None:
    bad = [k for k, v in bora.guide.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ConfigError(f"refusing to save a fit with non-finite parameters (in {bad[0]})")


def natural_estimates(bora: FitFolderSource) -> dict[str, torch.Tensor]:
    """The point estimate of every adapter and tau site in natural coordinates (what a fit folder stores)."""
    natural = ("Theta_A", "Theta_B", "theta_A", "theta_B", "tau")
    return {k: v.detach().to("cpu").contiguous() for k, v in bora.point().items()
            if natural_site(k)[1] is None and k.partition(":")[0] in natural}


def save_fit(bora: FitFolderSource, path) -> Path:
    """Write ``bora`` to the folder ``path`` atomically. An existing ``path`` is replaced only if it is
    a bora fit (or empty); a folder holding anything else is refused with a ConfigError."""
    path = Path(path)
    check_output(path, "fit")
    check_finite(bora)
    tmp = make_temp_dir(path.parent, f".{path.name}.tmp-")
    try:
        (tmp / "config.json").write_text(bora.config.to_json() + "\n")
        state = {k: v.detach().to("cpu").contiguous() for k, v in bora.guide.state_dict().items()}
        save_safetensors(state, tmp / "guide.safetensors", metadata={"format": str(FORMAT_VERSION)})
        write_json(tmp / "state.json", {"tau": bora.tau.as_dict() if bora.tau is not None else None,
                                        "tau_hyper": (bora.tau.hyper_dict() or None) if bora.tau is not None else None,
                                        "result": bora.result.to_dict() if bora.result is not None else None})
        write_json(tmp / "metrics.json", bora.metrics)
        save_safetensors(natural_estimates(bora), tmp / "estimates.safetensors",
                         metadata={"format": str(FORMAT_VERSION)})
        if getattr(bora, "laplace", None) is not None:
            write_laplace(bora.laplace, tmp / "laplace.safetensors")
        # tasks.json (the marker of a complete fit) last
        write_json(tmp / "tasks.json", {"format": FORMAT_VERSION, "tasks": list(bora.tasks),
                                        "num_docs": bora.num_docs, "task_sizes": bora.task_sizes,
                                        "base_model": base_fingerprint(bora),
                                        "checksums": {"guide.safetensors": file_sha256(tmp / "guide.safetensors"),
                                                      "config": config_sha256(bora.config)}})
        fsync_tree(tmp)
        replace_dir(tmp, path, "fit")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _result(r: dict, path: Path):
    import dataclasses

    from ..fit.loop import FitResult

    names = {f.name for f in dataclasses.fields(FitResult)}
    if not isinstance(r, dict) or set(r) - names:
        raise ConfigError(f"corrupt {path / 'state.json'}: unexpected fit summary")
    return FitResult(**{k: (float(v) if v in ("nan", "inf", "-inf") else v) for k, v in r.items()})


def restore_fit_(bora: FitFolderSource, path, meta: dict, state: dict, tensors: dict) -> None:
    """Set a freshly built ``bora`` to the fit read from folder ``path`` by :func:`read_fit_files`
    (``meta``, ``state``, guide ``tensors``): base-model check, guide parameters, tau, fit summary,
    metrics and the Laplace posterior. Reads JSON and safetensors only."""
    path = Path(path)
    check_base(bora, meta, path)
    tensors = {k: v.to(bora.device) for k, v in tensors.items()}
    try:
        missing, unexpected = bora.guide.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        raise ConfigError(f"guide parameters in {path} do not match the config: "
                          f"{str(e).strip().splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise ConfigError(f"guide parameters in {path} do not match the config "
                          f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    if bora.tau is not None and state.get("tau"):
        try:
            bora.tau.load_(state["tau"], state.get("tau_hyper"))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ConfigError(f"corrupt {path / 'state.json'}: bad tau estimate") from None
    if state.get("result"):
        bora.result = _result(state["result"], path)
    if (path / "metrics.json").exists():
        bora.metrics = read_json(path / "metrics.json")
    if (path / "laplace.safetensors").exists():
        bora.laplace = read_laplace(path / "laplace.safetensors")


def write_laplace(laplace, path: Path) -> None:
    """Write a Laplace posterior atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_safetensors(laplace.tensors(), Path(tmp),
                         metadata={"format": str(FORMAT_VERSION), "laplace": json.dumps(json_safe(laplace.metadata()))})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_laplace(path: Path):
    """The :class:`~bora.posterior.laplace.HierarchicalLaplace` saved in ``path`` (safetensors + JSON metadata)."""
    from safetensors import safe_open

    from ..posterior.laplace import HierarchicalLaplace

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["laplace"])
        meta["tau"] = {k: [float(x) for x in v] if isinstance(v, list) else float(v) for k, v in meta["tau"].items()}
        return HierarchicalLaplace.from_saved(read_safetensors(path), meta)
    except (KeyError, ValueError, OSError) as e:
        raise ConfigError(f"corrupt Laplace posterior {path}: {e}") from None
