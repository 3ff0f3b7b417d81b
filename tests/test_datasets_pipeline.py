"""The data through `datasets`: raw text loaders, the fixed split, tokenization map, block grouping, the Arrow cache,
streaming, and the pixel / synthetic tasks as Dataset objects, checked against the committed expected blocks and
items of ``tests/fixtures/data_pipeline.json`` (``tests/data_fixtures.py``: the inputs, and how they were made)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from data_fixtures import TEXTS, digest, lines_text

from compressssm_app import DataArguments, ModelArguments, UsageError, build_datasets
from compressssm_app import hf_datasets as H
from compressssm_app import sources as D


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Each test gets its own datasets cache (so cache hits are the test's own doing)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def expected():
    from data_fixtures import load

    return load()


def _expected_blocks(expected, name: str, part: str) -> dict:
    return expected["texts"][name][part]["blocks"]


def test_kjv_split_and_blocks_equal_the_fixture(expected):
    """The fixed split of the KJV rows and its byte blocks are those every result was measured on."""
    rows = H.load_raw_text("kjv")
    assert len(rows) == expected["kjv"]["rows"]
    train_rows, val_rows = H.split_by_characters(rows, 0.05)
    assert val_rows[0]["text"].startswith("Who hath delivered us from the power of darkness")  # Colossians 1:13
    tokenizer = D.build_byte_tokenizer()
    for part, part_rows in (("train", train_rows), ("validation", val_rows)):
        want = expected["kjv"][part]
        text = "".join(part_rows["text"])  # every row ends with a line break, the last one too
        assert (len(part_rows), len(text), text[:60]) == (want["rows"], want["characters"], want["head"])
        assert hashlib.sha256(text.encode()).hexdigest() == want["text_sha256"]
        blocks = H.group_blocks(H.tokenize_rows(part_rows, tokenizer), 256)
        assert digest(blocks[:]["input_ids"]) == want["blocks"]
        assert torch.equal(blocks[:]["labels"], blocks[:]["input_ids"])


def test_split_by_characters_at_a_row_boundary(tmp_path):
    text = lines_text() + "\n"
    (tmp_path / "lines.txt").write_text(text)
    train, val = H.split_by_characters(H.load_raw_text(tmp_path / "lines.txt"), 0.05)
    assert "".join(train["text"]) + "".join(val["text"]) == text
    assert val[0]["text"].startswith("line ") and 0.03 < sum(len(t) for t in val["text"]) / len(text) < 0.07
    with pytest.raises(ValueError):
        H.split_by_characters(H.load_raw_text(tmp_path / "lines.txt"), 0.0)


def test_blocks_continue_across_row_batches(tmp_path):
    """Grouping carries the remainder from one batch of rows to the next (no token dropped mid-stream)."""
    lines = [f"{'x' * (i % 37)} line {i}\n" for i in range(2500)]  # > 2 batches of 1000 rows
    path = tmp_path / "lines.txt"
    path.write_text("".join(lines))
    tokenizer = D.build_byte_tokenizer()
    blocks = H.group_blocks(H.tokenize_rows(H.load_raw_text(path), tokenizer), 50)
    flat = np.frombuffer("".join(lines).encode(), dtype=np.uint8).astype(np.int64)
    expected = torch.from_numpy(flat[: len(flat) // 50 * 50].reshape(-1, 50).copy())
    assert torch.equal(blocks[:]["input_ids"], expected)


@pytest.mark.compat
@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv"])
def test_local_files_through_load_dataset(tmp_path, kind, expected):
    docs = [f"document {i}: " + "lorem ipsum " * (i % 5 + 1) for i in range(40)]
    path = tmp_path / f"corpus.{kind}"
    if kind == "txt":
        path.write_text("\n".join(docs) + "\n")
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    else:
        path.write_text("id,body\n" + "".join(f'{i},"{d}"\n' for i, d in enumerate(docs)))
    rows = H.load_raw_text(path, text_column="body")
    assert rows.column_names == ["text"]
    assert rows["text"] == [d + "\n" for d in docs]
    args = DataArguments(train_file=[str(path)], text_column="body", block_size=16, validation_split_fraction=0.2)
    task = build_datasets(args, model_args=ModelArguments(tokenizer_name="byte"))
    assert TEXTS["lorem"][0]() == "".join(d + "\n" for d in docs)
    assert digest(task.train_dataset[:]["input_ids"]) == _expected_blocks(expected, "lorem", "train")
    assert digest(task.eval_dataset[:]["input_ids"]) == _expected_blocks(expected, "lorem", "validation")
    assert task.dataset_ids == [] and "corpus" in task.dataset_description


def test_bad_text_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        H.load_raw_text(tmp_path / "missing.txt")
    (tmp_path / "a.txt").write_text("a\n")
    (tmp_path / "b.csv").write_text("text\nb\n")
    with pytest.raises(ValueError, match="mixed file types"):
        H.load_raw_text([tmp_path / "a.txt", tmp_path / "b.csv"])
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="no column 'text'.*--text_column"):
        H.load_raw_text(tmp_path / "c.jsonl")
    with pytest.raises(UsageError, match="too long"):
        build_datasets(DataArguments(train_file=[str(tmp_path / "a.txt")], validation_file=[str(tmp_path / "a.txt")]))


_CACHE_PROBE = """
import sys, datasets
datasets.config.HF_DATASETS_CACHE = sys.argv[1]
datasets.disable_progress_bars()
from compressssm_app import DataArguments, build_datasets
task = build_datasets(DataArguments(train_file=[sys.argv[2]], block_size=32))
print([c["filename"] for c in task.train_dataset.cache_files])
"""


@pytest.mark.slow
def test_arrow_cache_reused_by_a_second_run(tmp_path, monkeypatch):
    """A second process with the same inputs reads this one's Arrow files instead of writing new ones (the
    fingerprints of the rows, the tokenizer and the grouping are the same across processes)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"verse {i} of a small corpus\n" for i in range(3000)))
    cache = tmp_path / "cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    task = build_datasets(DataArguments(train_file=[str(corpus)], block_size=32))
    first = str([c["filename"] for c in task.train_dataset.cache_files])
    assert "generator" in first
    arrow_files = sorted((str(p), p.stat().st_mtime_ns) for p in cache.rglob("*.arrow"))
    out = subprocess.run(
        [sys.executable, "-c", _CACHE_PROBE, str(cache), str(corpus)],
        cwd=REPO / "scripts",  # compressssm_app from the current folder
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == first
    assert sorted((str(p), p.stat().st_mtime_ns) for p in cache.rglob("*.arrow")) == arrow_files, "nothing rewritten"


@pytest.mark.compat
def test_streaming_is_lazy_and_matches_the_map_style_blocks(tmp_path, expected):
    corpus = tmp_path / "big.txt"
    corpus.write_text(TEXTS["stream5000"][0]())
    args = DataArguments(train_file=[str(corpus)], block_size=32, streaming=True, max_eval_samples=5)
    task = build_datasets(args, model_args=ModelArguments(tokenizer_name="byte"))
    assert isinstance(task.train_dataset, datasets.IterableDataset)
    assert not hasattr(task.train_dataset, "__len__") or isinstance(
        task.train_dataset, torch.utils.data.IterableDataset
    )
    reference = torch.tensor(expected["texts"]["stream5000"]["head"])  # the first 12 blocks of the whole text
    assert torch.equal(task.eval_dataset[:]["input_ids"], reference[:5]), "validation: the head of the stream"
    first = [row["input_ids"] for _, row in zip(range(7), task.train_dataset)]
    assert torch.equal(torch.stack(first), reference[5:12]), "training skips the held-out blocks"
    assert "first 5 blocks of the stream" in task.dataset_description
    with pytest.raises(ValueError, match="--streaming is for task causal_lm"):
        DataArguments(task="mqar", streaming=True)


@pytest.mark.slow
def test_streaming_training_run(tmp_path):
    """scripts/train.py --streaming on a generated file: trains max_steps steps, cuts, evaluates, saves."""
    corpus = tmp_path / "generated.txt"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    corpus.write_text("".join(" ".join(rng.choice(words, 8)) + "\n" for _ in range(20000)))
    out = tmp_path / "out"
    env = {"HF_DATASETS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "--preset", "tiny", "--streaming"]
    cmd += ["--train_file", str(corpus), "--max_steps", "8", "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    config = json.loads((out / "config.json").read_text())
    assert sum(config["state_sizes"]) < sum(config["compression"]["initial_state_sizes"])
    assert "of the stream" in json.loads((out / "compressssm_run.json").read_text())["card"]["eval_split"]
    # evaluate_model.py rebuilds the same held-out head of the stream and measures the same loss
    cmd = [sys.executable, str(REPO / "scripts" / "evaluate_model.py"), str(out), "--train_batch_size", "2"]
    cmd += ["--generate_tokens", "4"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "evaluation.json").read_text())
    trained = json.loads((out / "eval_results.json").read_text())
    assert report["quality"]["loss"] == pytest.approx(trained["eval_loss"], rel=1e-5)
    assert report["quality"]["perplexity"] == pytest.approx(trained["eval_perplexity"], rel=1e-5)


def test_streaming_needs_max_steps(tmp_path):
    from compressssm_app import parse_arguments, run_training

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i}\n" for i in range(500)))
    args = parse_arguments(
        ["--preset", "tiny", "--streaming", "--train_file", str(corpus), "--max_steps", "-1"]
        + ["--output_dir", str(tmp_path / "o")]
    )
    with pytest.raises(UsageError, match="--streaming needs --max_steps"):
        run_training(*args)
    assert not (tmp_path / "o").exists()


@pytest.mark.compat
def test_pixel_and_synthetic_tasks_as_datasets(expected):
    from data_fixtures import SYNTHETIC, SYNTHETIC_SAMPLES, SYNTHETIC_SEED, SYNTHETIC_SPLIT

    for split in ("train", "test"):
        pixels = D.load_pixel_classification("digits", split)
        ds = H.pixel_dataset(pixels)
        want = expected["digits"][split]
        assert isinstance(ds, datasets.Dataset) and ds.features["labels"].names == pixels.class_names
        assert pixels.class_names == want["class_names"]
        items = ds[:]
        assert items["input_ids"].dtype == torch.int64
        assert digest(items["input_ids"]) == want["input_ids"] and digest(items["labels"]) == want["labels"]
        assert torch.equal(items["input_ids"], pixels.tokens.long()) and torch.equal(items["labels"], pixels.labels)
        assert items["input_ids"][0].tolist() == want["first"]["input_ids"]
    for name, (task, kwargs) in SYNTHETIC.items():
        ds = H.synthetic_dataset(task, SYNTHETIC_SPLIT, seed=SYNTHETIC_SEED, num_samples=SYNTHETIC_SAMPLES, **kwargs)
        source = D.synthetic_task(task, SYNTHETIC_SPLIT, seed=SYNTHETIC_SEED, num_samples=SYNTHETIC_SAMPLES, **kwargs)
        want = expected["synthetic"][name]
        assert len(ds) == SYNTHETIC_SAMPLES
        assert digest(ds[:]["input_ids"]) == want["input_ids"] and digest(ds[:]["labels"]) == want["labels"]
        assert ds[0]["input_ids"].tolist() == want["first"]["input_ids"] == source[0]["input_ids"].tolist()
    task = build_datasets(DataArguments(task="selective_copying", num_train_samples=30, max_eval_samples=4))
    assert isinstance(task.train_dataset, datasets.Dataset) and len(task.eval_dataset) == 4
    assert task.vocab_size == D.SelectiveCopyingTask().model_vocab_size


def test_hub_name_goes_to_load_dataset(monkeypatch, expected):
    """A name that is not a local path is passed to load_dataset (name, config, split, streaming) and its
    --text_column is used; the card gets the Hub id."""
    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False, **kwargs):
        calls.append((path, name, split, streaming))
        return datasets.Dataset.from_dict({"content": [f"doc {i} " * 3 for i in range(200)], "id": list(range(200))})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    args = DataArguments(dataset_name="owner/corpus", dataset_config_name="en", text_column="content", block_size=16)
    task = build_datasets(args, model_args=ModelArguments(tokenizer_name="byte"))
    assert calls == [("owner/corpus", "en", "train", False)]
    assert task.dataset_ids == ["owner/corpus"] and "owner/corpus (en)" in task.dataset_description
    assert TEXTS["hub_docs"][0]() == "".join(f"doc {i} " * 3 + "\n" for i in range(200))
    assert digest(task.train_dataset[:]["input_ids"]) == _expected_blocks(expected, "hub_docs", "train")


