"""The task bank (bora.fit.bank, FitConfig.task_bank): a lazy fit whose task rows live in CPU memory or in a
memory-mapped file is bit-identical to one with them on the device (the same arithmetic on the same values),
through validation, the tau update, early stopping's best state, checkpoints and a resume; its files are sparse
and removed at the end."""

import os

import pytest
import torch

from bora.core.config import ConfigError, FitConfig
from bora.fit.bank import TaskBank
from bora.fit.callbacks import Callback
from bora.fit.lazy import LazyRows
from bora.io.checkpoint import flatten_state, unflatten_state
from bora.model.guides import guide_params

from test_lazy import SHAPE, T, batches, make


def test_bank_stores_fetches_and_writes_back(tmp_path):
    for kind in ("device", "cpu", "disk"):
        bank = TaskBank(kind, "cpu", str(tmp_path) if kind == "disk" else None, chunk_bytes=24)
        value = torch.arange(24.0).reshape(6, 2, 2)
        t = bank.store("delta", value)
        assert (t is value) == (kind == "device") and torch.equal(t, value)
        rows = torch.tensor([4, 1])
        bank.put_(t, rows, bank.fetch(t, rows) * -1)
        assert t[4, 0, 0] == -16 and t[1, 1, 1] == -7 and t[0, 0, 1] == 1
        z = bank.zeros("m", (6, 2, 2), torch.float32)
        assert not bool(z.any())
        assert [list(r) for r in bank.chunks(value)] == [[0], [1], [2], [3], [4], [5]]  # 16 bytes a row, at most 24
        if kind == "disk":
            files = os.listdir(bank.folder)
            assert len(files) == 2 and bank.file_bytes() == 2 * 96
            bank.close_()
            assert not any(p.name.startswith("bora-task-bank-") for p in tmp_path.iterdir())
            assert t[4, 0, 0] == -16  # still mapped
        else:
            assert bank.file_bytes() == 0


