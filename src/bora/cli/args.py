"""The ``bora`` flags, generated from the config dataclasses, and the config they build.

>>> from bora.cli.args import build_parser, config_from_args
>>> argv = ["fit", "--tau-mode", "fixed", "--tau", "100", "--output", "runs/x"]
>>> args = build_parser().parse_args(argv)
>>> config_from_args(args, argv[1:]).prior.tau
100.0

Every field of :class:`~bora.core.config.BoraConfig` (and of :class:`~bora.core.config.CheckpointConfig`) is a
``bora fit`` flag: its name is the field's (``--tau-mode``) unless the field's metadata names another
(``flag``: ``DataConfig.seed`` is ``--split-seed``), its help text and choices are the field's, its type is
the field's type hint (a tuple takes one or more values; ``none`` names the word for ``None``, as ``--layers
all``), a boolean is a switch (``--tau-per-module``; ``--no-cache-prefix`` for one that is on by default) and
``const_flags`` are switches that each set one value (``--load-in-4bit``). A field with ``no_flag`` has none;
``bora fit --help`` lists it with the reason. ``--device`` and ``--quiet`` are declared once, for every command.

With ``--config FILE`` only the flags typed on the command line override the file's settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from ..core.config import (DOC_ESTIMATORS, PREDICTIVE_HELP, PREDICTIVES, BoraConfig, CheckpointConfig,
                           ConfigError, FitConfig)

__all__ = ["build_parser", "config_from_args", "explicit_flags", "config_flags", "fields_without_flag",
           "COMMON_FLAGS"]

_ROOTS = ((BoraConfig, ()), (CheckpointConfig, ("checkpoint",)))  # configs whose fields are `bora fit` flags
COMMON_FLAGS = ("device", "quiet")  # declared once, accepted by every command
_UNSET = object()


@dataclass(frozen=True)
class Flag:
    """One flag of one config field: ``--name`` sets ``path`` (``("fit", "lr")``) to the value typed, or to
    ``const`` for a switch."""

    name: str
    path: tuple
    cls: type
    field: dataclasses.Field
    hint: Any
    const: Any = _UNSET

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def switch(self) -> bool:
        return self.const is not _UNSET


def _leaves(cls, path: tuple = ()) -> Iterator[tuple[tuple, type, dataclasses.Field, Any]]:
    """``(path, config class, field, type hint)`` of every setting, nested config sections entered."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            yield from _leaves(tp, path + (f.name,))
        else:
            yield path + (f.name,), cls, f, tp


def _flags_of(path, cls, f, hint) -> list[Flag]:
    meta = f.metadata
    if meta.get("no_flag"):
        return []
    if meta.get("const_flags"):
        return [Flag(name, path, cls, f, hint, const) for name, const in meta["const_flags"]]
    name = meta.get("flag", f.name.replace("_", "-"))
    if hint is bool:
        return [Flag(name if not f.default else "no-" + name, path, cls, f, hint, not f.default)]
    return [Flag(name, path, cls, f, hint)]


def config_flags() -> list[Flag]:
    """Every flag generated from the config fields (``bora fit``'s settings), in field order."""
    out = [fl for root, prefix in _ROOTS for leaf in _leaves(root, prefix) for fl in _flags_of(*leaf)]
    names = [fl.name for fl in out]
    assert len(names) == len(set(names)), f"two config fields claim one flag: {names}"
    return out


def fields_without_flag() -> dict[str, str]:
    """``{"fit.weight_decay": reason}``: the settings only a ``--config`` file sets, and why."""
    return {".".join(path): f.metadata["no_flag"] for root, prefix in _ROOTS
            for path, _, f, _ in _leaves(root, prefix) if f.metadata.get("no_flag")}


