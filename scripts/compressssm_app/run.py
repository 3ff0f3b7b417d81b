"""`run_training`: the whole training run of ``scripts/train.py`` (validate, build, train with the callback, save)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer, TrainingArguments, set_seed
from transformers.utils import logging

from hf_compressssm.compression.arguments import CompressionArguments, check_min_state_size, check_training_setup
from hf_compressssm.compression.atomic_io import write_json_atomic
from hf_compressssm.hub.model_card import find_template, save_model_card
from hf_compressssm.trainer.callback import CompreSSMCallback, report_cuts_to_integrations
from hf_compressssm.trainer.checkpoint import checkpoint_folders, checkpoint_problem, last_complete_checkpoint

from .arguments import DataArguments, ModelArguments, UsageError
from .model_builder import build_model
from .output_dir import RUN_FILE, claim_output_dir, run_settings
from .task_data import TaskData, build_datasets


logger = logging.get_logger(__name__)


def planned_max_steps(training_args: TrainingArguments, num_train_items: int) -> int:
    """The number of optimisation steps the Trainer will run (as it computes it, for a single process)."""
    if training_args.max_steps > 0:
        return int(training_args.max_steps)
    per_step = training_args.per_device_train_batch_size * max(1, training_args.gradient_accumulation_steps)
    per_step *= max(1, training_args.world_size)
    batches = (
        num_train_items // per_step if training_args.dataloader_drop_last else math.ceil(num_train_items / per_step)
    )
    return max(1, math.ceil(training_args.num_train_epochs * batches))


def validate_arguments(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    comp_args: CompressionArguments,
) -> None:
    """Checks that need no data: raise `UsageError` for combinations that cannot work."""
    if model_args.model_name_or_path is None:
        for name in ("hidden_size", "num_hidden_layers", "state_size", "expand", "conv_kernel"):
            if getattr(model_args, name) < 1:
                raise UsageError(f"{name}={getattr(model_args, name)} must be >= 1.")
    try:
        if model_args.model_name_or_path is None:
            check_min_state_size(comp_args.min_state_size, model_args.state_size)
        check_training_setup(comp_args, training_args)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if model_args.classifier_pooling not in ("mean", "last"):
        raise UsageError(f"classifier_pooling must be 'mean' or 'last', got {model_args.classifier_pooling!r}.")
    if data_args.task == "pixel_classification" and not 1 <= data_args.num_bins <= 256:
        raise UsageError(f"num_bins={data_args.num_bins} must be in 1..256.")
    if training_args.push_to_hub and not (training_args.hub_model_id or "").strip():
        raise UsageError("--push_to_hub needs --hub_model_id owner/name.")


def _validate_with_model(model: PreTrainedModel, task_data: TaskData, training_args, comp_args) -> int:
    if not hasattr(task_data.train_dataset, "__len__"):  # a stream (--streaming): only max_steps can end the run
        if training_args.max_steps <= 0:
            raise UsageError("--streaming needs --max_steps N (a stream has no length to count epochs over).")
        max_steps = int(training_args.max_steps)
    else:
        max_steps = planned_max_steps(training_args, len(task_data.train_dataset))
    try:
        comp_args.schedule(max_steps)
        check_min_state_size(comp_args.min_state_size, model.config.state_size)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if not hasattr(task_data.train_dataset, "__len__"):
        return max_steps
    if len(task_data.train_dataset) < training_args.per_device_train_batch_size and training_args.dataloader_drop_last:
        raise UsageError(
            f"only {len(task_data.train_dataset)} training items for a batch of "
            f"{training_args.per_device_train_batch_size}: lower --per_device_train_batch_size."
        )
    return max_steps


def resume_checkpoint(model_args: ModelArguments, training_args: TrainingArguments) -> str | None:
    """The checkpoint this run resumes from, as the transformers examples choose it.

    ``--resume_from_checkpoint PATH`` (must be a complete checkpoint, else `UsageError`); otherwise the newest
    complete ``checkpoint-N`` of ``--output_dir`` (newer half-written ones are skipped with a warning naming them),
    unless ``--overwrite_output_dir`` asks for a fresh start. None: start fresh.
    """
    explicit = training_args.resume_from_checkpoint
    if explicit:
        problem = checkpoint_problem(explicit)
        if problem is not None:
            raise UsageError(
                f"--resume_from_checkpoint {explicit} is not a complete checkpoint: {problem}. Pick another "
                f"checkpoint-N folder, or omit the option to resume from the newest complete one in --output_dir."
            )
        return explicit
    output_dir = training_args.output_dir
    if model_args.overwrite_output_dir or not checkpoint_folders(output_dir):
        return None
    found = last_complete_checkpoint(output_dir)
    if found is None:
        logger.warning(f"CompreSSM: no complete checkpoint in {output_dir}; starting a fresh run.")
    return found


def _parameters_of_initial_model(model: PreTrainedModel, sizes: list[int]) -> int:
    """Parameter count of ``model``'s architecture at per-layer state sizes ``sizes`` (built on the meta device)."""
    config = model.config.__class__.from_dict({**model.config.to_dict(), "state_sizes": list(sizes)})
    with torch.device("meta"):
        return sum(p.numel() for p in type(model)(config).parameters())


