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

    python scripts/benchmark_scan.py --family mamba2   # Mamba-2: the SSD scan and one mixer, two shapes, N in
                                                       # {128, 64, 16, 4}, one thread (a few minutes)

Mamba-2 (``--family mamba2``): forward + backward of one layer at the Mamba-2 preset shape of
``scripts/benchmark.py`` (hidden 64, head_dim 32, 4 heads, 1 group, chunk 256, batch 8 x 256) and at the
mamba2-130m layer shape (hidden 768, head_dim 64, 24 heads, 1 group, chunk 256, batch 2 x 512), one layer (one
mixer) rather than the 24-layer model. Variants, each in a fresh worker, interleaved over ``--rounds`` rounds:
  * ``stock_ssd`` / ``ours_ssd`` -- the SSD scan alone on the mixer's tensors: transformers' torch
    ``mamba2_chunk_scan`` (what the stock mixer runs on CPU) against ``ssd_numba_scan``;
  * ``stock_mixer`` -- transformers' ``Mamba2Mixer`` (its torch path: no ``mamba_ssm`` on CPU);
  * ``ours_mixer`` -- ``CompreSSMMamba2Mixer`` with the same weights and the numba SSD scan (auto on CPU);
  * ``ours_torch_mixer`` -- the same with ``HF_COMPRESSSSM_SCAN_BACKEND=torch`` (our torch chunk loop).
Loss: the mean square of the output. Time: median wall-clock (and process CPU) seconds of one forward + backward
over all repetitions of all rounds, after a warm-up at tiny size; memory: the median over rounds of the peak RSS
during the timed steps (``VmHWM`` reset just before them through ``/proc/self/clear_refs``) minus the RSS before
them. Results: ``scripts/results/benchmark_scan_mamba2.json`` / ``.md``.
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

#: Mamba-2 layer shapes: the Mamba-2 preset of scripts/benchmark.py and one layer of mamba2-130m.
MAMBA2_SHAPES = {
    "preset": dict(hidden=64, head_dim=32, groups=1, chunk=256, batch=8, length=256),
    "130m": dict(hidden=768, head_dim=64, groups=1, chunk=256, batch=2, length=512),
}
MAMBA2_QUICK = {"tiny": dict(hidden=32, head_dim=16, groups=2, chunk=16, batch=2, length=40)}
MAMBA2_STATES = [128, 64, 16, 4]
MAMBA2_VARIANTS = ("stock_ssd", "ours_ssd", "stock_mixer", "ours_mixer", "ours_torch_mixer")


