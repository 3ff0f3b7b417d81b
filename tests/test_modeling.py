"""The per-layer-state-size Mamba family: config, models, generation, Auto classes, conversion, remote code."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import BLOCK_PACKAGE, cached_decode_logits, random_ids, tiny_config, tiny_lm
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    MambaConfig,
    MambaForCausalLM,
)

from hf_compressssm import (
    CompreSSMMambaConfig,
    CompreSSMMambaForCausalLM,
    CompreSSMMambaForSequenceClassification,
    CompreSSMMambaModel,
)


pytestmark = pytest.mark.compat


# ---------------------------------------------------------------- config
def test_config_defaults_and_round_trip(tmp_path):
    config = tiny_config(num_hidden_layers=3)
    assert config.state_sizes == [8, 8, 8]
    config = tiny_config(num_hidden_layers=3, state_sizes=[8, 5, 2])
    assert config.state_size == 8 and config.state_sizes == [8, 5, 2]
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["state_sizes"] == [8, 5, 2]
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, CompreSSMMambaConfig)
    assert loaded.state_sizes == [8, 5, 2] and loaded.state_size == 8


def test_with_state_sizes_does_not_mutate():
    config = tiny_config(num_hidden_layers=3, state_sizes=[8, 5, 2])
    sizes = config.state_sizes
    new = config.with_state_sizes([4, 4, 1])
    assert new.state_sizes == [4, 4, 1]
    assert config.state_sizes == [8, 5, 2] and sizes == [8, 5, 2]
    assert new.state_sizes is not config.state_sizes
    assert config.layer_config(1).state_size == 5 and isinstance(config.layer_config(1), MambaConfig)


@pytest.mark.parametrize(
    "sizes, message",
    [
        ([8, 8], "2 entries"),
        ([8, 8, "4"], r"state_sizes\[2\] must be an int"),
        ([8, 4.0, 4], r"state_sizes\[1\] must be an int"),
        ([8, True, 4], r"state_sizes\[1\] must be an int"),
        ([8, 0, 4], r"state_sizes\[1\]=0 is invalid"),
        ([8, 4, -1], r"state_sizes\[2\]=-1 is invalid"),
        ([9, 4, 4], r"state_sizes\[0\]=9 exceeds state_size=8"),
    ],
)
def test_bad_state_sizes(sizes, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(num_hidden_layers=3, state_sizes=sizes)
    with pytest.raises(ValueError, match=message):
        tiny_config(num_hidden_layers=3).with_state_sizes(sizes)


def test_bad_pooling():
    with pytest.raises(ValueError, match="classifier_pooling"):
        tiny_config(classifier_pooling="max")


# ---------------------------------------------------------------- models
def test_mixed_sizes_forward_backward():
    model = tiny_lm(num_hidden_layers=3, state_sizes=[8, 3, 1])
    assert model.state_sizes() == [8, 3, 1]
    for layer, n in zip(model.backbone.layers, [8, 3, 1]):
        mixer = layer.mixer
        assert mixer.A_log.shape == (mixer.intermediate_size, n)
        assert mixer.x_proj.weight.shape == (mixer.time_step_rank + 2 * n, mixer.intermediate_size)
    ids = random_ids()
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.backbone.layers[2].mixer.A_log.grad.abs().sum() > 0


def test_cached_generation_matches_full_forward():
    model = tiny_lm(num_hidden_layers=3, state_sizes=[8, 3, 1]).eval()
    prompt = random_ids(batch=2, length=6)
    with torch.no_grad():
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
        assert generated.shape == (2, 14)
        # Greedy decoding from full (uncached) forwards gives the same tokens.
        ids = prompt
        for _ in range(8):
            next_token = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
        assert torch.equal(ids, generated)
        # Step-by-step cached logits equal the full forward's logits.
        full = model(generated, use_cache=False).logits
        steps, _ = cached_decode_logits(model, generated, prefill=6)
    torch.testing.assert_close(steps, full[:, 5:-1], atol=1e-5, rtol=1e-5)


def test_sequence_classification_pooling_and_loss():
    config = tiny_config(num_labels=3, state_sizes=[8, 4])
    torch.manual_seed(0)
    model = CompreSSMMambaForSequenceClassification(config)
    ids = random_ids(batch=4, length=10)
    labels = torch.tensor([0, 1, 2, 1])
    out = model(ids, labels=labels)
    assert out.logits.shape == (4, 3)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    out.loss.backward()
    assert model.classifier.weight.grad is not None
    # Mean pooling ignores padded positions: a right-padded sequence equals its unpadded version.
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    padded = ids.clone()
    padded[0, 7:] = 0
    with torch.no_grad():
        a = model(padded, attention_mask=mask).logits[0]
        b = model(ids[:1, :7]).logits[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # Last-token pooling picks the last real token.
    model.config.classifier_pooling = "last"
    with torch.no_grad():
        a = model(padded, attention_mask=mask).logits[0]
        b = model(ids[:1, :7]).logits[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- Auto classes and saving
def test_auto_classes_save_load_identical(tmp_path):
    model = tiny_lm(state_sizes=[8, 3]).eval()
    ids = random_ids()
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert {"configuration_compressssm_mamba.py", "modeling_compressssm_mamba.py", "selective_scan.py"} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].endswith("CompreSSMMambaForCausalLM")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is CompreSSMMambaForCausalLM and loaded.state_sizes() == [8, 3]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is CompreSSMMambaModel and base.state_sizes() == [8, 3]


def test_sequence_classification_auto_round_trip(tmp_path):
    torch.manual_seed(0)
    model = CompreSSMMambaForSequenceClassification(tiny_config(num_labels=4, state_sizes=[6, 2])).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is CompreSSMMambaForSequenceClassification
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.slow
def test_remote_code_load_without_package(tmp_path):
    """A process that cannot import hf_compressssm loads the folder with trust_remote_code=True."""
    model = tiny_lm(state_sizes=[8, 3]).eval()
    ids = random_ids()
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
torch.testing.assert_close(logits, data['logits'], atol=1e-5, rtol=1e-5)
print('REMOTE_OK', type(model).__name__, [l.mixer.A_log.shape[-1] for l in model.backbone.layers])
"""
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE_OK CompreSSMMambaForCausalLM [8, 3]" in result.stdout