def _strip_optional(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def _sequence_item(hint) -> Optional[type]:
    """The item type of a ``tuple[X, ...]`` hint, else None."""
    hint = _strip_optional(hint)
    if hint is tuple or typing.get_origin(hint) is tuple:
        return (typing.get_args(hint) or (str,))[0]
    return None


class _Choices(list):
    """A flag's choices: the current names, listed in ``--help``; a renamed choice's old name is accepted too
    (the config reads it as the new one, with a ``FutureWarning``)."""

    def __init__(self, names, renamed: dict):
        super().__init__(names)
        self.renamed = dict(renamed)

    def __contains__(self, value) -> bool:
        return super().__contains__(value) or value in self.renamed


def field_kwargs(cls, name: str) -> dict:
    """``add_argument`` keywords of a field's flag: help, choices, type and nargs from the field (no default)."""
    f = cls.field(name)
    hint = typing.get_type_hints(cls)[name]
    kw: dict = {"help": f.metadata.get("help", "")}
    if f.metadata.get("choices"):
        kw["choices"] = _Choices(f.metadata["choices"], f.metadata.get("renamed", {}))
    if f.metadata.get("metavar"):
        kw["metavar"] = f.metadata["metavar"]
    if _sequence_item(hint) is not None:
        kw["nargs"] = "+"  # items converted (and their errors reported) by config_from_args
    elif f.metadata.get("none") is None:
        kw["type"] = _strip_optional(hint)
    return kw


def _add_flag(parser, fl: Flag) -> None:
    if fl.switch:
        help = fl.field.metadata.get("help", "")
        if fl.name != fl.field.name.replace("_", "-") or fl.const is not True:
            help = f"Sets {fl.field.name} to {fl.const!r}; {fl.field.name}: {help}"
        parser.add_argument("--" + fl.name, dest=fl.dest, action="store_true", help=help)
        return
    default = fl.field.default
    kw = field_kwargs(fl.cls, fl.field.name)
    if "nargs" in kw and default is not None:
        default = list(default)
    parser.add_argument("--" + fl.name, dest=fl.dest, default=default, **kw)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"bora: error: {message}\n")


def _common() -> argparse.ArgumentParser:
    """The flags every command takes, declared once (``parents=``)."""
    c = _Parser(add_help=False)
    c.add_argument("--device", default="auto", help="Where to run: 'auto' (CUDA if available), 'cpu', 'cuda', "
                   "'cuda:1', ...")
    c.add_argument("--quiet", action="store_true", help="No progress bars, and no library progress bars or warnings.")
    return c


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bora", description="Bayesian hierarchical LoRA for multi-task language models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    common = [_common()]
    _add_fit(sub, common)
    _add_evaluate(sub, common)
    _add_report(sub, common)
    _add_laplace(sub, common)
    _add_sample(sub, common)
    _add_export(sub, common)
    return p


def _fit_epilog() -> str:
    missing = fields_without_flag()
    return ("Settings without a flag (set them in a --config file): "
            + "; ".join(f"{name}: {why}" for name, why in missing.items())) if missing else ""


def _add_fit(sub, common) -> None:
    f = sub.add_parser("fit", help="fit per-task adapters and report held-out perplexity", parents=common,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, epilog=_fit_epilog())
    groups = {}
    for fl in config_flags():
        section = fl.path[0] if len(fl.path) > 1 else "model"
        if section not in groups:
            groups[section] = f.add_argument_group(f"{section} settings",
                                                   fl.cls.__doc__ if len(fl.path) > 1 else "The base model.")
        _add_flag(groups[section], fl)
    run = f.add_argument_group("run")
    run.add_argument("--config", type=Path, default=None,
                     help="Start from this BoraConfig JSON (e.g. a fit folder's config.json); flags given "
                          "explicitly on the command line override it.")
    run.add_argument("--init-from", type=Path, default=None, metavar="FIT_DIR",
                     help="Warm start: initialise the guide at the estimates of this saved fit (e.g. a MAP fit "
                          "for a mean-field fit: its point estimates become the AutoNormal locations).")
    run.add_argument("--output", "-o", type=Path, default=None,
                     help="Folder to write the fit to (required unless --resume): a new or empty folder, or an "
                          "existing bora fit with --overwrite.")
    run.add_argument("--overwrite", action="store_true",
                     help="Replace the bora fit already in OUTPUT (only once the new fit is complete; a folder "
                          "holding anything bora did not write is never replaced).")
    run.add_argument("--resume", type=Path, default=None, metavar="FIT_DIR",
                     help="Continue the interrupted fit in FIT_DIR from its last checkpoint, with its own settings "
                          "(only --device, --quiet and --checkpoint-every may be given).")


