"""Module surgery: shrink Mamba mixers to a set of kept state indices and carry the optimizer through the cut.

A cut is planned first (new tensors and optimizer states are built without touching anything) and then committed
by swapping parameters; if any step fails, everything already swapped is put back, so model, optimizer and config
are exactly as before.
"""

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.mamba.modeling_mamba import MambaMixer
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Optimizers whose per-parameter state layout we know: every tensor state of a parameter's shape is sliced along
# the cut dimension, scalars (step) are kept. Adafactor's factored moments are handled by name.
_ELEMENTWISE_STATE_OPTIMIZERS = (
    "Adam",
    "AdamW",
    "SGD",
    "RMSprop",
    "Adagrad",
    "Adamax",
    "NAdam",
    "RAdam",
    "Adadelta",
)
_ADAFACTOR = "Adafactor"


class SurgeryError(RuntimeError):
    """A cut could not be applied; model, optimizer and config were left unchanged."""


@dataclass
class ParameterCut:
    """How one parameter shrinks: keep ``index`` along ``dim``. ``old`` is the live parameter, ``new`` its successor."""

    owner: nn.Module
    name: str
    old: nn.Parameter
    new: nn.Parameter
    dim: int
    index: torch.Tensor


def find_mixers(model: nn.Module) -> list[MambaMixer]:
    """All Mamba-1 mixers of ``model`` in layer order."""
    return [m for m in model.modules() if isinstance(m, MambaMixer)]


