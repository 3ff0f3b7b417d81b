"""Model cards for CompreSSM models (pure Mamba-1 / Mamba-2 and the hybrid hosts), rendered from
``templates/compressssm_mamba.md`` with `huggingface_hub.ModelCard`.

The template ships inside the package (``hf_compressssm/hub/templates/``); ``template_path`` overrides it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.utils import logging


logger = logging.get_logger(__name__)

TEMPLATE_NAME = "compressssm_mamba.md"
CARD_FILE = "README.md"
BASE_TAGS = ("compressssm", "mamba", "state-space-model")

TASK_LABELS = {
    "causal_lm": "causal language",
    "pixel_classification": "pixel-sequence classification",
    "mqar": "multi-query associative recall",
    "selective_copying": "selective copying",
    "sequence_classification": "sequence classification",
}
CITATION = """@inproceedings{compressssm2026,
  title         = {The Curious Case of In-Training Compression of State Space Models},
  author        = {Chahine and Nazari and Rus and Rusch},
  booktitle     = {International Conference on Learning Representations (ICLR)},
  year          = {2026},
  eprint        = {2510.02823},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2510.02823}
}"""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_METRIC_LABELS = {"loss": "loss (nats/token)", "perplexity": "perplexity", "accuracy": "accuracy"}
# What the card says per SSM family (`SSMFamily.name`): label, stock class and converter, scan kernels.
_FAMILY_FACTS = {
    "mamba": {
        "family_label": "Mamba-1",
        "stock_class": "MambaForCausalLM",
        "to_stock": "to_mamba",
        "kernels": "The selective scan picks its kernel at run time: the `mamba_ssm` CUDA kernels when installed on a "
        "GPU, a numba CPU kernel when `numba` is installed, otherwise a pure PyTorch scan (correct, slower).",
    },
    "mamba2": {
        "family_label": "Mamba-2",
        "stock_class": "Mamba2ForCausalLM",
        "to_stock": "to_mamba2",
        "kernels": "The SSD scan is transformers' own: `mamba_ssm`'s kernels on a GPU when installed, otherwise the "
        "chunked PyTorch path (correct, slower). Each of the layer's groups keeps N states (B and C are groups x N).",
    },
}


def find_template(name: str = TEMPLATE_NAME, template_path: str | os.PathLike | None = None) -> Path:
    """Path of the card template; raises `FileNotFoundError` naming the places searched."""
    candidates: list[Path] = []
    if template_path is not None:
        candidates.append(Path(template_path))
    candidates.append(Path(__file__).resolve().parent / "templates" / name)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"model card template {name!r} not found (looked in: {', '.join(str(p) for p in candidates)}). Reinstall "
        "hf-compressssm, or pass template_path."
    )


def _hub_id(name: Any) -> str | None:
    """``name`` if it looks like a Hub repo id (``owner/name`` or ``name``), else None (e.g. a local path)."""
    if not isinstance(name, str) or not _HUB_ID.match(name) or os.path.exists(name):
        return None
    return name


def describe_hardware() -> str:
    """This machine in a few words, e.g. ``"CPU: Intel Xeon ... (2 cores), torch 2.13.0"`` or the GPU's name."""
    import platform

    import torch

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)} ×{torch.cuda.device_count()}, torch {torch.__version__}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), name)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU: {name} ({cores} cores available), torch {torch.__version__}"


