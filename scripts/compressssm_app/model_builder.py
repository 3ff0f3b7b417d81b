"""Build the model a run trains: a new CompreSSM model, or one loaded (a stock Mamba / Mamba-2 is converted on the
fly)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import AutoConfig, PreTrainedModel

from hf_compressssm.models import (
    CompreSSMMamba2Config,
    CompreSSMMamba2ForCausalLM,
    CompreSSMMambaConfig,
    CompreSSMMambaForCausalLM,
    CompreSSMMambaForSequenceClassification,
)

from .arguments import MODEL_TYPES, ModelArguments, UsageError
from .task_data import TaskData


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


def _new_mamba2_config(model_args: ModelArguments, task_data: TaskData) -> CompreSSMMamba2Config:
    inner = model_args.expand * model_args.hidden_size
    if model_args.head_dim < 1 or inner % model_args.head_dim:
        raise UsageError(
            f"--head_dim {model_args.head_dim} must divide the inner width expand * hidden_size = {inner}."
        )
    heads = inner // model_args.head_dim
    if model_args.n_groups < 1 or heads % model_args.n_groups:
        raise UsageError(f"--n_groups {model_args.n_groups} must divide the number of heads ({heads}).")
    values: dict[str, Any] = dict(
        vocab_size=task_data.vocab_size,
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        state_size=model_args.state_size,
        expand=model_args.expand,
        conv_kernel=model_args.conv_kernel,
        num_heads=heads,
        head_dim=model_args.head_dim,
        n_groups=model_args.n_groups,
        chunk_size=model_args.chunk_size,
    )
    if model_args.time_step_rank is not None:
        values["time_step_rank"] = model_args.time_step_rank
    values.update(task_data.special_token_ids or {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0})
    return CompreSSMMamba2Config(**values)


def build_model(
    model_args: ModelArguments, task_data: TaskData, state_sizes: Sequence[int] | None = None
) -> PreTrainedModel:
    """A CompreSSM model for the task: new from the architecture arguments (with per-layer ``state_sizes`` when
    given, e.g. a model trained from scratch at a compressed model's sizes), or loaded from ``model_name_or_path``
    (a stock ``mamba`` checkpoint is converted with ``from_mamba``; ``base_model`` is recorded in the config)."""
    classify = task_data.task == "pixel_classification"
    source = model_args.model_name_or_path
    if model_args.model_type not in MODEL_TYPES:
        raise UsageError(f"unknown --model_type {model_args.model_type!r}; choose one of {', '.join(MODEL_TYPES)}.")
    if source is not None and state_sizes is not None:
        raise UsageError("state_sizes are for a new model; a loaded model has its own.")
    if source is None and model_args.model_type == CompreSSMMamba2Config.model_type:
        if classify:
            raise UsageError("pixel_classification needs a Mamba-1 model: use --model_type compressssm_mamba.")
        config = _new_mamba2_config(model_args, task_data)
        return CompreSSMMamba2ForCausalLM(config if state_sizes is None else config.with_state_sizes(state_sizes))
    if source is None:
        config = _new_config(model_args, task_data)
        cls = CompreSSMMambaForSequenceClassification if classify else CompreSSMMambaForCausalLM
        return cls(config if state_sizes is None else config.with_state_sizes(state_sizes))
    kwargs = dict(trust_remote_code=model_args.trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load a model config from {source!r}: {err}") from err
    mamba2_types = ("mamba2", CompreSSMMamba2Config.model_type)
    if config.model_type not in ("mamba", CompreSSMMambaConfig.model_type, *mamba2_types):
        raise UsageError(
            f"{source} is a {config.model_type!r} model; CompreSSM compresses Mamba-1 models (model_type 'mamba' "
            f"or '{CompreSSMMambaConfig.model_type}') and Mamba-2 models ('mamba2' or "
            f"'{CompreSSMMamba2Config.model_type}')."
        )
    if config.model_type in mamba2_types and classify:
        raise UsageError(f"{source} is a Mamba-2 model; pixel_classification needs a Mamba-1 model.")
    if config.vocab_size < task_data.vocab_size:
        raise UsageError(
            f"{source} has vocab_size={config.vocab_size} but the data uses {task_data.vocab_size} token ids; "
            "use the model's own tokenizer (omit --tokenizer_name) or a smaller one."
        )
    try:
        if config.model_type == "mamba2":
            return CompreSSMMamba2ForCausalLM.from_mamba2(source, **kwargs)
        if config.model_type == CompreSSMMamba2Config.model_type:
            return CompreSSMMamba2ForCausalLM.from_pretrained(source, **kwargs)
        if config.model_type == "mamba":
            lm = CompreSSMMambaForCausalLM.from_mamba(source, **kwargs)
            if not classify:
                return lm
            new_config = CompreSSMMambaConfig.from_dict(
                {
                    **lm.config.to_dict(),
                    "num_labels": task_data.num_labels,
                    "classifier_pooling": model_args.classifier_pooling,
                }
            )
            model = CompreSSMMambaForSequenceClassification(new_config)
            model.backbone.load_state_dict(lm.backbone.state_dict())
            return model
        cls = CompreSSMMambaForSequenceClassification if classify else CompreSSMMambaForCausalLM
        extra = {"num_labels": task_data.num_labels} if classify else {}
        return cls.from_pretrained(source, **kwargs, **extra)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load the model from {source!r}: {err}") from err
