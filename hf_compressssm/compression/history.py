"""The record of what compression did: ``config.compression`` (summary, saved in config.json) and
``model.compression_history`` (full detail per attempt, saved as ``compression_history.json``).

The model classes write ``compression_history.json`` themselves in ``save_pretrained`` (they are shipped as
stand-alone remote code and cannot import this module); the file name below is the same.
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from .arguments import CompressionArguments


HISTORY_FILE = "compression_history.json"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> str:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename (never a half-written file)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_safetensors_atomic(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> str:
    """Write ``tensors`` (name → tensor, made contiguous on CPU) as safetensors through a temporary file + rename."""
    from safetensors import torch as safetensors_torch

    save_file = safetensors_torch.save_file
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


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
) -> dict[str, Any]:
    """Create or refresh ``model.config.compression`` (method, initial sizes, τ, mode, score, selection, schedule)."""
    record = dict(model.config.compression or {})
    record.setdefault("method", "CompreSSM")
    record.setdefault("initial_state_sizes", list(model.config.state_sizes))
    record.setdefault("stopped", False)
    record.update({"tau": args.tau, "mode": args.mode, "score": args.score, "selection": args.selection})
    if schedule is not None:
        record["schedule"] = list(schedule)
    model.config.compression = record
    return record


def record_report(model: nn.Module, report, args: CompressionArguments) -> None:
    """Append a `ReductionReport` to ``model.compression_history`` (full detail) and ``config.compression["history"]``."""
    entry = report.to_dict()
    entry.update({"tau": args.tau, "mode": args.mode, "score": args.score, "selection": args.selection})
    history = list(getattr(model, "compression_history", []) or []) + [entry]
    record = update_compression_record(model, args)
    record["history"] = list(record.get("history", [])) + [
        {
            "step": report.step,
            "sizes_before": report.sizes_before,
            "sizes_after": report.sizes_after,
            "skipped": report.skipped,
            "unchanged": report.sizes_after == report.sizes_before,
            # what this attempt was done with (resuming with other arguments never rewrites it)
            "tau": args.tau,
            "mode": args.mode,
            "score": args.score,
            "selection": args.selection,
        }
    ]
    model.config.compression = record
    set_history(model, history)
