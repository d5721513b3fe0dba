"""Save and load a fit as a folder of JSON and safetensors (no pickle: loading never runs code).

>>> from bora.io import save_fit, load_fit          # doctest: +SKIP
>>> save_fit(bora, "runs/demo")                     # doctest: +SKIP
>>> again = load_fit("runs/demo")                   # same per-task losses, exactly  # doctest: +SKIP

Layout of a fit folder::

    config.json        the full BoraConfig (base model reference, adapters, prior, fit, data)
    tasks.json         task names in model order, training documents and tokens per task
    guide.safetensors  every guide parameter (MAP point estimates or variational locs/scales)
    state.json         tau estimate, fit summary and training history
    metrics.json       evaluations written by the CLI (optional)

A save writes everything into a temporary sibling folder and renames it into place, so a crash
or kill never leaves a half-written fit (an older fit at the same path is replaced only after the
new one is complete).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import BoraConfig, ConfigError

__all__ = ["save_fit", "load_fit", "write_json", "read_json", "FORMAT_VERSION"]

FORMAT_VERSION = 1


def _clean(x: Any) -> Any:
    """JSON-safe copy: non-finite floats become strings ('inf', 'nan')."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if torch.is_tensor(x):
        return _clean(x.tolist())
    return x


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(obj), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"not a bora fit folder (missing {Path(path).name}): {Path(path).parent}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"corrupt {path}: {e}") from None


def replace_dir(tmp: Path, path: Path) -> None:
    """Move the complete folder ``tmp`` to ``path``; an older ``path`` is removed only afterwards."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_fit_files(path) -> tuple[BoraConfig, dict, dict, dict]:
    """``(config, tasks meta, state, guide tensors)`` of a fit folder, validated; runs no code."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"fit folder not found: {path}")
    try:
        config = BoraConfig.from_json((path / "config.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"not a bora fit folder (missing config.json): {path}") from None
    meta = read_json(path / "tasks.json")
    if meta.get("format") != FORMAT_VERSION:
        raise ConfigError(f"unsupported fit format {meta.get('format')!r} in {path}")
    if not (path / "guide.safetensors").exists():
        raise ConfigError(f"not a bora fit folder (missing guide.safetensors): {path}")
    state = read_json(path / "state.json") if (path / "state.json").exists() else {}
    return config, meta, state, load_file(str(path / "guide.safetensors"))


def save_fit(bora, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (tmp / "config.json").write_text(bora.config.to_json() + "\n")
        write_json(tmp / "tasks.json", {"format": FORMAT_VERSION, "tasks": list(bora.tasks),
                                        "num_docs": bora.num_docs, "task_sizes": bora.task_sizes})
        state = {k: v.detach().to("cpu").contiguous() for k, v in bora.guide.state_dict().items()}
        save_file(state, str(tmp / "guide.safetensors"), metadata={"format": str(FORMAT_VERSION)})
        write_json(tmp / "state.json", {"tau": bora.tau.as_dict() if bora.tau is not None else None,
                                        "result": bora.result.to_dict() if bora.result is not None else None})
        write_json(tmp / "metrics.json", bora.metrics)
        if getattr(bora, "laplace", None) is not None:
            write_laplace(bora.laplace, tmp / "laplace.safetensors")
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_fit(path, *, device=None, lm=None, tokenizer=None):
    from .api import Bora
    from .infer import FitResult

    path = Path(path)
    config, meta, st, state = read_fit_files(path)
    if lm is None or tokenizer is None:
        from .base import load_base_model

        lm, tokenizer = load_base_model(config.model)
    bora = Bora(config, lm, tokenizer, meta["tasks"], meta["num_docs"], device=device,
                task_sizes=meta.get("task_sizes"))
    state = {k: v.to(bora.device) for k, v in state.items()}
    missing, unexpected = bora.guide.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"guide parameters in {path} do not match the config "
                          f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    if bora.tau is not None and st.get("tau"):
        bora.tau.load_(st["tau"])
    if st.get("result"):
        r = st["result"]
        bora.result = FitResult(**{k: (float(v) if v in ("nan", "inf", "-inf") else v) for k, v in r.items()})
    if (path / "metrics.json").exists():
        bora.metrics = read_json(path / "metrics.json")
    if (path / "laplace.safetensors").exists():
        bora.laplace = read_laplace(path / "laplace.safetensors")
    return bora


def write_laplace(laplace, path: Path) -> None:
    """Write a Laplace posterior atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(laplace.tensors(), tmp,
                  metadata={"format": str(FORMAT_VERSION), "laplace": json.dumps(_clean(laplace.metadata()))})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_laplace(path: Path):
    """The :class:`~bora.laplace.HierarchicalLaplace` saved in ``path`` (safetensors + JSON metadata)."""
    from safetensors import safe_open

    from .laplace import HierarchicalLaplace

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["laplace"])
        meta["tau"] = {k: float(v) for k, v in meta["tau"].items()}
        return HierarchicalLaplace.from_saved(load_file(str(path)), meta)
    except (KeyError, ValueError, OSError) as e:
        raise ConfigError(f"corrupt Laplace posterior {path}: {e}") from None
