"""Inputs and expected outputs of the data pipeline (`compressssm_app.hf_datasets`), kept as a committed fixture.

The expected values (``tests/fixtures/data_pipeline.json``) were generated once with ``python tests/data_fixtures.py``
at the commit where the pipeline was checked equal to the in-memory reference implementation it replaced (plain
string split + byte encoding + torch Datasets). Regenerate only for a deliberate change of the data, and say so:
the blocks, pixel tokens and synthetic sequences are what every result of the scripts was measured on.

Blocks, token arrays and sequences are compared by shape and SHA-256 of their int64 bytes (`digest`); a few items are
stored in full so that a failure shows what changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch


FIXTURE = Path(__file__).resolve().parent / "fixtures" / "data_pipeline.json"


def lines_text(n: int = 200) -> str:
    return "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(n))


def lorem_docs() -> list[str]:
    return [f"document {i}: " + "lorem ipsum " * (i % 5 + 1) for i in range(40)]


# Text corpora (the concatenation of their rows, each row ending with a line break) with the split fraction and the
# block size the tests use; "all" is the whole text (streaming), not split.
TEXTS: dict[str, tuple[Any, float | None, int]] = {
    "lorem": (lambda: "".join(d + "\n" for d in lorem_docs()), 0.2, 16),
    "hub_docs": (lambda: "".join(f"doc {i} " * 3 + "\n" for i in range(200)), 0.05, 16),
    "rows3000": (lambda: "".join(f"row {i}: " + "abc " * (i % 7) + "\n" for i in range(3000)), 0.05, 24),
    "stream5000": (lambda: "".join(f"line {i}: the quick brown fox\n" for i in range(5000)), None, 32),
}
SYNTHETIC: dict[str, tuple[str, dict[str, int]]] = {
    "mqar": ("mqar", dict(seq_len=64, vocab_size=64, num_pairs=8, num_queries=8)),
    "selective_copying": ("selective_copying", {}),
}
SYNTHETIC_SPLIT, SYNTHETIC_SEED, SYNTHETIC_SAMPLES = "validation", 3, 20


def digest(array: Any) -> dict[str, Any]:
    """Shape and SHA-256 of an integer array or tensor as int64."""
    values = np.ascontiguousarray(torch.as_tensor(array).numpy().astype(np.int64))
    return {"shape": list(values.shape), "sha256": hashlib.sha256(values.tobytes()).hexdigest()}


def text_rows(text: str, path: Path):
    """``text`` written to ``path`` and read back as rows by the pipeline."""
    from compressssm_app import hf_datasets as H

    path.write_text(text, encoding="utf-8")
    return H.load_raw_text(path)


def expected_text(name: str, folder: Path) -> dict[str, Any]:
    """The byte-tokenizer blocks of ``TEXTS[name]`` (train/validation after the character split, or all)."""
    from compressssm_app import hf_datasets as H
    from compressssm_app import sources as D

    make, fraction, block = TEXTS[name]
    rows = text_rows(make(), folder / f"{name}.txt")
    tokenizer = D.build_byte_tokenizer()
    if fraction is None:
        blocks = H.group_blocks(H.tokenize_rows(rows, tokenizer), block)[:]["input_ids"]
        return {"all": digest(blocks), "head": blocks[:12].tolist()}
    out: dict[str, Any] = {}
    for part, part_rows in zip(("train", "validation"), H.split_by_characters(rows, fraction)):
        blocks = H.group_blocks(H.tokenize_rows(part_rows, tokenizer), block)[:]["input_ids"]
        out[part] = {"characters": sum(len(t) for t in part_rows["text"]), "blocks": digest(blocks)}
    return out


def expected_kjv() -> dict[str, Any]:
    from compressssm_app import hf_datasets as H
    from compressssm_app import sources as D

    rows = H.load_raw_text("kjv")
    tokenizer = D.build_byte_tokenizer()
    out: dict[str, Any] = {"rows": len(rows)}
    for part, part_rows in zip(("train", "validation"), H.split_by_characters(rows, 0.05)):
        text = "".join(part_rows["text"])
        blocks = H.group_blocks(H.tokenize_rows(part_rows, tokenizer), 256)[:]["input_ids"]
        out[part] = {
            "rows": len(part_rows),
            "characters": len(text),
            "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "head": text[:60],
            "blocks": digest(blocks),
        }
    return out


def expected_digits() -> dict[str, Any]:
    from compressssm_app import hf_datasets as H
    from compressssm_app import sources as D

    out: dict[str, Any] = {}
    for split in ("train", "test"):
        ds = H.pixel_dataset(D.load_pixel_classification("digits", split))
        items = ds[:]
        out[split] = {
            "class_names": ds.features["labels"].names,
            "input_ids": digest(items["input_ids"]),
            "labels": digest(items["labels"]),
            "first": {"input_ids": items["input_ids"][0].tolist(), "label": int(items["labels"][0])},
        }
    return out


def expected_synthetic(name: str) -> dict[str, Any]:
    from compressssm_app import hf_datasets as H

    task, kwargs = SYNTHETIC[name]
    ds = H.synthetic_dataset(task, SYNTHETIC_SPLIT, seed=SYNTHETIC_SEED, num_samples=SYNTHETIC_SAMPLES, **kwargs)
    items = ds[:]
    return {
        "input_ids": digest(items["input_ids"]),
        "labels": digest(items["labels"]),
        "first": {"input_ids": items["input_ids"][0].tolist(), "labels": items["labels"][0].tolist()},
    }


def generate() -> dict[str, Any]:
    import tempfile

    import datasets

    with tempfile.TemporaryDirectory() as tmp:
        datasets.config.HF_DATASETS_CACHE = str(Path(tmp) / "cache")
        datasets.disable_progress_bars()
        return {
            "kjv": expected_kjv(),
            "texts": {name: expected_text(name, Path(tmp)) for name in TEXTS},
            "digits": expected_digits(),
            "synthetic": {name: expected_synthetic(name) for name in SYNTHETIC},
        }


def load() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


if __name__ == "__main__":
    FIXTURE.write_text(json.dumps(generate(), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {FIXTURE}")
