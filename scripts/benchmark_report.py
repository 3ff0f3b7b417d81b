"""Aggregates, verdicts, Markdown and plots of ``scripts/benchmark.py`` (no training here).

``report`` is the dict the benchmark writes to ``benchmark.json``: ``meta`` and, per preset name, ``tasks[name]`` =
``{"preset": …, "data": …, "eval_split": …, "runs": [...], "probe": {...} | None}``. `finish_report` adds
``summary`` and ``verdicts`` per preset and writes JSON, Markdown and PNGs.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any

from hf_compressssm.compression.atomic_io import write_json_atomic, write_text_atomic


VARIANTS = ("full", "compressssm", "scratch", "smallest", "random", "hnn")
TARGETS = {
    "ceiling_fraction": 0.9,  # end-to-end speed-up ≥ 0.9 of the step-time ceiling
    "lm_loss_within": 0.02,  # LM loss within 2 % of full
    "accuracy_within_points": 1.0,  # classification within 1 point of full
    "reduction_share": 0.01,  # all reductions < 1 % of the run
    "cut_in_steps": 2.0,  # each cut < 2 training steps at N0
    "ssm_dominant_ceiling": 5.0,  # point 4: the step-time ceiling of the SSM-dominated preset
}

NOTES = [
    "Every run is a child process forked from a parent that has imported torch/transformers and built the data; "
    "peak RSS is ru_maxrss of that child, so it includes the interpreter, the libraries and the data.",
    "Speed-ups are paired: each run is divided by the full run of the same seed (same initialisation and data "
    "order). The step-time ceiling is the CPU time of one training step at N0 divided by one at the final sizes "
    "of the first seed's CompreSSM run (fixed batch, median of interleaved repetitions): what a run that was at "
    "its final sizes from step 0 could gain at most.",
    "Learning-curve evaluations run inside training (full and main-τ CompreSSM runs); their time is taken out of "
    "the run's wall and CPU time.",
    "HNN regulariser: hf_compressssm.compression.hnn (Σσ of the per-channel time-averaged LTI surrogate, "
    "differentiable, every step), truncated once with compress_model at the main τ. It runs only its first "
    "hnn_steps steps (with the full run's learning-rate schedule); its total cost is extrapolated from the "
    "measured per-step time, and its quality is that of a partially trained model.",
]


def metric_of(kind: str) -> str:
    """The quality metric of a task kind: ``loss`` (causal LM, lower is better) or ``accuracy``."""
    return "loss" if kind == "causal_lm" else "accuracy"


def _mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _by_seed(runs: list[dict[str, Any]], key: str) -> dict[int, dict[str, Any]]:
    return {r["seed"]: r for r in runs if r["key"] == key}


def _paired(runs: list[dict[str, Any]], key_a: str, key_b: str, fn) -> list[Any]:
    """``fn(run_a, run_b)`` for every seed that has both runs."""
    a, b = _by_seed(runs, key_a), _by_seed(runs, key_b)
    return [fn(a[s], b[s]) for s in sorted(a) if s in b]


def aggregate(kind: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant key: means and spreads over seeds; speed-ups are paired with the same seed's full run."""
    metric = metric_of(kind)
    full_by_seed = _by_seed(runs, "full")
    keys = list(dict.fromkeys(r["key"] for r in runs))
    summary: dict[str, Any] = {}
    for key in keys:
        rs = sorted((r for r in runs if r["key"] == key), key=lambda r: r["seed"])
        paired = [(r, full_by_seed[r["seed"]]) for r in rs if r["seed"] in full_by_seed]
        entry = {
            "variant": rs[0]["variant"],
            "tau": rs[0].get("tau"),
            "seeds": [r["seed"] for r in rs],
            "sizes_final": [r["sizes_final"] for r in rs],
            "mean_size": _mean_sd([r["mean_size"] for r in rs]),
            metric: _mean_sd([r["eval"][metric] for r in rs]),
            "total_seconds": _mean_sd([r["total_seconds"] for r in rs]),
            "total_cpu_seconds": _mean_sd([r["total_cpu_seconds"] for r in rs]),
            "speedup_vs_full": _mean_sd([f["total_seconds"] / r["total_seconds"] for r, f in paired]),
            "cpu_speedup_vs_full": _mean_sd([f["total_cpu_seconds"] / r["total_cpu_seconds"] for r, f in paired]),
            "step_time_ratio_vs_full": _mean_sd(
                [
                    r["step_times"]["mean_s"] / f["step_times"]["mean_s"]
                    for r, f in paired
                    if r.get("step_times") and f.get("step_times")
                ]
            ),
            "reduction_share": _mean_sd([r["reduction_share"] for r in rs]),
            "reduction_seconds": _mean_sd([r["reduction_seconds"] for r in rs]),
            "peak_rss_mb": _mean_sd([r["peak_rss_mb"] for r in rs]),
            "extrapolated": any(r.get("hnn_extrapolated") for r in rs),
        }
        if kind == "causal_lm":
            entry["perplexity"] = _mean_sd([r["eval"]["perplexity"] for r in rs])
        else:
            entry["loss"] = _mean_sd([r["eval"]["loss"] for r in rs])
        if entry["variant"] == "hnn":
            entry["measured_steps"] = [r["hnn_measured_steps"] for r in rs]
            entry["eval_before_truncation"] = [r["eval_before_truncation"] for r in rs]
            entry["lambda"] = [r["hnn"]["lambda"] for r in rs]
        summary[key] = entry
    return summary


