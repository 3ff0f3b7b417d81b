"""`CompreSSMCallback`: a `Compressor` inside the Hugging Face `Trainer`.

    trainer = Trainer(model=model, args=training_args, train_dataset=ds, callbacks=[CompreSSMCallback(tau=0.05)])

The callback maps the Trainer's events onto its `Compressor` (``on_step_begin`` → `Compressor.prepare`,
``on_step_end`` → `Compressor.step`, ``on_evaluate`` → `Compressor.evaluated`), saves the compressor's
`state_dict` with every checkpoint (`hf_compressssm.trainer.checkpoint`) and reports each cut through the Trainer's
log (``state.log_history`` and the callbacks that ``on_log`` reaches after this one: `report_cuts_to_integrations`
moves the ``report_to`` integrations there).
"""

import os
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.utils import logging

from ..compression.arguments import CompressionArguments, check_training_setup
from ..compression.compressor import Compressor
from ..compression.distributed import exclude_shrinkable_from_ddp, is_distributed
from ..compression.record import write_history
from ..compression.reduction import ReductionReport
from ..families import find_mixers
from .checkpoint import (
    check_peft_checkpointing,
    forget_best_checkpoint,
    load_saved_tensors,
    save_in_progress,
    save_state_file,
    saved_callback_state,
)


logger = logging.get_logger(__name__)
_FILE_KEYS = ("statistics", "generator", "snapshot")  # the tensors of a `Compressor.state_dict`, kept in the file


