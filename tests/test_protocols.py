"""The narrow protocols that layers below ``bora.api`` declare for what they read of a fit.

A :class:`~bora.api.Bora` has every member of each, and the posterior, fit-folder, export, warm-start and new-task
functions work on a view of a ``Bora`` that has their protocol's members only (anything else is an
``AttributeError``): those protocols list all that their functions read or set.
"""

import pytest
import torch

from bora.api import Bora
from bora.core.config import AdapterConfig, BoraConfig, FitConfig, PriorConfig
from bora.diagnostics.view import FitView
from bora.fit.newtask import NewTaskSource, fit_new_task
from bora.io.export import ExportSource, PeftSource, export_adapters, write_peft_adapter
from bora.io.fitfolder import (BaseModelSource, FitFolderSource, base_fingerprint, check_base, read_fit_files,
                               restore_fit_, save_fit)
from bora.io.warmstart import WarmStartTarget, warm_start_
from bora.posterior.samples import Posterior, PosteriorSource, TauSource, tau_tensors

from conftest import TinyTokenizer, task_data, tiny_llama

PROTOCOLS = (NewTaskSource, FitView, PosteriorSource, TauSource, BaseModelSource, FitFolderSource, PeftSource,
             ExportSource, WarmStartTarget)


def members(protocol) -> set[str]:
    """The attributes and methods ``protocol`` declares, its bora base protocols' included."""
    out = set()
    for c in protocol.__mro__:
        if c.__module__.startswith("bora."):
            out |= set(c.__dict__.get("__annotations__", {}))
            out |= {n for n in c.__dict__ if not n.startswith("_")}
    return out


class View:
    """Only the members of ``protocol`` of ``target``, to read and to set."""

    def __init__(self, target, protocol):
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "allowed", members(protocol))

    def __getattr__(self, name):
        if name not in self.allowed:
            raise AttributeError(f"{name!r} is not in the protocol")
        return getattr(self.target, name)

    def __setattr__(self, name, value):
        if name not in self.allowed:
            raise AttributeError(f"{name!r} is not in the protocol")
        setattr(self.target, name, value)


def make(guide="meanfield", mode="fixed"):
    cfg = BoraConfig(model="tiny-base", adapter=AdapterConfig(rank=2, targets=("q_proj",), layers=(-1,)),
                     prior=PriorConfig(tau_mode=mode, tau=10.0), fit=FitConfig(guide=guide, init_scale=0.3))
    split = task_data((3, 2), seed=1)
    return Bora(cfg, tiny_llama(layers=2), TinyTokenizer(), split.tasks, len(split)), split


def test_members_of_a_protocol_include_its_bases():
    assert {"model", "tau", "config", "point", "pad_id", "feed"} <= members(PosteriorSource)
    assert members(TauSource) == {"model", "tau"}
    assert members(ExportSource) == members(PeftSource) | members(PosteriorSource)
    assert members(WarmStartTarget) >= members(BaseModelSource) == {"config", "lm", "adapters"}
    bora, _ = make()
    view = View(bora, TauSource)
    assert view.model is bora.model
    with pytest.raises(AttributeError, match="config"):
        view.config


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.__name__)
def test_a_bora_has_every_member(protocol):
    bora, _ = make()
    missing = {m for m in members(protocol) if not hasattr(bora, m)}
    assert not missing, sorted(missing)


def test_posterior_reads_only_its_protocol():
    bora, split = make()
    view = View(bora, PosteriorSource)
    post, ref = Posterior(view, 2, seed=1), Posterior(bora, 2, seed=1)
    torch.testing.assert_close(post.doc_loglik(split), ref.doc_loglik(split))
    assert post.evaluate(split, bootstrap=10)["bma_doc"] == ref.evaluate(split, bootstrap=10)["bma_doc"]
    ids = split.input_ids[0]
    assert post.generate("task0", ids[:4], max_new_tokens=2)["ids"] == ref.generate("task0", ids[:4],
                                                                                     max_new_tokens=2)["ids"]
    torch.testing.assert_close(post.token_uncertainty("task1", ids)["entropy"],
                               ref.token_uncertainty("task1", ids)["entropy"])
    key = next(iter(bora.adapters.keys()))
    assert torch.equal(post.task_adapters("unseen")[key][1], ref.task_adapters("unseen")[key][1])


def test_cold_start_reads_only_the_posterior_protocol():
    from bora.data.documents import TokenizedSplit
    from bora.posterior.coldstart import evaluate_new_tasks, tiny_tasks

    bora, split = make()
    view = View(bora, PosteriorSource)
    new = TokenizedSplit(split.input_ids[:3], torch.tensor([0, 1, 1]), ("new0", "new1"))
    got, ref = evaluate_new_tasks(view, new, samples=2), evaluate_new_tasks(bora, new, samples=2)
    assert got["global"] == ref["global"] and got["predictive"] == ref["predictive"]
    fitted, base = bora.evaluate(split), bora.evaluate(split, base=True)
    sizes = {"task0": 1, "task1": 5}
    assert tiny_tasks(view, split, fitted, base, sizes) == tiny_tasks(bora, split, fitted, base, sizes)


def test_tau_tensors_read_only_model_and_tau():
    bora, _ = make(guide="map", mode="learned")
    assert bora.tau is not None
    got = tau_tensors(View(bora, TauSource), bora.point())
    assert got.keys() == bora.model.shapes.keys()
    assert all(torch.equal(v, torch.tensor(bora.model.tau_by_key(bora.point())[k])) for k, v in got.items())


def test_fit_folder_export_and_warm_start_read_only_their_protocols(tmp_path):
    bora, _ = make(guide="map", mode="learned")
    with torch.no_grad():  # away from the initial point, which a freshly built fit shares
        for p in bora.guide.parameters():
            p.add_(0.1)
    assert base_fingerprint(View(bora, BaseModelSource)) == base_fingerprint(bora)
    save_fit(View(bora, FitFolderSource), tmp_path / "fit")
    config, meta, state, tensors = read_fit_files(tmp_path / "fit")
    check_base(View(bora, BaseModelSource), meta, tmp_path / "fit")
    again, _ = make(guide="map", mode="learned")  # the same base model (same seed), its initial guide
    restore_fit_(View(again, FitFolderSource), tmp_path / "fit", meta, state, tensors)
    assert again.point().keys() == bora.point().keys()
    assert all(torch.equal(v, bora.point()[k]) for k, v in again.point().items())
    assert warm_start_(View(make()[0], WarmStartTarget), tmp_path / "fit")["copied"]
    paths = export_adapters(View(bora, ExportSource), tmp_path / "all", all_tasks=True, estimate="sample")
    assert set(paths) == {"task0", "task1", "_global"}
    new = fit_new_task(View(bora, NewTaskSource), task_data((0, 0, 2), seed=5), steps=2)
    assert write_peft_adapter(View(bora, PeftSource), new, tmp_path / "new").is_dir()
