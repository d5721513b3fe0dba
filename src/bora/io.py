"""Save and load a fit as a folder of JSON and safetensors (no pickle: loading never runs code).

>>> from bora.io import save_fit, load_fit          # doctest: +SKIP
>>> save_fit(bora, "runs/demo")                     # doctest: +SKIP
>>> again = load_fit("runs/demo")                   # same per-task losses, exactly  # doctest: +SKIP

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
    checkpoints/       while a fit runs (or after it was interrupted): see :mod:`bora.checkpoint`
    report/            written by ``bora report`` (optional)

A save writes everything into a temporary sibling folder and renames it into place, so a crash
or kill never leaves a half-written fit (an older fit at the same path is replaced only after the
new one is complete). Bora only ever replaces or deletes folders it wrote itself: a folder holding
anything else is refused (:func:`check_output`). Loading reads JSON and safetensors only, verifies
the checksums (a corrupt or truncated ``guide.safetensors``, an edited adapter/prior/fit section of
``config.json``) and the base model's fingerprint (its name is free to change, e.g. a moved folder,
but its configuration and the weights of every adapted module must be the same); the ``data``
section of ``config.json`` may be edited (e.g. to point at a local copy of the documents).
New folders and files get the permissions the user's umask gives (like ``mkdir`` and ``touch``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from .config import BoraConfig, ConfigError

__all__ = ["save_fit", "load_fit", "write_json", "read_json", "FORMAT_VERSION", "check_output",
           "folder_kind", "replace_dir", "make_temp_dir", "base_fingerprint", "read_safetensors",
           "save_safetensors"]

FORMAT_VERSION = 1

# What bora writes, per kind of output folder: entry name patterns -> None (a file) or the kind of
# a sub-folder. A folder is bora's (and may be replaced) only if every entry matches.
FIT_ENTRIES = {"config.json": None, "tasks.json": None, "guide.safetensors": None, "state.json": None,
               "metrics.json": None, "laplace.safetensors": None,
               "estimates.safetensors": None, "checkpoints": "checkpoints", "report": "report"}
EXPORT_ENTRIES = {"adapter_config.json": None, "adapter_model.safetensors": None, "bora_export.json": None}
REPORT_ENTRIES = {"index.md": None, "summary.md": None, "summary.csv": None, "diagnostics.nc": None,
                  "report.json": None, "*.png": None}
CHECKPOINT_ENTRIES = {"LATEST": None, "step-*": "checkpoint-step"}
CHECKPOINT_STEP_ENTRIES = {"run.json": None, "config.json": None, "state.safetensors": None}
_SPECS = {"fit": FIT_ENTRIES, "export": EXPORT_ENTRIES, "report": REPORT_ENTRIES,
          "checkpoints": CHECKPOINT_ENTRIES, "checkpoint-step": CHECKPOINT_STEP_ENTRIES}
_MARKERS = {"fit": ("tasks.json", "checkpoints"), "export": ("bora_export.json",), "report": ("report.json",)}


# ---------------------------------------------------------------- permissions and atomic writes

def umask() -> int:
    """The process's umask (read without changing it, where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """``mkdtemp`` in ``parent`` with the mode ``mkdir`` would give (``mkdtemp`` alone gives 0700)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def fsync_path(path: Path) -> None:
    """Flush a file or a folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync folders
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path``, then the folders (deepest first)."""
    path = Path(path)
    dirs = []
    for root, _, files in os.walk(path):
        dirs.append(root)
        for name in files:
            fsync_path(Path(root) / name)
    for d in reversed(dirs):
        fsync_path(Path(d))


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


