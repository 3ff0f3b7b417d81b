"""model_cards/: the committed cards of the benchmark's models are what scripts/render_model_cards.py renders from
the committed results (scripts/results/benchmark.json), with the measured numbers in them."""

import importlib
import json
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent
CARDS = REPO / "model_cards" / "benchmark"


@pytest.fixture(scope="module")
def rendered():
    results = json.loads((REPO / "scripts" / "results" / "benchmark.json").read_text(encoding="utf-8"))
    return results, importlib.import_module("render_model_cards").render_cards(results)


def test_committed_cards_equal_the_rendered_ones(rendered):
    _, cards = rendered
    assert sorted(cards) == sorted(p.stem for p in CARDS.glob("*.md"))
    for name, text in cards.items():
        assert (CARDS / f"{name}.md").read_text(encoding="utf-8") == text, (
            f"model_cards/benchmark/{name}.md is out of date: run python scripts/render_model_cards.py"
        )


def test_cards_carry_the_measured_numbers(rendered):
    results, cards = rendered
    seed = results["meta"]["seeds"][0]
    for name, task in results["tasks"].items():
        tau = task["preset"]["main_tau"]
        run = next(r for r in task["runs"] if r["variant"] == "compressssm" and r["seed"] == seed and r["tau"] == tau)
        text = cards[name]
        assert text.startswith("---\nlibrary_name: transformers\n")
        for layer, (before, after) in enumerate(zip(run["sizes_initial"], run["sizes_final"])):
            assert f"| {layer} | {before} | {after} |" in text
        metric = "accuracy" if "accuracy" in run["eval"] else "perplexity"
        assert f"{run['eval'][metric]:.3f}" in text
        assert f"{run['parameters_final']:,}" in text
        for reduction in run["reductions"]:
            assert f"| {reduction['step']} | {reduction['sizes_before']} | {reduction['sizes_after']} |" in text
