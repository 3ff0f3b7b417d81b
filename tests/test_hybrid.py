"""Hybrid hosts (Granite 4.0-H, Bamba): per-layer Mamba state sizes on the stock model, exact conversion, save / strict
load / remote code, generation with the hybrid cache, and compression (callback, compress_model) that cuts only the
Mamba layers."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import BLOCK_PACKAGE, Blocks, optimizer_params, random_ids, training_args
from hybrid_helpers import GRANITE, HYBRIDS, ZAMBA2
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

from hf_compressssm import CompreSSMCallback, compress_model
from hf_compressssm.compression.distributed import shrinkable_parameter_names
from hf_compressssm.families import family_of, find_mixers
from hf_compressssm.families.mamba2 import kept_rows
from hf_compressssm.hub.model_card import render_model_card


# The compatibility pass (.ci/run, minimum versions) runs every test on Granite 4.0-H and the remote-code test of all
# hosts; the other hosts run in the full suite.
hosts = pytest.mark.parametrize(
    "host", [pytest.param(h, id=h.name, marks=[pytest.mark.compat] if h is GRANITE else []) for h in HYBRIDS]
)


def _left_padded(batch: int = 2, length: int = 7, seed: int = 0):
    ids = random_ids(batch=batch, length=length, seed=seed)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    return ids, mask


# ---------------------------------------------------------------- configuration
@hosts
def test_config_sizes_per_layer_and_their_rules(host):
    sizes, ssm = list(host.sizes), host.ssm_layers
    config = host.config(mamba_state_sizes=sizes)
    assert config.state_sizes == host.compact and config.state_size == 8 and config.ssm_layers() == ssm
    assert config.with_state_sizes([2] * len(ssm)).mamba_state_sizes == host.full(2)
    assert host.config().mamba_state_sizes == host.full(8)
    assert type(config).from_dict(config.to_dict()).mamba_state_sizes == sizes
    last = len(ssm) - 1
    bad = [
        (host.full([8] * last + [9]), rf"state_sizes\[{last}\]( \(layer {ssm[-1]}\))?=9 exceeds \w+=8, the largest"),
        ([*sizes[:1], None, *sizes[2:]], r"mamba_state_sizes\[1\] is None but layer 1 is a Mamba layer"),
        (sizes[:-1], r"one entry per layer \(num_hidden_layers=4\)"),
        ([*sizes[:1], 0, *sizes[2:]], r"at least 1 state"),
    ]
    if None in sizes:  # a size on an attention layer
        bad.append(([s or 4 for s in sizes], r"layer 2 is a 'full_attention' layer.*set that entry to None"))
    for values, message in bad:
        with pytest.raises(ValueError, match=message):
            host.config(mamba_state_sizes=values)
    with pytest.raises(ValueError, match=rf"{len(ssm)} Mamba layers \(layers {re.escape(str(ssm))}"):
        config.state_sizes = [4, 4]


# ---------------------------------------------------------------- conversion
@hosts
def test_from_stock_is_exact_and_to_stock_goes_back(host):
    stock = host.stock(seed=1)
    before = {k: v.clone() for k, v in stock.state_dict().items()}
    ours = host.model_class.from_stock(stock).eval()
    assert type(ours) is host.model_class and ours.state_sizes() == host.full(8)
    ids, mask = _left_padded()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours(ids, attention_mask=mask).logits, stock(ids, attention_mask=mask).logits)
        assert torch.equal(ours.generate(ids, **kwargs), stock.generate(ids, **kwargs))
        back = ours.to_stock().eval()
        assert type(back) is host.stock_model_class
        assert torch.equal(back(ids).logits, stock(ids).logits)
    ours.ssm_mixers()[0].A_log.data.add_(1.0)  # a copy: the stock model is untouched
    assert all(torch.equal(v, stock.state_dict()[k]) for k, v in before.items())
    with pytest.raises(TypeError, match="already"):
        host.model_class.from_stock(ours)
    with pytest.raises(TypeError, match=rf"needs a {host.ours_config}.*from_stock"):
        host.model_class(stock.config)


@hosts
def test_from_stock_folder_and_to_stock_needs_one_size(host, tmp_path):
    stock = host.stock(seed=2)
    stock.save_pretrained(tmp_path / "stock")
    ours = host.model_class.from_stock(tmp_path / "stock").eval()
    assert ours.config.compression == {"base_model": str(tmp_path / "stock")}
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, stock(ids).logits)
    with pytest.raises(ValueError, match=rf"one state size for every Mamba layer.*{re.escape(str(list(host.sizes)))}"):
        host.ours(mamba_state_sizes=list(host.sizes)).to_stock()


# ---------------------------------------------------------------- heterogeneous sizes: save, load, generate
@hosts
def test_heterogeneous_sizes_save_load_and_generate(host, tmp_path):
    sizes = list(host.sizes)
    model = host.ours(seed=3, mamba_state_sizes=sizes)
    assert model.state_sizes() == sizes
    for mixer, n in zip(model.ssm_mixers(), host.compact, strict=True):
        assert mixer.ssm_state_size == n and mixer.conv_dim == 64 + 2 * 2 * n
        assert mixer.in_proj.weight.shape[0] == 2 * 64 + 2 * 2 * n + 8
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["mamba_state_sizes"] == sizes and "state_sizes" not in saved
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(loaded) is host.model_class and loaded.state_sizes() == sizes
    ids, mask = _left_padded()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        batch = loaded.generate(ids, attention_mask=mask, **kwargs)
        assert torch.equal(batch, model.generate(ids, attention_mask=mask, **kwargs))
        alone = loaded.generate(ids[:1, 3:], **kwargs)  # the left-padded row, without its padding
        assert torch.equal(batch[0, 3 : 3 + alone.shape[1]], alone[0])  # (the batch pads after an early EOS)
        out = loaded(ids, use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        states = [cache.layers[i].recurrent_states[0] for i in host.ssm_layers]
        assert [s.shape[-1] for s in states] == host.compact  # (b, H, P, N) per Mamba layer


@hosts
def test_gradient_checkpointing_gives_the_same_gradients(host):
    ids = random_ids(length=19)
    grads = []
    for checkpointing in (False, True):
        model = host.ours(seed=4, mamba_state_sizes=list(host.sizes)).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------- strict save / load
@hosts
def test_strict_loading_refuses_edited_sizes_and_missing_tensors(host, tmp_path):
    sizes = list(host.sizes)
    model = host.ours(seed=5, mamba_state_sizes=sizes)
    model.save_pretrained(tmp_path / "m")
    edited_sizes = [*sizes[:1], 4, *sizes[2:]]  # layer 1: 3 -> 4 states

    edited = tmp_path / "edited"
    shutil.copytree(tmp_path / "m", edited)
    config = json.loads((edited / "config.json").read_text())
    config["mamba_state_sizes"] = edited_sizes
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises((RuntimeError, ValueError), match=r"(?i)size|shape"):
        AutoModelForCausalLM.from_pretrained(edited)
    with pytest.raises(ValueError, match="re-initialise SSM layer tensors"):
        AutoModelForCausalLM.from_pretrained(edited, ignore_mismatched_sizes=True)

    for key in (f"{_mixer_names(model)[1]}.A_log", host.attention_key):
        missing = tmp_path / key
        shutil.copytree(tmp_path / "m", missing)
        weights = load_file(missing / "model.safetensors")
        del weights[key]
        save_file(weights, missing / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError, match=rf"lacks \d backbone tensor\(s\): {re.escape(key)}"):  # (and its ties)
            AutoModelForCausalLM.from_pretrained(missing)

    model.config.mamba_state_sizes = edited_sizes  # out of sync with the parameters: nothing is written
    with pytest.raises(ValueError, match=r"Set config.mamba_state_sizes = model.state_sizes\(\)"):
        model.save_pretrained(tmp_path / "never")
    model.config.mamba_state_sizes = [*sizes[:3], None]
    with pytest.raises(ValueError, match=r"mamba_state_sizes\[3\] is None but layer 3 is a Mamba layer"):
        model.save_pretrained(tmp_path / "never")
    assert not (tmp_path / "never").exists()


@pytest.mark.compat
def test_remote_code_in_a_process_without_the_package(tmp_path):
    """Every host's folder loads with trust_remote_code in one process that cannot import hf_compressssm."""
    ids, mask = _left_padded()
    for host in HYBRIDS:
        model = host.ours(seed=6, mamba_state_sizes=list(host.sizes))
        with torch.no_grad():
            expected = model(ids).logits
            generated = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        model.save_pretrained(tmp_path / host.name)
        torch.save({"logits": expected, "generated": generated}, tmp_path / f"{host.name}.pt")
    torch.save({"ids": ids, "mask": mask}, tmp_path / "inputs.pt")
    script = (
        BLOCK_PACKAGE
        + f"""
import torch
from transformers import AutoModelForCausalLM
data = torch.load({str(tmp_path / "inputs.pt")!r})
for name, sizes in {[(h.name, list(h.sizes)) for h in HYBRIDS]!r}:
    model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + '/' + name, trust_remote_code=True).eval()
    expected = torch.load({str(tmp_path)!r} + f'/{{name}}.pt')
    with torch.no_grad():
        torch.testing.assert_close(model(data['ids']).logits, expected['logits'], atol=1e-5, rtol=1e-5)
        out = model.generate(data['ids'], attention_mask=data['mask'], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out, expected['generated'])
    assert model.state_sizes() == sizes, model.state_sizes()
    print('REMOTE_OK', type(model).__name__, type(model).__module__.split('.')[0])
"""
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_COMPRESSSSM_SCAN_BACKEND"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for host in HYBRIDS:
        assert f"REMOTE_OK {host.model_class.__name__} transformers_modules" in result.stdout


# ---------------------------------------------------------------- compression
def _mixer_names(model) -> list[str]:
    """The module names of the model's Mamba-2 layers, in layer order."""
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(m)] for m in model.ssm_mixers()]


