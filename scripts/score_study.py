#!/usr/bin/env python
"""Which state-importance score should CompreSSM use? Measured on a memory task where the state matters.

    python scripts/score_study.py            # default preset: ~25 min on 2 contended CPU cores
    python scripts/score_study.py --quick    # seconds: a smoke test of every part (numbers meaningless)
    python scripts/score_study.py --parts cuts --set task='"mqar"' --set vocab_size=33 ...   # any preset field

The default task is selective copying (8 data tokens from 8 symbols among 32 noise tokens, reproduce them in
order) with a narrow Mamba (hidden 16, 2 layers): there accuracy grows with the state size N, and a run of 1000
steps takes 15-40 s on one core. Multi-query associative recall is available (``--set task='"mqar"'``), but on
this budget (≤ ~1500 steps) the models did not learn key-value binding at any N tried (they learned
shortcuts: answering by elimination, or per-channel memory with small key vocabularies), so N did not matter.

Parts (accuracy on the scored positions of a fixed validation set):

* ``curve``: models trained from scratch at each state size N (the state-size curve), several seeds.
* ``cuts``: trained full-size models are cut once to k of N states per layer by each score (``h2``, ``hankel``)
  with ``largest`` selection, by the measured reference ``scan_energy`` (`hf_compressssm.compression.scan_reference`), and by the
  ablations ``smallest`` and ``random`` (several seeds); accuracy right after the cut and after a fixed short
  recovery (fresh AdamW, constant learning rate).
* ``tau``: the final state sizes that each τ gives in training (only the first 10 % of a run is trained: it holds
  every cut), per score and start size.
* ``protocol``: the in-training protocol (`CompreSSMCallback`, tolerance mode, 4 cuts in the first 10 % of the
  steps, default τ chosen from the ``tau`` part to reach about ``protocol_target_size``) vs the full-size model vs
  a model trained from scratch with ``state_sizes`` = the compressed model's final per-layer sizes, and the same
  protocol with random selection; several seeds, paired by seed.

Writes ``<out>.json`` (every number, every setting) and ``<out>.md`` (tables). Default out:
``scripts/results/score_study`` (``--quick`` writes to a temporary folder unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any


# The CPU scan's numba thread pool is set before numba is imported. On a small, shared machine one thread per
# process was far faster (a training step of the default model: ~0.07 s with 1 thread vs ~1-2 s with 2 busy-waiting
# threads under load); override by exporting NUMBA_NUM_THREADS.
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from compressssm_app.evaluation import evaluate_quality  # noqa: E402
from compressssm_app.experiment import train_and_measure, training_arguments  # noqa: E402
from compressssm_app.hf_datasets import synthetic_dataset  # noqa: E402
from compressssm_app.presets import load_preset, preset_into, preset_names  # noqa: E402
from compressssm_app.sources import synthetic_task  # noqa: E402
from hf_compressssm import CompreSSMCallback, CompreSSMMambaConfig, CompreSSMMambaForCausalLM  # noqa: E402
from hf_compressssm.compression.arguments import CompressionArguments  # noqa: E402
from hf_compressssm.compression.calibration import collect_statistics  # noqa: E402
from hf_compressssm.compression.mamba_scores import selective_state_scores  # noqa: E402
from hf_compressssm.compression.ranks import select_indices  # noqa: E402
from hf_compressssm.compression.reduction import compress_model  # noqa: E402
from hf_compressssm.compression.scan_reference import scan_energy_scores  # noqa: E402
from hf_compressssm.compression.surgery import shrink_mixers  # noqa: E402


RESULTS_DIR = Path(__file__).resolve().parent / "results"
PARTS = ("curve", "cuts", "tau", "protocol")


@dataclass
class Preset:
    # task: "selective_copying" (num_items data tokens among seq_len noise tokens, vocab_size data symbols) or
    # "mqar" (num_items key-value pairs, num_queries queries, vocab_size token ids in all)
    task: str = "selective_copying"
    seq_len: int = 32
    vocab_size: int = 8
    num_items: int = 8
    num_queries: int | None = None
    eval_samples: int = 500
    # model
    hidden_size: int = 16
    num_layers: int = 2
    full_state_size: int = 64
    # training (the same recipe for every run from scratch)
    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 5e-3
    weight_decay: float = 0.0
    warmup: float = 0.05
    # part curve
    curve_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    curve_seeds: int = 3
    # part cuts: each of `cut_bases` full-size models (seeds 0, 1, ...) is cut once to each k
    cut_bases: int = 2
    cut_sizes: list[int] = field(default_factory=lambda: [32, 16, 8, 4])
    random_seeds: int = 4
    recovery_steps: int = 200
    recovery_learning_rate: float = 1e-3
    cut_calibration_batches: int = 4
    reference_score: bool = True  # also cut by the per-state output energy measured from the real scan
    # part tau: final sizes per score and tau (only the first 10 % of a run, which holds every cut)
    tau_values: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3])
    tau_scores: list[str] = field(default_factory=lambda: ["h2", "hankel"])
    tau_start_sizes: list[int] = field(default_factory=lambda: [64, 128])
    # part protocol: tolerance mode, 4 cuts in the first 10 %, with the default score; tau is either a number or
    # "auto" = the tau of the sweep (start N = full_state_size) whose final mean size is closest to target_size
    protocol_seeds: int = 5
    protocol_score: str = "h2"
    protocol_tau: float | str = "auto"
    protocol_target_size: float = 8.0
    protocol_random: bool = True  # also the same protocol with selection="random"
    calibration_batches: int = 4
    threads: int = 1


# configs/presets/score_study/<name>.yaml: the fields a preset sets (the others keep the defaults above)
PRESETS = {
    name: preset_into(Preset, load_preset("score_study", name), f"configs/presets/score_study/{name}.yaml")
    for name in preset_names("score_study")
}


# ----------------------------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------------------------
def task_kwargs(p: Preset) -> dict[str, Any]:
    if p.task == "mqar":
        queries = p.num_queries if p.num_queries is not None else p.num_items
        return dict(seq_len=p.seq_len, vocab_size=p.vocab_size, num_pairs=p.num_items, num_queries=queries)
    if p.task == "selective_copying":
        return dict(seq_len=p.seq_len, vocab_size=p.vocab_size, num_tokens=p.num_items)
    raise ValueError(f"unknown task {p.task!r}")


def train_set(p: Preset, seed: int, steps: int):
    return synthetic_dataset(p.task, "train", seed=seed, num_samples=max(1, steps) * p.batch_size, **task_kwargs(p))


def eval_set(p: Preset):
    return synthetic_dataset(p.task, "validation", seed=0, num_samples=p.eval_samples, **task_kwargs(p))


def model_vocab_size(p: Preset) -> int:
    return synthetic_task(p.task, "validation", num_samples=1, **task_kwargs(p)).model_vocab_size


def new_model(p: Preset, seed: int, state_sizes: list[int] | None = None) -> CompreSSMMambaForCausalLM:
    largest = max(state_sizes) if state_sizes else p.full_state_size
    config = CompreSSMMambaConfig(
        vocab_size=model_vocab_size(p),
        hidden_size=p.hidden_size,
        num_hidden_layers=p.num_layers,
        state_size=largest,
        state_sizes=list(state_sizes) if state_sizes else None,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
    )
    torch.manual_seed(seed)
    return CompreSSMMambaForCausalLM(config)


def state_sizes(model) -> list[int]:
    return list(model.config.state_sizes)


def accuracy(model, dataset, batch_size: int = 100) -> float:
    """Accuracy on the scored positions of ``dataset`` (`evaluate_quality`)."""
    return evaluate_quality(model, dataset, "synthetic", batch_size)["accuracy"]


def train(
    model,
    p: Preset,
    dataset,
    steps: int,
    seed: int,
    learning_rate: float | None = None,
    schedule: str = "cosine",
    warmup: float | None = None,
    callbacks: list | None = None,
    stop_after: int | None = None,
):
    """Train ``model`` in place with the HF Trainer (AdamW, `train_and_measure`); returns (model, wall seconds)."""
    with tempfile.TemporaryDirectory() as out:
        args = training_arguments(
            out,
            steps=steps,
            batch_size=p.batch_size,
            learning_rate=learning_rate if learning_rate is not None else p.learning_rate,
            seed=seed,
            schedule=schedule,
            warmup=p.warmup if warmup is None else warmup,
            weight_decay=p.weight_decay,
        )
        run = train_and_measure(model, dataset, args, callbacks=list(callbacks or []), stop_after=stop_after)
    return run.model, run.train_seconds


def calibration_batches(p: Preset, count: int, seed: int = 12345) -> list[dict[str, torch.Tensor]]:
    ds = synthetic_dataset(p.task, "test", seed=seed, num_samples=count * p.batch_size, **task_kwargs(p))
    return [
        {"input_ids": torch.stack([ds[i]["input_ids"] for i in range(b * p.batch_size, (b + 1) * p.batch_size)])}
        for b in range(count)
    ]


def cut_to(model, k: int, batches, score: str, selection: str, seed: int = 0):
    """Cut every layer of ``model`` to exactly ``k`` states (or fewer if a layer has fewer) in place."""
    report = compress_model(
        model,
        batches,
        target_sizes=[k] * len(state_sizes(model)),
        score=score,
        selection=selection,
        compression_seed=seed,
        calibration_batches=len(batches),
    )
    if any(s != min(k, n) for s, n in zip(report.sizes_after, report.sizes_before)):
        raise RuntimeError(f"cut to {k} states gave sizes {report.sizes_after}")
    return report


def cut_by_scan_energy(model, k: int, batches) -> list[list[int]]:
    """Cut every layer to its ``k`` states of largest measured output energy (`scan_energy_scores`)."""
    kept = {i: select_indices(scores, k, "largest") for i, scores in enumerate(scan_energy_scores(model, batches))}
    shrink_mixers(model, kept)
    return [v.tolist() for _, v in sorted(kept.items())]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": list(values),
    }


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# parts
# ----------------------------------------------------------------------------------------------------------------
def train_from_scratch(p: Preset, seed: int, sizes: list[int] | None = None, callbacks=None, stop_after=None):
    model = new_model(p, seed=seed, state_sizes=sizes)
    return train(model, p, train_set(p, seed, p.steps), p.steps, seed=seed, callbacks=callbacks, stop_after=stop_after)


def part_curve(p: Preset, ev, results: dict, keep: dict) -> None:
    rows = []
    for n in sorted(set(p.curve_sizes) | {p.full_state_size}):
        for seed in range(p.curve_seeds):
            model, seconds = train_from_scratch(p, seed, [n] * p.num_layers)
            acc = accuracy(model, ev)
            rows.append({"state_size": n, "seed": seed, "accuracy": acc, "train_seconds": seconds})
            _log(f"curve N={n} seed {seed}: accuracy {acc:.4f} ({seconds:.0f}s)")
            if n == p.full_state_size:
                keep.setdefault("full", {})[seed] = (model, acc, seconds)
    summary = []
    for n in sorted({r["state_size"] for r in rows}):
        sel = [r for r in rows if r["state_size"] == n]
        summary.append(
            {
                "state_size": n,
                "accuracy": summarize([r["accuracy"] for r in sel]),
                "train_seconds": statistics.fmean(r["train_seconds"] for r in sel),
            }
        )
    results["curve"] = {"rows": rows, "summary": summary}


def _full_model(p: Preset, ev, keep: dict, seed: int):
    """The full-size model trained from scratch with ``seed`` (shared by the parts; trained once)."""
    full = keep.setdefault("full", {})
    if seed not in full:
        model, seconds = train_from_scratch(p, seed)
        full[seed] = (model, accuracy(model, ev), seconds)
        _log(f"full size N={p.full_state_size} seed {seed}: accuracy {full[seed][1]:.4f} ({seconds:.0f}s)")
    return full[seed]


def _cut_methods(p: Preset) -> list[tuple[str, str, str, int]]:
    """(label, score, selection, seed) of every cut."""
    methods = [("h2", "h2", "largest", 0), ("hankel", "hankel", "largest", 0)]
    if p.reference_score:
        methods.append(("scan_energy", "scan_energy", "largest", 0))
    methods += [("smallest(h2)", "h2", "smallest", 0), ("smallest(hankel)", "hankel", "smallest", 0)]
    methods += [(f"random#{s}", "h2", "random", s) for s in range(p.random_seeds)]
    return methods


def part_cuts(p: Preset, ev, results: dict, keep: dict) -> None:
    batches = calibration_batches(p, p.cut_calibration_batches)
    rows, bases = [], []
    for base_seed in range(p.cut_bases):
        base, base_acc, _ = _full_model(p, ev, keep, base_seed)
        # how well the closed-form scores rank the states against the measured output energy of the real scan
        stats = collect_statistics(base, batches)
        measured = scan_energy_scores(base, batches)
        agreement = {
            score: [spearman(selective_state_scores(st, score), m) for st, m in zip(stats, measured)]
            for score in ("h2", "hankel")
        }
        bases.append({"seed": base_seed, "accuracy": base_acc, "spearman_vs_scan_energy": agreement})
        for k in p.cut_sizes:
            for label, score, selection, seed in _cut_methods(p):
                model = copy.deepcopy(base)
                if score == "scan_energy":
                    kept = cut_by_scan_energy(model, k, batches)
                else:
                    kept = [d.kept for d in cut_to(model, k, batches, score, selection, seed).layers]
                after_cut = accuracy(model, ev)
                model, seconds = train(
                    model,
                    p,
                    train_set(p, 100 + seed, p.recovery_steps),
                    p.recovery_steps,
                    seed=100 + seed,
                    learning_rate=p.recovery_learning_rate,
                    schedule="constant",
                    warmup=0,
                )
                recovered = accuracy(model, ev)
                rows.append(
                    {
                        "base_seed": base_seed,
                        "k": k,
                        "method": label,
                        "score": score,
                        "selection": selection,
                        "seed": seed,
                        "accuracy_after_cut": after_cut,
                        "accuracy_after_recovery": recovered,
                        "kept": kept,
                        "recovery_seconds": seconds,
                    }
                )
                _log(
                    f"base {base_seed} cut k={k} {label}: after cut {after_cut:.4f}, after {p.recovery_steps} steps "
                    f"{recovered:.4f}"
                )
    results["cuts"] = {"bases": bases, "rows": rows, "summary": _cut_summary(rows)}


def _cut_summary(rows: list[dict]) -> list[dict]:
    """Per (base, k, method): random pooled over its seeds. Plus base 'all': every base pooled."""

    def group(method: str) -> str:
        return "random" if method.startswith("random#") else method

    out = []
    base_ids = sorted({r["base_seed"] for r in rows})
    for k in sorted({r["k"] for r in rows}, reverse=True):
        labels = list(dict.fromkeys(group(r["method"]) for r in rows if r["k"] == k))
        for lab in labels:
            for base in base_ids + ["all"]:
                sel = [
                    r
                    for r in rows
                    if r["k"] == k and group(r["method"]) == lab and (base == "all" or r["base_seed"] == base)
                ]
                out.append(
                    {
                        "base_seed": base,
                        "k": k,
                        "method": lab,
                        "after_cut": summarize([r["accuracy_after_cut"] for r in sel]),
                        "after_recovery": summarize([r["accuracy_after_recovery"] for r in sel]),
                    }
                )
    return out


def part_tau(p: Preset, ev, results: dict, keep: dict) -> None:
    rows = []
    for start in p.tau_start_sizes:
        q = replace(p, full_state_size=start)
        for score in p.tau_scores:
            for tau in p.tau_values:
                cargs = CompressionArguments(tau=tau, score=score, calibration_batches=p.calibration_batches)
                last = cargs.schedule(p.steps)[-1]
                model, seconds = train_from_scratch(q, 0, callbacks=[CompreSSMCallback(cargs)], stop_after=last)
                sizes = state_sizes(model)
                rows.append(
                    {
                        "start_size": start,
                        "score": score,
                        "tau": tau,
                        "final_sizes": sizes,
                        "final_mean_size": sum(sizes) / len(sizes),
                        "history": [h["sizes_after"] for h in model.compression_history],
                        "seconds": seconds,
                    }
                )
                _log(f"tau {tau} score {score} N={start}: sizes {rows[-1]['history']}")
    results["tau"] = {"trained": f"first {last} of {p.steps} steps (every cut), seed 0", "rows": rows}


def choose_protocol_tau(p: Preset, results: dict) -> float:
    if p.protocol_tau != "auto":
        return float(p.protocol_tau)
    rows = [
        r
        for r in results.get("tau", {}).get("rows", [])
        if r["score"] == p.protocol_score and r["start_size"] == p.full_state_size
    ]
    if not rows:
        return CompressionArguments().tau
    return min(rows, key=lambda r: (abs(r["final_mean_size"] - p.protocol_target_size), r["tau"]))["tau"]


def part_protocol(p: Preset, ev, results: dict, keep: dict) -> None:
    tau = choose_protocol_tau(p, results)
    variants = [("largest", p.protocol_score)] + ([("random", p.protocol_score)] if p.protocol_random else [])
    runs = []
    for seed in range(p.protocol_seeds):
        _, full_acc, full_seconds = _full_model(p, ev, keep, seed)
        row: dict[str, Any] = {"seed": seed, "full_accuracy": full_acc, "full_seconds": full_seconds}
        for selection, score in variants:
            cargs = CompressionArguments(
                tau=tau,
                score=score,
                selection=selection,
                compression_seed=seed,
                calibration_batches=p.calibration_batches,
            )
            model, seconds = train_from_scratch(p, seed, callbacks=[CompreSSMCallback(cargs)])
            key = "compressed" if selection == "largest" else "compressed_random"
            row[f"{key}_accuracy"], row[f"{key}_seconds"] = accuracy(model, ev), seconds
            row[f"{key}_sizes"] = state_sizes(model)
            row[f"{key}_history"] = [h["sizes_after"] for h in model.compression_history]
        small, seconds = train_from_scratch(p, seed, row["compressed_sizes"])
        row["small_accuracy"], row["small_seconds"] = accuracy(small, ev), seconds
        runs.append(row)
        _log(
            f"protocol seed {seed} (tau {tau}): full {full_acc:.4f}, CompreSSM {row['compressed_accuracy']:.4f} at "
            f"{row['compressed_sizes']}, small-from-scratch {row['small_accuracy']:.4f}"
            + (
                f", random selection {row['compressed_random_accuracy']:.4f} at {row['compressed_random_sizes']}"
                if p.protocol_random
                else ""
            )
        )
    keys = [
        "full_accuracy",
        "compressed_accuracy",
        "small_accuracy",
        "full_seconds",
        "compressed_seconds",
        "small_seconds",
    ]
    if p.protocol_random:
        keys += ["compressed_random_accuracy", "compressed_random_seconds"]
    summary = {key: summarize([r[key] for r in runs]) for key in keys}
    summary["compressed_mean_size"] = summarize([statistics.fmean(r["compressed_sizes"]) for r in runs])
    if p.protocol_random:
        summary["compressed_random_mean_size"] = summarize(
            [statistics.fmean(r["compressed_random_sizes"]) for r in runs]
        )
    summary["compressed_minus_small"] = summarize([r["compressed_accuracy"] - r["small_accuracy"] for r in runs])
    summary["compressed_minus_full"] = summarize([r["compressed_accuracy"] - r["full_accuracy"] for r in runs])
    results["protocol"] = {
        "tau": tau,
        "tau_rule": "auto" if p.protocol_tau == "auto" else "fixed",
        "score": p.protocol_score,
        "runs": runs,
        "summary": summary,
    }


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------
def _pm(s: dict) -> str:
    if s["n"] > 1:
        return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"
    return f"{100 * s['mean']:.1f}"


def task_description(p: dict) -> str:
    if p["task"] == "mqar":
        queries = p["num_queries"] if p["num_queries"] is not None else p["num_items"]
        chance = 1.0 / ((p["vocab_size"] - 1) // 2)
        return (
            f"multi-query associative recall (seq_len {p['seq_len']}, {p['vocab_size']} token ids, "
            f"{p['num_items']} pairs, {queries} queries); chance {100 * chance:.1f} %"
        )
    return (
        f"selective copying ({p['num_items']} data tokens from {p['vocab_size']} symbols at random positions "
        f"among {p['seq_len']} noise tokens, then reproduce them in order); chance {100 / p['vocab_size']:.1f} %"
    )


def markdown(results: dict) -> str:
    p = results["preset"]
    lines = [
        "# Score study",
        "",
        f"Task: {task_description(p)}. Metric: accuracy (%) on the scored positions of {p['eval_samples']} "
        f"validation sequences. Model: Mamba-1, hidden {p['hidden_size']}, {p['num_layers']} layers. Every run "
        f"from scratch: {p['steps']} AdamW steps, batch {p['batch_size']}, lr {p['learning_rate']} cosine, warm-up "
        f"{p['warmup']}, weight decay {p['weight_decay']}. Preset `{results['preset_name']}`"
        + (f" with overrides {results['overrides']}" if results["overrides"] else "")
        + f"; {results['total_seconds'] / 60:.1f} min on {results['machine']}. mean ± std over seeds.",
        "",
    ]
    if "curve" in results:
        lines += [
            f"## State-size curve (trained from scratch, {p['curve_seeds']} seed(s))",
            "",
            "| N (every layer) | accuracy % | train s |",
            "|---|---|---|",
        ]
        lines += [
            f"| {s['state_size']} | {_pm(s['accuracy'])} | {s['train_seconds']:.0f} |"
            for s in results["curve"]["summary"]
        ]
        lines.append("")
    if "cuts" in results:
        c = results["cuts"]
        bases = c["bases"]
        agree = "; ".join(
            f"base {b['seed']}: "
            + ", ".join(
                f"{k} " + "/".join(f"{v:.2f}" for v in vals) for k, vals in b["spearman_vs_scan_energy"].items()
            )
            for b in bases
        )
        names = " / ".join(f"base {b['seed']}" for b in bases)
        lines += [
            f"## One cut of a trained N={p['full_state_size']} model to k states per layer",
            "",
            f"{len(bases)} full-size models trained from scratch (seeds {[b['seed'] for b in bases]}; accuracy "
            + " / ".join(f"{100 * b['accuracy']:.1f} %" for b in bases)
            + f" before the cut). Accuracy right after the cut, and after {p['recovery_steps']} recovery steps "
            f"(fresh AdamW, constant lr {p['recovery_learning_rate']}); cells: {names}. random: mean ± std over "
            f"{p['random_seeds']} seeds per base. smallest(x): keep the lowest-scoring states of score x. "
            "scan_energy: per-state output energy measured from the real scan (a slow reference, "
            f"`hf_compressssm.compression.scan_reference`). Spearman rank correlation of the closed-form scores with scan_energy "
            f"(layer 0/layer 1): {agree}.",
            "",
            "| k | method | after cut % | after recovery % |",
            "|---|---|---|---|",
        ]
        by_key: dict[tuple, list[dict]] = {}
        for s in c["summary"]:
            if s["base_seed"] != "all":
                by_key.setdefault((s["k"], s["method"]), []).append(s)
        for (k, method), group in by_key.items():
            lines.append(
                f"| {k} | {method} | "
                + " / ".join(_pm(s["after_cut"]) for s in group)
                + " | "
                + " / ".join(_pm(s["after_recovery"]) for s in group)
                + " |"
            )
        lines.append("")
    if "tau" in results:
        t = results["tau"]
        lines += [
            f"## Final state sizes per τ (the 4 in-training cuts; {t['trained']})",
            "",
            "| start N | score | τ | sizes after each cut | final mean N |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['start_size']} | {r['score']} | {r['tau']} | "
            f"{' → '.join(str(h) for h in r['history'])} | {r['final_mean_size']:.1f} |"
            for r in t["rows"]
        ]
        lines.append("")
    if "protocol" in results:
        pr = results["protocol"]
        s = pr["summary"]
        rule = (
            f"τ={pr['tau']} (auto: the sweep's τ closest to mean size {p['protocol_target_size']})"
            if pr["tau_rule"] == "auto"
            else f"τ={pr['tau']}"
        )
        lines += [
            f"## In-training protocol: CompreSSMCallback, tolerance mode, score {pr['score']}, {rule}, 4 cuts in "
            f"the first 10 %; {len(pr['runs'])} seeds",
            "",
            "| run | accuracy % | mean final N | train s |",
            "|---|---|---|---|",
            f"| full size | {_pm(s['full_accuracy'])} | {p['full_state_size']} | {s['full_seconds']['mean']:.0f} |",
            f"| CompreSSM ({pr['score']}, largest) | {_pm(s['compressed_accuracy'])} | "
            f"{s['compressed_mean_size']['mean']:.1f} | {s['compressed_seconds']['mean']:.0f} |",
        ]
        if "compressed_random_accuracy" in s:
            lines.append(
                f"| CompreSSM, random selection (same τ) | {_pm(s['compressed_random_accuracy'])} | "
                f"{s['compressed_random_mean_size']['mean']:.1f} | "
                f"{s['compressed_random_seconds']['mean']:.0f} |"
            )
        lines += [
            f"| small from scratch at CompreSSM's final sizes | {_pm(s['small_accuracy'])} | "
            f"{s['compressed_mean_size']['mean']:.1f} | {s['small_seconds']['mean']:.0f} |",
            "",
            f"Paired by seed, in points: CompreSSM − small-from-scratch {_pm(s['compressed_minus_small'])}; "
            f"CompreSSM − full size {_pm(s['compressed_minus_full'])}.",
            "",
            "| seed | CompreSSM sizes | full % | CompreSSM % | small % |"
            + (" random-selection sizes | random-selection % |" if "compressed_random_accuracy" in s else ""),
            "|---|---|---|---|---|" + ("---|---|" if "compressed_random_accuracy" in s else ""),
        ]
        for r in pr["runs"]:
            line = (
                f"| {r['seed']} | {r['compressed_sizes']} | {100 * r['full_accuracy']:.1f} | "
                f"{100 * r['compressed_accuracy']:.1f} | {100 * r['small_accuracy']:.1f} |"
            )
            if "compressed_random_accuracy" in r:
                line += f" {r['compressed_random_sizes']} | {100 * r['compressed_random_accuracy']:.1f} |"
            lines.append(line)
        lines.append("")
    if results.get("part_seconds"):
        lines += ["Part wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["part_seconds"].items()), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke test (seconds; numbers meaningless)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--out", default=None, help="output path without extension (writes .json and .md)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="override a preset field, e.g. --set steps=500 --set 'cut_sizes=[8,4]'",
    )
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    ns = parse_args(argv)
    parts = [x.strip() for x in ns.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; choose from {PARTS}")
    name = "quick" if ns.quick else "default"
    overrides = {}
    for item in ns.set:
        key, _, value = item.partition("=")
        if key not in Preset.__dataclass_fields__:
            raise SystemExit(f"unknown preset field {key!r}; fields: {sorted(Preset.__dataclass_fields__)}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    preset = replace(PRESETS[name], **overrides)
    if ns.out is not None:
        out = Path(ns.out)
    elif ns.quick:
        out = Path(tempfile.mkdtemp(prefix="score_study_")) / "score_study_quick"
    else:
        out = RESULTS_DIR / "score_study"
    out.parent.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(preset.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("hf_compressssm").setLevel(logging.ERROR)  # the script logs every cut itself
    results: dict[str, Any] = {
        "preset_name": name,
        "preset": asdict(preset),
        "overrides": overrides,
        "parts": parts,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{preset.threads} torch thread(s), NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS')}",
    }
    ev = eval_set(preset)
    keep: dict[str, Any] = {}
    functions = {"curve": part_curve, "cuts": part_cuts, "tau": part_tau, "protocol": part_protocol}
    results["part_seconds"] = {}
    start = time.perf_counter()
    for part in PARTS:
        if part in parts:
            t0 = time.perf_counter()
            functions[part](preset, ev, results, keep)
            results["part_seconds"][part] = time.perf_counter() - t0
    results["total_seconds"] = time.perf_counter() - start
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(markdown(results))
    _log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({results['total_seconds'] / 60:.1f} min)")
    return results


if __name__ == "__main__":
    main()
