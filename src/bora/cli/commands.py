"""What each ``bora`` command does once its arguments are parsed (``fit``, ``evaluate``, ``laplace``,
``sample``, ``export``); :mod:`bora.cli.main` dispatches to them.

>>> from bora.cli.commands import fit_output_folder   # doctest: +SKIP

``bora fit`` under ``torchrun`` runs as one of several data-parallel processes: only rank 0 prints and
writes (:mod:`bora.core.distributed`).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Optional

from .args import COMMON_FLAGS, config_from_args, explicit_flags
from ..core.config import BoraConfig, CheckpointConfig, ConfigError
from .tables import (format_classification_table, format_new_tasks, format_posterior_table, format_table, format_tau,
                     format_task_taus, format_tiny_tasks)

__all__ = ["main_report", "cmd_fit", "cmd_evaluate", "cmd_laplace", "cmd_sample", "cmd_export"]


_RESUME_FLAGS = {"resume", "output", "checkpoint_every", *COMMON_FLAGS}


def fit_output_folder(args, argv) -> tuple[Path, Optional[object], BoraConfig]:
    """``(output folder, checkpoint to resume or None, config)``, refusing unsafe outputs before any loading."""
    from ..io.checkpoint import has_checkpoint, load_checkpoint
    from ..core.files import check_output, folder_kind, read_json

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
    extra = sorted(explicit_flags(argv) - _RESUME_FLAGS)
    if extra:
        raise ConfigError(f"--resume continues a fit with its own settings; remove --{extra[0].replace('_', '-')}")
    ck = load_checkpoint(out)
    if folder_kind(out) != "fit":
        check_output(out, "fit")  # the finished fit will replace the folder: it must be bora's alone
    config = BoraConfig.from_dict(ck.meta.get("config"))
    return out, ck, config


def cmd_fit(args, argv) -> int:
    """``bora fit``, also as one of several data-parallel processes (``torchrun ... -m bora fit``):
    every rank fits its shard of each batch; only rank 0 prints and writes (:mod:`bora.core.distributed`)."""
    from ..core.distributed import close, init_from_env, is_main

    if not init_from_env(args.device):
        return fit_command(args, argv)
    ok = False
    try:
        if is_main():
            code = fit_command(args, argv)
        else:
            args.quiet = True
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                code = fit_command(args, argv)
        ok = True
        return code
    finally:
        close(ok)  # every rank done (rank 0 has written the fit) before the connections go


def _test_metrics(bora, test, base: dict, fitted: dict, sizes: dict) -> dict:
    """``metrics.json``'s test section of a finished fit: base and fit perplexities, by training-split size, and for
    classification rows the accuracy/NLL/ECE/Brier of the point estimate."""
    from ..posterior.coldstart import tiny_tasks
    from ..evaluation.evaluate import by_task_size

    out = {"base": base, "fit": fitted, "by_train_size": by_task_size(fitted, base, sizes)}
    if not test.split.is_classification:
        out["tiny_tasks"] = tiny_tasks(bora, test, fitted, base, sizes)
    else:
        from ..evaluation.classification import evaluate_classification

        out["classification"] = evaluate_classification(bora.posterior(1), test,
                                                        batch_size=bora.config.fit.eval_batch_size)
        out["classification"].pop("posterior_average")  # one draw is no average: `bora evaluate` takes >= 10
    return out


def _print_test_tables(test: dict, base: dict, fitted: dict, sizes: dict) -> None:
    """``bora fit``'s test tables: classification metrics, or perplexity per task and the 1-2-document tasks."""
    if "classification" in test:  # its NLL per row is the table's; perplexity means little here
        print(format_classification_table(test["classification"]))
        return
    print(format_table(base, fitted, train_sizes=sizes))
    if test["tiny_tasks"]["tasks"]:
        print()
        print(format_tiny_tasks(test["tiny_tasks"]))