class CompreSSMCallback(TrainerCallback, ExportableState):
    """Compress the SSM layers of the model being trained, a few times early in training (`Compressor`).

    Args:
        args: a `CompressionArguments`; or pass its fields as keyword arguments.

    Multi-process: pass the callback to the `Trainer` constructor (``callbacks=[...]``) so that ``on_init_end`` keeps
    the shrinkable parameters out of DDP before it wraps the model.

    Resume: every checkpoint carries the compressor's state (its JSON part in ``trainer_state.json``, its tensors in
    ``compressssm_state.safetensors``, written before ``trainer_state.json``), so ``trainer.train(
    resume_from_checkpoint=folder)`` with a model built from that folder (``from_pretrained(folder)``) continues
    exactly as the uninterrupted run, preemption checkpoints (``enable_jit_checkpoint``) included. Put the Trainer's
    ``JITCheckpointCallback`` after this callback (``trainer.add_callback(trainer.pop_callback(
    JITCheckpointCallback))``) so that a preemption checkpoint at the end of a step follows this callback's work.

    ``load_best_model_at_end``: each cut (and pragmatic rollback) forgets the best metric so far (older checkpoints
    no longer fit the model). PEFT: a PEFT model with scheduled cuts is refused when the Trainer may checkpoint it.
    """

    def __init__(self, args: CompressionArguments | None = None, **kwargs):
        self.compressor = Compressor(args, **kwargs)
        self._resume_state: dict | None = None  # set by Trainer(restore_callback_states_from_checkpoint=True)
        self._trainer_state = self._trainer_args = None
        self._training = False  # between on_train_begin and on_train_end
        self._step_start: tuple[int, dict] | None = None  # (global_step, statistics) when the step began
        self._written: tuple[str, int] | None = None  # (folder, step) of the last state file this process wrote
        self._logs: dict[str, float] | None = None  # a cut's scalars, for the Trainer's next log

    @property
    def args(self) -> CompressionArguments:
        return self.compressor.args

    @property
    def schedule(self) -> list[int]:
        return self.compressor.schedule

    # ------------------------------------------------------------------ training
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None and find_mixers(model):
            exclude_shrinkable_from_ddp(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise ValueError("CompreSSMCallback needs the model: the Trainer passes it to on_train_begin.")
        check_training_setup(self.args, args)
        self._trainer_state, self._trainer_args = state, args
        self._step_start, self._written = None, None
        check_peft_checkpointing(args, model, self.compressor.plan(state.max_steps))
        saved = self._resume_state if self._resume_state is not None else saved_callback_state(state)
        pending = bool(saved and saved.get("step_end_pending"))
        if state.global_step > 0:
            self._restore(args, state, saved)
        self.compressor.start(model, state.max_steps, state.global_step, step_end_done=not pending)
        self._resume_state, self._training = None, True
        if pending:  # a preemption checkpoint taken before this callback's end of its step
            logger.info(f"CompreSSM: doing the end of step {state.global_step} that its checkpoint preceded.")
            self._step_end(args, state, control, model, optimizer)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._step_start = (state.global_step, self.compressor.statistics.state())
        self.compressor.prepare(model, state.global_step + 1)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._step_start = None
        self._step_end(args, state, control, model, optimizer)
        self._before_trainer_save(args, state, control)

    def _step_end(self, args, state, control, model, optimizer) -> None:
        report = self.compressor.step(model, optimizer, state.global_step)
        if self.compressor.evaluation_request is not None:
            control.should_evaluate = self.compressor.evaluation_request
        if report is not None:
            self._report(args, state, control, model, report)
            if not report.unchanged:
                forget_best_checkpoint(args, state, f"the cut at step {report.step}")

    def on_evaluate(self, args, state, control, metrics=None, model=None, optimizer=None, **kwargs):
        if self.compressor.evaluated(model, optimizer, state.global_step, metrics or {}):
            forget_best_checkpoint(args, state, f"the rollback at step {state.global_step}")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._training, self._step_start = False, None
        self.compressor.stop()
        if model is not None and state.is_world_process_zero:
            write_history(model, args.output_dir)

    # ------------------------------------------------------------------ reporting
    def _report(self, args, state, control, model, report: ReductionReport) -> None:
        """Ask the Trainer to log at this step; `on_log` adds the cut's scalars to that log."""
        self._logs = {"compression/mean_state_size": report.mean_size_after, "compression/seconds": report.seconds}
        for d in report.layers:
            self._logs[f"compression/layer_{d.layer}/state_size"] = d.new_size
            self._logs[f"compression/layer_{d.layer}/energy_kept"] = d.energy_kept
        control.should_log = True
        if state.is_world_process_zero:
            try:
                write_history(model, args.output_dir)
            except OSError as err:  # the record stays in the model and config; never stop training for the file
                logger.warning(f"CompreSSM: could not write the history to {args.output_dir}: {err}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._logs and logs is not None:
            logs.update(self._logs)
            if state.log_history:
                state.log_history[-1].update(self._logs)
            self._logs = None

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        """`ExportableState`: the arguments and the JSON part of the compressor's state, for ``trainer_state.json``.

        The Trainer calls this on the saving process after writing the model, optimizer and RNG files and just
        before ``trainer_state.json``: this is where that process writes the tensors into the checkpoint."""
        resume = None
        trainer_state = self._trainer_state
        if self._training and trainer_state is not None and trainer_state.global_step > 0:
            args, step, start = self._trainer_args, int(trainer_state.global_step), self._step_start
            folder = os.path.join(args.output_dir, f"checkpoint-{step}")
            full = self.compressor.state_dict()
            resume = {k: full[k] for k in ("version", "args", "done_steps", "last_eval", "pending_check")}
            resume.update(
                global_step=step,
                step_end_pending=start is not None and start[0] == step - 1,  # saved before this callback's step end
                folder=os.path.abspath(folder),
                world_size=int(getattr(args, "world_size", 1) or 1),
            )
            if save_in_progress(folder):  # inside a step (preemption): the statistics as of the step's beginning
                self._write_state_file(args, step, folder, start[1] if start is not None and start[0] == step else None)
        return {"args": self.args.to_dict(), "attributes": {"_resume_state": resume}}

    def _write_state_file(self, args, step: int, folder: str, statistics: dict | None = None) -> None:
        payload = {k: v for k, v in self.compressor.state_dict().items() if k in _FILE_KEYS}
        if statistics is not None:
            payload["statistics"] = statistics
        save_state_file(folder, payload, step, int(getattr(args, "process_index", 0) or 0))
        self._written = (os.path.abspath(folder), int(step))

    def _before_trainer_save(self, args, state, control) -> None:
        """Multi-process: the other processes write their state files at the end of the step whose checkpoint the
        Trainer is about to save, and all wait until every file is written."""
        if not control.should_save or not is_distributed():
            return
        if int(getattr(args, "process_index", 0) or 0) > 0:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            self._write_state_file(args, state.global_step, folder)
        if not getattr(args, "enable_jit_checkpoint", False):  # a preemption can stop one process's save: no wait
            import torch.distributed

            torch.distributed.barrier()

    def on_save(self, args, state, control, **kwargs):
        """A save whose ``state()`` call did not write this process's file (e.g. another output folder): now."""
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self._written != (os.path.abspath(folder), int(state.global_step)):
            self._write_state_file(args, state.global_step, folder)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._before_trainer_save(args, state, control)

    def _restore(self, args, state, saved: dict | None) -> None:
        if saved is None:
            logger.warning(
                f"CompreSSM: the checkpoint at step {state.global_step} holds no CompreSSM callback state (saved by "
                "an older version or without the callback): cuts already recorded in the config are not redone, "
                "but the calibration batches, the random-selection generator and any pending pragmatic check are "
                "not restored, so the run can differ from an uninterrupted one."
            )
            return
        self.compressor.load_state_dict({**saved, **load_saved_tensors(args, state, saved)})


def report_cuts_to_integrations(trainer) -> None:
    """Move the Trainer's reporting integrations (``report_to``: TensorBoard, W&B, MLflow, ...) after its
    `CompreSSMCallback`, so that they receive the cut scalars the callback adds to the log.

    The Trainer lists the integrations before the user's callbacks, and a callback's ``on_log`` can only add values
    for the callbacks after it. Call this after building the Trainer, before ``train()``."""
    callbacks = list(trainer.callback_handler.callbacks)
    ours = [i for i, cb in enumerate(callbacks) if isinstance(cb, CompreSSMCallback)]
    if not ours:
        return
    for callback in callbacks[: ours[0]]:
        if type(callback).__module__.startswith("transformers.integrations"):
            trainer.add_callback(trainer.pop_callback(callback))
