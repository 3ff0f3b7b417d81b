#!/usr/bin/env python
"""Benchmark the selective scan inside a stock ``MambaForCausalLM`` training step (forward + backward).

    python scripts/benchmark_scan.py            # the issue's sizes: hidden 256, 4 layers, batch 8, length 256,
                                                # vocab 1024, fp32, N in {128, 64, 32, 16, 8} (several minutes)
    python scripts/benchmark_scan.py --quick    # tiny sizes: millisecond steps; the run takes about a minute,
                                                # mostly the start-up of its 8 worker processes

Variants, each timed in a fresh subprocess on the same model (same seed, same batch):
  * ``ours``    -- transformers' ``mamba_selective_scan`` replaced by ``hf_compressssm/models/selective_scan.py``'s
                   ``selective_scan(backend="numba")``. The mixer looks the module-level name up at call time (the
                   ``use_kernelized_func`` decorator is an identity without the ``kernels`` package; the worker
                   checks that the patched function is really called);
  * ``mambapy`` -- ``MambaConfig(use_mambapy=True)`` (transformers' parallel-scan path, needs ``mambapy``);
  * ``eager``   -- transformers' default sequential torch loop, at a shorter length (``--eager_length``), where
                   ``ours`` is timed again for the ratio.

Workers run with ``OMP_WAIT_POLICY=PASSIVE`` unless ``--omp_wait_policy inherit``: on a shared machine torch's
spinning OpenMP threads otherwise make every variant several times slower and the timings mostly measure the
other processes. Time: wall-clock seconds of one ``loss.backward()`` step (``forward(labels=...)`` + backward), the minimum over
``--reps`` repetitions after a warm-up step at tiny size (the JIT compile / cache load is outside the timing); the
process CPU time of the same step is recorded too (the machine may be shared). Memory: peak resident set size of
the worker process during the timed steps minus its resident set size just before them
(``resource.getrusage(RUSAGE_SELF).ru_maxrss`` against ``/proc/self/statm``), i.e. the extra memory the step needs.
Results go to ``scripts/results/benchmark_scan.json`` and ``.md``.
"""

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCAN_FILE = os.path.join(ROOT, "hf_compressssm", "models", "selective_scan.py")
RESULTS = os.path.join(ROOT, "scripts", "results")

FULL = dict(hidden=256, layers=4, batch=8, length=256, vocab=1024, states=[128, 64, 32, 16, 8], eager_length=64)
QUICK = dict(hidden=64, layers=2, batch=2, length=64, vocab=128, states=[16, 8], eager_length=16)


# ------------------------------------------------------------------------------------------------ worker


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _load_scan_module():
    """hf_compressssm/models/selective_scan.py on its own (no package __init__), as remote code loads it."""
    name = "hf_compressssm_benchmark_selective_scan"
    spec = importlib.util.spec_from_file_location(name, SCAN_FILE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def worker(args):
    import torch
    from transformers import MambaConfig, MambaForCausalLM
    from transformers.models.mamba import modeling_mamba

    calls = {"n": 0}
    if args.variant == "ours":
        scan = _load_scan_module()

        def patched(
            u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False, **unused
        ):
            calls["n"] += 1
            return scan.selective_scan(
                u,
                delta,
                A,
                B,
                C,
                D=D,
                z=z,
                delta_bias=delta_bias,
                delta_softplus=delta_softplus,
                return_last_state=return_last_state,
                backend="numba",
            )

        modeling_mamba.mamba_selective_scan = patched

    def build(length):
        torch.manual_seed(0)
        config = MambaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            state_size=args.state,
            use_mambapy=args.variant == "mambapy",
        )
        model = MambaForCausalLM(config).train()
        ids = torch.randint(0, args.vocab, (args.batch, length), generator=torch.Generator().manual_seed(1))
        return model, ids

    def step(model, ids):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    # warm-up at tiny size (numba compile or cache load, allocator and thread pools)
    model, ids = build(8)
    step(model, ids[:1])
    model, ids = build(args.length)
    rss0 = _rss_mb()
    walls, cpus = [], []
    for _ in range(args.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step(model, ids)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    peak = _maxrss_mb()
    if args.variant == "ours":
        assert calls["n"] >= args.layers, "the patched scan was not called"
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    print(
        json.dumps(
            dict(
                variant=args.variant,
                state=args.state,
                length=args.length,
                wall_s=min(walls),
                walls_s=walls,
                cpu_s=min(cpus),
                cpus_s=cpus,
                peak_rss_delta_mb=max(0.0, peak - rss0),
                rss_before_mb=rss0,
                peak_rss_mb=peak,
                loss=float(loss.detach()),
                grad_norm=float(grad_norm),
                torch_threads=torch.get_num_threads(),
                patched_calls=calls["n"],
            )
        )
    )


# ------------------------------------------------------------------------------------------------ driver


def run_variant(sizes, variant, state, length, reps, timeout, env=None):
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--variant",
        variant,
        "--state",
        str(state),
        "--length",
        str(length),
        "--reps",
        str(reps),
    ]
    for key in ("hidden", "layers", "batch", "vocab"):
        cmd += [f"--{key}", str(sizes[key])]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} N={state} L={length} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - t0
    print(
        f"  {variant:8s} N={state:<4d} L={length:<4d} step {res['wall_s']:8.3f} s wall, {res['cpu_s']:8.2f} s cpu,"
        f" peak +{res['peak_rss_delta_mb']:8.1f} MB   loss {res['loss']:.6f}",
        flush=True,
    )
    return res