def fit_command(args, argv) -> int:
    from ..api import Bora
    from ..core.distributed import is_main
    from ..io.checkpoint import Checkpointer, data_fingerprint
    from ..fit.loop import NumericalError
    from ..io.fitfolder import base_fingerprint, save_fit

    every = CheckpointConfig(every=args.checkpoint_every).every
    out, ck, config = fit_output_folder(args, argv)
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
        meta["config"] = bora.config.to_dict()  # a warm-started mean-field fit starts there, not at a MAP phase
    if bora.config.fit.guide == "meanfield" and bora.config.fit.meanfield_start == "map" and ck is None:
        print("mean-field fit: a MAP fit first (offset task sites, evidence tau, Laplace scales), then the "
              "variational fit from it (means at lr / 10; --meanfield-start init skips the MAP phase)", flush=True)
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
    if bora.map_phase is not None:
        m = bora.map_phase
        print(f"MAP phase: tau {', '.join(f'{k}={format_tau(v)}' for k, v in (m.tau or {}).items()) or 'n/a'}, "
              f"best step {m.best_step} of {m.steps}, best validation NLL {m.best_val_nll:.4f}", flush=True)
    fitted = bora.evaluate(feeds["test"])
    sizes = dict(zip(bora.tasks, feeds["train"].split.task_sizes().tolist()))
    bora.metrics = {"test": _test_metrics(bora, feeds["test"], base, fitted, sizes)}
    if is_main():
        save_fit(bora, out)
    print()
    _print_test_tables(bora.metrics["test"], base, fitted, sizes)
    tau = bora.tau_estimate()
    print(f"\ntau: {', '.join(f'{k}={format_tau(v)}' for k, v in tau.items())}   steps: {result.steps}   "
          f"best step: {result.best_step}   step time: {result.step_seconds:.3f} s   "
          f"tokens/s: {result.tokens_per_second:.0f}   wall: {time.perf_counter() - t0:.0f} s")
    if result.tau_hyper:  # a per-task tau: every task's and the learned Gamma(a, b)
        print(format_task_taus(bora.tasks, tau.get("tau") or [], result.tau_hyper))
    _print_tau_rounds(result, bora.config.fit)
    print(f"fit time: {result.seconds:.0f} s = steps {result.seconds_steps:.0f} s + validation "
          f"{result.seconds_validation:.0f} s + tau updates {result.seconds_tau:.0f} s + checkpoints "
          f"{result.seconds_checkpoint:.0f} s (+ other); Laplace curvature after it: {result.seconds_posterior:.0f} s")
    if bora.laplace is not None:
        print(f"Laplace posterior: median posterior sd of a task coordinate {bora.laplace.median_task_sd():.4g} "
              f"(prior sd tau^-1/2); `bora evaluate {out} --samples 8` averages over it")
    print(f"saved to {out}  (bora evaluate {out})")
    return 0


def _print_tau_rounds(result, cfg) -> None:
    """The tau rounds of a fit (``fit.tau_rounds``, :mod:`bora.fit.refine`) and the final fixed-point residual."""
    for r in result.tau_rounds or []:
        print(f"tau round {r['round']}: fitted at tau {_taus(r['tau'])}, update there {_taus(r['update'])}, residual "
              f"{_residuals(r['residual'])}, best step {r['best_step']} of {r['steps']}, validation NLL "
              f"{r['best_val_nll']:.4f}")
    if result.tau_converged is not None:
        print(f"tau rounds: {'converged' if result.tau_converged else 'not converged'} after "
              f"{len(result.tau_rounds or [])} of at most {cfg.tau_rounds} (tolerance {100 * cfg.tau_tolerance:g}%)")
    if result.tau_residual:
        print("tau fixed-point residual at the returned adapters: " + _residuals(result.tau_residual)
              + " (|evidence update there - tau| / tau; the fit stopped before tau converged where this is large)")


def _taus(values: dict) -> str:
    return ", ".join(f"{k}={format_tau(v)}" for k, v in values.items())


def _residuals(residual) -> str:
    return ", ".join(f"{k} {100 * v:.1f}%" for k, v in (residual or {}).items()) or "n/a"


