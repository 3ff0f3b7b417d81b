"""`Compressor`: in-training CompreSSM compression as one object with explicit state, for any training loop.

It records the importance statistics from the training forwards that run anyway (`calibration.
TrainingStatisticsRecorder`: projections only, no extra forward) during the last ``calibration_batches``
optimisation steps before each scheduled cut; at a scheduled step it scores the states, chooses per-layer ranks and
cuts the weak states, carrying the optimizer through the cut (`reduction.reduce_once`). Its state (progress through
the schedule, the recorded statistics, the random-selection generator, the pending pragmatic-rollback check) is
saved and restored only through `state_dict` / `load_state_dict`. `hf_compressssm.trainer.CompreSSMCallback`
runs one inside a `Trainer`; in a plain PyTorch (or accelerate) loop (``model``: a CompreSSM model, ``batches``:
dicts of model inputs with labels)::

    import torch
    from hf_compressssm import Compressor

    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    compressor = Compressor(tau=0.3, reduction_steps=[4, 8])
    compressor.start(model, max_steps=12)
    for step, batch in enumerate(batches, start=1):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        report = compressor.step(model, optimizer, step)  # a ReductionReport at a cut
        if report is not None:
            print(step, report.sizes_before, "->", report.sizes_after)
    compressor.stop()
    model.save_pretrained("compressed")

Multi-process: call `distributed.exclude_shrinkable_from_ddp(model)` before wrapping the model in DDP.
Pragmatic mode: evaluate when `evaluation_request` is True after a step and pass the metrics to `evaluated`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..families import ssm_layers
from .arguments import CompressionArguments, check_min_state_size
from .calibration import TrainingStatisticsRecorder
from .distributed import GradientAllReducer, is_distributed, shrinkable_excluded_from_ddp
from .record import CompressionRecord, record_report, update_compression_record
from .reduction import ReductionReport, reduce_once
from .rollback import PragmaticRollback
from .scoring import scoring_for
from .surgery import SurgeryError, check_cut_supported


logger = logging.get_logger(__name__)


def _is_main_process() -> bool:
    return not is_distributed() or torch.distributed.get_rank() == 0


class Compressor:
    """Compress the SSM layers of a model being trained, a few times early in training.

    Args:
        args: a `CompressionArguments`; or pass its fields as keyword arguments.

    Use: `start` once before the first step (or after `load_state_dict` when resuming), `step` after every
    optimisation step (after ``optimizer.step()``), `stop` at the end. Steps are 1-based optimisation steps.
    """

    def __init__(self, args: CompressionArguments | None = None, **kwargs):
        if args is not None and kwargs:
            raise ValueError("pass either a CompressionArguments or keyword arguments, not both.")
        self.args = args if args is not None else CompressionArguments(**kwargs)
        self.args.validate()
        self.schedule: list[int] = []
        self.done_steps: set[int] = set()
        self.statistics = TrainingStatisticsRecorder(self.args.calibration_batches)
        self.generator = torch.Generator().manual_seed(self.args.compression_seed)
        self.rollback = PragmaticRollback(self.args)
        #: After `step`: True/False when pragmatic mode asks for an evaluation now / for none; None: no opinion.
        self.evaluation_request: bool | None = None
        self._reducer = GradientAllReducer()
        self._loaded_args: dict | None = None
        self._loaded_done: set[int] = set()
        self._planned: int | None = None

    # ------------------------------------------------------------------ set-up
    def plan(self, max_steps: int) -> list[int]:
        """The schedule (optimisation steps of the cuts) of a run of ``max_steps`` steps."""
        if self._planned != max_steps:
            self.schedule, self._planned = self.args.schedule(max_steps), max_steps
        return self.schedule

    def check_model(self, model: nn.Module) -> None:
        """`ValueError` / `SurgeryError` before any step when ``model`` cannot be compressed as configured."""
        layers = ssm_layers(model, per_layer=True)
        check_cut_supported(model, layers)  # e.g. an adapter that cannot follow a cut
        if is_distributed() and any(hasattr(m, "base_layer") for m in model.modules()):
            raise ValueError(
                "CompreSSM does not support PEFT adapters in multi-process training (DDP would manage adapter "
                "weights whose shapes a cut changes). Train the adapters in one process, or compress first."
            )
        if is_distributed() and not shrinkable_excluded_from_ddp(model):
            raise ValueError(
                "In multi-process training the shrinkable parameters must be kept out of DDP before the model is "
                "wrapped: pass the callback to the Trainer constructor (Trainer(..., callbacks=[CompreSSMCallback("
                "...)]); trainer.add_callback() is too late), or call hf_compressssm.compression.distributed."
                "exclude_shrinkable_from_ddp(model) before wrapping it yourself."
            )
        check_min_state_size(self.args.min_state_size, model.config.state_size)

    def start(self, model: nn.Module, max_steps: int, step: int = 0, step_end_done: bool = True) -> None:
        """Begin training of ``max_steps`` optimisation steps at ``step`` (0: a fresh run; resuming: the step of the
        checkpoint, whose state `load_state_dict` restored before; ``step_end_done=False`` when that step's `step`
        has not run yet). Checks the model, records the arguments in ``config.compression`` and hooks the model."""
        self.check_model(model)
        schedule = self.plan(max_steps)
        record = update_compression_record(model, self.args, schedule)
        if step == 0:
            self.done_steps = set()
            self.statistics.clear()
            self.generator = torch.Generator().manual_seed(self.args.compression_seed)
            self.rollback.reset()
        else:
            done = {h["step"] for h in record.history or []}
            last = step if step_end_done else step - 1
            self.done_steps = {s for s in schedule if s <= last or s in done} | self._loaded_done
        if self._loaded_args is not None and step > 0:
            self._warn_changed_arguments(model, step, self._loaded_args)
        self._loaded_args, self._loaded_done = None, set()
        if self.statistics.window.maxlen != self.args.calibration_batches:  # arguments changed on resume
            recorded = self.statistics.state()
            self.statistics = TrainingStatisticsRecorder(self.args.calibration_batches)
            self.statistics.load_state(recorded)
        layers = ssm_layers(model)
        self.statistics.attach(model, layers)
        self._reducer.attach(model, layers)
        logger.info(f"CompreSSM: reductions scheduled at steps {schedule} of {max_steps}.")
        self.prepare(model, step + 1)

    def _warn_changed_arguments(self, model: nn.Module, step: int, previous: dict) -> None:
        now = self.args.to_dict()
        changed = {k: [previous.get(k), v] for k, v in now.items() if previous.get(k) != v}
        if not changed:
            return
        listing = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        logger.warning(
            f"CompreSSM: resuming at step {step} with CompressionArguments that differ from the checkpoint's: "
            f"{listing}. The new values apply from now on; the recorded history keeps what each earlier attempt "
            "was done with."
        )
        record = CompressionRecord.of(model)
        record.argument_changes = list(record.argument_changes or []) + [{"step": int(step), "changed": changed}]
        record.save_to(model)

    def stop(self) -> None:
        """Remove the hooks from the model and drop the recorded statistics (take a `state_dict` before)."""
        self.statistics.detach()
        self.statistics.clear()
        self._reducer.detach()

    # ------------------------------------------------------------------ the loop
    def _stopped(self, model: nn.Module) -> bool:
        return bool((model.config.compression or {}).get("stopped"))

    def prepare(self, model: nn.Module, step: int) -> None:
        """Record statistics in optimisation step ``step`` (about to run) when it is one of the last
        ``calibration_batches`` steps before a pending cut. `start`, `step` and `evaluated` call it."""
        k = self.args.calibration_batches
        pending = any(cut - k < step <= cut for cut in self.schedule if cut not in self.done_steps)
        self.statistics.active = pending and not self._stopped(model)

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int) -> ReductionReport | None:
        """After optimisation step ``step``: cut when it is scheduled; returns the attempt's report (None when no
        attempt was made). A failed cut is undone (model and optimizer unchanged) and training goes on."""
        self.evaluation_request = None
        report = self._step(model, optimizer, step)
        self.prepare(model, step + 1)
        return report

    def _step(self, model: nn.Module, optimizer, step: int) -> ReductionReport | None:
        stopped = self._stopped(model)
        if self.args.mode == "pragmatic":
            if self.rollback.due(step):
                self.evaluation_request = True
            if step + 1 in self.schedule and step + 1 not in self.done_steps and not stopped:
                self.evaluation_request = True  # the "before" measurement of the next cut
        if step not in self.schedule or step in self.done_steps or stopped:
            return None
        if self.rollback.pending is not None:
            return None  # pragmatic: wait for the comparison of the previous cut
        self.done_steps.add(step)
        layers = ssm_layers(model)
        statistics = self.statistics.statistics(scoring_for(layers.family))
        calibration_seconds = self.statistics.seconds
        self.statistics.clear()
        self.statistics.active = False
        if statistics is None:
            logger.warning(f"CompreSSM: no training batch recorded before step {step}; reduction skipped.")
            return None
        snapshot = self.rollback.snapshot(model, optimizer) if self.args.mode == "pragmatic" else None
        try:
            report = reduce_once(
                model,
                None,
                self.args,
                optimizer=optimizer,
                step=step,
                generator=self.generator,
                on_commit=lambda r: record_report(model, r, self.args),
                statistics=statistics,
                calibration_seconds=calibration_seconds,
                layers=layers,
            )
        except SurgeryError as err:  # undone: the model, optimizer, config and history are as before the attempt
            logger.warning(f"CompreSSM: the cut at step {step} failed and was undone; training goes on. {err}")
            return None
        finally:
            self._reducer.attach(model, layers)  # new parameters need their gradient hooks
        if _is_main_process():  # every process took the same decision: report it once
            verb = "skipped" if report.skipped else ("left unchanged" if report.unchanged else "reduced")
            logger.warning(
                f"CompreSSM step {report.step}: {verb} state sizes {report.sizes_before} -> {report.sizes_after} "
                f"(mean {report.mean_size_before:.1f} -> {report.mean_size_after:.1f}) in {report.seconds:.2f}s"
            )
        if snapshot is not None and not report.unchanged:
            due = step + self.rollback.delay(step, self.schedule)
            self.rollback.arm(step, due, snapshot)
            self.evaluation_request = step >= due
        return report

    def evaluated(self, model: nn.Module, optimizer, step: int, metrics: dict[str, float]) -> bool:
        """Pragmatic mode: the evaluation ``metrics`` at ``step`` (``rollback_metric``, with or without the ``eval_``
        prefix). Returns True when the pending cut was rolled back (and cutting stopped)."""
        if self.args.mode != "pragmatic" or not metrics:
            return False
        key = self.args.rollback_metric
        value = metrics.get(key, metrics.get(f"eval_{key}"))
        if value is None:
            raise ValueError(
                f"pragmatic mode: rollback_metric {key!r} is not among the evaluation metrics {sorted(metrics)}."
            )
        rolled_back = self.rollback.evaluated(model, optimizer, step, value)
        if rolled_back:
            self._reducer.attach(model)
            self.prepare(model, step + 1)
        return rolled_back

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: JSON values (``args``, ``done_steps``, ``last_eval``, ``pending_check``)
        and tensors (``statistics``: the recorded window and its time; ``generator``; ``snapshot`` of a pending
        pragmatic check)."""
        return {
            "version": 1,
            "args": self.args.to_dict(),
            "done_steps": sorted(self.done_steps),
            **self.rollback.state_dict(),
            "statistics": self.statistics.state(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict` (call `start` with the checkpoint's step afterwards)."""
        self._loaded_args = state.get("args")
        self._loaded_done = {int(s) for s in state.get("done_steps", [])}
        self.rollback.load_state_dict(state)
        self.statistics.load_state(state.get("statistics") or {})
        self.generator = torch.Generator()
        self.generator.set_state(state["generator"])


__all__ = ["Compressor"]