def _add_evaluate(sub, common) -> None:
    e = sub.add_parser("evaluate", help="per-task test perplexity of the base model and a saved fit", parents=common)
    e.add_argument("fit_dir", type=Path, help="A folder written by 'bora fit'.")
    e.add_argument("--split", choices=["test", "val", "train"], default=None,
                   help="Which split of the fit's data to evaluate (default: test).")
    e.add_argument("--data", default=None, metavar="FILE",
                   help="Evaluate every document of FILE instead (no split), a data file in the fit's format (its "
                        "text / prompt / completion / task columns). Documents of tasks in the fit are scored under "
                        "their task's adapter; those of tasks not in the fit under the global adapter Theta (the "
                        "mean of a new task's prior predictive) and, with --samples K, under the posterior "
                        "predictive of a new task (K draws theta_new ~ Normal(Theta, tau^-1/2)), in a table and "
                        "--json key of their own ('new_tasks').")
    e.add_argument("--samples", type=int, default=None,
                   help="Posterior samples for the Bayesian-model-average column (Laplace or mean-field fits; 1: "
                        "point estimate only). Default 1; 10 for classification data, whose posterior average is "
                        "the mean of the choice probabilities over the samples.")
    e.add_argument("--seed", type=int, default=0, help="Seed of the posterior samples.")
    e.add_argument("--predictive", choices=PREDICTIVES, default="sample", help=PREDICTIVE_HELP)
    e.add_argument("--doc-estimator", choices=DOC_ESTIMATORS, default="auto",
                   help="Estimator of the document-level BMA: 'tilted' (importance sampling from the samples and "
                        "copies shifted along each document's gradient; Laplace and centred mean-field fits; one "
                        "forward-backward and S + 1 more forward passes), 'plain' (log-mean-exp over the samples: "
                        "biased low when a document's log-likelihood varies by nats over the posterior) or 'auto' "
                        "(tilted where it applies).")
    e.add_argument("--batch-size", type=int, default=8, help="Documents per batch for the token-level metrics.")
    e.add_argument("--json", type=Path, default=None, metavar="FILE.json",
                   help="Also write the evaluation (every number printed, per task) to this JSON file.")


def _add_report(sub, common) -> None:
    r = sub.add_parser("report", help="diagnostics report of a saved fit: shrinkage, tau, plots, ArviZ summary",
                       parents=common)
    r.add_argument("fit_dir", type=Path, help="A folder written by 'bora fit'.")
    r.add_argument("--output", "-o", type=Path, default=None,
                   help="Report folder (default: FIT_DIR/report): new, empty or an earlier bora report.")
    r.add_argument("--fisher-docs", type=int, default=None,
                   help="Training documents per task for the Fisher pass (default: the fit's fisher_docs).")
    r.add_argument("--draws", type=int, default=200, help="Posterior draws for a mean-field fit (a MAP fit has one).")


def _add_laplace(sub, common) -> None:
    la = sub.add_parser("laplace", help="add a Laplace posterior to a saved MAP fit (laplace.safetensors)",
                        parents=common)
    la.add_argument("fit_dir", type=Path, help="A folder written by 'bora fit' (guide 'map' or 'laplace').")
    for flag, name in (("docs", "laplace_docs"), ("labels", "laplace_labels"), ("structure", "laplace_structure")):
        kw = field_kwargs(FitConfig, name)
        kw["help"] += " Default: the fit's setting."
        la.add_argument("--" + flag, default=None, **kw)


