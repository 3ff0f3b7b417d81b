#!/usr/bin/env python
"""The price of CompreSSM's multi-process design: a 2-process (gloo) training step with
`CompreSSMCallback` vs plain DDP on the same model, before the first cut and after the last one.

    python scripts/ddp_overhead.py                      # launches itself on 2 processes (torch.distributed.run)
    python scripts/ddp_overhead.py --steps 10 --hidden_size 16 --state_size 16 --block_size 64   # a smoke test

With the callback, the tensors a cut replaces (per Mamba-1 mixer ``A_log`` and ``x_proj.weight``) are kept out of
DDP and their gradients all-reduced together, one flat all-reduce at the end of each backward pass, outside DDP's buckets and overlap
(`hf_compressssm.compression.distributed`). Each process runs, with the HF Trainer and one thread:

1. ``plain@N0``         plain DDP (every parameter in DDP's buckets) at N0, ``--steps`` steps;
2. ``callback``         the callback with two cuts at steps ``steps + 1`` and ``steps + 2``: its first ``--steps``
                        steps (at N0, ``callback@N0``) and its last ``--steps`` steps (``callback@final``);
3. ``plain@final``      plain DDP on a model built at the callback's final sizes.

Per-step wall and process-CPU time (`StepTimer`: forward, backward with all-reduces, optimizer step) are taken as the
median over the steps after ``--skip`` warm-up steps, on rank 0. The phases run ``--rounds`` times in alternating
order; the overhead is the median over rounds of the same-round ratio callback / plain (the per-round values are
kept: on a shared machine they scatter by ±15 %). Writes ``<out>.json`` and prints the overhead in % of a plain
DDP step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="measured steps per phase (default 40)")
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps left out of each median (default 3)")
    ap.add_argument("--rounds", type=int, default=2, help="repetitions of the phases, alternating order")
    ap.add_argument("--hidden_size", type=int, default=64)
    ap.add_argument("--num_layers", type=int, default=2)
    ap.add_argument("--state_size", type=int, default=128)
    ap.add_argument("--block_size", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8, help="per process")
    ap.add_argument("--tau", type=float, default=0.25)
    ap.add_argument(
        "--find_unused_parameters",
        action="store_true",
        help="DDP's find_unused_parameters (the Trainer's default; off here: an extra graph traversal in both designs)",
    )
    ap.add_argument("--out", default=str(REPO / "scripts" / "results" / "ddp_overhead"), help="path without .json")
    args = ap.parse_args(argv)
    if args.steps <= args.skip:
        ap.error("--steps must be larger than --skip")
    return args


def launch(argv: list[str]) -> int:
    """Run this script on 2 processes with ``torch.distributed.run`` (one thread each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0"]
    return subprocess.run([*cmd, "--standalone", __file__, *argv], env=env).returncode


def worker(args: argparse.Namespace) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    from compressssm_app.experiment import train_and_measure, training_arguments
    from compressssm_app.harness import git_state
    from hf_compressssm import CompreSSMCallback, CompreSSMMambaConfig, CompreSSMMambaForCausalLM
    from hf_compressssm.compression.atomic_io import write_json_atomic

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (args.batch_size * 2 * (3 * args.steps + 2), args.block_size), generator=g)
    data = [{"input_ids": row, "labels": row} for row in ids]

    def model_at(sizes: list[int] | None):
        config = CompreSSMMambaConfig(
            vocab_size=256,
            hidden_size=args.hidden_size,
            num_hidden_layers=args.num_layers,
            state_size=args.state_size,
            state_sizes=sizes,
            use_cache=False,
        )
        torch.manual_seed(0)
        return CompreSSMMambaForCausalLM(config)

    def train(model, steps: int, callbacks=()):
        with tempfile.TemporaryDirectory() as out:
            targs = training_arguments(
                out,
                steps=steps,
                batch_size=args.batch_size,
                learning_rate=1e-3,
                seed=0,
                warmup=0.0,
                use_cpu=True,
                ddp_backend="gloo",
                ddp_find_unused_parameters=args.find_unused_parameters,
            )
            return train_and_measure(model, data, targs, callbacks=list(callbacks))

    def median(run, lo: int = 0, hi: int | None = None) -> dict[str, float]:
        """Median wall and process-CPU seconds of steps ``lo + skip .. hi`` of ``run``."""
        return {
            "wall": statistics.median(run.step_times[lo:hi][args.skip :]),
            "cpu": statistics.median(run.step_cpu_times[lo:hi][args.skip :]),
        }

    names = ("plain@N0", "callback@N0", "callback@final", "plain@final")
    phases: dict[str, list[dict[str, float]]] = {k: [] for k in names}
    final_sizes = None
    for round_ in range(args.rounds):
        order = ["plain", "callback"] if round_ % 2 == 0 else ["callback", "plain"]
        for which in order:
            if which == "plain":
                phases["plain@N0"].append(median(train(model_at(None), args.steps)))
                continue
            s = args.steps
            callback = CompreSSMCallback(tau=args.tau, reduction_steps=[s + 1, s + 2], calibration_batches=1)
            run = train(model_at(None), 2 * s + 2, [callback])
            phases["callback@N0"].append(median(run, 0, s))
            phases["callback@final"].append(median(run, s + 2))
            final_sizes = list(run.model.config.state_sizes)
        phases["plain@final"].append(median(train(model_at(final_sizes), args.steps)))
    if rank != 0:
        return
    result = {
        "command": " ".join(["python scripts/ddp_overhead.py", *sys.argv[1:]]),
        "settings": vars(args),
        "world_size": int(os.environ["WORLD_SIZE"]),
        "final_sizes": final_sizes,
        "median_step_seconds": phases,
        "git": git_state(REPO),
        "at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for what in ("wall", "cpu"):  # the median over rounds of the paired (same-round) ratios
        for key, comp, plain in (
            ("before_cut", "callback@N0", "plain@N0"),
            ("after_last_cut", "callback@final", "plain@final"),
        ):
            ratios = [c[what] / p[what] for c, p in zip(phases[comp], phases[plain])]
            result[f"overhead_{key}_{what}_per_round"] = [r - 1.0 for r in ratios]
            result[f"overhead_{key}_{what}"] = statistics.median(ratios) - 1.0
    result["overhead_before_cut"] = result["overhead_before_cut_wall"]
    result["overhead_after_last_cut"] = result["overhead_after_last_cut_wall"]
    result["load_average_end"] = os.getloadavg()
    write_json_atomic(f"{args.out}.json", result)

    def pct(values: list[float]) -> str:
        return ", ".join(f"{100 * v:+.1f}" for v in values)

    print(
        f"final sizes {final_sizes}; callback overhead vs plain DDP (median of per-round paired ratios, rounds in "
        f"brackets): at N0 {100 * result['overhead_before_cut_wall']:+.1f} % wall "
        f"[{pct(result['overhead_before_cut_wall_per_round'])}], {100 * result['overhead_before_cut_cpu']:+.1f} % "
        f"CPU; after the last cut {100 * result['overhead_after_last_cut_wall']:+.1f} % wall "
        f"[{pct(result['overhead_after_last_cut_wall_per_round'])}], "
        f"{100 * result['overhead_after_last_cut_cpu']:+.1f} % CPU; wrote {args.out}.json",
        flush=True,
    )


if __name__ == "__main__":
    _args = parse_args()
    if "RANK" not in os.environ:
        sys.exit(launch(sys.argv[1:]))
    worker(_args)