def _non_ssm(model) -> dict[str, torch.Tensor]:
    shrinkable = set(shrinkable_parameter_names(model))
    return {n: p for n, p in model.named_parameters() if n not in shrinkable}


@hosts
def test_callback_cuts_only_the_mamba_layers_and_the_optimizer_follows(host, tmp_path):
    model = host.ours(seed=7).train()
    family = family_of(model)
    assert family.name == host.name
    snapshots = {}

    class Spy(TrainerCallback):
        def __init__(self, key):
            self.key = key

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step == 3:
                params = dict(model.named_parameters())
                snapshots[self.key] = {
                    "params": {n: (p, p.detach().clone()) for n, p in params.items()},
                    "state": {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in params.items()},
                }

    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=6),
        train_dataset=Blocks(),
        callbacks=[Spy("before"), CompreSSMCallback(tau=0.3, reduction_steps=[3]), Spy("after")],
    )
    trainer.train()
    sizes = model.state_sizes()
    assert [s is None for s in sizes] == [s is None for s in host.sizes]
    assert all(s < 8 for s in sizes if s is not None)
    assert model.config.mamba_state_sizes == sizes
    assert {id(p) for p in optimizer_params(trainer)} == {id(p) for p in model.parameters()}
    before, after = snapshots["before"], snapshots["after"]
    shrinkable = set(shrinkable_parameter_names(model))
    mixers = _mixer_names(model)
    assert shrinkable == {f"{m}.{n}" for m in mixers for n in ("in_proj.weight", "conv1d.weight", "conv1d.bias")}
    for name, (param, value) in before["params"].items():
        if name in shrinkable:
            continue
        # attention, MoE, norms, embeddings and the unshrunk SSM tensors: the same parameter, the same bytes,
        # the same optimizer state
        assert after["params"][name][0] is param and torch.equal(after["params"][name][1], value), name
        for key, moment in before["state"][name].items():
            assert torch.equal(after["state"][name][key], moment), name
    kept = {d["layer"]: d["kept"] for d in model.compression_history[0]["layers"]}
    reference = host.ours()
    for index, mixer in enumerate(mixers):
        in_rows, conv = kept_rows(find_mixers(reference)[index], torch.tensor(kept[index]))
        for suffix, rows in (("in_proj.weight", in_rows), ("conv1d.weight", conv), ("conv1d.bias", conv)):
            name = f"{mixer}.{suffix}"
            assert torch.equal(after["params"][name][1], before["params"][name][1][rows]), name
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(after["state"][name][key], before["state"][name][key][rows]), name
    model.save_pretrained(tmp_path / "final")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    model.eval()
    ids = random_ids(length=20)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.state_sizes() == sizes and [h["step"] for h in loaded.compression_history] == [3]


