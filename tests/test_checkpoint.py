"""Checkpoints: kill -9 at several points (one in the middle of a checkpoint write), resume, and end
with bit-identical adapters; NaN stops; the checkpoint folder is always complete."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bora
from bora.api import Bora
from bora.core.seeding import rng_state, set_rng_state_
from bora.io.checkpoint import Checkpointer, flatten_state, load_checkpoint, unflatten_state
from bora.cli.main import main
from bora.core.config import AdapterConfig, BoraConfig, ConfigError, FitConfig, PriorConfig

from conftest import TinyTokenizer, task_data, tiny_llama, tiny_model_dir, write_jsonl

SRC = str(Path(bora.__file__).resolve().parents[1])
FIT = ["--task-column", "speaker", "--targets", "q_proj", "v_proj", "--layers", "-1", "--rank", "2", "--steps", "12",
       "--batch-size", "4", "--lr", "0.02", "--eval-every", "3", "--patience", "0", "--dropout", "0.1",
       "--checkpoint-every", "2", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return tiny_model_dir(d / "model"), write_jsonl(d / "data.jsonl"), d


def run_cli(args, kill=None):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    env.pop("BORA_TEST_KILL", None)
    if kill:
        env["BORA_TEST_KILL"] = kill
    return subprocess.run([sys.executable, "-m", "bora.cli.main", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def latest_step(fit_dir):
    return load_checkpoint(fit_dir).step  # verifies the checkpoint completely (checksum, every tensor)


def test_kill_and_resume_is_bit_identical(setup):
    model, data, d = setup
    common = ["fit", "--model", str(model), "--data", str(data), *FIT]
    ref = run_cli([*common, "--output", str(d / "ref")])
    assert ref.returncode == 0, ref.stderr
    assert ref.stderr == ""  # --quiet: no progress bars or library warnings

    out = d / "run"
    # 1. killed after step 5 (before its checkpoint would be due anyway): the last checkpoint is step 4
    r = run_cli([*common, "--output", str(out)], kill="step:5")
    assert r.returncode == -signal.SIGKILL
    assert latest_step(out) == 4 and not (out / "tasks.json").exists()
    # 2. resumed, then killed in the middle of writing step 8's checkpoint: still step 6, complete
    r = run_cli(["fit", "--resume", str(out), "--quiet", "--device", "cpu"], kill="write:8")
    assert r.returncode == -signal.SIGKILL
    assert latest_step(out) == 6
    # 3. resumed, then killed after step 10's folder was renamed but before LATEST named it: still step 8
    r = run_cli(["fit", "--resume", str(out), "--quiet", "--device", "cpu"], kill="rename:10")
    assert r.returncode == -signal.SIGKILL
    assert latest_step(out) == 8
    # 4. resumed to the end
    r = run_cli(["fit", "--resume", str(out), "--quiet", "--device", "cpu"])
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout and r.stderr == ""

    want, got = load_file(str(d / "ref" / "guide.safetensors")), load_file(str(out / "guide.safetensors"))
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k  # bit-identical adapters
    hist = lambda p: [(h["step"], h["val_nll"], h.get("tau")) for h in  # noqa: E731
                      json.loads((p / "state.json").read_text())["result"]["history"]]
    assert hist(out) == hist(d / "ref")  # same validation losses and tau estimates at every validation
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (d / "ref").iterdir())  # no checkpoints left
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_resume_refusals(setup, capsys, tmp_path):
    model, data, d = setup
    cases = [
        (["fit", "--resume", str(tmp_path / "none")], "fit folder not found"),
        (["fit", "--resume", str(tmp_path)], "no checkpoint"),
        (["fit", "--resume", str(tmp_path), "--lr", "0.1"], "remove --lr"),
        (["fit", "--resume", str(tmp_path), "--output", str(tmp_path / "other")], "--output must be omitted"),
        (["fit", "--model", str(model), "--data", str(data), "--checkpoint-every", "-1",
          "--output", str(tmp_path / "x")], "checkpoint_every must be"),
    ]
    for args, msg in cases:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("bora: error:") and msg in err and "\n" not in err, err


def config(**fit):
    f = dict(steps=8, batch_size=8, lr=2e-2, fisher_docs=8, patience=0, eval_every=3)
    f.update(fit)
    return BoraConfig(model="tiny", adapter=AdapterConfig(rank=2, targets=("q_proj", "v_proj"), layers=(-2, -1)),
                      prior=PriorConfig(tau_mode="learned", tau=10.0), fit=FitConfig(**f))


def make(**fit):
    train, val = task_data((20, 10, 6), seed=1), task_data((6, 4, 4), seed=2)
    return Bora(config(**fit), tiny_llama(), TinyTokenizer(), train.tasks, len(train)), train, val


@pytest.mark.parametrize("guide,curvature", [("map", "pass"), ("map", "steps"), ("meanfield", "pass")])
def test_api_resume_from_every_checkpoint(tmp_path, guide, curvature):
    """In memory: resuming from any checkpoint (mid-epoch, with tau updates) reproduces the fit exactly."""
    b, train, val = make(guide=guide, tau_curvature=curvature)
    states = {}

    def keep(step, validated, capture):
        tree, tensors = flatten_state(capture())  # exactly what is written to disk
        states[step] = (tree, tensors)

    b.fit(train, val, progress=False, checkpoint=keep)
    want = {k: v.clone() for k, v in b.guide.state_dict().items()}
    assert sorted(states) == list(range(0, 9))
    for step in (0, 4, 8):
        again, _, _ = make(guide=guide, tau_curvature=curvature)
        again.fit(train, val, progress=False, resume=unflatten_state(*states[step]))
        got = again.guide.state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), step
        assert again.result.steps == 8 and [h["step"] for h in again.result.history] == [0, 3, 6, 8]


def test_checkpointer_writes_atomically_and_cleans_up(tmp_path, monkeypatch):
    b, train, val = make(steps=4)
    ck = Checkpointer(tmp_path / "fit", every=2, meta={"note": "x"})
    b.fit(train, val, progress=False, checkpoint=ck)
    assert ck.last_step == 4
    c = load_checkpoint(tmp_path / "fit")
    assert c.step == 4 and c.meta == {"note": "x"}
    names = sorted(p.name for p in (tmp_path / "fit" / "checkpoints").iterdir())
    assert names[0] == "LATEST" and len(names) == 2 and names[1].startswith("step-00000004-")
    # a corrupt state file is detected by its checksum
    f = c.folder / "state.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match="checksum"):
        load_checkpoint(tmp_path / "fit")
    # files and folders get the umask's permissions (not mkstemp's 0600 / mkdtemp's 0700)
    mask = os.umask(0o022)
    os.umask(mask)
    assert (c.folder.stat().st_mode & 0o777) == 0o777 & ~mask
    assert ((tmp_path / "fit" / "checkpoints" / "LATEST").stat().st_mode & 0o777) == 0o666 & ~mask


def test_rng_state_round_trip():
    import random

    import numpy as np

    g = torch.Generator().manual_seed(3)
    st = unflatten_state(*flatten_state(rng_state(g)))
    a = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=g))
    set_rng_state_(st, g)
    b = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=g))
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2] and torch.equal(a[3], b[3])


def test_nan_stops_the_fit_and_nothing_is_saved(setup, capsys):
    model, data, d = setup
    out = d / "nan"
    rc = main(["fit", "--model", str(model), "--data", str(data), "--task-column", "speaker", "--targets", "q_proj",
               "--layers", "-1", "--rank", "2", "--steps", "6", "--batch-size", "4", "--lr", "1e38", "--clip-norm", "0",
               "--eval-every", "1", "--checkpoint-every", "1", "--output", str(out), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and err.startswith("bora: error: fit stopped:"), err
    assert "at step" in err and "last good checkpoint is step" in err and "nothing was saved" in err
    assert not (out / "guide.safetensors").exists()  # no fit saved
    c = load_checkpoint(out)  # the last good checkpoint is complete and finite
    assert all(bool(torch.isfinite(v).all()) for v in c.state["guide"].values())
