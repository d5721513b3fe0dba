"""Task-sharded fits (``parallel='tasks'``) with 2 CPU processes (gloo) equal single-process fits of the same batches;
each rank keeps lazy updates' optimiser state and the step Fisher for its own tasks only; their checkpoints hold every
task and resume in one process."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from bora.api import Bora
from bora.core.config import AdapterConfig, BoraConfig, ConfigError, FitConfig, PriorConfig
from bora.core.distributed import shard_tasks, task_owners
from bora.fit.callbacks import Callback
from bora.fit.curvature import StepFisher
from bora.fit.lazy import LazyRows
from bora.fit.sharding import TaskRows, TaskShards, task_state_bytes
from bora.io.checkpoint import Checkpointer, load_checkpoint

from conftest import TinyTokenizer, task_data, tiny_llama

TRAIN, VAL = (30, 12, 6), (10, 6, 4)  # rank 0 owns task 0 (30 documents), rank 1 tasks 1 and 2 (18)
# a learned tau with validation and a tau update at steps 3 and 6 (eager task updates, then the Laplace posterior;
# lazy), and batches of one row (at every step one rank has no row of the batch and runs a placeholder at weight 0)
SCENARIOS = {
    "eager": dict(steps=6, batch_size=10, eval_every=3, guide="laplace", laplace_docs=4),
    "lazy": dict(steps=6, batch_size=10, eval_every=3, task_updates="lazy"),
    "one_row": dict(steps=4, batch_size=1, eval_every=2, task_updates="lazy", lr=5e-3, tau_curvature="pass"),
}
CHECKPOINT_EVERY = 4  # a checkpoint between validations: lazy offsets unflushed


def make(scenario: str, **extra) -> tuple[Bora, object, object]:
    f = dict(lr=2e-2, warmup=0.0, patience=0, fisher_docs=4, parallel="tasks")
    f.update(SCENARIOS[scenario], **extra)
    cfg = BoraConfig(model="tiny", adapter=AdapterConfig(rank=2, targets=("q_proj", "v_proj"), layers=(-2, -1)),
                     prior=PriorConfig(tau_mode="learned", tau=10.0), fit=FitConfig(**f))
    train, val = task_data(TRAIN, seed=1), task_data(VAL, seed=2)
    return Bora(cfg, tiny_llama(), TinyTokenizer(), train.tasks, len(train)), train, val


def snapshot(bora: Bora) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in bora.guide.state_dict().items()}


class StateBytes(Callback):
    """Records :func:`task_state_bytes` at the fit's end, and the first dimension of every per-task state tensor."""

    def on_fit_end(self, loop):
        self.bytes = task_state_bytes(loop)
        tensors = list(loop.lazy.rows.state_tensors()) if loop.lazy is not None else []
        for cb in loop.callbacks:
            if getattr(cb, "curv", None) is not None:
                tensors += cb.curv.state_tensors()
        self.bytes["state_rows"] = sorted({t.shape[0] for t in tensors})


def run_fit(scenario: str, checkpoint=None, resume=None) -> tuple[dict, dict]:
    bora, train, val = make(scenario)
    rec = StateBytes()
    res = bora.fit(train, val, progress=False, checkpoint=checkpoint, resume=resume, callbacks=[rec])
    state = snapshot(bora)
    if bora.laplace is not None:  # the Laplace posterior's curvature after the fit, over every task
        state.update({"laplace." + k: v.contiguous() for k, v in bora.laplace.tensors().items()})
    return state, {"tau": res.tau, "history": [h.get("val_nll") for h in res.history], "bytes": rec.bytes}


