"""Module surgery: shrink SSM mixers to a set of kept state indices and carry the optimizer through the cut.

A cut is planned first (new tensors and optimizer states are built without touching anything) and then committed
by swapping parameters; if any step fails, everything already swapped is put back, so model, optimizer and config
are exactly as before.
"""

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import logging

from ..families import SSMFamily, check_per_layer_model, family_of_mixer, find_mixers


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


def unwrap_optimizer(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """The innermost torch optimizer behind accelerate / Trainer wrappers."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def plan_mixer_cut(mixer: nn.Module, keep: torch.Tensor, family: SSMFamily | None = None) -> list[ParameterCut]:
    """Build (without installing) the shrunk parameters of ``mixer`` for kept state indices ``keep``.

    ``keep``: 1-D LongTensor of distinct state indices in ``[0, N)``; sorted here.
    """
    family = family or family_of_mixer(mixer)
    size = family.state_size(mixer)
    keep = torch.as_tensor(keep, dtype=torch.long).flatten()
    if keep.numel() < 1 or keep.numel() > size:
        raise SurgeryError(f"layer {mixer.layer_idx}: cannot keep {keep.numel()} of {size} states.")
    if int(keep.min()) < 0 or int(keep.max()) >= size or torch.unique(keep).numel() != keep.numel():
        raise SurgeryError(f"layer {mixer.layer_idx}: kept indices must be distinct and in [0, {size}).")
    keep = torch.sort(keep).values
    cuts = []
    for axis in family.shrink_axes(mixer, keep):
        old = getattr(axis.owner, axis.name)
        index = axis.index.to(old.device)
        new = nn.Parameter(old.detach().index_select(axis.dim, index).clone(), requires_grad=old.requires_grad)
        cuts.append(ParameterCut(owner=axis.owner, name=axis.name, old=old, new=new, dim=axis.dim, index=index))
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
    try:
        family = check_per_layer_model(model)
    except ValueError as err:
        raise SurgeryError(str(err)) from err
    mixers = find_mixers(model)
    config = model.config
    cuts: list[ParameterCut] = []
    for layer, keep in sorted(kept.items()):
        if not 0 <= layer < len(mixers):
            raise SurgeryError(f"layer {layer} does not exist (the model has {len(mixers)} SSM layers).")
        cuts.extend(plan_mixer_cut(mixers[layer], keep, family))
    new_sizes = [family.state_size(m) for m in mixers]
    for layer, keep in kept.items():
        new_sizes[layer] = int(torch.as_tensor(keep).numel())

    def commit() -> None:
        config.check_state_sizes(new_sizes)
        config.state_sizes = list(new_sizes)  # reassign, never mutate a shared list

    try:
        apply_cuts(cuts, optimizer, on_commit=commit)
    finally:
        for mixer in mixers:
            family.sync_state_size(mixer)
    return cuts


def restore_parameters(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Load ``state_dict`` (a snapshot of ``model`` taken before cuts) back into ``model``, shapes included.

    Every parameter whose shape differs from the snapshot is replaced by a new one (also in ``optimizer``'s param
    groups, its state dropped); the config's ``state_sizes`` and the mixers' cached sizes follow the parameters.
    Load the optimizer's own snapshot afterwards to restore its state.
    """
    family = check_per_layer_model(model)
    inner = unwrap_optimizer(optimizer)
    named = dict(model.named_parameters())
    for name, tensor in state_dict.items():
        param = named.get(name)
        if param is None or param.shape == tensor.shape:
            continue
        owner_name, _, attr = name.rpartition(".")
        restored = nn.Parameter(tensor.clone().to(param.device), requires_grad=param.requires_grad)
        if inner is not None:
            swap_parameter_in_optimizer(inner, param, restored)
            inner.state.pop(param, None)
        setattr(model.get_submodule(owner_name), attr, restored)
    model.load_state_dict(state_dict)
    mixers = find_mixers(model)
    for mixer in mixers:
        family.sync_state_size(mixer)
    model.config.state_sizes = [family.state_size(m) for m in mixers]