def markdown(report):
    s = report["sizes"]
    lines = [
        "# Selective-scan benchmark",
        "",
        f"`MambaForCausalLM`, hidden {s['hidden']}, {s['layers']} layers, batch {s['batch']}, vocab {s['vocab']}, "
        f"fp32, one training step (forward with labels + backward). Length {s['length']} for ours vs mambapy; "
        f"the eager loop at length {s['eager_length']}. Machine: {report['machine']['cpus']} CPUs "
        f"({report['machine']['processor']}), torch {report['versions']['torch']} with "
        f"{report['results'][0]['ours']['torch_threads']} threads, transformers {report['versions']['transformers']}, "
        f"numba {report['versions']['numba']}, OMP_WAIT_POLICY={report['omp_wait_policy']}; load average "
        f"{report['machine']['loadavg_start']} at start, {report['machine']['loadavg_end']} at end. Code: commit "
        f"{str(report.get('git', {}).get('commit'))[:10]}"
        + (f" (uncommitted changes in {report['git']['dirty']})" if report.get("git", {}).get("dirty") else "")
        + ".",
        "",
        "Time: minimum wall-clock seconds of a step over the repetitions (ours: "
        f"{report['reps']['ours']}, mambapy: {report['reps']['mambapy']}, eager: {report['reps']['eager']}), after a "
        "tiny warm-up step (JIT/cache load outside the timing). Memory: peak RSS of the worker process during the "
        "timed steps minus its RSS just before them (`ru_maxrss` vs `/proc/self/statm`). CPU seconds (process time, "
        "all threads) are in the JSON.",
        "",
        f"| N | ours (s) | mambapy (s) | speed-up | ours peak (MB) | mambapy peak (MB) | memory ratio | "
        f"eager L={s['eager_length']} (s) | ours L={s['eager_length']} (s) | speed-up vs eager | loss diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        o, m = r["ours"], r.get("mambapy")
        e, os_ = r.get("eager"), r.get("ours_short")
        cells = [str(r["state"]), f"{o['wall_s']:.3f}"]
        if m:
            cells += [
                f"{m['wall_s']:.2f}",
                f"{m['wall_s'] / o['wall_s']:.1f}x",
                f"{o['peak_rss_delta_mb']:.0f}",
                f"{m['peak_rss_delta_mb']:.0f}",
                f"{o['peak_rss_delta_mb'] / max(m['peak_rss_delta_mb'], 1e-9):.3f}",
            ]
        else:
            cells += ["-", "-", f"{o['peak_rss_delta_mb']:.0f}", "-", "-"]
        if e and os_:
            cells += [f"{e['wall_s']:.2f}", f"{os_['wall_s']:.3f}", f"{e['wall_s'] / os_['wall_s']:.0f}x"]
        else:
            cells += ["-", "-", "-"]
        cells.append(f"{abs(o['loss'] - m['loss']):.1e}" if m else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (about a minute, mostly process start-up)")
    p.add_argument("--states", type=int, nargs="+", help="state sizes N (default: 128 64 32 16 8)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions for ours (mambapy/eager: 1 unless --quick)")
    p.add_argument("--no_eager", action="store_true", help="skip the eager-loop comparison")
    p.add_argument("--no_mambapy", action="store_true", help="skip the mambapy comparison")
    p.add_argument("--output", default=os.path.join(RESULTS, "benchmark_scan"), help="path without extension")
    p.add_argument("--timeout", type=float, default=1800, help="per-variant subprocess timeout (s)")
    p.add_argument(
        "--omp_wait_policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY for every worker (default PASSIVE: on a shared machine torch's spinning "
        "OpenMP threads otherwise make every variant several times slower); 'inherit' leaves it",
    )
    # worker mode
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=["ours", "mambapy", "eager"], help=argparse.SUPPRESS)
    p.add_argument("--state", type=int, help=argparse.SUPPRESS)
    for key in ("hidden", "layers", "batch", "vocab", "length"):
        p.add_argument(f"--{key}", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    import numba
    import torch
    import transformers

    from compressssm_app.harness import git_state
    from hf_compressssm.compression.atomic_io import write_json_atomic

    sizes = dict(QUICK if args.quick else FULL)
    if args.states:
        sizes["states"] = args.states
    if not args.no_mambapy and importlib.util.find_spec("mambapy") is None:
        print("mambapy is not installed: skipping that comparison (pip install mambapy)")
        args.no_mambapy = True
    slow_reps = args.reps if args.quick else 1
    env = dict(os.environ)
    env.pop("HF_COMPRESSSSM_SCAN_BACKEND", None)
    if args.omp_wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    report = dict(
        command="python scripts/benchmark_scan.py"
        + (" --quick" if args.quick else "")
        + (f" --states {' '.join(map(str, args.states))}" if args.states else ""),
        sizes=sizes,
        reps=dict(ours=args.reps, mambapy=slow_reps, eager=slow_reps),
        omp_wait_policy=env.get("OMP_WAIT_POLICY", "(unset)"),
        memory_method="peak RSS during the timed steps minus RSS before them, per fresh worker process "
        "(resource.getrusage(RUSAGE_SELF).ru_maxrss vs /proc/self/statm)",
        time_method="min wall-clock seconds of forward(labels)+backward over the repetitions, after a tiny warm-up",
        machine=dict(
            cpus=os.cpu_count(),
            processor=platform.processor() or platform.machine(),
            loadavg_start=[round(x, 2) for x in os.getloadavg()],
        ),
        versions=dict(
            torch=torch.__version__,
            transformers=transformers.__version__,
            numba=numba.__version__,
            python=platform.python_version(),
        ),
        git=git_state(ROOT, paths=("hf_compressssm/models", "scripts/benchmark_scan.py")),
        results=[],
    )
    print(f"sizes: {sizes}")
    for n in sizes["states"]:
        row = dict(state=n)
        row["ours"] = run_variant(sizes, "ours", n, sizes["length"], args.reps, args.timeout, env)
        if not args.no_mambapy:
            row["mambapy"] = run_variant(sizes, "mambapy", n, sizes["length"], slow_reps, args.timeout, env)
            row["speedup_vs_mambapy"] = row["mambapy"]["wall_s"] / row["ours"]["wall_s"]
            row["memory_ratio_vs_mambapy"] = row["ours"]["peak_rss_delta_mb"] / max(
                row["mambapy"]["peak_rss_delta_mb"], 1e-9
            )
            row["loss_abs_diff_vs_mambapy"] = abs(row["ours"]["loss"] - row["mambapy"]["loss"])
            row["grad_norm_rel_diff_vs_mambapy"] = abs(row["ours"]["grad_norm"] - row["mambapy"]["grad_norm"]) / max(
                row["mambapy"]["grad_norm"], 1e-30
            )
        if not args.no_eager:
            row["eager"] = run_variant(sizes, "eager", n, sizes["eager_length"], slow_reps, args.timeout, env)
            row["ours_short"] = run_variant(sizes, "ours", n, sizes["eager_length"], args.reps, args.timeout, env)
            row["speedup_vs_eager_short"] = row["eager"]["wall_s"] / row["ours_short"]["wall_s"]
            row["loss_abs_diff_vs_eager_short"] = abs(row["eager"]["loss"] - row["ours_short"]["loss"])
        report["results"].append(row)
    report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    write_json_atomic(args.output + ".json", report)
    md = markdown(report)
    with open(args.output + ".md.tmp", "w") as f:
        f.write(md)
    os.replace(args.output + ".md.tmp", args.output + ".md")
    print()
    print(md)
    print(f"wrote {args.output}.json and {args.output}.md")


if __name__ == "__main__":
    main()