def test_shape_mismatch_fails_loudly(tmp_path):
    model = tiny_lm(state_sizes=[8, 5])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["state_sizes"] = [8, 4]
    (tmp_path / "config.json").write_text(json.dumps(config))
    # transformers' own exception type, with a note on what to do ...
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes") as info:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert any("its own config.json" in note for note in info.value.__notes__)
    # ... and ignore_mismatched_sizes=True never re-initialises SSM tensors (tests/test_model_conventions.py).
    with pytest.raises(ValueError, match=r"backbone\.layers\.1\.mixer\.A_log: checkpoint \(32, 5\) vs model \(32, 4\)"):
        CompreSSMMambaForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True)


# ---------------------------------------------------------------- conversion
def _stock(seed=0, state_size=8):
    torch.manual_seed(seed)
    config = MambaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, state_size=state_size)
    return MambaForCausalLM(config).eval()


def test_from_mamba_identical_logits(tmp_path, monkeypatch):
    stock = _stock()
    ids = random_ids()
    with torch.no_grad():
        expected = stock(ids).logits
    # With the same (reference) scan the logits are bit-identical ...
    monkeypatch.setenv("HF_COMPRESSSSM_SCAN_BACKEND", "torch")
    ours = CompreSSMMambaForCausalLM.from_mamba(stock).eval()
    assert ours.state_sizes() == [8, 8]
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, expected)
    # ... and with the default (fast) scan they agree to float32 rounding.
    monkeypatch.delenv("HF_COMPRESSSSM_SCAN_BACKEND")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected, atol=1e-4, rtol=1e-4)
    # From a saved folder too, recording where it came from.
    stock.save_pretrained(tmp_path)
    from_folder = CompreSSMMambaForCausalLM.from_mamba(tmp_path).eval()
    assert from_folder.config.compression["base_model"] == str(tmp_path)
    for (n1, p1), (n2, p2) in zip(from_folder.state_dict().items(), stock.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_to_mamba_round_trip_and_error():
    stock = _stock(seed=3)
    ours = CompreSSMMambaForCausalLM.from_mamba(stock)
    back = ours.to_mamba()
    assert type(back) is MambaForCausalLM and back.config.state_size == 8
    for (n1, p1), (n2, p2) in zip(back.state_dict().items(), stock.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    mixed = tiny_lm(state_sizes=[8, 3])
    with pytest.raises(ValueError, match=r"one state size for every layer.*\[8, 3\]"):
        mixed.to_mamba()
    with pytest.raises(TypeError, match="MambaForCausalLM"):
        CompreSSMMambaForCausalLM.from_mamba(object())
