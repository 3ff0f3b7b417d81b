"""The per-layer-state-size Mamba-2 family: config, models, generation, Auto classes, conversion, remote code."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import BLOCK_PACKAGE, cached_decode_logits, random_ids
from mamba2_helpers import stock_mamba2_lm, tiny_mamba2_config, tiny_mamba2_lm
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, Mamba2Config, Mamba2ForCausalLM

from hf_compressssm import CompreSSMMamba2Config, CompreSSMMamba2ForCausalLM, CompreSSMMamba2Model


pytestmark = pytest.mark.compat


# ---------------------------------------------------------------- config
def test_config_defaults_and_round_trip(tmp_path):
    assert tiny_mamba2_config(num_hidden_layers=3).state_sizes == [8, 8, 8]
    config = tiny_mamba2_config(num_hidden_layers=3, state_sizes=[8, 5, 2])
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["state_sizes"] == [8, 5, 2]
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, CompreSSMMamba2Config)
    assert loaded.state_sizes == [8, 5, 2] and loaded.state_size == 8 and loaded.n_groups == 2
    new = loaded.with_state_sizes([4, 4, 1])
    assert new.state_sizes == [4, 4, 1] and loaded.state_sizes == [8, 5, 2]
    layer = loaded.layer_config(1)
    assert type(layer) is Mamba2Config and layer.state_size == 5


@pytest.mark.parametrize(
    "sizes, message",
    [
        ([8, 8], "2 entries"),
        ([8, 8, "4"], r"state_sizes\[2\] must be an int"),
        ([8, True, 4], r"state_sizes\[1\] must be an int"),
        ([8, 0, 4], r"state_sizes\[1\]=0 is invalid"),
        ([9, 4, 4], r"state_sizes\[0\]=9 exceeds state_size=8"),
    ],
)
def test_bad_state_sizes(sizes, message):
    with pytest.raises(ValueError, match=message):
        tiny_mamba2_config(num_hidden_layers=3, state_sizes=sizes)
    with pytest.raises(ValueError, match=message):
        tiny_mamba2_config(num_hidden_layers=3).with_state_sizes(sizes)


def test_heads_must_split_into_groups():
    with pytest.raises(ValueError, match="multiple of n_groups"):
        tiny_mamba2_config(n_groups=3)


# ---------------------------------------------------------------- models
def test_mixed_sizes_shapes_forward_backward():
    model = tiny_mamba2_lm(num_hidden_layers=3, state_sizes=[8, 3, 1])
    assert model.state_sizes() == [8, 3, 1]
    for layer, n in zip(model.backbone.layers, [8, 3, 1]):
        mixer = layer.mixer
        inner, groups, heads = mixer.intermediate_size, mixer.n_groups, mixer.num_heads
        assert mixer.conv1d.weight.shape == (inner + 2 * groups * n, 1, 4)
        assert mixer.in_proj.weight.shape == (2 * inner + 2 * groups * n + heads, 16)
        assert mixer.A_log.shape == (heads,) and mixer.ssm_state_size == n and mixer.conv_dim == inner + 2 * groups * n
    ids = random_ids(length=20)  # > chunk_size: several chunks
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_cached_generation_matches_full_forward():
    model = tiny_mamba2_lm(num_hidden_layers=3, state_sizes=[8, 3, 1]).eval()
    prompt = random_ids(batch=2, length=6)
    with torch.no_grad():
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
        assert generated.shape == (2, 14)
        ids = prompt
        for _ in range(8):
            next_token = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
        assert torch.equal(ids, generated)
        full = model(generated, use_cache=False).logits
        steps, prefill = cached_decode_logits(model, generated, prefill=6)
        # The decode cache holds (batch, heads, head_dim, N_layer) per layer.
        for layer, n in enumerate([8, 3, 1]):
            assert prefill.cache.layers[layer].recurrent_states[0].shape == (2, 4, 8, n)
    torch.testing.assert_close(steps, full[:, 5:-1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- Auto classes and saving
def test_auto_classes_save_load_identical(tmp_path):
    model = tiny_mamba2_lm(state_sizes=[8, 3]).eval()
    model.compression_history = [{"step": 1}]
    ids = random_ids()
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "compression_history.json"} <= files
    assert {"configuration_compressssm_mamba2.py", "modeling_compressssm_mamba2.py"} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].endswith("CompreSSMMamba2ForCausalLM")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is CompreSSMMamba2ForCausalLM and loaded.state_sizes() == [8, 3]
    assert loaded.compression_history == [{"step": 1}]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is CompreSSMMamba2Model and base.state_sizes() == [8, 3]


def test_remote_code_load_without_package(tmp_path):
    """A process that cannot import hf_compressssm loads the folder with trust_remote_code=True."""
    model = tiny_mamba2_lm(state_sizes=[8, 3]).eval()
    ids = random_ids(length=20)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "model")
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = (
        BLOCK_PACKAGE
        + f"""
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
assert 'hf_compressssm' not in type(model).__module__.split('.')[0], type(model).__module__
data = torch.load({str(tmp_path / "expected.pt")!r})
with torch.no_grad():
    logits = model(data['ids']).logits
