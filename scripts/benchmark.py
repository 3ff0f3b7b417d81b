#!/usr/bin/env python
"""Benchmark CompreSSM against its baselines at a budget where the cuts happen after learning.

    python scripts/benchmark.py                 # default presets, 3 seeds (240 min of run time: resumable, see below)
    python scripts/benchmark.py --estimate      # time a few steps per preset: the estimated time still to run
    python scripts/benchmark.py --quick         # every variant of every preset, tiny (a minute; numbers meaningless)
    python scripts/benchmark.py --tasks causal_lm --seeds 0 --taus 0.1,0.25 --set causal_lm.steps=500

Presets (``configs/presets/benchmark/<name>.yaml``, one file each; ``--tasks`` picks some by name, ``--set
name.field=value`` changes a field):

* ``causal_lm``            byte-level LM on the KJV text, hidden 64, 2 layers, N0 = 128, 3000 steps;
* ``pixel_classification`` Fashion-MNIST as 14x14 pixel sequences (2x2 mean pooling), hidden 32, N0 = 128,
                           2500 steps (a learning curve of the full model is in the report);
* ``ssm_dominant``         a narrow LM (hidden 16, N0 = 256, sequences of 1024 bytes) where the selective scan is
                           most of a step: how close the end-to-end speed-up comes to the step-time ceiling;
* ``mamba2_lm``            the byte-level LM with a Mamba-2 model (``family="mamba2"``: hidden 64, 2 layers, head_dim
                           32, one group, N0 = 128 as transformers' `Mamba2Config`): full vs CompreSSM vs
                           small-from-scratch at the final sizes, 2000 steps.

Opt-in presets (``opt_in: true`` in their file: run only when ``--tasks`` names them; the default command is
unchanged):

* ``granite_hybrid_lm``    the byte-level LM with a small Granite-4.0-H-shaped hybrid
                           (`CompreSSMGraniteMoeHybridForCausalLM`, ``family="granitemoehybrid"``: hidden 128, layers
                           Mamba/Mamba/attention/Mamba, Mamba heads of 64 channels, N0 = 128, dense MLP, NoPE):
                           full vs CompreSSM vs scratch; its probe also measures the decode cache of one sequence
                           after a prefill of each of ``cache_contexts`` tokens (attention KV + SSM states)::

                               python scripts/benchmark.py --tasks granite_hybrid_lm --output_dir scripts/results/hybrid

For each preset and seed, with the same data, steps, learning-rate schedule and seed (initialisation and data
order) for every variant: ``full`` (N0 throughout); ``compressssm`` (`CompreSSMCallback`, tolerance mode, default
score and schedule: 4 cuts in the first 10 % of the steps) at each τ of the grid; ``scratch`` (trained from scratch
at the final per-layer sizes of the same seed's CompreSSM run); ``smallest`` / ``random`` (the ablation selections
at the main τ); ``hnn`` (Hankel-nuclear-norm regularised training, `hf_compressssm.compression.hnn`, then one
truncation at the main τ: its first ``hnn_steps`` steps are measured and its total cost extrapolated, stated as
such). A step-time probe per preset times one step at N0 and at the compressed sizes (the speed-up ceiling) and
measures the decode cache per sequence (conv + recurrent states of every layer after a one-token forward with
``use_cache=True``) at N0 and at the compressed sizes: the inference state shrinks with ΣN.
Training and measurement are `compressssm_app.experiment.train_and_measure` (quality: `evaluate_quality`);
every run is a forked child (clean peak memory; a crash costs one run); one thread per run (``--threads``).

Resumable: each finished run is appended at once to ``<output_dir>/benchmark_runs.jsonl``
(`compressssm_app.harness.ResultsStore`); rerunning the same command skips what is done, so a session that
is stopped loses at most the run in progress. Runs measured with another preset are detected (the command stops and
says so: rerun the same command, use another ``--output_dir``, or ``--fresh``); runs measured at another commit are
reused and listed in the report. Adding seeds or presets to the command reuses the runs already there.

Writes ``benchmark.json`` (every run, setting, aggregate and verdict), ``benchmark.md`` and two PNGs into
``--output_dir`` (default ``scripts/results``; ``--quick``: ``scripts/results/quick``). Verdicts:
`scripts/benchmark_report.py`. ``--report_from FILE`` rebuilds the report from a ``benchmark.json`` without training.
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

from compressssm_app.presets import load_preset, preset_into, preset_names


RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
TASK_KINDS = ("causal_lm", "pixel_classification")
VARIANTS = ("full", "compressssm", "scratch", "smallest", "random", "hnn")
RUNS_FILE = "benchmark_runs.jsonl"


# ----------------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TaskPreset:
    """Everything one preset's runs share. ``task``: the data kind (`TASK_KINDS`); ``family``: the SSM family of
    the model (one of `MODEL_FAMILIES`); ``variants``: the variants this preset runs; ``taus``: the CompreSSM
    grid; ``main_tau``: the τ of the ablations, HNN and the probe."""

    task: str = "causal_lm"
    family: str = "mamba"
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    # model
    hidden_size: int = 64
    num_layers: int = 2
    state_size: int = 128
    head_dim: int = 32  # Mamba-2 only (family "mamba2"): channels per head, groups sharing B/C, SSD chunk length
    n_groups: int = 1
    chunk_size: int = 256
    # data
    block_size: int = 256  # causal_lm: tokens per sequence
    eval_blocks: int = 200  # causal_lm: first blocks of the fixed validation split
    dataset: str = "fashion_mnist"  # pixel_classification
    pool: int = 2  # pixel_classification: k x k mean pooling of the 28x28 images (sequence length (28/k)^2)
    num_bins: int = 256  # pixel_classification: pixel quantisation levels
    train_samples: int | None = None  # pixel_classification: first images of the training split (None: all)
    eval_samples: int = 2000  # pixel_classification: first images of the official test split
    # training (identical for every variant)
    steps: int = 3000
    batch_size: int = 8
    learning_rate: float = 3e-3
    warmup: float = 0.05
    weight_decay: float = 0.01
    eval_batch_size: int = 32
    curve_points: int = 8  # learning-curve evaluations of the full and main-τ CompreSSM runs (0: none)
    # variants
    taus: list[float] = field(default_factory=lambda: [0.25])
    main_tau: float = 0.25
    scratch_taus: list[float] | None = None  # None: every τ of the grid
    calibration_batches: int | None = None  # per reduction; None: the CompressionArguments default
    schedule_start: float = 0.0  # the cuts' window, fractions of the steps (CompressionArguments defaults: 0, 0.1)
    schedule_end: float = 0.1
    hnn_steps: int = 100  # regularised steps actually run (<= steps); the rest is extrapolated
    hnn_ratio: float = 0.1  # λ = hnn_ratio · loss / Σσ at the first step
    hnn_seeds: int = 1  # HNN runs only for the first hnn_seeds seeds
    probe_reps: int = 8  # step-time probe repetitions per size
    ceiling_target: float | None = None  # verdict: the step-time ceiling at the final sizes is at least this
    # Granite 4.0-H hybrid only (family "granitemoehybrid"; head_dim, n_groups, chunk_size as for Mamba-2)
    layer_pattern: str = ""  # one letter per layer: M (a Mamba-2 layer) or A (an attention layer); len == num_layers
    attention_heads: int = 2
    kv_heads: int = 1
    attention_head_dim: int = 64
    experts: int = 0  # routed MoE experts per layer (0: the dense shared MLP only, as the small Granite 4.0-H models)
    experts_per_token: int = 1
    expert_size: int = 64  # intermediate width of each routed expert
    shared_mlp_size: int = 256  # intermediate width of the shared (dense) MLP
    cache_contexts: list[int] = field(default_factory=list)  # probe: decode cache after a prefill of these lengths


def _read_presets(quick: bool, opt_in: bool) -> dict[str, TaskPreset]:
    presets = {}
    for name in preset_names("benchmark"):
        values = load_preset("benchmark", name)
        quick_values = values.pop("quick", None) or {}
        if values.pop("opt_in", False) and not opt_in:
            continue
        if quick:
            values.update(quick_values)
        where = f"configs/presets/benchmark/{name}.yaml" + (" (quick)" if quick else "")
        presets[name] = preset_into(TaskPreset, values, where)
    return presets


def default_presets(opt_in: bool = False) -> dict[str, TaskPreset]:
    """The presets, one file each: ``configs/presets/benchmark/<name>.yaml`` (TaskPreset fields; the others keep
    their defaults), in the files' ``order``. Adding a preset is adding a file. A file with ``opt_in: true`` is
    left out unless ``opt_in`` (the command runs it only when ``--tasks`` names it)."""
    return _read_presets(quick=False, opt_in=opt_in)


def quick_presets(opt_in: bool = False) -> dict[str, TaskPreset]:
    """Tiny versions of the presets (each file's ``quick`` values over its own: every variant and the report
    builder in seconds; numbers meaningless); ``opt_in`` as for `default_presets`."""
    return _read_presets(quick=True, opt_in=opt_in)


def _coerce(value: str, current: Any, name: str) -> Any:
    if name == "variants":
        return [v.strip() for v in value.split(",") if v.strip()]
    if name == "cache_contexts":
        return [int(v) for v in value.split(",") if v.strip()]
    if isinstance(current, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(current, list) or name in ("taus", "scratch_taus"):
        return [float(v) for v in value.split(",") if v.strip()]
    if value.lower() == "none" and name in ("train_samples", "calibration_batches", "ceiling_target", "scratch_taus"):
        return None
    if isinstance(current, int) or name in ("train_samples", "calibration_batches"):
        return int(value)
    if isinstance(current, float) or name == "ceiling_target":
        return float(value)
    return value


def apply_overrides(presets: dict[str, TaskPreset], overrides: list[str]) -> None:
    """``--set name.field=value`` (or ``field=value`` for every preset)."""
    names = {f.name for f in fields(TaskPreset)}
    for item in overrides:
        if "=" not in item:
            raise SystemExit(f"benchmark.py: --set expects name.field=value, got {item!r}")
        key, value = item.split("=", 1)
        task, _, name = key.rpartition(".")
        targets = [task] if task else list(presets)
        if name not in names or any(t not in presets for t in targets):
            raise SystemExit(
                f"benchmark.py: unknown --set key {key!r}; fields: {sorted(names)}; presets: {list(presets)}"
            )
        for t in targets:
            try:
                setattr(presets[t], name, _coerce(value, getattr(presets[t], name), name))
            except ValueError as err:
                raise SystemExit(f"benchmark.py: --set {item!r}: {err}") from err


def check_presets(presets: dict[str, TaskPreset]) -> None:
    for name, p in presets.items():
        if p.task not in TASK_KINDS:
            raise SystemExit(f"benchmark.py: {name}: task={p.task!r}; choose from {TASK_KINDS}")
        if p.family not in MODEL_FAMILIES:
            raise SystemExit(f"benchmark.py: {name}: family={p.family!r}; available: {sorted(MODEL_FAMILIES)}")
        if p.family != "mamba" and (p.task != "causal_lm" or "hnn" in p.variants):
            raise SystemExit(f"benchmark.py: {name}: the {p.family} family runs causal_lm without the hnn variant")
        if p.family == "granitemoehybrid" and (
            len(p.layer_pattern) != p.num_layers or set(p.layer_pattern) - {"M", "A"} or "M" not in p.layer_pattern
        ):
            raise SystemExit(
                f"benchmark.py: {name}: layer_pattern={p.layer_pattern!r} needs one letter M (Mamba) or A "
                f"(attention) per layer (num_layers={p.num_layers}), at least one M"
            )
        if unknown := [v for v in p.variants if v not in VARIANTS]:
            raise SystemExit(f"benchmark.py: {name}: unknown variants {unknown}; choose from {VARIANTS}")
        if p.main_tau not in p.taus:
            raise SystemExit(f"benchmark.py: {name}: main_tau={p.main_tau} is not in the τ grid {p.taus}")
        if p.steps < 1 or p.hnn_steps < 1:
            raise SystemExit(f"benchmark.py: {name}: steps and hnn_steps must be >= 1")


# ----------------------------------------------------------------------------------------------------------------
# Arguments (parsed before torch is imported: thread counts must be in the environment first)
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny settings: every variant in about a minute")
    parser.add_argument("--output_dir", default=None, help="where the results file, JSON, Markdown and PNGs go")
    parser.add_argument("--tasks", default=None, help="comma-separated preset names (default: every preset)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--taus", default=None, help="comma-separated τ grid for every preset (overrides the presets)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="name.field=value or field=value (every preset)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch/numba threads per run (default 1)")
    parser.add_argument("--no_probe", action="store_true", help="skip the step-time probes")
    parser.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--fresh", action="store_true", help="discard the runs already in the results file")
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="no benchmark: time a few steps per preset and print the estimated duration of the runs still to do",
    )
    parser.add_argument("--note", action="append", default=[], help="a note to add to the report")
    parser.add_argument(
        "--report_from", default=None, help="no training: rebuild tables, verdicts and plots from this benchmark.json"
    )
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in args.variants if v not in VARIANTS]:
        parser.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds needs distinct integers, e.g. 0,1,2")
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import Trainer, set_seed  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from benchmark_report import finish_report  # noqa: E402
from compressssm_app import DataArguments, ModelArguments, TaskData, build_datasets, build_model, hf_datasets, sources  # noqa: E402  # noqa: E402
from compressssm_app.evaluation import evaluate_quality  # noqa: E402
from compressssm_app.experiment import peak_rss_mb, train_and_measure, training_arguments  # noqa: E402
from compressssm_app.harness import ResultsMismatchError, ResultsStore, fingerprint, git_state, in_child  # noqa: E402
from compressssm_app.model_builder import build_granite_hybrid_model  # noqa: E402
from hf_compressssm.compression.arguments import CompressionArguments  # noqa: E402
from hf_compressssm.compression.decay_sum import decay_deficit_sum  # noqa: E402
from hf_compressssm.compression.hnn import HNNTrainer  # noqa: E402
from hf_compressssm.compression.reduction import compress_model  # noqa: E402
from hf_compressssm.trainer.callback import CompreSSMCallback  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# Data and models
# ----------------------------------------------------------------------------------------------------------------


def _pooled_pixels(name: str, split: str, pool: int, num_bins: int, limit: int | None) -> sources.PixelSequences:
    """The pixel dataset with k x k mean pooling (k = ``pool``) before flattening; ``pool=1`` is the original."""
    full = sources.load_pixel_classification(name, split, 256, limit)
    side = int(round(math.sqrt(full.seq_len)))
    pixels = full.tokens.numpy().astype(np.float64).reshape(len(full), side, side)
    if pool > 1:
        if side % pool:
            raise SystemExit(f"benchmark.py: pool={pool} does not divide the image side {side}")
        pixels = pixels.reshape(len(full), side // pool, pool, side // pool, pool).mean(axis=(2, 4))
    pixels = np.rint(pixels).clip(0, 255).astype(np.int64).reshape(len(full), -1)
    return sources.PixelSequences(pixels, full.labels.numpy(), num_bins, full.class_names, name=name, split=split)


def build_task_data(p: TaskPreset) -> TaskData:
    """Train/eval datasets of a preset (the LM data through `compressssm_app.build_datasets`)."""
    if p.task == "causal_lm":
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
        train_dataset=hf_datasets.pixel_dataset(train),
        eval_dataset=hf_datasets.pixel_dataset(test),
        vocab_size=p.num_bins,
        metric="accuracy",
        dataset_description=f"{p.dataset} ({len(train)} training images), {side}x{side} "
        f"({p.pool}x{p.pool} mean-pooled) pixel sequences of length {train.seq_len}",
        eval_description=f"the first {len(test)} images of the official {p.dataset} test split",
        num_labels=train.num_classes,
        sequence_length=train.seq_len,
    )


def model_arguments(p: TaskPreset) -> ModelArguments:
    """The `ModelArguments` of a preset's model at N0 (its family: ``mamba`` or ``mamba2``)."""
    values: dict[str, Any] = dict(
        hidden_size=p.hidden_size, num_hidden_layers=p.num_layers, state_size=p.state_size, tokenizer_name=None
    )
    if p.family == "mamba2":
        values.update(
            model_type="compressssm_mamba2", head_dim=p.head_dim, n_groups=p.n_groups, chunk_size=p.chunk_size
        )
    return ModelArguments(**values)


