#!/usr/bin/env python
"""Render the model cards of the benchmark's models into ``model_cards/`` from the committed results.

    python scripts/render_model_cards.py                       # from scripts/results/benchmark.json
    python scripts/render_model_cards.py --results FILE --out DIR

For every preset of the report: the CompreSSM model of the first seed at the preset's main τ, rebuilt at its final
per-layer sizes (the architecture of ``configs/presets/benchmark/<preset>.yaml``; the weights are not part of a
card), with its cuts, its measured quality, a full / CompreSSM / from-scratch table of the same seed, the training
settings and the machine the runs were measured on. The card is rendered by `hf_compressssm.hub.render_model_card`
from the package's template (``hf_compressssm/hub/templates/``), as ``scripts/train.py`` writes it next to a model.
Writes ``<out>/<preset>.md`` (atomically); the output depends only on the results file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "scripts" / "results" / "benchmark.json"
OUT = REPO / "model_cards" / "benchmark"
PIXEL_BINS, PIXEL_CLASSES, BYTE_VOCAB = 256, 10, 257


def _run(runs: list[dict[str, Any]], variant: str, seed: int, tau: float | None = None) -> dict[str, Any] | None:
    for run in runs:
        if run["variant"] == variant and run["seed"] == seed and (tau is None or run.get("tau") == tau):
            return run
    return None


def _quality(run: dict[str, Any]) -> dict[str, float]:
    return {k: run["eval"][k] for k in ("loss", "perplexity", "accuracy") if k in run["eval"]}


def render_cards(results: dict[str, Any]) -> dict[str, str]:
    """The card text of each preset's main CompreSSM model (preset name → Markdown)."""
    from benchmark import TaskPreset, new_model

    from compressssm_app import TaskData
    from compressssm_app.presets import preset_into
    from hf_compressssm.hub.model_card import render_model_card

    meta = results["meta"]
    cards = {}
    for name, task in results["tasks"].items():
        fields = {k: v for k, v in task["preset"].items() if k in TaskPreset.__dataclass_fields__}
        preset = preset_into(TaskPreset, fields, f"{name} in the results file")
        seed = meta["seeds"][0]
        run = _run(task["runs"], "compressssm", seed, preset.main_tau)
        if run is None:
            continue
        classify = preset.task == "pixel_classification"
        stub = TaskData(
            task=preset.task,
            train_dataset=None,
            eval_dataset=None,
            vocab_size=PIXEL_BINS if classify else BYTE_VOCAB,
            metric="accuracy" if classify else "perplexity",
            dataset_description=task["data"],
            num_labels=PIXEL_CLASSES if classify else None,
        )
        model = new_model(stub, preset, seed, run["sizes_final"])
        history = [{**r, "mode": "tolerance", "tau": preset.main_tau} for r in run["reductions"]]
        model.config.compression = {
            "initial_state_sizes": run["sizes_initial"],
            "mode": "tolerance",
            "tau": preset.main_tau,
            "score": "h2",
            "selection": run.get("selection", "largest"),
            "schedule": [r["step"] for r in run["reductions"]],
        }
        model.compression_history = history
        comparison = {}
        for label, other in (
            (f"full size (N={preset.state_size})", _run(task["runs"], "full", seed)),
            ("this model (CompreSSM)", run),
            ("from scratch at these sizes", _run(task["runs"], "scratch", seed, preset.main_tau)),
        ):
            if other is not None:
                comparison[label] = {**_quality(other), "parameters": other["parameters_final"]}
        card = render_model_card(
            model,
            task=preset.task,
            model_name=f"CompreSSM benchmark: {name}",
            repo_id=f"path/to/{name}",
            dataset_description=task["data"],
            metrics=_quality(run),
            eval_split=task["eval_split"],
            training={
                "max_steps": preset.steps,
                "batch_size": preset.batch_size,
                "learning_rate": preset.learning_rate,
                "seed": seed,
                "train_seconds": round(run["train_seconds"], 1),
            },
            hardware=f"{meta['machine']}, one thread per run (torch {meta['torch']})",
            comparison=comparison,
            tags=["benchmark"],
        )
        cards[name] = str(card).rstrip() + "\n"
    return cards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(RESULTS), help="a benchmark.json written by scripts/benchmark.py")
    parser.add_argument("--out", default=str(OUT), help="the folder the cards go to")
    args = parser.parse_args(argv)
    results = json.loads(Path(args.results).read_text(encoding="utf-8"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in render_cards(results).items():
        path = out / f"{name}.md"
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