def cmd_evaluate(args) -> int:
    from ..api import Bora, load_data

    if (args.samples is not None and args.samples < 1) or args.batch_size < 1:
        raise ConfigError("--samples and --batch-size must be >= 1")
    if args.json is not None and args.json.is_dir():
        raise ConfigError(f"--json {args.json} is a folder; give a file name, e.g. {args.json / 'evaluation.json'}")
    if args.data is not None and args.split is not None:
        raise ConfigError("--split picks a split of the fit's data, --data FILE evaluates every document of FILE: "
                          "give one of them")
    bora = Bora.load(args.fit_dir, device=args.device)
    tau = bora.tau_estimate()
    if args.data is not None:
        return _evaluate_file(args, bora, tau)
    name = args.split or "test"
    data = load_data(bora.config, bora.tokenizer, tasks=bora.tasks)
    split = data[name]
    if split.task_sizes().eq(0).any():
        missing = [t for t, n in zip(bora.tasks, split.task_sizes().tolist()) if n == 0]
        raise ConfigError(f"the data has no {name} documents for task(s) {missing[:3]} of this fit")
    sizes = dict(zip(bora.tasks, data["train"].task_sizes().tolist()))
    res = _evaluate_fitted(args, bora, split, sizes, name, tau)
    _write_evaluation(args.json, {"split": name, **res, "tau": tau})
    return 0


def _evaluate_fitted(args, bora, split, sizes: Optional[dict], title: str, tau: dict) -> dict:
    """``bora evaluate``'s tables of documents of fitted tasks (``split``, over the fit's tasks): base vs fit per
    task, the tasks with 1-2 training documents apart (``sizes``: training documents per task), tau, then the point
    vs posterior-average table; returns their numbers for ``--json``."""
    from ..posterior.coldstart import tiny_tasks

    feed = bora.feed(split, progress=not args.quiet, desc=f"caching frozen layers ({title})")
    if split.is_classification:
        from ..evaluation.classification import evaluate_classification

        post = bora.posterior(10 if args.samples is None else args.samples, seed=args.seed,
                              predictive=args.predictive)
        res = evaluate_classification(post, feed, batch_size=args.batch_size, rows=True)  # rows: small, kept
        print(format_classification_table(res, title=title))
        _print_tau(bora, tau)
        return {"classification": res, "train_sizes": sizes}  # training rows per task (analysis/classification.py)
    base = bora.evaluate(feed, base=True)
    fitted = bora.evaluate(feed)
    print(format_table(base, fitted, title=title, train_sizes=sizes))
    tiny = tiny_tasks(bora, feed, fitted, base, sizes) if sizes is not None else None
    if tiny is not None and tiny["tasks"]:
        print()
        print(format_tiny_tasks(tiny, title=title))
    _print_tau(bora, tau)
    post = bora.posterior(1 if args.samples is None else args.samples, seed=args.seed, predictive=args.predictive)
    res = post.evaluate(feed, batch_size=args.batch_size, progress=not args.quiet, doc_estimator=args.doc_estimator)
    print()
    print(format_posterior_table(res, title=title))
    return {"base": base, "fit": fitted, "tiny_tasks": tiny, "posterior": res}


def _evaluate_file(args, bora, tau: dict) -> int:
    """``bora evaluate FIT --data FILE``: every document of FILE; those of fitted tasks as ``bora evaluate`` scores
    a split, those of tasks not in the fit under the global adapter (:mod:`bora.posterior.coldstart`)."""
    from ..posterior.coldstart import evaluate_new_tasks, read_new_documents

    known, new = read_new_documents(bora, args.data)
    if new is not None and not bora.model.has_global:
        raise ConfigError(f"{args.data} has documents of {len(new.tasks)} task(s) not in the fit (e.g. "
                          f"{new.tasks[0]!r}); this fit (tau_mode='uncoupled') has no global adapter to serve them")
    k = len(set(known.task_ids.tolist())) if known is not None else 0
    print(f"{args.data}: {len(known) if known is not None else 0} documents of {k} task(s) in the fit, "
          f"{len(new) if new is not None else 0} documents of {len(new.tasks) if new is not None else 0} task(s) "
          "not in the fit", flush=True)
    out: dict = {"data": str(args.data)}
    if known is not None:
        sizes = dict(zip(bora.tasks, bora.task_sizes)) if bora.task_sizes is not None else None
        out.update(_evaluate_fitted(args, bora, known, sizes, Path(str(args.data)).name, tau))
        print()
    out["new_tasks"] = None
    if new is not None:
        out["new_tasks"] = evaluate_new_tasks(bora, new, samples=args.samples, seed=args.seed,
                                              predictive=args.predictive, progress=not args.quiet)
        print(format_new_tasks(out["new_tasks"]))
    if known is None:
        _print_tau(bora, tau)
    _write_evaluation(args.json, {**out, "tau": tau})
    return 0