MODEL_FAMILIES = ("mamba", "mamba2", "granitemoehybrid")
FAMILY_FIELDS = {
    "mamba2": ("head_dim", "n_groups", "chunk_size"),
    "granitemoehybrid": (
        "head_dim",
        "n_groups",
        "chunk_size",
        "layer_pattern",
        "attention_heads",
        "kv_heads",
        "attention_head_dim",
        "experts",
        "experts_per_token",
        "expert_size",
        "shared_mlp_size",
        "cache_contexts",
    ),
}
"""Preset fields only some families read (left out of the other families' fingerprints: their results files stay
valid)."""


def ssm_layer_count(p: TaskPreset) -> int:
    """How many layers of the preset's model have an SSM state (the length of its ``config.state_sizes``)."""
    return p.layer_pattern.count("M") if p.family == "granitemoehybrid" else p.num_layers


def new_model(task_data: TaskData, p: TaskPreset, seed: int, state_sizes: list[int] | None = None):
    """A freshly initialised model (seeded), optionally with per-layer ``state_sizes`` (one per SSM layer):
    `build_model`, or `build_granite_hybrid_model` for the hybrid family."""
    set_seed(seed)
    if p.family != "granitemoehybrid":
        return build_model(model_arguments(p), task_data, state_sizes=state_sizes)
    return build_granite_hybrid_model(
        task_data,
        hidden_size=p.hidden_size,
        layer_pattern=p.layer_pattern,
        state_size=p.state_size,
        head_dim=p.head_dim,
        n_groups=p.n_groups,
        chunk_size=p.chunk_size,
        attention_heads=p.attention_heads,
        kv_heads=p.kv_heads,
        attention_head_dim=p.attention_head_dim,
        experts=p.experts,
        experts_per_token=p.experts_per_token,
        expert_size=p.expert_size,
        shared_mlp_size=p.shared_mlp_size,
        max_positions=max([p.block_size, *p.cache_contexts]),
        state_sizes=state_sizes,
    )


