"""Crash-safe checkpoints of a running fit, and resuming from them bit-identically.

>>> import torch
>>> from bora.io.checkpoint import flatten_state, unflatten_state
>>> tree, tensors = flatten_state({"step": 3, "w": torch.ones(2), "betas": (0.9, 0.999), 0: float("nan")})
>>> back = unflatten_state(tree, tensors)
>>> back["step"], back["betas"], torch.equal(back["w"], torch.ones(2)), back[0] != back[0]
(3, (0.9, 0.999), True, True)

``bora fit --output DIR`` writes, every ``--checkpoint-every`` steps (default: at every
validation), the complete state of the fit loop (:meth:`bora.fit.loop.FitLoop.state_dict`: guide
parameters, optimiser and scheduler state, the batch stream's position, the loop's own state and timing,
each callback's state: tau and its curvature, the best state so far and the early-stopping counter; every
RNG state) to ``DIR/checkpoints/``::

    checkpoints/LATEST                  {"step": 12, "folder": "step-00000012-3f9c..."}
    checkpoints/step-00000012-3f9c.../run.json           the state's plain values + metadata
    checkpoints/step-00000012-3f9c.../state.safetensors  the state's tensors

A checkpoint is written into a temporary folder, fsynced, renamed to its final (unique) name, and
only then published by atomically replacing ``LATEST``; older checkpoint folders are removed after
that. A kill at any moment therefore leaves ``LATEST`` naming either the previous complete
checkpoint or the new one. ``bora fit --resume DIR`` rebuilds the run from the checkpoint's config,
checks that the data and the base model are unchanged, and continues: on CPU the resumed fit ends
with bit-identical adapters to an uninterrupted one with the same seed. Only safetensors and JSON
are written and read (nested state dicts are flattened: tensors to safetensors, the rest to JSON
with tagged tuples, non-string keys and non-finite floats), so loading never runs code.

Test hooks (for the kill-and-resume tests): the environment variable ``BORA_TEST_KILL`` holds
comma-separated ``point:step`` items; the process SIGKILLs itself at ``step:N`` (after step N's
optimiser step, before its checkpoint), ``write:N`` (in the middle of writing step N's checkpoint)
or ``rename:N`` (after the checkpoint folder is renamed, before ``LATEST`` names it).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import secrets
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..core.config import ConfigError
from ..core.distributed import is_main
from ..fit.callbacks import Callback

__all__ = ["flatten_state", "unflatten_state", "Checkpointer", "Checkpoint",
           "load_checkpoint", "has_checkpoint", "data_fingerprint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 2  # 2: the fit loop's state_dict (bora.fit.loop.FitLoop.parts)
_NAME = re.compile(r"^step-(\d{8})-[0-9a-f]{8,32}$")


# ---------------------------------------------------------------- state <-> safetensors + JSON

def flatten_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(json_tree, tensors)``: tensors replaced by ``{"$tensor": name}``, tuples by ``{"$tuple": [...]}``,
    dicts with non-string keys by ``{"$items": [[k, v], ...]}``, non-finite floats by ``{"$float": "nan"}``."""
    tensors: dict[str, torch.Tensor] = {}

    def go(x, path: str):
        if torch.is_tensor(x):
            name = path or "root"
            tensors[name] = x.detach().to("cpu").contiguous().clone()
            return {"$tensor": name}
        if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"$float": str(x)}
        if isinstance(x, tuple):
            return {"$tuple": [go(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [go(v, f"{path}/{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("$") and "/" not in k for k in x):
                return {k: go(v, f"{path}/{k}") for k, v in x.items()}
            return {"$items": [[go(k, f"{path}/#k{i}"), go(v, f"{path}/#{i}")] for i, (k, v) in enumerate(x.items())]}
        if type(x).__module__ == "numpy" and hasattr(x, "item"):
            return go(x.item(), path)
        raise TypeError(f"cannot checkpoint a value of type {type(x).__name__} at {path or '/'}")

    return go(obj, ""), tensors


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state` (a reference to a missing tensor is a ConfigError)."""

    def go(x):
        if isinstance(x, list):
            return [go(v) for v in x]
        if isinstance(x, dict):
            if len(x) == 1:
                (k, v), = x.items()
                if k == "$tensor":
                    if v not in tensors:
                        raise ConfigError(f"corrupt checkpoint: tensor {v!r} is missing")
                    return tensors[v]
                if k == "$tuple":
                    return tuple(go(i) for i in v)
                if k == "$items":
                    return {_hashable(go(a)): go(b) for a, b in v}
                if k == "$float":
                    return float(v)
            return {k: go(v) for k, v in x.items()}
        return x

    return go(tree)


def _hashable(x):
    return tuple(x) if isinstance(x, list) else x


def data_fingerprint(splits: dict) -> str:
    """sha256 of tokenized splits ``{name: TokenizedSplit}`` (tasks, token ids, task ids, the loss masks of
    prompt/completion and chat data, and the choices and labels of classification data)."""
    h = hashlib.sha256()
    for name in sorted(splits):
        s = splits[name]
        h.update(f"{name}:{list(s.tasks)}:{len(s)}".encode())
        h.update(s.task_ids.to(torch.int64).numpy().tobytes())
        for ids in s.input_ids:
            h.update(len(ids).to_bytes(4, "little"))
            h.update(ids.to(torch.int64).numpy().tobytes())
        for m in s.loss_mask or ():
            h.update(b"m" + m.to(torch.int8).numpy().tobytes())
        if s.is_classification:  # every choice, the labels and the likelihood they are fitted with
            h.update(f"c:{s.choice_loss}".encode() + s.labels.to(torch.int64).numpy().tobytes())
            for cs in s.choices:
                h.update(len(cs).to_bytes(4, "little"))
                for c in cs:
                    h.update(len(c).to_bytes(4, "little") + c.to(torch.int64).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- test hooks

def _test_kill(point: str, step: int) -> None:
    spec = os.environ.get("BORA_TEST_KILL")
    if spec and f"{point}:{step}" in [s.strip() for s in spec.split(",")]:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- writing

def _write_checkpoint(root: Path, step: int, state: dict, meta: dict) -> Path:
    from ..core.files import file_sha256, fsync_path, fsync_tree, make_temp_dir, save_safetensors, write_json

    ck = root / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    tree, tensors = flatten_state(state)
    bad = [k for k, v in tensors.items() if k.startswith("/guide/") and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise ConfigError(f"refusing to checkpoint non-finite parameters at step {step} (in {bad[0]})")
    tmp = make_temp_dir(ck, ".tmp-step-")
    try:
        save_safetensors(tensors, tmp / "state.safetensors", metadata={"format": str(CHECKPOINT_FORMAT)})
        if os.environ.get("BORA_TEST_KILL"):
            _test_kill("write", step)
        write_json(tmp / "run.json", {"format": CHECKPOINT_FORMAT, "step": step, "meta": meta, "state": tree,
                                      "sha256": file_sha256(tmp / "state.safetensors")}, clean=False)
        fsync_tree(tmp)
        final = ck / f"step-{step:08d}-{secrets.token_hex(8)}"
        os.replace(tmp, final)
        fsync_path(ck)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if os.environ.get("BORA_TEST_KILL"):
        _test_kill("rename", step)
    write_json(ck / "LATEST", {"step": step, "folder": final.name}, fsync=True)
    for entry in os.listdir(ck):  # older checkpoints and leftovers of interrupted writes
        if entry != final.name and (_NAME.match(entry) or entry.startswith(".tmp-step-")):
            shutil.rmtree(ck / entry, ignore_errors=True)
    return final


class Checkpointer(Callback):
    """The fit loop's checkpoint callback: writes :meth:`bora.fit.loop.FitLoop.state_dict` to
    ``root/checkpoints/`` every ``every`` steps (None: at every validation; 0: never). ``meta`` (JSON) is
    stored with every checkpoint."""

    phase = "checkpoint"

    def __init__(self, root, every: Optional[int] = None, meta: Optional[dict] = None):
        self.root = Path(root)
        self.every = every
        self.meta = dict(meta or {})
        self.last_step: Optional[int] = None

    def on_save(self, loop, validated: bool) -> None:
        step = loop.state.step
        if os.environ.get("BORA_TEST_KILL"):
            _test_kill("step", step)
        due = self.every != 0 and (validated if self.every is None else step % self.every == 0)
        if not due:
            return
        loop.gather_tasks_()  # a task-sharded fit: every rank sends its tasks' rows (a collective) ...
        with loop.full_state():  # ... and their per-rank state, held [T, ...] until written
            if is_main():  # data-parallel runs: rank 0 writes
                _write_checkpoint(self.root, step, loop.state_dict(), self.meta)
                self.last_step = step

    def describe(self) -> str:
        if self.last_step is None:
            return "no checkpoint was written"
        return f"the last good checkpoint is step {self.last_step} in {self.root / 'checkpoints'}"


# ---------------------------------------------------------------- reading

@dataclass
class Checkpoint:
    step: int
    meta: dict
    state: dict
    folder: Path


def has_checkpoint(root) -> bool:
    return (Path(root) / "checkpoints" / "LATEST").is_file()


def load_checkpoint(root) -> Checkpoint:
    """The checkpoint ``root/checkpoints/LATEST`` names, verified (ConfigError if missing or corrupt)."""
    from ..core.files import file_sha256, read_json, read_safetensors

    root = Path(root)
    ck = root / "checkpoints"
    if not root.is_dir():
        raise ConfigError(f"fit folder not found: {root}")
    if not (ck / "LATEST").is_file():
        if (root / "tasks.json").exists():
            raise ConfigError(f"{root} holds a finished fit without checkpoints: nothing to resume")
        raise ConfigError(f"no checkpoint to resume from in {root}")
    latest = read_json(ck / "LATEST")
    name = latest.get("folder") if isinstance(latest, dict) else None
    if not isinstance(name, str) or not _NAME.match(name) or not (ck / name).is_dir():
        raise ConfigError(f"corrupt checkpoint pointer {ck / 'LATEST'}")
    folder = ck / name
    run = read_json(folder / "run.json")
    if not isinstance(run, dict) or run.get("format") != CHECKPOINT_FORMAT:
        fmt = run.get("format") if isinstance(run, dict) else None
        raise ConfigError(f"checkpoint {folder} has another format ({fmt!r};"
                          f" this bora reads {CHECKPOINT_FORMAT})")
    if run.get("sha256") != file_sha256(folder / "state.safetensors"):
        raise ConfigError(f"corrupt checkpoint {folder}: state.safetensors checksum mismatch")
    state = unflatten_state(run.get("state"), read_safetensors(folder / "state.safetensors"))
    if not isinstance(state, dict) or state.get("step") != run.get("step"):
        raise ConfigError(f"corrupt checkpoint {folder}")
    return Checkpoint(step=int(run["step"]), meta=run.get("meta") or {}, state=state, folder=folder)
