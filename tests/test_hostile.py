"""Hostile inputs: every case exits 2 with exactly one ``bora: error:`` line, no traceback, and writes
or changes nothing (the table is documented in docs/hostile_inputs.md). Then the positive side of
"never delete what bora did not write": overwrite, export --all merging, umask, fit folders from
elsewhere (pickle beside, base-model mismatch, corrupt weights)."""

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bora.api import Bora
from bora.io.checkpoint import load_checkpoint
from bora.cli.main import main
from bora.core.config import BoraConfig, ConfigError, DataConfig, FitConfig
from bora.data.documents import load_documents
from bora.io.export import export_adapters
from bora.io.fitfolder import save_fit

from conftest import tiny_model_dir, write_jsonl

DOCS = Path(__file__).resolve().parents[1] / "docs" / "hostile_inputs.md"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One tiny fit (and one export of it) shared by every case; cases copy it before damaging it."""
    d = tmp_path_factory.mktemp("hostile")
    model, data = tiny_model_dir(d / "model"), write_jsonl(d / "data.jsonl")
    tiny_model_dir(d / "other", seed=1)  # same architecture, other weights
    fit = d / "fit"
    assert main(["fit", *FIT_ARGS(model, data), "--output", str(fit)]) == 0
    assert main(["export", str(fit), "--task", "spk0", "-o", str(d / "export"), "--device", "cpu"]) == 0
    return {"d": d, "model": model, "data": data, "fit": fit, "export": d / "export"}


def FIT_ARGS(model, data):
    return ["--model", str(model), "--data", str(data), "--task-column", "speaker", "--targets", "q_proj",
            "--layers", "-1", "--rank", "2", "--steps", "2", "--batch-size", "4", "--quiet", "--device", "cpu"]


# ---------------------------------------------------------------- helpers for the cases

def write(ws, name, content):
    p = ws / name
    p.parent.mkdir(parents=True, exist_ok=True)
    (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
    return p


def jsonl(ws, rows, extra=""):
    """The good data with ``rows`` (dicts or raw lines) appended."""
    good = [json.dumps({"text": f"w{t} w{5 + i} w{t} w9", "speaker": f"spk{t}"}) for t in range(3) for i in range(4)]
    lines = good + [r if isinstance(r, str) else json.dumps(r) for r in rows]
    return write(ws, "d.jsonl", "\n".join(lines) + "\n" + extra)


def pairs(ws, rows):
    """Good prompt/completion data (columns q, a, speaker) with ``rows`` appended (from line 13)."""
    good = [json.dumps({"q": f"w{5 + i} w{t}", "a": f" w{t} w9", "speaker": f"spk{t}"}) for t in range(3) for i in range(4)]
    return write(ws, "p.jsonl", "\n".join(good + [json.dumps(r) for r in rows]) + "\n")


def chats(ws, rows):
    """Good chat data (columns chat, speaker) with ``rows`` appended (from line 13)."""
    good = [json.dumps({"chat": [{"role": "user", "content": f"w{5 + i}"}, {"role": "assistant", "content": f"w{t}"}],
                        "speaker": f"spk{t}"}) for t in range(3) for i in range(4)]
    return write(ws, "c.jsonl", "\n".join(good + [json.dumps(r) for r in rows]) + "\n")


def choices(ws, rows):
    """Good multiple-choice data (columns q, choices, answer, speaker) with ``rows`` appended (from line 13)."""
    good = [json.dumps({"q": f"w{5 + i}", "choices": [f" w{t}", " w9", " w10 w11"], "answer": i % 3,
                        "speaker": f"spk{t}"}) for t in range(3) for i in range(4)]
    return write(ws, "m.jsonl", "\n".join(good + [json.dumps(r) for r in rows]) + "\n")


def labelled(ws, rows):
    """Good classification data with a fixed label set (columns q, y, speaker) and the label map ``map.json``
    (pos, neg), with ``rows`` appended (from line 13)."""
    write(ws, "map.json", json.dumps({"pos": " w1", "neg": " w2"}))
    good = [json.dumps({"q": f"w{5 + i}", "y": ("pos", "neg")[i % 2], "speaker": f"spk{t}"})
            for t in range(3) for i in range(4)]
    return write(ws, "l.jsonl", "\n".join(good + [json.dumps(r) for r in rows]) + "\n")


PAIR = ("--prompt-column", "q", "--completion-column", "a")
MC = ("--prompt-column", "q", "--choices-column", "choices", "--label-column", "answer")
LABEL = ("--prompt-column", "q", "--label-column", "y")
CHAT = ("--messages-column", "chat")


def copy_fit(env, ws, name="fit"):
    return Path(shutil.copytree(env["fit"], ws / name))


def edit_json(path, fn):
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def no_checksums(fit):
    edit_json(fit / "tasks.json", lambda m: m.pop("checksums"))


def sentinel(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("the user's file")
    return folder


def fit(env, ws, data=None, *extra):
    return ["fit", *FIT_ARGS(env["model"], data or env["data"]), "--output", str(ws / "out"), *extra]


def truncated_guide(env, ws, checksums=True):
    f = copy_fit(env, ws)
    g = f / "guide.safetensors"
    g.write_bytes(g.read_bytes()[: g.stat().st_size // 2])
    if not checksums:
        no_checksums(f)
    return f


class Boom:
    """Unpickling this would create the file ``marker``: proof that a loader executed code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def pickle_guide(env, ws):
    f = copy_fit(env, ws)
    (f / "guide.safetensors").write_bytes(pickle.dumps(Boom(ws / "EXECUTED")))
    no_checksums(f)
    return f


