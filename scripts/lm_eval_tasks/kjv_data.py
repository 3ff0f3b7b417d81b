"""Documents of the lm-eval task ``kjv_validation``: the fixed KJV validation split of ``scripts/train.py``."""

import importlib.util
import sys
from pathlib import Path


def _app():
    """``compressssm_app`` (``scripts/compressssm_app``), imported from its folder: lm-eval loads this file by path,
    so the scripts' folder is not on ``sys.path``."""
    if "compressssm_app" not in sys.modules:
        folder = Path(__file__).resolve().parents[1] / "compressssm_app"
        spec = importlib.util.spec_from_file_location(
            "compressssm_app", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["compressssm_app"] = module
        spec.loader.exec_module(module)
    return sys.modules["compressssm_app"]


def load_validation(verses_per_document: int = 100, validation_split_fraction: float = 0.05, **_ignored):
    """``{"validation": datasets.Dataset}`` whose ``text`` rows are consecutive groups of validation verses.

    The split is the train script's (`compressssm_app.hf_datasets.split_by_characters` of the KJV rows: the tail,
    Colossians 1:13 to Revelation), so the numbers are comparable with the validation perplexity printed by the
    train script (per token there, per word and per byte here).
    """
    import datasets

    _app()
    from compressssm_app.hf_datasets import load_raw_text, split_by_characters

    _, validation = split_by_characters(load_raw_text("kjv"), validation_split_fraction)
    lines = validation["text"]
    step = max(1, int(verses_per_document))
    documents = ["".join(lines[i : i + step]) for i in range(0, len(lines), step)]
    return {"validation": datasets.Dataset.from_dict({"text": documents})}
