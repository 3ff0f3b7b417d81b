"""`CompressionArguments`: every knob of in-training compression, as a dataclass `HfArgumentParser` accepts."""

import math
import numbers
import types
import typing
from dataclasses import asdict, dataclass, field, fields

from transformers.utils import logging

from .ranks import SELECTIONS
from .scoring import SCORES


logger = logging.get_logger(__name__)

MODES = ("tolerance", "fixed", "pragmatic")


def _base_type(annotation) -> tuple[type, bool]:
    """``(int, True)`` for ``int | None``; ``(list, False)`` for ``list[int]``; ``(float, False)`` for ``float``."""
    if isinstance(annotation, types.UnionType):
        args = [a for a in annotation.__args__ if a is not type(None)]
        return _base_type(args[0])[0], True
    return getattr(annotation, "__origin__", annotation), False


def _type_error(name: str, value, expected: str) -> ValueError:
    hint = ""
    if isinstance(value, str) and not expected.startswith("a list"):
        hint = f" (a string: write {name}={value} without quotes, or convert it first)"
    return ValueError(f"{name} must be {expected}; got {value!r} of type {type(value).__name__}{hint}.")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass
class CompressionArguments:
    """Arguments of CompreSSM in-training compression (``docs/method.md`` §4–5).

    The schedule is either ``reduction_steps`` (explicit optimisation steps) or ``num_reductions`` attempts evenly
    spaced over the fraction window ``(schedule_start, schedule_end]`` of the total optimisation steps; the default
    is 4 attempts at 2.5 %, 5 %, 7.5 % and 10 %.
    """

    tau: float = field(
        default=0.25,
        metadata={"help": "Fraction of Hankel energy discarded per layer at each attempt, in [0, 1) (mode tolerance)."},
    )
    mode: str = field(
        default="tolerance",
        metadata={"help": "tolerance: rank from tau; fixed: shrink by fixed_fraction; pragmatic: fixed + rollback."},
    )
    score: str = field(default="h2", metadata={"help": f"State importance score, one of {SCORES}."})
    selection: str = field(
        default="largest", metadata={"help": f"Which states to keep, one of {SELECTIONS} (smallest/random: ablations)."}
    )
    num_reductions: int = field(default=4, metadata={"help": "Number of evenly spaced reduction attempts."})
    schedule_start: float = field(default=0.0, metadata={"help": "Start of the schedule window (fraction of steps)."})
    schedule_end: float = field(default=0.1, metadata={"help": "End of the schedule window (fraction of steps)."})
    reduction_steps: list[int] | None = field(
        default=None, metadata={"help": "Explicit optimisation steps at which to reduce (overrides the window)."}
    )
    gate: float = field(default=0.95, metadata={"help": "Reduce a layer only if the new rank < gate * current size."})
    min_state_size: int = field(default=1, metadata={"help": "Never cut a layer below this many states."})
    multiple_of: int = field(default=1, metadata={"help": "Round each kept rank up to a multiple of this."})
    calibration_batches: int = field(
        default=4, metadata={"help": "Number of recent training batches used to measure state importance."}
    )
    fixed_fraction: float = field(
        default=0.5, metadata={"help": "Fraction of states removed per attempt in modes fixed and pragmatic."}
    )
    rollback_metric: str = field(
        default="eval_loss", metadata={"help": "Metric compared before/after a cut in pragmatic mode."}
    )
    rollback_greater_is_better: bool = field(
        default=False, metadata={"help": "Whether higher rollback_metric is better."}
    )
    rollback_tolerance: float = field(
        default=0.02,
        metadata={"help": "Pragmatic mode rolls back when the metric is worse by more than this relative amount."},
    )
    rollback_delay_steps: int | None = field(
        default=None,
        metadata={"help": "Steps after a cut before the pragmatic comparison (default: half the gap to the next cut)."},
    )
    compression_seed: int = field(
        default=0, metadata={"help": "Seed of the random selection ablation (named apart from TrainingArguments.seed)."}
    )

    def __post_init__(self):
        self.validate()

    def check_types(self) -> None:
        """Raise `ValueError` for a field of the wrong type (a number given as a string, a float for an integer,
        a string for ``reduction_steps``): such a run would otherwise die at its first cut."""
        hints = typing.get_type_hints(type(self))  # HfArgumentParser rewrites Field.type; annotations stay
        for f in fields(self):
            value = getattr(self, f.name)
            kind, optional = _base_type(hints[f.name])
            if value is None:
                if not optional:
                    raise _type_error(f.name, value, f"a {kind.__name__}")
                continue
            if kind is bool:
                if not isinstance(value, bool):
                    raise _type_error(f.name, value, "True or False")
            elif kind is int:
                if not _is_int(value):
                    raise _type_error(f.name, value, "an integer")
                setattr(self, f.name, int(value))
            elif kind is float:
                if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
                    raise _type_error(f.name, value, "a finite number")
                setattr(self, f.name, float(value))
            elif kind is str:
                if not isinstance(value, str):
                    raise _type_error(f.name, value, "a string")
            elif kind is list:
                if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
                    raise _type_error(f.name, value, "a list of integers (optimisation steps), e.g. [15, 30]")
                setattr(self, f.name, [int(v) for v in value])

    def validate(self) -> None:
        """Raise `ValueError` naming the bad argument (wrong type, or outside its valid range)."""
        self.check_types()
        if not 0.0 <= float(self.tau) < 1.0:
            raise ValueError(f"tau={self.tau} is outside [0, 1): it is the fraction of Hankel energy discarded.")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {MODES}.")
        if self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}; choose one of {SCORES}.")
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {self.selection!r}; choose one of {SELECTIONS}.")
        if not 0.0 < float(self.gate) <= 1.0:
            raise ValueError(f"gate={self.gate} must be in (0, 1].")
        if int(self.min_state_size) < 1:
            raise ValueError(f"min_state_size={self.min_state_size} must be >= 1.")
        if int(self.multiple_of) < 1:
            raise ValueError(f"multiple_of={self.multiple_of} must be >= 1.")
        if int(self.calibration_batches) < 1:
            raise ValueError(f"calibration_batches={self.calibration_batches} must be >= 1.")
        if not 0.0 < float(self.fixed_fraction) < 1.0:
            raise ValueError(f"fixed_fraction={self.fixed_fraction} must be in (0, 1).")
        if self.rollback_tolerance < 0:
            raise ValueError(f"rollback_tolerance={self.rollback_tolerance} must be >= 0.")
        if self.reduction_steps is not None:
            steps = list(self.reduction_steps)
            if not steps or any(int(s) < 1 for s in steps):
                raise ValueError(f"reduction_steps={steps} must be a non-empty list of optimisation steps >= 1.")
        else:
            if int(self.num_reductions) < 1:
                raise ValueError(f"num_reductions={self.num_reductions} must be >= 1 (or pass reduction_steps).")
            if not 0.0 <= float(self.schedule_start) < float(self.schedule_end) <= 1.0:
                raise ValueError(
                    f"schedule window ({self.schedule_start}, {self.schedule_end}] must satisfy 0 <= start < end <= 1."
                )

    def schedule(self, max_steps: int) -> list[int]:
        """The optimisation steps (1-based, ascending, distinct) at which to attempt a reduction.

        Raises `ValueError` when a step lies beyond ``max_steps``.
        """
        if self.reduction_steps is not None:
            steps = sorted({int(s) for s in self.reduction_steps})
            if len(steps) < len(self.reduction_steps):
                logger.warning(
                    f"CompreSSM: reduction_steps {list(self.reduction_steps)} repeat a step; the schedule is {steps}."
                )
            if steps[-1] > max_steps:
                raise ValueError(
                    f"reduction_steps {steps} go beyond max_steps={max_steps}: no reduction would happen at step "
                    f"{steps[-1]}. Use steps <= {max_steps} or train longer."
                )
            return steps
        span = float(self.schedule_end) - float(self.schedule_start)
        steps = []
        for i in range(1, int(self.num_reductions) + 1):
            frac = float(self.schedule_start) + span * i / int(self.num_reductions)
            steps.append(max(1, int(round(frac * max_steps))))
        distinct = sorted(set(steps))
        if len(distinct) < int(self.num_reductions):
            logger.warning(
                f"CompreSSM: num_reductions={self.num_reductions} attempts in the window ({self.schedule_start}, "
                f"{self.schedule_end}] of {max_steps} steps collapse to {len(distinct)} distinct steps {distinct}. "
                "Train longer, widen the window, or lower num_reductions."
            )
        return distinct

    def to_dict(self) -> dict:
        return asdict(self)