def _add_sample(sub, common) -> None:
    sm = sub.add_parser("sample", parents=common,
                        help="continuations of a prompt, each generated with its own posterior adapter sample",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sm.add_argument("fit_dir", type=Path, help="A folder written by 'bora fit'.")
    sm.add_argument("--task", required=True,
                    help="Task whose adapter to use; a name not in the fit draws a new task's adapter from the "
                         "global level (the prior predictive).")
    sm.add_argument("--prompt", required=True, help="Text to continue.")
    sm.add_argument("--samples", type=int, default=4, help="Posterior samples = continuations.")
    sm.add_argument("--max-new-tokens", type=int, default=32, help="Tokens to generate per continuation.")
    sm.add_argument("--seed", type=int, default=0, help="Seed of the posterior samples (and of token sampling).")
    sm.add_argument("--predictive", choices=PREDICTIVES, default="sample",
                    help=PREDICTIVE_HELP + " Used for the uncertainty numbers; each continuation is generated with "
                         "its sampled adapter.")
    sm.add_argument("--do-sample", action="store_true", help="Sample tokens instead of greedy decoding.")
    sm.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (with --do-sample).")
    sm.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass (with --do-sample).")


def _add_export(sub, common) -> None:
    x = sub.add_parser("export", help="write fitted adapters as PEFT LoRA adapter folders", parents=common,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    x.add_argument("fit_dir", type=Path, help="A folder written by 'bora fit'.")
    which = x.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", default=None, help="Export this task's adapter.")
    which.add_argument("--global", dest="global_adapter", action="store_true",
                       help="Export the global adapter Theta (the prior mean of a new task's adapter).")
    which.add_argument("--all", dest="all_tasks", action="store_true",
                       help="Export every task into OUTPUT/<task>/ (and the global adapter into OUTPUT/_global/).")
    x.add_argument("--estimate", choices=["mean", "map", "sample"], default="mean",
                   help="Posterior mean / MAP point estimate (both the guide's point estimate), or one posterior "
                        "sample (the one 'bora sample' uses as number K+1 with the same seed).")
    x.add_argument("--sample-index", type=int, default=0, help="K: which posterior sample (with --estimate sample).")
    x.add_argument("--seed", type=int, default=0, help="Seed of the posterior samples (with --estimate sample).")
    x.add_argument("--output", "-o", type=Path, required=True,
                   help="Folder to write: new, empty or an earlier bora export of the same kind (--all: a folder "
                        "of bora exports, of which only this fit's sub-folders are replaced).")


class _Typed(argparse.Namespace):
    """A namespace that claims every attribute already exists, so argparse fills in no default: only the flags
    the user typed are set on it (and recorded in ``typed``)."""

    def __init__(self):
        super().__init__()
        object.__setattr__(self, "typed", set())

    def __getattr__(self, name):
        if name.startswith("_"):  # argparse's own bookkeeping attributes do not exist until set
            raise AttributeError(name)
        return None

    def __setattr__(self, name, value):
        if not name.startswith("_"):
            self.typed.add(name)
        super().__setattr__(name, value)


class _OneCommand:
    """Stands in for argparse's sub-parser group: ``add_parser`` builds one standalone command parser."""

    parser: argparse.ArgumentParser

    def add_parser(self, name, *, help=None, **kw):
        self.parser = _Parser(prog=f"bora {name}", **kw)
        return self.parser


_COMMANDS = {"fit": _add_fit}


def explicit_flags(argv: Sequence[str], command: str = "fit") -> set[str]:
    """Destinations of the flags the user actually typed (abbreviations and ``--flag=value`` included), for
    ``command``'s argument list with or without the command name in front.

    >>> sorted(explicit_flags(["fit", "--tau-m", "fixed", "--lr=0.1", "-o", "x"]))
    ['lr', 'output', 'tau_mode']
    """
    argv = list(argv)
    if argv[:1] == [command]:
        argv = argv[1:]
    one = _OneCommand()
    _COMMANDS[command](one, [_common()])
    ns = _Typed()
    one.parser.parse_known_args(argv, namespace=ns)
    return set(ns.typed)


def _value(fl: Flag, value):
    """The config value of a (non-switch) flag's parsed value: sequences as tuples, ``none``'s word as None."""
    none, item = fl.field.metadata.get("none"), _sequence_item(fl.hint)
    if none is not None and (value == none or value == [none]):
        return None
    if item is None or value is None:
        return value
    try:
        return [item(x) for x in value]
    except ValueError:
        kind = {int: "integers", float: "numbers"}.get(item, "values")
        alt = f" or '{none}'" if none is not None else ""
        raise ConfigError(f"--{fl.name} takes {kind}{alt}, got {' '.join(map(str, value))}") from None


def _read_config(path: Optional[Path]) -> BoraConfig:
    if path is None:
        return BoraConfig()
    try:
        return BoraConfig.from_json(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path} is a folder; pass a config JSON file (e.g. its config.json)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path} is not UTF-8 text") from None


def config_from_args(args, argv: Sequence[str] = ()) -> BoraConfig:
    """The :class:`BoraConfig` of parsed ``bora fit`` arguments; with ``--config FILE``, the file's settings with
    only the flags typed in ``argv`` overriding them."""
    base = _read_config(args.config)
    given = explicit_flags(argv) if args.config else None
    tree = base.to_dict()
    switched: dict[tuple, list[Flag]] = {}
    for fl in config_flags():
        if fl.path[0] == "checkpoint" or (given is not None and fl.dest not in given):
            continue
        value = getattr(args, fl.dest)
        if fl.switch:
            if not value:
                continue
            switched.setdefault(fl.path, []).append(fl)
            value = fl.const
        node = tree
        for key in fl.path[:-1]:
            node = node[key]
        node[fl.path[-1]] = fl.const if fl.switch else _value(fl, value)
    for fls in switched.values():
        if len({repr(fl.const) for fl in fls}) > 1:
            raise ConfigError(" and ".join("--" + fl.name for fl in fls) + " exclude each other")
    return BoraConfig.from_dict(tree)
