"""Resume anywhere = the uninterrupted run: the callback's state travels in every Trainer checkpoint.

One uninterrupted run per mode saves a checkpoint at every step; resuming from a checkpoint before a cut, inside the
calibration window of a cut, right after a cut, between a cut and its pragmatic check, and after all cuts must give
the same final parameters, sizes and history.
"""

import json
import os
import shutil

import pytest
import torch
from helpers import Blocks, tiny_lm
from mamba2_helpers import tiny_mamba2_lm
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_jit_checkpoint import CheckpointManager
from transformers.utils import logging as hf_logging

from hf_compressssm import CompreSSMCallback, CompreSSMMamba2ForCausalLM, CompreSSMMambaForCausalLM
from hf_compressssm.trainer.checkpoint import STATE_FILE, checkpoint_problem


MAX_STEPS = 12
CUTS = [4, 8]


class SizeMetric:
    """Evaluation metric = the mean state size of the model being trained (makes pragmatic mode roll back)."""

    def __init__(self):
        self.model = None

    def __call__(self, prediction):
        sizes = self.model.state_sizes()
        return {"mean_state_size": float(sum(sizes) / len(sizes))}


MODES = {
    # the same on a Mamba-2 model: the callback state is family-agnostic
    "mamba2": dict(tau=0.3, selection="random", reduction_steps=CUTS, calibration_batches=3),
    # random selection: the kept states depend on the generator, which must travel in the checkpoint
    "tolerance": dict(tau=0.3, selection="random", reduction_steps=CUTS, calibration_batches=3),
    # cut at 4, compared at 6 (half the gap), rolled back (smaller mean size is "worse"), no cut at 8
    "pragmatic": dict(
        mode="pragmatic",
        fixed_fraction=0.5,
        reduction_steps=CUTS,
        calibration_batches=3,
        rollback_metric="eval_mean_state_size",
        rollback_greater_is_better=True,
        rollback_tolerance=0.0,
    ),
}


class Preempt(TrainerCallback):
    """Takes the Trainer's preemption (JIT) checkpoint at ``hook`` of optimisation step ``step`` and stops training,
    as `transformers.trainer_jit_checkpoint.JITCheckpointCallback` does once SIGTERM's grace period is over."""

    def __init__(self, hook, step):
        self.hook, self.step, self.trainer, self.saved = hook, step, None, None

    def _maybe(self, hook, state, control):
        if hook == self.hook and self.saved is None and state.global_step + (hook != "on_step_end") == self.step:
            control.should_training_stop = True
            CheckpointManager(self.trainer).execute_jit_checkpoint()
            self.saved = state.global_step

    def on_step_begin(self, args, state, control, **kwargs):
        self._maybe("on_step_begin", state, control)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._maybe("on_pre_optimizer_step", state, control)

    def on_step_end(self, args, state, control, **kwargs):
        if self.hook == "on_step_end" and self.saved is None and state.global_step == self.step:
            control.should_save = False  # the preemption checkpoint replaces this step's regular save
        self._maybe("on_step_end", state, control)


def _run(out, mode, resume=None, callback_kwargs=None, preempt=None, preempt_first=True, **arg_overrides):
    if mode == "mamba2":
        model = tiny_mamba2_lm() if resume is None else CompreSSMMamba2ForCausalLM.from_pretrained(resume)
    else:
        model = tiny_lm(state_sizes=[8, 8]) if resume is None else CompreSSMMambaForCausalLM.from_pretrained(resume)
    metric = SizeMetric()
    metric.model = model
    values = dict(
        output_dir=str(out),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        lr_scheduler_type="linear",
        logging_steps=100,
        report_to=[],
        save_strategy="steps",
        save_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    if mode == "pragmatic":
        values.update(eval_strategy="steps", eval_steps=100, per_device_eval_batch_size=4)
    values.update(arg_overrides)
    callback = CompreSSMCallback(**(callback_kwargs or MODES[mode]))
    callbacks = [callback]
    if preempt is not None:  # before or after the CompreSSM callback in the Trainer's list
        callbacks = [preempt, callback] if preempt_first else [callback, preempt]
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**values),
        train_dataset=Blocks(n=96),
        eval_dataset=Blocks(n=4, seed=5) if mode == "pragmatic" else None,
        compute_metrics=metric if mode == "pragmatic" else None,
        callbacks=callbacks,
    )
    if preempt is not None:
        preempt.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    return trainer.model


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    runs = {}
    for mode in MODES:
        out = tmp_path_factory.mktemp(f"full-{mode}")
        runs[mode] = (out, _run(out, mode))
    return runs