@hosts
def test_resume_inside_a_calibration_window_equals_the_uninterrupted_run(host, tmp_path):
    def run(out, resume=None):
        model = host.ours(seed=8) if resume is None else host.model_class.from_pretrained(resume)
        args = training_args(out, max_steps=10, save_strategy="steps", save_steps=6, lr_scheduler_type="linear")
        callback = CompreSSMCallback(mode="fixed", fixed_fraction=0.25, reduction_steps=[4, 8], calibration_batches=4)
        trainer = Trainer(model=model, args=args, train_dataset=Blocks(n=128), callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        return model

    full = run(tmp_path / "a")
    assert full.state_sizes() == host.full(5)  # 8 → 6 → 5 (ceil of 3/4)
    checkpoint = tmp_path / "a" / "checkpoint-6"  # steps 5-8 feed the cut at 8
    assert json.loads((checkpoint / "config.json").read_text())["mamba_state_sizes"] == host.full(6)
    shutil.copytree(checkpoint, tmp_path / "ckpt")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "ckpt"))
    assert resumed.state_sizes() == full.state_sizes()
    assert [h["step"] for h in resumed.compression_history] == [4, 8]
    assert [h["layers"][0]["kept"] for h in resumed.compression_history] == [
        h["layers"][0]["kept"] for h in full.compression_history
    ]
    for (n1, p1), (n2, p2) in zip(full.named_parameters(), resumed.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-5, msg=n1)