def _task_of(model: Any, task: str | None) -> str:
    if task:
        return task
    name = type(model).__name__
    return "sequence_classification" if "SequenceClassification" in name else "causal_lm"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _layer_rows(
    initial: Sequence[int], final: Sequence[int], layers: Sequence[int] | None = None, kinds: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """One row per layer. ``initial`` / ``final``: the SSM layers' sizes; ``layers``: their indices among ``kinds``
    (every layer's type, for a hybrid: its other layers get a row without sizes)."""
    if layers is None:
        return [
            {"layer": i, "initial": a, "final": b, "kept": f"{b / a:.0%}" if a else "-"}
            for i, (a, b) in enumerate(zip(initial, final))
        ]
    sizes = dict(zip(layers, zip(initial, final)))
    rows = []
    for i, kind in enumerate(kinds):
        a, b = sizes.get(i, ("–", "–"))
        kept = f"{b / a:.0%}" if i in sizes and a else "–"
        rows.append({"layer": i, "kind": "Mamba-2" if i in sizes else kind, "initial": a, "final": b, "kept": kept})
    return rows


def _hybrid_facts(model: Any, family: Any) -> dict[str, Any]:
    """What the card says about a hybrid host (`families.mamba2.Mamba2Host`) instead of a pure family."""
    config = model.config
    stock = getattr(model, "stock_model_class", None)
    kinds = [str(k).replace("_", " ") for k in config.layer_types]
    ssm = config.ssm_layers()
    return {
        "family_label": f"hybrid {family.host.title}",
        "stock_class": stock.__name__ if stock is not None else family.host.stock_model_type,
        "to_stock": "to_stock",
        "kernels": f"The attention, MLP / MoE and Mamba-2 modules are the stock transformers modules of "
        f"{family.host.title} (its kernels, its hybrid cache); only the Mamba layers' B/C projections and "
        "convolution channels are smaller. Each of a Mamba layer's groups keeps N states.",
        "hybrid": True,
        "layer_kinds": kinds,
        "ssm_layer_indices": ssm,
        "num_ssm_layers": len(ssm),
        "sizes_field": "config.mamba_state_sizes",
        "intermediate_size": int(getattr(config, "mamba_expand", None) or getattr(config, "expand", 2))
        * config.hidden_size,
    }


def _attempts(record: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    entries = record.get("history") or [e for e in history if not e.get("rolled_back")]
    for entry in entries:
        before, after = entry.get("sizes_before"), entry.get("sizes_after")
        if entry.get("skipped"):
            outcome = f"skipped ({entry['skipped']})"
        elif before == after:
            outcome = "no layer below the gate"
        else:
            outcome = "cut"
        step = entry.get("step")
        rows.append(
            {
                "step": "post hoc" if step is None else step,
                "sizes_before": before,
                "sizes_after": after,
                "outcome": outcome,
            }
        )
    return rows


def render_model_card(
    model: Any,
    *,
    task: str | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    dataset_description: str | None = None,
    datasets: Iterable[str] | None = None,
    metrics: Mapping[str, float] | None = None,
    eval_split: str | None = None,
    speed: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    hardware: str | None = None,
    comparison: Mapping[str, Mapping[str, Any]] | None = None,
    local_path: str | os.PathLike | None = None,
    license: str = "apache-2.0",
    tags: Iterable[str] = (),
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """Render the card of a CompreSSM model.

    Args:
        model: a CompreSSM model, pure (Mamba-1, Mamba-2) or a hybrid host (Granite 4.0-H, Bamba, Nemotron-H,
            Zamba2: the layer table then lists every layer with its type, sizes on the Mamba layers); its config
            gives the per-layer sizes, τ, schedule and ``base_model``.
        task: ``causal_lm``, ``pixel_classification``, ``mqar``, ``selective_copying`` (default: from the class).
        repo_id: Hub id shown in the loading snippets (default: ``local_path``, the folder the card is saved in).
        dataset_description / datasets: free text, and dataset ids for the YAML ``datasets`` field.
        metrics: measured quality, e.g. ``{"loss": 1.4, "perplexity": 4.1}`` or ``{"accuracy": 0.83}``.
        speed: measured throughput, e.g. ``{"train tokens/s (cpu)": 5400.0}``.
        training: training settings shown as a table (``max_steps`` is also shown with the schedule).
        hardware: where timings and speeds were measured (default: this machine, `describe_hardware`, when the card
            shows a timing or a speed).
        comparison: measured rows, e.g. ``{"full model (N=64)": {"perplexity": 4.0, "parameters": 900000},
            "this model": {...}}``: a full-vs-compressed table (shown only when given).
    """
    from ..families import family_of

    config = model.config
    ssm_family = family_of(model)
    family = ssm_family.name
    host = getattr(ssm_family, "host", None)
    if host is not None and host.name != "mamba2":
        facts = _hybrid_facts(model, ssm_family)
    else:
        facts = {
            **_FAMILY_FACTS.get(family, _FAMILY_FACTS["mamba"]),
            "hybrid": False,
            "sizes_field": "config.state_sizes",
        }
        facts["intermediate_size"] = getattr(config, "intermediate_size", None) or int(
            config.expand * config.hidden_size
        )
    task = _task_of(model, task)
    record = dict(getattr(config, "compression", None) or {})
    history = list(getattr(model, "compression_history", None) or [])
    final = list(getattr(config, "state_sizes", None) or [config.state_size] * config.num_hidden_layers)
    initial = list(record.get("initial_state_sizes") or (history[0]["sizes_before"] if history else final))
    settings = {k: record.get(k) for k in ("mode", "tau", "score", "selection", "schedule")}
    if "tau" not in record and history:  # post-hoc compress_model: settings from the reports, when recorded
        settings = {k: history[-1].get(k, "-") for k in settings}
        settings["schedule"] = "post hoc (`compress_model`)"
    base_model = record.get("base_model")
    is_causal_lm = "SequenceClassification" not in type(model).__name__
    metric_names = sorted({"perplexity" if k in ("loss", "perplexity") else k for k in (metrics or {})})
    default_name = f"CompreSSM {host.title}" if facts["hybrid"] else "CompreSSM Mamba"
    name = model_name or (repo_id.split("/")[-1] if repo_id else default_name)

    eval_results = None
    if metrics and datasets:  # the model-index names a Hub dataset id; data without one is described in the body
        eval_results = [
            EvalResult(
                task_type="text-generation" if is_causal_lm else "text-classification",
                dataset_type=list(datasets)[0],
                dataset_name=list(datasets)[0],
                metric_type=key,
                metric_value=float(value),
                dataset_split="validation" if task == "causal_lm" else "test",
            )
            for key, value in metrics.items()
            if key in ("perplexity", "accuracy")
        ] or None
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        tags=list(dict.fromkeys([*BASE_TAGS, family, *tags, task.replace("_", "-")])),
        datasets=list(datasets) if datasets else None,
        metrics=metric_names or None,
        base_model=_hub_id(base_model),
        pipeline_tag="text-generation" if task == "causal_lm" else None,
        model_name=name if eval_results else None,
        eval_results=eval_results,
    )
    training = dict(training or {})
    has_tokenizer = task == "causal_lm"
    if hardware is None and (speed or "train_seconds" in training):
        hardware = describe_hardware()
    columns = list(dict.fromkeys(k for row in (comparison or {}).values() for k in row))
    comparison_rows = [(name, [_fmt(row.get(k, "–")) for k in columns]) for name, row in (comparison or {}).items()]
    load_from = repo_id or (str(local_path) if local_path is not None else "path/to/model")
    card = ModelCard.from_template(
        card_data,
        template_path=str(find_template(template_path=template_path)),
        model_name=name,
        repo_id=load_from,
        hardware=hardware,
        comparison_columns=columns,
        comparison_rows=comparison_rows,
        citation=CITATION,
        task_label=TASK_LABELS.get(task, task.replace("_", " ")),
        base_model=base_model,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        **facts,
        vocab_size=config.vocab_size,
        num_labels=config.num_labels if not is_causal_lm else None,
        pooling=getattr(config, "classifier_pooling", "mean"),
        num_parameters=f"{sum(p.numel() for p in model.parameters()):,}",
        dataset_description=dataset_description or "not recorded",
        layers=_layer_rows(initial, final, facts.get("ssm_layer_indices"), facts.get("layer_kinds", ())),
        mean_initial=f"{sum(initial) / len(initial):.1f}",
        mean_final=f"{sum(final) / len(final):.1f}",
        mean_kept=f"{sum(final) / max(1, sum(initial)):.0%}",
        state_size=config.state_size,
        compression=settings if ("tau" in record or history) else None,
        attempts=_attempts(record, history),
        metrics=[(_METRIC_LABELS.get(k, k), _fmt(v)) for k, v in (metrics or {}).items()],
        eval_split=eval_split or ("the fixed validation split" if task == "causal_lm" else "the held-out split"),
        speed=[(k, _fmt(v)) for k, v in (speed or {}).items()],
        training=training,
        training_rows=[(k.replace("_", " "), _fmt(v)) for k, v in training.items()],
        auto_class="AutoModelForCausalLM" if is_causal_lm else "AutoModelForSequenceClassification",
        has_tokenizer=has_tokenizer,
        is_causal_lm=is_causal_lm and task == "causal_lm",
        uniform_sizes=len(set(final)) == 1,
        prompt="In the beginning",
    )
    return ModelCard(re.sub(r"\n{3,}", "\n\n", str(card)))  # sections left out leave no blank runs


def save_model_card(model: Any, directory: str | os.PathLike, **kwargs: Any) -> Path:
    """Render the card (see `render_model_card`) and write it to ``directory/README.md``; returns the path."""
    kwargs.setdefault("local_path", str(directory))
    card = render_model_card(model, **kwargs)
    os.makedirs(directory, exist_ok=True)
    path = Path(directory) / CARD_FILE
    tmp = path.with_name(f"{CARD_FILE}.tmp-{os.getpid()}")
    card.save(tmp)
    os.replace(tmp, path)  # never a half-written card
    return path


__all__ = [
    "BASE_TAGS",
    "CARD_FILE",
    "CITATION",
    "TEMPLATE_NAME",
    "describe_hardware",
    "find_template",
    "render_model_card",
    "save_model_card",
]
