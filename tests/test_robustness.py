"""Regressions: atomic cuts (PEFT included), degenerate scores, argument types, atomic files, and the train
script's resume (skipping a half-written checkpoint left by a kill). The resume-anywhere cases are in test_resume.py.

Table rows of the issue covered here: 1 (PEFT cut not atomic), 2 (--resume_from_checkpoint ignored), 5 (kill leaves
a half-written newest checkpoint), 8 (all-zero scores), 9 (argument types); rows 3, 4 and 11 in test_resume.py.
"""

import copy
import json
import logging
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from helpers import random_ids, tiny_lm
from mamba2_helpers import tiny_mamba2_lm
from transformers import Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from hf_compressssm import CompressionArguments, CompreSSMCallback, compress_model
from hf_compressssm.compression import atomic_io, record, reduction, surgery
from hf_compressssm.compression.surgery import SurgeryError, shrink_mixers
from hf_compressssm.families import find_mixers
from hf_compressssm.trainer.checkpoint import STATE_FILE, checkpoint_problem


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
peft = pytest.importorskip("peft")


@pytest.fixture
def hf_warnings(caplog):
    hf_logging.enable_propagation()
    caplog.set_level(logging.WARNING)
    yield caplog
    hf_logging.disable_propagation()


def _batches(n=2):
    return [{"input_ids": random_ids(batch=4, length=16, seed=s)} for s in range(n)]


def _lora(model, targets=("x_proj", "in_proj"), **kwargs):
    config = peft.LoraConfig(r=2, target_modules=list(targets), init_lora_weights=False, **kwargs)
    return peft.get_peft_model(model, config)


LORA_TARGETS = {"mamba": ("x_proj", "in_proj"), "mamba2": ("in_proj", "out_proj")}


def _cut_projection(mixer):
    """The projection whose rows a cut removes: Mamba-1 ``x_proj``, Mamba-2 ``in_proj``."""
    return mixer.x_proj if hasattr(mixer, "x_proj") else mixer.in_proj


