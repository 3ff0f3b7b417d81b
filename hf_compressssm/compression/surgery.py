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

from ..families import SSMFamily, SSMLayers, family_of_mixer, ssm_layers


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
    wrappers: tuple[nn.Module, ...] = ()  # PEFT layers around ``owner`` whose feature counts follow the cut


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
    if family.grouped:
        keep = _group_keep(mixer, keep, family.state_groups(mixer), size)
    else:
        keep = torch.as_tensor(keep, dtype=torch.long).flatten()
        if keep.numel() < 1 or keep.numel() > size:
            raise SurgeryError(f"layer {mixer.layer_idx}: cannot keep {keep.numel()} of {size} states.")
        if int(keep.min()) < 0 or int(keep.max()) >= size or torch.unique(keep).numel() != keep.numel():
            raise SurgeryError(f"layer {mixer.layer_idx}: kept indices must be distinct and in [0, {size}).")
        keep = torch.sort(keep).values
    cuts = []
    for owner, name, dim, index, wrappers in resolve_axes(family.shrink_axes(mixer, keep), mixer):
        old = getattr(owner, name)
        index = index.to(old.device)
        new = nn.Parameter(old.detach().index_select(dim, index).clone(), requires_grad=old.requires_grad)
        cuts.append(ParameterCut(owner, name, old, new, dim, index, wrappers))
    return cuts