def _assert_same_run(resumed, full):
    assert resumed.state_sizes() == full.state_sizes()
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in full.compression_history]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.compression_history] == strip
    assert resumed.config.compression["history"] == full.config.compression["history"]
    assert resumed.config.compression["stopped"] == full.config.compression["stopped"]
    full_params = dict(full.named_parameters())
    for name, param in resumed.named_parameters():
        torch.testing.assert_close(param, full_params[name], rtol=0, atol=0, msg=name)


def test_uninterrupted_runs_do_what_the_resume_cases_need(uninterrupted):
    for mode in ("tolerance", "mamba2"):
        out, model = uninterrupted[mode]
        assert [h["step"] for h in model.compression_history] == CUTS
        assert all(s < 8 for s in model.state_sizes())
    out, model = uninterrupted["pragmatic"]
    assert model.config.compression["stopped"] is True and model.state_sizes() == [8, 8]
    assert model.compression_history[0]["rolled_back"] is True
    for step in range(1, MAX_STEPS + 1):
        assert (out / f"checkpoint-{step}" / STATE_FILE).is_file()


@pytest.mark.parametrize(
    "mode, step",
    [
        ("tolerance", 1),  # before the first cut, before its calibration window
        ("tolerance", 2),  # inside the calibration window of the cut at 4
        ("tolerance", 4),  # right after a cut
        ("tolerance", 7),  # between cuts, inside the window of the cut at 8: needs the batches of steps 6-7
        ("tolerance", 10),  # after all cuts
        ("mamba2", 7),  # Mamba-2, inside the calibration window of the second cut
        ("pragmatic", 3),  # after the "before" evaluation of the cut at 4
        ("pragmatic", 5),  # between the cut at 4 and its rollback check at 6
        ("pragmatic", 9),  # after the rollback
    ],
)
def test_resume_from_any_checkpoint_equals_uninterrupted(uninterrupted, tmp_path, mode, step):
    out, full = uninterrupted[mode]
    resumed = _run(tmp_path / "resumed", mode, resume=str(out / f"checkpoint-{step}"))
    _assert_same_run(resumed, full)


def test_state_travels_with_a_copied_checkpoint_and_the_hf_restore_flag(uninterrupted, tmp_path):
    """A checkpoint copied elsewhere (original deleted) resumes when TrainingArguments.resume_from_checkpoint names
    it; Trainer(restore_callback_states_from_checkpoint=True) rebuilds the callback from its exported state."""
    out, full = uninterrupted["tolerance"]
    copy = tmp_path / "elsewhere"
    shutil.copytree(out / "checkpoint-6", copy)
    # as if the original folder had been deleted: the state file is only in the copy
    trainer_state = json.loads((copy / "trainer_state.json").read_text())
    trainer_state["stateful_callbacks"]["CompreSSMCallback"]["attributes"]["_resume_state"]["folder"] = "/gone"
    (copy / "trainer_state.json").write_text(json.dumps(trainer_state))
    with pytest.raises(ValueError, match=r"needs the callback state saved with the checkpoint"):
        _run(tmp_path / "r0", "tolerance", resume=str(copy))
    resumed = _run(
        tmp_path / "r1",
        "tolerance",
        resume=str(copy),
        resume_from_checkpoint=str(copy),
        restore_callback_states_from_checkpoint=True,
    )
    _assert_same_run(resumed, full)


