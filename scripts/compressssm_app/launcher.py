"""Check that a multi-process launcher really started the processes it was asked for.

``accelerate launch --cpu --num_processes 2 script.py`` (or a ``MULTI_CPU`` accelerate config without an MPI
hostfile) runs ONE process: accelerate hands ``--cpu`` to its single-process launcher. `launcher_mismatch` reads
the parent launcher's command line (``psutil``, installed with accelerate) and returns a warning when it asked for
N > 1 processes but this process sees a world size of 1.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


CPU_CONFIG = "configs/accelerate_cpu_2proc.yaml"
_COUNT_FLAGS = ("--num_processes", "--num-processes", "--nproc_per_node", "--nproc-per-node")


def _flag_value(args: Sequence[str], flags: Sequence[str]) -> str | None:
    for i, arg in enumerate(args):
        for flag in flags:
            if arg == flag and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
    return None


def requested_processes(launcher_args: Sequence[str], script: str) -> int | None:
    """Processes asked for by a launcher command line (``accelerate launch`` / ``torchrun``), or None.

    Only the launcher's own options count (those before ``script``); ``--config_file`` is read for
    ``num_processes`` when no count is given on the command line."""
    args = list(launcher_args)
    name = os.path.basename(script)
    cut = next((i for i, a in enumerate(args) if os.path.basename(a) == name), len(args))
    args = args[:cut]
    text = " ".join(args)
    if not any(key in text for key in ("accelerate", "torchrun", "torch.distributed.run")):
        return None
    value = _flag_value(args, _COUNT_FLAGS)
    if value is None:
        config = _flag_value(args, ("--config_file", "--config-file"))
        if config is None or not os.path.isfile(config):
            return None
        try:
            import yaml

            with open(config, encoding="utf-8") as handle:
                value = (yaml.safe_load(handle) or {}).get("num_processes")
        except Exception:  # unreadable config: nothing to compare with
            return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def launcher_mismatch(world_size: int, script: str) -> str | None:
    """A warning when the parent launcher asked for more processes than ``world_size``, else None."""
    if world_size > 1:
        return None
    try:
        import psutil

        parent = psutil.Process(os.getppid()).cmdline()
    except Exception:  # no psutil, no permission, parent gone
        return None
    wanted = requested_processes(parent, script)
    if wanted is None or wanted <= 1:
        return None
    return (
        f"the launcher asked for {wanted} processes but this run has world size {world_size}: "
        "`accelerate launch --cpu` (or a MULTI_CPU config without an MPI hostfile) starts a single process. On a "
        f"CPU-only machine use `accelerate launch --config_file {CPU_CONFIG}` (or `--multi_gpu --num_processes "
        f"{wanted}`), or `torchrun --nproc_per_node {wanted}`."
    )


__all__ = ["CPU_CONFIG", "launcher_mismatch", "requested_processes"]