def nan_guide(env, ws):
    f = copy_fit(env, ws)
    t = {k: v.clone() for k, v in Bora_tensors(f).items()}
    next(iter(t.values())).view(-1)[0] = float("nan")
    save_file(t, str(f / "guide.safetensors"))
    no_checksums(f)
    return f


def Bora_tensors(f):
    from safetensors.torch import load_file

    return load_file(str(f / "guide.safetensors"))


def interrupted(env, ws):
    f = ws / "run"
    (f / "checkpoints").mkdir(parents=True)
    (f / "checkpoints" / "LATEST").write_text('{"step": 2, "folder": "step-00000002-0123456789abcdef"}')
    return f


def edit_config(env, ws, fn):
    f = copy_fit(env, ws)
    edit_json(f / "config.json", fn)
    return f


def damaged(env, ws, fn):
    f = copy_fit(env, ws)
    fn(f)
    return str(f)


def loaded(env):
    return Bora.load(env["fit"], device="cpu")


# ---------------------------------------------------------------- the table
# (id, command line or Python call built from (env, ws), expected words in the one error line)

CASES = [
    # --- fit: data
    ("fit: empty data file", lambda e, w: fit(e, w, write(w, "d.jsonl", "")), "is empty"),
    ("fit: data file of blank lines", lambda e, w: fit(e, w, write(w, "d.jsonl", "\n \n\n")), "is empty"),
    ("fit: invalid JSON line", lambda e, w: fit(e, w, jsonl(w, ['{"text": "w1", "speaker": '])), "line 13: invalid JSON"),
    ("fit: JSON line that is not an object", lambda e, w: fit(e, w, jsonl(w, ["[1, 2]"])), "line 13: expected a JSON object"),
    ("fit: non-string text value", lambda e, w: fit(e, w, jsonl(w, [{"text": 5, "speaker": "spk0"}])), "line 13: the text column"),
    ("fit: document without a task value", lambda e, w: fit(e, w, jsonl(w, [{"text": "w1 w2"}])), "line 13: a document without a value"),
    ("fit: task value that is an object", lambda e, w: fit(e, w, jsonl(w, [{"text": "w1", "speaker": {"a": 1}}])), "task values must be"),
    ("fit: non-UTF-8 bytes", lambda e, w: fit(e, w, write(w, "d.jsonl", jsonl(w, []).read_bytes() + b'{"text": "w1 \xff", "speaker": "spk0"}\n')), "line 13: not valid UTF-8"),
    ("fit: task with only whitespace documents", lambda e, w: fit(e, w, jsonl(w, [{"text": "  ", "speaker": "ghost"}, {"text": "\n\t", "speaker": "ghost"}])), "'ghost'"),
    ("fit: CSV row with too many fields", lambda e, w: fit(e, w, write(w, "d.csv", "text,speaker\nw1 w2,spk0,extra\n")), "line 2: 3 fields"),
    ("fit: CSV with an unterminated quote", lambda e, w: fit(e, w, write(w, "d.csv", 'text,speaker\n"w1 w2,spk0\n')), "malformed CSV"),
    ("fit: CSV with only a header", lambda e, w: fit(e, w, write(w, "d.csv", "text,speaker\n")), "no documents"),
    ("fit: .txt data file", lambda e, w: fit(e, w, write(w, "d.txt", "w1 w2\n")), "no task column"),
    ("fit: unsupported file type", lambda e, w: fit(e, w, write(w, "d.xml", "<a/>")), "unsupported file type"),
    ("fit: missing data file", lambda e, w: fit(e, w, w / "missing.jsonl"), "data file not found"),
    ("fit: a data folder with two data files", lambda e, w: fit(e, w, (jsonl(w / "two", []), write(w / "two", "b.csv", "text,speaker\nw1 w2,s\n"))[0].parent), "a folder with 2 data files"),
    ("fit: task with 2 documents", lambda e, w: fit(e, w, jsonl(w, [{"text": "w1 w2", "speaker": "few"}] * 2)), "at least 3"),
    ("fit: --tasks names an unknown task", lambda e, w: fit(e, w, None, "--tasks", "nope"), "'nope' has no documents"),
    ("fit: --text-column that does not exist", lambda e, w: fit(e, w, None, "--text-column", "body"), "column 'body' not found"),
    # --- fit: prompt/completion and chat data
    ("fit: --prompt-column without --completion-column", lambda e, w: fit(e, w, pairs(w, []), "--prompt-column", "q"), "go together"),
    ("fit: --prompt-column with --messages-column", lambda e, w: fit(e, w, pairs(w, []), *PAIR, *CHAT), "excludes"),
    ("fit: --prompt-column that does not exist", lambda e, w: fit(e, w, pairs(w, []), "--prompt-column", "question", "--completion-column", "a"), "prompt column 'question' not found"),
    ("fit: --completion-column that does not exist", lambda e, w: fit(e, w, pairs(w, []), "--prompt-column", "q", "--completion-column", "answer"), "completion column 'answer' not found"),
    ("fit: --messages-column that does not exist", lambda e, w: fit(e, w, chats(w, []), "--messages-column", "turns"), "messages column 'turns' not found"),
    ("fit: --prompt-column with the embedded corpus", lambda e, w: fit(e, w, "shakespeare", *PAIR), "is plain text"),
    ("fit: row without a prompt", lambda e, w: fit(e, w, pairs(w, [{"a": " w1", "speaker": "spk0"}]), *PAIR), "line 13: no prompt"),
    ("fit: empty prompt", lambda e, w: fit(e, w, pairs(w, [{"q": " ", "a": " w1", "speaker": "spk0"}]), *PAIR), "line 13: empty prompt"),
    ("fit: row without a completion", lambda e, w: fit(e, w, pairs(w, [{"q": "w1", "speaker": "spk0"}]), *PAIR), "line 13: no completion"),
    ("fit: empty completion", lambda e, w: fit(e, w, pairs(w, [{"q": "w1", "a": "", "speaker": "spk0"}]), *PAIR), "line 13: empty completion"),
    ("fit: completion that is a number", lambda e, w: fit(e, w, pairs(w, [{"q": "w1", "a": 7, "speaker": "spk0"}]), *PAIR), "line 13: the completion column 'a' must hold strings"),
    ("fit: chat without an assistant turn", lambda e, w: fit(e, w, chats(w, [{"chat": [{"role": "user", "content": "w1"}], "speaker": "spk0"}]), *CHAT), "line 13: a chat without an assistant turn"),
    ("fit: messages value that is not a list", lambda e, w: fit(e, w, chats(w, [{"chat": {"role": "user"}, "speaker": "spk0"}]), *CHAT), "line 13: the messages column 'chat' must hold a non-empty list"),
    ("fit: message without role and content", lambda e, w: fit(e, w, chats(w, [{"chat": [{"text": "w1"}], "speaker": "spk0"}]), *CHAT), "line 13: message 1 must be an object"),
    ("fit: chat data and a tokenizer without a chat template", lambda e, w: fit(e, w, chats(w, []), *CHAT), "needs a tokenizer with a chat template"),
    # --- fit: classification and multiple-choice data
    ("fit: row without a label", lambda e, w: fit(e, w, choices(w, [{"q": "w1", "choices": [" w2", " w3"], "speaker": "spk0"}]), *MC), "line 13: no label"),
    ("fit: empty label", lambda e, w: fit(e, w, labelled(w, [{"q": "w1", "y": " ", "speaker": "spk0"}]), *LABEL), "line 13: empty label"),
    ("fit: label outside the label set", lambda e, w: fit(e, w, labelled(w, [{"q": "w1", "y": "meh", "speaker": "spk0"}]), *LABEL, "--label-map", str(w / "map.json")), "line 13: label 'meh' is not in the label set"),
    ("fit: a single label in the whole file", lambda e, w: fit(e, w, write(w, "one.jsonl", "".join(json.dumps({"q": f"w{i}", "y": "pos", "speaker": "spk0"}) + "\n" for i in range(6))), *LABEL), "at least 2 labels"),
    ("fit: row with a single choice", lambda e, w: fit(e, w, choices(w, [{"q": "w1", "choices": [" w2"], "answer": 0, "speaker": "spk0"}]), *MC), "line 13: a row needs at least 2 choices"),
    ("fit: choices that are not a list of strings", lambda e, w: fit(e, w, choices(w, [{"q": "w1", "choices": [" w2", 3], "answer": 0, "speaker": "spk0"}]), *MC), "line 13: the choices column 'choices' must hold a list of strings"),
    ("fit: choices that are a number", lambda e, w: fit(e, w, choices(w, [{"q": "w1", "choices": 3, "answer": 0, "speaker": "spk0"}]), *MC), "line 13: the choices column 'choices' must hold a list of strings, got int"),
    ("fit: repeated choice", lambda e, w: fit(e, w, choices(w, [{"q": "w1", "choices": [" w2", " w2"], "answer": 0, "speaker": "spk0"}]), *MC), "line 13: repeated choice"),
    ("fit: label index out of range", lambda e, w: fit(e, w, choices(w, [{"q": "w1", "choices": [" w2", " w3"], "answer": 2, "speaker": "spk0"}]), *MC), "line 13: label index 2 is out of range for 2 choices"),
    ("fit: label text that is not a choice", lambda e, w: fit(e, w, choices(w, [{"q": "w1", "choices": [" w2", " w3"], "answer": "w4", "speaker": "spk0"}]), *MC), "line 13: label 'w4' is not one of the row's 2 choices"),
    ("fit: --choices-column without --label-column", lambda e, w: fit(e, w, choices(w, []), "--prompt-column", "q", "--choices-column", "choices"), "--choices-column needs --label-column"),
    ("fit: --label-column without --prompt-column", lambda e, w: fit(e, w, labelled(w, []), "--label-column", "y"), "needs --prompt-column"),
    ("fit: --label-column that does not exist", lambda e, w: fit(e, w, labelled(w, []), "--prompt-column", "q", "--label-column", "label"), "label column 'label' not found"),
    ("fit: --label-map that is not a JSON object", lambda e, w: fit(e, w, labelled(w, []), *LABEL, "--label-map", str(write(w, "bad.json", "[1, 2]"))), "the label map must be a JSON object"),
    ("fit: --label-map with --choices-column", lambda e, w: fit(e, w, choices(w, []), *MC, "--label-map", str(w / "m.jsonl")), "--label-map is for a fixed label set"),
    ("fit: --label-column with the embedded corpus", lambda e, w: fit(e, w, "shakespeare", *LABEL), "is plain text"),
    ("fit: column flags with the embedded shakespeare-mc corpus", lambda e, w: fit(e, w, "shakespeare-mc", *LABEL), "brings its own prompts"),
    # --- fit: settings
    ("fit: --rank 0", lambda e, w: fit(e, w, None, "--rank", "0"), "rank must be"),
    ("fit: --lr -1", lambda e, w: fit(e, w, None, "--lr", "-1"), "lr must be"),
    ("fit: --tau-probe-docs -1", lambda e, w: fit(e, w, None, "--tau-probe-docs", "-1"), "tau_probe_docs must be"),
    ("fit: --layers x", lambda e, w: fit(e, w, None, "--layers", "x"), "--layers takes integers"),
    ("fit: --targets that match nothing", lambda e, w: fit(e, w, None, "--targets", "zz_proj"), "no module matches"),
    ("fit: --checkpoint-every -1", lambda e, w: fit(e, w, None, "--checkpoint-every", "-1"), "checkpoint_every"),
    ("fit: --config that is not JSON", lambda e, w: fit(e, w, None, "--config", str(write(w, "c.json", "rank: 2"))), "invalid JSON"),
    ("fit: --config with an unknown field", lambda e, w: fit(e, w, None, "--config", str(write(w, "c.json", '{"rnak": 2}'))), "unknown field"),
    ("fit: --config file that does not exist", lambda e, w: fit(e, w, None, "--config", str(w / "none.json")), "config file not found"),
    ("fit: --config that is a folder", lambda e, w: fit(e, w, None, "--config", str(sentinel(w / "cfg"))), "is a folder"),
    ("fit: --schedule that is not a choice", lambda e, w: fit(e, w, None, "--schedule", "linear"), "invalid choice: 'linear'"),
    ("fit: --config with a string for a number", lambda e, w: fit(e, w, None, "--config", str(write(w, "c.json", '{"adapter": {"alpha": "x"}}'))), "alpha must be a number"),
    ("fit: --model folder that does not exist", lambda e, w: ["fit", *FIT_ARGS(w / "nomodel", e["data"]), "-o", str(w / "out")], "base model not found"),
    ("fit: --init-from a folder that is not a fit", lambda e, w: fit(e, w, None, "--init-from", str(sentinel(w / "src"))), "missing config.json"),
    ("fit: no --output", lambda e, w: fit(e, w)[:-2], "--output"),
    # --- fit: output folders
    ("fit: --output folder holding a user's file", lambda e, w: fit(e, w) if sentinel(w / "out") else None, "refusing to write a fit"),
    ("fit: --output folder holding a user's file, with --overwrite", lambda e, w: fit(e, w, None, "--overwrite") if sentinel(w / "out") else None, "notes.txt"),
    ("fit: --output that is a file", lambda e, w: fit(e, w) if write(w, "out", "x") else None, "it is a file"),
    ("fit: --output holding a fit, no --overwrite", lambda e, w: fit(e, w) if copy_fit(e, w, "out") else None, "pass --overwrite"),
    ("fit: --output holding a fit plus a user's file, --overwrite", lambda e, w: fit(e, w, None, "--overwrite") if sentinel(copy_fit(e, w, "out")) else None, "files bora did not write"),
    ("fit: --output holding a PEFT export, --overwrite", lambda e, w: fit(e, w, None, "--overwrite") if shutil.copytree(e["export"], w / "out") else None, "PEFT export"),
    ("fit: --output holding an interrupted fit", lambda e, w: ["fit", *FIT_ARGS(e["model"], e["data"]), "-o", str(interrupted(e, w))], "--resume"),
    ("fit: --resume a finished fit", lambda e, w: ["fit", "--resume", str(copy_fit(e, w))], "nothing to resume"),
    ("fit: --resume a folder without checkpoints", lambda e, w: ["fit", "--resume", str(sentinel(w / "x"))], "no checkpoint"),
    ("fit: --resume with a changed setting", lambda e, w: ["fit", "--resume", str(interrupted(e, w)), "--lr", "1"], "remove --lr"),
    ("fit: --resume with a corrupt checkpoint pointer", lambda e, w: ["fit", "--resume", str(interrupted(e, w))], "corrupt checkpoint pointer"),
    # --- evaluate: fit folders from elsewhere
    ("evaluate: missing folder", lambda e, w: ["evaluate", str(w / "nothing")], "fit folder not found"),
    ("evaluate: a file instead of a folder", lambda e, w: ["evaluate", str(write(w, "f", "x"))], "not a folder"),
    ("evaluate: missing config.json", lambda e, w: ["evaluate", damaged(e, w, lambda f: (f / "config.json").unlink())], "missing config.json"),
    ("evaluate: config.json that is not JSON", lambda e, w: ["evaluate", damaged(e, w, lambda f: (f / "config.json").write_text("{"))], "invalid JSON"),
    ("evaluate: config.json with the rank edited", lambda e, w: ["evaluate", str(edit_config(e, w, lambda c: c["adapter"].update(rank=3)))], "was edited"),
    ("evaluate: config.json with tau edited", lambda e, w: ["evaluate", str(edit_config(e, w, lambda c: c["prior"].update(tau=5.0)))], "was edited"),
    ("evaluate: truncated guide.safetensors", lambda e, w: ["evaluate", str(truncated_guide(e, w))], "corrupt or truncated"),
    ("evaluate: truncated guide.safetensors, no checksum", lambda e, w: ["evaluate", str(truncated_guide(e, w, False))], "corrupt or truncated"),
    ("evaluate: guide.safetensors that is a pickle", lambda e, w: ["evaluate", str(pickle_guide(e, w))], "corrupt or truncated"),
    ("evaluate: guide.safetensors holding NaN", lambda e, w: ["evaluate", str(nan_guide(e, w))], "non-finite"),
    ("evaluate: missing guide.safetensors", lambda e, w: ["evaluate", damaged(e, w, lambda f: (f / "guide.safetensors").unlink())], "missing guide.safetensors"),
    ("evaluate: another format version", lambda e, w: ["evaluate", damaged(e, w, lambda f: edit_json(f / "tasks.json", lambda m: m.update(format=99)))], "another bora format version"),
    ("evaluate: tasks.json without task names", lambda e, w: ["evaluate", damaged(e, w, lambda f: edit_json(f / "tasks.json", lambda m: m.update(tasks=7)))], "'tasks' must be"),
    ("evaluate: corrupt state.json", lambda e, w: ["evaluate", damaged(e, w, lambda f: (f / "state.json").write_text("[1,"))], "corrupt"),
    ("evaluate: base model with other weights", lambda e, w: ["evaluate", str(edit_config(e, w, lambda c: c.update(model=str(e["d"] / "other"))))], "does not match the fit"),
    ("evaluate: an interrupted fit", lambda e, w: ["evaluate", str(interrupted(e, w))], "interrupted fit"),
    ("evaluate: data file gone", lambda e, w: ["evaluate", str(edit_config(e, w, lambda c: c["data"].update(source=str(w / "gone.jsonl"))))], "data file not found"),
    ("evaluate: --samples 0", lambda e, w: ["evaluate", str(e["fit"]), "--samples", "0"], "--samples"),
    ("evaluate: --data file not found", lambda e, w: ["evaluate", str(e["fit"]), "--data", str(w / "gone.jsonl")], "not found"),
    ("evaluate: --data file of blank lines", lambda e, w: ["evaluate", str(e["fit"]), "--data", str(write(w, "d.jsonl", "\n\n"))], "empty"),
    ("evaluate: --data file with other columns", lambda e, w: ["evaluate", str(e["fit"]), "--data", str(write(w, "d.jsonl", json.dumps({"body": "w1 w2 w3", "who": "spk0"}) + "\n"))], "column"),
    ("evaluate: --data with --split", lambda e, w: ["evaluate", str(e["fit"]), "--data", str(e["data"]), "--split", "val"], "give one of them"),
    # --- report
    ("report: folder that is not a fit", lambda e, w: ["report", str(sentinel(w / "x"))], "missing config.json"),
    ("report: --output folder holding a user's file", lambda e, w: ["report", str(e["fit"]), "-o", str(sentinel(w / "rep"))], "refusing to write a report"),
    ("report: corrupt fit", lambda e, w: ["report", str(truncated_guide(e, w))], "corrupt or truncated"),
    # --- export
    ("export: --output folder holding a user's file", lambda e, w: ["export", str(e["fit"]), "--task", "spk0", "-o", str(sentinel(w / "x"))], "refusing to write a PEFT export"),
    ("export: --all into a folder holding a user's file", lambda e, w: ["export", str(e["fit"]), "--all", "-o", str(sentinel(w / "x"))], "refusing to write PEFT exports"),
    ("export: --output that is a fit folder", lambda e, w: ["export", str(e["fit"]), "--task", "spk0", "-o", str(copy_fit(e, w))], "it is a bora fit"),
    ("export: --task not in the fit", lambda e, w: ["export", str(e["fit"]), "--task", "nope", "-o", str(w / "x")], "not in this fit"),
    ("export: --sample-index -1", lambda e, w: ["export", str(e["fit"]), "--task", "spk0", "--estimate", "sample", "--sample-index", "-1", "-o", str(w / "x")], "sample_index"),
    ("export: fit of another base model", lambda e, w: ["export", str(edit_config(e, w, lambda c: c.update(model=str(e["d"] / "other")))), "--global", "-o", str(w / "x")], "does not match the fit"),
    # --- sample
    ("sample: --samples 0", lambda e, w: ["sample", str(e["fit"]), "--task", "spk0", "--prompt", "w1", "--samples", "0"], "--samples"),
    ("sample: missing folder", lambda e, w: ["sample", str(w / "none"), "--task", "spk0", "--prompt", "w1"], "fit folder not found"),
    ("sample: edited config", lambda e, w: ["sample", str(edit_config(e, w, lambda c: c["fit"].update(guide="meanfield"))), "--task", "spk0", "--prompt", "w1"], "was edited"),
    # --- Python API (a ConfigError with a one-line message)
    ("api: Bora.load of a missing folder", lambda e, w: lambda: Bora.load(w / "none"), "fit folder not found"),
    ("api: save_fit into a user's folder", lambda e, w: lambda x=sentinel(w / "x"): save_fit(loaded(e), x), "refusing to write a fit"),
    ("api: export_adapters into a user's folder", lambda e, w: lambda x=sentinel(w / "x"): export_adapters(loaded(e), x, task="spk0"), "refusing"),
    ("api: BoraConfig.from_json of a list", lambda e, w: lambda: BoraConfig.from_json("[1]"), "expected a JSON object"),
    ("api: FitConfig.from_dict with a string lr", lambda e, w: lambda: FitConfig.from_dict({"lr": "x"}), "lr must be a number"),
    ("api: load_documents of an empty file", lambda e, w: lambda x=write(w, "e.csv", ""): load_documents(DataConfig(source=str(x))), "is empty"),
    ("api: load_checkpoint of a folder without one", lambda e, w: lambda x=sentinel(w / "x"): load_checkpoint(x), "no checkpoint"),
]


