"""Calibration: measure the importance statistics of every state of every SSM mixer on a few real batches.

Only the mixers' projections are recomputed (no scan), through the model's `SSMFamily`, and measured by the
family's `scoring.FamilyScoring`, so this is cheap and independent of the scan kernel. The per-layer statistics are
additive sums: they add across batches and are all-reduced across processes (`distributed.all_reduce_tensors`), so
every rank scores states on the same numbers.
"""

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..families import SSMLayers, ssm_layers
from .checks import all_finite
from .distributed import all_reduce_tensors
from .scoring import FamilyScoring, LayerStatistics, scoring_for


ProjectionVisitor = Callable[..., None]


def model_inputs(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch as model inputs on ``device``: labels dropped, no cache."""
    inputs = {
        k: (v.to(device) if torch.is_tensor(v) else v)
        for k, v in batch.items()
        if k not in ("labels", "label", "label_ids")
    }
    inputs["use_cache"] = False
    return inputs


@torch.no_grad()
def visit_mixer_projections(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    visit: ProjectionVisitor,
    layers: SSMLayers | None = None,
) -> None:
    """Run ``model`` on ``batches`` (no grad, eval mode, train mode restored after) and call, for every mixer and
    batch, ``visit(layer_index, *projections, attention_mask)`` with that mixer's `SSMFamily.projections`.
    ``batches``: dicts of model inputs (``labels`` are dropped), moved to the model's device. ``layers``: the
    model's `SSMLayers` when already resolved.
    """
    layers = layers or ssm_layers(model)
    family, mixers = layers.family, layers.mixers

    def make_hook(index: int, mixer: nn.Module):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            mask = kwargs.get("attention_mask")
            visit(index, *family.projections(mixer, hidden, mask), mask)

        return hook

    handles = [m.register_forward_pre_hook(make_hook(i, m), with_kwargs=True) for i, m in enumerate(mixers)]
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        for batch in batches:
            model(**model_inputs(batch, device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def batch_statistics(scoring: FamilyScoring, projections: tuple, mask) -> LayerStatistics:
    """One batch's statistics of one mixer; NaN-filled when a projection is not finite (the NaN marks the layer,
    and every process still reaches the all-reduce)."""
    if all(all_finite(t) for t in projections):
        return scoring.statistics(*projections, mask=mask)
    return scoring.nan_statistics(*projections)


def sum_statistics(scoring: FamilyScoring, per_batch: Iterable[list[LayerStatistics]]) -> list[LayerStatistics] | None:
    """Layer-wise sum of per-batch statistics lists (None when there is no batch)."""
    totals = None
    for layers in per_batch:
        totals = list(layers) if totals is None else [scoring.merge(a, b) for a, b in zip(totals, layers)]
    return totals


def collect_statistics(
    model: nn.Module, batches: Iterable[Mapping[str, Any]], layers: SSMLayers | None = None
) -> list[LayerStatistics]:
    """Sum per-layer statistics of ``model`` over ``batches``; one dict per mixer, in layer order."""
    layers = layers or ssm_layers(model)
    scoring = scoring_for(layers.family)
    totals: list[LayerStatistics | None] = [None] * len(layers.mixers)

    def accumulate(index, *projections_and_mask) -> None:
        *projections, mask = projections_and_mask
        stats = batch_statistics(scoring, tuple(projections), mask)
        totals[index] = stats if totals[index] is None else scoring.merge(totals[index], stats)

    visit_mixer_projections(model, batches, accumulate, layers)
    if any(t is None for t in totals):
        raise ValueError("calibration saw no batch: pass at least one batch of inputs.")
    return totals  # type: ignore[return-value]


def all_reduce_statistics(stats: list[LayerStatistics]) -> list[LayerStatistics]:
    """Sum statistics over all processes (identity without a process group of size > 1)."""
    keys = [sorted(s) for s in stats]
    flat = all_reduce_tensors([s[k] for s, ks in zip(stats, keys) for k in ks])
    out, i = [], 0
    for ks in keys:
        out.append({k: flat[i + j] for j, k in enumerate(ks)})
        i += len(ks)
    return out


class TrainingStatisticsRecorder:
    """Statistics of the training forwards that run anyway, so that a cut needs no extra forward.

    While `active`, a forward pre-hook on every mixer recomputes the projections from the mixer's input (no grad,
    no scan) and stores that forward's per-layer statistics; the last ``max_batches`` forwards are kept (as the
    calibration batches were). A forward counts once: recomputation under gradient checkpointing is not recorded
    again. Only training-mode forwards with gradients enabled are recorded (never evaluation).
    `seconds` accumulates the time spent, so that a cut's reported cost includes it.
    """

    def __init__(self, max_batches: int):
        self.window: deque[list[LayerStatistics]] = deque(maxlen=max_batches)
        self.active = False
        self.seconds = 0.0
        self._handles: list[Any] = []
        self._current: list[LayerStatistics | None] | None = None

    def attach(self, model: nn.Module, layers: SSMLayers | None = None) -> None:
        """Hook ``model`` and its mixers (the hooks sit on modules, so they survive cuts that replace parameters)."""
        self.detach()
        layers = layers or ssm_layers(model)
        family, mixers = layers.family, layers.mixers
        scoring = scoring_for(family)

        def open_forward(module, args, kwargs):
            if self.active and module.training and torch.is_grad_enabled():
                self._current = [None] * len(mixers)
                self.window.append(self._current)  # type: ignore[arg-type]
            else:
                self._current = None

        def make_hook(index: int, mixer: nn.Module):
            def hook(module, args, kwargs):
                current = self._current
                if current is None or current[index] is not None:
                    return
                start = time.perf_counter()
                with torch.no_grad():
                    hidden = (args[0] if args else kwargs["hidden_states"]).detach()
                    mask = kwargs.get("attention_mask")
                    projections = family.projections(mixer, hidden, mask)
                    current[index] = batch_statistics(scoring, projections, mask)
                self.seconds += time.perf_counter() - start

            return hook

        self._handles.append(model.register_forward_pre_hook(open_forward, with_kwargs=True))
        self._handles += [m.register_forward_pre_hook(make_hook(i, m), with_kwargs=True) for i, m in enumerate(mixers)]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._current = None

    def clear(self) -> None:
        self.window.clear()
        self._current = None
        self.seconds = 0.0

    def statistics(self, scoring: FamilyScoring) -> list[LayerStatistics] | None:
        """Per-layer sums over the recorded forwards (None when none was recorded completely)."""
        complete = [layers for layers in self.window if all(s is not None for s in layers)]
        return sum_statistics(scoring, complete)

    def state(self) -> dict[str, Any]:
        """The recorded statistics and time (tensors), for a checkpoint."""
        return {"window": [list(layers) for layers in self.window], "seconds": self.seconds}

    def load_state(self, state: dict[str, Any]) -> None:
        self.clear()
        self.window.extend(state.get("window", [])[-(self.window.maxlen or 0) :])
        self.seconds = float(state.get("seconds", 0.0))