def _warm_up(task_data: TaskData, p: TaskPreset) -> None:
    """One tiny forward/backward of the task's model class and one call of the calibration kernel: JIT-compiles the
    numba kernels into their disk cache before any timed run (each run then only loads them)."""
    decay_deficit_sum(torch.rand(4, 3), -torch.rand(3, 2))
    tiny = copy.copy(p)
    tiny.hidden_size, tiny.state_size, tiny.head_dim, tiny.n_groups, tiny.chunk_size = 8, 4, 8, 1, 16
    model = new_model(task_data, tiny, 0)
    item = task_data.train_dataset[0]
    ids = item["input_ids"][None, :16] if p.task == "causal_lm" else item["input_ids"][None]
    labels = ids if p.task == "causal_lm" else torch.tensor([int(item["labels"])])
    model(input_ids=ids, labels=labels).loss.backward()


# ----------------------------------------------------------------------------------------------------------------
# One run (in a forked child)
# ----------------------------------------------------------------------------------------------------------------


def compression_arguments(p: TaskPreset, **values: Any) -> CompressionArguments:
    """The preset's `CompressionArguments` (schedule window, calibration batches) with ``values``."""
    extra = {} if p.calibration_batches is None else {"calibration_batches": p.calibration_batches}
    return CompressionArguments(schedule_start=p.schedule_start, schedule_end=p.schedule_end, **extra, **values)


