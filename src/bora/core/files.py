"""Output folders bora writes: atomic writes, JSON and safetensors files, and what may be replaced.

>>> import tempfile
>>> from pathlib import Path
>>> from bora.core.files import check_output, folder_kind, read_json, write_json
>>> tmp = Path(tempfile.mkdtemp())
>>> folder_kind(tmp / "new"), folder_kind(tmp)
('missing', 'empty')
>>> write_json(tmp / "notes.json", {"tau": float("inf")})     # atomic; non-finite floats as strings
>>> read_json(tmp / "notes.json"), folder_kind(tmp)
({'tau': 'inf'}, 'other')
>>> check_output(tmp, "report")                              # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
bora.core.config.ConfigError: refusing to write a report into ...: it is a folder holding files bora did not write

Every file is written to a temporary name in the same folder and renamed into place; every output
folder is written into a temporary sibling and renamed into place by :func:`replace_dir`, so a
crash or kill never leaves half of one. Bora only ever replaces or deletes folders it wrote itself:
:func:`folder_kind` recognises bora's fits, exports and reports by their entries, and
:func:`check_output` refuses a folder holding anything else. New folders and files get the
permissions the user's umask gives (like ``mkdir`` and ``touch``). What a fit folder holds, and how
it is read and written, is :mod:`bora.io.fitfolder`.
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

from .config import ConfigError

__all__ = ["write_json", "write_text", "read_json", "check_output", "folder_kind", "replace_dir", "make_temp_dir",
           "read_safetensors", "save_safetensors", "file_sha256", "fsync_path", "fsync_tree", "foreign_entries",
           "umask", "json_safe"]

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


def json_safe(x: Any) -> Any:
    """JSON-safe copy: non-finite floats become strings ('inf', 'nan')."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if torch.is_tensor(x):
        return json_safe(x.tolist())
    return x


def write_json(path: Path, obj: Any, *, fsync: bool = False, clean: bool = True) -> None:
    """Write JSON atomically (temp file in the same folder, then rename), with the umask's mode."""
    text = json.dumps(json_safe(obj) if clean else obj, indent=2, sort_keys=True, allow_nan=not clean)
    write_text(path, text + "\n", fsync=fsync)


def write_text(path: Path, text: str, *, fsync: bool = False) -> None:
    """Write ``text`` atomically (temp file in the same folder, then rename), with the umask's mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
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