def _worker(rank: int, world_size: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    from bora.core.distributed import close

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    ok = False
    try:
        for name in SCENARIOS:
            ck = Checkpointer(os.path.join(out, f"fit-{name}"), every=CHECKPOINT_EVERY)
            state, info = run_fit(name, checkpoint=ck)
            save_file(state, os.path.join(out, f"{name}-rank{rank}.safetensors"))
            with open(os.path.join(out, f"{name}-rank{rank}.json"), "w") as fh:
                json.dump(info, fh)
        # a one-process checkpoint resumed on 2 ranks (each loads its own tasks' rows of the lazy state and Fisher)
        state, _ = run_fit("lazy", resume=load_checkpoint(os.path.join(out, "one-lazy")).state)
        save_file(state, os.path.join(out, f"resumed-lazy-rank{rank}.safetensors"))
        ok = True
    finally:
        close(ok)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    run_fit("lazy", checkpoint=Checkpointer(out / "one-lazy", every=CHECKPOINT_EVERY))  # one process
    mp.spawn(_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return out


def _read(out, name, rank):
    info = json.loads((out / f"{name}-rank{rank}.json").read_text())
    return load_file(str(out / f"{name}-rank{rank}.safetensors")), info


def _close(got: dict, want: dict) -> None:
    """The adapters within 1e-6; the Laplace curvature (squared gradients summed in another order: the
    document-parallel pass of either mode) within 1e-4 relative."""
    assert set(got) == set(want)
    for k, v in want.items():
        atol, rtol = (1e-7, 1e-4) if k.startswith("laplace.") else (1e-6, 0.0)
        assert torch.allclose(got[k], v, atol=atol, rtol=rtol), (k, float((got[k] - v).abs().max()))


def test_ownership_is_size_balanced_and_rows_weigh_their_share():
    assert task_owners([30, 12, 6], 2).tolist() == [0, 1, 1]
    assert task_owners([5, 5, 5, 5], 3).tolist() == [0, 1, 2, 0]
    rows, tids, owner = torch.arange(6), torch.tensor([2, 0, 1, 0, 0, 2]), torch.tensor([0, 1, 1])
    parts = [shard_tasks(rows, tids, owner, r, 2) for r in range(2)]
    assert torch.equal(parts[0][0], rows[[1, 3, 4]]) and torch.equal(parts[1][0], rows[[0, 2, 5]])
    assert parts[0][1] == parts[1][1] == 0.5
    assert sum(w for _, w in parts) == pytest.approx(1.0)  # the ranks' likelihoods sum to the global batch's once
    local, w = shard_tasks(rows, torch.zeros(6, dtype=torch.long), owner, 1, 2)  # no row of rank 1's tasks
    assert w == 0.0 and len(local) == 1
    local, w = TaskShards([3, 1], rank=0, world_size=1).batch_rows(rows[:2], tids[:2])
    assert torch.equal(local, rows[:2]) and w == 1.0


def test_refusals():
    with pytest.raises(ConfigError, match="parallel='tasks' needs a point guide"):
        FitConfig(parallel="tasks", guide="meanfield")
    with pytest.raises(ConfigError, match="parallel must be one of"):
        FitConfig(parallel="layers")
    bora, train, _ = make("eager")
    cfg = bora.config.replace(prior=PriorConfig(tau_mode="uncoupled"))
    with pytest.raises(ConfigError, match="parallel='tasks' needs offset task sites"):
        Bora(cfg, tiny_llama(), TinyTokenizer(), train.tasks, len(train)).fit(train, progress=False)


def test_two_ranks_equal_one_process(two_ranks):
    for name in SCENARIOS:
        single, info = run_fit(name)
        s0, i0 = _read(two_ranks, name, 0)
        s1, i1 = _read(two_ranks, name, 1)
        for k in single:
            assert torch.equal(s0[k], s1[k]), (name, k)  # every rank ends with every task's rows
        _close(s0, single)
        assert i0["tau"] == i1["tau"]
        assert list(i0["tau"].values()) == pytest.approx(list(info["tau"].values()), rel=1e-6)
        assert i0["history"] == pytest.approx(info["history"], rel=1e-6)
        moved = max(float((single[k] - v).abs().max()) for k, v in snapshot(make(name)[0]).items())
        assert moved > 1e-3, name  # the fit did move the adapters


def test_each_rank_keeps_its_own_tasks_state(two_ranks):
    """With lazy updates a rank's optimiser state (moments, counts, L_t) and step Fisher are its own tasks' rows: the
    two ranks' bytes sum to one process's, the offsets stay whole on every rank."""
    owned = [1, 2]  # rank 0 owns task 0, rank 1 tasks 1 and 2 (TRAIN's sizes)
    for name in ("lazy", "one_row"):
        _, single = run_fit(name)
        one = single["bytes"]
        assert one["rows"] == len(TRAIN) and one["state_rows"] == [len(TRAIN)]
        ranks = [_read(two_ranks, name, r)[1]["bytes"] for r in range(2)]
        for r, b in enumerate(ranks):
            assert b["rows"] == owned[r] and b["state_rows"] == [owned[r]], (name, r, b)
            assert b["offsets"] == one["offsets"]
            assert b["optimizer"] * len(TRAIN) == one["optimizer"] * owned[r]  # every task's rows are one size
            assert b["fisher"] * len(TRAIN) == one["fisher"] * owned[r]
        assert sum(b["optimizer"] for b in ranks) == one["optimizer"]
        assert sum(b["fisher"] for b in ranks) == one["fisher"]
        # 'one_row' has tau_curvature='pass' (no step Fisher), 'lazy' the default 'steps'
        assert (one["fisher"] > 0) == (name == "lazy") and one["optimizer"] > 0


def test_task_rows_slice_and_expand():
    rows = TaskRows(4, torch.tensor([False, True, False, True]))
    assert len(rows) == 2 and rows.of(torch.tensor([3, 1])).tolist() == [1, 0]
    assert rows.tasks(torch.tensor([1])).tolist() == [3]
    full = torch.arange(8.0).view(4, 2)
    assert torch.equal(rows.take(full), full[[1, 3]])
    assert torch.equal(rows.expand(rows.take(full)), full * torch.tensor([0.0, 1, 0, 1]).view(4, 1))
    assert torch.equal(rows.full(rows.take(full)), rows.expand(full[[1, 3]]))  # one process: nothing to add
    ident = TaskRows(4)
    u = torch.tensor([2, 0])
    assert ident.identity and ident.of(u) is u and ident.take(full) is full


def test_sharded_lazy_rows_and_step_fisher_equal_the_full_ones_on_their_tasks():
    """A LazyRows / StepFisher keeping tasks 1 and 3 of 4 gives those tasks the same offsets, state and Fisher as
    one keeping every task, stepping them alone; its state_dict after gather_state_ has the full layout and loads back
    into either."""
    torch.manual_seed(0)
    mine = torch.tensor([False, True, False, True])
    local = TaskRows(4, mine)
    d0 = torch.randn(4, 3, 2)
    full, part = (LazyRows({"d": d0.clone()}, {"d": "tau"}, local=lo) for lo in (None, local))
    curv_full, curv_part = (StepFisher({"m": ((2, 3), (3, 2))}, 4, torch.tensor([5, 6, 7, 8]), factors=(1,),
                                       rows=lo) for lo in (None, local))
    for k in range(5):
        u = torch.tensor([1, 3]) if k % 2 else torch.tensor([3])
        g = {"d": torch.randn(len(u), 3, 2)}
        for rows, curv in ((full, curv_full), (part, curv_part)):
            rows.flush_(u)
            rows.step_(u, g, lr=0.1, rate={"tau": 0.5})
            curv.begin_step(0.5, u)
            curv.sink("m", 1, g["d"], u)
    full.flush_()
    part.flush_()
    assert torch.equal(full.deltas["d"][mine], part.deltas["d"][mine])
    assert torch.equal(part.deltas["d"][~mine], d0[~mine])  # other ranks' tasks: never touched here
    assert part.m["d"].shape[0] == 2 and part.count.tolist() == full.count[mine].tolist()
    with pytest.raises(RuntimeError, match="gather_state_"):
        part.state_dict()
    part.gather_state_()
    state = part.state_dict()
    part.release_state_()
    assert state["m"]["d"].shape == full.m["d"].shape
    assert torch.equal(state["m"]["d"][mine], full.m["d"][mine]) and not bool(state["m"]["d"][~mine].any())
    again = LazyRows({"d": d0.clone()}, {"d": "tau"}, local=local)
    again.load_state_dict(full.state_dict())
    assert torch.equal(again.v["d"], full.v["d"][mine]) and torch.equal(again.last["d"], full.last["d"][mine])
    tf_full, tf_part = curv_full.task_fisher(), curv_part.task_fisher()
    assert torch.equal(tf_full.fisher["m"][1], tf_part.fisher["m"][1]) and torch.equal(tf_full.used, tf_part.used)
    assert curv_part.fisher["m"][1].shape[0] == 2 and tf_part.fisher["m"][0].shape == (4, 2, 3)
    curv_part.gather_state_()
    cstate = curv_part.state_dict()
    curv_part.release_state_()
    assert {k: v.shape for k, v in cstate.items()} == {k: v.shape for k, v in curv_full.state_dict().items()}


def test_checkpoint_of_one_process_resumes_on_two_ranks(two_ranks):
    single, _ = run_fit("lazy")
    for rank in range(2):
        _close(load_file(str(two_ranks / f"resumed-lazy-rank{rank}.safetensors")), single)


def test_checkpoint_of_two_ranks_resumes_in_one_process(two_ranks):
    for name in SCENARIOS:
        c = load_checkpoint(two_ranks / f"fit-{name}")
        assert c.step == CHECKPOINT_EVERY
        single, _ = run_fit(name)
        resumed, _ = run_fit(name, resume=c.state)
        _close(resumed, single)


def test_torchrun_task_sharded_lazy_fit_and_refusals(tmp_path, capsys):
    """``torchrun --nproc-per-node 2 -m bora fit --parallel tasks --task-updates lazy`` writes a loadable fit;
    unsupported combinations exit 2 with one line."""
    import subprocess
    import sys

    from bora.cli.main import main
    from conftest import tiny_model_dir, write_jsonl

    model, data = tiny_model_dir(tmp_path / "model"), write_jsonl(tmp_path / "data.jsonl")
    common = ["--model", str(model), "--data", str(data), "--task-column", "speaker", "--targets", "q_proj",
              "--layers", "-1", "--rank", "2", "--steps", "4", "--batch-size", "4", "--quiet", "--device", "cpu"]
    out = tmp_path / "fit"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "bora", "fit",
           *common, "--tau-mode", "learned", "--parallel", "tasks", "--task-updates", "lazy", "--output", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("overall: exp(mean per-task NLL)") == 1
    assert json.loads((out / "config.json").read_text())["fit"]["parallel"] == "tasks"
    assert main(["evaluate", str(out), "--quiet", "--device", "cpu"]) == 0
    capsys.readouterr()
    for extra, msg in ((["--guide", "meanfield"], "parallel='tasks' needs a point guide"),
                       (["--tau-mode", "uncoupled"], "parallel='tasks' needs offset task sites")):
        assert main(["fit", *common, "--parallel", "tasks", *extra, "--output", str(tmp_path / "refused")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("bora: error:") and msg in err and "\n" not in err, err