def snapshot(root):
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                             p.stat().st_mode)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input(env, tmp_path, capsys, case):
    _, build, words = case
    ws = tmp_path / "ws"
    ws.mkdir()
    call = build(env, ws)
    before, shared = snapshot(ws), snapshot(env["d"])
    capsys.readouterr()
    if callable(call):
        with pytest.raises(ConfigError) as info:
            call()
        err = f"bora: error: {info.value}"
    else:
        try:
            rc = main([str(a) for a in call])
        except SystemExit as e:  # argparse
            rc = e.code
        assert rc == 2
        err = capsys.readouterr().err
        assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("bora: error:") and "Traceback" not in err, err
    assert words in err, err
    assert snapshot(ws) == before  # nothing written, changed or deleted
    assert snapshot(env["d"]) == shared
    assert not (ws / "EXECUTED").exists()


def test_every_case_is_documented():
    text = DOCS.read_text()
    missing = [c[0] for c in CASES if f"| {c[0]} |" not in text]
    assert not missing, missing
    assert len(CASES) >= 30 and f"**{len(CASES)} inputs tried" in text  # the page's count is the test's


# ---------------------------------------------------------------- what bora may replace


def test_overwrite_replaces_a_fit_and_keeps_it_until_the_new_one_is_complete(env, tmp_path, capsys):
    out = copy_fit(env, tmp_path, "out")
    old = (out / "guide.safetensors").read_bytes()
    # a failing fit (NaN) with --overwrite leaves the old fit in place and loadable
    rc = main(["fit", *FIT_ARGS(env["model"], env["data"]), "--lr", "1e38", "--clip-norm", "0", "--steps", "4",
               "--eval-every", "1", "--output", str(out), "--overwrite"])
    assert rc == 2 and "fit stopped" in capsys.readouterr().err
    assert (out / "guide.safetensors").read_bytes() == old
    Bora.load(out, device="cpu")
    # a good one replaces it (and its checkpoints are gone with the old fit)
    assert main(["fit", *FIT_ARGS(env["model"], env["data"]), "--seed", "3", "--output", str(out), "--overwrite"]) == 0
    assert (out / "guide.safetensors").read_bytes() != old
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "estimates.safetensors", "guide.safetensors",
                                                     "laplace.safetensors", "metrics.json", "state.json", "tasks.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_all_adds_its_own_subfolders_only(env, tmp_path):
    peft = tmp_path / "peft"
    shutil.copytree(env["export"], peft / "earlier")  # another export already there
    assert main(["export", str(env["fit"]), "--all", "-o", str(peft), "--device", "cpu"]) == 0
    names = sorted(p.name for p in peft.iterdir())
    assert names == ["_global", "earlier", "index.json", "spk0", "spk1", "spk2"]
    assert (peft / "earlier" / "bora_export.json").read_bytes() == (env["export"] / "bora_export.json").read_bytes()
    # again: replaces its own sub-folders, still leaves the other export alone
    assert main(["export", str(env["fit"]), "--all", "-o", str(peft), "--device", "cpu"]) == 0
    assert sorted(p.name for p in peft.iterdir()) == names
    assert json.loads((peft / "index.json").read_text())["tasks"] == {"spk0": "spk0", "spk1": "spk1", "spk2": "spk2"}
    # a single export over an earlier single export is fine
    assert main(["export", str(env["fit"]), "--task", "spk1", "-o", str(peft / "earlier"), "--device", "cpu"]) == 0
    assert json.loads((peft / "earlier" / "bora_export.json").read_text())["task"] == "spk1"