def check_min_state_size(min_state_size: int, state_size: int) -> None:
    """`ValueError` when no layer of a model with initial size ``state_size`` could ever be cut."""
    if int(min_state_size) > int(state_size):
        raise ValueError(
            f"min_state_size={min_state_size} exceeds state_size={state_size}, the model's initial state size: no "
            "layer could ever be cut. Lower min_state_size or start from a larger state_size."
        )


def check_training_setup(args: CompressionArguments, training_args) -> None:
    """`ValueError` for `TrainingArguments` the callback cannot work with (pragmatic mode without evaluation,
    FSDP or DeepSpeed, which shard flat parameters whose shapes cannot change in place)."""
    if args.mode == "pragmatic" and getattr(training_args, "eval_strategy", "no") in ("no", None):
        raise ValueError(
            "mode='pragmatic' compares an evaluation before and after each cut: set eval_strategy='steps' with "
            "eval_steps (--eval_strategy steps --eval_steps N) and pass an eval_dataset, or use mode='tolerance'."
        )
    for name, label in (("fsdp", "FSDP"), ("deepspeed", "DeepSpeed")):
        if getattr(training_args, name, None):
            raise ValueError(
                f"CompreSSM does not support {label}: it changes parameter shapes during training, which sharded "
                "flat parameters cannot follow. Use DDP (torchrun / accelerate launch without FSDP or DeepSpeed)."
            )
