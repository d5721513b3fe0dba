"""Examples are scripts with a main(); smoke-run them with their smallest flags."""

import ast
import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name, folder="examples"):
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _analysis(name):
    """A script of ``analysis/`` as a module."""
    return _load(name, "analysis")


def test_examples_import_only_the_public_api():
    """Examples are written against the public API: ``import bora`` or ``from bora import X`` with X in
    ``bora.__all__``, never a submodule."""
    import bora

    paths = sorted((ROOT / "examples").glob("*.py"))
    assert paths
    bad = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                bad += [f"{path.name}:{node.lineno}: import {a.name}" for a in node.names if a.name.startswith("bora.")]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "bora":
                names = [a.name for a in node.names]
                if node.module != "bora" or not set(names) <= set(bora.__all__):
                    bad.append(f"{path.name}:{node.lineno}: from {node.module} import {', '.join(names)}")
    assert bad == [], "\n".join(bad)


def test_own_data_example_smoke(tmp_path, capsys):
    out = _load("own_data").main(["--tiny", "--steps", "3", "--output", str(tmp_path / "fit")])
    assert set(out["fit"]["per_task"]) == {"hamlet/HAMLET", "macbeth/LADY MACBETH", "julius-caesar/PORTIA",
                                           "hamlet/Ghost"}
    assert math.isfinite(out["fit"]["overall"]["ppl_task_mean"])
    assert (tmp_path / "fit" / "guide.safetensors").exists()
    assert "overall: exp(mean per-task NLL)" in capsys.readouterr().out


def test_tau_sweep_smoke(tmp_path):
    mod = _analysis("tau_sweep")
    res = mod.main(["--tiny", "--epochs", "0.5", "--taus", "100", "--quiet", "--out", str(tmp_path),
                    "--sample-tasks", "2", "--sample-seed", "1"])
    names = {r["setting"] for r in res["rows"]}
    assert names == {"uncoupled", "shared", "two-stage", "tau=100", "learned (MAP, evidence)", "base model"}
    assert len(res["tasks"]) == 2 and set(res["tasks"]) < {"hamlet/HAMLET", "macbeth/LADY MACBETH", "hamlet/Ghost"}
    for f in ("per_task.csv", "table.md", "ppl_vs_tau.png", "gain_vs_size.png", "meta.json", "by_size.md"):
        assert (tmp_path / f).stat().st_size > 0
    assert "| learned (MAP, evidence) |" in (tmp_path / "table.md").read_text()
    rows = res["by_size"]  # every bucket's comparison covers its tasks' test documents, once per pair
    pairs = {(r["a"], r["b"]) for r in rows}
    assert ("learned (MAP, evidence)", "shared") in pairs and ("shared", "uncoupled") in pairs
    for pair in pairs:
        assert sum(r["test_docs"] for r in rows if (r["a"], r["b"]) == pair) == len(res["docs"]["_task_ids"])
        assert sum(r["tasks"] for r in rows if (r["a"], r["b"]) == pair) == 2
    assert all(r["lo"] <= r["diff"] <= r["hi"] for r in rows)


