"""Calibration: measure the importance of every state of every Mamba mixer on a few real batches.

Only the mixers' projections are recomputed (no scan), so this is cheap and independent of the scan kernel. The
per-layer statistics are additive sums (see `hankel.selective_statistics`): they add across batches and are
all-reduced across processes, so every rank scores states on the same numbers.
"""

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.mamba.modeling_mamba import MambaMixer

from .hankel import STAT_KEYS, merge_statistics, selective_statistics
from .surgery import find_mixers


LayerStatistics = dict[str, torch.Tensor]


@torch.no_grad()
def mixer_projections(
    mixer: MambaMixer, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recompute the SSM inputs of ``mixer`` from its input ``hidden_states`` (batch, L, hidden).

    Returns ``u`` (batch, L, D) post-conv SiLU activations, ``delta`` (batch, L, D) = softplus(dt_proj(δ)),
    ``A`` (D, N) = −exp(A_log), and ``B``, ``C`` (batch, L, N), exactly as the mixer's forward computes them.
    """
    length = hidden_states.shape[1]
    if attention_mask is not None:
        hidden_states = hidden_states * attention_mask[:, :, None].to(hidden_states.dtype)
    x, _ = mixer.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # (b, D, L)
    u = mixer.act(mixer.conv1d(x)[..., :length]).transpose(1, 2)  # (b, L, D)
    if attention_mask is not None:
        u = u * attention_mask[:, :, None].to(u.dtype)
    size = mixer.A_log.shape[-1]
    dt, B, C = torch.split(mixer.x_proj(u), [mixer.time_step_rank, size, size], dim=-1)
    delta = F.softplus(mixer.dt_proj(dt).float())
    A = -torch.exp(mixer.A_log.float())
    return u.float(), delta, A, B.float(), C.float()


def _nan_statistics(channels: int, states: int, device: torch.device) -> LayerStatistics:
    nan = float("nan")
    return {
        "count": torch.full((), nan, dtype=torch.float64, device=device),
        "decay_sum": torch.full((channels, states), nan, dtype=torch.float64, device=device),
        "ctrl_sum": torch.full((channels, states), nan, dtype=torch.float64, device=device),
        "obs_sum": torch.full((states,), nan, dtype=torch.float64, device=device),
    }


ProjectionVisitor = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Any], None]


@torch.no_grad()
def visit_mixer_projections(
    model: nn.Module, batches: Iterable[Mapping[str, Any]], visit: ProjectionVisitor
) -> None:
    """Run ``model`` on ``batches`` (no grad, eval mode, train mode restored after) and call, for every mixer and
    batch, ``visit(layer_index, u, delta, A, B, C, attention_mask)`` with that mixer's projections
    (see `mixer_projections`). ``batches``: dicts of model inputs (``labels`` are dropped), moved to the model's device.
    """
    mixers = find_mixers(model)
    if not mixers:
        raise ValueError(f"{type(model).__name__} has no Mamba mixers: nothing to calibrate.")

    def make_hook(index: int, mixer: MambaMixer):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            mask = kwargs.get("attention_mask")
            visit(index, *mixer_projections(mixer, hidden, mask), mask)

        return hook

    handles = [m.register_forward_pre_hook(make_hook(i, m), with_kwargs=True) for i, m in enumerate(mixers)]
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        for batch in batches:
            inputs = {
                k: (v.to(device) if torch.is_tensor(v) else v)
                for k, v in batch.items()
                if k not in ("labels", "label", "label_ids")
            }
            inputs["use_cache"] = False
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def collect_statistics(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
) -> list[LayerStatistics]:
    """Sum per-layer `selective_statistics` of ``model`` over ``batches``; one dict per mixer, in layer order."""
    totals: list[LayerStatistics | None] = [None] * len(find_mixers(model))

    def accumulate(index, u, delta, A, B, C, mask) -> None:
        if all(bool(torch.isfinite(t).all()) for t in (u, delta, A, B, C)):
            stats = selective_statistics(u, delta, A, B, C, mask=mask)
        else:  # keep going so that every process reaches the all-reduce; the NaN marks the layer
            stats = _nan_statistics(*A.shape, device=A.device)
        totals[index] = stats if totals[index] is None else merge_statistics(totals[index], stats)

    visit_mixer_projections(model, batches, accumulate)
    if any(t is None for t in totals):
        raise ValueError("calibration saw no batch: pass at least one batch of inputs.")
    return totals  # type: ignore[return-value]


def all_reduce_statistics(stats: list[LayerStatistics]) -> list[LayerStatistics]:
    """Sum statistics over all processes (no-op without an initialised process group of size > 1)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return stats
    if torch.distributed.get_world_size() == 1:
        return stats
    flat = torch.cat([s[k].reshape(-1).to(torch.float64) for s in stats for k in STAT_KEYS])
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    flat = flat.to(device)
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat = flat.cpu()
    out, offset = [], 0
    for s in stats:
        layer = {}
        for k in STAT_KEYS:
            n = s[k].numel()
            layer[k] = flat[offset : offset + n].reshape(s[k].shape)
            offset += n
        out.append(layer)
    return out
