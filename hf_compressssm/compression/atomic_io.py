"""Files written atomically: through a temporary file in the same folder, flushed to disk, then renamed over the
target, so that a reader (or a run resumed after a kill) never sees a half-written file."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def _replaced_atomically(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path`` to write; on success flush it to disk and rename it over ``path``;
    in every case leave no temporary file behind."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` to ``path`` through a temporary file and a rename (never a half-written file)."""
    with _replaced_atomically(path) as tmp, open(tmp, "w") as f:
        f.write(text)
    return os.fspath(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> str:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename (never a half-written file)."""
    return write_text_atomic(path, json.dumps(obj, indent=1))


def write_safetensors_atomic(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> str:
    """Write ``tensors`` (name → tensor, made contiguous on CPU) as safetensors through a temporary file + rename."""
    from safetensors import torch as safetensors_torch

    with _replaced_atomically(path) as tmp:
        safetensors_torch.save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata
        )
    return os.fspath(path)


__all__ = ["write_json_atomic", "write_safetensors_atomic", "write_text_atomic"]
