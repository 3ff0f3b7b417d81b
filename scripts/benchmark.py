#!/usr/bin/env python
"""Benchmark CompreSSM against its baselines, as measured ratios (issue 7; claims in docs/method.md §6).

    python scripts/benchmark.py                 # default preset, both tasks, 2 seeds (~45 min on 2 contended cores)
    python scripts/benchmark.py --quick         # every variant of a tiny setting (a few minutes; numbers meaningless)
    python scripts/benchmark.py --tasks causal_lm --seeds 0 --taus 0.1,0.2 --set causal_lm.steps=200

For each task (causal LM on the KJV text, byte level; pixel-sequence classification on Fashion-MNIST) and seed, with
the same data, steps, learning-rate schedule and seed (initialisation and data order) for every variant:

1. ``full``            training at the initial state size N0 (128) in every layer;
2. ``compressssm``     the same run with `CompreSSMCallback` (tolerance mode, default score, 4 cuts in the first
                       10 % of the steps) at each τ of a grid;
3. ``scratch``         the same architecture trained from scratch with ``state_sizes`` = the final per-layer sizes
                       of the same seed's CompreSSM run at that τ;
4. ``smallest`` / ``random``  CompreSSM with the ablation selections at the main τ;
5. ``hnn``             Hankel-nuclear-norm regularised training (`hf_compressssm.compression.hnn.HNNTrainer`: λ·Σσ added to the
                       loss at every step, full size throughout), then one truncation with `compress_model` at the
                       main τ. Its per-step cost is several times a plain step, so by default it runs only the first
                       ``hnn_steps`` steps (with the full run's learning-rate schedule) and its total cost is
                       **extrapolated** to all steps (labelled as such everywhere); the measured per-step cost ratio
                       to the full run is reported too.

Measured per run: wall time of ``trainer.train()`` (the reductions included; their own time is reported separately
as a share of the run), process CPU time, final per-layer state sizes, validation loss / perplexity (LM, on the first
``eval_blocks`` blocks of the fixed validation split) or test accuracy (classification, on the first ``eval_samples``
images of the official test split), peak resident memory (``ru_maxrss`` of the run's own process: every run is a
child process forked from a parent that has imported torch/transformers but never trained), and per-step times.
A step-time probe per task times one training step at N0 and at the compressed sizes on a fixed batch and profiles
the share of the selective-scan kernel in a step: the ceiling that non-scan work puts on any speed-up.

Wall times on a shared machine are noisy: runs of different variants are interleaved (the task loop is inside the
seed loop and the variant order is reversed for odd seeds), every run uses ``--threads`` threads (default 1:
on 2 contended cores one thread was both faster and steadier than two), and CPU time is reported next to wall time.

Writes ``benchmark.json`` (every run, every setting, aggregates, verdicts), ``benchmark.md`` (tables) and
``benchmark_quality_vs_size.png`` / ``benchmark_time.png`` into ``--output_dir`` (default: ``scripts/results``;
``--quick`` defaults to ``scripts/results/quick``). A partial JSON is written after every run; ``--resume`` reuses
the runs it holds (same settings) after an interruption.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


RESULTS_DIR = Path(__file__).resolve().parent / "results"
TASKS = ("causal_lm", "pixel_classification")
VARIANTS = ("full", "compressssm", "scratch", "smallest", "random", "hnn")


# ----------------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TaskPreset:
    """Everything one task's runs share. ``taus``: the CompreSSM grid; ``main_tau``: the τ of the ablations and HNN."""

    # model
    hidden_size: int = 64
    num_layers: int = 2
    state_size: int = 128
    # data
    block_size: int = 256  # causal_lm: tokens per sequence
    eval_blocks: int = 200  # causal_lm: first blocks of the fixed validation split
    dataset: str = "fashion_mnist"  # pixel_classification
    pool: int = 2  # pixel_classification: k x k mean pooling of the 28x28 images (sequence length (28/k)^2)
    num_bins: int = 256  # pixel_classification: pixel quantisation levels
    train_samples: int | None = None  # pixel_classification: first images of the training split (None: all)
    eval_samples: int = 2000  # pixel_classification: first images of the official test split
    # training (identical for every variant)
    steps: int = 300
    batch_size: int = 8
    learning_rate: float = 3e-3
    warmup: float = 0.05
    weight_decay: float = 0.01
    eval_batch_size: int = 32
    # variants
    taus: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])
    main_tau: float = 0.1
    scratch_taus: list[float] | None = None  # None: every τ of the grid
    calibration_batches: int = 1  # recent training batches per reduction (CompressionArguments default: 4)
    hnn_steps: int = 20  # regularised steps actually run (<= steps); the rest is extrapolated
    hnn_ratio: float = 0.1  # λ = hnn_ratio · loss / Σσ at the first step
    hnn_seeds: int = 1  # HNN runs only for the first hnn_seeds seeds
    probe_reps: int = 8  # step-time probe repetitions per size


def default_presets() -> dict[str, TaskPreset]:
    return {
        "causal_lm": TaskPreset(
            hidden_size=64,
            num_layers=2,
            state_size=128,
            block_size=256,
            eval_blocks=200,
            steps=300,
            batch_size=8,
            learning_rate=3e-3,
            eval_batch_size=32,
            taus=[0.1, 0.2, 0.3],
            main_tau=0.3,
            scratch_taus=[0.2, 0.3],
            hnn_steps=20,
        ),
        "pixel_classification": TaskPreset(
            hidden_size=32,
            num_layers=2,
            state_size=128,
            dataset="fashion_mnist",
            pool=2,
            eval_samples=2000,
            steps=300,
            batch_size=16,
            learning_rate=3e-3,
            eval_batch_size=128,
            taus=[0.1, 0.2, 0.3],
            main_tau=0.2,
            hnn_steps=20,
        ),
    }


