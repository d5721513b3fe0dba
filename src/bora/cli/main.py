"""Command line: ``bora fit``, ``bora evaluate``, ``bora report``, ``bora sample`` and ``bora export``.

>>> from bora.cli.main import build_parser
>>> args = build_parser().parse_args(["fit", "--tau-mode", "fixed", "--tau", "100", "--output", "runs/x"])
>>> args.tau_mode, args.tau
('fixed', 100.0)

``bora fit`` loads the base model and data, evaluates the base model on the held-out test split,
fits, evaluates the fit, prints a per-task table and saves the fit folder. ``bora evaluate
FIT_DIR`` recomputes the table from a saved fit (``--data FILE``: every document of FILE instead, those of tasks
not in the fit under the global adapter, in a cold-start table of their own; the fitted tasks with 1-2 training
documents are always reported apart: :mod:`bora.posterior.coldstart`); ``bora report FIT_DIR`` writes the diagnostics
folder (shrinkage per task, tau, training curve, ArviZ summary; see :mod:`bora.diagnostics.report`). ``bora evaluate
FIT_DIR --samples S`` adds accuracy, calibration (ECE), Brier score and uncertainty for the point
estimate and the Bayesian model average over ``S`` posterior samples; ``bora sample FIT_DIR --task
NAME --prompt TEXT`` prints continuations, each from its own posterior adapter sample; ``bora export
FIT_DIR --task NAME --output DIR`` writes PEFT adapter folders (see :mod:`bora.posterior.samples`,
:mod:`bora.io.export`). ``bora fit --guide meanfield --init-from MAP_DIR`` starts a mean-field fit at a
MAP fit's estimates. ``bora fit`` checkpoints the run into ``OUTPUT/checkpoints`` (``--checkpoint-every``);
``bora fit --resume DIR`` continues an interrupted fit exactly where its last checkpoint left it
(:mod:`bora.io.checkpoint`). Bora never replaces or deletes a folder it did not write: an existing
output folder holding anything else is refused, and replacing an existing fit needs ``--overwrite``.
``--quiet`` and ``--device`` are accepted by every command; ``--quiet`` also silences the libraries' progress bars
and warnings. The ``bora fit`` flags are generated from the config dataclasses (:mod:`bora.cli.args`), so
``--help`` documents exactly what the code does. A user error prints one line
(``bora: error: ...``) and exits with status 2.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Optional, Sequence

from .args import build_parser, config_from_args
from ..core.config import ConfigError
from .tables import format_posterior_table, format_table

__all__ = ["main", "build_parser", "config_from_args", "format_table", "format_posterior_table"]

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
    from ..core.device import keep_freed_memory

    keep_freed_memory()
    try:
        with _quiet_libraries(args.quiet):
            return _run(args, argv)
    except ConfigError as e:
        print(f"bora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bora: interrupted", file=sys.stderr)
        return 130


def _run(args, argv) -> int:
    from . import commands

    if args.command == "fit":
        return commands.cmd_fit(args, argv)
    if args.command == "report":
        out = commands.main_report(args.fit_dir, args.output, device=args.device, fisher_docs=args.fisher_docs,
                          draws=args.draws, progress=not args.quiet)
        print(f"report written to {out}  (open {out / 'index.md'})")
        return 0
    if args.command == "laplace":
        return commands.cmd_laplace(args)
    if args.command == "sample":
        return commands.cmd_sample(args)
    if args.command == "export":
        return commands.cmd_export(args)
    return commands.cmd_evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