def write_json(path: Path, obj: Any, *, fsync: bool = False, clean: bool = True) -> None:
    """Write JSON atomically (temp file in the same folder, then rename), with the umask's mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(obj) if clean else obj, f, indent=2, sort_keys=True, allow_nan=not clean)
            f.write("\n")
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_path(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"not a bora fit folder (missing {Path(path).name}): {Path(path).parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"corrupt {path}: {e}") from None
    except (IsADirectoryError, PermissionError) as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None


def save_safetensors(tensors: dict, path: Path, metadata: Optional[dict] = None) -> None:
    """``safetensors.torch.save_file`` with the umask's file mode (it creates files 0600)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~umask())


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (never unpickles); a corrupt or truncated file is a ConfigError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise ConfigError(f"missing {path}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).strip().splitlines()
        raise ConfigError(f"corrupt or truncated {path}: {msg[0] if msg else type(e).__name__}") from None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- what bora wrote

def _matches(name: str, spec: dict) -> Optional[str]:
    """The spec pattern ``name`` matches (None if none)."""
    for pat in spec:
        if fnmatch.fnmatchcase(name, pat):
            return pat
    return None


def foreign_entries(path: Path, kind: str) -> list[str]:
    """Entries under folder ``path`` that bora does not write in a folder of ``kind`` (recursively).

    Bora's own leftovers of an interrupted write (hidden ``.<name>.*`` temporary files and folders)
    count as bora's."""
    spec = _SPECS[kind]
    out = []
    for entry in sorted(os.listdir(path)):
        p = path / entry
        if entry.startswith(".") and (".tmp-" in entry or ".old-" in entry
                                      or any(entry.startswith(f".{n}.") for n in spec if "*" not in n)):
            continue  # a temporary file or folder of an interrupted bora write
        pat = _matches(entry, spec)
        if pat is None:
            out.append(str(p))
            continue
        sub = spec[pat]
        if sub is None:
            if p.is_dir() or p.is_symlink():
                out.append(str(p))
        elif not p.is_dir() or p.is_symlink():
            out.append(str(p))
        else:
            out.extend(foreign_entries(p, sub))
    return out


def folder_kind(path) -> str:
    """``'missing'``, ``'empty'``, ``'file'``, ``'fit'``, ``'export'``, ``'export-all'``, ``'report'`` or
    ``'other'`` (anything holding entries bora did not write)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return "missing"
    if path.is_symlink() or not path.is_dir():
        return "file"
    try:
        entries = os.listdir(path)
    except OSError:
        return "other"
    if not entries:
        return "empty"
    for kind in ("fit", "export", "report"):
        if any(m in entries for m in _MARKERS[kind]) and not foreign_entries(path, kind):
            return kind
    # an --all export: index.json and sub-folders that are single exports
    subs = [e for e in entries if e != "index.json" and not (
        e.startswith(".") and (".tmp-" in e or ".old-" in e or e.startswith(".index.json.")))]
    if all((path / e).is_dir() and folder_kind(path / e) in ("export", "empty") for e in subs) and (
            "index.json" in entries or subs):
        return "export-all"
    return "other"


_WRITE = {"fit": "a fit", "export": "a PEFT export", "export-all": "PEFT exports", "report": "a report"}
_KIND_NAMES = {"fit": "a bora fit", "export": "a bora PEFT export", "export-all": "a folder of bora PEFT exports",
               "report": "a bora report", "file": "a file", "other": "a folder holding files bora did not write"}


def check_output(path, kind: str, *, overwrite: bool = True, flag: str = "--overwrite") -> str:
    """Refuse (ConfigError) to write output of ``kind`` to ``path`` unless that destroys nothing but
    bora's own output of the same kind; returns :func:`folder_kind` of ``path``.

    ``kind`` is ``'fit'``, ``'export'``, ``'export-all'`` or ``'report'``. A missing or empty folder is
    always fine; an existing output of the same kind only with ``overwrite`` (an ``export-all``
    target may also be a folder of single exports: only its own sub-folders are replaced)."""
    path = Path(path)
    have = folder_kind(path)
    if have in ("missing", "empty"):
        return have
    ok = {"export-all": ("export-all",)}.get(kind, (kind,))
    if have in ok:
        if not overwrite:
            raise ConfigError(f"{path} already holds {_KIND_NAMES[have]}; pass {flag} to replace it")
        return have
    what = _KIND_NAMES[have]
    if have == "other":
        foreign = foreign_entries(path, kind if kind in _SPECS else "export")
        if foreign:
            what += f" (e.g. {Path(foreign[0]).relative_to(path)})"
    raise ConfigError(f"refusing to write {_WRITE[kind]} into {path}: it is {what}; choose a new or empty folder")


def replace_dir(tmp: Path, path: Path, kind: str = "fit") -> None:
    """Move the complete folder ``tmp`` to ``path``; an older ``path`` is removed only afterwards, and
    only if it is bora's own output of ``kind`` (else ConfigError, and ``path`` is left alone)."""
    old = None
    if path.exists() or path.is_symlink():
        have = folder_kind(path)
        if have not in ("empty", kind):
            check_output(path, kind)  # raises with the reason
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)
        raise
    fsync_path(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- base model fingerprint

_VOLATILE = {"architectures", "dtype", "torch_dtype", "transformers_version", "use_cache", "return_dict",
             "output_attentions", "output_hidden_states"}


def base_fingerprint(bora) -> dict:
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


def config_sha256(config: BoraConfig) -> str:
    """Checksum of the sections that define the fitted parameters (adapter, prior, fit)."""
    d = config.to_dict()
    return hashlib.sha256(json.dumps({k: d[k] for k in ("adapter", "prior", "fit")}, sort_keys=True).encode()
                          ).hexdigest()


def check_base(bora, meta: dict, path) -> None:
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
    if sums.get("config") and sums["config"] != config_sha256(config):
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


def check_finite(bora) -> None:
    bad = [k for k, v in bora.guide.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ConfigError(f"refusing to save a fit with non-finite parameters (in {bad[0]})")


def save_fit(bora, path) -> Path:
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
                                        "result": bora.result.to_dict() if bora.result is not None else None})
        write_json(tmp / "metrics.json", bora.metrics)
        from .warmstart import natural_estimates

        save_safetensors(natural_estimates(bora), tmp / "estimates.safetensors", metadata={"format": str(FORMAT_VERSION)})
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

    from .infer import FitResult

    names = {f.name for f in dataclasses.fields(FitResult)}
    if not isinstance(r, dict) or set(r) - names:
        raise ConfigError(f"corrupt {path / 'state.json'}: unexpected fit summary")
    return FitResult(**{k: (float(v) if v in ("nan", "inf", "-inf") else v) for k, v in r.items()})