def _write_evaluation(path: Optional[Path], obj: dict) -> None:
    """``bora evaluate --json PATH``: the evaluation as JSON (atomically)."""
    if path is not None:
        from ..core.files import write_json

        write_json(path, obj)
        print(f"wrote {path}")


def cmd_laplace(args) -> int:
    from ..api import Bora, load_data
    from ..io.fitfolder import write_laplace

    if args.docs is not None and args.docs < 1:
        raise ConfigError("--docs must be >= 1")
    bora = Bora.load(args.fit_dir, device=args.device)
    if bora.config.fit.guide == "meanfield":
        raise ConfigError("a Laplace posterior is built around a MAP fit; this fit is mean-field")
    train = load_data(bora.config, bora.tokenizer, tasks=bora.tasks)["train"]
    feed = bora.feed(train, progress=not args.quiet, desc="caching frozen layers (train)")
    lap = bora.fit_laplace_(feed, docs=args.docs, labels=args.labels, structure=args.structure,
                            progress=not args.quiet)
    write_laplace(lap, args.fit_dir / "laplace.safetensors")
    sd = lap.median_task_sd()
    taus = sorted({x for t in lap.tau.values() for x in (t if isinstance(t, list) else [t])})  # a list: per task
    prior_sd = [t ** -0.5 for t in taus if 0 < t < math.inf]
    per_task = any(isinstance(t, list) for t in lap.tau.values())
    shown = (f"{min(prior_sd):.4g}..{max(prior_sd):.4g} over the tasks" if per_task
             else ", ".join(f"{x:.4g}" for x in prior_sd))
    print(f"Laplace posterior written to {args.fit_dir / 'laplace.safetensors'}: median posterior sd of a task "
          f"coordinate {sd:.4g} (prior sd tau^-1/2: {shown})")
    return 0


def _print_tau(bora, tau: dict) -> None:
    """The fit's tau after an evaluation table (a per-task tau: every task's and the learned Gamma(a, b))."""
    print(f"\ntau: {', '.join(f'{k}={format_tau(v)}' for k, v in tau.items())}")
    hyper = bora.tau.hyper_dict() if bora.tau is not None else {}
    if hyper:
        print(format_task_taus(bora.tasks, tau.get("tau") or [], hyper))


def cmd_sample(args) -> int:
    import torch

    from ..api import Bora

    if args.samples < 1 or args.max_new_tokens < 1:
        raise ConfigError("--samples and --max-new-tokens must be >= 1")
    bora = Bora.load(args.fit_dir, device=args.device)
    post = bora.posterior(args.samples, seed=args.seed, predictive=args.predictive)
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
            nll = float(u['nll'][i, sl].mean())
            print(f"    {len(s)} token{'s' if len(s) != 1 else ''}; under the BMA: NLL {nll:.4f}/token, "
                  f"entropy {float(u['entropy'][i, sl].mean()):.4f}, mutual information "
                  f"{float(u['mutual_information'][i, sl].mean()):.5f} nats/token")
    return 0


def cmd_export(args) -> int:
    from ..api import Bora
    from ..io.export import check_export_output, export_adapters

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


def main_report(fit_dir, out_dir=None, *, device="auto", fisher_docs: Optional[int] = None, draws: int = 200,
                independent=None, progress: bool = True) -> Path:
    """Load the fit saved in ``fit_dir`` and write its report to ``out_dir`` (default ``fit_dir/report``)."""
    from ..api import Bora
    from ..core.files import check_output
    from ..diagnostics.report import write_report

    fit_dir = Path(fit_dir)
    out = Path(out_dir) if out_dir is not None else fit_dir / "report"
    check_output(out, "report")  # before loading anything
    if progress:
        print(f"loading fit {fit_dir}", flush=True)
    bora = Bora.load(fit_dir, device=device)
    write_report(bora, out, fisher_docs=fisher_docs, draws=draws, independent=independent, progress=progress)
    return out
