"""One training step of a whole Mamba-2 model on CPU: stock transformers against ours, at N0 and after a cut.

The model has the mamba2-130m shape (24 layers, hidden 768, head_dim 64, 24 heads, one group, N0 = 128, vocabulary
50280, chunk 256); a step is forward + backward + AdamW on a batch of 2 x 512 random token ids. Variants, each in a
fresh worker process with the same seed and batch:

- ``stock``: transformers' ``Mamba2ForCausalLM`` (its CPU path: the chunked torch SSD code);
- ``ours``: ``CompreSSMMamba2ForCausalLM`` with the numba SSD scan (the CPU default);
- ``ours_torch``: the same model with our torch chunk path (``HF_COMPRESSSSM_SCAN_BACKEND=torch``);
- ``ours_cut``: ours with every layer at ``--cut_size`` states (a cut model has exactly these shapes).

Reported per variant: the median wall and CPU seconds of the timed steps (after one warm-up step), and the peak RSS
of the whole process (parameters, AdamW state and activations included), in ``scripts/results/
benchmark_mamba2_model.{json,md}``::

    python scripts/benchmark_mamba2_model.py            # ~10 min on 2 cores
    python scripts/benchmark_mamba2_model.py --quick    # a tiny model, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "scripts", "results")
VARIANTS = ("stock", "ours", "ours_torch", "ours_cut")
FULL = dict(layers=24, hidden=768, head_dim=64, state=128, vocab=50280, batch=2, length=512, chunk=256, cut_size=39)
QUICK = dict(layers=2, hidden=64, head_dim=16, state=16, vocab=128, batch=2, length=64, chunk=16, cut_size=4)


def _peak_rss_mb() -> float:
    """Peak RSS of this process (``VmHWM``) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(args) -> dict:
    """Build the variant's model, run the steps, return the measurements."""
    import torch

    torch.set_num_threads(args.threads)
    values = dict(
        num_hidden_layers=args.layers,
        hidden_size=args.hidden,
        head_dim=args.head_dim,
        num_heads=2 * args.hidden // args.head_dim,
        n_groups=1,
        state_size=args.state,
        vocab_size=args.vocab,
        chunk_size=args.chunk,
    )
    torch.manual_seed(0)
    calls = {"numba": 0}
    if args.variant == "stock":
        from transformers import Mamba2Config, Mamba2ForCausalLM

        model = Mamba2ForCausalLM(Mamba2Config(**values))
    else:
        from hf_compressssm import CompreSSMMamba2Config, CompreSSMMamba2ForCausalLM
        from hf_compressssm.models import modeling_compressssm_mamba2 as modeling

        real = modeling.ssd_numba_scan

        def counted(*a, **k):
            calls["numba"] += 1
            return real(*a, **k)

        modeling.ssd_numba_scan = counted
        if args.variant == "ours_cut":
            values["state_sizes"] = [args.cut_size] * args.layers
        model = CompreSSMMamba2ForCausalLM(CompreSSMMamba2Config(**values))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.length), generator=torch.Generator().manual_seed(1))
    walls, cpus, losses = [], [], []
    for step in range(args.steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # step 0 warms up (numba compile or cache load, allocator)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        losses.append(float(loss))
    expected = args.variant in ("ours", "ours_cut")
    if expected != (calls["numba"] > 0):
        raise RuntimeError(f"{args.variant}: the numba SSD scan ran {calls['numba']} times")
    return dict(
        variant=args.variant,
        parameters=sum(p.numel() for p in model.parameters()),
        state_sizes=list(getattr(model.config, "state_sizes", [args.state] * args.layers)),
        wall_s=statistics.median(walls),
        cpu_s=statistics.median(cpus),
        walls_s=walls,
        cpus_s=cpus,
        peak_rss_mb=_peak_rss_mb(),
        first_loss=losses[0],
        torch_threads=torch.get_num_threads(),
    )


def run_variant(variant: str, shape: dict, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--variant", variant]
    cmd += ["--steps", str(args.steps), "--threads", str(args.threads)]
    for key, value in shape.items():
        cmd += [f"--{key}", str(value)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("HF_COMPRESSSSM_SCAN_BACKEND", None)
    if variant == "ours_torch":
        env["HF_COMPRESSSSM_SCAN_BACKEND"] = "torch"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    s = report["shape"]
    stock = report["results"]["stock"]
    lines = [
        "# Mamba-2 whole-model training step (CPU)",
        "",
        f"{s['layers']} layers, hidden {s['hidden']}, head_dim {s['head_dim']}, N0 = {s['state']}, vocabulary "
        f"{s['vocab']}, batch {s['batch']} x {s['length']} tokens; forward + backward + AdamW, median of "
        f"{report['steps']} steps after a warm-up step, {report['threads']} thread(s), fresh process per variant. "
        f"Peak RSS: the whole process. {report['versions']}; commit {report['git']['commit']}"
        + (f" (uncommitted: {', '.join(report['git']['dirty'])})" if report["git"]["dirty"] else "")
        + f"; load average {report['loadavg_start']} at start, {report['loadavg_end']} at end.",
        "",
        "| variant | state sizes | parameters | step wall (s) | step CPU (s) | vs stock (wall) | peak RSS (GB) | first loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        sizes = sorted(set(r["state_sizes"]))
        lines.append(
            f"| {name} | {sizes[0] if len(sizes) == 1 else sizes} | {r['parameters']:,} | {r['wall_s']:.2f} | "
            f"{r['cpu_s']:.2f} | {stock['wall_s'] / r['wall_s']:.2f}x | {r['peak_rss_mb'] / 1024:.2f} | "
            f"{r['first_loss']:.4f} |"
        )
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model (seconds)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch (and numba) threads")
    parser.add_argument("--timeout", type=int, default=1800, help="per-variant subprocess timeout (s)")
    parser.add_argument("--output", default=None, help="path without extension")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    for key, value in FULL.items():
        parser.add_argument(f"--{key}", type=int, default=None, help=f"model/batch shape (default {value})")
    args = parser.parse_args(argv)
    shape = dict(QUICK if args.quick else FULL)
    shape.update({k: getattr(args, k) for k in FULL if getattr(args, k) is not None})
    if args.worker:
        for key, value in shape.items():
            setattr(args, key, value)
        print(json.dumps(worker(args)))
        return

    import torch
    import transformers

    from compressssm_app.harness import git_state
    from hf_compressssm.compression.atomic_io import write_json_atomic, write_text_atomic

    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "stock" not in variants:
        parser.error(f"--variants: {unknown or 'stock is needed'} (choose from {VARIANTS}, stock included)")
    report = dict(
        command="python scripts/benchmark_mamba2_model.py" + (" --quick" if args.quick else ""),
        shape=shape,
        steps=args.steps,
        threads=args.threads,
        versions=f"torch {torch.__version__}, transformers {transformers.__version__}",
        git=git_state(ROOT, paths=("hf_compressssm/models", "scripts/benchmark_mamba2_model.py")),
        loadavg_start=" ".join(f"{x:.1f}" for x in os.getloadavg()),
        results={},
    )
    for variant in variants:
        r = run_variant(variant, shape, args)
        report["results"][variant] = r
        print(
            f"{variant:10s} step {r['wall_s']:7.2f} s wall, {r['cpu_s']:7.2f} s CPU, peak RSS "
            f"{r['peak_rss_mb'] / 1024:5.2f} GB, first loss {r['first_loss']:.4f}",
            flush=True,
        )
    report["loadavg_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    output = args.output or os.path.join(RESULTS, "benchmark_mamba2_model" + ("_quick" if args.quick else ""))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_json_atomic(output + ".json", report)
    md = markdown(report)
    write_text_atomic(output + ".md", md)
    print(md)


if __name__ == "__main__":
    main()
