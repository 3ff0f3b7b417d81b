"""transformers' model conventions on the Mamba-1 classes with heterogeneous state sizes.

Shaped like transformers' own model tests (a model tester building configs and inputs, then checks of every output,
the per-layer cache, generation, save/load, training and the classification head variants), written for this
package: the model under test always has layers of different state sizes ([16, 8] unless a test says otherwise).
"""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DynamicCache,
    GenerationMixin,
    MambaConfig,
)
from transformers.cache_utils import get_layer_types_and_kwargs

from hf_compressssm import (
    CompreSSMMambaConfig,
    CompreSSMMambaForCausalLM,
    CompreSSMMambaForSequenceClassification,
    CompreSSMMambaModel,
)


class CompreSSMMambaModelTester:
    """Builds tiny heterogeneous configs and matching inputs (ids, mask, sequence and token labels)."""

    def __init__(
        self,
        batch_size: int = 3,
        seq_length: int = 7,
        vocab_size: int = 40,
        hidden_size: int = 16,
        state_size: int = 16,
        state_sizes: tuple[int, ...] = (16, 8),
        num_labels: int = 3,
        seed: int = 0,
    ):
        self.batch_size, self.seq_length = batch_size, seq_length
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.state_size, self.state_sizes = state_size, list(state_sizes)
        self.num_hidden_layers = len(state_sizes)
        self.num_labels = num_labels
        self.generator = torch.Generator().manual_seed(seed)

    def get_config(self, **overrides) -> CompreSSMMambaConfig:
        values = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            state_size=self.state_size,
            state_sizes=list(self.state_sizes),
            num_labels=self.num_labels,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        values.update(overrides)
        return CompreSSMMambaConfig(**values)

    def prepare_config_and_inputs(self):
        ids = torch.randint(3, self.vocab_size, (self.batch_size, self.seq_length), generator=self.generator)
        mask = torch.ones_like(ids)
        sequence_labels = torch.randint(0, self.num_labels, (self.batch_size,), generator=self.generator)
        token_labels = torch.randint(3, self.vocab_size, (self.batch_size, self.seq_length), generator=self.generator)
        return self.get_config(), ids, mask, sequence_labels, token_labels

    def build(self, model_class, seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return model_class(self.get_config(**overrides))


@pytest.fixture
def tester():
    return CompreSSMMambaModelTester()


ALL_MODEL_CLASSES = (CompreSSMMambaModel, CompreSSMMambaForCausalLM, CompreSSMMambaForSequenceClassification)


# ---------------------------------------------------------------- config: transformers' per-layer mechanism
def test_per_layer_config_gives_each_layers_state_size(tester):
    config = tester.get_config()
    assert config.is_heterogeneous and config.per_layer_attributes == {"state_size"}
    assert len(config.per_layer_config) == 2
    assert [c.state_size for c in config.per_layer_config] == [16, 8]
    assert config.per_layer_config[-1].state_size == 8
    assert [c.state_size for c in config.per_layer_config[0:2]] == [16, 8]
    assert config.state_size == 16  # the cap stays readable (a stock heterogeneous config raises here)
    with pytest.raises(IndexError):
        config.per_layer_config[2]
    with pytest.raises(ValueError, match="not homogeneous"):
        config.per_layer_config["linear_attention"]
    uniform = tester.get_config(state_sizes=[8, 8], state_size=8)
    assert not uniform.is_heterogeneous and uniform.per_layer_attributes is None
    assert uniform.per_layer_config["linear_attention"] is uniform
    # The stock mechanism answers the same question the same way.
    stock = MambaConfig(hidden_size=16, num_hidden_layers=2, state_size=16, per_layer_config={1: {"state_size": 8}})
    assert [c.state_size for c in stock.per_layer_config] == [c.state_size for c in config.per_layer_config]
    # Each layer's mixer is built from (and keeps) its layer config.
    model = CompreSSMMambaModel(config)
    assert [layer.mixer.config.state_size for layer in model.layers] == [16, 8]
    assert [layer.mixer.A_log.shape[-1] for layer in model.layers] == [16, 8]


def test_per_layer_config_as_input_and_serialisation(tmp_path, tester):
    config = tester.get_config(state_sizes=None, per_layer_config={1: {"state_size": 4}})
    assert config.state_sizes == [16, 4] and config.per_layer_config[1].state_size == 4
    config = tester.get_config(state_sizes=None, per_layer_config={"1": {"state_size": 4}})  # JSON keys are strings
    assert config.state_sizes == [16, 4]
    with pytest.raises(ValueError, match=r"varies only state_size per layer"):
        tester.get_config(per_layer_config={0: {"hidden_size": 8}})
    with pytest.raises(ValueError, match=r"layer index 5"):
        tester.get_config(per_layer_config={5: {"state_size": 4}})
    with pytest.raises(ValueError, match=r"state_sizes\[1\]=0"):
        tester.get_config(per_layer_config={1: {"state_size": 0}})
    # config.json holds state_sizes once; no second per-layer record, no transient layer fields.
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["state_sizes"] == [16, 4] and "per_layer_config" not in saved and "skip" not in saved
    loaded = CompreSSMMambaConfig.from_pretrained(tmp_path)
    assert loaded.state_sizes == [16, 4] and loaded.to_dict() == config.to_dict()


def test_layer_config_keeps_head_fields_without_revalidating(tester):
    config = tester.get_config()
    # transformers refuses this pair at construction, but attributes set afterwards are not re-validated by it;
    # building the layers must not re-validate them either (the old layer_config rebuilt a MambaConfig and raised).
    config.num_labels = 1
    config.problem_type = "single_label_classification"
    layer = config.layer_config(1)
    assert layer.state_size == 8 and layer.num_labels == 1 and layer.problem_type == "single_label_classification"
    assert config.state_sizes == [16, 8] and config.state_size == 16  # the model config is untouched
    model = CompreSSMMambaForSequenceClassification(config)
    assert model.classifier.out_features == 1
    # Mixed configs pass transformers' own cache-layer discovery (one linear-attention cache layer per layer).
    layer_types, kwargs = get_layer_types_and_kwargs(config)
    assert layer_types == ["linear_attention", "linear_attention"] and len(kwargs) == 2


# ---------------------------------------------------------------- outputs
@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_outputs_and_hidden_states(tester, model_class):
    config, ids, mask, _, _ = tester.prepare_config_and_inputs()
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True, return_dict=True)
        as_tuple = model(ids, attention_mask=mask, output_hidden_states=True, return_dict=False)
        embeds = model.get_input_embeddings()(ids)
        from_embeds = model(inputs_embeds=embeds, attention_mask=mask, return_dict=True)
    b, L, H, V = tester.batch_size, tester.seq_length, tester.hidden_size, tester.vocab_size
    assert len(out.hidden_states) == tester.num_hidden_layers + 1
    assert all(h.shape == (b, L, H) for h in out.hidden_states)
    if model_class is CompreSSMMambaModel:
        main, main_from_embeds = out.last_hidden_state, from_embeds.last_hidden_state
        assert main.shape == (b, L, H)
        torch.testing.assert_close(out.hidden_states[-1], main)  # the last entry is after the final norm
    elif model_class is CompreSSMMambaForCausalLM:
        main, main_from_embeds = out.logits, from_embeds.logits
        assert main.shape == (b, L, V)
    else:
        main, main_from_embeds = out.logits, from_embeds.logits
        assert main.shape == (b, tester.num_labels)
    assert torch.isfinite(main).all()
    torch.testing.assert_close(as_tuple[0], main)
    torch.testing.assert_close(main_from_embeds, main)


