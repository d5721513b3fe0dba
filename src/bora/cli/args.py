"""The ``bora fit`` flags and the config they build: every flag's help text comes from the config dataclasses.

>>> from bora.cli.args import build_parser, config_from_args
>>> argv = ["fit", "--tau-mode", "fixed", "--tau", "100", "--output", "runs/x"]
>>> args = build_parser().parse_args(argv)
>>> config_from_args(args, argv[1:]).prior.tau
100.0

With ``--config FILE`` only the flags typed on the command line override the file's settings.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Sequence

from ..core.config import (DOC_ESTIMATORS, GUIDES, HIERARCHIES, PARAMETERISATIONS, PRECISIONS, PREDICTIVE_HELP,
                           PREDICTIVES,
                     AdapterConfig, BoraConfig, CheckpointConfig, ConfigError, DataConfig, FitConfig, PriorConfig)

__all__ = ["build_parser", "config_from_args", "explicit_flags"]

# flag -> (config section, field, type)
_FLAGS = {
    "rank": (AdapterConfig, "rank", int),
    "alpha": (AdapterConfig, "alpha", float),
    "dropout": (AdapterConfig, "dropout", float),
    "tau_mode": (PriorConfig, "tau_mode", str),
    "tau": (PriorConfig, "tau", float),
    "tau_shape": (PriorConfig, "tau_shape", float),
    "tau_rate": (PriorConfig, "tau_rate", float),
    "global_scale": (PriorConfig, "global_scale", float),
    "hierarchy": (PriorConfig, "hierarchy", str),
    "parameterisation": (PriorConfig, "parameterisation", str),
    "guide": (FitConfig, "guide", str),
    "epochs": (FitConfig, "epochs", float),
    "steps": (FitConfig, "steps", int),
    "batch_size": (FitConfig, "batch_size", int),
    "lr": (FitConfig, "lr", float),
    "scale_lr": (FitConfig, "scale_lr", float),
    "schedule": (FitConfig, "schedule", str),
    "clip_norm": (FitConfig, "clip_norm", float),
    "eval_every": (FitConfig, "eval_every", int),
    "patience": (FitConfig, "patience", int),
    "fisher_docs": (FitConfig, "fisher_docs", int),
    "tau_curvature": (FitConfig, "tau_curvature", str),
    "tau_probe_docs": (FitConfig, "tau_probe_docs", int),
    "num_particles": (FitConfig, "num_particles", int),
    "laplace_docs": (FitConfig, "laplace_docs", int),
    "laplace_labels": (FitConfig, "laplace_labels", str),
    "laplace_structure": (FitConfig, "laplace_structure", str),
    "init_scale": (FitConfig, "init_scale", float),
    "precision": (FitConfig, "precision", str),
    "seed": (FitConfig, "seed", int),
    "text_column": (DataConfig, "text_column", str),
    "task_column": (DataConfig, "task_column", str),
    "max_length": (DataConfig, "max_length", int),
    "long_documents": (DataConfig, "long_documents", str),
    "duplicates": (DataConfig, "duplicates", str),
    "val_fraction": (DataConfig, "val_fraction", float),
    "test_fraction": (DataConfig, "test_fraction", float),
    "split_seed": (DataConfig, "seed", int),
}
_SECTION = {AdapterConfig: "adapter", PriorConfig: "prior", FitConfig: "fit", DataConfig: "data"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"bora: error: {message}\n")


def _default(cls, name):
    return next(f for f in dataclasses.fields(cls) if f.name == name).default


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bora", description="Bayesian hierarchical LoRA for multi-task language models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    f = sub.add_parser("fit", help="fit per-task adapters and report held-out perplexity",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    f.add_argument("--model", default=_default(BoraConfig, "model"), help=BoraConfig.help("model"))
    f.add_argument("--data", default=_default(DataConfig, "source"), help=DataConfig.help("source"))
    f.add_argument("--tasks", nargs="+", default=None, help=DataConfig.help("tasks"))
    f.add_argument("--targets", nargs="+", default=list(_default(AdapterConfig, "targets")),
                   help=AdapterConfig.help("targets"))
    f.add_argument("--layers", nargs="+", default=None,
                   help=AdapterConfig.help("layers") + " Pass 'all' to adapt every layer.")
    for flag, (cls, name, typ) in _FLAGS.items():
        kw = {"type": typ, "default": _default(cls, name), "help": cls.help(name)}
        if name in ("tau_mode",):
            kw["choices"] = ["fixed", "learned", "independent", "shared"]
        if name == "guide":
            kw["choices"] = list(GUIDES)
        if name == "tau_curvature":
            kw["choices"] = ["steps", "pass"]
        if name == "laplace_structure":
            kw["choices"] = ["lowrank", "diag"]
        if name == "precision":
            kw["choices"] = list(PRECISIONS)
        if name == "hierarchy":
            kw["choices"] = list(HIERARCHIES)
        if name == "parameterisation":
            kw["choices"] = list(PARAMETERISATIONS)
        f.add_argument("--" + flag.replace("_", "-"), **kw)
    f.add_argument("--tau-per-module", action="store_true", help=PriorConfig.help("tau_per_module"))
    f.add_argument("--no-cache-prefix", action="store_true", help="Do not cache the frozen lower layers.")
    f.add_argument("--load-in-4bit", action="store_true",
                   help="Quantise the frozen base model to 4-bit NF4 with bitsandbytes (QLoRA; CUDA only).")
    f.add_argument("--load-in-8bit", action="store_true",
                   help="Quantise the frozen base model to 8-bit with bitsandbytes (CUDA only).")
    f.add_argument("--config", type=Path, default=None,
                   help="Start from this BoraConfig JSON (e.g. a fit folder's config.json); flags given "
                        "explicitly on the command line override it.")
    f.add_argument("--init-from", type=Path, default=None, metavar="FIT_DIR",
                   help="Warm start: initialise the guide at the estimates of this saved fit (e.g. a MAP fit "
                        "for a mean-field fit: its point estimates become the AutoNormal locations).")
    f.add_argument("--output", "-o", type=Path, default=None,
                   help="Folder to write the fit to (required unless --resume): a new or empty folder, or an "
                        "existing bora fit with --overwrite.")
    f.add_argument("--overwrite", action="store_true",
                   help="Replace the bora fit already in OUTPUT (only once the new fit is complete; a folder "
                        "holding anything bora did not write is never replaced).")
    f.add_argument("--resume", type=Path, default=None, metavar="FIT_DIR",
                   help="Continue the interrupted fit in FIT_DIR from its last checkpoint, with its own settings "
                        "(only --device, --quiet and --checkpoint-every may be given).")
    f.add_argument("--checkpoint-every", type=int, default=None, metavar="N", help=CheckpointConfig.help("every"))
    f.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ...")
    f.add_argument("--quiet", action="store_true", help="No progress bars, and no library progress bars or warnings.")

    e = sub.add_parser("evaluate", help="per-task test perplexity of the base model and a saved fit")
    e.add_argument("fit_dir", type=Path, help="A folder written by 'bora fit'.")
    e.add_argument("--split", choices=["test", "val", "train"], default="test", help="Which split to evaluate.")
    e.add_argument("--samples", type=int, default=1,
                   help="Posterior samples for the Bayesian-model-average column (Laplace or mean-field fits; 1: "
                        "point estimate only).")
    e.add_argument("--seed", type=int, default=0, help="Seed of the posterior samples.")
    e.add_argument("--predictive", choices=PREDICTIVES, default="sample", help=PREDICTIVE_HELP)
    e.add_argument("--doc-estimator", choices=DOC_ESTIMATORS, default="auto",
                   help="Estimator of the document-level BMA: 'tilted' (importance sampling from the samples and "
                        "copies shifted along each document's gradient; Laplace and centred mean-field fits; one "
                        "forward-backward and S + 1 more forward passes), 'plain' (log-mean-exp over the samples: "
                        "biased low when a document's log-likelihood varies by nats over the posterior) or 'auto' "
                        "(tilted where it applies).")
    e.add_argument("--batch-size", type=int, default=8, help="Documents per batch for the token-level metrics.")
    e.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    e.add_argument("--quiet", action="store_true", help="No progress bars.")

    r = sub.add_parser("report", help="diagnostics report of a saved fit: shrinkage, tau, plots, ArviZ summary")
    r.add_argument("fit_dir", type=Path, help="A folder written by 'bora fit'.")
    r.add_argument("--output", "-o", type=Path, default=None,
                   help="Report folder (default: FIT_DIR/report): new, empty or an earlier bora report.")
    r.add_argument("--fisher-docs", type=int, default=None,
                   help="Training documents per task for the Fisher pass (default: the fit's fisher_docs).")
    r.add_argument("--draws", type=int, default=200, help="Posterior draws for a mean-field fit (a MAP fit has one).")
    r.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    r.add_argument("--quiet", action="store_true", help="No progress bars.")

    la = sub.add_parser("laplace", help="add a Laplace posterior to a saved MAP fit (laplace.safetensors)")
    la.add_argument("fit_dir", type=Path, help="A folder written by 'bora fit' (guide 'map' or 'laplace').")
    la.add_argument("--docs", type=int, default=None, help=FitConfig.help("laplace_docs"))
    la.add_argument("--labels", choices=["sampled", "empirical"], default=None, help=FitConfig.help("laplace_labels"))
    la.add_argument("--structure", choices=["lowrank", "diag"], default=None, help=FitConfig.help("laplace_structure"))
    la.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    la.add_argument("--quiet", action="store_true", help="No progress bars.")

    sm = sub.add_parser("sample",
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
    sm.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")

    x = sub.add_parser("export", help="write fitted adapters as PEFT LoRA adapter folders",
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
    x.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    return p


def explicit_flags(argv: Sequence[str]) -> set[str]:
    """Destinations of the flags the user actually typed."""
    out = set()
    for a in argv:
        if a.startswith("--"):
            out.add(a[2:].split("=", 1)[0].replace("-", "_"))
    return out


def config_from_args(args, argv: Sequence[str] = ()) -> BoraConfig:
    base = BoraConfig.from_json(args.config.read_text()) if args.config else BoraConfig()
    given = explicit_flags(argv) if args.config else None  # with --config, only typed flags override

    def use(flag):
        return given is None or flag in given

    sections = {s: getattr(base, s).to_dict() for s in _SECTION.values()}
    for flag, (cls, name, _) in _FLAGS.items():
        if use(flag):
            sections[_SECTION[cls]][name] = getattr(args, flag)
    if use("targets"):
        sections["adapter"]["targets"] = args.targets
    if use("layers"):
        if args.layers is None:
            pass
        elif args.layers == ["all"]:
            sections["adapter"]["layers"] = None
        else:
            try:
                sections["adapter"]["layers"] = [int(x) for x in args.layers]
            except ValueError:
                raise ConfigError(f"--layers takes integers or 'all', got {' '.join(args.layers)}") from None
    if use("tau_per_module"):
        sections["prior"]["tau_per_module"] = args.tau_per_module or sections["prior"]["tau_per_module"]
    if use("no_cache_prefix") and args.no_cache_prefix:
        sections["fit"]["cache_prefix"] = False
    if use("data"):
        sections["data"]["source"] = args.data
    if use("tasks") and args.tasks is not None:
        sections["data"]["tasks"] = args.tasks
    model = args.model if use("model") else base.model
    quantize = base.quantize
    if use("load_in_4bit") and args.load_in_4bit:
        quantize = "4bit"
    if use("load_in_8bit") and args.load_in_8bit:
        quantize = "8bit"
    if args.load_in_4bit and args.load_in_8bit:
        raise ConfigError("--load-in-4bit and --load-in-8bit exclude each other")
    return BoraConfig.from_dict({"model": model, "quantize": quantize, **sections})