def _trained(kind, family="mamba"):
    model = (tiny_lm if family == "mamba" else tiny_mamba2_lm)(state_sizes=[8, 8])
    wrapped = _lora(model, LORA_TARGETS[family]) if kind == "lora" else model
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    ids = random_ids(batch=2, length=10)
    for _ in range(2):
        optimizer.zero_grad()
        wrapped(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    compress_model(wrapped, _batches(), tau=0.1)  # a history to keep intact
    return model, wrapped, optimizer


def _everything(model, wrapped, optimizer):
    """What a failed cut must leave exactly as it was."""
    return {
        "params": {n: (p, p.detach().clone()) for n, p in wrapped.named_parameters()},
        "groups": [list(g["params"]) for g in optimizer.param_groups],
        "state": {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()},
        "sizes": list(model.config.state_sizes),
        "record": copy.deepcopy(model.config.compression),
        "history": copy.deepcopy(getattr(model, "compression_history", None)),
        "features": [
            (
                _cut_projection(m).out_features,
                getattr(_cut_projection(m), "base_layer", _cut_projection(m)).out_features,
            )
            for m in find_mixers(model)
        ],
    }


def _assert_unchanged(before, model, wrapped, optimizer):
    for n, p in wrapped.named_parameters():
        assert p is before["params"][n][0] and torch.equal(p, before["params"][n][1]), n
    assert [list(g["params"]) for g in optimizer.param_groups] == before["groups"]
    assert {id(p) for p in optimizer.state} == set(before["state"])
    for p, s in optimizer.state.items():
        for k, v in s.items():
            assert torch.equal(v, before["state"][id(p)][k])
    assert model.config.state_sizes == before["sizes"] and model.state_sizes() == before["sizes"]
    assert model.config.compression == before["record"]
    assert getattr(model, "compression_history", None) == before["history"]
    assert _everything(model, wrapped, optimizer)["features"] == before["features"]
    ids = random_ids()
    assert torch.isfinite(wrapped(input_ids=ids, labels=ids).loss)


def _fail_on_call(n, message="injected failure"):
    calls = {"n": 0}

    def wrap(original):
        def fn(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise RuntimeError(message)
            return original(*args, **kwargs)

        return fn

    return wrap


STAGES = [
    "calibration",
    "plan_ranks",
    "plan_second_layer_cut",
    "optimizer_states",
    "optimizer_swap",
    "module_setattr",
    "config",
    "history",
]


# ---------------------------------------------------------------- row 1: atomic cuts, PEFT included
@pytest.mark.parametrize("family", ["mamba", "mamba2"])
@pytest.mark.parametrize("kind", ["plain", "lora"])
@pytest.mark.parametrize("stage", STAGES)
def test_failure_at_any_stage_of_a_cut_changes_nothing(monkeypatch, kind, stage, family):
    model, wrapped, optimizer = _trained(kind, family)
    before = _everything(model, wrapped, optimizer)
    if stage == "calibration":
        monkeypatch.setattr(reduction, "collect_statistics", _fail_on_call(1)(reduction.collect_statistics))
    elif stage == "plan_ranks":
        monkeypatch.setattr(reduction, "plan_reduction", _fail_on_call(1)(reduction.plan_reduction))
    elif stage == "plan_second_layer_cut":
        monkeypatch.setattr(surgery, "plan_mixer_cut", _fail_on_call(2)(surgery.plan_mixer_cut))
    elif stage == "optimizer_states":
        monkeypatch.setattr(surgery, "plan_optimizer_states", _fail_on_call(1)(surgery.plan_optimizer_states))
    elif stage == "optimizer_swap":
        monkeypatch.setattr(
            surgery, "swap_parameter_in_optimizer", _fail_on_call(3)(surgery.swap_parameter_in_optimizer)
        )
    elif stage == "module_setattr":  # the third parameter swapped into its module fails
        monkeypatch.setattr(surgery, "setattr", _fail_on_call(3)(setattr), raising=False)
    elif stage == "config":
        config_cls = type(model.config)
        monkeypatch.setattr(config_cls, "check_state_sizes", _fail_on_call(1)(config_cls.check_state_sizes))
    elif stage == "history":
        monkeypatch.setattr(reduction, "record_report", _fail_on_call(1)(record.record_report))
    with pytest.raises((SurgeryError, RuntimeError), match="injected failure"):
        compress_model(wrapped, _batches(), mode="fixed", fixed_fraction=0.5, optimizer=optimizer)
    monkeypatch.undo()
    _assert_unchanged(before, model, wrapped, optimizer)
    # and the same cut then succeeds
    compress_model(wrapped, _batches(), mode="fixed", fixed_fraction=0.5, optimizer=optimizer)
    assert model.state_sizes() == [-(-s // 2) for s in before["sizes"]]


def test_lora_on_x_proj_follows_the_cut_consistently():
    """The cut keeps the same rows of the base x_proj and of its LoRA B: equal to merging first, then cutting."""
    model = tiny_lm(state_sizes=[8, 8])
    wrapped = _lora(model, lora_dropout=0.0)
    reference = copy.deepcopy(wrapped).merge_and_unload()
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    ids = random_ids(batch=2, length=10)
    wrapped(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in wrapped.named_parameters() if p.grad is not None}
    optimizer.step()
    reference.load_state_dict(copy.deepcopy(wrapped).merge_and_unload().state_dict())

    report = compress_model(wrapped, _batches(), mode="fixed", fixed_fraction=0.5, optimizer=optimizer)
    kept = {d.layer: torch.tensor(d.kept) for d in report.layers}
    shrink_mixers(reference, kept)
    assert model.state_sizes() == reference.state_sizes() == [4, 4]
    for mixer in find_mixers(model):
        x = mixer.x_proj
        rows = mixer.time_step_rank + 2 * 4
        assert x.out_features == x.base_layer.out_features == rows
        assert x.base_layer.weight.shape[0] == rows and x.lora_B["default"].weight.shape[0] == rows
        assert x.lora_B["default"].weight in optimizer.state  # its moments were sliced along
        assert optimizer.state[x.lora_B["default"].weight]["exp_avg"].shape[0] == rows
    assert any("x_proj.lora_B" in n for n in grads)
    wrapped.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=ids).logits, reference(input_ids=ids).logits)
    # training goes on after the cut
    optimizer.zero_grad()
    wrapped(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def test_adapter_that_cannot_follow_a_cut_is_refused_before_anything_changes(tmp_path):
    model = tiny_lm(state_sizes=[8, 8])
    wrapped = _lora(model, targets=("x_proj",), use_dora=True)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    before = _everything(model, wrapped, optimizer)
    with pytest.raises(SurgeryError, match=r"merge_and_unload\(\)"):
        compress_model(wrapped, _batches(), mode="fixed", optimizer=optimizer)
    _assert_unchanged(before, model, wrapped, optimizer)
    # the callback refuses it at on_train_begin, before the first step
    args = TrainingArguments(str(tmp_path), max_steps=4, report_to=[], use_cpu=True, save_strategy="no")
    data = [{"input_ids": r, "labels": r} for r in random_ids(batch=8, length=12)]
    trainer = Trainer(model=wrapped, args=args, train_dataset=data, callbacks=[CompreSSMCallback(reduction_steps=[2])])
    with pytest.raises(SurgeryError, match="DoRA"):
        trainer.train()
    _assert_unchanged(before, model, wrapped, optimizer)


def test_lora_model_trains_with_the_callback(tmp_path):
    model = tiny_lm(state_sizes=[8, 8])
    wrapped = _lora(model)
    args = TrainingArguments(
        str(tmp_path), max_steps=6, per_device_train_batch_size=4, report_to=[], use_cpu=True, save_strategy="no"
    )
    data = [{"input_ids": r, "labels": r} for r in random_ids(batch=32, length=12)]
    callback = CompreSSMCallback(mode="fixed", fixed_fraction=0.5, reduction_steps=[2, 4])
    trainer = Trainer(model=wrapped, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    assert model.state_sizes() == [2, 2]
    params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert params == {id(p) for p in wrapped.parameters() if p.requires_grad}


@pytest.mark.parametrize("save_strategy", ["steps", "epoch"])
def test_lora_with_cuts_and_trainer_checkpoints_is_refused_before_anything_changes(tmp_path, save_strategy):
    """a Trainer checkpoint of a PEFT model holds only the adapter, not the cut base: refused at the
    start (model, optimizer and output folder unchanged), with the reason and the fix."""
    model = tiny_lm(state_sizes=[8, 8])
    wrapped = _lora(model)
    out = tmp_path / "out"
    out.mkdir()
    args = TrainingArguments(
        str(out), max_steps=6, per_device_train_batch_size=4, report_to=[], use_cpu=True, save_strategy=save_strategy
    )
    data = [{"input_ids": r, "labels": r} for r in random_ids(batch=32, length=12)]
    callback = CompreSSMCallback(mode="fixed", fixed_fraction=0.5, reduction_steps=[2, 4])
    trainer = Trainer(model=wrapped, args=args, train_dataset=data, callbacks=[callback])
    trainer.create_optimizer()
    before = _everything(model, wrapped, trainer.optimizer)
    with pytest.raises(ValueError, match=r"holds only the adapter weights.*save_strategy='no'"):
        trainer.train()
    _assert_unchanged(before, model, wrapped, trainer.optimizer)
    assert os.listdir(out) == []
    # without Trainer checkpoints the same run trains and cuts
    args = TrainingArguments(
        str(out), max_steps=6, per_device_train_batch_size=4, report_to=[], use_cpu=True, save_strategy="no"
    )
    Trainer(model=wrapped, args=args, train_dataset=data, callbacks=[callback]).train()
    assert model.state_sizes() == [2, 2]


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_failed_cut_in_training_is_undone_and_training_goes_on(tmp_path, monkeypatch, hf_warnings, family):
    model = (tiny_lm if family == "mamba" else tiny_mamba2_lm)(state_sizes=[8, 8])
    config_cls = type(model.config)
    monkeypatch.setattr(config_cls, "check_state_sizes", _fail_on_call(1)(config_cls.check_state_sizes))
    args = TrainingArguments(
        str(tmp_path), max_steps=6, per_device_train_batch_size=4, report_to=[], use_cpu=True, save_strategy="no"
    )
    data = [{"input_ids": r, "labels": r} for r in random_ids(batch=32, length=12)]
    callback = CompreSSMCallback(mode="fixed", fixed_fraction=0.5, reduction_steps=[2, 4])
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    assert "the cut at step 2 failed and was undone" in hf_warnings.text
    assert [h["step"] for h in model.compression_history] == [4]  # the failed attempt left no record
    assert model.state_sizes() == [4, 4] and model.config.state_sizes == [4, 4]


# ---------------------------------------------------------------- row 8: degenerate scores
def test_all_zero_scores_leave_the_layer_unchanged(hf_warnings):
    model = tiny_lm(state_sizes=[8, 8])
    mixer = find_mixers(model)[0]
    with torch.no_grad():  # every B row of layer 0 is zero: no state is ever charged, every score is 0
        mixer.x_proj.weight[mixer.time_step_rank : mixer.time_step_rank + 8].zero_()
    report = compress_model(model, _batches(), tau=0.3)
    zero, other = report.layers
    assert all(s == 0.0 for s in zero.scores)
    assert zero.new_size == 8 and model.state_sizes()[0] == 8 and zero.energy_kept == 1.0
    assert "every state of layer 0 scored 0" in hf_warnings.text
    assert other.new_size < 8
    scores = torch.tensor(other.scores, dtype=torch.float64)
    true_fraction = float(scores[torch.tensor(other.kept)].sum() / scores.sum())
    assert other.energy_kept == pytest.approx(true_fraction, rel=1e-12) and true_fraction < 1.0
    # fixed mode and explicit targets leave it whole too
    report = compress_model(model, _batches(), mode="fixed", fixed_fraction=0.5)
    assert report.layers[0].new_size == 8
    report = compress_model(model, _batches(), target_sizes=[2, 2])
    assert report.sizes_after[0] == 8


def test_attempt_that_changes_nothing_is_logged_as_unchanged(tmp_path, hf_warnings):
    model = tiny_lm(state_sizes=[8, 8])
    args = TrainingArguments(
        str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[], use_cpu=True, save_strategy="no"
    )
    data = [{"input_ids": r, "labels": r} for r in random_ids(batch=16, length=12)]
    Trainer(
        model=model, args=args, train_dataset=data, callbacks=[CompreSSMCallback(tau=0.0, reduction_steps=[2])]
    ).train()
    assert "step 2: left unchanged state sizes [8, 8] -> [8, 8]" in hf_warnings.text
    assert model.compression_history[0]["unchanged"] is True
    assert model.config.compression["history"][0]["unchanged"] is True
    saved = json.loads((tmp_path / "compression_history.json").read_text())
    assert saved[0]["unchanged"] is True


# ---------------------------------------------------------------- row 9: argument types
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tau": "0.3"}, r"tau must be a finite number; got '0.3' of type str \(a string"),
        ({"min_state_size": 2.5}, "min_state_size must be an integer; got 2.5"),
        ({"min_state_size": 2.0}, "min_state_size must be an integer; got 2.0"),
        ({"reduction_steps": "15"}, r"reduction_steps must be a list of integers .*got '15'"),
        ({"reduction_steps": [15.0]}, "reduction_steps must be a list of integers"),
        ({"num_reductions": "4"}, "num_reductions must be an integer"),
        ({"calibration_batches": True}, "calibration_batches must be an integer"),
        ({"gate": None}, "gate must be a float"),
        ({"rollback_greater_is_better": "yes"}, "rollback_greater_is_better must be True or False"),
        ({"mode": 1}, "mode must be a string"),
        ({"tau": float("nan")}, "tau must be a finite number"),
    ],
)
def test_argument_types_are_checked_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompressionArguments(**kwargs)


def test_argument_numbers_are_normalised():
    import numpy as np

    args = CompressionArguments(tau=0, min_state_size=np.int64(2), reduction_steps=(3, np.int32(9)))
    assert args.tau == 0.0 and type(args.tau) is float
    assert args.min_state_size == 2 and type(args.min_state_size) is int
    assert args.reduction_steps == [3, 9] and all(type(s) is int for s in args.reduction_steps)
    json.dumps(args.to_dict())


def test_collapsing_schedule_warns(hf_warnings):
    assert CompressionArguments(num_reductions=4, schedule_end=0.1).schedule(20) == [1, 2]
    assert "num_reductions=4 attempts" in hf_warnings.text and "collapse to 2 distinct steps [1, 2]" in hf_warnings.text
    hf_warnings.clear()
    assert CompressionArguments(reduction_steps=[5, 5, 9]).schedule(20) == [5, 9]
    assert "repeat a step" in hf_warnings.text
    hf_warnings.clear()
    CompressionArguments().schedule(1000)
    assert "collapse" not in hf_warnings.text


# ---------------------------------------------------------------- atomic files
def test_json_text_and_safetensors_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "compression_history.json"
    report = tmp_path / "report.md"
    atomic_io.write_json_atomic(path, [{"step": 1}])
    atomic_io.write_text_atomic(report, "first")

    def broken_fsync(fd):  # the new content is in the temporary file, the disk fails before the rename
        raise OSError("disk full")

    monkeypatch.setattr(atomic_io.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_io.write_json_atomic(path, [{"step": 2}])
    with pytest.raises(OSError, match="disk full"):
        atomic_io.write_text_atomic(report, "second")
    monkeypatch.undo()
    assert json.loads(path.read_text()) == [{"step": 1}] and report.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compression_history.json", "report.md"]

    import safetensors.torch
    from safetensors.torch import load_file

    target = tmp_path / "state.safetensors"
    atomic_io.write_safetensors_atomic(target, {"a": torch.ones(3)})

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x10\x00")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_io.write_safetensors_atomic(target, {"a": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(load_file(target)["a"], torch.ones(3))
    names = ["compression_history.json", "report.md", "state.safetensors"]
    assert sorted(os.listdir(tmp_path)) == names  # no temporary file left


# ---------------------------------------------------------------- rows 2 and 5: the train script resumes
TRAIN = os.path.join(REPO, "scripts", "train.py")
COMMON = ["--preset", "tiny", "--save_strategy", "steps", "--save_steps", "2", "--seed", "0"]

KILLER = """
import os, runpy, signal, sys
sys.path[:0] = [{repo!r}, os.path.dirname({train!r})]  # as `python scripts/train.py` sees it
stage = sys.argv.pop(1)
if stage == "trainer_state":  # the Trainer's state file of checkpoint-4 is half written
    from transformers.trainer_callback import TrainerState
    original = TrainerState.save_to_json
    def save_to_json(self, path):
        if "checkpoint-4" in path:
            with open(path, "w") as f:
                f.write('{{"global_step": 4, "log_hist')
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, path)
    TrainerState.save_to_json = save_to_json
elif stage == "after_rotation":  # checkpoint-4 saved, the older ones deleted (save_total_limit), before on_save
    import transformers.trainer as trainer_module
    rotate = trainer_module.rotate_checkpoints
    def rotate_checkpoints(*args, **kwargs):
        rotate(*args, **kwargs)
        if os.path.isdir(os.path.join(kwargs["output_dir"], "checkpoint-4")):
            os.kill(os.getpid(), signal.SIGKILL)
    trainer_module.rotate_checkpoints = rotate_checkpoints
else:  # killed while the CompreSSM state of checkpoint-4 is written (before the Trainer's trainer_state.json)
    from hf_compressssm.trainer import callback
    original = callback.save_state_file
    def save_state_file(folder, *args, **kwargs):
        if folder.endswith("checkpoint-4"):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(folder, *args, **kwargs)
    callback.save_state_file = save_state_file
sys.argv = [{train!r}] + sys.argv[1:]
runpy.run_path({train!r}, run_name="__main__")
"""


def _train_script(*argv, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, TRAIN, *argv], env=env, capture_output=True, text=True, timeout=600, cwd=REPO
    )
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0, msg=key)


FAMILIES = {"mamba": [], "mamba2": ["--model_type", "compressssm_mamba2"]}


@pytest.fixture(scope="module")
def uninterrupted_script_runs(tmp_path_factory):
    runs = {}

    def get(family):
        if family not in runs:
            out = tmp_path_factory.mktemp("script") / f"full-{family}"
            _train_script(*COMMON, *FAMILIES[family], "--output_dir", str(out))
            runs[family] = out
        return runs[family]

    return get


@pytest.fixture(scope="module")
def uninterrupted_script_run(uninterrupted_script_runs):
    return uninterrupted_script_runs("mamba")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["trainer_state", "compressssm_state"])
def test_killed_during_a_save_then_resumed_equals_uninterrupted(uninterrupted_script_run, tmp_path, stage):
    out = tmp_path / "run"
    killed = _killed_run(tmp_path, stage, *COMMON, "--output_dir", str(out))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    assert not (out / "model.safetensors").exists()  # the run never finished

    resumed = _train_script(*COMMON, "--output_dir", str(out))
    assert f"skipping the incomplete checkpoint {out / 'checkpoint-4'}" in resumed.stderr
    assert f"resuming from {out / 'checkpoint-2'}" in resumed.stderr
    _assert_same_weights(out, uninterrupted_script_run)
    history = json.loads((out / "compression_history.json").read_text())
    assert [h["step"] for h in history] == [2, 4]  # no cut redone, none lost


def _killed_run(tmp_path, stage, *argv):
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(repo=REPO, train=TRAIN))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, str(script), stage, *argv], env=env, capture_output=True, text=True, timeout=600, cwd=REPO
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_killed_after_the_trainer_deleted_the_older_checkpoint_resumes_from_the_newest(
    uninterrupted_script_runs, tmp_path, family
):
    """with --save_total_limit 1 the Trainer deletes checkpoint-2 as soon as checkpoint-4 is saved, before
    any on_save callback runs; a kill right there must leave checkpoint-4 complete, callback state included, and the
    re-run must resume from it (not from step 0) and end as the uninterrupted run."""
    out = tmp_path / "run"
    argv = [*COMMON, *FAMILIES[family], "--save_total_limit", "1", "--output_dir", str(out)]
    killed = _killed_run(tmp_path, "after_rotation", *argv)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]  # checkpoint-2 is gone
    assert (out / "checkpoint-4" / STATE_FILE).is_file()
    assert not (out / "model.safetensors").exists()  # the run never finished

    resumed = _train_script(*argv)
    assert "skipping the incomplete checkpoint" not in resumed.stderr
    assert f"resuming from {out / 'checkpoint-4'}" in resumed.stderr, resumed.stderr[-3000:]
    full = uninterrupted_script_runs(family)
    _assert_same_weights(out, full)
    assert (
        json.loads((out / "config.json").read_text())["state_sizes"]
        == json.loads((full / "config.json").read_text())["state_sizes"]
    )
    history = json.loads((out / "compression_history.json").read_text())
    assert [h["step"] for h in history] == [2, 4]  # no cut redone, none lost