def test_tau_sweep_lr_grid_keeps_each_settings_validation_best(tmp_path):
    """--lrs: every setting at every lr; per setting the kept fit is the lr of the lowest recorded validation NLL,
    and everything reported (table, meta, per-task rows, per-document test NLL) is that fit's."""
    import csv

    lrs = [1e-3, 4e-3, 2e-2]
    res = _analysis("tau_sweep").main(["--tiny", "--epochs", "0.5", "--taus", "10", "100", "--quiet",
                                       "--only", "shared", "tau=10", "tau=100", "learned",
                                       "--lrs", *map(str, lrs), "--out", str(tmp_path)])
    meta = json.loads((tmp_path / "meta.json").read_text())
    docs = json.loads((tmp_path / "test_doc_nll.json").read_text())
    by_lr_docs = json.loads((tmp_path / "test_doc_nll_by_lr.json").read_text())
    assert meta["lrs"] == lrs and meta["config"]["fit"]["lr"] is None and by_lr_docs["_lrs"] == lrs
    with open(tmp_path / "per_task.csv") as f:
        csv_rows = list(csv.DictReader(f))
    settings = ["shared", "tau=10", "tau=100", "learned (MAP, evidence)"]
    for s in settings:
        o = meta["overall"][s]
        fits = o["by_lr"]
        assert [x["lr"] for x in fits] == lrs and sum(x["chosen"] for x in fits) == 1
        k = min(range(len(lrs)), key=lambda i: fits[i]["best_val_nll"])
        assert fits[k]["chosen"] and o["lr"] == lrs[k] and o["best_val_nll"] == fits[k]["best_val_nll"]
        assert o["test"] == fits[k]["test"] and o["tau"] == fits[k]["tau"]  # the test numbers of the chosen fit
        assert docs[s] == by_lr_docs[s][f"{lrs[k]:g}"]
        assert {float(r["lr"]) for r in csv_rows if r["setting"] == s} == {lrs[k]}
        assert f"| {s} | {lrs[k]:g} | {fits[k]['best_val_nll']:.4f} |" in (tmp_path / "table.md").read_text()
    grid_val = {s: res["overall"][s]["best_val_nll"] for s in ("tau=10", "tau=100")}
    assert meta["best_grid_by_validation"] == min(grid_val, key=grid_val.get)
    # the comparison scripts read the folder as before (the chosen fits)
    same = _analysis("sweep_seeds").main(["--a", f"{tmp_path}::shared", "--b", f"{tmp_path}::shared",
                                          "--out", str(tmp_path / "same.json")])
    assert same["diff"] == 0
    # grid_seeds: the folder as two seeds; a per-task baseline at two lrs, the one of the lower validation NLL kept
    for name, setting, v in (("a", "shared", 2.0), ("b", "tau=10", 1.0)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"doc_nll": docs[setting], "tokens": docs["_tokens"],
                                                           "task_ids": docs["_task_ids"], "val_nll_task_mean": v,
                                                           "ppl": meta["overall"][setting]["test"]["ppl_task_mean"]}))
    extra = f"pt={tmp_path / 'a.json'},{tmp_path / 'b.json'}"
    gs = _analysis("grid_seeds").main([str(tmp_path), str(tmp_path), "--extra", extra, "--out", str(tmp_path / "gs")])
    rows = gs["settings"]
    assert rows["pt"]["source"] == str(tmp_path / "b.json")
    assert rows["pt"]["ref_minus"]["diff"] == pytest.approx(rows["tau=10"]["ref_minus"]["diff"])
    for s in settings:
        want = meta["overall"][s]["test"]["ppl_task_mean"]
        assert [x["ppl"] for x in rows[s]["per_seed"]] == [want, want]
        assert rows[s]["ppl_mean"] == pytest.approx(want)
        if s != "learned (MAP, evidence)":
            d = rows[s]["ref_minus"]
            assert d["diff"] == pytest.approx(meta["overall"]["learned (MAP, evidence)"]["test"]["ppl_task_mean"]
                                              - want) and d["lo"] <= d["diff"] <= d["hi"]
    # two fixed taus: the grid is one baseline, the tau validation chose (per seed), never the better one on test
    grid = rows["fixed tau (chosen on validation)"]
    assert [x["setting"] for x in grid["per_seed"]] == [meta["best_grid_by_validation"]] * 2
    assert grid["ppl_mean"] == pytest.approx(rows[meta["best_grid_by_validation"]]["ppl_mean"])
    assert gs["strongest_baseline"] == min(["shared", "fixed tau (chosen on validation)", "pt"],
                                           key=lambda s: rows[s]["ppl_mean"])
    assert "Strongest baseline" in (tmp_path / "gs" / "summary.md").read_text()
    with pytest.raises(SystemExit, match="one saved fit per grid folder"):
        _analysis("grid_seeds").main([str(tmp_path), str(tmp_path), "--fits", f"x={tmp_path}", "--out", str(tmp_path)])
    # a run at one lr is another procedure than the grid: combine refuses to treat them as seeds
    _analysis("tau_sweep").main(["--tiny", "--epochs", "0.5", "--quiet", "--only", "shared", "--lr", "4e-3",
                                 "--out", str(tmp_path / "one")])
    with pytest.raises(SystemExit, match="other fit settings"):
        _analysis("combine").main([str(tmp_path), str(tmp_path / "one")])