# ------------------------------------------------------------------------------------------------ worker


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (``VmHWM``; Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """``VmHWM`` of this process (peak RSS since the last `_reset_peak_rss`), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _maxrss_mb()


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


def _mamba2_layer(args, state, torch):
    """(stock transformers Mamba2Mixer, our CompreSSMMamba2Mixer with the same weights) for one layer."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    from hf_compressssm import CompreSSMMamba2Config
    from hf_compressssm.models.modeling_compressssm_mamba2 import CompreSSMMamba2Mixer

    values = dict(
        hidden_size=args.hidden,
        num_heads=2 * args.hidden // args.head_dim,
        head_dim=args.head_dim,
        n_groups=args.groups,
        chunk_size=args.chunk,
        state_size=state,
        num_hidden_layers=1,
        vocab_size=16,
    )
    torch.manual_seed(0)
    stock = Mamba2ForCausalLM(Mamba2Config(**values)).backbone.layers[0].mixer
    ours = CompreSSMMamba2Mixer(CompreSSMMamba2Config(**values), layer_idx=0)
    ours.load_state_dict(stock.state_dict())
    return stock, ours


def worker_mamba2(args):
    import torch

    from hf_compressssm.models.ssd_numba_scan import ssd_numba_scan

    torch.set_num_threads(args.threads)
    calls = {"ours": 0}
    real = ssd_numba_scan

    def counted(*a, **k):
        calls["ours"] += 1
        return real(*a, **k)

    if args.variant in ("ours_mixer", "ours_ssd"):
        from hf_compressssm.models import modeling_compressssm_mamba2 as ours_module

        ours_module.ssd_numba_scan = counted

    def build(length, state):
        stock, ours = _mamba2_layer(args, state, torch)
        mixer = stock if args.variant.startswith("stock") else ours
        mixer.train()
        g = torch.Generator().manual_seed(1)
        hidden = torch.randn(args.batch, length, args.hidden, generator=g).requires_grad_()
        if args.variant.endswith("_mixer"):
            return mixer, (lambda: mixer(hidden)), [hidden, *mixer.parameters()]
        # the SSD scan alone, on the tensors the mixer hands it
        heads, p, n = mixer.num_heads, mixer.head_dim, state
        x = torch.randn(args.batch, length, heads, p, generator=g).requires_grad_()
        dt = torch.randn(args.batch, length, heads, generator=g).requires_grad_()
        B = torch.randn(args.batch, length, args.groups, n, generator=g).requires_grad_()
        C = torch.randn(args.batch, length, args.groups, n, generator=g).requires_grad_()
        kwargs = dict(chunk_size=mixer.chunk_size, D=mixer.D, dt_bias=mixer.dt_bias, dt_softplus=True)
        kwargs["dt_limit"] = mixer.time_step_limit
        # transformers' torch SSD function, from the stock mixer's module (it is not exported at the top level)
        fn = sys.modules[type(mixer).__module__].mamba2_chunk_scan if args.variant == "stock_ssd" else counted

        def run():
            return fn(x, dt, -torch.exp(mixer.A_log.float()), B, C, **kwargs)

        return mixer, run, [x, dt, B, C, *mixer.parameters()]

    def step(run, leaves):
        for t in leaves:
            t.grad = None
        loss = run().square().mean()
        loss.backward()
        return loss

    # warm-up at tiny size (numba compile or cache load, allocator)
    _, run, leaves = build(8, 4)
    step(run, leaves)
    _, run, leaves = build(args.length, args.state)
    calls["ours"] = 0
    reset = _reset_peak_rss()
    rss0 = _rss_mb()
    walls, cpus = [], []
    for _ in range(args.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step(run, leaves)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    peak = _peak_rss_mb() if reset else _maxrss_mb()
    if args.variant in ("ours_mixer", "ours_ssd"):
        assert calls["ours"] == args.reps, "the numba SSD scan was not called"
    grad_norm = torch.sqrt(sum((t.grad.double() ** 2).sum() for t in leaves if t.grad is not None))
    print(
        json.dumps(
            dict(
                variant=args.variant,
                state=args.state,
                walls_s=walls,
                cpus_s=cpus,
                peak_rss_delta_mb=max(0.0, peak - rss0),
                rss_before_mb=rss0,
                loss=float(loss.detach()),
                grad_norm=float(grad_norm),
                torch_threads=torch.get_num_threads(),
                numba_calls=calls["ours"],
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


def run_mamba2_variant(shape, variant, state, args, env):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--family", "mamba2", "--variant", variant]
    cmd += ["--state", str(state), "--reps", str(args.reps), "--threads", str(args.threads)]
    for key in ("hidden", "head_dim", "groups", "chunk", "batch", "length"):
        cmd += [f"--{key}", str(shape[key])]
    if variant == "ours_torch_mixer":
        env = dict(env, HF_COMPRESSSSM_SCAN_BACKEND="torch")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} N={state} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def markdown_mamba2(report):
    lines = [
        "# Mamba-2 SSD benchmark (CPU)",
        "",
        f"One layer, fp32, forward + backward of the mean square of the output, {report['threads']} thread(s), "
        f"median over {report['rounds']} interleaved rounds x {report['reps']} repetitions (fresh worker per variant "
        f"and round). transformers {report['versions']['transformers']}, torch {report['versions']['torch']}, numba "
        f"{report['versions']['numba']}; machine: {report['machine']['cpus']} CPUs, load average "
        f"{report['machine']['loadavg_start']} at start, {report['machine']['loadavg_end']} at end (shared machine). "
        f"Code: commit {str(report.get('git', {}).get('commit'))[:10]}"
        + (f" (uncommitted changes in {report['git']['dirty']})" if report.get("git", {}).get("dirty") else "")
        + ".",
        "",
        "SSD: the scan alone, transformers' torch `mamba2_chunk_scan` vs ours (`ssd_numba_scan`). Mixer: the whole "
        "layer, transformers' `Mamba2Mixer` (torch path) vs `CompreSSMMamba2Mixer` with the numba scan (and with our "
        "torch chunk loop). Time: median wall seconds (CPU seconds in the JSON); memory: peak RSS during the timed "
        "steps minus RSS before them (MB).",
        "",
        "| shape | N | SSD stock (s) | SSD ours (s) | speed-up | SSD stock (MB) | SSD ours (MB) | memory ratio "
        "| mixer stock (s) | mixer ours (s) | mixer ours, torch SSD (s) | speed-up | mixer stock (MB) | mixer ours (MB) "
        "| memory ratio | loss rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        m = r["median"]
        cells = [r["shape"], str(r["state"])]
        cells += [f"{m['stock_ssd']['wall_s']:.3f}", f"{m['ours_ssd']['wall_s']:.3f}", f"{r['ssd_speedup']:.1f}x"]
        cells += [f"{m['stock_ssd']['peak_mb']:.0f}", f"{m['ours_ssd']['peak_mb']:.0f}", f"{r['ssd_memory_ratio']:.3f}"]
        cells += [f"{m[v]['wall_s']:.3f}" for v in ("stock_mixer", "ours_mixer", "ours_torch_mixer")]
        cells += [
            f"{r['mixer_speedup']:.1f}x",
            f"{m['stock_mixer']['peak_mb']:.0f}",
            f"{m['ours_mixer']['peak_mb']:.0f}",
        ]
        cells += [f"{r['mixer_memory_ratio']:.3f}", f"{r['mixer_loss_rel_diff']:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def main_mamba2(args):
    import numba
    import torch
    import transformers

    from compressssm_app.harness import git_state
    from hf_compressssm.compression.atomic_io import write_json_atomic, write_text_atomic

    shapes = MAMBA2_QUICK if args.quick else MAMBA2_SHAPES
    states = args.states or ([8, 3] if args.quick else MAMBA2_STATES)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env.pop("HF_COMPRESSSSM_SCAN_BACKEND", None)
    if args.omp_wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    report = dict(
        command="python scripts/benchmark_scan.py --family mamba2"
        + (" --quick" if args.quick else "")
        + (f" --states {' '.join(map(str, args.states))}" if args.states else "")
        + f" --rounds {args.rounds} --reps {args.reps} --threads {args.threads}",
        shapes=shapes,
        states=states,
        rounds=args.rounds,
        reps=args.reps,
        threads=args.threads,
        omp_wait_policy=env.get("OMP_WAIT_POLICY", "(unset)"),
        memory_method="peak RSS during the timed steps (VmHWM, reset before them via /proc/self/clear_refs) minus "
        "RSS before them, per fresh worker process; median over rounds",
        time_method="median wall-clock (and CPU) seconds of forward + backward over all repetitions of all rounds",
        machine=dict(
            cpus=os.cpu_count(),
            processor=platform.processor() or platform.machine(),
            loadavg_start=[round(x, 2) for x in os.getloadavg()],
        ),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, numba=numba.__version__),
        git=git_state(ROOT, paths=("hf_compressssm/models", "scripts/benchmark_scan.py")),
        results=[],
    )
    for name, shape in shapes.items():
        for n in states:
            runs = {v: [] for v in MAMBA2_VARIANTS}
            for _ in range(args.rounds):
                for variant in MAMBA2_VARIANTS:
                    res = run_mamba2_variant(shape, variant, n, args, env)
                    runs[variant].append(res)
                    print(
                        f"  {name:6s} N={n:<4d} {variant:17s} wall {_median(res['walls_s']):7.3f} s, cpu "
                        f"{_median(res['cpus_s']):7.3f} s, peak +{res['peak_rss_delta_mb']:7.1f} MB, loss "
                        f"{res['loss']:.6g}",
                        flush=True,
                    )
            median = {
                v: dict(
                    wall_s=_median([w for r in rs for w in r["walls_s"]]),
                    cpu_s=_median([c for r in rs for c in r["cpus_s"]]),
                    peak_mb=_median([r["peak_rss_delta_mb"] for r in rs]),
                )
                for v, rs in runs.items()
            }
            stock_loss, ours_loss = runs["stock_mixer"][0]["loss"], runs["ours_mixer"][0]["loss"]
            report["results"].append(
                dict(
                    shape=name,
                    state=n,
                    median=median,
                    ssd_speedup=median["stock_ssd"]["wall_s"] / median["ours_ssd"]["wall_s"],
                    ssd_speedup_cpu=median["stock_ssd"]["cpu_s"] / median["ours_ssd"]["cpu_s"],
                    ssd_memory_ratio=median["ours_ssd"]["peak_mb"] / max(median["stock_ssd"]["peak_mb"], 1e-9),
                    mixer_speedup=median["stock_mixer"]["wall_s"] / median["ours_mixer"]["wall_s"],
                    mixer_speedup_cpu=median["stock_mixer"]["cpu_s"] / median["ours_mixer"]["cpu_s"],
                    mixer_memory_ratio=median["ours_mixer"]["peak_mb"] / max(median["stock_mixer"]["peak_mb"], 1e-9),
                    mixer_loss_rel_diff=abs(ours_loss - stock_loss) / max(abs(stock_loss), 1e-30),
                    ssd_loss_rel_diff=abs(runs["ours_ssd"][0]["loss"] - runs["stock_ssd"][0]["loss"])
                    / max(abs(runs["stock_ssd"][0]["loss"]), 1e-30),
                    runs=runs,
                )
            )
    report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    output = args.output or os.path.join(RESULTS, "benchmark_scan_mamba2")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_json_atomic(output + ".json", report)
    md = markdown_mamba2(report)
    write_text_atomic(output + ".md", md)
    print()
    print(md)
    print(f"wrote {output}.json and {output}.md")


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
    p.add_argument(
        "--output", default=None, help="path without extension (default: scripts/results/benchmark_scan[_mamba2])"
    )
    p.add_argument("--family", choices=["mamba", "mamba2"], default="mamba", help="the SSM family to benchmark")
    p.add_argument("--rounds", type=int, default=2, help="Mamba-2: interleaved rounds of fresh workers")
    p.add_argument("--threads", type=int, default=1, help="Mamba-2: torch (and numba) threads per worker")
    p.add_argument("--timeout", type=float, default=1800, help="per-variant subprocess timeout (s)")
    p.add_argument(
        "--omp_wait_policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY for every worker (default PASSIVE: on a shared machine torch's spinning "
        "OpenMP threads otherwise make every variant several times slower); 'inherit' leaves it",
    )
    # worker mode
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=["ours", "mambapy", "eager", *MAMBA2_VARIANTS], help=argparse.SUPPRESS)
    p.add_argument("--state", type=int, help=argparse.SUPPRESS)
    for key in ("hidden", "layers", "batch", "vocab", "length", "head_dim", "groups", "chunk"):
        p.add_argument(f"--{key}", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_mamba2(args) if args.family == "mamba2" else worker(args)
    if args.family == "mamba2":
        return main_mamba2(args)
    args.output = args.output or os.path.join(RESULTS, "benchmark_scan")

    import numba
    import torch
    import transformers

    from compressssm_app.harness import git_state
    from hf_compressssm.compression.atomic_io import write_json_atomic, write_text_atomic

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
    write_text_atomic(args.output + ".md", md)
    print()
    print(md)
    print(f"wrote {args.output}.json and {args.output}.md")


if __name__ == "__main__":
    main()