def test_causal_lm_loss_is_shifted_cross_entropy(tester):
    config, ids, _, _, labels = tester.prepare_config_and_inputs()
    model = tester.build(CompreSSMMambaForCausalLM).eval()
    labels[0, :3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, tester.vocab_size), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_cache_shapes_per_layer(tester):
    config, ids, _, _, _ = tester.prepare_config_and_inputs()
    model = tester.build(CompreSSMMambaForCausalLM).eval()
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = out.cache
    assert isinstance(cache, DynamicCache) and len(cache.layers) == tester.num_hidden_layers
    D = config.intermediate_size
    for layer, size in enumerate(tester.state_sizes):
        assert cache.get_conv_state(layer, state_idx=0).shape == (tester.batch_size, D, config.conv_kernel)
        assert cache.get_recurrent_state(layer, state_idx=0).shape == (tester.batch_size, D, size)


# ---------------------------------------------------------------- generation
def test_generation_mixin_and_greedy_generate_matches_full_forward(tester):
    assert GenerationMixin in CompreSSMMambaForCausalLM.__bases__
    assert CompreSSMMambaForCausalLM.can_generate()
    _, ids, mask, _, _ = tester.prepare_config_and_inputs()
    model = tester.build(CompreSSMMambaForCausalLM, seed=1).eval()
    new = 6
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        uncached = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, use_cache=False)
        stepped = ids
        for _ in range(new):
            next_token = model(stepped, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            stepped = torch.cat([stepped, next_token], dim=1)
    assert cached.shape == (tester.batch_size, tester.seq_length + new)
    assert torch.equal(cached, stepped) and torch.equal(uncached, stepped)


# ---------------------------------------------------------------- save / load
@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_save_load_round_trip(tmp_path, tester, model_class):
    _, ids, mask, _, _ = tester.prepare_config_and_inputs()
    model = tester.build(model_class).eval()
    model.save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path).eval()
    assert loaded.config.state_sizes == [16, 8] and loaded.state_sizes() == [16, 8]
    assert [c.state_size for c in loaded.config.per_layer_config] == [16, 8]
    reference, restored = model.state_dict(), loaded.state_dict()
    assert reference.keys() == restored.keys()
    for key in reference:
        assert torch.equal(reference[key], restored[key]), key
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask)[0], loaded(ids, attention_mask=mask)[0])
    model, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_head_reinitialised_on_load_with_ignore_mismatched_sizes(tmp_path, tester):
    model = tester.build(CompreSSMMambaForSequenceClassification)
    model.save_pretrained(tmp_path)
    # Without the flag: transformers' own RuntimeError (not a ValueError about state sizes), with a hint.
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes") as info:
        AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    assert any("classifier.weight" in note for note in info.value.__notes__)
    # With it: a new 5-way head, every backbone tensor loaded unchanged.
    loaded, report = AutoModelForSequenceClassification.from_pretrained(
        tmp_path, num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert type(loaded) is CompreSSMMambaForSequenceClassification
    assert loaded.classifier.weight.shape == (5, tester.hidden_size) and loaded.config.num_labels == 5
    assert {key for key, _, _ in report["mismatched_keys"]} == {"classifier.weight", "classifier.bias"}
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[key], value), key


