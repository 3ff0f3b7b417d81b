"""LoRA (PEFT) on a compressed model: trains, saves, reloads onto the reduced base."""

import pytest
import torch
from helpers import random_ids, tiny_lm
from transformers import AutoModelForCausalLM

from hf_compressssm import compress_model
from hf_compressssm.peft_utils import default_lora_targets, ineffective_lora_targets, uses_fused_cuda_path


pytestmark = pytest.mark.compat


peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory):
    model = tiny_lm(seed=3)
    compress_model(
        model, [{"input_ids": random_ids(batch=2, length=24, seed=s)} for s in range(2)], tau=0.3, calibration_batches=2
    )
    assert sum(model.config.state_sizes) < 16
    folder = tmp_path_factory.mktemp("compressed")
    model.save_pretrained(folder)
    return folder, list(model.config.state_sizes)


def _lora_b(model, name):
    return [p for n, p in model.named_parameters() if f"{name}.lora_B" in n]


def test_targets_on_cpu():
    model = tiny_lm()
    assert not uses_fused_cuda_path(model)
    assert default_lora_targets(model) == ["in_proj", "x_proj", "out_proj"]
    assert ineffective_lora_targets(model, ["in_proj", "x_proj", "dt_proj"]) == ["dt_proj"]


def test_lora_round_trip_on_compressed_model(compressed_dir, tmp_path):
    folder, sizes = compressed_dir
    base = AutoModelForCausalLM.from_pretrained(folder)
    assert base.config.state_sizes == sizes
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["in_proj", "x_proj"], lora_dropout=0.0, init_lora_weights=True
    )
    model = peft.get_peft_model(base, config)
    x_proj_shapes = [m.base_layer.out_features for n, m in model.named_modules() if n.endswith("mixer.x_proj")]
    assert x_proj_shapes == [base.config.time_step_rank + 2 * n for n in sizes]  # one adapter size per layer

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = random_ids(batch=2, length=16, seed=7)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name in ("in_proj", "x_proj"):  # both adapters trained on CPU
        assert all(float(p.detach().abs().sum()) > 0 for p in _lora_b(model, name)), name

    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert not torch.allclose(expected, plain)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "adapter")
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
    merged = reloaded.merge_and_unload()
    assert merged.state_sizes() == sizes
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_lora_on_dt_proj_gets_no_gradient(compressed_dir):
    """The mixer reads dt_proj.weight directly, so a dt_proj adapter is bypassed (in_proj's still trains)."""
    folder, _ = compressed_dir
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(folder),
        peft.LoraConfig(r=2, target_modules=["in_proj", "dt_proj"], init_lora_weights=False),
    )
    ids = random_ids(batch=1, length=8, seed=1)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert all(g is None for n, g in grads.items() if "dt_proj" in n)
    assert all(g is not None for n, g in grads.items() if "in_proj" in n)


# ------------------------------------------------------------------ the CUDA plan (emulated kernels, tests/cuda_emulation.py)


def _emulated_cuda():
    """Emulated mamba_ssm/causal_conv1d kernels, CPU tensors counted as CUDA by both mixers' kernel choice."""
    cuda_emulation = pytest.importorskip("cuda_emulation")
    if cuda_emulation.missing_packages():
        pytest.skip(f"CUDA emulation needs {cuda_emulation.missing_packages()} (installed by .ci/run)")
    from hf_compressssm.models import kernel_policy

    return cuda_emulation.emulated_cuda(
        device_hooks=((kernel_policy, "_device_type"),),
        patches=tuple(cuda_emulation.ssd_patches()),
        import_caches=(kernel_policy._IMPORTS,),
    )


def _lora_train_step(model, targets):
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    ids = random_ids(batch=2, length=10, seed=1)
    model(input_ids=ids, labels=ids).loss.backward()
    return model, {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_targets_follow_the_mixers_cuda_plan_and_adapters_train_on_it(family, monkeypatch):
    """On CUDA with the kernels, LoRA on in_proj alone keeps the fused kernel; LoRA on the other projections turns
    it off and trains; the helpers report exactly that."""
    monkeypatch.delenv("HF_COMPRESSSSM_SCAN_BACKEND", raising=False)
    if family == "mamba":
        build, targets, fused_key = (lambda: tiny_lm(seed=1)), ["in_proj", "x_proj", "out_proj"], "mamba_inner_fn"
    else:
        from mamba2_helpers import tiny_mamba2_lm

        build, targets, fused_key = (lambda: tiny_mamba2_lm(seed=1)), ["in_proj", "out_proj"], "ssd_bwd"
    layers = build().config.num_hidden_layers
    with _emulated_cuda() as calls:
        plain = build()
        assert uses_fused_cuda_path(plain)
        assert default_lora_targets(plain) == targets
        assert ineffective_lora_targets(plain, ["in_proj"]) == []
        assert ineffective_lora_targets(plain, [*targets, "conv1d"]) == ["conv1d"]

        model, grads = _lora_train_step(build(), ["in_proj"])  # fused kernel kept
        assert uses_fused_cuda_path(model) and calls[fused_key] == layers
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values())

        calls.clear()
        model, grads = _lora_train_step(build(), targets)  # adapters on the other projections: unfused
        assert not uses_fused_cuda_path(model)
        assert calls["mamba_inner_fn"] == 0 and calls["mamba_split_conv1d_scan_combined"] == 0
        assert {n.split(".lora_B")[0].split(".")[-1] for n in grads} == set(targets)
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