def unwrap_optimizer(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """The innermost torch optimizer behind accelerate / Trainer wrappers."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def mixer_kept_rows(mixer: MambaMixer, keep: torch.Tensor) -> torch.Tensor:
    """Rows of ``x_proj.weight`` to keep for state indices ``keep``: ``[0:R] ∪ (R + keep) ∪ (R + N + keep)``."""
    rank, size = mixer.time_step_rank, mixer.A_log.shape[-1]
    keep = keep.to(mixer.A_log.device)
    return torch.cat([torch.arange(rank, device=keep.device), rank + keep, rank + size + keep])


def plan_mixer_cut(mixer: MambaMixer, keep: torch.Tensor) -> list[ParameterCut]:
    """Build (without installing) the shrunk ``A_log`` and ``x_proj.weight`` of ``mixer`` for kept indices ``keep``.

    ``keep``: 1-D LongTensor of distinct state indices in ``[0, N)``, ascending.
    """
    size = mixer.A_log.shape[-1]
    keep = torch.as_tensor(keep, dtype=torch.long).flatten()
    if keep.numel() < 1 or keep.numel() > size:
        raise SurgeryError(f"layer {mixer.layer_idx}: cannot keep {keep.numel()} of {size} states.")
    if int(keep.min()) < 0 or int(keep.max()) >= size or torch.unique(keep).numel() != keep.numel():
        raise SurgeryError(f"layer {mixer.layer_idx}: kept indices must be distinct and in [0, {size}).")
    keep = torch.sort(keep).values.to(mixer.A_log.device)
    rows = mixer_kept_rows(mixer, keep)
    cuts = []
    for owner, name, dim, index in ((mixer, "A_log", 1, keep), (mixer.x_proj, "weight", 0, rows)):
        old = getattr(owner, name)
        new = nn.Parameter(old.detach().index_select(dim, index).clone(), requires_grad=old.requires_grad)
        cuts.append(ParameterCut(owner=owner, name=name, old=old, new=new, dim=dim, index=index))
    return cuts


def _slice_state(state: Mapping, cut: ParameterCut, optimizer_name: str) -> dict | None:
    """The optimizer state of ``cut.old`` restricted to the kept indices, or ``None`` to drop it."""
    shape = cut.old.shape
    new_state = {}
    for key, value in state.items():
        if not torch.is_tensor(value) or value.dim() == 0:
            new_state[key] = value
        elif value.shape == shape:
            new_state[key] = value.index_select(cut.dim, cut.index.to(value.device)).clone()
        elif optimizer_name == _ADAFACTOR and key == "exp_avg_sq_row" and value.shape == shape[:-1]:
            # Row factor: one entry per row (all dims but the last).
            if cut.dim == len(shape) - 1:
                new_state[key] = value.clone()  # columns removed: the row means stay an estimate
            else:
                new_state[key] = value.index_select(cut.dim, cut.index.to(value.device)).clone()
        elif optimizer_name == _ADAFACTOR and key == "exp_avg_sq_col" and value.shape == shape[:-2] + shape[-1:]:
            # Column factor: one entry per column (all dims but the second to last).
            if cut.dim == len(shape) - 1:
                new_state[key] = value.index_select(value.dim() - 1, cut.index.to(value.device)).clone()
            elif cut.dim == len(shape) - 2:
                new_state[key] = value.clone()  # rows removed: the column means stay an estimate
            else:
                new_state[key] = value.index_select(cut.dim, cut.index.to(value.device)).clone()
        else:
            return None
    return new_state


def plan_optimizer_states(optimizer: torch.optim.Optimizer | None, cuts: list[ParameterCut]) -> dict[int, dict | None]:
    """For each cut (by position), the sliced optimizer state, ``None`` to drop it; empty if no state exists."""
    inner = unwrap_optimizer(optimizer)
    if inner is None:
        return {}
    name = type(inner).__name__
    known = name in _ELEMENTWISE_STATE_OPTIMIZERS or name == _ADAFACTOR
    plans: dict[int, dict | None] = {}
    for i, cut in enumerate(cuts):
        state = inner.state.get(cut.old)
        if not state:
            continue
        sliced = _slice_state(state, cut, name) if known else None
        if sliced is None:
            warnings.warn(
                f"hf_compressssm: don't know the state layout of optimizer {name} for {cut.name} of shape "
                f"{tuple(cut.old.shape)}; its state is dropped for the cut parameter (other parameters keep theirs).",
                stacklevel=3,
            )
        plans[i] = sliced
    return plans


def swap_parameter_in_optimizer(inner: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter) -> bool:
    """Put ``new`` where ``old`` stands in ``inner.param_groups`` (by identity); False if ``old`` is not there."""
    for group in inner.param_groups:
        for j, p in enumerate(group["params"]):
            if p is old:
                group["params"][j] = new
                return True
    return False


def apply_cuts(
    cuts: list[ParameterCut],
    optimizer: torch.optim.Optimizer | None = None,
    on_commit=None,
) -> None:
    """Install planned cuts: swap parameters into modules and the optimizer, move the sliced optimizer states.

    ``on_commit()`` runs last (e.g. update the config); if it or any swap raises, every change is undone and a
    `SurgeryError` is raised.
    """
    inner = unwrap_optimizer(optimizer)
    state_plans = plan_optimizer_states(inner, cuts)
    done: list[tuple[ParameterCut, bool, object]] = []
    try:
        for i, cut in enumerate(cuts):
            in_optimizer = inner is not None and swap_parameter_in_optimizer(inner, cut.old, cut.new)
            old_state = inner.state.pop(cut.old, None) if inner is not None else None
            done.append((cut, in_optimizer, old_state))
            setattr(cut.owner, cut.name, cut.new)
            if inner is not None and state_plans.get(i) is not None:
                inner.state[cut.new] = state_plans[i]
        if on_commit is not None:
            on_commit()
    except Exception as err:
        for cut, in_optimizer, old_state in reversed(done):
            setattr(cut.owner, cut.name, cut.old)
            if inner is not None:
                inner.state.pop(cut.new, None)
                if old_state is not None:
                    inner.state[cut.old] = old_state
                if in_optimizer:
                    swap_parameter_in_optimizer(inner, cut.new, cut.old)
        raise SurgeryError(f"the cut failed and was undone: {err}") from err


def shrink_mixers(
    model: nn.Module,
    kept: Mapping[int, torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
) -> list[ParameterCut]:
    """Shrink mixer ``i`` (layer order) to state indices ``kept[i]``, carrying ``optimizer`` and the config.

    Layers absent from ``kept`` are untouched. Atomic: on failure nothing changes (`SurgeryError`).
    Returns the installed cuts (old and new parameters).
    """
    mixers = find_mixers(model)
    if not mixers:
        raise SurgeryError("the model has no Mamba mixers to shrink.")
    config = getattr(model, "config", None)
    if not hasattr(config, "with_state_sizes"):
        raise SurgeryError(
            f"{type(model).__name__} has a config with one state_size for all layers; convert it first with "
            "CompreSSMMambaForCausalLM.from_mamba(model) so that each layer can keep its own size."
        )
    cuts: list[ParameterCut] = []
    for layer, keep in sorted(kept.items()):
        if not 0 <= layer < len(mixers):
            raise SurgeryError(f"layer {layer} does not exist (the model has {len(mixers)} Mamba layers).")
        cuts.extend(plan_mixer_cut(mixers[layer], keep))
    old_sizes = [m.A_log.shape[-1] for m in mixers]
    new_sizes = list(old_sizes)
    for layer, keep in kept.items():
        new_sizes[layer] = int(torch.as_tensor(keep).numel())

    def commit() -> None:
        config.check_state_sizes(new_sizes)
        for layer in kept:
            mixers[layer].ssm_state_size = new_sizes[layer]
        config.state_sizes = list(new_sizes)  # reassign, never mutate a shared list

    try:
        apply_cuts(cuts, optimizer, on_commit=commit)
    except SurgeryError:
        for layer, mixer in enumerate(mixers):
            mixer.ssm_state_size = old_sizes[layer]
        raise
    return cuts