def load_fit(path, *, device=None, lm=None, tokenizer=None):
    from .api import Bora, resolve_device

    path = Path(path)
    config, meta, st, state = read_fit_files(path)
    if lm is None or tokenizer is None:
        from .base import load_base_model

        lm, tokenizer = load_base_model(config.model, device=resolve_device(device), quantize=config.quantize)
    bora = Bora(config, lm, tokenizer, meta["tasks"], meta["num_docs"], device=device,
                task_sizes=meta.get("task_sizes"))
    check_base(bora, meta, path)
    state = {k: v.to(bora.device) for k, v in state.items()}
    try:
        missing, unexpected = bora.guide.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ConfigError(f"guide parameters in {path} do not match the config: "
                          f"{str(e).strip().splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise ConfigError(f"guide parameters in {path} do not match the config "
                          f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    if bora.tau is not None and st.get("tau"):
        try:
            bora.tau.load_(st["tau"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ConfigError(f"corrupt {path / 'state.json'}: bad tau estimate") from None
    if st.get("result"):
        bora.result = _result(st["result"], path)
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
        save_safetensors(laplace.tensors(), Path(tmp),
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
        return HierarchicalLaplace.from_saved(read_safetensors(path), meta)
    except (KeyError, ValueError, OSError) as e:
        raise ConfigError(f"corrupt Laplace posterior {path}: {e}") from None
