"""Command-line arguments of the training script: model and data dataclasses, presets, and the parser.

Everything that can fail because of the user's input is raised as :class:`UsageError`, which the scripts print as
one line; nothing has been written when it is raised.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser, TrainingArguments

from hf_compressssm.compression.arguments import CompressionArguments

from . import sources
from .presets import PresetError, preset_chain, preset_names


TASKS = ("causal_lm", "pixel_classification", "mqar", "selective_copying")
PRESETS = tuple(preset_names("train"))  # configs/presets/train/*.yaml
MODEL_TYPES = ("compressssm_mamba", "compressssm_mamba2")


class UsageError(ValueError):
    """Bad arguments, missing data or an impossible combination, found before anything was written."""


@dataclass
class ModelArguments:
    """Which model to train: a new one (architecture fields) or ``model_name_or_path`` (stock Mamba or ours)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Folder or Hub id of a stock Mamba (converted on the fly) or a CompreSSM Mamba model. "
            "When given, the architecture arguments below are ignored."
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "causal_lm only: 'byte' (257 tokens), 'bpe' (trained on the training text), or a tokenizer "
            "folder / Hub id. Default: the model's own tokenizer if it has one, else 'byte'."
        },
    )
    bpe_vocab_size: int = field(default=4096, metadata={"help": "Vocabulary size of --tokenizer_name bpe."})
    model_type: str = field(
        default="compressssm_mamba",
        metadata={
            "help": "Architecture of a new model: compressssm_mamba (Mamba-1) or compressssm_mamba2 (Mamba-2; "
            "causal_lm, mqar and selective_copying). --preset mamba2 sets it with the Mamba-2 defaults (N=128)."
        },
    )
    hidden_size: int = field(default=128, metadata={"help": "Model width of a new model."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Number of Mamba layers of a new model."})
    state_size: int = field(default=64, metadata={"help": "Initial SSM state size N of every layer (before cuts)."})
    expand: int = field(default=2, metadata={"help": "Inner width = expand * hidden_size."})
    conv_kernel: int = field(default=4, metadata={"help": "Width of the causal depthwise convolution."})
    time_step_rank: int | None = field(default=None, metadata={"help": "Rank of dt; default ceil(hidden_size / 16)."})
    head_dim: int = field(
        default=32, metadata={"help": "Mamba-2: channels per head (expand * hidden_size / head_dim heads)."}
    )
    n_groups: int = field(default=1, metadata={"help": "Mamba-2: groups of heads sharing B and C (divides the heads)."})
    chunk_size: int = field(default=256, metadata={"help": "Mamba-2: chunk length of the SSD scan."})
    classifier_pooling: str = field(default="mean", metadata={"help": "pixel_classification pooling: mean or last."})
    scan_backend: str = field(
        default="auto", metadata={"help": "Selective-scan kernel: auto, fast, torch, mambapy, mamba_ssm."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow remote code when loading the model."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a fresh run in a non-empty --output_dir, deleting the previous run's checkpoints and "
            "results there (by default a run of the same settings resumes from its newest complete checkpoint, a "
            "finished one is left alone, and any other non-empty folder is refused)."
        },
    )


@dataclass
class DataArguments:
    """What to train on. ``preset`` fills defaults of every argument group (explicit arguments win)."""

    task: str = field(default="causal_lm", metadata={"help": f"One of {', '.join(TASKS)}."})
    preset: str = field(
        default="default",
        metadata={
            "help": f"Defaults bundle, one of {', '.join(PRESETS)} ('tiny': a few steps of a tiny model, for tests)."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "causal_lm: 'kjv' (default, offline) or a Hugging Face dataset name; pixel_classification: "
            f"one of {', '.join(sources.PIXEL_DATASETS)}."
        },
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
    streaming: bool = field(
        default=False,
        metadata={
            "help": "causal_lm: read, tokenize and group the text lazily (an IterableDataset, for corpora larger than "
            "memory); needs --max_steps. Validation: --validation_file, else the first --max_eval_samples "
            "(default 100) blocks of the stream, which training skips."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "causal_lm: processes of the tokenization map (datasets num_proc)."}
    )
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
        if self.streaming and self.task != "causal_lm":
            raise ValueError(f"--streaming is for task causal_lm; task {self.task} builds its data in memory.")
        if self.preprocessing_num_workers is not None and self.preprocessing_num_workers < 1:
            raise ValueError(f"preprocessing_num_workers={self.preprocessing_num_workers} must be >= 1.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1.")


# The script's training defaults under every preset (configs/presets/train/*.yaml); field names are unique across
# the argument groups.
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
    log_level_replica="error",  # multi-process: the CompreSSM lines and warnings once, from the main process
    ddp_find_unused_parameters=False,  # every parameter gets a gradient (the callback reduces the cut ones itself)
)


def _preset_values(preset: str, task: str) -> dict[str, Any]:
    """The values of ``configs/presets/train/<preset>.yaml`` for ``task``: for each preset of its ``extends`` chain
    (the base first), its ``all`` values, then its ``tasks.<task>`` values."""
    values: dict[str, Any] = {}
    for layer in preset_chain("train", preset):
        values.update(layer.get("all") or {})
        values.update((layer.get("tasks") or {}).get(task) or {})
    return values


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
    try:
        values.update(_preset_values(preset, task))
    except PresetError as err:
        raise UsageError(str(err)) from err
    if isinstance(train_file, str):
        train_file = [train_file]
    name = dataset_name or values.get("dataset_name") or ("kjv" if task == "causal_lm" else task)
    if task == "causal_lm" and train_file and not dataset_name:
        name = Path(str(train_file[0])).stem
    name = str(name).replace("/", "-") or task
    values["output_dir"] = os.path.join(
        "outputs", f"compressssm-{name}" + ("" if preset == "default" else f"-{preset}")
    )
    return values


_GROUPS: tuple[tuple[type, str, str], ...] = (
    (ModelArguments, "Model", "A new model (architecture below) or --model_name_or_path."),
    (DataArguments, "Data", "The task and its data; --preset fills the defaults of every group."),
    (
        CompressionArguments,
        "CompreSSM compression",
        "When and how much the state sizes are cut (CompressionArguments).",
    ),
    (
        TrainingArguments,
        "Training (transformers.TrainingArguments)",
        "The Trainer's own arguments; the defaults shown are those of the chosen task and preset.",
    ),
)
_HELP_FLAGS = ("-h", "--help")


class CompreSSMArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` over (ModelArguments, DataArguments, CompressionArguments, TrainingArguments), one
    titled argument group per dataclass in that order, and no prefix abbreviations (``--max_step`` is an error,
    not ``--max_steps``)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("description", "Train a Mamba model with in-training CompreSSM state-size compression.")
        kwargs.setdefault(
            "usage", "%(prog)s [--task TASK] [--preset PRESET] [--ARGUMENT VALUE ...] | %(prog)s ARGS.yaml"
        )
        super().__init__([dtype for dtype, _, _ in _GROUPS], **kwargs)

    def _add_dataclass_arguments(self, dtype: type) -> None:
        title, description = next(((t, d) for c, t, d in _GROUPS if c is dtype), (None, None))
        if title is None:
            return super()._add_dataclass_arguments(dtype)
        titled = type(dtype.__name__, (dtype,), {"_argument_group_name": title, "__module__": dtype.__module__})
        super()._add_dataclass_arguments(titled)
        self._action_groups[-1].description = description


def build_parser() -> CompreSSMArgumentParser:
    """The train script's parser: dataclasses in the order (ModelArguments, DataArguments, CompressionArguments,
    TrainingArguments); `parse_arguments` applies the preset's defaults and returns them as
    (model, data, training, compression)."""
    return CompreSSMArgumentParser()


def _close_matches(parser: CompreSSMArgumentParser, unknown: Sequence[str]) -> str:
    import difflib

    options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    notes = []
    for flag in (u.split("=", 1)[0] for u in unknown if u.startswith("--")):
        close = difflib.get_close_matches(flag, options, n=2)
        notes.append(f"{flag}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    return ", ".join(notes) if notes else " ".join(unknown)


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
                values.get("task", "causal_lm"),
                values.get("preset", "default"),
                values.get("dataset_name"),
                values.get("train_file"),
            )
            parsed = parser.parse_dict({**defaults, **values})
        else:
            known, _ = parser.parse_known_args([a for a in argv if a not in _HELP_FLAGS])
            parser.set_defaults(**preset_defaults(known.task, known.preset, known.dataset_name, known.train_file))
            *parsed, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
            if unknown:
                raise UsageError(f"unknown argument(s): {_close_matches(parser, unknown)}; see --help.")
        model_args, data_args, comp_args, training_args = parsed
        return model_args, data_args, training_args, comp_args
    except UsageError:
        raise
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from err
