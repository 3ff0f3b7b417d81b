"""Strict loading and invariants at every entry point, for every family."""

import json
import logging
import os
import re

import pytest
import torch
from helpers import random_ids, tiny_config, tiny_lm
from huggingface_hub.errors import StrictDataclassClassValidationError
from mamba2_helpers import tiny_mamba2_config, tiny_mamba2_lm
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hf_compressssm import (
    CompreSSMMamba2ForCausalLM,
    CompreSSMMamba2Model,
    CompreSSMMambaConfig,
    CompreSSMMambaForCausalLM,
    CompreSSMMambaForSequenceClassification,
    CompreSSMMambaModel,
)


pytestmark = pytest.mark.compat

FAMILIES = {
    "mamba": dict(
        config=tiny_config,
        lm=tiny_lm,
        lm_class=CompreSSMMambaForCausalLM,
        backbone_class=CompreSSMMambaModel,
        classes=(CompreSSMMambaModel, CompreSSMMambaForCausalLM, CompreSSMMambaForSequenceClassification),
        layer_keys=("backbone.layers.1.mixer.A_log", "backbone.layers.0.mixer.x_proj.weight"),
    ),
    "mamba2": dict(
        config=tiny_mamba2_config,
        lm=tiny_mamba2_lm,
        lm_class=CompreSSMMamba2ForCausalLM,
        backbone_class=CompreSSMMamba2Model,
        classes=(CompreSSMMamba2Model, CompreSSMMamba2ForCausalLM),
        layer_keys=("backbone.layers.1.mixer.A_log", "backbone.layers.0.mixer.in_proj.weight"),
    ),
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return FAMILIES[request.param]


@pytest.fixture
def saved(tmp_path, family):
    """A [8, 5] model of the family saved in ``tmp_path/model``; returns (model, folder)."""
    model = family["lm"](state_sizes=[8, 5]).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    return model, folder


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


# ---------------------------------------------------------------- row 6: missing tensors, wrong layer count
@pytest.mark.parametrize("which", [0, 1])
def test_missing_mixer_weight_raises(saved, family, which):
    _, folder = saved
    key = family["layer_keys"][which]
    tensors = load_file(folder / "model.safetensors")
    del tensors[key]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    for load in (AutoModelForCausalLM.from_pretrained, family["lm_class"].from_pretrained):
        with pytest.raises(ValueError, match=r"lacks 1 backbone tensor\(s\): " + re.escape(key) + r"\."):
            load(folder)


@pytest.mark.parametrize("layers, sizes, what", [(3, [8, 5, 5], "re-initialised at random"), (1, [8], "dropped")])
def test_layer_count_disagreeing_with_checkpoint_raises(saved, family, layers, sizes, what):
    _, folder = saved
    _edit_config(folder, num_hidden_layers=layers, state_sizes=sizes)
    with pytest.raises(
        ValueError, match=rf"has 2 layers but config.num_hidden_layers={layers}: layers would be {what}"
    ):
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match=rf"num_hidden_layers={layers}"):
        family["backbone_class"].from_pretrained(folder)  # the bare backbone too


def test_layer_count_edited_alone_is_refused_by_the_config(saved):
    _, folder = saved
    _edit_config(folder, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"state_sizes has 2 entries but the model has num_hidden_layers=3"):
        AutoModelForCausalLM.from_pretrained(folder)


# ---------------------------------------------------------------- row 10 / point 5: metadata never blocks weights
@pytest.mark.parametrize("content", ['[{"step": 3, "sizes_af', "{not json", '{"a": 1}', "<binary>"])
def test_corrupt_history_warns_and_weights_load(saved, caplog, content):
    model, folder = saved
    path = folder / "compression_history.json"
    if content == "<binary>":
        path.write_bytes(b"\xff\xfe\x00garbage")
    else:
        path.write_text(content)
    with caplog.at_level(logging.WARNING):
        loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert any(
        "compression_history.json" in r.getMessage() and "weights loaded" in r.getMessage() for r in caplog.records
    )
    assert not getattr(loaded, "compression_history", None)
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_history_round_trip_is_atomic(tmp_path, family):
    model = family["lm"](state_sizes=[8, 5])
    model.compression_history = [{"step": 3, "sizes_after": [8, 5]}]
    model.save_pretrained(tmp_path)
    assert sorted(p for p in os.listdir(tmp_path) if ".tmp" in p) == []
    loaded = family["lm_class"].from_pretrained(tmp_path)
    assert loaded.compression_history == model.compression_history


# ---------------------------------------------------------------- row 7 / point 6: invariants at every entry point
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(state_size=0), "state_size must be an int >= 1, got 0"),
        (dict(state_size=-3), "state_size must be an int >= 1"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be an int >= 1"),
        (dict(state_sizes=[8, 0]), r"state_sizes\[1\]=0 is invalid"),
    ],
)
def test_config_constructor_invariants(family, overrides, message):
    with pytest.raises(ValueError, match=message):
        family["config"](**overrides)


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(state_sizes=[8, 0]), r"state_sizes\[1\]=0 is invalid"),
        (dict(state_sizes=[8, 9]), r"state_sizes\[1\]=9 exceeds state_size=8"),
        (dict(num_hidden_layers=3), r"state_sizes has 2 entries but the model has num_hidden_layers=3"),
        (dict(state_size=0), r"state_size must be an int >= 1, got 0"),
    ],
)
def test_model_build_checks_config_changed_after_construction(family, which, change, message):
    if which >= len(family["classes"]):
        pytest.skip("the family has no such head (Mamba-2: backbone and causal LM)")
    model_class = family["classes"][which]
    config = family["config"](state_sizes=[8, 5])
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match=message):
        model_class(config)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(state_sizes=[8, 0]), r"state_sizes\[1\]=0 is invalid"),
        (dict(state_sizes=[8, 4]), r"config.state_sizes=\[8, 4\] but the layers' parameters have state sizes \[8, 5\]"),
        (dict(num_hidden_layers=3), r"config.num_hidden_layers=3 but the model has 2 layers"),
        (dict(state_size=4), r"state_sizes\[0\]=8 exceeds state_size=4"),
        (dict(state_size=0), r"state_size must be an int >= 1"),
    ],
)
def test_save_pretrained_refuses_before_writing(tmp_path, family, change, message):
    model = family["lm"](state_sizes=[8, 5])
    for key, value in change.items():
        setattr(model.config, key, value)
    folder = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        model.save_pretrained(folder)
    assert not folder.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(ValueError, match=message):
        model.save_pretrained(existing)
    assert os.listdir(existing) == []


def test_config_save_pretrained_validates(tmp_path, family):
    config = family["config"](state_sizes=[8, 5])
    config.state_sizes = [8, 0]
    with pytest.raises(StrictDataclassClassValidationError, match=r"state_sizes\[1\]=0 is invalid"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()
    assert isinstance(CompreSSMMambaConfig(state_size=4, num_hidden_layers=1), CompreSSMMambaConfig)
