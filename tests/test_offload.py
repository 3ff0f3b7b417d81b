"""accelerate offloading: ``cpu_offload`` and a ``device_map`` with disk offload give the plain model's outputs.

The mixer reads ``conv1d``/``dt_proj`` weights (and on the fused path every projection's) directly, so it fires
their accelerate hooks itself, like transformers' ``force_accelerate_hooks`` on the stock mixer.
"""

import copy

import torch
from accelerate import cpu_offload
from helpers import random_ids, tiny_lm

from hf_compressssm import CompreSSMMambaForCausalLM


def _model():
    model = tiny_lm(num_hidden_layers=2, state_sizes=[8, 5]).eval()
    with torch.no_grad():  # non-zero conv biases, so a missing conv1d weight/bias would show
        for layer in model.backbone.layers:
            layer.mixer.conv1d.bias.normal_(0.0, 0.5)
    return model


def test_cpu_offload_equals_the_plain_model():
    model = _model()
    ids = random_ids(batch=2, length=10)
    with torch.no_grad():
        ref = model(ids).logits
        ref_gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    offloaded = cpu_offload(copy.deepcopy(model), execution_device=torch.device("cpu"))
    assert {p.device.type for p in offloaded.parameters()} == {"meta"}
    with torch.no_grad():
        assert torch.equal(offloaded(ids).logits, ref)
        assert torch.equal(offloaded.generate(ids, max_new_tokens=4, do_sample=False), ref_gen)
    assert {p.device.type for p in offloaded.parameters()} == {"meta"}  # weights went back after each call


def test_device_map_with_disk_offload_equals_the_plain_model(tmp_path):
    model = _model()
    ids = random_ids(batch=2, length=10)
    with torch.no_grad():
        ref = model(ids).logits
        ref_gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    model.save_pretrained(tmp_path / "m")
    device_map = {
        "backbone.embeddings": "cpu",
        "backbone.layers.0": "disk",
        "backbone.layers.1": "cpu",
        "backbone.norm_f": "cpu",
        "lm_head": "cpu",
    }
    loaded = CompreSSMMambaForCausalLM.from_pretrained(
        tmp_path / "m", device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert loaded.backbone.layers[0].mixer.conv1d.weight.device.type == "meta"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
        assert torch.equal(loaded.generate(ids, max_new_tokens=4, do_sample=False), ref_gen)
