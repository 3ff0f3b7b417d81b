"""Pragmatic mode's rollback: after a cut, compare an evaluation metric with the one before; undo the cut and stop
cutting when it got worse by more than the tolerance.

`PragmaticRollback` is the strategy a `Compressor` holds: it snapshots the model and optimizer before a cut, arms a
check due some steps later, and, given the evaluation metrics, either keeps the cut or restores the snapshot.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .arguments import CompressionArguments
from .record import CompressionRecord, set_history
from .surgery import restore_parameters, unwrap_optimizer


logger = logging.get_logger(__name__)


class PragmaticRollback:
    """The pending comparison of pragmatic mode, and the last evaluation seen.

    ``pending``: ``{"step", "due", "baseline", "snapshot"}`` of the last cut until its comparison (the snapshot holds
    the model's and the optimizer's state dicts before the cut, its sizes and the history length); ``last_eval``:
    ``(step, value)`` of the last evaluation of ``rollback_metric``.
    """

    def __init__(self, args: CompressionArguments):
        self.args = args
        self.pending: dict[str, Any] | None = None
        self.last_eval: tuple[int, float] | None = None

    def reset(self) -> None:
        self.pending, self.last_eval = None, None

    def delay(self, step: int, schedule: list[int]) -> int:
        """Steps from the cut at ``step`` to its comparison: ``rollback_delay_steps``, or half the gap to the next
        scheduled cut (1 after the last)."""
        if self.args.rollback_delay_steps is not None:
            return int(self.args.rollback_delay_steps)
        later = [s for s in schedule if s > step]
        return max(0, (later[0] - step) // 2) if later else 1

    @staticmethod
    def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """What a rollback restores: copies of the model's and optimizer's state, the sizes, the history length."""
        inner = unwrap_optimizer(optimizer)
        return {
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": copy.deepcopy(inner.state_dict()) if inner is not None else None,
            "state_sizes": list(model.config.state_sizes),
            "history_len": len(getattr(model, "compression_history", []) or []),
        }

    def arm(self, step: int, due: int, snapshot: dict[str, Any]) -> None:
        """Compare at the first evaluation from step ``due`` on against the last evaluation before the cut."""
        baseline = self.last_eval[1] if self.last_eval is not None else None
        self.pending = {"step": step, "due": due, "baseline": baseline, "snapshot": snapshot}

    def due(self, step: int) -> bool:
        return self.pending is not None and step >= self.pending["due"]

    def evaluated(self, model: nn.Module, optimizer, step: int, value: float) -> bool:
        """Take the metric ``value`` evaluated at ``step``; returns True when the pending cut was rolled back."""
        check = self.pending
        if check is not None and step >= check["due"]:
            self.pending = None
            baseline = check["baseline"]
            if baseline is not None:
                sign = -1.0 if self.args.rollback_greater_is_better else 1.0
                worse_by = sign * (float(value) - baseline) / max(abs(baseline), 1e-12)
                if worse_by > self.args.rollback_tolerance:
                    self._restore(model, optimizer, check, value, baseline)
                    return True
        self.last_eval = (step, float(value))
        return False

    def _restore(self, model: nn.Module, optimizer, check: dict[str, Any], value: float, baseline: float) -> None:
        snap = check["snapshot"]
        inner = unwrap_optimizer(optimizer)
        restore_parameters(model, snap["model"], inner)
        if inner is not None and snap["optimizer"] is not None:
            inner.load_state_dict(snap["optimizer"])
        history = list(model.compression_history)
        for entry in history[snap["history_len"] :]:
            entry["rolled_back"] = True
        set_history(model, history)
        record = CompressionRecord.of(model)
        record.stopped = True
        record.history = [h for h in record.history or [] if h["step"] != check["step"]]
        record.save_to(model)
        logger.warning(
            f"CompreSSM (pragmatic): {self.args.rollback_metric}={value:.4g} after the cut at step {check['step']} "
            f"is worse than {baseline:.4g} by more than {self.args.rollback_tolerance:.1%}: rolled back to sizes "
            f"{snap['state_sizes']} and stopped cutting."
        )

    def state_dict(self) -> dict[str, Any]:
        """``last_eval``, ``pending_check`` (JSON) and ``snapshot`` (tensors) of the pending check."""
        pending = self.pending
        return {
            "last_eval": list(self.last_eval) if self.last_eval is not None else None,
            "pending_check": {k: v for k, v in pending.items() if k != "snapshot"} if pending else None,
            "snapshot": pending["snapshot"] if pending else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_eval = tuple(state["last_eval"]) if state.get("last_eval") is not None else None
        self.pending = None
        if state.get("pending_check") is not None:
            if state.get("snapshot") is None:
                raise ValueError("CompreSSM: the saved state lacks the snapshot of the pending pragmatic check.")
            self.pending = {**state["pending_check"], "snapshot": state["snapshot"]}


__all__ = ["PragmaticRollback"]
