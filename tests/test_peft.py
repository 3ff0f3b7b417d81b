"""LoRA (PEFT) on a compressed model: trains, saves, reloads onto the reduced base."""

import pytest
import torch
from helpers import random_ids, tiny_lm
from transformers import AutoModelForCausalLM

from hf_compressssm import compress_model
from hf_compressssm.peft_utils import default_lora_targets, ineffective_lora_targets, uses_fused_cuda_path


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
