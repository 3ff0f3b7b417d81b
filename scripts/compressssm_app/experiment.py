"""Experiments the scripts run: train one model with or without `CompreSSMCallback` and measure it (the results
file and the child processes are `harness`).

* `training_arguments` – the `TrainingArguments` of a measured run (no logging, saving or evaluation inside
  ``train()``, fixed seeds).
* `train_and_measure` – ``trainer.train()`` timed (wall and process CPU time, per-step times, the reductions' own
  time, evaluations of the learning curve excluded) and, optionally, evaluated with `evaluate_quality`.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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
    "StepTimer",
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
