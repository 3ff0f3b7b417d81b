"""Multi-process support: keep shrinkable tensors out of DDP and reduce their gradients ourselves.

Design (docs/design.md, "Multi-process"): DDP builds its gradient reducer once, from the parameters it sees at wrap
time; a parameter replaced later (by a cut) is never all-reduced and the replicas drift apart silently. We therefore
tell DDP to ignore the tensors a cut can replace (for Mamba-1, each mixer's ``A_log`` and ``x_proj.weight``) *before* it wraps the
model, and all-reduce their gradients with post-accumulate-grad hooks, re-registered on every new parameter. No
reducer ever sees a shape change, the same code serves ``torchrun``/``accelerate launch`` on CPU (gloo) and GPU
(nccl), and every cut decision is broadcast from rank 0.
"""

from typing import Any

import torch
from torch import nn

from ..families import SSMLayers, family_of_mixer, find_mixers


DDP_IGNORE_ATTRIBUTE = "_ddp_params_and_buffers_to_ignore"


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def shrinkable_parameter_names(model: nn.Module, layers: SSMLayers | None = None) -> list[str]:
    """Qualified names of the parameters a cut replaces (`SSMFamily.shrinkable_parameters` of every mixer)."""
    if layers is not None:
        ids = {id(p) for mixer in layers.mixers for p in layers.family.shrinkable_parameters(mixer)}
    else:
        ids = {id(p) for mixer in find_mixers(model) for p in family_of_mixer(mixer).shrinkable_parameters(mixer)}
    return [name for name, p in model.named_parameters() if id(p) in ids]


def exclude_shrinkable_from_ddp(model: nn.Module) -> list[str]:
    """Mark the shrinkable parameters so that a DDP wrapper built later ignores them. Returns their names."""
    names = shrinkable_parameter_names(model)
    existing = set(getattr(model, DDP_IGNORE_ATTRIBUTE, []) or [])
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, sorted(existing | set(names))
    )
    return names


def shrinkable_excluded_from_ddp(model: nn.Module) -> bool:
    ignored = set(getattr(model, DDP_IGNORE_ATTRIBUTE, []) or [])
    return set(shrinkable_parameter_names(model)) <= ignored


class GradientAllReducer:
    """All-reduces (mean) the gradients of the shrinkable parameters after each backward, on every process.

    The gradients of one backward pass are reduced together, in one flat all-reduce when the pass ends (not one
    collective per tensor). The mean is taken after every backward pass, so with gradient accumulation the result
    equals the mean of the accumulated gradients, as DDP computes it (the mean is linear).
    """

    def __init__(self):
        self._handles: list[Any] = []
        self._pending: list[torch.Tensor] = []

    def attach(self, model: nn.Module, layers: SSMLayers | None = None) -> None:
        self.detach()
        if not is_distributed():
            return
        names = shrinkable_parameter_names(model, layers)
        for name in names:
            param = model.get_parameter(name)
            if param.requires_grad:
                self._handles.append(param.register_post_accumulate_grad_hook(self._mark_ready))
        # DDP broadcasts only the parameters it manages: start every replica from rank 0's values.
        with torch.no_grad():
            for name in names:
                torch.distributed.broadcast(model.get_parameter(name).data, src=0)

    def _mark_ready(self, param: torch.Tensor) -> None:
        """Post-accumulate-grad hook: collect the parameter; the first one of a backward pass queues one coalesced
        all-reduce that the autograd engine runs when that backward pass ends (as DDP's reducer does)."""
        if param.grad is None:
            return
        if not self._pending:
            torch.autograd.Variable._execution_engine.queue_callback(self._all_reduce_pending)
        self._pending.append(param)

    def _all_reduce_pending(self) -> None:
        """Mean over processes of every collected gradient, in one flat all-reduce per dtype."""
        params, self._pending = self._pending, []
        world = torch.distributed.get_world_size()
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for param in params:
            by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            flat.div_(world)
            offset = 0
            for grad in grads:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending = []


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process (identity when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum ``tensors`` over all processes in one float64 all-reduce; returns float64 CPU tensors of the same shapes.

    Identity (the tensors themselves) without a process group of size > 1.
    """
    if not is_distributed():
        return tensors
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    flat = flat.to(device)
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat = flat.cpu()
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].reshape(t.shape))
        offset += t.numel()
    return out