def _seeds_text(diffs: list[float], better) -> str:
    good = sum(better(x) for x in diffs)
    return f"better on {good} of {len(diffs)} seeds, paired differences {', '.join(f'{x:+.4f}' for x in diffs)}"


def verdicts(
    kind: str, summary: dict[str, Any], p: dict[str, Any], probe: dict[str, Any] | None, runs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The issue's questions, each with its measured numbers: PASS / MISS against a target, or REPORT.

    Quality comparisons are paired by seed and say on how many seeds they hold ("(within noise)" when the seeds
    disagree). Speed-up verdicts use process CPU time (load-robust; one thread per run, so CPU ≈ wall on an idle
    machine); wall-time figures are quoted next to them.
    """
    out: list[dict[str, Any]] = []
    metric = metric_of(kind)
    lower = metric == "loss"

    def better(x: float) -> bool:
        return x < 0 if lower else x > 0

    def add(target: str, ok: bool | None, detail: str) -> None:
        out.append(
            {"target": target, "verdict": "REPORT" if ok is None else ("PASS" if ok else "MISS"), "detail": detail}
        )

    def diffs(key_a: str, key_b: str) -> list[float]:
        return _paired(runs, key_a, key_b, lambda a, b: a["eval"][metric] - b["eval"][metric])

    full = summary.get("full")
    main_key = f"compressssm@{p['main_tau']:g}"
    ceiling = probe.get("step_speedup_cpu") if probe else None
    if full is None:
        return out
    fq = full[metric][0]
    for tau in p["taus"]:
        key, skey = f"compressssm@{tau:g}", f"scratch@{tau:g}"
        comp = summary.get(key)
        if comp is None:
            continue
        cq = comp[metric][0]
        speed, cpu = comp["speedup_vs_full"][0], comp["cpu_speedup_vs_full"][0]
        sizes = f"mean final size {comp['mean_size'][0]:.1f} (sizes {comp['sizes_final']})"
        if key == main_key and ceiling:
            frac = cpu / ceiling
            add(
                f"τ={tau:g}: end-to-end speed-up ≥ {TARGETS['ceiling_fraction']} of the step-time ceiling",
                frac >= TARGETS["ceiling_fraction"],
                f"speed-up {cpu:.2f}x CPU time ({speed:.2f}x wall) vs ceiling {ceiling:.2f}x (one step at N0 / one at "
                f"{probe['sizes']['compressed']}): ratio {frac:.2f}; {sizes}",
            )
        else:
            add(f"τ={tau:g}: end-to-end speed-up", None, f"{cpu:.2f}x CPU time ({speed:.2f}x wall); {sizes}")
        d = diffs(key, "full")
        if lower:
            rel = cq / fq - 1.0
            ok = rel <= TARGETS["lm_loss_within"]
            detail = f"val loss {cq:.4f} vs full {fq:.4f} ({rel:+.2%}; target within {TARGETS['lm_loss_within']:.0%})"
            target = f"τ={tau:g}: loss within {TARGETS['lm_loss_within']:.0%} of full"
        else:
            points = 100 * (cq - fq)
            ok = points >= -TARGETS["accuracy_within_points"]
            detail = f"accuracy {100 * cq:.2f} % vs full {100 * fq:.2f} % ({points:+.2f} points; target ≥ -1)"
            target = f"τ={tau:g}: accuracy within {TARGETS['accuracy_within_points']:g} point of full"
        add(target, ok, f"{detail}; CompreSSM {_seeds_text(d, better)}")
        scratch = summary.get(skey)
        if scratch is not None:
            d = diffs(key, skey)
            wins = sum(better(x) for x in d)
            mean_better = better(cq - scratch[metric][0])
            plain = (
                "CompreSSM beats small-from-scratch"
                if mean_better and wins == len(d)
                else "CompreSSM does NOT beat small-from-scratch here"
                if not mean_better
                else "CompreSSM ahead on average but not on every seed (within noise)"
            )
            add(
                f"τ={tau:g}: vs small-from-scratch at the same sizes",
                mean_better and wins == len(d),
                f"{plain}: {metric} {cq:.4f} vs scratch {scratch[metric][0]:.4f}; CompreSSM {_seeds_text(d, better)}; "
                f"scratch cost {scratch['total_cpu_seconds'][0]:.0f} s CPU vs CompreSSM "
                f"{comp['total_cpu_seconds'][0]:.0f} s (scratch needs the sizes in advance)",
            )
    main = summary.get(main_key)
    if main is not None:
        for ablation in ("random", "smallest"):
            okey = f"{ablation}@{p['main_tau']:g}"
            other = summary.get(okey)
            if other is None:
                continue
            d = diffs(main_key, okey)
            ok = better(main[metric][0] - other[metric][0])
            add(
                f"largest beats {ablation} (τ={p['main_tau']:g})",
                ok,
                f"{metric}: largest {main[metric][0]:.4f} ± {main[metric][1]:.4f} (mean size {main['mean_size'][0]:.1f})"
                f" vs {ablation} {other[metric][0]:.4f} ± {other[metric][1]:.4f} (mean size "
                f"{other['mean_size'][0]:.1f}); largest {_seeds_text(d, better)}",
            )
            if ok and not all(better(x) for x in d):
                out[-1]["verdict"] += " (within noise)"
        shares = [r["reduction_share"] for r in runs if r["key"] == main_key]
        full_steps = [r["step_times"]["median_s"] for r in runs if r["key"] == "full" and r.get("step_times")]
        cuts = [c["seconds"] for r in runs if r["key"] == main_key for c in r["reductions"]]
        if shares and full_steps and cuts:
            step = statistics.median(full_steps)
            worst = max(cuts) / step
            add(
                f"reductions < {TARGETS['reduction_share']:.0%} of the run, each cut < {TARGETS['cut_in_steps']:g} "
                "steps at N0",
                max(shares) < TARGETS["reduction_share"] and worst < TARGETS["cut_in_steps"],
                f"reductions take {100 * statistics.fmean(shares):.2f} % of the wall time (max {100 * max(shares):.2f} "
                f"%); cuts {min(cuts):.2f}–{max(cuts):.2f} s = up to {worst:.1f} full-size steps "
                f"(median step at N0 {step:.3f} s wall)",
            )
        hkey = f"hnn@{p['main_tau']:g}"
        hnn = summary.get(hkey)
        if hnn is not None:
            wall = _paired(runs, hkey, main_key, lambda a, b: a["total_seconds"] / b["total_seconds"])
            cpu = _paired(runs, hkey, main_key, lambda a, b: a["total_cpu_seconds"] / b["total_cpu_seconds"])
            label = "extrapolated" if hnn["extrapolated"] else "measured"
            if wall:
                add(
                    f"HNN total cost relative to CompreSSM (τ={p['main_tau']:g}; paper ~40x)",
                    None,
                    f"{statistics.fmean(wall):.1f}x wall, {statistics.fmean(cpu):.1f}x CPU time ({label} to "
                    f"{p['steps']} steps from {'/'.join(map(str, hnn['measured_steps']))} measured steps); per-step "
                    f"cost HNN / full {hnn['step_time_ratio_vs_full'][0]:.2f}x (measured)",
                )
    curves = [r["curve"] for r in runs if r["key"] == "full" and r.get("curve")]
    if curves:
        first_cut = p.get("first_cut_step")
        curve = [statistics.fmean(c[i][metric] for c in curves) for i in range(min(map(len, curves)))]
        steps = [pt["step"] for pt in curves[0][: len(curve)]]
        scale = 1.0 if lower else 100.0
        at_cut = next((v for s, v in zip(steps, curve) if first_cut is not None and s >= first_cut), None)
        tail = len(curve) // 4 or 1
        change = curve[-1] - curve[-1 - tail] if len(curve) > tail else float("nan")
        add(
            "full model: learned before the first cut, plateau at the end",
            None,
            "learning curve (mean over seeds) "
            + ", ".join(f"step {s}: {v * scale:.4g}" for s, v in zip(steps, curve))
            + (f"; at the first cut (step {first_cut}): {at_cut * scale:.4g}" if at_cut is not None else "")
            + f"; change over the last quarter of the points: {change * scale:+.4g}",
        )
    if probe is not None:
        target = p.get("ceiling_target")
        share = probe["full"]["scan_share"]
        scan = (
            "scan kernel share not measured (no single scan op: transformers' chunked torch path)"
            if share is None
            else f"scan kernel {100 * share:.0f} % of a step at N0 (Amdahl limit {probe['amdahl_limit']:.2f}x)"
        )
        add(
            f"step-time ceiling ≥ {target:g}x at the final sizes" if target else "step-time ceiling",
            (probe["step_speedup_cpu"] >= target) if target else None,
            f"one step at N0 vs at {probe['sizes']['compressed']}: {probe['step_speedup_cpu']:.2f}x CPU time "
            f"(wall {probe['step_speedup_wall']:.2f}x); at size 1 in every layer {probe['step_speedup_at_size_1_cpu']:.2f}x; "
            f"{scan}; one calibration at N0: "
            + ", ".join(f"{k} batch(es) {v['cpu_s']:.2f} s CPU" for k, v in probe["calibration_at_n0"].items()),
        )
        if cache := probe.get("decode_cache"):
            b = cache["bytes_per_sequence"]
            add(
                "decode-cache memory per sequence: N0 / final sizes",
                None,
                f"{cache['ratio']:.2f}x smaller: {b['full'] / 1024:.1f} KiB at N0 {probe['sizes']['full']} vs "
                f"{b['compressed'] / 1024:.1f} KiB at {probe['sizes']['compressed']} ({cache['dtype']}; conv + "
                "recurrent states of every layer after a one-token forward with use_cache=True)",
            )
        for context, by_size in (probe.get("decode_cache_context") or {}).items():
            full, comp = by_size["full"], by_size["compressed"]
            add(
                f"decode cache per sequence at {int(context)} tokens of context: N0 / final sizes",
                None,
                f"{full['total'] / comp['total']:.2f}x smaller: {full['total'] / 2**20:.2f} MiB at N0 (attention KV "
                f"{full['attention_kv'] / 2**20:.2f} MiB + SSM states {full['ssm_states'] / 2**20:.2f} MiB) vs "
                f"{comp['total'] / 2**20:.2f} MiB at {probe['sizes']['compressed']} (SSM states "
                f"{comp['ssm_states'] / 2**20:.2f} MiB, {full['ssm_states'] / comp['ssm_states']:.2f}x smaller)",
            )
    return out


def _hybrid_model_text(p: dict[str, Any]) -> str:
    """The layer layout, attention and MLP of a hybrid preset (empty for a pure SSM preset)."""
    if p.get("family") != "granitemoehybrid":
        return ""
    mlp = (
        f"MoE of {p['experts']} experts (top {p['experts_per_token']}, width {p['expert_size']}) + shared MLP "
        if p["experts"]
        else "dense shared MLP "
    )
    return (
        f" (layers {p['layer_pattern']}: M = Mamba-2 with heads of {p['head_dim']} channels, {p['n_groups']} "
        f"group(s), chunk {p['chunk_size']}; A = attention with {p['attention_heads']} heads of "
        f"{p['attention_head_dim']} and {p['kv_heads']} KV head(s), NoPE; {mlp}of width {p['shared_mlp_size']})"
    )


def _context_cache_lines(probe: dict[str, Any]) -> list[str]:
    """The table of decode-cache bytes per sequence after a prefill of each measured context length."""
    contexts = probe.get("decode_cache_context")
    if not contexts:
        return []
    lines = [
        "",
        f"Decode cache of one sequence after a prefill of T tokens (batch 1, {probe['decode_cache']['dtype']}; the "
        "cache object the model builds with use_cache=True, summed tensor by tensor; 'other' = its bookkeeping "
        "tensors):",
        "",
        "| T | sizes | attention KV bytes | SSM states bytes (conv + recurrent) | other bytes | total bytes | total MiB "
        "| total vs N0 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for context, by_size in contexts.items():
        for k in ("full", "compressed"):
            b = by_size[k]
            lines.append(
                f"| {int(context)} | {probe['sizes'][k]} | {b['attention_kv']} | {b['ssm_states']} | {b['other']} | "
                f"{b['total']} | {b['total'] / 2**20:.3f} | {b['total'] / by_size['full']['total']:.3f} |"
            )
    return lines


def _fmt(ms: tuple[float, float] | list[float], digits: int = 2, scale: float = 1.0, suffix: str = "") -> str:
    mean, sd = ms
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean * scale:.{digits}f} ± {sd * scale:.{digits}f}{suffix}"


_LABELS = {
    "full": "full (N0)",
    "compressssm": "CompreSSM",
    "scratch": "scratch at CompreSSM sizes",
    "smallest": "CompreSSM, smallest",
    "random": "CompreSSM, random",
    "hnn": "HNN + 1 truncation",
}


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    meta = report["meta"]
    lines = [
        "# CompreSSM benchmark",
        "",
        f"Command: `{meta['command'].strip()}`  ",
        f"Machine: {meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}; "
        f"{meta['threads']} thread(s) per run; measured in {meta['measured_seconds'] / 60:.1f} min of run time in all "
        f"(this sitting {meta['total_seconds'] / 60:.1f} min); load average {meta['load_start']} at the start, "
        f"{meta['load_end']} at the end.  ",
        f"Code: commit {str(meta.get('git_commit'))[:10]}"
        + (f" (uncommitted changes in {', '.join(meta['git_dirty'])})" if meta.get("git_dirty") else "")
        + "; runs measured at commits "
        + ", ".join(f"{str(c)[:10]} ({n} runs)" for c, n in meta.get("run_commits", {}).items())
        + ".  ",
        f"Seeds {meta['seeds']}. Wall times are of `trainer.train()` (reductions included); speed-up = full-size wall "
        "time / variant wall time with the same seed (mean ± sd over seeds). The machine is shared: runs are "
        "interleaved (variant order reversed on odd seeds) so that background load hits every variant alike; CPU "
        "time (process, all threads) is shown as a load-robust cross-check. "
        + ("**QUICK PRESET: tiny settings, numbers are meaningless.**" if meta["quick"] else ""),
        "",
    ]
    if meta.get("missing_runs"):
        lines += [
            f"**PARTIAL: {len(meta['missing_runs'])} of {meta['planned_runs']} planned runs are not measured yet "
            "(rerun the same command to resume); the tables and verdicts below cover the finished runs only.**",
            "",
        ]
    regen = meta.get("report_regenerated")
    if regen:
        lines += [
            f"Tables and verdicts rebuilt on {regen['at']} from the measured runs in `{regen['from']}` with "
            f"`--report_from` (script at commit {str(regen['git_commit'])[:10]}); the measurements were taken "
            "by the command above.",
            "",
        ]
    for task, t in report["tasks"].items():
        p = t["preset"]
        kind = p["task"]
        metric = "val loss (nats/byte)" if kind == "causal_lm" else "test accuracy (%)"
        lines += [
            f"## {task}" + (f" ({kind}, {p['family']})" if task != kind or p["family"] != "mamba" else ""),
            "",
            f"Data: {t['data']}. Evaluation: {t['eval_split']}.  ",
            f"Model: hidden {p['hidden_size']}, {p['num_layers']} layers{_hybrid_model_text(p)}, N0 = "
            f"{p['state_size']}; {p['steps']} "
            f"steps of batch {p['batch_size']}, lr {p['learning_rate']}, cosine, warm-up {p['warmup']}; "
            f"CompreSSM: default score, 4 cuts in the window ({p.get('schedule_start', 0.0):g}, "
            f"{p.get('schedule_end', 0.1):g}] of the steps (first at step {p.get('first_cut_step')}), calibration on "
            "the last "
            f"{p['calibration_batches'] or 'default number of'} training batch(es), τ grid {p['taus']}, ablations "
            "and HNN at "
            f"τ = {p['main_tau']}; scratch at the sizes of τ in "
            f"{p['scratch_taus'] if p['scratch_taus'] is not None else p['taus']}.",
            "",
        ]
        extra = "ppl" if kind == "causal_lm" else "loss"
        lines.append(
            f"| variant | τ | final sizes (per seed) | mean size | {metric} | {extra} | wall s | speed-up | "
            "reduction overhead | CPU s | CPU speed-up | peak RSS MB |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for _key, e in t["summary"].items():
            label = _LABELS[e["variant"]]
            wall = _fmt(e["total_seconds"], 1)
            if e["variant"] == "hnn":
                label += f" ({'/'.join(str(s) for s in e['measured_steps'])} of {p['steps']} steps run)"
                if e["extrapolated"]:
                    wall += " (extrapolated)"
            sizes = "; ".join(str(s) for s in e["sizes_final"])
            if kind == "causal_lm":
                q, x = _fmt(e["loss"], 4), _fmt(e["perplexity"], 3)
            else:
                q, x = _fmt(e["accuracy"], 2, 100), _fmt(e["loss"], 4)
            red = _fmt(e["reduction_share"], 2, 100, " %") if e["variant"] not in ("full", "scratch") else "–"
            tau = "–" if e["tau"] is None else f"{e['tau']:g}"
            lines.append(
                f"| {label} | {tau} | {sizes} | {_fmt(e['mean_size'], 1)} | {q} | {x} | {wall} | "
                f"{_fmt(e['speedup_vs_full'], 2, suffix='x')} | {red} | {_fmt(e['total_cpu_seconds'], 1)} | "
                f"{_fmt(e['cpu_speedup_vs_full'], 2, suffix='x')} | {_fmt(e['peak_rss_mb'], 0)} |"
            )
        hnn = [e for e in t["summary"].values() if e["variant"] == "hnn"]
        for e in hnn:
            before = "; ".join(
                f"{v['loss']:.4f}" + (f" / {100 * v['accuracy']:.2f} %" if "accuracy" in v else "")
                for v in e["eval_before_truncation"]
            )
            lines += [
                "",
                f"HNN: λ = {', '.join(f'{v:.3g}' for v in e['lambda'])} (set at the first step to "
                f"{p['hnn_ratio']} × loss / Σσ); it ran {e['measured_steps']} of {p['steps']} steps, so its "
                f"quality is that of a {'partially' if e['extrapolated'] else 'fully'} trained model (before the "
                f"truncation: {before}), and its total time is "
                f"{'extrapolated from the measured per-step time' if e['extrapolated'] else 'measured'}; "
                f"per-step cost ratio HNN / full (measured): {_fmt(e['step_time_ratio_vs_full'], 2, suffix='x')}.",
            ]
        curves = [(r["key"], r["seed"], r["curve"]) for r in t["runs"] if r.get("curve")]
        if curves:
            scale = 1.0 if kind == "causal_lm" else 100.0
            name = "val loss" if kind == "causal_lm" else "accuracy %"
            steps = [pt["step"] for pt in curves[0][2]]
            lines += [
                "",
                f"Learning curves ({name} on the evaluation split; state sizes after the step in brackets for "
                "CompreSSM):",
                "",
                "| run | seed | " + " | ".join(f"step {s}" for s in steps) + " |",
                "|---|---|" + "---|" * len(steps),
            ]
            for key, seed, curve in sorted(curves, key=lambda c: (c[0], c[1])):
                cells = [
                    f"{pt[metric_of(kind)] * scale:.4g}" + (f" {pt['state_sizes']}" if key != "full" else "")
                    for pt in curve
                ]
                lines.append(f"| {key} | {seed} | " + " | ".join(cells) + " |")
        probe = t.get("probe")
        if probe:
            lines += [
                "",
                "Step-time probe (one training step on a fixed batch, median of interleaved repetitions):",
                "",
                "| sizes | CPU s / step | wall s / step | scan kernel share |",
                "|---|---|---|---|",
            ]
            for k in ("full", "compressed", "min"):
                share = probe[k]["scan_share"]
                lines.append(
                    f"| {probe['sizes'][k]} | {probe[k]['cpu_median_s']:.3f} | {probe[k]['wall_median_s']:.3f} | "
                    + ("n/a" if share is None else f"{100 * share:.0f} %")
                    + " |"
                )
            lines += [
                "",
                "Calibration cost of one reduction at N0 (statistics only, on copies of one batch): "
                + ", ".join(
                    f"{k} batch(es): {v['cpu_s']:.2f} s CPU / {v['wall_s']:.2f} s wall"
                    for k, v in probe["calibration_at_n0"].items()
                )
                + ".",
            ]
            if cache := probe.get("decode_cache"):
                b = cache["bytes_per_sequence"]
                lines += [
                    "",
                    f"Decode cache per sequence (conv + recurrent states, {cache['dtype']}): {b['full']} bytes at N0, "
                    f"{b['compressed']} bytes at {probe['sizes']['compressed']}: **{cache['ratio']:.2f}x smaller**.",
                ]
            lines += _context_cache_lines(probe)
        lines += ["", "Targets:", ""]
        for v in t["verdicts"]:
            lines.append(f"- **{v['verdict']}** {v['target']}: {v['detail']}")
        lines.append("")
    if report.get("failures"):
        lines += (
            ["## Failed runs", ""]
            + [f"- {f['task']} seed {f['seed']} {f['key']}: {f['error'].splitlines()[0]}" for f in report["failures"]]
            + [""]
        )
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    write_text_atomic(path, "\n".join(lines))


def write_plots(out_dir: Path, report: dict[str, Any]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        print("benchmark.py: matplotlib is not installed (pip install matplotlib): no plots written", file=sys.stderr)
        return []
    tasks = list(report["tasks"].items())
    written = []
    styles = {
        "full": ("k", "*"),
        "compressssm": ("C0", "o"),
        "scratch": ("C1", "s"),
        "smallest": ("C3", "v"),
        "random": ("C2", "D"),
        "hnn": ("C4", "X"),
    }
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, (task, t) in zip(axes[0], tasks):
        kind = t["preset"]["task"]
        metric, scale = ("loss", 1.0) if kind == "causal_lm" else ("accuracy", 100.0)
        omitted = []
        for variant in VARIANTS:
            es = [e for e in t["summary"].values() if e["variant"] == variant]
            if variant == "hnn" and any(e["extrapolated"] for e in es):
                omitted = es  # a partially trained model: its quality is not comparable, and it would squash the axis
                es = []
            if not es:
                continue
            if variant == "full":
                ax.axhline(es[0][metric][0] * scale, color="k", linestyle=":", linewidth=0.8)
            es.sort(key=lambda e: e["mean_size"][0])
            color, marker = styles[variant]
            xs = [e["mean_size"][0] for e in es]
            ys = [e[metric][0] * scale for e in es]
            err = [e[metric][1] * scale for e in es]
            label = _LABELS[variant] + (" (partial run)" if variant == "hnn" and es[0]["extrapolated"] else "")
            ax.errorbar(
                xs,
                ys,
                yerr=err,
                color=color,
                marker=marker,
                linestyle="-" if len(es) > 1 else "none",
                capsize=3,
                label=label,
            )
            if variant == "compressssm":
                for e, x, y in zip(es, xs, ys):
                    ax.annotate(f"τ={e['tau']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("mean final state size per layer")
        ax.set_ylabel("validation loss (nats/byte)" if kind == "causal_lm" else "test accuracy (%)")
        title = task
        if omitted:
            q = ", ".join(f"{e[metric][0] * scale:.3g}" for e in omitted)
            title += f"\n(HNN not shown: partial run of {omitted[0]['measured_steps'][0]} steps, {metric} {q})"
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "benchmark_quality_vs_size.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))

    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), squeeze=False)
    for ax, (task, t) in zip(axes[0], tasks):
        entries = list(t["summary"].items())
        xs = np.arange(len(entries))
        width = 0.4
        for offset, field_, alpha, what in (
            (-width / 2, "total_seconds", 1.0, "wall"),
            (width / 2, "total_cpu_seconds", 0.45, "CPU"),
        ):
            means = [e[field_][0] for _, e in entries]
            sds = [e[field_][1] for _, e in entries]
            colors = [styles[e["variant"]][0] for _, e in entries]
            bars = ax.bar(
                xs + offset,
                means,
                width=width,
                yerr=sds,
                color=colors,
                alpha=alpha,
                capsize=2,
                label=f"{what} time (mean ± sd over seeds)",
            )
            ratio_field = "speedup_vs_full" if what == "wall" else "cpu_speedup_vs_full"
            for bar, sd, (_, e) in zip(bars, sds, entries):
                if e["extrapolated"]:
                    bar.set_hatch("//")
                ratio = e[ratio_field][0]
                if not math.isnan(ratio):
                    ax.annotate(
                        f"{ratio:.2f}x",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height() + sd),
                        textcoords="offset points",
                        xytext=(0, 2),
                        ha="center",
                        va="bottom",
                        fontsize=6,
                        rotation=90,
                    )
                red = e["reduction_seconds"][0]
                if what == "wall" and red > 0 and e["variant"] != "hnn":
                    ax.bar(bar.get_x() + bar.get_width() / 2, red, width=width, color="k", alpha=0.6)
        ax.set_xticks(xs)
        ax.set_xticklabels([k for k, _ in entries], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("training time (s), log scale")
        ax.set_yscale("log")
        ax.set_ylim(top=ax.get_ylim()[1] * 3)
        ax.set_title(
            f"{task}: time per variant; labels = speed-up vs full (same seed)\n"
            "hatched = extrapolated (HNN, first seed only); black = reductions",
            fontsize=8,
        )
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = out_dir / "benchmark_time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))
    return written


def finish_report(report: dict[str, Any], out_dir: Path, plots: bool = True) -> None:
    """Aggregates and verdicts from the runs and probes in ``report``; write JSON, Markdown and plots."""
    for t in report["tasks"].values():
        kind = t["preset"]["task"]
        t["summary"] = aggregate(kind, t["runs"])
        t["verdicts"] = verdicts(kind, t["summary"], t["preset"], t.get("probe"), t["runs"])
    report["notes"] = list(NOTES) + list(report["meta"].get("notes_extra", []))
    write_json_atomic(out_dir / "benchmark.json", report)
    write_markdown(out_dir / "benchmark.md", report)
    if plots:
        write_plots(out_dir, report)
    print(f"wrote {out_dir / 'benchmark.json'}, {out_dir / 'benchmark.md'}", flush=True)
    for task, t in report["tasks"].items():
        for v in t["verdicts"]:
            print(f"  {task}: {v['verdict']} {v['target']}: {v['detail']}", flush=True)