def test_ignore_mismatched_sizes_refused_for_ssm_tensors(tmp_path, tester):
    tester.build(CompreSSMMambaForSequenceClassification).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["state_sizes"] = [16, 4]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        CompreSSMMambaForSequenceClassification.from_pretrained(tmp_path, ignore_mismatched_sizes=True)
    message = str(info.value)
    assert "backbone.layers.1.mixer.A_log: checkpoint (32, 8) vs model (32, 4)" in message
    assert "backbone.layers.1.mixer.x_proj.weight" in message and "layers.0" not in message


def test_lm_checkpoint_into_classifier_initialises_only_the_head(tmp_path, tester):
    lm = tester.build(CompreSSMMambaForCausalLM)
    lm.save_pretrained(tmp_path)
    classifier, info = CompreSSMMambaForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}
    for key, value in lm.backbone.state_dict().items():
        assert torch.equal(classifier.backbone.state_dict()[key], value), key
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is CompreSSMMambaForCausalLM


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("model_class", [CompreSSMMambaForCausalLM, CompreSSMMambaForSequenceClassification])
def test_training_step(tester, model_class):
    _, ids, mask, sequence_labels, token_labels = tester.prepare_config_and_inputs()
    labels = token_labels if model_class is CompreSSMMambaForCausalLM else sequence_labels
    model = tester.build(model_class).train()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change"


def test_gradient_checkpointing_gives_the_same_gradients(tester):
    _, ids, _, _, labels = tester.prepare_config_and_inputs()
    grads = []
    for checkpointing in (False, True):
        model = tester.build(CompreSSMMambaForCausalLM).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.backbone.layers)
        model(ids, labels=labels).loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- classification head variants
def test_regression_head(tester):
    model = tester.build(CompreSSMMambaForSequenceClassification, num_labels=1).eval()
    _, ids, _, _, _ = tester.prepare_config_and_inputs()
    targets = torch.tensor([0.5, -1.0, 2.0])
    out = model(ids, labels=targets)
    assert out.logits.shape == (tester.batch_size, 1)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), targets))
    assert model.config.problem_type is None  # inferred, the config is not changed by a forward


def test_single_label_head(tester):
    config, ids, _, labels, _ = tester.prepare_config_and_inputs()
    model = tester.build(CompreSSMMambaForSequenceClassification, problem_type="single_label_classification").eval()
    out = model(ids, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    inferred = tester.build(CompreSSMMambaForSequenceClassification).eval()  # integer labels → cross-entropy
    out = inferred(ids, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))


def test_multi_label_head(tester):
    _, ids, _, _, _ = tester.prepare_config_and_inputs()
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    for overrides in ({"problem_type": "multi_label_classification"}, {}):
        model = tester.build(CompreSSMMambaForSequenceClassification, **overrides).eval()
        out = model(ids, labels=targets)
        torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, targets))


def test_multi_output_regression_head(tester):
    _, ids, _, _, _ = tester.prepare_config_and_inputs()
    model = tester.build(CompreSSMMambaForSequenceClassification, problem_type="regression").eval()
    targets = torch.randn(tester.batch_size, tester.num_labels, generator=torch.Generator().manual_seed(3))
    out = model(ids, labels=targets)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits, targets))