def eval_summary(metrics: dict[str, float], metric: str) -> dict[str, float]:
    """Eval metrics without the ``eval_`` prefix, plus ``perplexity = exp(loss)`` for language modelling."""
    skip = {"runtime", "samples_per_second", "steps_per_second", "epoch"}
    out = {k.removeprefix("eval_"): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    out = {k: v for k, v in out.items() if k not in skip}
    if metric == "perplexity" and "loss" in out:
        out["perplexity"] = float(math.exp(min(out["loss"], 50.0)))
    return out


def run_info(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments | None = None,
    comp_args: CompressionArguments | None = None,
) -> dict[str, Any]:
    """What ``compressssm_run.json`` records: the data and model arguments (``scripts/evaluate.py`` rebuilds the
    matching split from them) and, when given, the training and compression arguments (a re-run compares them)."""
    return run_settings(model_args, data_args, training_args, comp_args)


EXIT_INTERRUPTED = 143  # 128 + SIGTERM: the status of a command stopped by SIGTERM


class TrainingInterrupted(RuntimeError):
    """Training stopped before its last step because the process got SIGTERM (``--enable_jit_checkpoint``: the
    Trainer saved a preemption checkpoint and stopped); nothing final (model, card, run file) was written."""

    def __init__(self, step: int, max_steps: int, checkpoint: str | None) -> None:
        saved = f"{checkpoint} is saved" if checkpoint else "no checkpoint was saved"
        super().__init__(
            f"interrupted at step {step} of {max_steps} (SIGTERM); {saved}: re-run the same command to resume."
        )
        self.step, self.max_steps, self.checkpoint = step, max_steps, checkpoint


@contextlib.contextmanager
def _preemption(trainer: Trainer):
    """With ``--enable_jit_checkpoint``: yields a list that records SIGTERM (the Trainer's handler then saves a
    preemption checkpoint and stops training, and ``train()`` returns as if it had finished), and moves the
    Trainer's JIT callback after `CompreSSMCallback`, so that a checkpoint taken at the end of a step follows that
    step's cut."""
    received: list[int] = []
    if not getattr(trainer.args, "enable_jit_checkpoint", False):
        yield received
        return
    from transformers.trainer_jit_checkpoint import JITCheckpointCallback

    jit = trainer.pop_callback(JITCheckpointCallback)
    if jit is not None:
        trainer.add_callback(jit)
    handler = signal.getsignal(signal.SIGTERM)  # the Trainer's

    def on_sigterm(signum, frame):
        received.append(signum)
        if callable(handler):
            handler(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield received
    finally:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:  # the Trainer restores its predecessor at train end
            signal.signal(signal.SIGTERM, handler)


class UploadError(RuntimeError):
    """Training finished and the folder is saved, but the ``--push_to_hub`` upload failed; ``results`` holds the
    run's results, the message the command that retries the upload alone."""

    def __init__(self, message: str, results: dict[str, Any]) -> None:
        super().__init__(message)
        self.results = results


def run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    comp_args: CompressionArguments,
    *,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Build data and model, train with `CompreSSMCallback`, evaluate, save model + tokenizer + card + history.

    Everything the user can get wrong is checked first (`UsageError`, nothing written): the arguments, the Hub
    for ``--push_to_hub`` (repo id, token, endpoint), the output folder (locked for this run; another run's folder
    is refused unless ``--overwrite_output_dir``), the data and the model. Returns a dict with
    ``state_sizes_before``/``after``, ``parameters_before``/``after``, ``train`` and ``eval`` metrics,
    ``output_dir`` and ``train_seconds``; when ``--output_dir`` already holds the finished run of the same
    settings nothing is trained and the dict is that run's results with ``already_finished`` True. A failed upload
    after training raises `UploadError` (the folder is saved; the message says how to retry the upload).
    """
    validate_arguments(model_args, data_args, training_args, comp_args)
    find_template()  # the card is written at the end: fail now if the template is missing
    push, hub = bool(training_args.push_to_hub), {}
    checks = [lambda: hub.update(repo_id=_check_hub(training_args))] if push else []
    with claim_output_dir(model_args, data_args, training_args, comp_args, checks=checks) as claim:
        if claim.decision == "finished":
            return {**(claim.record or {}).get("results", {}), "already_finished": True}
        training_args.push_to_hub = False  # the Trainer would overwrite our card; we upload the folder ourselves
        results = _train(model_args, data_args, training_args, comp_args, callbacks=[*callbacks, claim.callback])
        if push and claim.main:
            from hf_compressssm.hub.publish import HubUploadError, upload_folder

            out = training_args.output_dir
            try:
                results["hub_url"] = upload_folder(
                    out, hub["repo_id"], token=training_args.hub_token, private=training_args.hub_private_repo
                )
            except HubUploadError as err:
                raise UploadError(str(err), results) from err
        return results


def _check_hub(training_args: TrainingArguments) -> str:
    """`check_hub_access` for ``--push_to_hub`` (`UsageError` with the fix); the full repo id."""
    from hf_compressssm.hub.publish import HubAccessError, check_hub_access

    try:
        return check_hub_access(
            training_args.hub_model_id, token=training_args.hub_token, private=training_args.hub_private_repo
        )
    except HubAccessError as err:
        raise UsageError(str(err)) from err


def _train(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    comp_args: CompressionArguments,
    *,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """The run itself (`run_training` has checked the arguments and the Hub, and claimed the output folder)."""
    checkpoint = resume_checkpoint(model_args, training_args)
    task_data = build_datasets(data_args, model_args=model_args)
    set_seed(training_args.seed)
    if checkpoint is None:
        model = build_model(model_args, task_data)
    else:  # the checkpoint's architecture: the state sizes it was cut to
        model = build_model(dataclasses.replace(model_args, model_name_or_path=checkpoint), task_data)
        training_args.resume_from_checkpoint = checkpoint  # where the callback finds its saved state
    max_steps = _validate_with_model(model, task_data, training_args, comp_args)

    sizes_before = list((model.config.compression or {}).get("initial_state_sizes") or model.config.state_sizes)
    if sizes_before == list(model.config.state_sizes):
        params_before = sum(p.numel() for p in model.parameters())
    else:
        params_before = _parameters_of_initial_model(model, sizes_before)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=task_data.train_dataset,
        eval_dataset=task_data.eval_dataset,
        compute_metrics=task_data.compute_metrics,
        preprocess_logits_for_metrics=task_data.preprocess_logits_for_metrics,
        callbacks=[CompreSSMCallback(comp_args), *callbacks],
    )
    report_cuts_to_integrations(trainer)  # report_to receives the cut scalars
    main = trainer.is_world_process_zero()
    if main:
        logger.warning(
            f"CompreSSM {task_data.task}: {params_before:,} parameters, state sizes {sizes_before}, {max_steps} steps, "
            f"reductions at {comp_args.schedule(max_steps)}; data: {task_data.dataset_description}."
        )
        if checkpoint is not None:
            logger.warning(
                f"CompreSSM: resuming from {checkpoint} (state sizes {list(model.config.state_sizes)}); pass "
                "--overwrite_output_dir to start afresh instead."
            )
    start = time.perf_counter()
    with _preemption(trainer) as sigterm:
        train_output = trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.perf_counter() - start
    if sigterm and trainer.state.global_step < trainer.state.max_steps:
        newest = last_complete_checkpoint(training_args.output_dir)
        raise TrainingInterrupted(trainer.state.global_step, trainer.state.max_steps, newest)
    model = trainer.model
    eval_metrics = eval_summary(trainer.evaluate(), task_data.metric)
    results = {
        "task": task_data.task,
        "output_dir": training_args.output_dir,
        "state_sizes_before": sizes_before,
        "state_sizes_after": list(model.config.state_sizes),
        "parameters_before": params_before,
        "parameters_after": sum(p.numel() for p in model.parameters()),
        "train": {k: float(v) for k, v in train_output.metrics.items()},
        "eval": eval_metrics,
        "train_seconds": train_seconds,
        "dataset": task_data.dataset_description,
    }
    if main:
        out = training_args.output_dir
        model.save_pretrained(out)
        if task_data.tokenizer is not None:
            task_data.tokenizer.save_pretrained(out)
        trainer.save_metrics("train", results["train"])
        trainer.save_metrics("eval", {f"eval_{k}": v for k, v in eval_metrics.items()})
        trainer.save_state()
        card = dict(
            task=task_data.task,
            dataset_description=task_data.dataset_description,
            datasets=task_data.dataset_ids,
            metrics=eval_metrics,
            eval_split=task_data.eval_description,
            model_name=Path(out).name,
            training={
                "max_steps": max_steps,
                "train_seconds": round(train_seconds, 1),
                "per_device_train_batch_size": training_args.per_device_train_batch_size,
                "learning_rate": training_args.learning_rate,
                "sequence_length": task_data.sequence_length,
            },
            repo_id=training_args.hub_model_id,
        )
        write_json_atomic(
            os.path.join(out, RUN_FILE),
            {**run_info(model_args, data_args, training_args, comp_args), "results": results, "card": card},
        )
        save_model_card(model, out, **card)
    trainer.accelerator.wait_for_everyone()
    return results
