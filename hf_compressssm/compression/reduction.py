"""One reduction attempt: statistics → per-layer ranks and kept indices → cut. Also `compress_model` (post hoc)."""

import copy
import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..families import FAMILIES, SSMLayers, ssm_layers
from .arguments import CompressionArguments
from .calibration import all_reduce_statistics, collect_statistics
from .checks import all_finite
from .distributed import broadcast_object
from .ranks import layer_rank, select_group_indices, select_indices
from .record import history_owner, record_report, set_history, update_compression_record
from .scoring import LayerStatistics, scoring_for
from .surgery import shrink_mixers


logger = logging.get_logger(__name__)


@dataclass
class LayerDecision:
    """What one attempt decided for one layer. ``scores`` are per original state index (length ``old_size``).

    Grouped families (Mamba-2): ``scores`` and ``kept`` are one list per group (``G × old_size``, ``G × new_size``).
    """

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
    def unchanged(self) -> bool:
        """True when the attempt changed no layer (skipped, gated, or nothing to cut)."""
        return self.sizes_after == self.sizes_before

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
        out["unchanged"] = self.unchanged
        return out


def plan_reduction(
    stats: list[LayerStatistics],
    sizes: list[int],
    args: CompressionArguments,
    generator: torch.Generator | None = None,
    family=None,
    target_sizes: list[int] | None = None,
) -> list[LayerDecision]:
    """Per-layer decisions from summed statistics (pure: touches no model).

    ``target_sizes`` (one per layer) replaces the mode's rank rule by exact sizes (a size ≥ the present one leaves
    the layer unchanged).
    """
    scoring = scoring_for(family or FAMILIES[0])
    decisions = []
    for layer, (layer_stats, size) in enumerate(zip(stats, sizes)):
        scores = scoring.scores(layer_stats, args.score)
        total = float(scores.sum())
        if total <= 0:
            # Every state scored 0: nothing tells the states apart, so no choice of kept states is informed.
            logger.warning(
                f"CompreSSM: every state of layer {layer} scored 0 (its B or C projection rows are all zero, or the "
                "calibration batches carried no signal); the layer is left unchanged."
            )
            rank = size
        elif target_sizes is not None:
            rank = min(size, target_sizes[layer])
        else:
            rank = layer_rank(scores, size, args)
        if scores.ndim == 2:  # grouped (Mamba-2): the same count in every group
            if rank < size:
                kept = select_group_indices(scores, rank, args.selection, generator=generator)
            else:
                kept = torch.arange(size).expand(scores.shape[0], -1)
            energy = float(scores.gather(1, kept.to(scores.device)).sum()) / total if total > 0 else 1.0
            decisions.append(LayerDecision(layer, size, int(kept.shape[1]), kept.tolist(), scores.tolist(), energy))
            continue
        if rank < size:
            kept = select_indices(scores, rank, args.selection, generator=generator)
        else:
            kept = torch.arange(size)
        # The fraction of score energy the kept states hold; a layer kept whole (all-zero scores included) keeps 1.
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


def _non_finite_reason(model: nn.Module, layers: SSMLayers, stats: list[LayerStatistics]) -> str | None:
    names = {id(p): n for n, p in model.named_parameters()}
    for i, mixer in enumerate(layers.mixers):
        for p in layers.family.shrinkable_parameters(mixer):
            if not all_finite(p):
                return f"layer {i} {names.get(id(p), 'parameter').rpartition('mixer.')[2]} contains NaN/Inf"
    for i, layer_stats in enumerate(stats):
        if not all(all_finite(v) for v in layer_stats.values()):
            return f"layer {i} calibration statistics contain NaN/Inf"
    return None