@hosts
def test_compress_model_post_hoc_and_stock_models_are_converted_first(host, tmp_path):
    model = host.ours(seed=9)
    batches = [{"input_ids": random_ids(batch=2, length=24, seed=s)} for s in range(2)]
    attention = {n: p.detach().clone() for n, p in _non_ssm(model).items()}
    targets = [4, 2, 6, 3][: len(host.ssm_layers)]
    report = compress_model(model, batches, target_sizes=targets, calibration_batches=2)
    assert report.sizes_after == targets and model.state_sizes() == host.full(targets)
    assert all(torch.equal(p, attention[n]) for n, p in _non_ssm(model).items())
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)
    with pytest.raises(ValueError, match=rf"convert it first with {host.ours_model}.from_stock"):
        compress_model(host.stock(), batches, tau=0.3)
    text = render_model_card(loaded, repo_id="someone/tiny-hybrid").text  # which layers are SSM, sizes before/after
    for layer, size in enumerate(host.full(targets)):
        assert (f"| {layer} | Mamba-2 | 8 | {size} |" if size else f"| {layer} | full attention | – | – |") in text
    assert f"{len(targets)} of its 4 layers have a Mamba-2 layer" in text and "config.mamba_state_sizes" in text


@pytest.mark.compat
def test_an_unsupported_hybrid_names_the_supported_ones():
    from transformers import FalconH1Config, FalconH1ForCausalLM

    config = FalconH1Config(
        vocab_size=32,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=16,
        mamba_d_ssm=32,
        mamba_n_heads=4,
        mamba_d_head=8,
        mamba_d_state=8,
        mamba_chunk_size=8,
    )
    message = (
        r"is Falcon-H1 \(model_type 'falcon_h1'\).*does not support yet.*Granite 4\.0-H.*Bamba.*Nemotron-H.*Zamba2"
    )
    with pytest.raises(ValueError, match=message):
        compress_model(FalconH1ForCausalLM(config), [{"input_ids": random_ids()}], tau=0.3)


@hosts
def test_lora_on_attention_and_mamba_projections_trains_and_follows_a_cut(host, tmp_path):
    peft = pytest.importorskip("peft")
    model = host.ours(seed=10)
    targets = ["q_proj", "v_proj", "in_proj", "out_proj"]
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    trainer = Trainer(
        model=lora,
        args=training_args(tmp_path, max_steps=6),
        train_dataset=Blocks(),
        callbacks=[CompreSSMCallback(tau=0.3, reduction_steps=[3])],
    )
    trainer.train()
    assert all(s < 8 for s in model.state_sizes() if s is not None)
    trained = {
        n.split(".lora_B")[0].split(".")[-1] for n, p in lora.named_parameters() if "lora_B" in n and p.abs().sum() > 0
    }
    assert trained == set(targets)


@pytest.mark.slow
@pytest.mark.parametrize("host", [GRANITE, ZAMBA2], ids=lambda h: h.name)  # MoE; tied shared blocks
def test_ddp_two_processes_stay_bit_identical_after_cuts(host, tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "workers", "ddp_train_hybrid.py")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", worker, str(out), host.name]
    result = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["world_size"] == 2
    assert len(rank0["kept"]) == 2 and rank0["kept"] == rank1["kept"]
    assert rank0["sizes"] == rank1["sizes"] == host.full(5)  # 8 → 6 → 5 on every Mamba layer
    assert rank0["checksums"] == rank1["checksums"]  # attention, MoE and Mamba weights alike