def first_cut_step(p: TaskPreset) -> int:
    return compression_arguments(p).schedule(p.steps)[0]


def curve_steps(p: TaskPreset) -> list[int]:
    """Evaluation steps of a learning curve: ``curve_points`` evenly spaced, plus the first cut and its step before."""
    if p.curve_points <= 0:
        return []
    cut = first_cut_step(p)
    points = {max(1, round(p.steps * i / p.curve_points)) for i in range(1, p.curve_points + 1)}
    return sorted(points | {cut, max(1, cut - 1)})


def run_variant(spec: dict[str, Any], task_data: TaskData, p: TaskPreset, threads: int) -> dict[str, Any]:
    """Train one variant and measure it. ``spec``: variant, seed, tau, selection, state_sizes, curve."""
    start = time.perf_counter()
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    _warm_up(task_data, p)
    variant, seed, tau = spec["variant"], spec["seed"], spec.get("tau")
    model = new_model(task_data, p, seed, spec.get("state_sizes"))
    callbacks = []
    if variant in ("compressssm", "smallest", "random"):
        comp = compression_arguments(p, tau=tau, selection=spec.get("selection", "largest"), compression_seed=seed)
        callbacks.append(CompreSSMCallback(comp))
    hnn = variant == "hnn"
    with tempfile.TemporaryDirectory(prefix="compressssm_bench_") as out:
        args = training_arguments(
            out,
            steps=p.steps,
            batch_size=p.batch_size,
            learning_rate=p.learning_rate,
            seed=seed,
            warmup=p.warmup,
            weight_decay=p.weight_decay,
            drop_last=True,
            use_cpu=True,
        )
        run = train_and_measure(
            model,
            task_data.train_dataset,
            args,
            callbacks=callbacks,
            trainer_cls=HNNTrainer if hnn else Trainer,
            trainer_kwargs={"hnn_ratio": p.hnn_ratio} if hnn else None,
            stop_after=min(p.hnn_steps, p.steps) if hnn else None,
            eval_dataset=task_data.eval_dataset,
            task=p.task,
            eval_batch_size=p.eval_batch_size,
            curve_steps=curve_steps(p) if spec.get("curve") else (),
        )
    result: dict[str, Any] = {
        **{k: v for k, v in spec.items() if k != "state_sizes"},
        "scratch_sizes": spec.get("state_sizes"),
        "steps_planned": p.steps,
        **run.summary(),
    }
    if hnn:
        model = run.model
        result["hnn"] = run.trainer.hnn_summary()
        result["eval_before_truncation"] = result["eval"]
        result["sizes_before_truncation"] = list(model.config.state_sizes)
        loader = torch.utils.data.DataLoader(task_data.train_dataset, batch_size=p.batch_size, shuffle=False)
        extra = {} if p.calibration_batches is None else {"calibration_batches": p.calibration_batches}
        report = compress_model(model, loader, tau=tau, **extra)
        result["truncation"] = {"seconds": report.seconds, "sizes_after": report.sizes_after}
        result["reduction_seconds"] = report.seconds
        measured = len(run.step_times)
        overhead = max(0.0, run.train_seconds - sum(run.step_times))  # one-off Trainer set-up
        result["hnn_measured_steps"] = measured
        result["hnn_extrapolated"] = measured < p.steps
        result["total_seconds"] = statistics.fmean(run.step_times) * p.steps + overhead + report.seconds
        result["total_cpu_seconds"] = run.train_cpu_seconds / max(1, measured) * p.steps + report.seconds
        result["sizes_final"] = list(model.config.state_sizes)
        result["mean_size"] = statistics.fmean(result["sizes_final"])
        result["eval"] = evaluate_quality(model, task_data.eval_dataset, p.task, p.eval_batch_size)
    else:
        result["total_seconds"] = run.train_seconds
        result["total_cpu_seconds"] = run.train_cpu_seconds
    result["reduction_share"] = result["reduction_seconds"] / max(1e-12, result["total_seconds"])
    result["peak_rss_mb"] = peak_rss_mb()
    result["run_seconds"] = time.perf_counter() - start
    return result


