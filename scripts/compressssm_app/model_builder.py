"""Build the model a run trains: a new CompreSSM model, or one loaded (a stock Mamba / Mamba-2 is converted on the
fly); `build_granite_hybrid_model`: a new Granite-4.0-H-shaped hybrid for the benchmark's hybrid preset."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import AutoConfig, PreTrainedModel

from hf_compressssm.models import (
    CompreSSMGraniteMoeHybridConfig,
    CompreSSMGraniteMoeHybridForCausalLM,
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


def _shared_config_values(model_args: ModelArguments, task_data: TaskData) -> dict[str, Any]:
    """The config values both families take from the arguments and the data: sizes, special tokens."""
    values: dict[str, Any] = dict(
        vocab_size=task_data.vocab_size,
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        state_size=model_args.state_size,
        expand=model_args.expand,
        conv_kernel=model_args.conv_kernel,
    )
    if model_args.time_step_rank is not None:
        values["time_step_rank"] = model_args.time_step_rank
    values.update(task_data.special_token_ids or {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0})
    return values


def _new_config(model_args: ModelArguments, task_data: TaskData) -> CompreSSMMambaConfig:
    values = _shared_config_values(model_args, task_data)
    values.update(classifier_pooling=model_args.classifier_pooling, scan_backend=model_args.scan_backend)
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
    values = _shared_config_values(model_args, task_data)
    values.update(
        num_heads=heads, head_dim=model_args.head_dim, n_groups=model_args.n_groups, chunk_size=model_args.chunk_size
    )
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


def build_granite_hybrid_model(
    task_data: TaskData,
    *,
    hidden_size: int,
    layer_pattern: str,
    state_size: int,
    head_dim: int,
    n_groups: int,
    chunk_size: int,
    attention_heads: int,
    kv_heads: int,
    attention_head_dim: int,
    experts: int,
    experts_per_token: int,
    expert_size: int,
    shared_mlp_size: int,
    max_positions: int,
    state_sizes: Sequence[int] | None = None,
) -> CompreSSMGraniteMoeHybridForCausalLM:
    """A new Granite 4.0-H-shaped hybrid (`CompreSSMGraniteMoeHybridForCausalLM`) for a causal-LM task.

    ``layer_pattern``: one letter per layer, M (a Mamba-2 layer: heads of ``head_dim`` channels over the inner width
    2·hidden, ``n_groups`` groups, ``state_size`` states) or A (attention: ``attention_heads`` heads of
    ``attention_head_dim``, ``kv_heads`` KV heads, scaled by 1/head_dim, no position embeddings (NoPE), as Granite
    4.0-H). ``experts``: routed MoE experts per layer (0: the dense shared MLP only). Embeddings tied.
    ``state_sizes``: one size per Mamba layer (None: ``state_size`` everywhere)."""
    if set(layer_pattern) - {"M", "A"} or "M" not in layer_pattern:
        raise UsageError(f"layer_pattern={layer_pattern!r}: one letter M (Mamba) or A (attention) per layer, one M.")
    config = CompreSSMGraniteMoeHybridConfig(
        vocab_size=task_data.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=len(layer_pattern),
        layer_types=["mamba" if c == "M" else "attention" for c in layer_pattern],
        num_attention_heads=attention_heads,
        num_key_value_heads=kv_heads,
        head_dim=attention_head_dim,
        attention_multiplier=1.0 / attention_head_dim,
        position_embedding_type="nope",
        max_position_embeddings=max_positions,
        mamba_n_heads=2 * hidden_size // head_dim,
        mamba_d_head=head_dim,
        mamba_n_groups=n_groups,
        mamba_d_state=state_size,
        mamba_chunk_size=chunk_size,
        num_local_experts=experts,
        num_experts_per_tok=experts_per_token,
        intermediate_size=expert_size,
        shared_intermediate_size=shared_mlp_size,
        tie_word_embeddings=True,
        **(task_data.special_token_ids or {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}),
    )
    return CompreSSMGraniteMoeHybridForCausalLM(config if state_sizes is None else config.with_state_sizes(state_sizes))
