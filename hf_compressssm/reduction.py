"""One reduction attempt: statistics → per-layer ranks and kept indices → cut. Also `compress_model` (post-hoc)."""

import itertools
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .arguments import CompressionArguments
from .calibration import LayerStatistics, all_reduce_statistics, collect_statistics
from .distributed import broadcast_object
from .hankel import select_indices, select_rank, selective_state_scores
from .surgery import find_mixers, shrink_mixers


logger = logging.get_logger(__name__)


@dataclass
class LayerDecision:
    """What one attempt decided for one layer. ``scores`` are per original state index (length ``old_size``)."""

    layer: int
    old_size: int
    new_size: int
    kept: list[int]
    scores: list[float]
    energy_kept: float

    @property
    def reduced(self) -> bool:
        return self.new_size < self.old_size


@dataclass
class ReductionReport:
    """The outcome of one reduction attempt (in training or post hoc)."""

    step: int | None
    sizes_before: list[int]
    sizes_after: list[int]
    layers: list[LayerDecision] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str | None = None

    @property
    def mean_size_before(self) -> float:
        return sum(self.sizes_before) / len(self.sizes_before)

    @property
    def mean_size_after(self) -> float:
        return sum(self.sizes_after) / len(self.sizes_after)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean_size_before"] = self.mean_size_before
        out["mean_size_after"] = self.mean_size_after
        return out