def _group_keep(mixer: nn.Module, keep, groups: int, size: int) -> torch.Tensor:
    """Kept indices of a grouped mixer (Mamba-2) as ``(G, k)``, each row ascending; a ``(k,)`` keep applies to every
    group. Every group keeps the same number k of distinct states in ``[0, N)``."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    if keep.ndim == 1:
        keep = keep.expand(groups, -1)
    if keep.ndim != 2 or keep.shape[0] != groups:
        raise SurgeryError(
            f"layer {mixer.layer_idx}: kept indices of a mixer with {groups} state groups must have shape "
            f"(groups, k) = ({groups}, k), the same number of states in every group; got {tuple(keep.shape)}."
        )
    if keep.shape[1] < 1 or keep.shape[1] > size:
        raise SurgeryError(f"layer {mixer.layer_idx}: cannot keep {keep.shape[1]} of {size} states per group.")
    keep = torch.sort(keep, dim=1).values
    if int(keep.min()) < 0 or int(keep.max()) >= size or bool((keep.diff(dim=1) == 0).any()):
        raise SurgeryError(f"layer {mixer.layer_idx}: kept indices of every group must be distinct and in [0, {size}).")
    return keep


def _is_peft_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "active_adapters")


def resolve_axes(axes, mixer: nn.Module) -> list[tuple[nn.Module, str, int, torch.Tensor, tuple[nn.Module, ...]]]:
    """``(owner, parameter name, dim, index, wrappers)`` of every parameter a cut along ``axes`` replaces.

    A projection wrapped by a PEFT LoRA layer is cut consistently in its base layer and in every adapter: along
    the output (dim 0) the rows of ``base_layer.weight``/``bias`` and of each ``lora_B``; along the input (dim 1)
    the columns of ``base_layer.weight`` and of each ``lora_A``. Any other adapter type (DoRA, IA3, LoHa, ...)
    raises `SurgeryError` before anything changes.
    """
    out = []
    for axis in axes:
        owner = axis.owner
        if not _is_peft_layer(owner):
            out.append((owner, axis.name, axis.dim, axis.index, ()))
            continue
        where = f"layer {getattr(mixer, 'layer_idx', '?')} {type(owner).__name__} wrapping {axis.name}"
        fix = (
            "Merge the adapters into the base model first (model.merge_and_unload()), or put LoRA adapters only "
            "on projections that keep their shape (e.g. target_modules=['in_proj', 'out_proj'])."
        )
        lora_a, lora_b = getattr(owner, "lora_A", None), getattr(owner, "lora_B", None)
        if lora_a is None or lora_b is None or axis.name != "weight" or axis.dim not in (0, 1):
            raise SurgeryError(f"{where}: a cut cannot follow this PEFT adapter type into its weights. {fix}")
        for extra in ("lora_magnitude_vector", "lora_embedding_A"):
            if len(getattr(owner, extra, None) or {}) > 0:
                raise SurgeryError(f"{where}: DoRA / embedding adapters ({extra}) cannot follow a cut. {fix}")
        if any(v is not None for v in (getattr(owner, "lora_variant", None) or {}).values()):
            raise SurgeryError(f"{where}: LoRA variants (DoRA, ...) cannot follow a cut. {fix}")
        base = owner.base_layer
        if _is_peft_layer(base):
            raise SurgeryError(f"{where}: nested PEFT layers cannot follow a cut. {fix}")
        out.append((base, "weight", axis.dim, axis.index, (owner,)))
        if axis.dim == 0:
            if getattr(base, "bias", None) is not None:
                out.append((base, "bias", 0, axis.index, ()))
            for module in lora_b.values():
                out.append((module, "weight", 0, axis.index, ()))
                if getattr(module, "bias", None) is not None:
                    out.append((module, "bias", 0, axis.index, ()))
        else:
            for module in lora_a.values():
                out.append((module, "weight", 1, axis.index, ()))
    return out


def _feature_attributes(cuts: list[ParameterCut]) -> list[tuple[object, str, int]]:
    """``(module, attribute, new value)`` for the ``out_features`` / ``in_features`` that follow the cut weights
    (the linear layer and the PEFT layer wrapping it; PEFT sizes new adapters from them)."""
    updates = []
    for cut in cuts:
        if cut.name != "weight" or cut.new.dim() != 2 or cut.dim not in (0, 1):
            continue
        attr = "out_features" if cut.dim == 0 else "in_features"
        for holder in (cut.owner, *cut.wrappers):
            if isinstance(getattr(holder, attr, None), int) and not isinstance(getattr(holder, attr), bool):
                updates.append((holder, attr, int(cut.new.shape[cut.dim])))
    return updates


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
    """Install planned cuts: swap parameters into modules and the optimizer, move the sliced optimizer states, and
    update the layers' ``out_features`` / ``in_features``.

    ``on_commit()`` runs last (e.g. update the config); if it or any swap raises, every change is undone and a
    `SurgeryError` is raised.
    """
    inner = unwrap_optimizer(optimizer)
    done: list[tuple[ParameterCut, bool, object]] = []
    features: list[tuple[object, str, int]] = []
    try:
        state_plans = plan_optimizer_states(inner, cuts)
        for i, cut in enumerate(cuts):
            in_optimizer = inner is not None and swap_parameter_in_optimizer(inner, cut.old, cut.new)
            old_state = inner.state.pop(cut.old, None) if inner is not None else None
            done.append((cut, in_optimizer, old_state))
            if inner is not None and state_plans.get(i) is not None:
                inner.state[cut.new] = state_plans[i]
            setattr(cut.owner, cut.name, cut.new)
        for holder, attr, value in _feature_attributes(cuts):
            features.append((holder, attr, getattr(holder, attr)))
            setattr(holder, attr, value)
        if on_commit is not None:
            on_commit()
    except Exception as err:
        problems = []
        for holder, attr, value in reversed(features):
            setattr(holder, attr, value)
        for cut, in_optimizer, old_state in reversed(done):
            try:
                if getattr(cut.owner, cut.name, None) is not cut.old:
                    setattr(cut.owner, cut.name, cut.old)
            except Exception as undo_err:  # keep undoing the others; report below
                problems.append(f"{cut.name}: {undo_err}")
            if inner is not None:
                inner.state.pop(cut.new, None)
                if old_state is not None:
                    inner.state[cut.old] = old_state
                if in_optimizer:
                    swap_parameter_in_optimizer(inner, cut.new, cut.old)
        if problems:
            raise SurgeryError(f"the cut failed ({err}) and could not be fully undone: {problems}") from err
        raise SurgeryError(f"the cut failed and was undone: {err}") from err


def shrink_mixers(
    model: nn.Module,
    kept: Mapping[int, torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    on_commit=None,
    layers: SSMLayers | None = None,
) -> list[ParameterCut]:
    """Shrink mixer ``i`` (layer order) to state indices ``kept[i]``, carrying ``optimizer`` and the config.

    Layers absent from ``kept`` are untouched. ``on_commit()`` (e.g. record the history) runs after the config is
    updated, inside the cut. Atomic: on any failure, including in ``on_commit``, nothing changes (`SurgeryError`).
    ``layers``: the model's `SSMLayers` when already resolved. Returns the installed cuts (old and new parameters).
    """
    try:
        layers = layers or ssm_layers(model)
        if not layers.family.per_layer_config(getattr(model, "config", None)):
            ssm_layers(model, per_layer=True)  # raises, naming the conversion
    except ValueError as err:
        raise SurgeryError(str(err)) from err
    family, mixers = layers.family, list(layers.mixers)
    config = model.config
    cuts: list[ParameterCut] = []
    for layer, keep in sorted(kept.items()):
        if not 0 <= layer < len(mixers):
            raise SurgeryError(f"layer {layer} does not exist (the model has {len(mixers)} SSM layers).")
        cuts.extend(plan_mixer_cut(mixers[layer], keep, family))
    old_sizes = config.state_sizes

    def commit() -> None:
        layers.sync_state_sizes()
        new_sizes = layers.state_sizes()  # read from the parameters just installed
        config.check_state_sizes(new_sizes)
        config.state_sizes = new_sizes  # a new list, never a mutated shared one
        if on_commit is not None:
            on_commit()

    try:
        apply_cuts(cuts, optimizer, on_commit=commit)
    except SurgeryError:
        config.state_sizes = old_sizes
        raise
    finally:
        layers.sync_state_sizes()
    return cuts


def check_cut_supported(model: nn.Module, layers: SSMLayers | None = None) -> None:
    """`SurgeryError` now, before any training step, if a cut of ``model`` could not be applied (e.g. an adapter
    type that cannot follow a cut), with what to do instead. Plans a no-op cut of every mixer; changes nothing."""
    layers = layers or ssm_layers(model, per_layer=True)
    for mixer in layers.mixers:
        resolve_axes(layers.family.shrink_axes(mixer, torch.arange(layers.family.state_size(mixer))), mixer)


def restore_parameters(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    layers: SSMLayers | None = None,
) -> None:
    """Load ``state_dict`` (a snapshot of ``model`` taken before cuts) back into ``model``, shapes included.

    Every parameter whose shape differs from the snapshot is replaced by a new one (also in ``optimizer``'s param
    groups, its state dropped); the config's ``state_sizes`` and the mixers' cached sizes follow the parameters.
    Load the optimizer's own snapshot afterwards to restore its state.
    """
    layers = layers or ssm_layers(model, per_layer=True)
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
        owner = model.get_submodule(owner_name)
        setattr(owner, attr, restored)
        if attr == "weight" and restored.dim() == 2:
            holders = [owner]
            if owner_name.endswith(".base_layer"):
                holders.append(model.get_submodule(owner_name.rpartition(".")[0]))
            for holder in holders:
                for feature, size in (("out_features", restored.shape[0]), ("in_features", restored.shape[1])):
                    if isinstance(getattr(holder, feature, None), int):
                        setattr(holder, feature, int(size))
    model.load_state_dict(state_dict)
    layers.sync_state_sizes()
    model.config.state_sizes = layers.state_sizes()
