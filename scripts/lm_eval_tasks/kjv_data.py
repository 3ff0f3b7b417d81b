"""Documents of the lm-eval task ``kjv_validation``: the fixed KJV validation split of ``scripts/train.py``."""

import os
import sys


def load_validation(verses_per_document: int = 100, validation_split_fraction: float = 0.05, **_ignored):
    """``{"validation": datasets.Dataset}`` whose ``text`` rows are consecutive groups of validation verses.

    The split is `hf_compressssm.data.split_text` of the KJV text (the tail, Colossians 1:13 to Revelation), so the
    numbers are comparable with the validation perplexity printed by the train script (per token there, per word
    and per byte here).
    """
    import datasets

    try:
        from hf_compressssm.data import load_kjv_text, split_text
    except ImportError:  # a source checkout that is not installed: the package is two folders up
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        from hf_compressssm.data import load_kjv_text, split_text

    _, validation = split_text(load_kjv_text(), validation_split_fraction)
    lines = validation.splitlines(keepends=True)
    step = max(1, int(verses_per_document))
    documents = ["".join(lines[i : i + step]) for i in range(0, len(lines), step)]
    return {"validation": datasets.Dataset.from_dict({"text": documents})}