SLOW_STEPS = """
import os, runpy, sys, time
sys.path[:0] = [{repo!r}, os.path.dirname({train!r})]  # as `python scripts/train.py` sees it
import transformers
training_step = transformers.Trainer.training_step
def slow_training_step(self, *args, **kwargs):  # >= 0.1 s a step: SIGTERM's 3 s grace ends well before step 60
    time.sleep(0.1)
    return training_step(self, *args, **kwargs)
transformers.Trainer.training_step = slow_training_step
sys.argv = [{train!r}] + sys.argv[1:]
runpy.run_path({train!r}, run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_sigterm_with_jit_checkpoint_stops_with_an_error_and_resumes(tmp_path, family):
    """SIGTERM through the Trainer's preemption path (--enable_jit_checkpoint): a non-zero exit with one
    "interrupted at step k of n" line, no final model, card or run file, and a checkpoint that the same command
    resumes from, ending as the uninterrupted run."""
    argv = [
        "--preset", "tiny", *FAMILIES[family], "--max_steps", "60", "--reduction_steps", "2", "50",
        "--save_strategy", "no", "--enable_jit_checkpoint", "--disable_tqdm", "true", "--seed", "0",
    ]  # fmt: skip
    out = tmp_path / "run"
    script = tmp_path / "slow.py"
    script.write_text(SLOW_STEPS.format(repo=REPO, train=TRAIN))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, str(script), *argv, "--output_dir", str(out)],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen = []
    try:
        for line in proc.stderr:  # the first cut is logged at step 2: training runs
            seen.append(line)
            if "CompreSSM step 2:" in line:
                proc.send_signal(signal.SIGTERM)
                break
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    stderr = "".join(seen) + stderr
    assert proc.returncode == 143, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("train.py: interrupted at step ")]
    assert len(lines) == 1, stderr[-3000:]
    match = re.match(
        r"train.py: interrupted at step (\d+) of 60 \(SIGTERM\); (\S+) is saved: re-run the same command", lines[0]
    )
    assert match, lines[0]
    step, checkpoint = int(match.group(1)), match.group(2)
    assert 2 <= step < 60 and os.path.dirname(checkpoint) == str(out)
    assert [p.name for p in out.glob("checkpoint-*")] == [os.path.basename(checkpoint)]
    assert checkpoint_problem(checkpoint) is None
    for final in ("model.safetensors", "README.md", "compressssm_run.json", "config.json"):
        assert not (out / final).exists(), final  # nothing written as if training had finished
    assert "Saved model" not in stdout

    resumed = _train_script(*argv, "--output_dir", str(out))
    assert f"resuming from {checkpoint}" in resumed.stderr, resumed.stderr[-3000:]
    full = tmp_path / "full"
    _train_script(*argv, "--output_dir", str(full))
    _assert_same_weights(out, full)
    sizes = [json.loads((d / "config.json").read_text())["state_sizes"] for d in (out, full)]
    assert sizes[0] == sizes[1]
    histories = [json.loads((d / "compression_history.json").read_text()) for d in (out, full)]
    assert [h["step"] for h in histories[0]] == [h["step"] for h in histories[1]]


@pytest.mark.slow
def test_resume_from_checkpoint_is_honoured_and_overwrite_starts_fresh(uninterrupted_script_run, tmp_path):
    full = uninterrupted_script_run
    out = tmp_path / "from-4"
    result = _train_script(*COMMON, "--output_dir", str(out), "--resume_from_checkpoint", str(full / "checkpoint-4"))
    assert f"resuming from {full / 'checkpoint-4'}" in result.stderr
    config = json.loads((full / "checkpoint-4" / "config.json").read_text())
    assert config["state_sizes"] != [16, 16]  # the model is built from the checkpoint: reduced shapes
    _assert_same_weights(out, full)
    assert "layer 0:   16 ->" in result.stdout  # sizes before = the run's initial sizes

    # an incomplete checkpoint given explicitly is an error that names it (exit 2, nothing written)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "trainer_state.json").write_text("{")
    result = _train_script(
        *COMMON, "--output_dir", str(tmp_path / "x"), "--resume_from_checkpoint", str(broken), check=False
    )
    assert result.returncode == 2 and f"{broken} is not a complete checkpoint" in result.stderr
    assert not (tmp_path / "x").exists()

    # --overwrite_output_dir: a fresh start in a folder with checkpoints
    result = _train_script(*COMMON, "--output_dir", str(full), "--overwrite_output_dir")
    assert "resuming from" not in result.stderr
    assert json.loads((full / "trainer_state.json").read_text())["global_step"] == 6