def test_tau_sweep_lr_grid_never_chooses_on_test(tmp_path, monkeypatch):
    """Validation and test made to disagree (validation prefers lr 2e-3 and tau=10, test prefers lr 1e-3 and
    tau=100): the validation choice wins everywhere, and the test numbers reported are the validation choice's."""
    from bora.api import Bora

    val = {1e-3: 2.0, 2e-3: 1.0, 4e-3: 3.0}  # validation NLL by lr
    test = {1e-3: 10.0, 2e-3: 30.0, 4e-3: 20.0}  # test perplexity by lr: the opposite preference
    fit, evaluate = Bora.fit, Bora.evaluate

    def tau_of(bora):
        return bora.config.prior.tau if bora.config.prior.tau_mode == "fixed" else None

    def fake_fit(self, *a, **k):
        res = fit(self, *a, **k)
        res.best_val_nll = val[self.config.fit.lr] + (0.5 if tau_of(self) == 100 else 0.0)
        return res

    def fake_evaluate(self, split, **k):
        out = evaluate(self, split, **k)
        if not k.get("base") and k.get("adapter") is None:
            ppl = test[self.config.fit.lr] - (5.0 if tau_of(self) == 100 else 0.0)
            out = {**out, "overall": {**out["overall"], "ppl_task_mean": ppl, "ppl_token": ppl}}
        return out

    monkeypatch.setattr(Bora, "fit", fake_fit)
    monkeypatch.setattr(Bora, "evaluate", fake_evaluate)
    _analysis("tau_sweep").main(["--tiny", "--epochs", "0.25", "--taus", "10", "100", "--quiet",
                                 "--only", "shared", "tau=10", "tau=100", "--lrs", "1e-3", "2e-3", "4e-3",
                                 "--out", str(tmp_path)])
    meta = json.loads((tmp_path / "meta.json").read_text())
    for s, ppl in (("shared", 30.0), ("tau=10", 30.0), ("tau=100", 25.0)):
        o = meta["overall"][s]
        assert o["lr"] == 2e-3 and o["test"]["ppl_task_mean"] == ppl
        assert min(x["test"]["ppl_task_mean"] for x in o["by_lr"]) < ppl  # test would have chosen otherwise
    assert meta["best_grid_by_validation"] == "tau=10"
    assert "Best grid setting by validation NLL: tau=10 (test ppl 30.000)" in (tmp_path / "table.md").read_text()


def test_tau_sweep_two_stage_starts_from_the_chosen_shared_fit(tmp_path, monkeypatch):
    """two-stage: every task's B starts at the shared fit chosen on validation (each lr of the grid starts there),
    each task keeps its own best validation step; its validation NLL can only improve on the shared fit's, which
    it validates first."""
    from bora.api import Bora

    starts = []
    init_from = Bora.init_from

    def spy(self, path):
        starts.append((self.config.fit.lr, self.config.fit.early_stopping, self.config.prior.tau_mode, Path(path).name))
        return init_from(self, path)

    monkeypatch.setattr(Bora, "init_from", spy)
    lrs = ["1e-3", "4e-3"]
    _analysis("tau_sweep").main(["--tiny", "--epochs", "0.5", "--quiet", "--only", "shared", "two-stage",
                                 "--lrs", *lrs, "--out", str(tmp_path)])
    meta = json.loads((tmp_path / "meta.json").read_text())
    shared, two = meta["overall"]["shared"], meta["overall"]["two-stage"]
    chosen = f"shared_lr{shared['lr']:g}"
    assert starts == [(float(lr), "per_task", "uncoupled", chosen) for lr in lrs]
    assert two["init_lr"] == shared["lr"]
    assert all(x["best_val_nll"] <= shared["best_val_nll"] + 1e-6 for x in two["by_lr"])
    assert "two-stage vs shared" not in meta["bootstrap"]  # the learned fit is the reference; none was run here
    with pytest.raises(SystemExit, match="starts from the shared fit"):
        _analysis("tau_sweep").main(["--tiny", "--quiet", "--only", "two-stage", "--out", str(tmp_path / "x")])