def _scan_share(model, batch) -> dict[str, float | None]:
    """The scan kernel's share of a profiled step: our numba scans (Mamba-1's selective scan, Mamba-2's SSD scan),
    forward and backward; None when no such op ran (the torch paths, the hybrids' stock mixers: no single scan op to
    attribute)."""
    from torch.profiler import ProfilerActivity, profile

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    keys = ("SelectiveScanFunction", "SSDScanFunction")
    scan = sum(e.cpu_time_total for e in events if e.key in keys or e.key in [k + "Backward" for k in keys])
    return {"scan_share": scan / max(1e-12, total) if scan > 0 else None, "profiled_step_ms": total / 1000.0}


def _tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of every tensor reachable from ``obj`` (attributes, lists, tuples, dicts; each object once)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        return sum(_tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def decode_cache_bytes(model, input_ids: torch.Tensor) -> int:
    """Bytes per sequence of the decode cache (conv states + recurrent states of every layer) after a one-token
    forward of the backbone with ``use_cache=True``: what `generate` carries from token to token (the backbone: a
    sequence classifier's head takes no cache, its SSM layers hold the same states)."""
    model.eval()
    with torch.no_grad():
        out = getattr(model, "backbone", model)(input_ids=input_ids[:1, :1], use_cache=True)
    model.train()
    cache = out.get("cache", None) or out.get("past_key_values", None) or out.get("cache_params", None)
    if cache is None:
        raise RuntimeError(f"{type(model).__name__} returned no decode cache with use_cache=True")
    return _tensor_bytes(cache)


def context_cache_bytes(model, context: int) -> dict[str, int]:
    """Bytes of the decode cache of one sequence (batch 1) after a prefill of ``context`` tokens with
    ``use_cache=True``: the real cache object the model builds, summed tensor by tensor. ``attention_kv``: the keys
    and values of the attention layers; ``ssm_states``: the conv and recurrent states of the Mamba layers;
    ``other``: any further tensor the cache holds (bookkeeping such as token counters); ``total``: all of them."""
    vocab = int(model.config.vocab_size)
    ids = (torch.arange(context) % vocab)[None]
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    model.train()
    cache = out.get("cache", None) or out.get("past_key_values", None)
    if cache is None:
        raise RuntimeError(f"{type(model).__name__} returned no decode cache with use_cache=True")
    kv = ssm = 0
    for layer in getattr(cache, "layers", []):
        kv += sum(_tensor_bytes(getattr(layer, name, None)) for name in ("keys", "values"))
        ssm += sum(_tensor_bytes(getattr(layer, name, None)) for name in ("conv_states", "recurrent_states"))
    total = _tensor_bytes(cache)
    return {"attention_kv": kv, "ssm_states": ssm, "other": total - kv - ssm, "total": total}


def run_probe(spec: dict[str, Any], task_data: TaskData, p: TaskPreset, threads: int) -> dict[str, Any]:
    """Time one training step (forward, backward, AdamW) on a fixed batch at N0 and at ``spec['sizes']``."""
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    _warm_up(task_data, p)
    sizes = {"full": None, "compressed": spec["sizes"], "min": [1] * ssm_layer_count(p)}
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
    for n in sorted({1, p.calibration_batches or 1, CompressionArguments().calibration_batches}):
        c0, w0 = time.process_time(), time.perf_counter()
        collect_statistics(models["full"], [batch] * n)
        calib[str(n)] = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}
    out["calibration_at_n0"] = calib
    full, comp, low = (out[k]["cpu_median_s"] for k in ("full", "compressed", "min"))
    out["step_speedup_cpu"] = full / comp
    out["step_speedup_wall"] = out["full"]["wall_median_s"] / out["compressed"]["wall_median_s"]
    out["step_speedup_at_size_1_cpu"] = full / low
    share = out["full"]["scan_share"]
    out["non_scan_share_full"] = None if share is None else 1.0 - share
    out["amdahl_limit"] = None if share is None else 1.0 / max(1e-12, 1.0 - share)
    cache = {k: decode_cache_bytes(models[k], batch["input_ids"]) for k in ("full", "compressed")}
    out["decode_cache"] = {
        "bytes_per_sequence": cache,
        "ratio": cache["full"] / cache["compressed"],
        "dtype": str(next(models["full"].parameters()).dtype).replace("torch.", ""),
    }
    if p.family == "granitemoehybrid" and p.cache_contexts:
        out["decode_cache_context"] = {
            str(t): {k: context_cache_bytes(models[k], t) for k in ("full", "compressed")} for t in p.cache_contexts
        }
    return out