def test_disk_bank_files_start_sparse(tmp_path):
    bank = TaskBank("disk", "cpu", str(tmp_path))
    n = 1 << 20  # 4 MiB of float32 zeros: nothing allocated on disk
    bank.zeros("m", (n // 64, 64), torch.float32)
    bank.store("delta", torch.zeros(n // 64, 64))
    assert bank.file_bytes() == 2 * 4 * n and bank.disk_bytes() < 2 * 4 * n // 8
    bank.close_()


@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_banked_lazy_rows_are_bit_identical(kind, tmp_path):
    """LazyRows over a bank (blocks of one row in the full flush) against LazyRows on the device with the same
    blocks; and the device rows with one block against blocks of one row (the flush is elementwise)."""
    g = torch.Generator().manual_seed(3)
    init, target = torch.randn(T, *SHAPE, generator=g), torch.randn(T, *SHAPE, generator=g)
    one_row = 4 * SHAPE[0] * SHAPE[1]
    ref = LazyRows({"d": init.clone()}, {"d": "tau"}, bank=TaskBank("device", "cpu", chunk_bytes=one_row))
    whole = LazyRows({"d": init.clone()}, {"d": "tau"})
    banked = LazyRows({"d": init.clone()}, {"d": "tau"},
                      bank=TaskBank(kind, "cpu", str(tmp_path) if kind == "disk" else None, chunk_bytes=one_row))
    for k, u in enumerate(batches(40)):
        for rows in (ref, whole, banked):
            rows.flush_(u)
            cur = rows.rows("d", u)
            rows.step_(u, {"d": (cur - target[u]) * 3}, 0.02 * (1 + k % 3), {"tau": 2.0 + k / 10})
            if k % 13 == 12:
                rows.flush_()
    for rows in (ref, whole, banked):
        rows.flush_()
    for other in (whole, banked):
        assert torch.equal(other.deltas["d"], ref.deltas["d"]) and torch.equal(other.count, ref.count)
        assert all(torch.equal(getattr(other, n)["d"], getattr(ref, n)["d"]) for n in ("last", "m", "v"))
    state = unflatten_state(*flatten_state(banked.state_dict()))  # the checkpoint reads the bank
    assert all(torch.equal(state[n]["d"], getattr(ref, n)["d"]) for n in ("last", "m", "v"))
    banked.bank.close_()


def fitted(kind, tmp_path, **kw):
    extra = {"task_bank": kind} if kind != "device" else {}
    if kind == "disk":
        extra["task_bank_dir"] = str(tmp_path)
    b, train, val = make(task_updates="lazy", steps=12, eval_every=5, **extra, **kw)
    return b, train, val


class Seen(Callback):
    """Where the guide's offsets live at each validation."""

    def __init__(self):
        self.banked, self.files = [], []

    def on_validate(self, loop, entry, point):
        rows = loop.lazy.rows
        self.deltas = rows.deltas
        params = guide_params(loop.guide)
        same = all(params[s + "_offset"]["loc"].data_ptr() == d.data_ptr() for s, d in rows.deltas.items())
        self.banked.append(same and loop.lazy.banked)
        self.files.append(rows.bank.folder is not None and len(os.listdir(rows.bank.folder)) > 0)


def test_banked_fits_are_bit_identical(tmp_path):
    """A learned-tau lazy fit (validations, evidence tau updates from the steps' curvature, per-task early
    stopping) on the tiny model: adapters, tau and the validation history equal exactly; the bank's folder is
    gone afterwards and the guide's offsets are ordinary tensors again."""
    out = {}
    for kind in ("device", "cpu", "disk"):
        b, train, val = fitted(kind, tmp_path, early_stopping="per_task")
        seen = Seen()
        res = b.fit(train, val, progress=False, callbacks=[seen])
        out[kind] = (b, res)
        assert seen.banked == [kind != "device"] * 4  # at steps 0, 5, 10, 12 the guide's offsets were the bank's
        assert seen.files == [kind == "disk"] * 4
        assert not any(p.name.startswith("bora-task-bank-") for p in tmp_path.iterdir())
        if kind != "device":  # the fitted offsets are ordinary tensors again, not the bank's
            params = guide_params(b.guide)
            assert all(params[s + "_offset"]["loc"].data_ptr() != d.data_ptr() for s, d in seen.deltas.items())
    (ref, rres) = out["device"]
    want = ref.guide.state_dict()
    for kind in ("cpu", "disk"):
        b, res = out[kind]
        got = b.guide.state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), kind
        assert [h.get("val_nll") for h in res.history] == [h.get("val_nll") for h in rres.history]
        assert [h["train_loss"] for h in res.history] == [h["train_loss"] for h in rres.history]
        assert res.tau == rres.tau and res.best_step == rres.best_step


def test_banked_resume_from_a_checkpoint_is_bit_identical(tmp_path):
    """A disk-banked fit checkpoints through bora.io.checkpoint (safetensors + JSON, read out of the bank) and
    resumes, banked again, to the adapters of an uninterrupted fit without a bank."""
    from bora.io.checkpoint import Checkpointer, load_checkpoint

    ref, train, val = fitted("device", tmp_path)
    ref.fit(train, val, progress=False)
    want = {k: v.clone() for k, v in ref.guide.state_dict().items()}
    b, _, _ = fitted("disk", tmp_path)
    b.fit(train, val, progress=False, checkpoint=Checkpointer(tmp_path / "fit", every=7))
    c = load_checkpoint(tmp_path / "fit")
    assert c.step == 7 and c.state["lazy"]["count"].sum() > 0
    for kind in ("disk", "cpu"):
        again, _, _ = fitted(kind, tmp_path)
        again.fit(train, val, progress=False, resume=load_checkpoint(tmp_path / "fit").state)  # resuming mutates it
        got = again.guide.state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), kind


def test_task_bank_refusals_are_one_line():
    for make_cfg, word in [(lambda: FitConfig(task_bank="cpu"), "task_updates='lazy'"),
                           (lambda: FitConfig(task_updates="lazy", task_bank_dir="/tmp"), "task_bank='disk'"),
                           (lambda: FitConfig(task_updates="lazy", task_bank="gpu"), "task_bank")]:
        with pytest.raises(ConfigError, match=word) as e:
            make_cfg()
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="not a folder"):
        TaskBank("disk", "cpu", "/nonexistent/bank")


def test_task_bank_flags():
    from bora.cli.args import build_parser

    ns = build_parser().parse_args(["fit", "--task-updates", "lazy", "--task-bank", "disk", "--task-bank-dir", "x"])
    assert (ns.task_bank, ns.task_bank_dir) == ("disk", "x")
