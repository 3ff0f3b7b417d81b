#!/usr/bin/env python
"""The fine-tuning case of a hybrid: compress a trained Granite-4.0-H-shaped model post hoc or at the start of a short
fine-tune, and compare with the uncompressed fine-tune.

    python scripts/hybrid_finetune_study.py                # ~25 min of run time on one core; resumable
    python scripts/hybrid_finetune_study.py --quick        # tiny, every part in a minute (numbers meaningless)

The model is Granite-4.0-H-Tiny's configuration scaled down so that it trains on a CPU (`tiny_scaled_config`): the
same layer pattern (one attention layer per ten, at the sixth position), head dims (Mamba heads of 64 channels,
attention heads of 128 with three query heads per KV head), one group of N0 = 128 states, a routed MoE with a
shared MLP (expert width hidden/3, shared width 2·hidden/3), NoPE, tied embeddings; hidden 128, 10 layers, and 32
experts with 3 active instead of 64 with 6 (the same active fraction, at half the CPU cost of the expert loop).
Hub weights cannot be downloaded here, so it is trained here first.

Parts, each written to ``<output_dir>/hybrid_finetune_runs.jsonl`` as it finishes (a rerun skips what is done; the
pretrained weights are kept in ``--work_dir``), then to ``hybrid_finetune_study.json`` / ``.md``:

* ``pretrain``: ``pretrain_steps`` steps at N0 on the first blocks of the KJV training text (Genesis onward);
* ``posthoc@…``: the pretrained model compressed once with ``compress_model`` (``target_sizes`` = k in every Mamba
  layer for each k of ``posthoc_sizes``, and τ = ``tau``), calibrated on the first fine-tuning batches, evaluated
  before and after, no training;
* ``finetune/…``: ``finetune_steps`` steps from the pretrained weights on the New Testament blocks (a new domain):
  ``full`` (uncompressed), ``cut@k`` (`CompreSSMCallback` with one cut to k states per layer at step ``cut_step``,
  mode ``fixed``) and ``tau@τ`` (one cut at ``cut_step`` with the default tolerance rule); validation loss right
  after the cut (before the recovery steps), half-way and at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results" / "hybrid"
RUNS_FILE = "hybrid_finetune_runs.jsonl"
GROUP = "hybrid_finetune"


@dataclass
class StudySettings:
    """Everything the study's numbers depend on (its fingerprint)."""

    # model: Granite-4.0-H-Tiny scaled down (see the module docstring)
    hidden_size: int = 128
    layer_pattern: str = "MMMMMAMMMM"
    attention_heads: int = 3
    kv_heads: int = 1
    attention_head_dim: int = 128
    mamba_head_dim: int = 64
    state_size: int = 128
    chunk_size: int = 256
    experts: int = 32
    experts_per_token: int = 3
    # data
    block_size: int = 256
    eval_blocks: int = 100
    finetune_offset: int = 12460  # first fine-tuning block: the New Testament (Matthew 1) of the KJV training split
    # training
    seed: int = 0
    batch_size: int = 4
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3
    finetune_steps: int = 150
    finetune_lr: float = 1e-3
    # compression
    cut_step: int = 4  # the callback's cut: after calibrating on the first cut_step fine-tuning batches
    calibration_batches: int = 4
    posthoc_sizes: list[int] = field(default_factory=lambda: [64, 32, 16, 8])
    finetune_sizes: list[int] = field(default_factory=lambda: [32])
    tau: float = 0.25


