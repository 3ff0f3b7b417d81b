"""`CompreSSMCallback`: in-training Hankel-based truncation of Mamba state sizes for the Hugging Face `Trainer`.

Add it to a normal run::

    trainer = Trainer(model=model, args=training_args, train_dataset=ds, callbacks=[CompreSSMCallback(tau=0.05)])

During the last ``calibration_batches`` optimisation steps before each scheduled cut it records, from the training
forwards that run anyway, the statistics of every state (`calibration.TrainingStatisticsRecorder`: projections only,
no extra model forward). At the scheduled step (``on_step_end``: after the optimizer and scheduler steps, never inside
gradient accumulation) it scores the states, chooses per-layer ranks,
cuts the weak states, and carries the optimizer state through the cut. Each attempt is recorded in the model config
(``config.compression``), in ``compression_history.json`` (output dir and every saved checkpoint/model), in the
Trainer's log history and, when enabled, in TensorBoard.
"""

import copy
import os
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.utils import logging

from ..families import check_per_layer_model, find_mixers, ssm_layers
from .arguments import CompressionArguments, check_min_state_size, check_training_setup
from .calibration import TrainingStatisticsRecorder
from .checkpoint import (
    CALLBACK_NAME,
    find_state_file,
    load_state_file,
    save_in_progress,
    save_state_file,
    state_file_name,
)
from .distributed import (
    GradientAllReducer,
    exclude_shrinkable_from_ddp,
    is_distributed,
    shrinkable_excluded_from_ddp,
)
from .history import record_report, set_history, update_compression_record, write_history
from .reduction import ReductionReport, reduce_once
from .scoring import scoring_for
from .surgery import SurgeryError, check_cut_supported, restore_parameters, unwrap_optimizer


logger = logging.get_logger(__name__)