def fixed_fraction_rank(current_size: int, fraction: float, min_size: int = 1, multiple_of: int = 1) -> int:
    """Rank after removing ``fraction`` of ``current_size`` states: ``ceil(N (1 − f))``, ≥ min_size, rounded up."""
    r = max(int(min_size), math.ceil(current_size * (1.0 - fraction)))
    r = -(-r // multiple_of) * multiple_of
    return min(r, current_size)


def plan_reduction(
    stats: list[LayerStatistics], sizes: list[int], args: CompressionArguments, generator: torch.Generator | None = None
) -> list[LayerDecision]:
    """Per-layer decisions from summed statistics (pure: touches no model)."""
    decisions = []
    for layer, (layer_stats, size) in enumerate(zip(stats, sizes)):
        scores = selective_state_scores(layer_stats, args.score)
        if args.mode == "tolerance":
            rank = select_rank(scores, args.tau, size, args.gate, args.min_state_size, args.multiple_of)
        else:
            rank = fixed_fraction_rank(size, args.fixed_fraction, args.min_state_size, args.multiple_of)
            if rank >= args.gate * size:
                rank = size
        if rank < size:
            kept = select_indices(scores, rank, args.selection, generator=generator)
        else:
            kept = torch.arange(size)
        total = float(scores.sum())
        energy = float(scores[kept].sum()) / total if total > 0 else 1.0
        decisions.append(
            LayerDecision(
                layer=layer,
                old_size=size,
                new_size=int(kept.numel()),
                kept=[int(i) for i in kept],
                scores=[float(s) for s in scores],
                energy_kept=energy,
            )
        )
    return decisions


def _non_finite_reason(model: nn.Module, stats: list[LayerStatistics]) -> str | None:
    for i, mixer in enumerate(find_mixers(model)):
        for name, p in (("A_log", mixer.A_log), ("x_proj.weight", mixer.x_proj.weight)):
            if not bool(torch.isfinite(p).all()):
                return f"layer {i} {name} contains NaN/Inf"
    for i, layer_stats in enumerate(stats):
        if not all(bool(torch.isfinite(v).all()) for v in layer_stats.values()):
            return f"layer {i} calibration statistics contain NaN/Inf"
    return None


def reduce_once(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    args: CompressionArguments,
    optimizer: torch.optim.Optimizer | None = None,
    step: int | None = None,
    generator: torch.Generator | None = None,
) -> ReductionReport:
    """Calibrate on ``batches``, decide per-layer ranks (identical on every rank), and cut ``model`` (+ optimizer).

    NaN/Inf in the weights or statistics skips the cut with a warning; the model is never left half cut.
    """
    start = time.perf_counter()
    sizes = [m.A_log.shape[-1] for m in find_mixers(model)]
    stats = all_reduce_statistics(collect_statistics(model, batches))
    reason = _non_finite_reason(model, stats)
    reason = broadcast_object(reason)
    if reason is not None:
        logger.warning(f"CompreSSM: reduction at step {step} skipped: {reason}. The model is unchanged.")
        return ReductionReport(step, sizes, sizes, [], time.perf_counter() - start, skipped=reason)
    decisions = plan_reduction(stats, sizes, args, generator)
    decisions = broadcast_object(decisions)  # rank 0 decides: every replica keeps exactly the same indices
    kept = {d.layer: torch.tensor(d.kept, dtype=torch.long) for d in decisions if d.reduced}
    if kept:
        shrink_mixers(model, kept, optimizer)
    report = ReductionReport(
        step=step,
        sizes_before=sizes,
        sizes_after=[d.new_size for d in decisions],
        layers=decisions,
        seconds=time.perf_counter() - start,
    )
    return report


def update_compression_record(
    model: nn.Module, args: CompressionArguments, schedule: list[int] | None = None
) -> dict[str, Any]:
    """Create or refresh ``model.config.compression`` (method, initial sizes, τ, mode, score, selection, schedule)."""
    record = dict(model.config.compression or {})
    record.setdefault("method", "CompreSSM")
    record.setdefault("initial_state_sizes", list(model.config.state_sizes))
    record.setdefault("stopped", False)
    record.update({"tau": args.tau, "mode": args.mode, "score": args.score, "selection": args.selection})
    if schedule is not None:
        record["schedule"] = list(schedule)
    model.config.compression = record
    return record


def record_report(model: nn.Module, report: ReductionReport, args: CompressionArguments) -> None:
    """Append ``report`` to ``model.compression_history`` (full detail) and ``config.compression["history"]``."""
    entry = report.to_dict()
    entry.update({"tau": args.tau, "mode": args.mode, "score": args.score, "selection": args.selection})
    model.compression_history = list(getattr(model, "compression_history", []) or []) + [entry]
    record = update_compression_record(model, args)
    record["history"] = list(record.get("history", [])) + [
        {"step": report.step, "sizes_before": report.sizes_before, "sizes_after": report.sizes_after,
         "skipped": report.skipped}
    ]
    model.config.compression = record


def compress_model(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    tau: float = CompressionArguments.tau,
    optimizer: torch.optim.Optimizer | None = None,
    **kwargs,
) -> ReductionReport:
    """Reduce a trained (or converted) model once, after training, with the same rule as in training.

    Args:
        model: a CompreSSM Mamba model (convert a stock one with `CompreSSMMambaForCausalLM.from_mamba`).
        dataloader: yields dicts of model inputs; the first ``calibration_batches`` are used.
        tau, **kwargs: `CompressionArguments` fields (``score``, ``selection``, ``mode``, ``min_state_size``, ...).
    Returns:
        a `ReductionReport` with per-layer sizes, kept indices and scores.
    """
    args = kwargs.pop("compression_args", None) or CompressionArguments(tau=tau, **kwargs)
    if not find_mixers(model):
        raise ValueError(f"{type(model).__name__} has no Mamba mixers: nothing to compress.")
    if not hasattr(getattr(model, "config", None), "with_state_sizes"):
        raise ValueError(
            f"{type(model).__name__} keeps one state_size for all layers; convert it first with "
            "CompreSSMMambaForCausalLM.from_mamba(model)."
        )
    generator = torch.Generator().manual_seed(args.compression_seed)
    batches = list(itertools.islice(iter(dataloader), args.calibration_batches))
    if not batches:
        raise ValueError("the dataloader yielded no batch: compression needs real inputs to calibrate on.")
    update_compression_record(model, args)
    report = reduce_once(model, batches, args, optimizer=optimizer, generator=generator)
    record_report(model, report, args)
    return report
