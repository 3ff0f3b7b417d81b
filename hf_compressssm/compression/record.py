"""The record of what compression did to a model, and the one place it is read and written.

`CompressionRecord` is the summary kept in ``config.compression`` (so in ``config.json``): method, initial sizes, the
arguments, the schedule, whether pragmatic mode stopped, one short entry per attempt, and the argument changes made
on resume. The full detail of each attempt (`ReductionReport.to_dict`: kept indices, scores) is
``model.compression_history``, which ``save_pretrained`` writes as ``compression_history.json`` next to the weights
(the model classes do it themselves: they are shipped as remote code and cannot import this module).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from .arguments import CompressionArguments
from .atomic_io import write_json_atomic


HISTORY_FILE = "compression_history.json"
#: The arguments every attempt records (what it was done with; resuming with other arguments never rewrites it).
RECORDED_ARGUMENTS = ("tau", "mode", "score", "selection")


@dataclass
class CompressionRecord:
    """``config.compression``: the summary of every compression of a model (saved in ``config.json``)."""

    method: str = "CompreSSM"
    initial_state_sizes: list[int] | None = None
    stopped: bool = False
    tau: float | None = None
    mode: str | None = None
    score: str | None = None
    selection: str | None = None
    schedule: list[int] | None = None
    #: One entry per attempt: step, sizes before/after, skipped, unchanged, and `RECORDED_ARGUMENTS`.
    history: list[dict[str, Any]] | None = None
    #: ``{"step", "changed": {name: [old, new]}}`` for each resume with other arguments.
    argument_changes: list[dict[str, Any]] | None = None
    #: Keys of a saved record this version does not know (kept as they are).
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CompressionRecord:
        data = dict(data or {})
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: data.pop(k) for k in list(data) if k in names}
        return cls(**known, extra=data)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in ``config.compression`` (optional fields only when set)."""
        out = {"method": self.method, "initial_state_sizes": self.initial_state_sizes, "stopped": self.stopped}
        out.update({name: getattr(self, name) for name in RECORDED_ARGUMENTS})
        if self.schedule is not None:
            out["schedule"] = list(self.schedule)
        if self.history is not None:
            out["history"] = [dict(h) for h in self.history]
        if self.argument_changes is not None:
            out["argument_changes"] = [dict(c) for c in self.argument_changes]
        out.update(self.extra)
        return out

    @classmethod
    def of(cls, model: nn.Module) -> CompressionRecord:
        """The record of ``model`` (an empty one for a model never compressed)."""
        return cls.from_dict(model.config.compression)

    def save_to(self, model: nn.Module) -> None:
        """Store the record in ``model.config.compression``."""
        model.config.compression = self.to_dict()


def history_owner(model: nn.Module) -> nn.Module:
    """The model that holds ``compression_history`` (and saves it): a PEFT model's base model, else ``model``."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def set_history(model: nn.Module, history: list) -> None:
    """Replace the full per-attempt history of ``model`` (on its base model when PEFT-wrapped)."""
    history_owner(model).compression_history = list(history)


def write_history(model: nn.Module, directory: str | os.PathLike) -> str:
    """Write ``model.compression_history`` to ``directory/compression_history.json``; returns the path."""
    os.makedirs(directory, exist_ok=True)
    history = list(getattr(model, "compression_history", []) or [])
    return write_json_atomic(os.path.join(directory, HISTORY_FILE), history)


def update_compression_record(
    model: nn.Module, args: CompressionArguments, schedule: list[int] | None = None
) -> CompressionRecord:
    """Create or refresh ``model.config.compression`` (method, initial sizes, τ, mode, score, selection, schedule)."""
    record = CompressionRecord.of(model)
    if record.initial_state_sizes is None:
        record.initial_state_sizes = list(model.config.state_sizes)
    for name in RECORDED_ARGUMENTS:
        setattr(record, name, getattr(args, name))
    if schedule is not None:
        record.schedule = list(schedule)
    record.save_to(model)
    return record


def record_report(model: nn.Module, report, args: CompressionArguments) -> None:
    """Append a `ReductionReport` to ``model.compression_history`` (full detail) and ``config.compression``."""
    used = {name: getattr(args, name) for name in RECORDED_ARGUMENTS}
    history = list(getattr(model, "compression_history", []) or []) + [{**report.to_dict(), **used}]
    record = update_compression_record(model, args)
    record.history = list(record.history or []) + [
        {
            "step": report.step,
            "sizes_before": report.sizes_before,
            "sizes_after": report.sizes_after,
            "skipped": report.skipped,
            "unchanged": report.sizes_after == report.sizes_before,
            **used,
        }
    ]
    record.save_to(model)
    set_history(model, history)


__all__ = [
    "HISTORY_FILE",
    "CompressionRecord",
    "history_owner",
    "record_report",
    "set_history",
    "update_compression_record",
    "write_history",
]
