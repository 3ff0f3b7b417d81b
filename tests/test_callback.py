"""CompreSSMCallback with the HF Trainer: cuts, optimizer, logging, resume, pragmatic rollback, DDP, bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import Blocks, optimizer_params, random_ids, tiny_lm, training_args
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

from hf_compressssm import (
    CompressionArguments,
    CompreSSMCallback,
    CompreSSMMambaForCausalLM,
    compress_model,
)
from hf_compressssm.families import find_mixers


# ---------------------------------------------------------------- single process
@pytest.mark.compat
def test_two_cuts_shrink_and_keep_optimizer_consistent(tmp_path):
    model = tiny_lm(state_sizes=[8, 8])
    callback = CompreSSMCallback(tau=0.3, reduction_steps=[3, 6])
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=Blocks(), callbacks=[callback])
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    sizes = model.state_sizes()
    assert all(s < 8 for s in sizes) and model.config.state_sizes == sizes
    history = model.compression_history
    assert [h["step"] for h in history] == [3, 6]
    assert history[0]["sizes_before"] == [8, 8] and history[-1]["sizes_after"] == sizes
    # The optimizer holds exactly the model's parameters.
    assert {id(p) for p in optimizer_params(trainer)} == {id(p) for p in model.parameters()}
    assert len(optimizer_params(trainer)) == len(list(model.parameters()))
    assert len(history[0]["layers"][0]["kept"]) == history[0]["sizes_after"][0]
    # Log history, compression_history.json and config record.
    logged = [h for h in trainer.state.log_history if "compression/mean_state_size" in h]
    assert [h["step"] for h in logged] == [3, 6]
    saved = json.loads((tmp_path / "compression_history.json").read_text())
    assert [h["step"] for h in saved] == [3, 6]
    record = model.config.compression
    assert record["initial_state_sizes"] == [8, 8] and [h["step"] for h in record["history"]] == [3, 6]
    # save_pretrained → Auto from_pretrained gives identical logits and carries the history.
    model.save_pretrained(tmp_path / "final")
    assert (tmp_path / "final" / "compression_history.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    model.eval()
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.state_sizes() == sizes and loaded.compression_history == saved


def test_sliced_moments_equal_old_moments_at_kept_indices(tmp_path):
    model = tiny_lm(state_sizes=[8, 8])
    before, after = {}, {}

    class Before(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step == 3:
                for i, m in enumerate(find_mixers(model)):
                    before[i] = {k: v.clone() for k, v in optimizer.state[m.A_log].items()}

    class After(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step == 3:
                for i, m in enumerate(find_mixers(model)):
                    after[i] = {k: v.clone() for k, v in optimizer.state[m.A_log].items()}

    callback = CompreSSMCallback(tau=0.3, reduction_steps=[3])
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=4),
        train_dataset=Blocks(),
        callbacks=[Before(), callback, After()],
    )
    trainer.train()
    for i, entry in enumerate(model.compression_history[0]["layers"]):
        kept = torch.tensor(entry["kept"])
        assert entry["new_size"] < 8
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(after[i][key], before[i][key][:, kept])
        assert torch.equal(after[i]["step"], before[i]["step"])


def test_gradient_accumulation(tmp_path):
    model = tiny_lm(state_sizes=[8, 8])
    callback = CompreSSMCallback(tau=0.3, reduction_steps=[2, 4], calibration_batches=3)
    args = training_args(tmp_path, max_steps=6, gradient_accumulation_steps=3, per_device_train_batch_size=2)
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[callback])
    trainer.train()
    assert [h["step"] for h in model.compression_history] == [2, 4]
    assert all(s < 8 for s in model.state_sizes())
    assert {id(p) for p in optimizer_params(trainer)} == {id(p) for p in model.parameters()}


def _spy_statistics(monkeypatch) -> list:
    """Capture the (per-process) statistics each in-training cut is decided from."""
    import hf_compressssm.compression.compressor as compressor_module

    seen = []
    original = compressor_module.reduce_once

    def spy(*args, **kwargs):
        seen.append([{k: v.clone() for k, v in layer.items()} for layer in kwargs["statistics"]])
        return original(*args, **kwargs)

    monkeypatch.setattr(compressor_module, "reduce_once", spy)
    return seen


def test_calibration_uses_training_batches_only(tmp_path, monkeypatch):
    """Evaluation forwards must never feed calibration (a metric on the wrong split is a severe bug)."""
    seen = _spy_statistics(monkeypatch)
    model = tiny_lm(state_sizes=[8, 8])
    train, evald = Blocks(seed=1), Blocks(n=8, seed=99)
    callback = CompreSSMCallback(tau=0.3, reduction_steps=[4], calibration_batches=8)
    args = training_args(tmp_path, max_steps=5, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4)
    Trainer(model=model, args=args, train_dataset=train, eval_dataset=evald, callbacks=[callback]).train()
    assert len(seen) == 1
    # steps 1-4 of 4 sequences x 16 tokens each; the evaluations at steps 2 and 4 (8 x 16 tokens each) are not counted
    assert all(float(layer["count"]) == 4 * 4 * 16 for layer in seen[0])


@pytest.mark.parametrize("accumulation", [1, 3])
def test_statistics_from_training_forwards_equal_calibration_on_the_same_batches(tmp_path, monkeypatch, accumulation):
    """A cut decided from the training forwards' statistics (no extra forward) equals today's calibration on the same
    batches: with a zero learning rate the weights do not move, so the statistics agree to rounding and the kept
    indices are identical."""
    from hf_compressssm.compression.calibration import collect_statistics
    from hf_compressssm.compression.reduction import plan_reduction
    from hf_compressssm.families import family_of

    seen = _spy_statistics(monkeypatch)
    batches = []

    class RecordBatches(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.register_forward_pre_hook(
                lambda m, a, kw: batches.append(kw["input_ids"].clone()) if m.training else None, with_kwargs=True
            )

    model = tiny_lm(state_sizes=[8, 8])
    reference = tiny_lm(state_sizes=[8, 8])
    reference.load_state_dict(model.state_dict())
    comp = CompreSSMCallback(tau=0.3, reduction_steps=[5], calibration_batches=3)
    args = training_args(tmp_path, max_steps=5, learning_rate=0.0, gradient_accumulation_steps=accumulation)
    Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[comp, RecordBatches()]).train()
    recorded = seen[0]
    expected = collect_statistics(reference, [{"input_ids": ids} for ids in batches[-3:]])
    for got, want in zip(recorded, expected):
        assert float(got["count"]) == float(want["count"]) == 3 * 4 * 16
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-9)
    family = family_of(reference)
    args_c = comp.args
    mine = plan_reduction(recorded, [8, 8], args_c, None, family)
    theirs = plan_reduction(expected, [8, 8], args_c, None, family)
    assert [d.kept for d in mine] == [d.kept for d in theirs]
    assert model.compression_history[0]["sizes_after"] == [d.new_size for d in theirs]


# ---------------------------------------------------------------- resume
def test_resume_from_checkpoint_after_cuts_equals_uninterrupted(tmp_path):
    def run(out, resume=None):
        if resume is None:
            model = tiny_lm(state_sizes=[8, 8])
        else:
            model = CompreSSMMambaForCausalLM.from_pretrained(resume)  # built from the checkpoint's config
        args = training_args(out, max_steps=20, save_strategy="steps", save_steps=12, lr_scheduler_type="linear")
        callback = CompreSSMCallback(tau=0.3, reduction_steps=[5, 10])
        trainer = Trainer(model=model, args=args, train_dataset=Blocks(n=128), callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        return model

    full = run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-12"
    assert (checkpoint / "compression_history.json").exists()
    assert json.loads((checkpoint / "config.json").read_text())["state_sizes"] == full.state_sizes()
    shutil.copytree(checkpoint, tmp_path / "ckpt")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "ckpt"))
    assert resumed.state_sizes() == full.state_sizes()
    assert [h["step"] for h in resumed.compression_history] == [5, 10]  # no cut repeated
    for (n1, p1), (n2, p2) in zip(full.named_parameters(), resumed.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- pragmatic mode
class SizeMetric:
    def __init__(self, model):
        self.model = model

    def __call__(self, prediction):
        return {"mean_state_size": float(sum(self.model.state_sizes()) / len(self.model.state_sizes()))}


@pytest.mark.parametrize("greater_is_better, rolled_back", [(True, True), (False, False)])
def test_pragmatic_rollback(tmp_path, greater_is_better, rolled_back):
    model = tiny_lm(state_sizes=[8, 8])
    snapshots = {}

    class Before(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                snapshots["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}

    class AtEval(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:
                snapshots["at_eval"] = {n: p.detach().clone() for n, p in model.named_parameters()}

    callback = CompreSSMCallback(
        mode="pragmatic",
        fixed_fraction=0.5,
        reduction_steps=[2, 4],
        rollback_metric="eval_mean_state_size",
        rollback_greater_is_better=greater_is_better,
        rollback_tolerance=0.0,
    )
    args = training_args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=100, per_device_eval_batch_size=4)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Blocks(),
        eval_dataset=Blocks(n=4, seed=5),
        compute_metrics=SizeMetric(model),
        callbacks=[Before(), callback, AtEval()],
    )
    trainer.train()
    record = model.config.compression
    if rolled_back:
        assert record["stopped"] is True
        assert model.state_sizes() == [8, 8] and model.config.state_sizes == [8, 8]
        assert model.compression_history[0]["rolled_back"] is True
        assert len(model.compression_history) == 1  # no further cut after the rollback
        for name, value in snapshots["params"].items():
            assert torch.equal(snapshots["at_eval"][name], value), name
    else:
        assert record["stopped"] is False
        assert model.state_sizes() == [2, 2]
    assert {id(p) for p in optimizer_params(trainer)} == {id(p) for p in model.parameters()}


# ---------------------------------------------------------------- selection and post-hoc compression
def _planted_model(dead_state=3):
    model = tiny_lm(state_sizes=[8, 8])
    with torch.no_grad():
        for mixer in find_mixers(model):
            mixer.x_proj.weight[mixer.time_step_rank + dead_state].zero_()  # B row: the state never charges
    return model


def test_largest_and_random_keep_different_indices_with_planted_dead_state():
    batches = [{"input_ids": random_ids(batch=4, length=16, seed=s)} for s in range(2)]
    kept = {}
    for selection in ("largest", "smallest", "random"):
        model = _planted_model()
        report = compress_model(
            model, batches, mode="fixed", fixed_fraction=0.5, selection=selection, compression_seed=1
        )
        kept[selection] = [layer.kept for layer in report.layers]
        assert report.sizes_after == [4, 4] and model.state_sizes() == [4, 4]
        assert report.layers[0].scores[3] == 0.0
    assert all(3 not in k for k in kept["largest"])
    assert all(3 in k for k in kept["smallest"])
    assert kept["random"] != kept["largest"]


def test_compress_model_tolerance_report_and_bad_models():
    model = tiny_lm(state_sizes=[8, 8])
    batches = [{"input_ids": random_ids(batch=4, length=16)}]
    report = compress_model(model, batches, tau=0.5)
    assert report.sizes_before == [8, 8] and report.sizes_after == model.state_sizes()
    assert all(layer.energy_kept >= 0.5 - 1e-9 for layer in report.layers)
    from transformers import MambaConfig, MambaForCausalLM

    stock = MambaForCausalLM(MambaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, state_size=8))
    with pytest.raises(ValueError, match="from_mamba"):
        compress_model(stock, batches, tau=0.5)
    with pytest.raises(ValueError, match="no SSM mixers"):
        compress_model(torch.nn.Linear(2, 2), batches)
    with pytest.raises(ValueError, match="no batch"):
        compress_model(tiny_lm(), [], tau=0.5)


def test_non_finite_weights_skip_the_cut():
    model = tiny_lm(state_sizes=[8, 8])
    with torch.no_grad():
        find_mixers(model)[1].x_proj.weight[0, 0] = float("nan")
    params = {n: p for n, p in model.named_parameters()}
    report = compress_model(model, [{"input_ids": random_ids()}], tau=0.5)
    assert report.skipped and "NaN" in report.skipped
    assert model.state_sizes() == [8, 8]
    assert all(p is params[n] for n, p in model.named_parameters())


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tau": 1.0}, r"tau=1.0 is outside \[0, 1\)"),
        ({"tau": -0.1}, "outside"),
        ({"mode": "magic"}, "unknown mode"),
        ({"selection": "best"}, "unknown selection"),
        ({"score": "l2"}, "unknown score"),
        ({"min_state_size": 0}, "min_state_size"),
        ({"reduction_steps": []}, "reduction_steps"),
        ({"schedule_start": 0.2, "schedule_end": 0.1}, "schedule window"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompreSSMCallback(**kwargs)


def _train_expect_error(tmp_path, model, callback, message, **arg_overrides):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(
        model=model, args=training_args(tmp_path, **arg_overrides), train_dataset=Blocks(), callbacks=[callback]
    )
    with pytest.raises(ValueError, match=message):
        trainer.train()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_load_best_model_at_end_picks_the_best_checkpoint_at_the_final_sizes(tmp_path, family, caplog):
    """the best evaluation is before the cuts (a metric that prefers large states), whose checkpoint no
    longer fits the cut model; training must end with the best checkpoint saved since the last cut, never fail."""
    from mamba2_helpers import tiny_mamba2_lm
    from transformers.utils import logging as hf_logging

    model = tiny_lm(state_sizes=[8, 8]) if family == "mamba" else tiny_mamba2_lm()
    args = training_args(
        tmp_path,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        save_total_limit=2,
        per_device_eval_batch_size=4,
        load_best_model_at_end=True,
        metric_for_best_model="mean_state_size",
        greater_is_better=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Blocks(),
        eval_dataset=Blocks(n=4, seed=5),
        compute_metrics=SizeMetric(model),
        callbacks=[CompreSSMCallback(mode="fixed", fixed_fraction=0.5, reduction_steps=[3, 7])],
    )
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            trainer.train()
    finally:
        hf_logging.disable_propagation()
    assert "the cut at step 3 changed the state sizes, so the best checkpoint so far" in caplog.text
    assert trainer.model is model and model.state_sizes() == [2, 2]
    # every evaluation after the cut at 7 scores the same: the first one, at step 8, is the best
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-8")
    assert trainer.state.best_metric == 2.0
    best = json.loads((tmp_path / "checkpoint-8" / "config.json").read_text())
    assert best["state_sizes"] == [2, 2]


def test_schedule_beyond_max_steps(tmp_path):
    _train_expect_error(tmp_path, tiny_lm(), CompreSSMCallback(reduction_steps=[5, 50]), "beyond max_steps=12")


def test_min_state_size_too_large(tmp_path):
    _train_expect_error(tmp_path, tiny_lm(), CompreSSMCallback(min_state_size=9), "min_state_size=9 exceeds")


def test_pragmatic_needs_evaluation(tmp_path):
    _train_expect_error(tmp_path, tiny_lm(), CompreSSMCallback(mode="pragmatic"), "eval_strategy")


def test_model_without_mixers(tmp_path):
    class NoMamba(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(40, 8)
            self.head = torch.nn.Linear(8, 40)

        def forward(self, input_ids=None, labels=None, **kwargs):
            logits = self.head(self.emb(input_ids))
            return {"loss": torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())}

    _train_expect_error(tmp_path, NoMamba(), CompreSSMCallback(), "no SSM mixers")


def test_default_schedule_is_four_attempts_in_first_ten_percent():
    assert CompressionArguments().schedule(1000) == [25, 50, 75, 100]
    assert CompressionArguments(num_reductions=2, schedule_start=0.1, schedule_end=0.3).schedule(100) == [20, 30]
    assert CompressionArguments(reduction_steps=[9, 3]).schedule(10) == [3, 9]


def test_hf_argument_parser_accepts_compression_arguments():
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(CompressionArguments).parse_args_into_dataclasses(
        ["--tau", "0.1", "--mode", "fixed", "--reduction_steps", "3", "6", "--selection", "random"]
    )
    assert args.tau == 0.1 and args.mode == "fixed" and args.reduction_steps == [3, 6] and args.selection == "random"


# ---------------------------------------------------------------- multi-process
def _torchrun(out, accumulation, negative_control=False, save_steps=0):
    worker = os.path.join(os.path.dirname(__file__), "workers", "ddp_train.py")
    env = dict(os.environ, COMPRESSSSM_NEGATIVE_CONTROL="1" if negative_control else "0", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", worker, str(out), str(accumulation)]
    cmd += [str(save_steps)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_ddp_two_processes_stay_bit_identical_after_cuts(tmp_path):
    rank0, rank1 = _torchrun(tmp_path / "ddp", accumulation=2)
    assert rank0["world_size"] == 2
    assert len(rank0["kept"]) == 2 and rank0["kept"] == rank1["kept"]
    assert rank0["sizes"] == rank1["sizes"] and all(s < 8 for s in rank0["sizes"])
    assert rank0["checksums"] == rank1["checksums"]


@pytest.mark.slow
def test_ddp_checkpoints_hold_every_rank_state_before_trainer_state(tmp_path):
    """Under DDP: each rank's callback state is in the checkpoint before the Trainer's trainer_state.json
    (after which save_total_limit deletes the older checkpoint), so the newest checkpoint is always complete."""
    from hf_compressssm.trainer.checkpoint import checkpoint_problem, state_file_name

    rank0, rank1 = _torchrun(tmp_path / "ddp", accumulation=1, save_steps=2)
    assert rank0["checksums"] == rank1["checksums"]
    checkpoints = sorted((tmp_path / "ddp").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-10"]  # save_total_limit=1
    folder = checkpoints[0]
    assert checkpoint_problem(str(folder)) is None
    written_last = os.stat(folder / "trainer_state.json").st_mtime_ns
    for rank in (0, 1):
        assert os.stat(folder / state_file_name(rank)).st_mtime_ns <= written_last


@pytest.mark.slow
def test_ddp_negative_control_detects_drift(tmp_path):
    """Without our design (DDP manages the shrinkable tensors), the replicas drift: the check above can fail."""
    rank0, rank1 = _torchrun(tmp_path / "naive", accumulation=1, negative_control=True)
    differing = [k for k in rank0["checksums"] if rank0["checksums"][k] != rank1["checksums"][k]]
    assert differing and all(("A_log" in k or "x_proj" in k) for k in differing)
