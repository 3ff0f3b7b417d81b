"""The application's support package (``scripts/compressssm_app``; the scripts import it from their own folder).

What the scripts train and measure on: offline data sources and synthetic task generators (``sources``), the one
🤗 ``datasets`` pipeline over them (``hf_datasets``: loaders, tokenization map, blocks, cache, streaming), each task's
datasets (``task_data``), the train script's arguments (``arguments``) and the presets of every script
(``presets``: ``configs/presets/``), the launcher check (``launcher``), model building (``model_builder``), the run
and its output folder (``run``, ``output_dir``), evaluation helpers (``evaluation``), measured training runs
(``experiment``) and the benchmark harness (``harness``: results file, child processes, git state)."""

from .arguments import (
    PRESETS,
    TASKS,
    DataArguments,
    ModelArguments,
    UsageError,
    build_parser,
    parse_arguments,
    preset_defaults,
)
from .model_builder import build_model
from .run import RUN_FILE, eval_summary, planned_max_steps, run_info, run_training, validate_arguments
from .task_data import TaskData, build_datasets, resolve_tokenizer


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