def reduce_once(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    args: CompressionArguments,
    optimizer: torch.optim.Optimizer | None = None,
    step: int | None = None,
    generator: torch.Generator | None = None,
    target_sizes: list[int] | None = None,
    on_commit: Callable[[ReductionReport], None] | None = None,
    statistics: list[LayerStatistics] | None = None,
    calibration_seconds: float = 0.0,
    layers: SSMLayers | None = None,
) -> ReductionReport:
    """Calibrate on ``batches`` (or take this process's already summed ``statistics``, e.g. recorded from the
    training forwards, whose cost ``calibration_seconds`` is added to the report's time), decide per-layer ranks (identical on every rank), and cut ``model`` (+ optimizer).

    ``on_commit(report)`` (e.g. record the history) runs inside the cut, so that a failure there undoes it too; it
    also runs when nothing is cut. NaN/Inf in the weights or statistics skips the cut with a warning. Atomic: when
    anything fails, model, optimizer, config (``state_sizes``, ``compression``), ``compression_history`` and
    ``generator`` are exactly as before, and the error is raised. ``layers``: the model's `SSMLayers`, when the
    caller has resolved them (every stage of the attempt uses them).
    """
    start = time.perf_counter() - calibration_seconds
    layers = layers or ssm_layers(model)
    sizes = layers.state_sizes()
    saved = (
        copy.deepcopy(model.config.compression),
        copy.copy(getattr(history_owner(model), "compression_history", None)),
        generator.get_state() if generator is not None else None,
    )
    try:
        if statistics is None:
            statistics = collect_statistics(model, batches, layers)
        stats = all_reduce_statistics(statistics)
        reason = _non_finite_reason(model, layers, stats)
        reason = broadcast_object(reason)
        if reason is not None:
            logger.warning(f"CompreSSM: reduction at step {step} skipped: {reason}. The model is unchanged.")
            report = ReductionReport(step, sizes, sizes, [], time.perf_counter() - start, skipped=reason)
            if on_commit is not None:
                on_commit(report)
            return report
        decisions = plan_reduction(stats, sizes, args, generator, layers.family, target_sizes)
        decisions = broadcast_object(decisions)  # rank 0 decides: every replica keeps exactly the same indices
        kept = {d.layer: torch.tensor(d.kept, dtype=torch.long) for d in decisions if d.reduced}
        report = ReductionReport(
            step=step,
            sizes_before=sizes,
            sizes_after=[d.new_size for d in decisions],
            layers=decisions,
            seconds=time.perf_counter() - start,
        )
        commit = (lambda: on_commit(report)) if on_commit is not None else None
        if kept:
            shrink_mixers(model, kept, optimizer, on_commit=commit, layers=layers)
        elif commit is not None:
            commit()
    except BaseException:
        model.config.compression, history, generator_state = saved
        if history is not None:
            set_history(model, history)
        elif "compression_history" in vars(history_owner(model)):
            del history_owner(model).compression_history
        if generator is not None:
            generator.set_state(generator_state)
        raise
    report.seconds = time.perf_counter() - start
    return report


def compress_model(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    tau: float = CompressionArguments.tau,
    optimizer: torch.optim.Optimizer | None = None,
    target_sizes: list[int] | None = None,
    **kwargs,
) -> ReductionReport:
    """Reduce a trained (or converted) model once, after training, with the same rule as in training.

    Args:
        model: a CompreSSM model (convert a stock one first, e.g. `CompreSSMMambaForCausalLM.from_mamba`).
        dataloader: yields dicts of model inputs; the first ``calibration_batches`` are used.
        tau, **kwargs: `CompressionArguments` fields (``score``, ``selection``, ``mode``, ``min_state_size``, ...).
        target_sizes: exact per-layer sizes to cut to (one int per layer, each ≥ 1), chosen by score; replaces the
            mode's rank rule. A size ≥ a layer's present size leaves it unchanged.
    Returns:
        a `ReductionReport` with per-layer sizes, kept indices and scores.
    """
    args = kwargs.pop("compression_args", None) or CompressionArguments(tau=tau, **kwargs)
    layers = ssm_layers(model, per_layer=True)
    if target_sizes is not None:
        target_sizes = _check_target_sizes(target_sizes, len(layers.mixers), layers.family)
    generator = torch.Generator().manual_seed(args.compression_seed)
    batches = list(itertools.islice(iter(dataloader), args.calibration_batches))
    if not batches:
        raise ValueError("the dataloader yielded no batch: compression needs real inputs to calibrate on.")
    record = copy.deepcopy(model.config.compression)
    update_compression_record(model, args)
    try:
        return reduce_once(
            model,
            batches,
            args,
            optimizer=optimizer,
            generator=generator,
            target_sizes=target_sizes,
            on_commit=lambda report: record_report(model, report, args),
            layers=layers,
        )
    except BaseException:
        model.config.compression = record
        raise


def _check_target_sizes(target_sizes: Any, layers: int, family) -> list[int]:
    if isinstance(target_sizes, (str, bytes)) or not isinstance(target_sizes, (list, tuple)):
        raise ValueError(f"target_sizes must be a list with one int per layer, got {type(target_sizes).__name__}.")
    if len(target_sizes) != layers:
        raise ValueError(
            f"target_sizes has {len(target_sizes)} entries but the model has {layers} {family.name} layers."
        )
    for layer, size in enumerate(target_sizes):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"target_sizes[{layer}]={size!r} must be an int >= 1.")
    return list(target_sizes)
