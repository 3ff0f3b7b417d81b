"""Experiments the scripts run: train one model with or without `CompreSSMCallback` and measure it, and keep the
finished runs in a resumable results file.

* `training_arguments` – the `TrainingArguments` of a measured run (no logging, saving or evaluation inside
  ``train()``, fixed seeds).
* `train_and_measure` – ``trainer.train()`` timed (wall and process CPU time, per-step times, the reductions' own
  time, evaluations of the learning curve excluded) and, optionally, evaluated with `evaluate_quality`.
* `ResultsStore` – an append-only JSON-lines file: each finished run is written at once (one line, flushed and
  fsynced), a rerun skips what is done, and runs measured with other settings or another commit are detected.
* `in_child` – run a function in a forked child (clean peak memory per run, a crash costs one run).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from .evaluation import count_parameters, evaluate_quality


logger = logging.get_logger(__name__)

__all__ = [
    "LearningCurve",
    "MeasuredRun",
    "ResultsMismatchError",
    "ResultsStore",
    "StepTimer",
    "fingerprint",
    "git_state",
    "in_child",
    "load_script",
    "peak_rss_mb",
    "step_summary",
    "train_and_measure",
    "training_arguments",
]


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def training_arguments(
    output_dir: str,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    schedule: str = "cosine",
    warmup: float = 0.05,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    drop_last: bool = False,
    use_cpu: bool | None = None,
    **overrides: Any,
) -> TrainingArguments:
    """`TrainingArguments` for a measured run: ``steps`` AdamW steps, seeded init/data order, nothing else inside
    ``train()`` (no logging, evaluation or checkpoints). ``warmup`` < 1 is a fraction of the steps; ``overrides``
    are further `TrainingArguments` fields (e.g. ``ddp_backend="gloo"``)."""
    values: dict[str, Any] = dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type=schedule,
        warmup_steps=warmup,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        logging_strategy="no",
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_drop_last=drop_last,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        use_cpu=(not torch.cuda.is_available()) if use_cpu is None else use_cpu,
    )
    return TrainingArguments(**(values | overrides))


class StepTimer(TrainerCallback):
    """Wall time of every optimisation step (``on_step_begin`` → ``on_step_end``; the reductions included when this
    callback comes after `CompreSSMCallback`). Stops training after ``stop_after`` steps when given (the learning-rate
    schedule stays that of the full run)."""

    def __init__(self, stop_after: int | None = None):
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # process CPU time of the same steps
        self.stop_after = stop_after
        self._start: tuple[float, float] | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.times.append(time.perf_counter() - self._start[0])
            self.cpu_times.append(time.process_time() - self._start[1])
            self._start = None
        if self.stop_after is not None and state.global_step >= self.stop_after:
            control.should_training_stop = True
        return control


class LearningCurve(TrainerCallback):
    """Evaluates the model (`evaluate_quality`) after the given optimisation steps and records the points with the
    state sizes; the time it spends is kept in ``wall_seconds`` / ``cpu_seconds`` so that it can be taken out of
    the run's time. The global torch RNG is restored after each evaluation (a DataLoader draws from it), so a run
    with a curve sees the same data order as one without."""

    def __init__(self, steps: Iterable[int], dataset: Dataset, task: str, batch_size: int):
        self.steps = sorted({int(s) for s in steps})
        self.dataset, self.task, self.batch_size = dataset, task, batch_size
        self.points: list[dict[str, Any]] = []
        self.wall_seconds = self.cpu_seconds = 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps and model is not None:
            wall, cpu = time.perf_counter(), time.process_time()
            rng = torch.get_rng_state()
            try:
                quality = evaluate_quality(model, self.dataset, self.task, self.batch_size)
            finally:
                torch.set_rng_state(rng)
            sizes = list(getattr(model.config, "state_sizes", []) or [])
            self.points.append({"step": int(state.global_step), "state_sizes": sizes, **quality})
            self.wall_seconds += time.perf_counter() - wall
            self.cpu_seconds += time.process_time() - cpu
        return control


def step_summary(times: Sequence[float]) -> dict[str, float]:
    """Mean, sum, median, median of the first 5 % and of the second half of per-step times (seconds)."""
    if not times:
        return {}
    return {
        "count": len(times),
        "mean_s": statistics.fmean(times),
        "sum_s": sum(times),
        "median_s": statistics.median(times),
        "first_median_s": statistics.median(times[: max(1, len(times) // 20)]),
        "steady_median_s": statistics.median(times[len(times) // 2 :]),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process (``ru_maxrss``, MiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class MeasuredRun:
    """What `train_and_measure` returns. Times exclude the learning curve's evaluations."""

    model: nn.Module
    trainer: Trainer
    steps_run: int
    train_seconds: float
    train_cpu_seconds: float
    step_times: list[float]
    step_cpu_times: list[float]
    sizes_initial: list[int]
    parameters_initial: int
    reductions: list[dict[str, Any]] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, float] | None = None

    @property
    def reduction_seconds(self) -> float:
        return sum(r["seconds"] for r in self.reductions)

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers (no model)."""
        sizes = list(self.model.config.state_sizes)
        return {
            "steps_run": self.steps_run,
            "train_seconds": self.train_seconds,
            "train_cpu_seconds": self.train_cpu_seconds,
            "step_times": step_summary(self.step_times),
            "step_cpu_times": step_summary(self.step_cpu_times),
            "sizes_initial": self.sizes_initial,
            "sizes_final": sizes,
            "mean_size": statistics.fmean(sizes),
            "parameters_initial": self.parameters_initial,
            "parameters_final": count_parameters(self.model),
            "reductions": self.reductions,
            "reduction_seconds": self.reduction_seconds,
            "curve": self.curve,
            "eval": self.eval,
        }


def train_and_measure(
    model: nn.Module,
    train_dataset: Dataset,
    args: TrainingArguments,
    *,
    callbacks: Sequence[TrainerCallback] = (),
    trainer_cls: type[Trainer] = Trainer,
    trainer_kwargs: Mapping[str, Any] | None = None,
    stop_after: int | None = None,
    eval_dataset: Dataset | None = None,
    task: str | None = None,
    eval_batch_size: int = 32,
    curve_steps: Iterable[int] = (),
) -> MeasuredRun:
    """Train ``model`` with ``trainer_cls`` (the given ``callbacks``, e.g. `CompreSSMCallback`, then a `StepTimer`)
    and measure it. With ``eval_dataset`` and ``task``: quality at the end (`evaluate_quality`) and at
    ``curve_steps`` (a learning curve, its time excluded from the run's). The model is trained in place (a cut
    replaces its tensors); ``result.model`` is the trained model."""
    timer = StepTimer(stop_after=stop_after)
    curve = None
    all_callbacks = [*callbacks, timer]
    if eval_dataset is not None and list(curve_steps):
        if task is None:
            raise ValueError("train_and_measure: curve_steps needs task= (how to evaluate the model).")
        curve = LearningCurve(curve_steps, eval_dataset, task, eval_batch_size)
        all_callbacks.append(curve)
    sizes_initial = list(model.config.state_sizes)
    parameters_initial = count_parameters(model)
    trainer = trainer_cls(
        model=model, args=args, train_dataset=train_dataset, callbacks=all_callbacks, **dict(trainer_kwargs or {})
    )
    trainer.remove_callback(PrinterCallback)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    trainer.train()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if curve is not None:
        wall, cpu = wall - curve.wall_seconds, cpu - curve.cpu_seconds
    model = trainer.model
    history = list(getattr(model, "compression_history", []) or [])
    reductions = [
        {
            "step": h.get("step"),
            "sizes_before": h.get("sizes_before"),
            "sizes_after": h.get("sizes_after"),
            "seconds": float(h.get("seconds", 0.0)),
            "skipped": h.get("skipped"),
        }
        for h in history
    ]
    run = MeasuredRun(
        model=model,
        trainer=trainer,
        steps_run=int(trainer.state.global_step),
        train_seconds=wall,
        train_cpu_seconds=cpu,
        step_times=list(timer.times),
        step_cpu_times=list(timer.cpu_times),
        sizes_initial=sizes_initial,
        parameters_initial=parameters_initial,
        reductions=reductions,
        curve=list(curve.points) if curve is not None else [],
    )
    if eval_dataset is not None and task is not None:
        run.eval = evaluate_quality(model, eval_dataset, task, eval_batch_size)
    return run


# ----------------------------------------------------------------------------------------------------------------
# Results store
# ----------------------------------------------------------------------------------------------------------------


class ResultsMismatchError(ValueError):
    """The results file holds runs measured with other settings than the ones asked for now."""


def fingerprint(settings: Any) -> str:
    """A short stable hash of JSON-serialisable ``settings`` (key order does not matter)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ResultsStore:
    """Finished runs in an append-only JSON-lines file, one record per line::

        {"id": "causal_lm/full/seed0", "group": "causal_lm", "fingerprint": "…", "commit": "…",
         "finished": "2026-…", "result": {…}}

    ``fingerprints`` maps each group (e.g. a task) to the hash of the settings its runs depend on. Opening a file
    whose records of a group carry another fingerprint raises `ResultsMismatchError` (naming the groups; pass
    ``fresh=True`` to discard the file, or use another path); groups not named in ``fingerprints`` are kept as they
    are. Records measured at another commit are reused and listed in `other_commits`. A torn last line (a run
    killed while writing) is dropped. Each `add` writes one line, flushed and fsynced, before returning.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fingerprints: Mapping[str, str],
        commit: str | None = None,
        fresh: bool = False,
    ):
        self.path = Path(path)
        self.fingerprints = dict(fingerprints)
        self.commit = commit
        self.records: dict[str, dict[str, Any]] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and self.path.exists():
            self.path.unlink()
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        lines = self.path.read_text().splitlines()
        good: list[str] = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                record["id"], record["result"]  # noqa: B018 - a record must have both
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                if number == len(lines):  # a run killed while its line was written
                    logger.warning(f"{self.path}: dropping a torn last line ({err}).")
                    self._rewrite(good)
                    break
                raise ResultsMismatchError(
                    f"{self.path} line {number} is not a results record ({err}); move the file away or pass fresh."
                ) from err
            good.append(line)
            self.records[record["id"]] = record
        changed = sorted(
            {
                r.get("group")
                for r in self.records.values()
                if r.get("group") in self.fingerprints and r.get("fingerprint") != self.fingerprints[r.get("group")]
            }
        )
        if changed:
            raise ResultsMismatchError(
                f"{self.path} holds runs of {', '.join(changed)} measured with other settings than now (the preset "
                "or the command changed). Rerun the same command to resume, use another output directory, or "
                "start over with --fresh (discards the file)."
            )

    def _rewrite(self, lines: list[str]) -> None:
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(f"{line}\n" for line in lines))
        os.replace(tmp, self.path)

    @property
    def other_commits(self) -> dict[str, int]:
        """Commits (other than the current one) that records were measured at, with their counts."""
        counts: dict[str, int] = {}
        for r in self.records.values():
            if r.get("commit") != self.commit:
                counts[str(r.get("commit"))] = counts.get(str(r.get("commit")), 0) + 1
        return counts

    def get(self, run_id: str) -> dict[str, Any] | None:
        """The stored result of ``run_id``, or None when it has not run yet."""
        record = self.records.get(run_id)
        return None if record is None else record["result"]

    def add(self, run_id: str, group: str, result: Mapping[str, Any]) -> None:
        """Append one finished run (flushed and fsynced before returning)."""
        if group not in self.fingerprints:
            raise KeyError(f"unknown group {group!r}; known: {sorted(self.fingerprints)}")
        record = {
            "id": run_id,
            "group": group,
            "fingerprint": self.fingerprints[group],
            "commit": self.commit,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "result": dict(result),
        }
        line = json.dumps(record)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[run_id] = record

    def results(self, group: str | None = None) -> list[dict[str, Any]]:
        """Results in file order, optionally of one group."""
        return [r["result"] for r in self.records.values() if group is None or r.get("group") == group]


# ----------------------------------------------------------------------------------------------------------------
# Processes and provenance
# ----------------------------------------------------------------------------------------------------------------


def _child(target: Callable[..., Any], result_path: str, *args: Any) -> None:
    try:
        payload = {"ok": True, "result": target(*args)}
    except BaseException as err:  # report anything, KeyboardInterrupt included, to the parent
        payload = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        with open(result_path, "w") as f:
            json.dump(payload, f)
        raise
    with open(result_path, "w") as f:
        json.dump(payload, f)


def in_child(target: Callable[..., Any], *args: Any) -> Any:
    """``target(*args)`` in a forked child process; returns its (JSON-serialisable) result, or raises
    `RuntimeError` with the child's traceback."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        path = handle.name
    try:
        proc = mp.get_context("fork").Process(target=_child, args=(target, path, *args))
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


def load_script(path: str | os.PathLike, name: str | None = None) -> Any:
    """Import the Python file at ``path`` as a module (registered in ``sys.modules`` under ``name``, default its
    stem) without putting its folder on ``sys.path`` (a script folder may hold files that shadow libraries)."""
    import importlib.util
    import sys

    path = Path(path)
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def git_state(directory: str | os.PathLike, paths: Sequence[str] = ("hf_compressssm", "scripts")) -> dict[str, Any]:
    """``{"commit": HEAD or None, "dirty": changed files under ``paths`` or None}`` of the checkout at ``directory``."""

    def git(*argv: str) -> str | None:
        try:
            out = subprocess.run(["git", *argv], cwd=directory, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", *paths)
    return {
        "commit": head.strip() or None if head else None,
        "dirty": None if status is None else [line[3:] for line in status.splitlines() if line.strip()],
    }