def test_checkpoint_records_callback_state_in_trainer_state(uninterrupted):
    out, _ = uninterrupted["pragmatic"]
    saved = json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())["stateful_callbacks"]
    state = saved["CompreSSMCallback"]["attributes"]["_resume_state"]
    assert state["global_step"] == 5 and state["done_steps"] == [4]
    assert state["pending_check"]["step"] == 4 and state["pending_check"]["due"] == 6
    assert state["args"]["mode"] == "pragmatic"


def test_changed_arguments_on_resume_warn_and_history_keeps_what_was_done(uninterrupted, tmp_path, caplog):
    """Resuming with another tau warns with each changed field; recorded attempts keep their tau."""
    out, _ = uninterrupted["tolerance"]
    changed = {**MODES["tolerance"], "tau": 0.5, "calibration_batches": 2}
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            model = _run(tmp_path / "r", "tolerance", resume=str(out / "checkpoint-6"), callback_kwargs=changed)
    finally:
        hf_logging.disable_propagation()
    text = caplog.text
    assert "tau: 0.3 -> 0.5" in text and "calibration_batches: 3 -> 2" in text
    history = model.config.compression["history"]
    assert [h["tau"] for h in history] == [0.3, 0.5]  # the cut at 4 was done with 0.3, the one at 8 with 0.5
    assert [h["tau"] for h in model.compression_history] == [0.3, 0.5]
    assert model.config.compression["argument_changes"] == [
        {"step": 6, "changed": {"tau": [0.3, 0.5], "calibration_batches": [3, 2]}}
    ]
    assert os.path.isfile(tmp_path / "r" / "compression_history.json")


@pytest.mark.parametrize(
    "mode, hook, step, preempt_first",
    [
        # before step 7 runs (inside the calibration window of the cut at 8)
        ("tolerance", "on_step_begin", 7, True),
        # inside step 7, after its forward (recorded for the cut at 8), before its optimizer step: the checkpoint
        # is that of step 6 and must not hold step 7's statistics
        ("tolerance", "on_pre_optimizer_step", 7, True),
        ("mamba2", "on_pre_optimizer_step", 7, True),
        # at the end of the cut step 4, before the CompreSSM callback cut: the cut is made when the run resumes
        ("tolerance", "on_step_end", 4, True),
        ("mamba2", "on_step_end", 8, True),
        # at the end of step 4, after the cut (the preemption callback listed after CompreSSM, as train.py does)
        ("tolerance", "on_step_end", 4, False),
        # pragmatic: between the cut at 4 and its check at 6
        ("pragmatic", "on_pre_optimizer_step", 5, True),
    ],
)
def test_resume_from_a_preemption_checkpoint_equals_uninterrupted(
    uninterrupted, tmp_path, mode, hook, step, preempt_first
):
    """a preemption checkpoint (transformers' enable_jit_checkpoint, no regular saves) taken anywhere in
    a step holds the callback state; resuming from it gives the uninterrupted run."""
    out, full = uninterrupted[mode]
    preempt = Preempt(hook, step)
    _run(tmp_path / "run", mode, preempt=preempt, preempt_first=preempt_first, save_strategy="no")
    saved = step - (hook != "on_step_end")
    checkpoint = tmp_path / "run" / f"checkpoint-{saved}"
    assert preempt.saved == saved and [p.name for p in (tmp_path / "run").glob("checkpoint-*")] == [checkpoint.name]
    assert checkpoint_problem(str(checkpoint)) is None
    state = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["CompreSSMCallback"]
    assert state["attributes"]["_resume_state"]["step_end_pending"] is (hook == "on_step_end" and preempt_first)
    resumed = _run(tmp_path / "resumed", mode, resume=str(checkpoint))
    _assert_same_run(resumed, full)