def test_outputs_respect_the_umask(env, tmp_path):
    old = os.umask(0o027)
    try:
        assert main(["fit", *FIT_ARGS(env["model"], env["data"]), "--output", str(tmp_path / "f")]) == 0
        assert main(["export", str(tmp_path / "f"), "--task", "spk0", "-o", str(tmp_path / "x"), "--device", "cpu"]) == 0
    finally:
        os.umask(old)
    for folder in (tmp_path / "f", tmp_path / "x"):
        assert folder.stat().st_mode & 0o777 == 0o750, folder
        for p in folder.iterdir():
            assert p.stat().st_mode & 0o777 == 0o640, p


def test_loading_ignores_files_beside_the_fit_and_never_unpickles(env, tmp_path):
    f = copy_fit(env, tmp_path)
    for name in ("guide.pt", "model.pkl", "pytorch_model.bin", "optimizer.pt"):
        (f / name).write_bytes(pickle.dumps(Boom(tmp_path / "EXECUTED")))
    b = Bora.load(f, device="cpu")
    assert not (tmp_path / "EXECUTED").exists()
    want = Bora.load(env["fit"], device="cpu").point()
    assert all(torch.equal(v, want[k]) for k, v in b.point().items())


def test_quiet_silences_datasets(env, tmp_path, capsys):
    import datasets

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"text": ["w1 w2"] * 3, "task": ["a"] * 3}).to_parquet(str(path))
    capsys.readouterr()
    rc = main(["fit", "--model", str(tmp_path / "nomodel"), "--data", str(path), "--quiet", "-o", str(tmp_path / "o")])
    assert rc == 2
    assert capsys.readouterr().err.count("\n") == 1  # no "Generating train split" progress bar


def test_a_fit_saved_before_a_setting_existed_still_loads(env, tmp_path):
    """A config.json without a setting added to bora later (what an older version wrote, with its checksum over
    what it wrote) loads with the setting's default; an edited setting is still refused."""
    from bora.io.fitfolder import config_sha256

    f = copy_fit(env, tmp_path)
    edit_json(f / "config.json", lambda c: c["fit"].pop("laplace_structure"))
    old = json.loads((f / "config.json").read_text())
    edit_json(f / "tasks.json", lambda m: m["checksums"].update(config=config_sha256(old)))
    b = Bora.load(f, device="cpu")
    assert b.config.fit.laplace_structure == "diag"
    want = Bora.load(env["fit"], device="cpu").point()
    assert all(torch.equal(v, want[k]) for k, v in b.point().items())
    edit_json(f / "config.json", lambda c: c["fit"].update(lr=0.5))
    with pytest.raises(ConfigError, match="was edited"):
        Bora.load(f, device="cpu")