def quick_settings() -> StudySettings:
    return StudySettings(
        hidden_size=32,
        attention_head_dim=16,
        mamba_head_dim=16,
        state_size=16,
        chunk_size=16,
        experts=4,
        experts_per_token=1,
        block_size=32,
        eval_blocks=4,
        finetune_offset=200,
        pretrain_steps=8,
        finetune_steps=8,
        cut_step=2,
        calibration_batches=2,
        posthoc_sizes=[8, 4],
        finetune_sizes=[4],
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (numbers meaningless)")
    parser.add_argument(
        "--output_dir", default=None, help="results file, JSON and Markdown (default scripts/results/hybrid)"
    )
    parser.add_argument("--work_dir", default=None, help="where the pretrained weights are kept (default outputs/...)")
    parser.add_argument("--fresh", action="store_true", help="discard the parts already in the results file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = str(RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)
    if args.work_dir is None:
        args.work_dir = str(
            REPO / "outputs" / ("hybrid_finetune_study_quick" if args.quick else "hybrid_finetune_study")
        )
    return args


if __name__ == "__main__":
    _ARGS = parse_args()
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[_var] = str(_ARGS.threads)

import torch  # noqa: E402
from transformers import set_seed  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from compressssm_app import DataArguments, ModelArguments, TaskData, build_datasets  # noqa: E402
from compressssm_app.evaluation import count_parameters, evaluate_quality  # noqa: E402
from compressssm_app.experiment import train_and_measure, training_arguments  # noqa: E402
from compressssm_app.harness import ResultsMismatchError, ResultsStore, fingerprint, git_state  # noqa: E402
from hf_compressssm import (  # noqa: E402
    CompreSSMCallback,
    CompreSSMGraniteMoeHybridConfig,
    CompreSSMGraniteMoeHybridForCausalLM,
    compress_model,
)
from hf_compressssm.compression.arguments import CompressionArguments  # noqa: E402
from hf_compressssm.compression.atomic_io import write_json_atomic, write_text_atomic  # noqa: E402


def tiny_scaled_config(s: StudySettings, vocab_size: int, special: dict[str, int]) -> CompreSSMGraniteMoeHybridConfig:
    """Granite-4.0-H-Tiny's layout at ``s.hidden_size``; μP multipliers at transformers' defaults except the attention
    scale 1/head_dim (Granite 4.0-H's choice)."""
    return CompreSSMGraniteMoeHybridConfig(
        vocab_size=vocab_size,
        hidden_size=s.hidden_size,
        num_hidden_layers=len(s.layer_pattern),
        layer_types=["mamba" if c == "M" else "attention" for c in s.layer_pattern],
        num_attention_heads=s.attention_heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.attention_head_dim,
        attention_multiplier=1.0 / s.attention_head_dim,
        position_embedding_type="nope",
        max_position_embeddings=4096,
        mamba_n_heads=2 * s.hidden_size // s.mamba_head_dim,
        mamba_d_head=s.mamba_head_dim,
        mamba_n_groups=1,
        mamba_d_state=s.state_size,
        mamba_chunk_size=s.chunk_size,
        num_local_experts=s.experts,
        num_experts_per_tok=s.experts_per_token,
        intermediate_size=s.hidden_size // 3,
        shared_intermediate_size=2 * s.hidden_size // 3,
        tie_word_embeddings=True,
        **(special or {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}),
    )


@dataclass
class StudyData:
    task: TaskData
    pretrain: Any
    finetune: Any
    finetune_starts_with: str


def build_data(s: StudySettings) -> StudyData:
    need = s.finetune_offset + s.finetune_steps * s.batch_size
    data_args = DataArguments(
        task="causal_lm", block_size=s.block_size, max_train_samples=need, max_eval_samples=s.eval_blocks
    )
    task = build_datasets(data_args, model_args=ModelArguments(tokenizer_name="byte"))
    train = task.train_dataset
    if len(train) < need:
        raise SystemExit(f"hybrid_finetune_study.py: the training text has {len(train)} blocks, {need} needed")
    pretrain = train.select(range(s.pretrain_steps * s.batch_size))
    finetune = train.select(range(s.finetune_offset, need))
    first = bytes(int(t) for t in finetune[0]["input_ids"][:60]).decode("utf-8", "replace")
    return StudyData(task, pretrain, finetune, first)


def _args(out: str, s: StudySettings, steps: int, lr: float):
    return training_arguments(
        out, steps=steps, batch_size=s.batch_size, learning_rate=lr, seed=s.seed, weight_decay=0.01, use_cpu=True
    )


def _eval(model, data: StudyData, s: StudySettings) -> dict[str, float]:
    return evaluate_quality(model, data.task.eval_dataset, "causal_lm", batch_size=8)


def _calibration_batches(data: StudyData, s: StudySettings) -> list[dict[str, torch.Tensor]]:
    loader = torch.utils.data.DataLoader(data.finetune.with_format("torch"), batch_size=s.batch_size, shuffle=False)
    batches = []
    for batch in loader:
        batches.append({"input_ids": batch["input_ids"], "labels": batch["labels"]})
        if len(batches) == s.calibration_batches:
            break
    return batches


def run_pretrain(s: StudySettings, data: StudyData, folder: Path) -> dict[str, Any]:
    set_seed(s.seed)
    model = CompreSSMGraniteMoeHybridForCausalLM(
        tiny_scaled_config(s, data.task.vocab_size, data.task.special_token_ids)
    )
    with tempfile.TemporaryDirectory(prefix="hybrid_study_") as out:
        run = train_and_measure(model, data.pretrain, _args(out, s, s.pretrain_steps, s.pretrain_lr))
    model = run.model
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    summary = run.summary()
    return {
        "part": "pretrain",
        "folder": str(folder),
        "state_sizes": model.state_sizes(),
        "parameters": count_parameters(model),
        "train_seconds": summary["train_seconds"],
        "train_cpu_seconds": summary["train_cpu_seconds"],
        "step_cpu_median_s": summary["step_cpu_times"].get("median_s"),
        "eval": _eval(model, data, s),
    }


def _load(folder: Path) -> CompreSSMGraniteMoeHybridForCausalLM:
    return CompreSSMGraniteMoeHybridForCausalLM.from_pretrained(folder)


def run_posthoc(s: StudySettings, data: StudyData, folder: Path, size: int | None, before: dict) -> dict[str, Any]:
    model = _load(folder)
    mamba_layers = len(model.config.state_sizes)
    targets = None if size is None else [size] * mamba_layers
    start = time.perf_counter()
    report = compress_model(
        model, _calibration_batches(data, s), tau=s.tau, target_sizes=targets, calibration_batches=s.calibration_batches
    )
    seconds = time.perf_counter() - start
    return {
        "part": "posthoc",
        "target_sizes": targets,
        "tau": None if size is not None else s.tau,
        "state_sizes": model.state_sizes(),
        "sizes_after": list(model.config.state_sizes),
        "compress_seconds": seconds,
        "reported_seconds": report.seconds,
        "parameters": count_parameters(model),
        "eval_before": before,
        "eval": _eval(model, data, s),
    }


def run_no_state_readout(s: StudySettings, data: StudyData, folder: Path, before: dict) -> dict[str, Any]:
    """How much the recurrent states contribute at all: the pretrained model with every Mamba layer's C set to zero
    (the ``in_proj`` rows and ``conv1d`` channels of C), so that each layer outputs only its skip term D·x through
    the gate and norm; the rest of the model unchanged."""
    model = _load(folder)
    with torch.no_grad():
        for mixer in model.ssm_mixers():
            inner, gn = int(mixer.intermediate_size), int(mixer.n_groups) * int(mixer.ssm_state_size)
            mixer.in_proj.weight[2 * inner + gn : 2 * inner + 2 * gn] = 0.0
            mixer.conv1d.weight[inner + gn : inner + 2 * gn] = 0.0
            if mixer.conv1d.bias is not None:
                mixer.conv1d.bias[inner + gn : inner + 2 * gn] = 0.0
    return {
        "part": "reference",
        "state_sizes": model.state_sizes(),
        "sizes_after": list(model.config.state_sizes),
        "eval_before": before,
        "eval": _eval(model, data, s),
    }


def run_finetune(s: StudySettings, data: StudyData, folder: Path, cut: dict[str, Any] | None) -> dict[str, Any]:
    model = _load(folder)
    callbacks = []
    if cut is not None:
        values = dict(reduction_steps=[s.cut_step], calibration_batches=s.calibration_batches)
        if cut.get("size") is not None:
            values |= dict(mode="fixed", fixed_fraction=1.0 - cut["size"] / s.state_size)
        else:
            values |= dict(tau=cut["tau"])
        callbacks.append(CompreSSMCallback(CompressionArguments(**values)))
    curve = sorted({s.cut_step, s.finetune_steps // 2})
    set_seed(s.seed)
    with tempfile.TemporaryDirectory(prefix="hybrid_study_") as out:
        run = train_and_measure(
            model,
            data.finetune,
            _args(out, s, s.finetune_steps, s.finetune_lr),
            callbacks=callbacks,
            eval_dataset=data.task.eval_dataset,
            task="causal_lm",
            eval_batch_size=8,
            curve_steps=curve,
        )
    summary = run.summary()
    return {
        "part": "finetune",
        "cut": cut,
        "state_sizes": run.model.state_sizes(),
        "sizes_after": summary["sizes_final"],
        "reductions": summary["reductions"],
        "parameters": summary["parameters_final"],
        "train_seconds": summary["train_seconds"],
        "train_cpu_seconds": summary["train_cpu_seconds"],
        "curve": summary["curve"],
        "eval": summary["eval"],
    }


def plan(s: StudySettings) -> list[tuple[str, dict[str, Any]]]:
    parts: list[tuple[str, dict[str, Any]]] = [("pretrain", {})]
    parts += [(f"posthoc@{k}", {"size": k}) for k in s.posthoc_sizes] + [(f"posthoc@tau{s.tau:g}", {"size": None})]
    parts += [("finetune/full", {"cut": None})]
    parts += [(f"finetune/cut@{k}", {"cut": {"size": k}}) for k in s.finetune_sizes]
    parts += [(f"finetune/tau@{s.tau:g}", {"cut": {"tau": s.tau}})]
    return parts + [("reference/no-state-readout", {})]


def write_report(out_dir: Path, s: StudySettings, store: ResultsStore, meta: dict[str, Any]) -> None:
    parts = {r["id"]: r["result"] for r in store.records.values() if r.get("group") == GROUP}
    report = {"settings": asdict(s), "meta": meta, "parts": parts}
    write_json_atomic(out_dir / "hybrid_finetune_study.json", report)
    lines = [
        "# Hybrid fine-tuning study: compress a trained Granite-4.0-H-shaped model post hoc or at a fine-tune's start",
        "",
        f"Command: `{meta['command']}`  ",
        f"Code: commit {str(meta['commit'])[:10]}; torch {torch.__version__}, transformers "
        f"{__import__('transformers').__version__}; {meta['threads']} thread(s); one seed ({s.seed}).  ",
        f"Model: Granite-4.0-H-Tiny's configuration scaled down: hidden {s.hidden_size}, layers {s.layer_pattern} "
        f"(M = Mamba-2: heads of {s.mamba_head_dim} channels, 1 group, N0 = {s.state_size}; A = attention: "
        f"{s.attention_heads} heads of {s.attention_head_dim}, {s.kv_heads} KV head, NoPE), MoE of {s.experts} experts "
        f"(top {s.experts_per_token}, width {s.hidden_size // 3}) + shared MLP (width {2 * s.hidden_size // 3}), tied "
        "embeddings.  ",
        f"Data: byte-level KJV, blocks of {s.block_size}; pretraining: {s.pretrain_steps} steps of batch "
        f"{s.batch_size} (lr {s.pretrain_lr}, cosine) on the first blocks (Genesis onward); fine-tuning: "
        f"{s.finetune_steps} steps (lr {s.finetune_lr}, cosine) on the blocks from {s.finetune_offset} on (they start "
        f"{meta.get('finetune_starts_with', '')!r}); validation: the first {s.eval_blocks} blocks of the fixed "
        "validation split (the last 5 % of the text), loss in nats/byte.",
        "",
    ]
    pre = parts.get("pretrain")
    if pre:
        lines += [
            f"Pretrained model: {pre['parameters']} parameters, Mamba sizes {[x for x in pre['state_sizes'] if x]}, "
            f"val loss **{pre['eval']['loss']:.4f}** after {pre['train_cpu_seconds']:.0f} s CPU "
            f"({pre['step_cpu_median_s']:.2f} s per step).",
            "",
        ]
    post = [(k, v) for k, v in parts.items() if k.startswith("posthoc")]
    if post:
        lines += [
            "Post hoc (`compress_model`, no training; calibration on the first "
            f"{s.calibration_batches} fine-tuning batches):",
            "",
            "| compression | Mamba sizes after | parameters | val loss before | val loss after | change | seconds |",
            "|---|---|---|---|---|---|---|",
        ]
        for _key, r in post:
            how = f"target_sizes = {r['target_sizes'][0]} per layer" if r["target_sizes"] else f"τ = {r['tau']:g}"
            b, a = r["eval_before"]["loss"], r["eval"]["loss"]
            lines.append(
                f"| {how} | {r['sizes_after']} | {r['parameters']} | {b:.4f} | {a:.4f} | {a - b:+.4f} "
                f"({a / b - 1:+.1%}) | {r['compress_seconds']:.2f} |"
            )
        ref = parts.get("reference/no-state-readout")
        if ref:
            b, a = ref["eval_before"]["loss"], ref["eval"]["loss"]
            lines.append(
                f"| reference: no state readout (C = 0 in every Mamba layer: y = D·x) | – | – | {b:.4f} | {a:.4f} | "
                f"{a - b:+.4f} ({a / b - 1:+.1%}) | – |"
            )
        lines.append("")
    tune = [(k, v) for k, v in parts.items() if k.startswith("finetune")]
    if tune:
        full = parts.get("finetune/full")
        steps = sorted({pt["step"] for _, r in tune for pt in r["curve"]})
        lines += [
            f"Fine-tuning ({s.finetune_steps} steps from the pretrained weights; the cuts at step {s.cut_step}, after "
            f"calibrating on the first {s.cut_step} batches; val loss at step {s.cut_step} is right after the cut, "
            "before the recovery steps):",
            "",
            "| run | Mamba sizes after | "
            + " | ".join(f"val loss at step {t}" for t in steps)
            + f" | val loss at step {s.finetune_steps} | vs uncompressed fine-tune | CPU s |",
            "|---|---|" + "---|" * len(steps) + "---|---|---|",
        ]
        for key, r in tune:
            at = {pt["step"]: pt["loss"] for pt in r["curve"]}
            delta = (
                "–" if full is None or key == "finetune/full" else f"{r['eval']['loss'] - full['eval']['loss']:+.4f}"
            )
            lines.append(
                f"| {key} | {r['sizes_after']} | "
                + " | ".join(f"{at[t]:.4f}" if t in at else "–" for t in steps)
                + f" | {r['eval']['loss']:.4f} | {delta} | {r['train_cpu_seconds']:.0f} |"
            )
        lines.append("")
    missing = [k for k, _ in plan(s) if k not in parts]
    if missing:
        lines += [f"**PARTIAL: not measured yet: {', '.join(missing)} (rerun the same command to resume).**", ""]
    for note in meta.get("notes", []):
        lines.append(f"- {note}")
    write_text_atomic(out_dir / "hybrid_finetune_study.md", "\n".join(lines) + "\n")


def main(args: argparse.Namespace) -> int:
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    s = quick_settings() if args.quick else StudySettings()
    out_dir, work = Path(args.output_dir), Path(args.work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    code = git_state(REPO)
    key = fingerprint({"settings": asdict(s), "threads": args.threads})
    try:
        store = ResultsStore(out_dir / RUNS_FILE, {GROUP: key}, commit=code["commit"], fresh=args.fresh)
    except ResultsMismatchError as err:
        raise SystemExit(f"hybrid_finetune_study.py: {err}") from err
    data = build_data(s)
    folder = work / f"pretrained-{key}"
    meta = {
        "command": " ".join(["python scripts/hybrid_finetune_study.py", *sys.argv[1:]]),
        "commit": code["commit"],
        "threads": args.threads,
        "finetune_starts_with": data.finetune_starts_with,
        "notes": [
            "One seed: the differences between the fine-tuning runs are single measurements (no spread).",
            "Post-hoc rows start from the pretrained model (val loss before = the pretrained model's); the "
            "fine-tuning rows all start from the same pretrained weights with the same data order.",
            "The reference row (no state readout) measures how much of the pretrained model's quality depends on "
            "its recurrent states at all at this training budget: read the cuts' changes against it.",
            f"Sizing: about one CPU core (2 cores shared with other jobs), ~25 min of run time for the whole study "
            f"on an idle core: a step of batch {s.batch_size} x {s.block_size} bytes takes about 1.1-1.2 s CPU at N0 "
            f"(one thread) with {s.experts} experts (64 experts with top 6, Granite-4.0-H-Tiny's count, took 1.9 s), "
            f"so {s.pretrain_steps} pretraining and 3 x {s.finetune_steps} fine-tuning steps.",
        ],
    }
    start = time.perf_counter()
    for name, spec in plan(s):
        done = store.get(name)
        if done is not None and (name != "pretrain" or folder.is_dir()):
            print(f"{name}: done before, skipped", flush=True)
            continue
        if name != "pretrain" and not folder.is_dir():
            raise SystemExit(
                f"hybrid_finetune_study.py: the pretrained weights {folder} are missing: rerun with --fresh"
            )
        t0 = time.perf_counter()
        if name == "pretrain":
            result = run_pretrain(s, data, folder)
        elif name.startswith("reference"):
            result = run_no_state_readout(s, data, folder, store.get("pretrain")["eval"])
        elif name.startswith("posthoc"):
            result = run_posthoc(s, data, folder, spec["size"], store.get("pretrain")["eval"])
        else:
            result = run_finetune(s, data, folder, spec["cut"])
        result["run_seconds"] = time.perf_counter() - t0
        store.add(name, GROUP, result)
        write_report(out_dir, s, store, meta)
        print(
            f"{name}: sizes {result['state_sizes']}, val loss {result['eval']['loss']:.4f} ({result['run_seconds']:.0f} s;"
            f" elapsed {(time.perf_counter() - start) / 60:.1f} min)",
            flush=True,
        )
    write_report(out_dir, s, store, meta)
    print(f"wrote {out_dir / 'hybrid_finetune_study.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(_ARGS))