def quick_presets() -> dict[str, TaskPreset]:
    return {
        "causal_lm": TaskPreset(
            hidden_size=16,
            num_layers=2,
            state_size=16,
            block_size=32,
            eval_blocks=8,
            steps=40,
            batch_size=4,
            eval_batch_size=8,
            taus=[0.1, 0.3],
            main_tau=0.3,
            hnn_steps=4,
            probe_reps=2,
        ),
        "pixel_classification": TaskPreset(
            hidden_size=16,
            num_layers=2,
            state_size=16,
            dataset="fashion_mnist",
            pool=4,
            train_samples=512,
            eval_samples=128,
            steps=40,
            batch_size=8,
            eval_batch_size=64,
            taus=[0.1, 0.3],
            main_tau=0.3,
            hnn_steps=4,
            probe_reps=2,
        ),
    }


def _coerce(value: str, current: Any, name: str) -> Any:
    if isinstance(current, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(current, list) or name in ("taus", "scratch_taus"):
        return [float(v) for v in value.split(",") if v.strip()]
    if isinstance(current, int) or name in ("train_samples",):
        return None if value.lower() == "none" else int(value)
    if isinstance(current, float):
        return float(value)
    return value


def apply_overrides(presets: dict[str, TaskPreset], overrides: list[str]) -> None:
    """``--set task.field=value`` (or ``field=value`` for both tasks)."""
    names = {f.name for f in fields(TaskPreset)}
    for item in overrides:
        if "=" not in item:
            raise SystemExit(f"benchmark.py: --set expects task.field=value, got {item!r}")
        key, value = item.split("=", 1)
        task, _, name = key.rpartition(".")
        targets = [task] if task else list(presets)
        if name not in names or any(t not in presets for t in targets):
            raise SystemExit(f"benchmark.py: unknown --set key {key!r}; fields: {sorted(names)}; tasks: {TASKS}")
        for t in targets:
            setattr(presets[t], name, _coerce(value, getattr(presets[t], name), name))


# ----------------------------------------------------------------------------------------------------------------
# Arguments (parsed before torch is imported: thread counts must be in the environment first)
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny settings: every variant in a few minutes")
    parser.add_argument("--output_dir", default=None, help="where the JSON/Markdown/PNG files go")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {TASKS}")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1; --quick: 0,1)")
    parser.add_argument("--taus", default=None, help="comma-separated τ grid for both tasks (overrides the preset)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="override a preset field: task.field=value or field=value (both tasks)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch/numba threads per run (default 1)")
    parser.add_argument("--no_probe", action="store_true", help="skip the step-time probe")
    parser.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--resume", action="store_true", help="reuse runs from benchmark.partial.json")
    parser.add_argument(
        "--note",
        action="append",
        default=[],
        help="with --report_from: a note to add to the report (kept in meta.notes_extra)",
    )
    parser.add_argument(
        "--report_from",
        default=None,
        help="no training: rebuild the tables, verdicts and plots from the runs of this benchmark.json",
    )
    args = parser.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for t in args.tasks:
        if t not in TASKS:
            parser.error(f"unknown task {t!r}; choose from {TASKS}")
    for v in args.variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}; choose from {VARIANTS}")
    args.seeds = [int(s) for s in (args.seeds or "0,1").split(",") if s.strip()]
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.output_dir is None:
        args.output_dir = str(RESULTS_DIR / "quick") if args.quick else str(RESULTS_DIR)
    return args


