"""CompreSSMCallback on Mamba-2 through the family adapter: cuts with the optimizer following (in_proj and conv1d
change shape), resume, pragmatic rollback, DDP, compress_model, hub folder, PEFT targets."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import Blocks, optimizer_params, random_ids, training_args
from mamba2_helpers import stock_mamba2_lm, tiny_mamba2_lm
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

from hf_compressssm import CompreSSMCallback, CompreSSMMamba2ForCausalLM, compress_model
from hf_compressssm.compression.distributed import shrinkable_parameter_names
from hf_compressssm.families import find_mixers
from hf_compressssm.families.mamba2 import kept_rows


@pytest.mark.compat
def test_two_cuts_shrink_in_proj_and_conv_and_the_optimizer_follows(tmp_path):
    model = tiny_mamba2_lm()
    moments = {}

    class Spy(TrainerCallback):
        def __init__(self, key):
            self.key = key

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step == 3:
                moments[self.key] = [
                    {k: v.clone() for k, v in optimizer.state[p].items()}
                    for m in find_mixers(model)
                    for p in (m.in_proj.weight, m.conv1d.weight, m.conv1d.bias)
                ]

    callback = CompreSSMCallback(tau=0.3, reduction_steps=[3, 6])
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=Blocks(),
        callbacks=[Spy("before"), callback, Spy("after")],
    )
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    sizes = model.state_sizes()
    assert all(s < 8 for s in sizes) and model.config.state_sizes == sizes
    for mixer, n in zip(find_mixers(model), sizes):
        assert mixer.conv1d.weight.shape[0] == mixer.intermediate_size + 2 * mixer.n_groups * n
        assert mixer.in_proj.weight.shape[0] == 2 * mixer.intermediate_size + 2 * mixer.n_groups * n + 4
    history = model.compression_history
    assert [h["step"] for h in history] == [3, 6]
    first = history[0]["layers"]
    assert all(len(layer["kept"]) == 2 and len(set(map(len, layer["kept"]))) == 1 for layer in first)
    # The optimizer holds exactly the model's parameters, and the moments were sliced at the kept rows.
    assert {id(p) for p in optimizer_params(trainer)} == {id(p) for p in model.parameters()}
    assert len(optimizer_params(trainer)) == len(list(model.parameters()))
    ref = CompreSSMMamba2ForCausalLM(model.config.with_state_sizes([8, 8]))
    for i, layer in enumerate(first):
        in_rows, conv = kept_rows(find_mixers(ref)[i], torch.tensor(layer["kept"]))
        for j, rows in enumerate((in_rows, conv, conv)):
            before, after = moments["before"][3 * i + j], moments["after"][3 * i + j]
            if layer["new_size"] == 8:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(after[key], before[key][rows])
    # Save → Auto load: identical logits, history carried.
    model.save_pretrained(tmp_path / "final")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    model.eval()
    ids = random_ids(length=20)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.state_sizes() == sizes
    assert [h["step"] for h in loaded.compression_history] == [3, 6]
    saved = json.loads((tmp_path / "compression_history.json").read_text())
    assert [h["step"] for h in saved] == [3, 6]


def test_resume_from_checkpoint_after_cuts_equals_uninterrupted(tmp_path):
    def run(out, resume=None):
        model = tiny_mamba2_lm() if resume is None else CompreSSMMamba2ForCausalLM.from_pretrained(resume)
        args = training_args(out, max_steps=16, save_strategy="steps", save_steps=10, lr_scheduler_type="linear")
        callback = CompreSSMCallback(mode="fixed", fixed_fraction=0.25, reduction_steps=[4, 8])
        trainer = Trainer(model=model, args=args, train_dataset=Blocks(n=128), callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        return model

    full = run(tmp_path / "a")
    assert full.state_sizes() == [5, 5]  # 8 → 6 → 5 (ceil of 3/4)
    checkpoint = tmp_path / "a" / "checkpoint-10"
    assert json.loads((checkpoint / "config.json").read_text())["state_sizes"] == [5, 5]
    shutil.copytree(checkpoint, tmp_path / "ckpt")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "ckpt"))
    assert resumed.state_sizes() == full.state_sizes()
    assert [h["step"] for h in resumed.compression_history] == [4, 8]  # no cut repeated
    for (n1, p1), (n2, p2) in zip(full.named_parameters(), resumed.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-5)


class SizeMetric:
    def __init__(self, model):
        self.model = model

    def __call__(self, prediction):
        return {"mean_state_size": float(sum(self.model.state_sizes()) / len(self.model.state_sizes()))}


def test_pragmatic_rollback_restores_shapes_and_optimizer(tmp_path):
    model = tiny_mamba2_lm()
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
        rollback_greater_is_better=True,
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
    assert model.config.compression["stopped"] is True
    assert model.state_sizes() == [8, 8] and model.config.state_sizes == [8, 8]
    for mixer in find_mixers(model):
        assert mixer.conv1d.out_channels == mixer.conv1d.weight.shape[0] == 64
        assert mixer.in_proj.out_features == mixer.in_proj.weight.shape[0]
    assert model.compression_history[0]["rolled_back"] is True and len(model.compression_history) == 1
    for name, value in snapshots["params"].items():
        assert torch.equal(snapshots["at_eval"][name], value), name
    assert {id(p) for p in optimizer_params(trainer)} == {id(p) for p in model.parameters()}


def test_compress_model_tolerance_targets_and_stock_model():
    batches = [{"input_ids": random_ids(batch=4, length=16)}]
    model = tiny_mamba2_lm()
    report = compress_model(model, batches, tau=0.5)
    assert report.sizes_after == model.state_sizes() and all(s < 8 for s in report.sizes_after)
    assert all(layer.energy_kept >= 0.5 - 1e-9 for layer in report.layers)
    report = compress_model(tiny_mamba2_lm(), batches, target_sizes=[3, 8])
    assert report.sizes_after == [3, 8] and len(report.layers[0].kept[1]) == 3
    with pytest.raises(ValueError, match=r"from_mamba2"):
        compress_model(stock_mamba2_lm(), batches, tau=0.5)


def test_shrinkable_parameters_are_in_proj_and_conv():
    names = shrinkable_parameter_names(tiny_mamba2_lm(use_bias=True))
    assert sorted(n.split("mixer.")[1] for n in names if ".0." in n) == [
        "conv1d.bias",
        "conv1d.weight",
        "in_proj.bias",
        "in_proj.weight",
    ]


def test_hub_folder_and_card(tmp_path):
    from hf_compressssm.hub.publish import missing_hub_files, prepare_folder

    model = tiny_mamba2_lm()
    compress_model(model, [{"input_ids": random_ids(batch=4, length=16)}], target_sizes=[4, 6])
    prepare_folder(model, tmp_path)
    assert missing_hub_files(tmp_path) == []
    assert {"configuration_compressssm_mamba2.py", "modeling_compressssm_mamba2.py"} <= set(os.listdir(tmp_path))
    card = (tmp_path / "README.md").read_text()
    assert "A Mamba-2 " in card and "2 Mamba-2 layers" in card and "inner size 32" in card
    assert "| 0 | 8 | 4 | 50% |" in card and "| 1 | 8 | 6 | 75% |" in card
    assert "- mamba2" in card and "selective scan" not in card and "to_mamba2" not in card  # sizes differ
    (tmp_path / "modeling_compressssm_mamba2.py").unlink()
    assert missing_hub_files(tmp_path) == ["modeling_compressssm_mamba2.py"]


def test_peft_targets_come_from_the_family():
    from hf_compressssm.peft_utils import default_lora_targets, ineffective_lora_targets

    model = tiny_mamba2_lm()
    assert default_lora_targets(model, "cpu") == ["in_proj", "out_proj"]
    assert ineffective_lora_targets(model, ["conv1d", "out_proj"], "cpu") == ["conv1d"]


def _torchrun(out, accumulation):
    worker = os.path.join(os.path.dirname(__file__), "workers", "ddp_train_mamba2.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", worker, str(out), str(accumulation)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_ddp_two_processes_stay_bit_identical_after_cuts(tmp_path):
    rank0, rank1 = _torchrun(tmp_path / "ddp", accumulation=2)
    assert rank0["world_size"] == 2
    assert len(rank0["kept"]) == 2 and rank0["kept"] == rank1["kept"]
    assert rank0["sizes"] == rank1["sizes"] == [5, 5]
    assert rank0["checksums"] == rank1["checksums"]