assert torch.equal(logits, data['logits'])
print('REMOTE_OK', type(model).__name__, [l.mixer.conv1d.weight.shape[0] for l in model.backbone.layers])
"""
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # conv channels = I + 2 G N = 32 + 4 N
    assert "REMOTE_OK CompreSSMMamba2ForCausalLM [64, 44]" in result.stdout


def test_shape_mismatch_fails_loudly(tmp_path):
    tiny_mamba2_lm(state_sizes=[8, 5]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["state_sizes"] = [8, 4]
    (tmp_path / "config.json").write_text(json.dumps(config))
    # The same contract as Mamba-1 (tests/test_modeling.py): transformers' error with a note on what to do ...
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes") as info:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert any("its own config.json" in note for note in info.value.__notes__)
    # ... and ignore_mismatched_sizes=True never re-initialises SSM tensors.
    with pytest.raises(ValueError, match=r"backbone\.layers\.1\.mixer\.conv1d\.weight: checkpoint \(52, 1, 4\)"):
        CompreSSMMamba2ForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True)


# ---------------------------------------------------------------- conversion
def test_from_mamba2_identical_logits(tmp_path):
    stock = stock_mamba2_lm(seed=1).eval()
    ids = random_ids(length=20)
    with torch.no_grad():
        expected = stock(ids).logits
    ours = CompreSSMMamba2ForCausalLM.from_mamba2(stock).eval()
    assert ours.state_sizes() == [8, 8]
    with torch.no_grad():  # our own SSD code: the same function, summed in another order
        torch.testing.assert_close(ours(ids).logits, expected, atol=1e-5, rtol=1e-5)
    stock.save_pretrained(tmp_path)
    from_folder = CompreSSMMamba2ForCausalLM.from_mamba2(tmp_path).eval()
    assert from_folder.config.compression["base_model"] == str(tmp_path)
    for (n1, p1), (n2, p2) in zip(from_folder.state_dict().items(), stock.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_to_mamba2_round_trip_and_errors():
    stock = stock_mamba2_lm(seed=3)
    back = CompreSSMMamba2ForCausalLM.from_mamba2(stock).to_mamba2()
    assert type(back) is Mamba2ForCausalLM and back.config.state_size == 8
    for (n1, p1), (n2, p2) in zip(back.state_dict().items(), stock.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    with pytest.raises(ValueError, match=r"one state size for every layer.*\[8, 3\]"):
        tiny_mamba2_lm(state_sizes=[8, 3]).to_mamba2()
    with pytest.raises(TypeError, match="Mamba2ForCausalLM"):
        CompreSSMMamba2ForCausalLM.from_mamba2(object())
    with pytest.raises(TypeError, match="already a CompreSSM"):
        CompreSSMMamba2ForCausalLM.from_mamba2(tiny_mamba2_lm())