def test_choose_lr_sees_only_validation():
    mod = _analysis("tau_sweep")
    assert mod.choose_lr([4.1, 3.9, 4.0]) == 1
    assert mod.choose_lr([float("nan"), 4.2, 4.2]) == 1  # a diverged fit never wins; ties go to the first
    assert mod.choose_lr([5.0]) == 0


def test_sample_tasks_is_seeded_and_sorted():
    mod = _analysis("tau_sweep")
    docs = [{"task": t} for t in "edcbaedcba"]
    a, b = mod.sample_tasks(docs, 3, 0), mod.sample_tasks(docs, 3, 0)
    assert a == b and list(a) == sorted(a) and len(set(a)) == 3 and set(a) <= set("abcde")
    assert mod.sample_tasks(docs, 9, 0) == tuple("abcde")


def test_combine_seeds_and_parameterisations(tmp_path):
    sweep = _analysis("tau_sweep")
    sweep.main(["--tiny", "--epochs", "0.5", "--taus", "100", "--quiet", "--parameterisation", "noncentred",
                "--out", str(tmp_path / "s0")])
    sweep.main(["--tiny", "--epochs", "0.5", "--quiet", "--seed", "1", "--only", "shared", "learned",
                "--out", str(tmp_path / "s1")])  # 'auto': offset
    out = _analysis("combine").main([str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "sum.md")])
    assert out["seeds"] == [0, 1]
    assert set(out["ppl"]["shared"]) == {0, 1} and set(out["ppl"]["learned [offset]"]) == {1}
    assert set(out["ppl"]["learned [noncentred]"]) == {0} and "tau=100 [noncentred]" in out["ppl"]
    pairs = {(c["a"], c["b"]): c for c in out["comparisons"]}
    assert pairs[("learned [offset]", "shared")]["seeds"] == [1]  # only the seeds both settings have
    c = pairs[("learned [noncentred]", "tau=100 [noncentred]")]
    assert c["lo"] <= c["diff"] <= c["hi"] and c["per_seed"] == [c["diff"]]
    assert "| learned [offset] |" in (tmp_path / "sum.md").read_text()
    # sweep_seeds: named settings of several runs, paired by seed; a setting against itself differs by 0
    ss = _analysis("sweep_seeds")
    sides = [f"{tmp_path / 's0'}::shared", f"{tmp_path / 's1'}::shared"]
    same = ss.main([*[x for s in sides for x in ("--a", s)], *[x for s in sides for x in ("--b", s)],
                    "--out", str(tmp_path / "same.json")])
    assert same["diff"] == 0 and same["lo"] == same["hi"] == 0 and same["seeds"] == 2
    cross = ss.main(["--a", f"{tmp_path / 's1'}::learned (MAP, evidence)", "--b", sides[1],
                     "--out", str(tmp_path / "cross.json")])
    assert cross["per_seed"] == [pytest.approx(pairs[("learned [offset]", "shared")]["diff"])]
    # a baseline's JSON (analysis/per_task_lora.py's keys) reads as the same documents
    docs1 = json.loads((tmp_path / "s1" / "test_doc_nll.json").read_text())
    (tmp_path / "base.json").write_text(json.dumps({"doc_nll": docs1["shared"], "tokens": docs1["_tokens"],
                                                    "task_ids": docs1["_task_ids"]}))
    via = ss.main(["--a", f"{tmp_path / 's1'}::learned (MAP, evidence)", "--b", str(tmp_path / "base.json"),
                   "--out", str(tmp_path / "via.json")])
    assert via["per_seed"] == cross["per_seed"]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match="no doc_nll"):
        ss.main(["--a", sides[1], "--b", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="one of each per seed"):
        ss.main(["--a", sides[0], "--a", sides[1], "--b", sides[0], "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="no setting"):
        ss.main(["--a", f"{tmp_path / 's1'}::tau=100", "--b", sides[0], "--out", str(tmp_path / "x.json")])
    # runs with other fit settings (here the learning rate) are not seeds of the same procedure
    sweep.main(["--tiny", "--epochs", "0.5", "--quiet", "--lr", "1e-3", "--only", "shared",
                "--out", str(tmp_path / "lr")])
    with pytest.raises(SystemExit, match="other fit settings"):
        _analysis("combine").main([str(tmp_path / "s1"), str(tmp_path / "lr")])


def test_posterior_analysis_scripts_on_a_tiny_laplace_fit(tmp_path):
    """analysis/posterior_scale.py and analysis/gradient_span.py on a tiny saved fit (the embedded default's
    commands with a tiny model): scale 0 is the MAP; variance ratios lie in (0, 1]."""
    from bora.cli.main import main as bora_main

    from conftest import tiny_model_dir, write_jsonl

    model, data = tiny_model_dir(tmp_path / "model"), write_jsonl(tmp_path / "data.jsonl")
    fit = tmp_path / "fit"
    assert bora_main(["fit", "--model", str(model), "--data", str(data), "--task-column", "speaker", "--targets",
                      "q_proj", "v_proj", "--layers", "-1", "--rank", "2", "--steps", "6", "--batch-size", "4",
                      "--lr", "0.02", "--tau-mode", "fixed", "--tau", "10", "--output", str(fit), "--quiet",
                      "--device", "cpu"]) == 0

    res = _analysis("posterior_scale").main([str(fit), "--samples", "3", "--scales", "0", "1", "--out", str(tmp_path)])
    for split in ("val", "test"):
        assert res["rows"][split]["0.0"][0] == pytest.approx(res["rows"][split]["map"][0], abs=1e-6)
        assert res["rows"][split]["1.0"][0] != res["rows"][split]["map"][0]
    # the tilted estimator of the same quantity (diagonal Laplace: the default structure), at a narrowed width
    tilted = _analysis("posterior_scale").main([str(fit), "--samples", "3", "--scales", "0.5", "--estimator", "tilted",
                                           "--out", str(tmp_path / "tilted")])
    assert tilted["estimator"] == "tilted"
    assert "estimator `tilted`" in (tmp_path / "tilted" / "posterior_scale.md").read_text()
    for split in ("val", "test"):
        assert abs(tilted["rows"][split]["0.5"][0] - res["rows"][split]["map"][0]) < 0.1
    span = _analysis("gradient_span").main([str(fit), "--docs", "4", "--quiet", "--out", str(tmp_path)])["summary"]
    assert set(span) == {"train lowrank", "train diag", "test lowrank", "test diag"}
    for row in span.values():
        assert 0 < row["q25"] <= row["median"] <= row["q75"] <= 1 + 1e-6
    # the low-rank posterior pins down its own training documents' directions more than the diagonal does
    assert span["train lowrank"]["median"] < span["train diag"]["median"]
    assert (tmp_path / "posterior_scale.md").exists() and (tmp_path / "gradient_span.md").exists()
    gain = _analysis("bma_gain").main([str(fit), "--draws", "2", "--samples", "4", "--out", str(tmp_path)])
    assert len(gain["rows"]) == 3 and all(r["realised"] > 0 and r["expected"] > 0 for r in gain["rows"])
    assert gain["mean_gain"] == pytest.approx(gain["mean_realised"] - gain["mean_expected"])
    c = gain["sampled"]
    assert c["half_var"] > 0 and c["bma_lme"] >= c["cost"] - 1e-9  # Jensen: log mean exp >= mean log
    assert (tmp_path / "bma_gain.md").exists()


def test_compare_fits_pairs_seeds(tmp_path):
    """analysis/compare_fits.py on two settings x two seeds: the seed-and-document bootstrap, and one seed alone."""
    from bora.cli.main import main as bora_main
    from conftest import tiny_model_dir, write_jsonl

    model, data = tiny_model_dir(tmp_path / "model"), write_jsonl(tmp_path / "data.jsonl")
    fits = {}
    for mode in ("learned", "shared"):
        for seed in (0, 1):
            out = tmp_path / f"{mode}{seed}"
            assert bora_main(["fit", "--model", str(model), "--data", str(data), "--task-column", "speaker",
                              "--targets", "q_proj", "--layers", "-1", "--rank", "2", "--steps", "3",
                              "--batch-size", "4", "--tau-mode", mode, "--seed", str(seed), "--output", str(out),
                              "--quiet", "--device", "cpu"]) == 0
            fits[mode, seed] = str(out)
    cf = _analysis("compare_fits")
    two = cf.main([f"{fits['learned', 0]},{fits['learned', 1]}", f"{fits['shared', 0]},{fits['shared', 1]}",
                   "--out", str(tmp_path / "two.json")])
    b = two["bootstrap"]
    assert b["seeds"] == 2 and len(two["ppl_a"]) == 2 and len(two["doc_nll"]["a"]) == 2
    per_seed = [pa - pb for pa, pb in zip(two["ppl_a"], two["ppl_b"])]
    assert b["per_seed"] == pytest.approx(per_seed, rel=1e-9) and b["diff"] == pytest.approx(sum(per_seed) / 2)
    assert b["lo"] <= b["diff"] <= b["hi"]
    one = cf.main([fits["learned", 1], fits["shared", 1], "--out", str(tmp_path / "one.json")])
    assert one["ppl_a"] == pytest.approx(two["ppl_a"][1]) and one["bootstrap"]["diff"] == pytest.approx(per_seed[1])
    with pytest.raises(SystemExit, match="same number of fits"):
        cf.main([fits["learned", 0], f"{fits['shared', 0]},{fits['shared', 1]}", "--out", str(tmp_path / "x.json")])


def test_many_tasks_summary_adds_baselines_and_buckets(tmp_path):
    _analysis("tau_sweep").main(["--tiny", "--epochs", "0.5", "--taus", "100", "--quiet",
                                 "--out", str(tmp_path / "s0")])
    docs = json.loads((tmp_path / "s0" / "test_doc_nll.json").read_text())
    meta = json.loads((tmp_path / "s0" / "meta.json").read_text())
    copy = {"doc_nll": docs["shared"], "tokens": docs["_tokens"], "task_ids": docs["_task_ids"], "tasks": meta["tasks"]}
    (tmp_path / "copy.json").write_text(json.dumps(copy))
    many = _analysis("many_tasks")
    out = many.main([str(tmp_path / "s0"), "--baseline", f"copy={tmp_path / 'copy.json'}",
                     "--out", str(tmp_path / "sum.md")])
    assert out["overall"]["copy"] == out["overall"]["shared"]  # a baseline is compared exactly as a setting
    assert out["best_grid_by_validation"] == "tau=100" and out["better_limit"] in ("shared", "uncoupled")
    for s in ("copy", "shared", "uncoupled", "tau=100"):
        assert sum(r["test_docs"] for r in out["by_size"] if r["b"] == s) == len(docs["_task_ids"])
    bad = dict(copy, task_ids=list(reversed(copy["task_ids"])))
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(SystemExit, match="test documents"):
        many.main([str(tmp_path / "s0"), "--baseline", f"bad={tmp_path / 'bad.json'}", "--out", str(tmp_path / "x.md")])


def test_bma_seeds_recomputes_each_evaluation(tmp_path, capsys):
    """analysis/bma_seeds.py on two posterior seeds of a tiny Laplace fit: each seed's MAP and BMA NLL equal the
    evaluation's own task-mean figures, and a copy that scores other documents is refused."""
    from bora.cli.main import main

    from conftest import tiny_model_dir, write_jsonl

    model, data, out = tiny_model_dir(tmp_path / "model"), write_jsonl(tmp_path / "data.jsonl"), tmp_path / "fit"
    assert main(["fit", "--model", str(model), "--data", str(data), "--task-column", "speaker", "--targets", "q_proj",
                 "--layers", "-1", "--rank", "2", "--steps", "4", "--batch-size", "4", "--output", str(out),
                 "--quiet", "--device", "cpu"]) == 0
    evals = []
    for s in (0, 1):
        evals.append(tmp_path / f"e{s}.json")
        assert main(["evaluate", str(out), "--samples", "3", "--seed", str(s), "--json", str(evals[-1]), "--quiet",
                     "--device", "cpu"]) == 0
    capsys.readouterr()
    res = _analysis("bma_seeds").main([*map(str, evals), "--out", str(tmp_path / "bma.json")])
    for e, r in zip(evals, res["per_seed"]):
        d = json.loads(e.read_text())["posterior"]
        assert r["nll_point"] == pytest.approx(math.log(d["point"]["overall"]["ppl_task_mean"]), rel=1e-6)
        assert r["nll_bma"] == pytest.approx(math.log(d["bma_doc"]["overall"]["ppl_task_mean"]), rel=1e-6)
    assert res["per_seed"][0]["nll_bma"] != res["per_seed"][1]["nll_bma"]  # other draws
    assert res["paired"]["lo"] <= res["paired"]["diff"] <= res["paired"]["hi"]
    assert (tmp_path / "bma.md").read_text().count("| 0 |") == 1
    other = json.loads(evals[1].read_text())
    other["posterior"]["documents"]["tokens"][0] += 1
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="other documents"):
        _analysis("bma_seeds").main([str(evals[0]), str(tmp_path / "other.json"), "--out", str(tmp_path / "x.json")])


def test_tau_curvature_script(tmp_path, capsys):
    """analysis/tau_curvature.py on a tiny learned-tau fit: the diagonal's profiled tau is at least the full
    curvature's (its gamma is an upper bound at every tau), the rank is at most the documents used, and a fit
    without a learned tau is refused."""
    from bora.cli.main import main

    from conftest import tiny_model_dir, write_jsonl

    model, data = tiny_model_dir(tmp_path / "model"), write_jsonl(tmp_path / "data.jsonl")
    common = ["--model", str(model), "--data", str(data), "--task-column", "speaker", "--targets", "q_proj", "v_proj",
              "--layers", "-1", "--rank", "2", "--steps", "6", "--batch-size", "4", "--lr", "0.02", "--quiet",
              "--device", "cpu", "--guide", "map"]
    assert main(["fit", *common, "--tau-mode", "learned", "--output", str(tmp_path / "fit")]) == 0
    res = _analysis("tau_curvature").main([str(tmp_path / "fit"), "--out", str(tmp_path / "tc"), "--quiet"])
    t, ga = res["tau"], res["gamma_at_fit_tau"]
    assert t["diag_profiled"] >= t["lowrank_profiled"] * (1 - 1e-6) and ga["diag"] >= ga["lowrank"]
    assert 0 < res["rank"]["total"] <= res["rank"]["documents"] == sum(res["sizes"])
    assert (tmp_path / "tc" / "tau_curvature.md").exists()
    # sampled labels, 4 draws: the averages of 1, 2 and 4 draws, whose rank grows with the draws
    res = _analysis("tau_curvature").main([str(tmp_path / "fit"), "--out", str(tmp_path / "tc4"), "--quiet",
                                           "--labels", "sampled", "--label-samples", "4"])
    rows = res["by_samples"]
    assert [r["samples"] for r in rows] == [1, 2, 4] and res["tau"] == rows[-1]["tau"]
    ranks = [r["rank"]["total"] for r in rows]
    assert ranks[0] <= ranks[1] <= ranks[2] <= 4 * res["rank"]["documents"] and ranks[2] > ranks[0]
    for r in rows:
        assert r["gamma_at_fit_tau"]["diag"] >= r["gamma_at_fit_tau"]["lowrank"] * (1 - 1e-9)
    assert rows[0]["gamma_at_fit_tau"] != rows[2]["gamma_at_fit_tau"]  # other draws, another Fisher
    assert "| 4 | full (low-rank) |" in (tmp_path / "tc4" / "tau_curvature.md").read_text()
    with pytest.raises(SystemExit):
        _analysis("tau_curvature").main([str(tmp_path / "fit"), "--out", str(tmp_path / "x"), "--label-samples", "2"])
    assert main(["fit", *common, "--tau-mode", "fixed", "--tau", "10", "--output", str(tmp_path / "fixed")]) == 0
    with pytest.raises(SystemExit, match="one learned tau"):
        _analysis("tau_curvature").main([str(tmp_path / "fixed"), "--out", str(tmp_path / "x"), "--quiet"])