@pytest.mark.compat
def test_tokenization_in_several_processes_gives_the_same_blocks(tmp_path, monkeypatch, expected):
    """map(num_proc=2) (--preprocessing_num_workers 2) shards the rows; the blocks are those of one process."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXTS["rows3000"][0]())
    tasks = []
    for workers in (None, 2):
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / f"cache-{workers}")  # no reuse
        args = DataArguments(train_file=[str(corpus)], block_size=24, preprocessing_num_workers=workers)
        tasks.append(build_datasets(args, model_args=ModelArguments(tokenizer_name="byte")))
    shards = [Path(c["filename"]).name for c in tasks[1].train_dataset.cache_files]
    assert shards == ["generator-train.arrow"]
    assert len(list((tmp_path / "cache-2").rglob("*_of_00002.arrow"))) >= 2, "the map ran in 2 processes"
    assert torch.equal(tasks[0].train_dataset[:]["input_ids"], tasks[1].train_dataset[:]["input_ids"])
    assert torch.equal(tasks[0].eval_dataset[:]["input_ids"], tasks[1].eval_dataset[:]["input_ids"])
    assert digest(tasks[1].train_dataset[:]["input_ids"]) == _expected_blocks(expected, "rows3000", "train")


def test_lm_eval_task_documents_are_the_validation_split(expected):
    """scripts/lm_eval_tasks/kjv_data.py (loaded by path, as lm-eval does) builds its documents from the KJV
    validation split of the train script."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kjv_data", REPO / "scripts" / "lm_eval_tasks" / "kjv_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    documents = module.load_validation(verses_per_document=100)["validation"]["text"]
    text = "".join(documents)
    assert len(documents) == -(-expected["kjv"]["validation"]["rows"] // 100)
    assert hashlib.sha256(text.encode()).hexdigest() == expected["kjv"]["validation"]["text_sha256"]