def time_steps(task_data: TaskData, p: TaskPreset, threads: int, steps: int = 6) -> dict[str, float]:
    """CPU seconds per training step at N0, at a tenth of N0 (about CompreSSM's final sizes) and with the HNN
    regulariser, and of one evaluation at N0 (short runs; the estimate of `estimate_seconds`)."""
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    _warm_up(task_data, p)
    out: dict[str, float] = {}
    small = [max(1, p.state_size // 10)] * ssm_layer_count(p)
    out["hnn"] = float("nan")
    for label, sizes, trainer_cls in (("full", None, Trainer), ("small", small, Trainer), ("hnn", None, HNNTrainer)):
        if label == "hnn" and "hnn" not in p.variants:
            continue
        model = new_model(task_data, p, 0, sizes)
        with tempfile.TemporaryDirectory() as tmp:
            args = training_arguments(
                tmp, steps=p.steps, batch_size=p.batch_size, learning_rate=p.learning_rate, seed=0, use_cpu=True
            )
            run = train_and_measure(model, task_data.train_dataset, args, trainer_cls=trainer_cls, stop_after=steps)
        out[label] = statistics.median(run.step_cpu_times[1:])  # the first step pays one-off set-up
    cpu = time.process_time()
    evaluate_quality(new_model(task_data, p, 0), task_data.eval_dataset, p.task, p.eval_batch_size)
    out["eval"] = time.process_time() - cpu
    return out


def estimate_seconds(spec: dict[str, Any], p: TaskPreset, t: dict[str, float]) -> float:
    """Estimated seconds of one planned run from per-step times ``t`` (`time_steps`), on an otherwise idle core."""
    evals = 1 + (len(curve_steps(p)) if spec.get("curve") else 0)
    if spec["variant"] == "full":
        train = p.steps * t["full"]
    elif spec["variant"] == "scratch":
        train = p.steps * t["small"]
    elif spec["variant"] == "hnn":
        train, evals = min(p.hnn_steps, p.steps) * t["hnn"] + 4 * t["full"], 2
    else:  # cuts spread over the first 10 %: about half-way between N0 and the final sizes there
        train = p.steps * (0.05 * (t["full"] + t["small"]) + 0.9 * t["small"]) + 4 * 4 * t["full"]
    return train + evals * t["eval"]


def print_estimate(presets, datasets, specs, store: ResultsStore, threads: int) -> int:
    total = 0.0
    for name, p in presets.items():
        t = in_child(time_steps, datasets[name], p, threads)
        todo = [s for s in specs if s["task"] == name and store.get(run_id(name, s["key"], s["seed"])) is None]
        seconds = sum(estimate_seconds(s, p, t) for s in todo)
        probe = 0.0 if store.get(run_id(name, "probe", None)) else (p.probe_reps + 3) * 3 * t["full"]
        total += seconds + probe
        print(
            f"{name}: CPU s/step {t['full']:.3f} at N0, {t['small']:.3f} at N0/10, HNN {t['hnn']:.3f}; one evaluation "
            f"{t['eval']:.1f} s; {len(todo)} runs to do: ~{(seconds + probe) / 60:.0f} min",
            flush=True,
        )
    print(f"estimated time still to run: ~{total / 60:.0f} min on an otherwise idle core", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------------------------


def run_key(variant: str, tau: float | None) -> str:
    return variant if tau is None or variant == "full" else f"{variant}@{tau:g}"


def plan_seed(name: str, p: TaskPreset, seed: int, seed_index: int, variants: list[str]) -> list[dict[str, Any]]:
    """The runs of one (preset, seed); the variant order is reversed on odd seeds so that background load hits
    every variant alike."""
    scratch_taus = p.scratch_taus if p.scratch_taus is not None else p.taus
    comp = [dict(variant="compressssm", tau=t, selection="largest", curve=t == p.main_tau) for t in p.taus]
    scratch = [dict(variant="scratch", tau=t) for t in scratch_taus if t in p.taus]
    ablations = [dict(variant=s, tau=p.main_tau, selection=s) for s in ("smallest", "random")]
    hnn = [dict(variant="hnn", tau=p.main_tau)] if seed_index < p.hnn_seeds else []
    full = [dict(variant="full", tau=None, curve=True)]
    order = full + comp + scratch + ablations + hnn if seed_index % 2 == 0 else hnn + ablations + comp + full + scratch
    runs = []
    for r in order:
        if r["variant"] not in variants or r["variant"] not in p.variants:
            continue
        if r["variant"] == "scratch" and "compressssm" not in variants:
            continue
        runs.append({"task": name, "seed": seed, **r, "key": run_key(r["variant"], r["tau"])})
    return runs


def run_id(name: str, key: str, seed: int | None) -> str:
    return f"{name}/{key}" + ("" if seed is None else f"/seed{seed}")


def preset_fingerprint(p: TaskPreset, threads: int) -> str:
    """What a preset's runs depend on (not the seeds or variants asked for: adding some reuses the rest)."""
    own = {f for fam, names in FAMILY_FIELDS.items() if fam != p.family for f in names}
    own -= set(FAMILY_FIELDS.get(p.family, ()))
    preset = {k: v for k, v in asdict(p).items() if k not in own}
    return fingerprint({"preset": preset, "threads": threads})


def _load() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def select_presets(args: argparse.Namespace) -> dict[str, TaskPreset]:
    presets = quick_presets(opt_in=True) if args.quick else default_presets(opt_in=True)
    default_names = list(quick_presets() if args.quick else default_presets())  # opt-in ones run only when named
    if args.taus:
        taus = [float(t) for t in args.taus.split(",") if t.strip()]
        for p in presets.values():
            p.taus = taus
            if p.main_tau not in taus:
                p.main_tau = taus[len(taus) // 2]
    apply_overrides(presets, args.overrides)
    names = [t.strip() for t in (args.tasks or ",".join(default_names)).split(",") if t.strip()]
    if unknown := [n for n in names if n not in presets]:
        raise SystemExit(f"benchmark.py: unknown preset(s) {unknown}; choose from {list(presets)}")
    presets = {n: presets[n] for n in names}
    check_presets(presets)
    return presets


def main(args: argparse.Namespace) -> int:
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.report_from:
        return report_from(args.report_from, out_dir, plots=not args.no_plots, notes=args.note)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    presets = select_presets(args)
    code = git_state(REPO)
    try:
        store = ResultsStore(
            out_dir / RUNS_FILE,
            {n: preset_fingerprint(p, args.threads) for n, p in presets.items()},
            commit=code["commit"],
            fresh=args.fresh and not args.estimate,
        )
    except ResultsMismatchError as err:
        raise SystemExit(f"benchmark.py: {err}") from err
    if store.records:
        print(f"resuming: {len(store.records)} finished runs in {store.path}", flush=True)
    if store.other_commits:
        print(
            "note: runs measured at other commits are reused: "
            + ", ".join(f"{c[:10]} ({n} runs)" for c, n in store.other_commits.items())
            + f"; the code is now at {str(code['commit'])[:10]} (pass --fresh to re-measure)",
            flush=True,
        )
    start, load_start = time.perf_counter(), _load()
    print(
        f"benchmark: presets {list(presets)}, seeds {args.seeds}, {args.threads} thread(s), output {out_dir}",
        flush=True,
    )
    datasets = {}
    for name, p in presets.items():
        t0 = time.perf_counter()
        datasets[name] = build_task_data(p)
        print(f"  data {name}: {datasets[name].dataset_description} ({time.perf_counter() - t0:.1f} s)", flush=True)
    first = next(iter(presets))
    in_child(lambda: (_warm_up(datasets[first], presets[first]), {})[1])  # compile/load the scan kernel once

    failures: list[dict[str, Any]] = []
    plan = [(name, s, i) for i, s in enumerate(args.seeds) for name in presets]
    specs = [spec for name, s, i in plan for spec in plan_seed(name, presets[name], s, i, args.variants)]
    if args.estimate:
        return print_estimate(presets, datasets, specs, store, args.threads)
    for count, spec in enumerate(specs, 1):
        name, seed, key = spec["task"], spec["seed"], spec["key"]
        ident = run_id(name, key, seed)
        prefix = f"[{count}/{len(specs)}] {ident}"
        if store.get(ident) is not None:
            print(f"{prefix}: done before, skipped", flush=True)
            continue
        if spec["variant"] == "scratch":
            src = store.get(run_id(name, run_key("compressssm", spec["tau"]), seed))
            if src is None:
                print(f"{prefix}: skipped (no CompreSSM run of this seed to take sizes from)", flush=True)
                continue
            spec["state_sizes"] = src["sizes_final"]
        try:
            result = in_child(run_variant, spec, datasets[name], presets[name], args.threads)
        except RuntimeError as err:  # one failed run must not cost the others: report it and go on
            failures.append({"task": name, "seed": seed, "key": key, "error": str(err)})
            print(f"{prefix}: FAILED: {err}", flush=True)
            continue
        store.add(ident, name, result)
        q = result["eval"]
        qs = f"loss {q['loss']:.4f}" + (f", acc {100 * q['accuracy']:.2f} %" if "accuracy" in q else "")
        print(
            f"{prefix}: sizes {result['sizes_final']}, {qs}, train {result['train_seconds']:.1f} s wall / "
            f"{result['train_cpu_seconds']:.1f} s CPU (total {result['total_seconds']:.1f} s), step median "
            f"{result['step_times'].get('median_s', float('nan')):.3f} s; elapsed "
            f"{(time.perf_counter() - start) / 60:.1f} min (load {_load()})",
            flush=True,
        )
    for name, p in presets.items():
        ident = run_id(name, "probe", None)
        src = store.get(run_id(name, run_key("compressssm", p.main_tau), args.seeds[0]))
        if args.no_probe or src is None or store.get(ident) is not None:
            continue
        try:
            probe = in_child(run_probe, {"sizes": src["sizes_final"]}, datasets[name], p, args.threads)
        except RuntimeError as err:
            failures.append({"task": name, "seed": None, "key": "probe", "error": str(err)})
            print(f"  probe {name}: FAILED: {err}", flush=True)
            continue
        store.add(ident, name, probe)
        print(
            f"  probe {name}: ceiling {probe['step_speedup_cpu']:.2f}x (CPU), scan share "
            + ("n/a" if probe["full"]["scan_share"] is None else f"{100 * probe['full']['scan_share']:.0f} %")
            + f", decode cache per sequence {probe['decode_cache']['ratio']:.2f}x smaller",
            flush=True,
        )

    report = build_report(args, presets, datasets, store, code)
    missing = [spec for spec in specs if store.get(run_id(spec["task"], spec["key"], spec["seed"])) is None]
    report["meta"]["planned_runs"], report["meta"]["missing_runs"] = (
        len(specs),
        [run_id(s["task"], s["key"], s["seed"]) for s in missing],
    )
    report["failures"] = failures
    report["meta"].update(load_start=load_start, load_end=_load(), total_seconds=time.perf_counter() - start)
    finish_report(report, out_dir, plots=not args.no_plots)
    if missing or failures:
        print(f"{len(missing)} planned runs missing ({len(failures)} failed): rerun the same command", flush=True)
        return 1
    return 0


def build_report(args, presets, datasets, store: ResultsStore, code: dict[str, Any]) -> dict[str, Any]:
    """The report of every finished run of the asked presets and seeds (this sitting's and earlier ones')."""
    seeds = set(args.seeds)
    commits: dict[str, int] = {}
    measured = 0.0
    report: dict[str, Any] = {"tasks": {}}
    for name, p in presets.items():
        records = [r for r in store.records.values() if r["group"] == name]
        runs = [r["result"] for r in records if "seed" in r["result"] and r["result"]["seed"] in seeds]
        runs = [r for r in runs if r["variant"] in args.variants and r["variant"] in p.variants]
        for r in records:
            commits[str(r.get("commit"))] = commits.get(str(r.get("commit")), 0) + 1
            measured += float(r["result"].get("run_seconds", 0.0))
        preset = asdict(p) | {"first_cut_step": first_cut_step(p)}
        report["tasks"][name] = {
            "preset": preset,
            "data": datasets[name].dataset_description,
            "eval_split": datasets[name].eval_description,
            "runs": runs,
            "probe": store.get(run_id(name, "probe", None)),
        }
    report["meta"] = {
        "command": " ".join(["python scripts/benchmark.py", *(shlex.quote(a) for a in sys.argv[1:])]),
        "quick": args.quick,
        "seeds": args.seeds,
        "threads": args.threads,
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
        f"{platform.system()} {platform.release()}".replace("  ", " "),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "git_commit": code["commit"],
        "git_dirty": code["dirty"],
        "run_commits": commits,
        "measured_seconds": measured,
        "results_file": str(store.path),
        "notes_extra": list(args.note),
    }
    return report


def report_from(path: str, out_dir: Path, plots: bool = True, notes: list[str] | None = None) -> int:
    """Rebuild the aggregates, verdicts, Markdown and plots from an earlier ``benchmark.json`` (no training)."""
    report = json.loads(Path(path).read_text())
    report["meta"]["report_regenerated"] = {
        "from": str(path),
        "git_commit": git_state(REPO)["commit"],
        "at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    extra = list(report["meta"].get("notes_extra", []))
    report["meta"]["notes_extra"] = extra + [n for n in (notes or []) if n not in extra]
    finish_report(report, out_dir, plots)
    return 0


if __name__ == "__main__":
    sys.exit(main(_ARGS))
