"""Build the model a run trains: a new CompreSSM model, or one loaded (a stock Mamba is converted on the fly)."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedModel

from ..models.mamba import (
    CompreSSMMambaConfig,
    CompreSSMMambaForCausalLM,
    CompreSSMMambaForSequenceClassification,
)
from .arguments import ModelArguments, UsageError
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