class CompreSSMCallback(TrainerCallback, ExportableState):
    """Compress the SSM layers of the model being trained, a few times early in training.

    Args:
        args: a `CompressionArguments`; or pass its fields as keyword arguments.

    Multi-process: add the callback when building the `Trainer` (``callbacks=[...]``) so that ``on_init_end`` can
    keep the shrinkable parameters out of DDP before it wraps the model (see `hf_compressssm.distributed`).

    Resume: every checkpoint carries the callback's state (`hf_compressssm.compression.checkpoint`), written before
    the Trainer's ``trainer_state.json`` (so before ``save_total_limit`` deletes an older checkpoint), so
    ``trainer.train(resume_from_checkpoint=folder)`` with a model built from that folder (its reduced sizes:
    ``from_pretrained(folder)``) continues exactly as the uninterrupted run. The state file is looked for in
    ``TrainingArguments.resume_from_checkpoint``, in the folder it was saved to and in ``output_dir/checkpoint-N``.
    Resuming with other `CompressionArguments` warns with the changed fields; the new ones apply from then on.
    Preemption checkpoints (``enable_jit_checkpoint``) resume exactly too, wherever in a step the Trainer takes them.
    Put the Trainer's ``JITCheckpointCallback`` after this callback
    (``trainer.add_callback(trainer.pop_callback(JITCheckpointCallback))``, as ``scripts/train.py`` does): otherwise
    a preemption checkpoint taken at the end of a step can precede this callback's work of that step (a cut, a
    pragmatic evaluation request); the cut is then made when the run resumes (same result), but a pragmatic
    evaluation asked for at that step happens one step later.

    ``load_best_model_at_end``: a cut makes the earlier checkpoints unloadable into the model, so each cut (and each
    pragmatic rollback) forgets the best metric so far; the best model is then the best checkpoint saved since the
    last change of state sizes.

    PEFT: a Trainer checkpoint of a PEFT model holds only the adapter, not the base model that the cuts shrink, so a
    PEFT model with scheduled cuts is refused when the Trainer may write checkpoints (``save_strategy`` other than
    ``"no"``, or ``enable_jit_checkpoint``).
    """

    def __init__(self, args: CompressionArguments | None = None, **kwargs):
        if args is not None and kwargs:
            raise ValueError("pass either a CompressionArguments or keyword arguments, not both.")
        self.args = args if args is not None else CompressionArguments(**kwargs)
        self.args.validate()
        self.schedule: list[int] = []
        self._statistics = TrainingStatisticsRecorder(self.args.calibration_batches)
        self._reducer = GradientAllReducer()
        self._generator = torch.Generator().manual_seed(self.args.compression_seed)
        self._tb_writer = None
        self._pending_check: dict | None = None
        self._last_eval: tuple[int, float] | None = None
        self._done_steps: set[int] = set()
        self._resume_state: dict | None = None  # set by Trainer(restore_callback_states_from_checkpoint=True)
        self._trainer_state = None
        self._trainer_args = None
        self._training = False  # between on_train_begin and on_train_end
        # (global_step, calibration window, seconds) when the current optimisation step began; None after its end
        self._step_start: tuple[int, list, float] | None = None
        self._written: tuple[str, int] | None = None  # (folder, step) of the last state file this process wrote

    # ------------------------------------------------------------------ setup
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None and find_mixers(model):
            exclude_shrinkable_from_ddp(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._check_supported(args, model)
        self._trainer_state, self._trainer_args = state, args
        self._step_start, self._written = None, None
        self.schedule = self.args.schedule(state.max_steps)
        self._check_checkpointing(args, model)
        saved = self._saved_state(state)
        previous_args = saved["args"] if saved else None
        record = update_compression_record(model, self.args, self.schedule)
        if state.global_step == 0:
            self._done_steps = set()
            self._statistics.clear()
            self._generator = torch.Generator().manual_seed(self.args.compression_seed)
            self._pending_check, self._last_eval = None, None
        else:
            done = {h["step"] for h in record.get("history", [])}
            # a preemption checkpoint can be taken before this callback's end of its step: that step is still to do
            pending = bool(saved and saved.get("step_end_pending"))
            last = state.global_step - 1 if pending else state.global_step
            self._done_steps = {s for s in self.schedule if s <= last or s in done}
            self._restore(args, state, model, saved)
        if previous_args is not None:
            self._warn_changed_arguments(model, state, previous_args)
        self._resume_state = None
        if self._statistics.window.maxlen != self.args.calibration_batches:  # arguments changed on resume
            recorded = self._statistics.state()
            self._statistics = TrainingStatisticsRecorder(self.args.calibration_batches)
            self._statistics.load_state(recorded)
        self._statistics.attach(model)
        self._reducer.attach(model)
        if "tensorboard" in (args.report_to or []) and state.is_world_process_zero:
            try:
                from torch.utils.tensorboard import SummaryWriter

                log_root = os.getenv("TENSORBOARD_LOGGING_DIR") or getattr(args, "logging_dir", None) or args.output_dir
                self._tb_writer = SummaryWriter(log_dir=os.path.join(log_root, "compressssm"))
            except ImportError:
                logger.warning("CompreSSM: report_to includes tensorboard but it is not installed.")
        logger.info(f"CompreSSM: reductions scheduled at steps {self.schedule} of {state.max_steps}.")
        self._training = True
        if saved is not None and saved.get("step_end_pending"):
            logger.info(
                f"CompreSSM: the checkpoint of step {state.global_step} was saved before the callback's end of that "
                "step (a preemption checkpoint); doing it now."
            )
            self._step_end(args, state, control, model, optimizer)

    # ------------------------------------------------------------------ checkpoints (ExportableState + file)
    def state(self) -> dict[str, Any]:
        """What ``trainer_state.json`` keeps of the callback (`ExportableState`): its arguments and, once training
        has started, the bookkeeping that a resumed run needs.

        The Trainer calls this inside ``_save_checkpoint``, on the saving process, after writing the model,
        optimizer and RNG files and just before ``trainer_state.json`` (and before deleting older checkpoints), so
        this is where the process writes its tensors (`hf_compressssm.compression.checkpoint`) into the checkpoint
        being saved: the checkpoint is complete exactly when ``trainer_state.json`` is there."""
        resume = None
        trainer_state = self._trainer_state
        if self._training and trainer_state is not None and trainer_state.global_step > 0:
            args = self._trainer_args
            step = int(trainer_state.global_step)
            start = self._step_start
            # taken inside a step (preemption, before its optimizer step): the state as of the step's beginning
            mid_step = start is not None and start[0] == step
            # taken at the end of a step, before this callback's on_step_end (a callback listed before this one)
            step_end_pending = start is not None and start[0] == step - 1
            folder = os.path.join(args.output_dir, f"checkpoint-{step}")
            resume = {
                "version": 1,
                "global_step": step,
                "args": self.args.to_dict(),
                "done_steps": sorted(self._done_steps),
                "last_eval": list(self._last_eval) if self._last_eval is not None else None,
                "pending_check": (
                    {k: v for k, v in self._pending_check.items() if k != "snapshot"} if self._pending_check else None
                ),
                "step_end_pending": step_end_pending,
                "folder": os.path.abspath(folder),
                "world_size": int(getattr(args, "world_size", 1) or 1),
            }
            if save_in_progress(folder):
                self._write_state_file(args, step, folder, start if mid_step else None)
        return {"args": self.args.to_dict(), "attributes": {"_resume_state": resume}}

    def _write_state_file(self, args, step: int, folder: str, start: tuple | None = None) -> None:
        """This process's tensors into ``folder`` (``start``: the statistics as of the step's beginning)."""
        window, seconds = (start[1], start[2]) if start is not None else (list(self._statistics.window), None)
        statistics = {
            "window": [list(layers) for layers in window],
            "seconds": self._statistics.seconds if seconds is None else seconds,
        }
        payload = {
            "statistics": statistics,
            "generator": self._generator.get_state(),
            "snapshot": self._pending_check["snapshot"] if self._pending_check else None,
        }
        save_state_file(folder, payload, step, int(getattr(args, "process_index", 0) or 0))
        self._written = (os.path.abspath(folder), int(step))

    def _before_trainer_save(self, args, state, control) -> None:
        """Multi-process: the Trainer calls ``state()`` on the saving process only, so the other processes write
        their state files now, at the end of the step whose checkpoint the Trainer is about to save, and all wait
        until every file is written (the saving process then writes ``trainer_state.json``)."""
        if not control.should_save or not is_distributed():
            return
        if int(getattr(args, "process_index", 0) or 0) > 0:
            self._write_state_file(
                args, state.global_step, os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            )
        if not getattr(args, "enable_jit_checkpoint", False):  # a preemption can stop one process's save: no wait
            torch.distributed.barrier()

    def on_save(self, args, state, control, **kwargs):
        """A save whose ``state()`` call did not write this process's file (another output folder, e.g. a
        hyper-parameter search trial, or a save asked for by a callback after this one): write it now."""
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self._written != (os.path.abspath(folder), int(state.global_step)):
            self._write_state_file(args, state.global_step, folder)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        self._before_trainer_save(args, state, control)
        return control

    def _saved_state(self, state) -> dict | None:
        """The callback state of the checkpoint being resumed (None for a fresh run)."""
        if self._resume_state is not None:
            return self._resume_state
        if state.global_step == 0:
            return None
        saved = (state.stateful_callbacks or {}).get(CALLBACK_NAME)
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        if isinstance(saved, dict):
            return (saved.get("attributes") or {}).get("_resume_state")
        return None

    def _restore(self, args, state, model, saved: dict | None) -> None:
        if saved is None:
            logger.warning(
                f"CompreSSM: the checkpoint at step {state.global_step} holds no CompreSSM callback state (saved by "
                "an older version or without the callback): cuts already recorded in the config are not redone, "
                "but the calibration batches, the random-selection generator and any pending pragmatic check are "
                "not restored, so the run can differ from an uninterrupted one."
            )
            return
        self._done_steps |= {int(s) for s in saved["done_steps"]}
        self._last_eval = tuple(saved["last_eval"]) if saved["last_eval"] is not None else None
        candidates = [
            args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) else None,
            saved.get("folder"),
            os.path.join(args.output_dir, f"checkpoint-{state.global_step}"),
        ]
        rank = int(getattr(args, "process_index", 0) or 0)
        path = find_state_file(candidates, state.global_step, rank)
        if path is None:
            raise ValueError(
                f"CompreSSM: resuming at step {state.global_step} needs the callback state saved with the "
                f"checkpoint ({state_file_name(rank)}), found in none of {[c for c in candidates if c]}. Pass the "
                "checkpoint folder in TrainingArguments(resume_from_checkpoint=...) as well as to trainer.train(), "
                "or copy that file along with the checkpoint."
            )
        _, payload = load_state_file(path)
        self._statistics.load_state(payload.get("statistics") or {})
        self._generator = torch.Generator()
        self._generator.set_state(payload["generator"])
        self._pending_check = None
        if saved["pending_check"] is not None:
            if payload["snapshot"] is None:
                raise ValueError(f"CompreSSM: {path} lacks the snapshot of the pending pragmatic check.")
            self._pending_check = {**saved["pending_check"], "snapshot": payload["snapshot"]}
        logger.info(f"CompreSSM: restored the callback state of step {state.global_step} from {path}.")

    def _check_checkpointing(self, args, model) -> None:
        """PEFT + cuts + Trainer checkpoints: refused before any step (nothing changed, nothing written)."""
        if not self.schedule or not any(hasattr(m, "base_layer") for m in model.modules()):
            return
        save_strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
        jit = bool(getattr(args, "enable_jit_checkpoint", False))
        if save_strategy == "no" and not jit:
            return
        setting = f"save_strategy={save_strategy!r}" + (" and enable_jit_checkpoint=True" if jit else "")
        raise ValueError(
            f"CompreSSM cannot cut a PEFT model that the Trainer checkpoints ({setting}): a checkpoint of a PEFT "
            "model holds only the adapter weights, not the base model that the cuts shrink, so it could not be "
            "resumed and its adapter would fit no saved base. Train with save_strategy='no' (and without "
            "enable_jit_checkpoint) and save the result at the end (model.merge_and_unload().save_pretrained(...)), "
            "or compress the base model first (a run without adapters, or compress_model) and add the adapters to "
            "the compressed model."
        )

    def _warn_changed_arguments(self, model, state, previous: dict) -> None:
        now = self.args.to_dict()
        changed = {k: [previous.get(k), v] for k, v in now.items() if previous.get(k) != v}
        if not changed:
            return
        listing = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        logger.warning(
            f"CompreSSM: resuming at step {state.global_step} with CompressionArguments that differ from the "
            f"checkpoint's: {listing}. The new values apply from now on; the recorded history keeps what each "
            "earlier attempt was done with."
        )
        record = dict(model.config.compression or {})
        record["argument_changes"] = list(record.get("argument_changes", [])) + [
            {"step": int(state.global_step), "changed": changed}
        ]
        model.config.compression = record

    def _check_supported(self, args, model) -> None:
        if model is None:
            raise ValueError("CompreSSMCallback needs the model: the Trainer passes it to on_train_begin.")
        check_per_layer_model(model)
        check_training_setup(self.args, args)
        check_cut_supported(model)  # e.g. an adapter that cannot follow a cut: refused before any step
        if is_distributed() and any(hasattr(m, "base_layer") for m in model.modules()):
            raise ValueError(
                "CompreSSM does not support PEFT adapters in multi-process training (DDP would manage adapter "
                "weights whose shapes a cut changes). Train the adapters in one process, or compress first."
            )
        if is_distributed() and not shrinkable_excluded_from_ddp(model):
            raise ValueError(
                "In multi-process training the callback must be passed to the Trainer constructor "
                "(Trainer(..., callbacks=[CompreSSMCallback(...)])) so that it can keep the shrinkable parameters "
                "out of DDP before the model is wrapped; trainer.add_callback() is too late."
            )
        check_min_state_size(self.args.min_state_size, model.config.state_size)

    # ------------------------------------------------------------------ the cut
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        """Record statistics during the last ``calibration_batches`` optimisation steps before each pending cut."""
        # what a checkpoint taken inside this step (a preemption, before the optimizer step) must hold
        self._step_start = (state.global_step, list(self._statistics.window), self._statistics.seconds)
        step = state.global_step + 1  # the optimisation step about to run
        k = self.args.calibration_batches
        self._statistics.active = any(
            cut - k < step <= cut for cut in self.schedule if cut not in self._done_steps
        ) and not (model is not None and (model.config.compression or {}).get("stopped"))
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._step_start = None
        self._step_end(args, state, control, model, optimizer)
        self._before_trainer_save(args, state, control)
        return control

    def _step_end(self, args, state, control, model, optimizer) -> None:
        step = state.global_step
        record = model.config.compression or {}
        if self.args.mode == "pragmatic":
            if self._pending_check is not None and step >= self._pending_check["due"]:
                control.should_evaluate = True
            if step + 1 in self.schedule and step + 1 not in self._done_steps and not record.get("stopped"):
                control.should_evaluate = True  # the "before" measurement of the next cut
        if step not in self.schedule or step in self._done_steps or record.get("stopped"):
            return
        if self._pending_check is not None:
            return  # pragmatic: wait for the comparison of the previous cut
        self._done_steps.add(step)
        layers = ssm_layers(model)
        statistics = self._statistics.statistics(scoring_for(layers.family))
        calibration_seconds = self._statistics.seconds
        self._statistics.clear()
        self._statistics.active = False
        if statistics is None:
            logger.warning(f"CompreSSM: no training batch recorded before step {step}; reduction skipped.")
            return
        snapshot = self._snapshot(model, optimizer) if self.args.mode == "pragmatic" else None
        try:
            report = reduce_once(
                model,
                None,
                self.args,
                optimizer=optimizer,
                step=step,
                generator=self._generator,
                on_commit=lambda r: record_report(model, r, self.args),
                statistics=statistics,
                calibration_seconds=calibration_seconds,
                layers=layers,
            )
        except SurgeryError as err:  # undone: the model, optimizer, config and history are as before the attempt
            logger.warning(f"CompreSSM: the cut at step {step} failed and was undone; training goes on. {err}")
            return
        finally:
            self._reducer.attach(model, layers)  # new parameters need their gradient hooks
        self._log_report(model, args, state, report)
        if report.sizes_after != report.sizes_before:
            self._forget_best_checkpoint(args, state, f"the cut at step {step}")
        if snapshot is not None and report.sizes_after != report.sizes_before:
            self._pending_check = {
                "step": step,
                "due": step + self._rollback_delay(step),
                "baseline": self._last_eval[1] if self._last_eval is not None else None,
                "snapshot": snapshot,
            }
            control.should_evaluate = step >= self._pending_check["due"]

    def _rollback_delay(self, step: int) -> int:
        if self.args.rollback_delay_steps is not None:
            return int(self.args.rollback_delay_steps)
        later = [s for s in self.schedule if s > step]
        return max(0, (later[0] - step) // 2) if later else 1

    def _forget_best_checkpoint(self, args, state, change: str) -> None:
        """``load_best_model_at_end``: a checkpoint saved at other state sizes cannot be loaded into the model, so
        the best metric so far is forgotten; the best model is chosen among the checkpoints saved from now on."""
        if not getattr(args, "load_best_model_at_end", False):
            return
        if state.best_metric is None and state.best_global_step is None and state.best_model_checkpoint is None:
            return
        if state.is_world_process_zero:
            logger.warning(
                f"CompreSSM: {change} changed the state sizes, so the best checkpoint so far "
                f"({state.best_model_checkpoint or f'step {state.best_global_step}'}, {args.metric_for_best_model} "
                f"{state.best_metric}) no longer fits the model: load_best_model_at_end will pick the best "
                "checkpoint saved from now on."
            )
        state.best_metric = None
        state.best_global_step = None
        state.best_model_checkpoint = None

    # ------------------------------------------------------------------ pragmatic mode
    def _snapshot(self, model, optimizer) -> dict:
        inner = unwrap_optimizer(optimizer)
        return {
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": copy.deepcopy(inner.state_dict()) if inner is not None else None,
            "state_sizes": list(model.config.state_sizes),
            "history_len": len(getattr(model, "compression_history", []) or []),
        }

    def on_evaluate(self, args, state, control, metrics=None, model=None, optimizer=None, **kwargs):
        if self.args.mode != "pragmatic" or not metrics:
            return control
        key = self.args.rollback_metric
        value = metrics.get(key, metrics.get(f"eval_{key}"))
        if value is None:
            raise ValueError(
                f"pragmatic mode: rollback_metric {key!r} is not among the evaluation metrics {sorted(metrics)}."
            )
        check = self._pending_check
        if check is not None and state.global_step >= check["due"]:
            self._pending_check = None
            baseline = check["baseline"]
            if baseline is not None:
                sign = -1.0 if self.args.rollback_greater_is_better else 1.0
                worse_by = sign * (float(value) - baseline) / max(abs(baseline), 1e-12)
                if worse_by > self.args.rollback_tolerance:
                    self._rollback(model, optimizer, check, state, value, baseline)
                    self._forget_best_checkpoint(args, state, f"the rollback at step {state.global_step}")
                    return control
        self._last_eval = (state.global_step, float(value))
        return control

    def _rollback(self, model, optimizer, check, state, value, baseline) -> None:
        snap = check["snapshot"]
        inner = unwrap_optimizer(optimizer)
        restore_parameters(model, snap["model"], inner)
        if inner is not None and snap["optimizer"] is not None:
            inner.load_state_dict(snap["optimizer"])
        history = list(model.compression_history)
        for entry in history[snap["history_len"] :]:
            entry["rolled_back"] = True
        set_history(model, history)
        record = dict(model.config.compression)
        record["stopped"] = True
        record["history"] = [h for h in record.get("history", []) if h["step"] != check["step"]]
        model.config.compression = record
        self._reducer.attach(model)
        logger.warning(
            f"CompreSSM (pragmatic): {self.args.rollback_metric}={value:.4g} after the cut at step {check['step']} "
            f"is worse than {baseline:.4g} by more than {self.args.rollback_tolerance:.1%}: rolled back to sizes "
            f"{snap['state_sizes']} and stopped cutting."
        )

    # ------------------------------------------------------------------ logging
    def _log_report(self, model, args, state, report: ReductionReport) -> None:
        logs = {
            "compression/mean_state_size": report.mean_size_after,
            "compression/seconds": report.seconds,
        }
        for d in report.layers:
            logs[f"compression/layer_{d.layer}/state_size"] = d.new_size
            logs[f"compression/layer_{d.layer}/energy_kept"] = d.energy_kept
        state.log_history.append({**logs, "step": state.global_step})
        if self._tb_writer is not None:
            for key, value in logs.items():
                self._tb_writer.add_scalar(key, value, state.global_step)
            for d in report.layers:
                spectrum = torch.tensor(d.scores).flatten().sort(descending=True).values  # (G, N) for Mamba-2
                self._tb_writer.add_histogram(f"compression/layer_{d.layer}/spectrum", spectrum, state.global_step)
            self._tb_writer.flush()
        if state.is_world_process_zero:
            try:
                write_history(model, args.output_dir)
            except OSError as err:  # the record stays in the model and config; never stop training for the file
                logger.warning(f"CompreSSM: could not write the history to {args.output_dir}: {err}")
        verb = "skipped" if report.skipped else ("left unchanged" if report.unchanged else "reduced")
        if not state.is_world_process_zero:  # every rank took the same decision: report it once
            return
        logger.warning(
            f"CompreSSM step {report.step}: {verb} state sizes {report.sizes_before} -> {report.sizes_after} "
            f"(mean {report.mean_size_before:.1f} -> {report.mean_size_after:.1f}) in {report.seconds:.2f}s"
        )

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._training = False
        self._step_start = None
        self._statistics.detach()
        self._statistics.clear()
        self._reducer.detach()
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None
        if model is not None and state.is_world_process_zero:
            write_history(model, args.output_dir)
