"""Command line: ``bora fit``, ``bora evaluate``, ``bora report``, ``bora sample`` and ``bora export``.

>>> from bora.cli import build_parser
>>> args = build_parser().parse_args(["fit", "--tau-mode", "fixed", "--tau", "100", "--output", "runs/x"])
>>> args.tau_mode, args.tau
('fixed', 100.0)

``bora fit`` loads the base model and data, evaluates the base model on the held-out test split,
fits, evaluates the fit, prints a per-task table and saves the fit folder. ``bora evaluate
FIT_DIR`` recomputes the table from a saved fit; ``bora report FIT_DIR`` writes the diagnostics
folder (shrinkage per task, tau, training curve, ArviZ summary; see :mod:`bora.report`). ``bora evaluate
FIT_DIR --samples S`` adds accuracy, calibration (ECE), Brier score and uncertainty for the point
estimate and the Bayesian model average over ``S`` posterior samples; ``bora sample FIT_DIR --task
NAME --prompt TEXT`` prints continuations, each from its own posterior adapter sample; ``bora export
FIT_DIR --task NAME --output DIR`` writes PEFT adapter folders (see :mod:`bora.posterior`,
:mod:`bora.export`). ``bora fit --guide meanfield --init-from MAP_DIR`` starts a mean-field fit at a
MAP fit's estimates. ``bora fit`` checkpoints the run into ``OUTPUT/checkpoints`` (``--checkpoint-every``);
``bora fit --resume DIR`` continues an interrupted fit exactly where its last checkpoint left it
(:mod:`bora.checkpoint`). Bora never replaces or deletes a folder it did not write: an existing
output folder holding anything else is refused, and replacing an existing fit needs ``--overwrite``.
``--quiet`` also silences the libraries' progress bars and warnings. Every flag's help text comes from the config
dataclasses, so ``--help`` documents exactly what the code does. A user error prints one line
(``bora: error: ...``) and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import dataclasses
import os
import sys
import warnings
import time
from pathlib import Path
from typing import Optional, Sequence

from .config import (GUIDES, HIERARCHIES, PARAMETERISATIONS, AdapterConfig, BoraConfig, CheckpointConfig, ConfigError,
                     DataConfig, FitConfig, PriorConfig)

__all__ = ["main", "build_parser", "config_from_args", "format_table", "format_posterior_table"]

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
    "num_particles": (FitConfig, "num_particles", int),
    "laplace_docs": (FitConfig, "laplace_docs", int),
    "laplace_labels": (FitConfig, "laplace_labels", str),
    "init_scale": (FitConfig, "init_scale", float),
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
                   help="Posterior samples for the Bayesian-model-average column (mean-field fits; 1: point "
                        "estimate only).")
    e.add_argument("--seed", type=int, default=0, help="Seed of the posterior samples.")
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

    la = sub.add_parser("laplace", help="add a diagonal Laplace posterior to a saved MAP fit (laplace.safetensors)")
    la.add_argument("fit_dir", type=Path, help="A folder written by 'bora fit' (guide 'map' or 'laplace').")
    la.add_argument("--docs", type=int, default=None, help=FitConfig.help("laplace_docs"))
    la.add_argument("--labels", choices=["sampled", "empirical"], default=None, help=FitConfig.help("laplace_labels"))
    la.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    la.add_argument("--quiet", action="store_true", help="No progress bars.")

    sm = sub.add_parser("sample", help="continuations of a prompt, each generated with its own posterior adapter sample",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sm.add_argument("fit_dir", type=Path, help="A folder written by 'bora fit'.")
    sm.add_argument("--task", required=True,
                    help="Task whose adapter to use; a name not in the fit draws a new task's adapter from the "
                         "global level (the prior predictive).")
    sm.add_argument("--prompt", required=True, help="Text to continue.")
    sm.add_argument("--samples", type=int, default=4, help="Posterior samples = continuations.")
    sm.add_argument("--max-new-tokens", type=int, default=32, help="Tokens to generate per continuation.")
    sm.add_argument("--seed", type=int, default=0, help="Seed of the posterior samples (and of token sampling).")
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


def _explicit(argv: Sequence[str]) -> set[str]:
    """Destinations of the flags the user actually typed."""
    out = set()
    for a in argv:
        if a.startswith("--"):
            out.add(a[2:].split("=", 1)[0].replace("-", "_"))
    return out


def config_from_args(args, argv: Sequence[str] = ()) -> BoraConfig:
    base = BoraConfig.from_json(args.config.read_text()) if args.config else BoraConfig()
    given = _explicit(argv) if args.config else None  # with --config, only typed flags override

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


def format_table(base: dict, fitted: dict, *, title: str = "test") -> str:
    """Per-task perplexity table: base model vs fit, plus the two overall summaries."""
    names = list(fitted["per_task"])
    w = max([len("task")] + [len(n) for n in names])
    lines = [f"{'task':<{w}}  {'docs':>5}  {'tokens':>6}  {'base ppl':>9}  {'fit ppl':>9}  {'change':>7}"]
    for n in names:
        b, f = base["per_task"][n], fitted["per_task"][n]
        lines.append(f"{n:<{w}}  {f['docs']:>5}  {f['tokens']:>6}  {b['ppl']:>9.3f}  {f['ppl']:>9.3f}  "
                     f"{100 * (f['ppl'] / b['ppl'] - 1):>+6.1f}%")
    bo, fo = base["overall"], fitted["overall"]
    lines.append("-" * len(lines[0]))
    lines.append(f"{'overall: exp(mean per-task NLL)':<{w + 24}}  {bo['ppl_task_mean']:>9.3f}  "
                 f"{fo['ppl_task_mean']:>9.3f}  {100 * (fo['ppl_task_mean'] / bo['ppl_task_mean'] - 1):>+6.1f}%")
    lines.append(f"{'overall: token-weighted':<{w + 24}}  {bo['ppl_token']:>9.3f}  "
                 f"{fo['ppl_token']:>9.3f}  {100 * (fo['ppl_token'] / bo['ppl_token'] - 1):>+6.1f}%")
    better = sum(fitted["per_task"][n]["ppl"] < base["per_task"][n]["ppl"] for n in names)
    lines.append(f"{title} perplexity lower than the base model on {better} of {len(names)} tasks")
    return "\n".join(lines)


_RESUME_FLAGS = {"resume", "output", "quiet", "device", "checkpoint_every"}


def _fit_output(args, argv) -> tuple[Path, Optional[object], BoraConfig]:
    """``(output folder, checkpoint to resume or None, config)``, refusing unsafe outputs before any loading."""
    from .checkpoint import has_checkpoint, load_checkpoint
    from .io import check_output, folder_kind, read_json

    if args.resume is None:
        if args.output is None:
            raise ConfigError("the following arguments are required: --output/-o (or --resume FIT_DIR)")
        config = config_from_args(args, argv)
        out = args.output
        if folder_kind(out) == "fit" and not args.overwrite:
            if has_checkpoint(out):
                step = read_json(out / "checkpoints" / "LATEST").get("step")
                raise ConfigError(f"{out} holds an interrupted fit (last checkpoint: step {step}): --resume {out} "
                                  "continues it, --overwrite starts a new fit")
            raise ConfigError(f"{out} already holds a bora fit; pass --overwrite to replace it")
        check_output(out, "fit", overwrite=True)
        return out, None, config
    out = args.resume
    if args.output is not None and Path(args.output).resolve() != Path(out).resolve():
        raise ConfigError("--resume FIT_DIR continues the fit in FIT_DIR; --output must be omitted or the same")
    extra = sorted(_explicit(argv) - _RESUME_FLAGS)
    if extra:
        raise ConfigError(f"--resume continues a fit with its own settings; remove --{extra[0].replace('_', '-')}")
    ck = load_checkpoint(out)
    if folder_kind(out) != "fit":
        check_output(out, "fit")  # the finished fit will replace the folder: it must be bora's alone
    config = BoraConfig.from_dict(ck.meta.get("config"))
    return out, ck, config


def _cmd_fit(args, argv) -> int:
    """``bora fit``, also as one of several data-parallel processes (``torchrun ... -m bora fit``):
    every rank fits its shard of each batch; only rank 0 prints and writes (:mod:`bora.distributed`)."""
    import torch.distributed as tdist

    from .distributed import init_from_env, is_main

    if not init_from_env(args.device):
        return _fit(args, argv)
    try:
        if is_main():
            return _fit(args, argv)
        args.quiet = True
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            return _fit(args, argv)
    finally:
        tdist.destroy_process_group()


def _fit(args, argv) -> int:
    from .api import Bora
    from .distributed import is_main
    from .checkpoint import Checkpointer, data_fingerprint
    from .infer import NumericalError
    from .fitfolder import base_fingerprint, save_fit

    every = CheckpointConfig(every=args.checkpoint_every).every
    out, ck, config = _fit_output(args, argv)
    if ck is not None and args.checkpoint_every is None:  # the interrupted run's own setting
        every = CheckpointConfig(every=ck.meta.get("checkpoint_every")).every
    progress = not args.quiet
    t0 = time.perf_counter()
    print(f"bora fit: model={config.model} data={config.data.source} tau_mode={config.prior.tau_mode} "
          f"guide={config.fit.guide}" + (f" (resuming {out} from step {ck.step})" if ck is not None else ""),
          flush=True)
    bora, data = Bora.from_config(config, device=args.device)
    meta = {"config": config.to_dict(), "data_sha256": data_fingerprint(data), "base_model": base_fingerprint(bora),
            "checkpoint_every": every}
    if ck is not None:
        if ck.meta.get("data_sha256") != meta["data_sha256"]:
            raise ConfigError(f"the documents of {config.data.source} changed since the checkpoint in {out} was "
                              "written; resuming would not continue the same fit")
        if ck.meta.get("base_model") != meta["base_model"]:
            raise ConfigError(f"base model {config.model!r} differs from the one the checkpoint in {out} was fitted on")
    elif args.init_from is not None:
        warm = bora.init_from(args.init_from)
        print(f"warm start from {args.init_from}: {len(warm['copied'])} estimates copied"
              + (f", {len(warm['derived'])} derived" if warm["derived"] else "")
              + (f", {len(warm['kept'])} left at their initial value" if warm["kept"] else ""), flush=True)
    n_params = bora.adapters.num_parameters()
    print(f"tasks: {len(bora.tasks)}  documents train/val/test: {len(data['train'])}/{len(data['val'])}/"
          f"{len(data['test'])}  training tokens: {data['train'].num_tokens()}  adapted modules: "
          f"{len(bora.adapters)}  adapter parameters per task: {n_params}  device: {bora.device}", flush=True)
    feeds = {k: bora.feed(v, progress=progress, desc=f"caching frozen layers ({k})") for k, v in data.items()}
    base = bora.evaluate(feeds["test"], base=True)
    checkpointer = Checkpointer(out, every=every, meta=meta)
    try:
        result = bora.fit(feeds["train"], feeds["val"], progress=progress, checkpoint=checkpointer,
                          resume=ck.state if ck is not None else None)
    except NumericalError as e:
        raise ConfigError(f"fit stopped: {e} (try a lower --lr); {checkpointer.describe()}; nothing was saved "
                          "as a fit") from None
    fitted = bora.evaluate(feeds["test"])
    bora.metrics = {"test": {"base": base, "fit": fitted}}
    if is_main():
        save_fit(bora, out)
    print()
    print(format_table(base, fitted))
    tau = bora.tau_estimate()
    print(f"\ntau: {', '.join(f'{k}={v:.4g}' for k, v in tau.items())}   steps: {result.steps}   "
          f"best step: {result.best_step}   step time: {result.step_seconds:.3f} s   "
          f"tokens/s: {result.tokens_per_second:.0f}   wall: {time.perf_counter() - t0:.0f} s")
    print(f"fit time: {result.seconds:.0f} s = steps {result.seconds_steps:.0f} s + validation "
          f"{result.seconds_validation:.0f} s + tau updates {result.seconds_tau:.0f} s + checkpoints "
          f"{result.seconds_checkpoint:.0f} s (+ other); Laplace curvature after it: {result.seconds_posterior:.0f} s")
    if bora.laplace is not None:
        print(f"Laplace posterior: median posterior sd of a task coordinate {bora.laplace.median_task_sd():.4g} "
              f"(prior sd tau^-1/2); `bora evaluate {out} --samples 8` averages over it")
    print(f"saved to {out}  (bora evaluate {out})")
    return 0


def _cmd_evaluate(args) -> int:
    from .api import Bora, load_data

    if args.samples < 1 or args.batch_size < 1:
        raise ConfigError("--samples and --batch-size must be >= 1")
    bora = Bora.load(args.fit_dir, device=args.device)
    data = load_data(bora.config, bora.tokenizer, tasks=bora.tasks)
    split = data[args.split]
    if split.task_sizes().eq(0).any():
        missing = [t for t, n in zip(bora.tasks, split.task_sizes().tolist()) if n == 0]
        raise ConfigError(f"the data has no {args.split} documents for task(s) {missing[:3]} of this fit")
    feed = bora.feed(split, progress=not args.quiet, desc=f"caching frozen layers ({args.split})")
    base = bora.evaluate(feed, base=True)
    fitted = bora.evaluate(feed)
    print(format_table(base, fitted, title=args.split))
    tau = bora.tau_estimate()
    print(f"\ntau: {', '.join(f'{k}={v:.4g}' for k, v in tau.items())}")
    post = bora.posterior(args.samples, seed=args.seed)
    res = post.evaluate(feed, batch_size=args.batch_size, progress=not args.quiet)
    print()
    print(format_posterior_table(res, title=args.split))
    return 0


def format_posterior_table(res: dict, *, title: str = "test") -> str:
    """Point estimate vs Bayesian model average: likelihood, accuracy, calibration, uncertainty; per task.

    The BMA NLL and perplexities are the document-level posterior predictive (``bma_doc``); accuracy,
    ECE, Brier, entropy and mutual information are of the token-level BMA (``bma_token``)."""
    S = res["samples"]
    bma = S > 1
    p, bd, bt = res["point"], res["bma_doc"], res["bma_token"]
    head = f"BMA (S={S})"
    w = 50
    rows = [
        ("NLL per token (BMA: document-level)", p["overall"]["nll_token"], bd["overall"]["nll_token"], ".4f"),
        ("perplexity: exp(mean per-task NLL)", p["overall"]["ppl_task_mean"], bd["overall"]["ppl_task_mean"], ".3f"),
        ("perplexity: token-weighted", p["overall"]["ppl_token"], bd["overall"]["ppl_token"], ".3f"),
        ("token-level BMA: NLL per token", p["tokens"]["nll"], bt["tokens"]["nll"], ".4f"),
        ("token-level: next-token top-1 accuracy", p["tokens"]["accuracy"], bt["tokens"]["accuracy"], ".4f"),
        ("token-level: expected calibration error (15 bins)", p["tokens"]["ece"], bt["tokens"]["ece"], ".4f"),
        ("token-level: Brier score", p["tokens"]["brier"], bt["tokens"]["brier"], ".4f"),
        ("token-level: predictive entropy (nats)", p["tokens"]["entropy"], bt["tokens"]["entropy"], ".4f"),
        ("token-level: mutual information (nats)", p["tokens"]["mutual_information"],
         bt["tokens"]["mutual_information"], ".3g"),
    ]
    lines = [f"{title + ' (' + str(p['tokens']['tokens']) + ' tokens)':<{w}}  {'point':>10}" + (f"  {head:>12}" if bma else "")]
    for name, a, c, fmt in rows:
        lines.append(f"{name:<{w}}  {a:>10{fmt}}" + (f"  {c:>12{fmt}}" if bma else ""))
    if res.get("point_fit") and bma:
        lines.append("(MAP fit: every posterior sample is the point estimate, so the BMA equals it)")
    if bma:
        iv, ti = res["posterior_spread"], res["test_interval"]["bma_doc"]
        names = list(iv)
        tw = max([len("task")] + [len(n) for n in names])
        lvl = int(round(100 * ti["level"]))

        def br(lo, hi):
            return "[" + format(lo, ".3f") + ", " + format(hi, ".3f") + "]"

        lines.append("")
        lines.append(f"{'task':<{tw}}  {'point ppl':>9}  {'BMA ppl':>9}  {str(lvl) + '% test-set interval':>24}"
                     f"  {str(lvl) + '% posterior spread':>22}")
        for n in names:
            t = ti["per_task"][n]
            lines.append(f"{n:<{tw}}  {p['per_task'][n]['ppl']:>9.3f}  {bd['per_task'][n]['ppl']:>9.3f}  "
                         f"{br(t['lo'], t['hi']):>24}  {br(iv[n]['lo'], iv[n]['hi']):>22}")
        lines.append("(BMA ppl: document-level posterior predictive; test-set: documents resampled within the task; "
                     "posterior spread: the task's perplexity under each sample, a plug-in quantity)")
    return "\n".join(lines)


def _cmd_laplace(args) -> int:
    from .api import Bora, load_data
    from .fitfolder import write_laplace

    if args.docs is not None and args.docs < 1:
        raise ConfigError("--docs must be >= 1")
    bora = Bora.load(args.fit_dir, device=args.device)
    if bora.config.fit.guide == "meanfield":
        raise ConfigError("a Laplace posterior is built around a MAP fit; this fit is mean-field")
    train = load_data(bora.config, bora.tokenizer, tasks=bora.tasks)["train"]
    feed = bora.feed(train, progress=not args.quiet, desc="caching frozen layers (train)")
    lap = bora.fit_laplace_(feed, docs=args.docs, labels=args.labels, progress=not args.quiet)
    write_laplace(lap, args.fit_dir / "laplace.safetensors")
    sd = lap.median_task_sd()
    taus = sorted(set(lap.tau.values()))
    print(f"Laplace posterior written to {args.fit_dir / 'laplace.safetensors'}: median posterior sd of a task "
          f"coordinate {sd:.4g} (prior sd tau^-1/2: {', '.join(f'{t ** -0.5:.4g}' for t in taus if 0 < t < math.inf)})")
    return 0


def _cmd_sample(args) -> int:
    import torch

    from .api import Bora

    if args.samples < 1 or args.max_new_tokens < 1:
        raise ConfigError("--samples and --max-new-tokens must be >= 1")
    bora = Bora.load(args.fit_dir, device=args.device)
    post = bora.posterior(args.samples, seed=args.seed)
    seen = args.task in bora.tasks
    kind = ("the point estimate (MAP fit: all samples identical)" if post.is_point and seen
            else f"{args.samples} posterior samples ({bora.config.fit.guide})")
    print(f"task {args.task!r} " + ("(fitted)" if seen else
          "(not in the fit: each sample's adapter is drawn from the global level, the prior predictive "
          "of a new task)") + f"; adapters: {kind}; seed {args.seed}; "
          + (f"sampling (temperature {args.temperature:g}, top-p {args.top_p:g})" if args.do_sample else "greedy"))
    out = post.generate(args.task, args.prompt, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                        temperature=args.temperature, top_p=args.top_p)
    P = len(out["prompt_ids"])
    L = P + max(len(s) for s in out["ids"])
    ids = torch.full((len(out["ids"]), max(L, P + 1)), bora.pad_id, dtype=torch.long)
    for i, s in enumerate(out["ids"]):
        ids[i, :P] = torch.tensor(out["prompt_ids"])
        ids[i, P:P + len(s)] = torch.tensor(s, dtype=torch.long)
    u = post.token_uncertainty(args.task, ids)
    print(f"prompt: {args.prompt!r} ({P} token{'s' if P != 1 else ''})")
    print(f"next token after the prompt: predictive entropy {float(u['entropy'][0, P - 1]):.4f} nats, "
          f"epistemic (mutual information) {float(u['mutual_information'][0, P - 1]):.5f} nats")
    for i, (text, s) in enumerate(zip(out["texts"], out["ids"])):
        print(f"[{i + 1}] {text}")
        if s:
            sl = slice(P - 1, P - 1 + len(s))
            print(f"    {len(s)} token{'s' if len(s) != 1 else ''}; under the BMA: NLL {float(u['nll'][i, sl].mean()):.4f}/token, "
                  f"entropy {float(u['entropy'][i, sl].mean()):.4f}, mutual information "
                  f"{float(u['mutual_information'][i, sl].mean()):.5f} nats/token")
    return 0


def _cmd_export(args) -> int:
    from .api import Bora
    from .export import check_export_output, export_adapters

    check_export_output(args.output, all_tasks=args.all_tasks)
    bora = Bora.load(args.fit_dir, device=args.device)
    if args.task is not None and args.task not in bora.tasks:
        raise ConfigError(f"task {args.task!r} is not in this fit (tasks: {', '.join(bora.tasks[:8])}"
                          f"{', ...' if len(bora.tasks) > 8 else ''})")
    written = export_adapters(bora, args.output, task=args.task, global_adapter=args.global_adapter,
                              all_tasks=args.all_tasks, estimate=args.estimate, sample_index=args.sample_index,
                              seed=args.seed, source=str(args.fit_dir))
    what = args.estimate + (f" #{args.sample_index} (seed {args.seed})" if args.estimate == "sample" else "")
    for name, folder in written.items():
        print(f"{name}: {folder}")
    print(f"wrote {len(written)} PEFT adapter folder(s) ({what}) to {args.output}  "
          f"(peft.PeftModel.from_pretrained(base_model, folder))")
    return 0


@contextlib.contextmanager
def _quiet_libraries(quiet: bool):
    """Under ``--quiet``: no progress bars or warnings from datasets, transformers, huggingface_hub or Python."""
    if not quiet:
        yield
        return
    for var, val in (("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                     ("TRANSFORMERS_VERBOSITY", "error"), ("DATASETS_VERBOSITY", "error"),
                     ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        os.environ.setdefault(var, val)
    undo = []
    try:
        import datasets

        level, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        undo.append(lambda: (datasets.logging.set_verbosity(level), bars and datasets.enable_progress_bars()))
    except ImportError:  # pragma: no cover
        pass
    from transformers.utils import logging as hf_logging

    hf_level, hf_bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    undo.append(lambda: (hf_logging.set_verbosity(hf_level), hf_bars and hf_logging.enable_progress_bar()))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for f in reversed(undo):
            f()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        with _quiet_libraries(bool(getattr(args, "quiet", False))):
            return _run(args, argv)
    except ConfigError as e:
        print(f"bora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bora: interrupted", file=sys.stderr)
        return 130


def _run(args, argv) -> int:
    if args.command == "fit":
        return _cmd_fit(args, argv)
    if args.command == "report":
        from .report import main_report

        out = main_report(args.fit_dir, args.output, device=args.device, fisher_docs=args.fisher_docs,
                          draws=args.draws, progress=not args.quiet)
        print(f"report written to {out}  (open {out / 'index.md'})")
        return 0
    if args.command == "laplace":
        return _cmd_laplace(args)
    if args.command == "sample":
        return _cmd_sample(args)
    if args.command == "export":
        return _cmd_export(args)
    return _cmd_evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
