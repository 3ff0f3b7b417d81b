"""Calibration: measure the importance statistics of every state of every SSM mixer on a few real batches.

Only the mixers' projections are recomputed (no scan), through the model's `SSMFamily`, so this is cheap and
independent of the scan kernel. The per-layer statistics are additive sums: they add across batches and are
all-reduced across processes (`distributed.all_reduce_tensors`), so every rank scores states on the same numbers.
"""

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..families import LayerStatistics, family_of, find_mixers
from .distributed import all_reduce_tensors


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
def visit_mixer_projections(model: nn.Module, batches: Iterable[Mapping[str, Any]], visit: ProjectionVisitor) -> None:
    """Run ``model`` on ``batches`` (no grad, eval mode, train mode restored after) and call, for every mixer and
    batch, ``visit(layer_index, *projections, attention_mask)`` with that mixer's `SSMFamily.projections`.
    ``batches``: dicts of model inputs (``labels`` are dropped), moved to the model's device.
    """
    family = family_of(model)
    mixers = find_mixers(model)

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


def collect_statistics(model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> list[LayerStatistics]:
    """Sum per-layer statistics of ``model`` over ``batches``; one dict per mixer, in layer order."""
    family = family_of(model)
    mixers = find_mixers(model)
    totals: list[LayerStatistics | None] = [None] * len(mixers)

    def accumulate(index, *projections_and_mask) -> None:
        *projections, mask = projections_and_mask
        if all(bool(torch.isfinite(t).all()) for t in projections):
            stats = family.statistics(tuple(projections), mask)
        else:  # keep going so that every process reaches the all-reduce; the NaN marks the layer
            stats = family.nan_statistics(mixers[index], projections[0].device)
        totals[index] = stats if totals[index] is None else family.merge_statistics(totals[index], stats)

    visit_mixer_projections(model, batches, accumulate)
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