if __name__ == "__main__":
    _ARGS = parse_args()
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[_var] = str(_ARGS.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

import multiprocessing as mp  # noqa: E402
import resource  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_compressssm.compression.arguments import CompressionArguments  # noqa: E402
from hf_compressssm.compression.callback import CompreSSMCallback  # noqa: E402
from hf_compressssm.compression.hnn import HNNTrainer  # noqa: E402
from hf_compressssm.compression.reduction import compress_model  # noqa: E402
from hf_compressssm.tasks import (  # noqa: E402
    DataArguments,
    ModelArguments,
    TaskData,
    build_datasets,
    build_model,
)
from hf_compressssm.tasks import data as data_lib  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def _pooled_pixels(name: str, split: str, pool: int, num_bins: int, limit: int | None) -> data_lib.PixelSequenceDataset:
    """The pixel dataset with k x k mean pooling (k = ``pool``) before flattening; ``pool=1`` is the original."""
    full = data_lib.load_pixel_classification(name, split, 256, limit)
    side = int(round(math.sqrt(full.seq_len)))
    pixels = full.tokens.numpy().astype(np.float64).reshape(len(full), side, side)
    if pool > 1:
        if side % pool:
            raise SystemExit(f"benchmark.py: pool={pool} does not divide the image side {side}")
        pixels = pixels.reshape(len(full), side // pool, pool, side // pool, pool).mean(axis=(2, 4))
    pixels = np.rint(pixels).clip(0, 255).astype(np.int64).reshape(len(full), -1)
    return data_lib.PixelSequenceDataset(
        pixels, full.labels.numpy(), num_bins, full.class_names, name=name, split=split
    )


def build_task_data(task: str, p: TaskPreset) -> TaskData:
    """Train/eval datasets of ``task`` (the LM data through `training.build_datasets`)."""
    if task == "causal_lm":
        data_args = DataArguments(
            task="causal_lm",
            block_size=p.block_size,
            max_train_samples=p.steps * p.batch_size,
            max_eval_samples=p.eval_blocks,
        )
        return build_datasets(data_args, model_args=ModelArguments(tokenizer_name="byte"))
    train = _pooled_pixels(p.dataset, "train", p.pool, p.num_bins, p.train_samples)
    test = _pooled_pixels(p.dataset, "test", p.pool, p.num_bins, p.eval_samples)
    side = int(round(math.sqrt(train.seq_len)))
    return TaskData(
        task="pixel_classification",
        train_dataset=train,
        eval_dataset=test,
        vocab_size=p.num_bins,
        metric="accuracy",
        dataset_description=f"{p.dataset} ({len(train)} training images), {side}x{side} "
        f"({p.pool}x{p.pool} mean-pooled) pixel sequences of length {train.seq_len}",
        eval_description=f"the first {len(test)} images of the official {p.dataset} test split",
        num_labels=train.num_classes,
        sequence_length=train.seq_len,
    )


def _model_args(p: TaskPreset) -> ModelArguments:
    return ModelArguments(
        hidden_size=p.hidden_size, num_hidden_layers=p.num_layers, state_size=p.state_size, tokenizer_name=None
    )


def new_model(task_data: TaskData, p: TaskPreset, seed: int, state_sizes: list[int] | None = None):
    """A freshly initialised model (seeded), optionally with per-layer ``state_sizes``."""
    set_seed(seed)
    model = build_model(_model_args(p), task_data)
    if state_sizes is not None:
        config = model.config.with_state_sizes(state_sizes)
        set_seed(seed)
        model = type(model)(config)
    return model


# ----------------------------------------------------------------------------------------------------------------
# One run (in a forked child)
# ----------------------------------------------------------------------------------------------------------------


class StepTimer(TrainerCallback):
    """Wall time of every optimisation step (``on_step_begin`` → ``on_step_end``, reductions included when this
    callback comes after `CompreSSMCallback`); stops training after ``stop_after`` steps when given."""

    def __init__(self, stop_after: int | None = None):
        self.times: list[float] = []
        self.stop_after = stop_after
        self._start = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.times.append(time.perf_counter() - self._start)
        if self.stop_after is not None and state.global_step >= self.stop_after:
            control.should_training_stop = True
        return control


@torch.no_grad()
def evaluate(model, dataset, task: str, batch_size: int) -> dict[str, float]:
    """Loss (+ perplexity) or accuracy on ``dataset`` (in order, every item)."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    total_loss, weight, correct, count = 0.0, 0, 0, 0
    for batch in loader:
        out = model(input_ids=batch["input_ids"], labels=batch["labels"])
        if task == "causal_lm":
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total_loss += float(out.loss) * tokens
            weight += tokens
        else:
            n = batch["input_ids"].shape[0]
            total_loss += float(out.loss) * n
            weight += n
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            count += n
    model.train()
    loss = total_loss / max(1, weight)
    if task == "causal_lm":
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    return {"loss": loss, "accuracy": correct / max(1, count)}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _warm_up(task_data: TaskData, p: TaskPreset) -> None:
    """One tiny forward/backward of the task's model class: loads the JIT-compiled scan (disk cache) before timing."""
    tiny = copy.copy(p)
    tiny.hidden_size, tiny.state_size = 8, 4
    model = new_model(task_data, tiny, 0)
    item = task_data.train_dataset[0]
    ids = item["input_ids"][None, :16] if task_data.task == "causal_lm" else item["input_ids"][None]
    labels = ids if task_data.task == "causal_lm" else torch.tensor([int(item["labels"])])
    model(input_ids=ids, labels=labels).loss.backward()


def _training_args(p: TaskPreset, seed: int, output_dir: str) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=p.steps,
        per_device_train_batch_size=p.batch_size,
        learning_rate=p.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=p.warmup,
        weight_decay=p.weight_decay,
        logging_strategy="no",
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_drop_last=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        use_cpu=True,
    )


def _step_summary(times: list[float]) -> dict[str, float]:
    if not times:
        return {}
    tail = times[len(times) // 2 :]
    return {
        "count": len(times),
        "mean_s": statistics.fmean(times),
        "sum_s": sum(times),
        "median_s": statistics.median(times),
        "first_median_s": statistics.median(times[: max(1, len(times) // 20)]),
        "steady_median_s": statistics.median(tail),
    }


def run_variant(spec: dict[str, Any], task_data: TaskData, p: TaskPreset, threads: int) -> dict[str, Any]:
    """Train one variant and measure it. ``spec``: task, variant, seed, tau, selection, state_sizes."""
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    _warm_up(task_data, p)
    task, variant, seed, tau = spec["task"], spec["variant"], spec["seed"], spec.get("tau")
    model = new_model(task_data, p, seed, spec.get("state_sizes"))
    sizes_initial = list(model.config.state_sizes)
    params_initial = sum(t.numel() for t in model.parameters())
    timer = StepTimer(stop_after=min(p.hnn_steps, p.steps) if variant == "hnn" else None)
    callbacks: list[Any] = []
    comp_args = None
    if variant in ("compressssm", "smallest", "random"):
        comp_args = CompressionArguments(
            tau=tau,
            selection=spec.get("selection", "largest"),
            compression_seed=seed,
            calibration_batches=p.calibration_batches,
        )
        callbacks.append(CompreSSMCallback(comp_args))
    callbacks.append(timer)
    with tempfile.TemporaryDirectory(prefix="compressssm_bench_") as out:
        args = _training_args(p, seed, out)
        kwargs = dict(model=model, args=args, train_dataset=task_data.train_dataset, callbacks=callbacks)
        trainer = HNNTrainer(**kwargs, hnn_ratio=p.hnn_ratio) if variant == "hnn" else Trainer(**kwargs)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - wall0
        train_cpu = time.process_time() - cpu0
        model = trainer.model
    result: dict[str, Any] = {
        **{k: v for k, v in spec.items() if k != "state_sizes"},
        "scratch_sizes": spec.get("state_sizes"),
        "steps_planned": p.steps,
        "steps_run": int(trainer.state.global_step),
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu,
        "step_times": _step_summary(timer.times),
        "sizes_initial": sizes_initial,
        "parameters_initial": params_initial,
    }
    history = list(getattr(model, "compression_history", []) or [])
    result["reductions"] = [
        {
            "step": h["step"],
            "sizes_before": h["sizes_before"],
            "sizes_after": h["sizes_after"],
            "seconds": h["seconds"],
            "skipped": h.get("skipped"),
        }
        for h in history
    ]
    result["reduction_seconds"] = sum(h["seconds"] for h in history)
    if variant == "hnn":
        result["hnn"] = trainer.hnn_summary()
        result["eval_before_truncation"] = evaluate(model, task_data.eval_dataset, task, p.eval_batch_size)
        result["sizes_before_truncation"] = list(model.config.state_sizes)
        loader = torch.utils.data.DataLoader(task_data.train_dataset, batch_size=p.batch_size, shuffle=False)
        report = compress_model(model, loader, tau=tau, calibration_batches=p.calibration_batches)
        result["truncation"] = {"seconds": report.seconds, "sizes_after": report.sizes_after}
        result["reduction_seconds"] = report.seconds
        per_step = timer.times
        overhead = max(0.0, train_seconds - sum(per_step))
        measured_steps = len(per_step)
        result["hnn_measured_steps"] = measured_steps
        result["hnn_extrapolated"] = measured_steps < p.steps
        # total cost of the whole regularised run: mean measured step time x all steps + one-off Trainer overhead,
        # plus the final truncation
        result["total_seconds"] = statistics.fmean(per_step) * p.steps + overhead + report.seconds
        cpu_per_step = train_cpu / max(1, measured_steps)
        result["total_cpu_seconds"] = cpu_per_step * p.steps + report.seconds
    else:
        result["total_seconds"] = train_seconds
        result["total_cpu_seconds"] = train_cpu
    result["reduction_share"] = result["reduction_seconds"] / max(1e-12, result["total_seconds"])
    result["sizes_final"] = list(model.config.state_sizes)
    result["mean_size"] = statistics.fmean(result["sizes_final"])
    result["parameters_final"] = sum(t.numel() for t in model.parameters())
    result["eval"] = evaluate(model, task_data.eval_dataset, task, p.eval_batch_size)
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


# ----------------------------------------------------------------------------------------------------------------
# Step-time probe (in a forked child): the ceiling that non-scan work puts on the speed-up
# ----------------------------------------------------------------------------------------------------------------


def _scan_share(model, batch) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    scan = sum(e.cpu_time_total for e in events if e.key in ("SelectiveScanFunction", "SelectiveScanFunctionBackward"))
    return {"scan_share": scan / max(1e-12, total), "profiled_step_ms": total / 1000.0}


def run_probe(spec: dict[str, Any], task_data: TaskData, p: TaskPreset, threads: int) -> dict[str, Any]:
    """Time one training step (forward, backward, AdamW) on a fixed batch at N0 and at ``spec['sizes']``."""
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    _warm_up(task_data, p)
    sizes = {"full": None, "compressed": spec["sizes"], "min": [1] * p.num_layers}
    loader = torch.utils.data.DataLoader(task_data.train_dataset, batch_size=p.batch_size, shuffle=False)
    first = next(iter(loader))
    batch = {"input_ids": first["input_ids"], "labels": first["labels"]}
    models = {k: new_model(task_data, p, 0, v) for k, v in sizes.items()}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    wall: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    for rep in range(p.probe_reps + 1):  # interleaved; the first round is a warm-up
        for k, m in models.items():
            c0, w0 = time.process_time(), time.perf_counter()
            m(**batch).loss.backward()
            opts[k].step()
            opts[k].zero_grad()
            if rep:
                wall[k].append(time.perf_counter() - w0)
                cpu[k].append(time.process_time() - c0)
    out: dict[str, Any] = {"sizes": {k: list(m.config.state_sizes) for k, m in models.items()}}
    for k in models:
        out[k] = {
            "wall_median_s": statistics.median(wall[k]),
            "cpu_median_s": statistics.median(cpu[k]),
            **_scan_share(models[k], batch),
        }
    # What one reduction's calibration costs at N0 (statistics over the batches: O(tokens·D·N) in float64).
    from hf_compressssm.compression.calibration import collect_statistics

    calib = {}
    for n in sorted({1, p.calibration_batches, CompressionArguments().calibration_batches}):
        c0, w0 = time.process_time(), time.perf_counter()
        collect_statistics(models["full"], [batch] * n)
        calib[str(n)] = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}
    out["calibration_at_n0"] = calib
    full, comp, low = (out[k]["cpu_median_s"] for k in ("full", "compressed", "min"))
    out["step_speedup_cpu"] = full / comp
    out["step_speedup_wall"] = out["full"]["wall_median_s"] / out["compressed"]["wall_median_s"]
    out["step_speedup_at_size_1_cpu"] = full / low
    share = out["full"]["scan_share"]
    out["non_scan_share_full"] = 1.0 - share
    out["amdahl_limit"] = 1.0 / max(1e-12, 1.0 - share)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------------------------


def _child(target, result_path: str, *args) -> None:
    try:
        result = target(*args)
        with open(result_path, "w") as f:
            json.dump({"ok": True, "result": result}, f)
    except BaseException as err:  # report anything, including KeyboardInterrupt, to the parent
        import traceback

        with open(result_path, "w") as f:
            json.dump({"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}, f)
        raise


def in_child(target, *args) -> dict[str, Any]:
    """Run ``target(*args)`` in a forked child process; returns its result (or raises with its traceback)."""
    ctx = mp.get_context("fork")
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        path = handle.name
    try:
        proc = ctx.Process(target=_child, args=(target, path, *args))
        proc.start()
        proc.join()
        try:
            with open(path) as f:
                payload = json.load(f)
        except (OSError, json.JSONDecodeError):
            payload = {"ok": False, "error": f"child exited with code {proc.exitcode} and no result"}
    finally:
        os.unlink(path)
    if not payload["ok"]:
        raise RuntimeError(f"{payload['error']}\n{payload.get('traceback', '')}")
    return payload["result"]


def run_key(task: str, variant: str, tau: float | None) -> str:
    return variant if tau is None or variant == "full" else f"{variant}@{tau:g}"


def plan_seed(task: str, p: TaskPreset, seed: int, seed_index: int, variants: list[str]) -> list[dict[str, Any]]:
    """The runs of one (task, seed), in an order that alternates between seeds (see the module docstring)."""
    scratch_taus = p.scratch_taus if p.scratch_taus is not None else p.taus
    comp = [dict(variant="compressssm", tau=t, selection="largest") for t in p.taus]
    scratch = [dict(variant="scratch", tau=t) for t in scratch_taus]
    ablations = [dict(variant=s, tau=p.main_tau, selection=s) for s in ("smallest", "random")]
    hnn = [dict(variant="hnn", tau=p.main_tau)] if seed_index < p.hnn_seeds else []
    full = [dict(variant="full", tau=None)]
    if seed_index % 2 == 0:
        order = full + comp + scratch + ablations + hnn
    else:
        order = hnn + ablations + comp + scratch + full
    runs = []
    for r in order:
        if r["variant"] not in variants:
            continue
        if r["variant"] == "scratch" and ("compressssm" not in variants or r["tau"] not in p.taus):
            continue
        runs.append({"task": task, "seed": seed, **r, "key": run_key(task, r["variant"], r["tau"])})
    return runs


def _settings_fingerprint(presets: dict[str, TaskPreset], args: argparse.Namespace) -> dict[str, Any]:
    return {"presets": {t: asdict(p) for t, p in presets.items()}, "threads": args.threads, "quick": args.quick}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(task: str, runs: list[dict[str, Any]], p: TaskPreset) -> dict[str, Any]:
    """Per variant key: means and spreads over seeds; speed-ups are paired with the same seed's full run."""
    metric = "loss" if task == "causal_lm" else "accuracy"
    full_by_seed = {r["seed"]: r for r in runs if r["variant"] == "full"}
    keys: list[str] = []
    for r in runs:
        if r["key"] not in keys:
            keys.append(r["key"])
    summary: dict[str, Any] = {}
    for key in keys:
        rs = sorted((r for r in runs if r["key"] == key), key=lambda r: r["seed"])
        ratios = [
            full_by_seed[r["seed"]]["total_seconds"] / r["total_seconds"] for r in rs if r["seed"] in full_by_seed
        ]
        cpu_ratios = [
            full_by_seed[r["seed"]]["total_cpu_seconds"] / r["total_cpu_seconds"]
            for r in rs
            if r["seed"] in full_by_seed
        ]
        step_ratios = [
            r["step_times"]["mean_s"] / full_by_seed[r["seed"]]["step_times"]["mean_s"]
            for r in rs
            if r["seed"] in full_by_seed and r.get("step_times")
        ]
        entry = {
            "variant": rs[0]["variant"],
            "tau": rs[0].get("tau"),
            "seeds": [r["seed"] for r in rs],
            "sizes_final": [r["sizes_final"] for r in rs],
            "mean_size": _mean_sd([r["mean_size"] for r in rs]),
            metric: _mean_sd([r["eval"][metric] for r in rs]),
            "total_seconds": _mean_sd([r["total_seconds"] for r in rs]),
            "total_cpu_seconds": _mean_sd([r["total_cpu_seconds"] for r in rs]),
            "speedup_vs_full": _mean_sd(ratios),
            "cpu_speedup_vs_full": _mean_sd(cpu_ratios),
            "step_time_ratio_vs_full": _mean_sd(step_ratios),
            "reduction_share": _mean_sd([r["reduction_share"] for r in rs]),
            "reduction_seconds": _mean_sd([r["reduction_seconds"] for r in rs]),
            "peak_rss_mb": _mean_sd([r["peak_rss_mb"] for r in rs]),
            "extrapolated": any(r.get("hnn_extrapolated") for r in rs),
        }
        if task == "causal_lm":
            entry["perplexity"] = _mean_sd([r["eval"]["perplexity"] for r in rs])
        else:
            entry["loss"] = _mean_sd([r["eval"]["loss"] for r in rs])
        if entry["variant"] == "hnn":
            entry["measured_steps"] = [r["hnn_measured_steps"] for r in rs]
            entry["eval_before_truncation"] = [r["eval_before_truncation"] for r in rs]
            entry["lambda"] = [r["hnn"]["lambda"] for r in rs]
        summary[key] = entry
    return summary


def _by_seed(runs: list[dict[str, Any]], key: str) -> dict[int, dict[str, Any]]:
    return {r["seed"]: r for r in runs if r["key"] == key}


def _paired(runs: list[dict[str, Any]], key_a: str, key_b: str, fn) -> list[float]:
    """``fn(run_a, run_b)`` for every seed that has both runs."""
    a, b = _by_seed(runs, key_a), _by_seed(runs, key_b)
    return [fn(a[s], b[s]) for s in sorted(a) if s in b]


def verdicts(
    task: str,
    summary: dict[str, Any],
    p: TaskPreset,
    probe: dict[str, Any] | None,
    runs: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured numbers and PASS/MISS ("(within noise)" when an ablation comparison
    does not go the same way on every seed; speed-ups: wall time, as the issue asks;
    CPU-time ratios are quoted next to them as the load-robust cross-check). Quality comparisons also say on how many
    seeds they hold, with the per-seed paired differences."""
    runs = runs or []
    out: list[dict[str, Any]] = []
    full = summary.get("full")
    main = summary.get(f"compressssm@{p.main_tau:g}")
    metric = "loss" if task == "causal_lm" else "accuracy"
    lower_is_better = metric == "loss"

    def add(name, ok, detail):
        out.append({"target": name, "verdict": "PASS" if ok else "MISS", "detail": detail})

    def diffs(key_a: str, key_b: str) -> list[float]:
        """Per-seed paired differences of the metric, key_a − key_b (same seed: same init and data order)."""
        return _paired(runs, key_a, key_b, lambda a, b: a["eval"][metric] - b["eval"][metric])

    def consistent(key_a: str, key_b: str) -> bool:
        """Whether key_a is better than key_b on every seed."""
        d = diffs(key_a, key_b)
        return bool(d) and all((x < 0) if lower_is_better else (x > 0) for x in d)

    def wins(key_a: str, key_b: str) -> str:
        d = diffs(key_a, key_b)
        good = sum((x < 0) if lower_is_better else (x > 0) for x in d)
        return f"better on {good} of {len(d)} seeds, paired differences {', '.join(f'{x:+.4f}' for x in d)}"

    if full is None:
        return out
    for tau in p.taus:
        key, skey = f"compressssm@{tau:g}", f"scratch@{tau:g}"
        comp, scratch = summary.get(key), summary.get(skey)
        if comp is None:
            continue
        ratio, cpu = comp["speedup_vs_full"][0], comp["cpu_speedup_vs_full"][0]
        size = comp["mean_size"][0]
        if task == "causal_lm":
            rel = comp["loss"][0] / full["loss"][0] - 1.0
            beats = scratch is not None and comp["loss"][0] < scratch["loss"][0]
            detail = (
                f"speed-up {ratio:.2f}x wall (target >= 4; CPU time {cpu:.2f}x), mean final size {size:.1f} "
                f"(target <= 16), val loss {comp['loss'][0]:.4f} vs full {full['loss'][0]:.4f} ({rel:+.2%}, "
                f"target within 2 %)"
            )
            if scratch is not None:
                detail += (
                    f"; scratch at the same sizes {scratch['loss'][0]:.4f} ("
                    f"{'higher' if beats else 'not higher'}: CompreSSM {wins(key, skey)})"
                )
            else:
                detail += "; no scratch run at this τ"
            add(
                f"LM at τ={tau:g}: >= 4x, mean size <= 16, loss within 2 %, lower than scratch",
                ratio >= 4 and size <= 16 and rel <= 0.02 and beats,
                detail,
            )
        else:
            diff = 100 * (comp["accuracy"][0] - full["accuracy"][0])
            detail = (
                f"accuracy {100 * comp['accuracy'][0]:.2f} % vs full {100 * full['accuracy'][0]:.2f} % "
                f"({diff:+.2f} points, target >= -1), speed-up {ratio:.2f}x wall (target >= 1.5; CPU time "
                f"{cpu:.2f}x), mean final size {size:.1f}"
            )
            if scratch is not None:
                detail += (
                    f"; scratch at the same sizes {100 * scratch['accuracy'][0]:.2f} % (CompreSSM {wins(key, skey)})"
                )
            add(
                f"Classification at τ={tau:g}: within 1 point of full at >= 1.5x", diff >= -1.0 and ratio >= 1.5, detail
            )
    if main is not None:
        main_key = f"compressssm@{p.main_tau:g}"
        better = (lambda a, b: a < b) if lower_is_better else (lambda a, b: a > b)
        for ablation in ("random", "smallest"):
            okey = f"{ablation}@{p.main_tau:g}"
            other = summary.get(okey)
            if other is None:
                continue
            noisy = not consistent(main_key, okey) and not consistent(okey, main_key)  # the seeds disagree
            add(
                f"largest beats {ablation} (τ={p.main_tau:g})",
                better(main[metric][0], other[metric][0]),
                f"{metric}: largest {main[metric][0]:.4f} ± {main[metric][1]:.4f} (mean size {main['mean_size'][0]:.1f})"
                f" vs {ablation} {other[metric][0]:.4f} ± {other[metric][1]:.4f} (mean size "
                f"{other['mean_size'][0]:.1f}); largest {wins(main_key, okey)}",
            )
            if noisy:
                out[-1]["verdict"] += " (within noise)"
        hkey = f"hnn@{p.main_tau:g}"
        hnn = summary.get(hkey)
        if hnn is not None:
            wall = _paired(runs, hkey, main_key, lambda a, b: a["total_seconds"] / b["total_seconds"])
            cpu = _paired(runs, hkey, main_key, lambda a, b: a["total_cpu_seconds"] / b["total_cpu_seconds"])
            pairs = _paired(runs, hkey, main_key, lambda a, b: (a["seed"], a["total_seconds"], b["total_seconds"]))
            label = "extrapolated" if hnn["extrapolated"] else "measured"
            seeds = ", ".join(f"seed {s}: HNN {h:.0f} s vs CompreSSM {c:.0f} s" for s, h, c in pairs)
            if wall:
                out.append(
                    {
                        "target": f"HNN total cost relative to CompreSSM (τ={p.main_tau:g}; paper ~40x)",
                        "verdict": "REPORT",
                        "detail": f"{statistics.fmean(wall):.1f}x wall, {statistics.fmean(cpu):.1f}x CPU time "
                        f"({label} to {p.steps} steps from {'/'.join(map(str, hnn['measured_steps']))} measured; same seed: "
                        f"{seeds}); per-step cost ratio HNN / full "
                        f"{hnn['step_time_ratio_vs_full'][0]:.2f}x (measured)",
                    }
                )
    if probe is not None:
        out.append(
            {
                "target": "speed-up ceiling (step-time probe)",
                "verdict": "REPORT",
                "detail": f"one step at N0 vs at the compressed sizes {probe['sizes']['compressed']}: "
                f"{probe['step_speedup_cpu']:.2f}x (CPU time; wall {probe['step_speedup_wall']:.2f}x); "
                f"at size 1 in every layer {probe['step_speedup_at_size_1_cpu']:.2f}x; scan kernel = "
                f"{100 * probe['full']['scan_share']:.0f} % of a step at N0, so removing it entirely "
                f"would give at most {probe['amdahl_limit']:.2f}x; one calibration at N0: "
                + ", ".join(f"{k} batch(es) {v['cpu_s']:.2f} s CPU" for k, v in probe["calibration_at_n0"].items()),
            }
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------


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
        f"{meta['threads']} thread(s) per run; total {meta['total_seconds'] / 60:.1f} min; load average "
        f"{meta['load_start']} at the start, {meta['load_end']} at the end.  ",
        f"Seeds {meta['seeds']}. Wall times are of `trainer.train()` (reductions included); speed-up = full-size wall "
        "time / variant wall time with the same seed (mean ± sd over seeds). The machine is shared: runs are "
        "interleaved (variant order reversed on odd seeds) so that background load hits every variant alike; CPU "
        "time (process, all threads) is shown as a load-robust cross-check. "
        + ("**QUICK PRESET: tiny settings, numbers are meaningless.**" if meta["quick"] else ""),
        "",
    ]
    regen = meta.get("report_regenerated")
    if regen:
        lines += [
            f"Tables and verdicts rebuilt on {regen['at']} from the measured runs in `{regen['from']}` with "
            f"`--report_from` (script at commit {str(regen['git_commit'])[:10]}); the measurements were taken "
            f"by the command above with the code of commit {str(meta.get('git_commit'))[:10]}.",
            "",
        ]
    for task, t in report["tasks"].items():
        p = t["preset"]
        metric = "val loss (nats/byte)" if task == "causal_lm" else "test accuracy (%)"
        lines += [
            f"## {task}",
            "",
            f"Data: {t['data']}. Evaluation: {t['eval_split']}.  ",
            f"Model: hidden {p['hidden_size']}, {p['num_layers']} layers, N0 = {p['state_size']}; {p['steps']} "
            f"steps of batch {p['batch_size']}, lr {p['learning_rate']}, cosine, warm-up {p['warmup']}; "
            f"CompreSSM: default score/schedule (4 cuts in the first 10 % of the steps), calibration on the last "
            f"{p['calibration_batches']} training batch(es), τ grid {p['taus']}, ablations and HNN at "
            f"τ = {p['main_tau']}; scratch at the sizes of τ in "
            f"{p['scratch_taus'] if p['scratch_taus'] is not None else p['taus']}.",
            "",
        ]
        extra = "ppl" if task == "causal_lm" else "loss"
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
            if task == "causal_lm":
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
                lines.append(
                    f"| {probe['sizes'][k]} | {probe[k]['cpu_median_s']:.3f} | {probe[k]['wall_median_s']:.3f} | "
                    f"{100 * probe[k]['scan_share']:.0f} % |"
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
    path.write_text("\n".join(lines))


def write_plots(out_dir: Path, report: dict[str, Any]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
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
        metric, scale = ("loss", 1.0) if task == "causal_lm" else ("accuracy", 100.0)
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
        ax.set_ylabel("validation loss (nats/byte)" if task == "causal_lm" else "test accuracy (%)")
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


def _git_commit() -> str | None:
    import subprocess

    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=Path(__file__).resolve().parent,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def _git_dirty() -> list[str] | None:
    """Uncommitted changes to the package and scripts (other developers may edit the same checkout)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", "hf_compressssm", "scripts/benchmark.py"],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line[3:] for line in out.splitlines() if line.strip()]


def _load() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main(args: argparse.Namespace) -> int:
    if args.report_from:
        return report_from(args.report_from, Path(args.output_dir), plots=not args.no_plots, notes=args.note)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    presets = quick_presets() if args.quick else default_presets()
    if args.taus:
        taus = [float(t) for t in args.taus.split(",") if t.strip()]
        for p in presets.values():
            p.taus = taus
            if p.main_tau not in taus:
                p.main_tau = taus[len(taus) // 2]
    apply_overrides(presets, args.overrides)
    presets = {t: presets[t] for t in args.tasks}
    for task, p in presets.items():
        if p.main_tau not in p.taus:
            raise SystemExit(f"benchmark.py: {task}: main_tau={p.main_tau} is not in the τ grid {p.taus}")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial_path = out_dir / "benchmark.partial.json"
    fingerprint = _settings_fingerprint(presets, args)
    done: dict[tuple, dict[str, Any]] = {}
    if args.resume and partial_path.is_file():
        old = json.loads(partial_path.read_text())
        if old.get("fingerprint") == fingerprint:
            done = {(r["task"], r["key"], r["seed"]): r for r in old["runs"]}
            print(f"resuming: {len(done)} runs reused from {partial_path}", flush=True)
        else:
            print("resume: settings differ from the partial results; starting afresh", flush=True)

    start = time.perf_counter()
    load_start = _load()
    commit_start, dirty_start = _git_commit(), _git_dirty()  # the code every run uses (imported once, here)
    print(
        f"benchmark: tasks {list(presets)}, seeds {args.seeds}, {args.threads} thread(s), output {out_dir}", flush=True
    )
    datasets = {}
    for task, p in presets.items():
        t0 = time.perf_counter()
        datasets[task] = build_task_data(task, p)
        print(f"  data {task}: {datasets[task].dataset_description} ({time.perf_counter() - t0:.1f} s)", flush=True)
    # Compile (or load from the disk cache) the scan kernel once, in a child, so that no run pays the JIT compile.
    t0 = time.perf_counter()
    in_child(lambda: (_warm_up(datasets[next(iter(presets))], next(iter(presets.values()))), {})[1])
    print(f"  scan kernel warm-up: {time.perf_counter() - t0:.1f} s", flush=True)

    runs: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []

    def save_partial():
        partial_path.write_text(json.dumps({"fingerprint": fingerprint, "runs": runs, "failures": failures}, indent=1))

    plan = [(task, s, i) for i, s in enumerate(args.seeds) for task in presets]
    total_runs = sum(len(plan_seed(t, presets[t], s, i, args.variants)) for t, s, i in plan)
    count = 0
    for task, seed, seed_index in plan:
        p = presets[task]
        for spec in plan_seed(task, p, seed, seed_index, args.variants):
            count += 1
            ident = (task, spec["key"], seed)
            if spec["variant"] == "scratch":
                src = next(
                    (
                        r
                        for r in runs
                        if r["task"] == task
                        and r["seed"] == seed
                        and r["key"] == run_key(task, "compressssm", spec["tau"])
                    ),
                    None,
                )
                if src is None:
                    print(f"  skip {ident}: no CompreSSM run to take sizes from", flush=True)
                    continue
                spec["state_sizes"] = src["sizes_final"]
            if ident in done:
                runs.append(done[ident])
                print(f"[{count}/{total_runs}] {task} seed {seed} {spec['key']}: reused", flush=True)
                continue
            t0 = time.perf_counter()
            try:
                result = in_child(run_variant, spec, datasets[task], p, args.threads)
            except RuntimeError as err:  # one failed run must not cost the others: record it and go on
                failures.append({k: v for k, v in spec.items() if k != "state_sizes"} | {"error": str(err)})
                save_partial()
                print(f"[{count}/{total_runs}] {task} seed {seed} {spec['key']}: FAILED: {err}", flush=True)
                continue
            runs.append(result)
            save_partial()
            q = result["eval"]
            qs = f"loss {q['loss']:.4f}" + (f", acc {100 * q['accuracy']:.2f} %" if "accuracy" in q else "")
            print(
                f"[{count}/{total_runs}] {task} seed {seed} {spec['key']}: sizes {result['sizes_final']}, {qs}, "
                f"train {result['train_seconds']:.1f} s (total {result['total_seconds']:.1f} s), "
                f"{result['peak_rss_mb']:.0f} MB; elapsed {(time.perf_counter() - start) / 60:.1f} min "
                f"(this run {time.perf_counter() - t0:.0f} s, load {_load()})",
                flush=True,
            )

    report: dict[str, Any] = {
        "meta": {
            "command": " ".join(["python scripts/benchmark.py", *(shlex.quote(a) for a in sys.argv[1:])]),
            "quick": args.quick,
            "seeds": args.seeds,
            "threads": args.threads,
            "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
            f"{platform.system()} {platform.release()}".replace("  ", " "),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "load_start": load_start,
            "git_commit": commit_start,
            "git_dirty_files_at_start": dirty_start,
        },
        "tasks": {},
        "failures": failures,
        "notes": [],
    }
    for task, p in presets.items():
        task_runs = [r for r in runs if r["task"] == task]
        probe = None
        main_key = run_key(task, "compressssm", p.main_tau)
        src = next((r for r in task_runs if r["key"] == main_key), None)
        if not args.no_probe and src is not None:
            t0 = time.perf_counter()
            try:
                probe = in_child(run_probe, {"sizes": src["sizes_final"]}, datasets[task], p, args.threads)
            except RuntimeError as err:
                failures.append({"task": task, "seed": None, "key": "probe", "error": str(err)})
                print(f"  probe {task}: FAILED: {err}", flush=True)
            else:
                print(
                    f"  probe {task}: step speed-up {probe['step_speedup_cpu']:.2f}x (CPU), scan share "
                    f"{100 * probe['full']['scan_share']:.0f} % ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
        report["tasks"][task] = {
            "preset": asdict(p),
            "data": datasets[task].dataset_description,
            "eval_split": datasets[task].eval_description,
            "runs": task_runs,
            "probe": probe,
        }
    report["meta"]["total_seconds"] = time.perf_counter() - start
    report["meta"]["load_end"] = _load()
    report["meta"]["git_commit_at_end"] = _git_commit()
    finish_report(report, out_dir, plots=not args.no_plots)
    if partial_path.exists():
        partial_path.unlink()
    return 0


NOTES = [
    "Peak RSS is ru_maxrss of each run's own child process (forked from a parent that has imported torch and "
    "transformers and built the datasets), so it includes the interpreter, the libraries and the data.",
    "HNN regulariser: hf_compressssm.compression.hnn (Σσ of the per-channel time-averaged LTI surrogate, differentiable, every "
    "step), truncated once with compress_model at the main τ (default score, largest selection).",
    "Speed-ups are paired: each run is divided by the full run of the same seed; the HNN/CompreSSM cost ratio pairs "
    "the HNN run with the CompreSSM run of the same seed.",
]


def finish_report(report: dict[str, Any], out_dir: Path, plots: bool = True) -> None:
    """Aggregates and verdicts from the runs and probes in ``report``; write JSON, Markdown and plots."""
    for task, t in report["tasks"].items():
        p = TaskPreset(**t["preset"])
        t["summary"] = aggregate(task, t["runs"], p)
        t["verdicts"] = verdicts(task, t["summary"], p, t.get("probe"), t["runs"])
    report["notes"] = list(NOTES) + list(report["meta"].get("notes_extra", []))
    (out_dir / "benchmark.json").write_text(json.dumps(report, indent=1))
    write_markdown(out_dir / "benchmark.md", report)
    if plots:
        write_plots(out_dir, report)
    print(
        f"wrote {out_dir / 'benchmark.json'}, {out_dir / 'benchmark.md'} (measured in "
        f"{report['meta']['total_seconds'] / 60:.1f} min)",
        flush=True,
    )
    for task, t in report["tasks"].items():
        for v in t["verdicts"]:
            print(f"  {task}: {v['verdict']} {v['target']}: {v['detail']}", flush=True)


def report_from(path: str, out_dir: Path, plots: bool = True, notes: list[str] | None = None) -> int:
    """Rebuild the aggregates, verdicts, Markdown and plots from the runs of an earlier ``benchmark.json`` (no
    training): the measurements are untouched, only their summary is recomputed with this version of the script."""
    report = json.loads(Path(path).read_text())
    report["meta"]["report_regenerated"] = {
        "from": str(path),
        "git_commit": _git_commit(),
        "at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    extra = list(report["meta"].get("notes_extra", []))
    report["meta"]["notes_extra"] = extra + [n for n in (notes or []) if n not in extra]
    out_dir.mkdir(parents=True, exist_ok=True)
    finish_report(report, out_dir, plots)
    return 0


if __name__ == "__main__":
    sys.exit(main(_ARGS))
