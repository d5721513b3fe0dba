"""The command line as a user runs it: fit, evaluate, and one-line errors with a non-zero exit."""

import dataclasses
import json
import re
import typing

import pytest

from bora.cli.args import config_from_args
from bora.cli.main import main
from bora.core.config import (AdapterConfig, BoraConfig, CheckpointConfig, ConfigError, DataConfig, FitConfig,
                              PriorConfig)

from conftest import tiny_model_dir, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return tiny_model_dir(d / "model"), write_jsonl(d / "data.jsonl"), d


def test_fit_then_evaluate(setup, capsys):
    model, data, d = setup
    out = d / "fit"
    rc = main(["fit", "--model", str(model), "--data", str(data), "--task-column", "speaker", "--targets", "q_proj",
               "v_proj", "--layers", "-1", "--rank", "2", "--steps", "6", "--batch-size", "4", "--lr", "0.02",
               "--tau-mode", "learned", "--output", str(out), "--quiet", "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "overall: exp(mean per-task NLL)" in text and "spk0" in text and "tau: tau=" in text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["task_column"] == "speaker" and cfg["adapter"]["layers"] == [-1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]["fit"]["per_task"]) == {"spk0", "spk1", "spk2"}
    rc = main(["evaluate", str(out), "--quiet", "--device", "cpu"])
    again = capsys.readouterr().out
    assert rc == 0
    want = metrics["test"]["fit"]["overall"]["ppl_task_mean"]
    assert f"{want:>9.3f}" in again  # evaluate reproduces the fit's test perplexity
    # a Laplace fit (the default guide): the document-level BMA by the tilted estimator, the plain one beside it
    assert main(["evaluate", str(out), "--samples", "3", "--quiet", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "plain log-mean-exp over samples" in text and "effective sample size median" in text
    assert main(["evaluate", str(out), "--samples", "3", "--doc-estimator", "plain", "--quiet", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "BMA (S=3)" in text and "plain log-mean-exp" not in text


@pytest.mark.parametrize("args,msg", [
    (["--data", "missing.jsonl"], "data file not found"),
    (["--task-column", "nope"], "nope"),
    (["--tau", "-1"], "tau must be"),
    (["--targets", "zz_proj"], "no module matches"),
    (["--layers", "x"], "--layers takes integers"),
    (["--load-in-4bit", "--device", "cpu"], "4bit quantised base model needs a CUDA GPU"),
    (["--load-in-8bit", "--device", "cpu"], "8bit quantised base model needs a CUDA GPU"),
    (["--load-in-8bit", "--load-in-4bit"], "exclude each other"),
])
def test_user_errors_are_one_line(setup, capsys, args, msg):
    model, data, d = setup
    base = ["fit", "--model", str(model), "--data", str(data), "--task-column", "speaker", "--steps", "1",
            "--layers", "-1", "--output", str(d / "err"), "--quiet"]
    rc = main(base + args)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert msg in err and err.startswith("bora: error:") and "\n" not in err
    assert not (d / "err").exists()


def test_evaluate_missing_folder(capsys, tmp_path):
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
    assert "fit folder not found" in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    for flag in ("--tau-mode", "--rank", "--targets", "--layers", "--lr", "--batch-size", "--seed", "--output",
                 "--text-column", "--task-column", "--guide", "--steps", "--epochs", "--model", "--data"):
        assert flag in text


# ---------------------------------------------------------------- flags generated from the config fields

def _parse(argv):
    from bora.cli.args import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(argv), argv)


def _config_file(tmp_path):
    cfg = BoraConfig(model="m0", quantize="8bit", adapter=AdapterConfig(rank=3, layers=None),
                     prior=PriorConfig(tau=5.0, tau_per_module=True),
                     fit=FitConfig(lr=0.1, cache_prefix=False, weight_decay=0.01),
                     data=DataConfig(source="x.jsonl", seed=7, tasks=("a",)))
    path = tmp_path / "c.json"
    path.write_text(cfg.to_json())
    return cfg, path


def test_command_lines_parse_to_the_same_config_as_before(tmp_path):
    """The configs the hand-written flag table built for these command lines (flag names, renamed flags, switches,
    'all', nargs), and ``--config`` with only typed flags overriding the file."""
    out = ["fit", "-o", "out"]
    assert _parse(out) == BoraConfig()
    argv = out + ["--model", "mm", "--data", "fortunes", "--tasks", "a", "b", "--targets", "q_proj", "--layers", "all",
                  "--tau-mode", "fixed", "--tau", "100", "--tau-per-module", "--no-cache-prefix", "--load-in-4bit",
                  "--split-seed", "3", "--seed", "4", "--steps", "5", "--laplace-structure", "lowrank",
                  "--precision", "fp32", "--duplicates", "drop", "--long-documents", "chunk"]
    assert _parse(argv) == BoraConfig(
        model="mm", quantize="4bit", adapter=AdapterConfig(targets=("q_proj",), layers=None),
        prior=PriorConfig(tau_mode="fixed", tau=100.0, tau_per_module=True),
        fit=FitConfig(cache_prefix=False, seed=4, steps=5, laplace_structure="lowrank", precision="fp32"),
        data=DataConfig(source="fortunes", tasks=("a", "b"), seed=3, duplicates="drop", long_documents="chunk"))
    assert _parse(out + ["--layers", "-1", "-2", "--rank", "2", "--alpha", "4", "--load-in-8bit"]) == BoraConfig(
        quantize="8bit", adapter=AdapterConfig(layers=(-1, -2), rank=2, alpha=4.0))
    assert _parse(out + ["--guide", "meanfield", "--lr", "0.5", "--schedule", "constant", "--text-column", "b",
                         "--val-fraction", "0.1"]) == BoraConfig(
        fit=FitConfig(guide="meanfield", lr=0.5, schedule="constant"), data=DataConfig(text_column="b",
                                                                                       val_fraction=0.1))
    cfg, path = _config_file(tmp_path)
    assert _parse(out + ["--config", str(path)]) == cfg  # untyped flags keep the file's settings
    assert _parse(out + ["--config", str(path), "--rank", "5", "--tau-m", "shared", "--split-seed=2"]) == cfg.replace(
        adapter=cfg.adapter.replace(rank=5), prior=cfg.prior.replace(tau_mode="shared"),
        data=cfg.data.replace(seed=2))  # abbreviations and --flag=value count as typed
    assert _parse(out + ["--config", str(path), "--load-in-4bit", "--layers", "-1"]) == cfg.replace(
        quantize="4bit", adapter=cfg.adapter.replace(layers=(-1,)))


def _other_value(fl):
    """A valid value other than the field's default, as typed on the command line."""
    default, choices = fl.field.default, fl.field.metadata.get("choices")
    if choices:
        return [next(c for c in choices if c != default)]
    if isinstance(default, tuple) or fl.field.name in ("tasks", "layers"):
        return ["1"] if fl.field.name == "layers" else ["a"]
    kind = typing.get_args(fl.hint)[0] if typing.get_args(fl.hint) else fl.hint
    if kind is int:
        return [str((default or 0) + 1)]
    if kind is float:
        return [str(default / 2 if default else 0.5)]
    return ["x"]


def _all_fields():
    for cls in (AdapterConfig, PriorConfig, FitConfig, DataConfig, CheckpointConfig, BoraConfig):
        for f in dataclasses.fields(cls):
            if not (isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory)):
                yield cls, f


def test_every_config_field_has_a_flag_or_a_documented_reason(capsys):
    from bora.cli.args import build_parser, config_flags, fields_without_flag

    flags = config_flags()
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    fields = list(_all_fields())
    assert len(fields) == len({(fl.cls, fl.field.name) for fl in flags}) + len(fields_without_flag())
    for cls, f in fields:
        mine = [fl for fl in flags if fl.cls is cls and fl.field.name == f.name]
        if not mine:
            why = f.metadata.get("no_flag")
            assert why and " ".join(f"{why}".split()) in help_text, f"{cls.__name__}.{f.name} has no flag, no reason"
            continue
        for fl in mine:  # the flag reaches its field
            argv = ["fit", "-o", "x", "--" + fl.name] + ([] if fl.switch else _other_value(fl))
            if f.name == "num_particles":  # several particles need a guide that draws
                argv += ["--guide", "meanfield"]
            if f.name in ("task_bank", "task_bank_dir"):  # a task bank needs lazy updates; its folder, the disk bank
                argv += ["--task-updates", "lazy"] + (["--task-bank", "disk"] if f.name == "task_bank_dir" else [])
            if f.name in ("prompt_column", "completion_column"):  # prompt/completion data needs both columns
                argv += ["--completion-column" if f.name == "prompt_column" else "--prompt-column", "other"]
            if f.name == "tau_per_task":  # per-task taus use the profiled evidence
                argv += ["--tau-evidence", "profiled"]
            if f.name in ("label_column", "choices_column", "label_map"):  # classification: a prompt and a label
                argv += ["--prompt-column", "other"] + ([] if f.name == "label_column" else ["--label-column", "y"])
            args = build_parser().parse_args(argv)
            if cls is CheckpointConfig:
                got = CheckpointConfig(**{f.name: getattr(args, fl.dest)})
            else:
                got = config_from_args(args, argv)
                for key in fl.path[:-1]:
                    got = getattr(got, key)
            value = getattr(got, f.name)
            assert value != f.default and (not fl.switch or value == fl.const), (fl.name, value)
            assert f"--{fl.name}" in help_text


@pytest.mark.parametrize("cls", [AdapterConfig, PriorConfig, FitConfig, DataConfig, CheckpointConfig, BoraConfig])
def test_choices_are_one_tuple_for_the_flag_and_the_validation(cls):
    from bora.cli.args import config_flags

    flags = {(fl.cls, fl.field.name): fl for fl in config_flags()}
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        if not choices:
            continue
        with pytest.raises(ConfigError, match=f"{f.name} must be one of"):
            cls(**{f.name: "not-a-choice"})
        fl = flags[(cls, f.name)]
        if not fl.switch:
            with pytest.raises(SystemExit):
                main(["fit", "-o", "x", "--" + fl.name, "not-a-choice"])


COMMANDS = {"fit": [], "evaluate": ["F"], "report": ["F"], "laplace": ["F"],
            "sample": ["F", "--task", "t", "--prompt", "p"], "export": ["F", "--task", "t", "-o", "x"]}


def test_common_flags_are_declared_once_and_accepted_by_every_command():
    import argparse

    from bora.cli.args import COMMON_FLAGS, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
    seen = {}
    for name, parser in sub.choices.items():
        for flag in COMMON_FLAGS:
            action = next(a for a in parser._actions if a.dest == flag)
            seen.setdefault(flag, set()).add(id(action))  # the very same declaration in every command
        args = build_parser().parse_args([name, *COMMANDS[name], "--quiet", "--device", "cpu"])
        assert args.quiet is True and args.device == "cpu"
        assert build_parser().parse_args([name, *COMMANDS[name]]).quiet is False
    assert all(len(ids) == 1 for ids in seen.values()), seen


def test_sample_and_export_honour_quiet(setup, capsys, monkeypatch):
    import bora.cli.main as cli_main

    model, data, d = setup
    out = d / "quiet-fit"
    assert main(["fit", "--model", str(model), "--data", str(data), "--task-column", "speaker", "--targets",
                 "q_proj", "--layers", "-1", "--rank", "2", "--steps", "2", "--batch-size", "4", "--guide", "map",
                 "--output", str(out), "--quiet", "--device", "cpu"]) == 0
    seen = []
    real = cli_main._quiet_libraries

    def spy(quiet):
        seen.append(quiet)
        return real(quiet)

    monkeypatch.setattr(cli_main, "_quiet_libraries", spy)
    capsys.readouterr()
    assert main(["sample", str(out), "--task", "spk0", "--prompt", "w1", "--samples", "1", "--max-new-tokens", "2",
                 "--quiet", "--device", "cpu"]) == 0
    assert main(["export", str(out), "--task", "spk0", "-o", str(d / "quiet-export"), "--quiet", "--device",
                 "cpu"]) == 0
    assert main(["export", str(out), "--task", "spk0", "-o", str(d / "loud-export"), "--device", "cpu"]) == 0
    assert seen == [True, True, False]
    captured = capsys.readouterr()
    assert "[1]" in captured.out and "PEFT adapter folder" in captured.out and captured.err == ""


# a measured figure: a percentage, a size, a speed-up or timing, or a result "on the embedded default"
MEASURED = re.compile(r"\d\s*(%|percent\b|[kmg]i?b\b|ms\b|s\b|seconds?\b|tokens/s)|\d(\.\d+)?\s*x\b"
                      r"|\b(faster|slower)\b|on the embedded default", re.IGNORECASE)


def _all_help_texts():
    import argparse

    from bora.cli.args import build_parser

    for cls, f in _all_fields():
        yield f"{cls.__name__}.{f.name}", f.metadata.get("help", "") + " " + f.metadata.get("no_flag", "")
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        yield f"{name} epilog", p.epilog or ""
        for action in p._actions:
            yield f"{name} {'/'.join(action.option_strings) or action.dest}", action.help or ""
    for action in sub._choices_actions:
        yield f"{action.dest} summary", action.help or ""


def test_help_states_what_a_setting_does_never_a_measured_figure():
    for bad in ("tau within 1.4 percent of 'pass'", "233 MB on the embedded default", "10 MB",
                "bf16 is 2-4x faster per matmul", "by about 0.1%", "3 s per step"):
        assert MEASURED.search(bad), bad
    for fine in ("the top 4 layers", "'4bit' (NF4, bf16 compute)", "S + 1 more forward passes", "cuda:1",
                 "tau^-1/2 z_t, z_t ~ Normal(0, 1)", "8bit (LLM.int8)", "0 disables"):
        assert not MEASURED.search(fine), fine
    found = [(where, MEASURED.search(text).group(0)) for where, text in _all_help_texts() if MEASURED.search(text)]
    assert not found, found


def test_the_table_groups_many_tasks_by_training_size():
    import math

    from bora.cli.tables import MAX_TASK_ROWS, format_table

    names = [f"task{i}" for i in range(MAX_TASK_ROWS + 5)]
    fit = {"per_task": {n: {"nll": 2.0, "ppl": math.exp(2.0), "docs": 2, "tokens": 9} for n in names},
           "overall": {"ppl_task_mean": math.exp(2.0), "ppl_token": math.exp(2.0)}}
    base = {"per_task": {n: {"nll": 2.5, "ppl": math.exp(2.5), "docs": 2, "tokens": 9} for n in names},
            "overall": {"ppl_task_mean": math.exp(2.5), "ppl_token": math.exp(2.5)}}
    sizes = {n: 1 if i < 10 else 50 for i, n in enumerate(names)}
    out = format_table(base, fit, train_sizes=sizes)
    assert "task0 " not in out and out.splitlines()[0].startswith("training docs per task")
    assert [line.split()[:2] for line in out.splitlines()[1:3]] == [["1-2", "10"], ["31-100", str(len(names) - 10)]]
    assert f"on {len(names)} of {len(names)} tasks" in out
    assert "task0 " in format_table(base, fit)  # without sizes: every task listed
