"""The metrics of the tasks as ``evaluate`` modules shipped with the package (they work offline).

``load("accuracy" | "perplexity" | "token_accuracy")`` is ``evaluate.load(<this folder>/<name>)``: the module is
loaded by path, so no Hub lookup happens. The functions below connect them to the ``Trainer``:
``preprocess_logits_for_metrics`` reduces each batch's logits to what the metric needs (argmax ids, or per-sequence
summed token losses), ``compute_metrics`` feeds the gathered arrays to the module.

``accuracy``: classification accuracy. ``token_accuracy``: accuracy on the labelled positions of token sequences
with the causal shift (synthetic tasks). ``perplexity``: exp(total token loss / scored tokens) from per-sequence
sums (the Hub's ``perplexity`` loads a model itself and needs the network).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch


METRICS_DIR = Path(__file__).resolve().parent
NAMES = ("accuracy", "perplexity", "token_accuracy")
IGNORE_INDEX = -100
INSTALL_EVALUATE = 'pip install "evaluate>=0.4.3"'


def path_of(name: str) -> Path:
    """The folder of the shipped module ``name``."""
    if name not in NAMES:
        raise ValueError(f"unknown metric {name!r}; the package ships {', '.join(NAMES)}")
    return METRICS_DIR / name


@cache
def load(name: str) -> Any:
    """``evaluate.load`` of the shipped module ``name`` (in memory; no network)."""
    try:
        import evaluate
    except ImportError as err:
        raise ImportError(f"the metrics need the `evaluate` library: `{INSTALL_EVALUATE}`") from err
    if not hasattr(evaluate, "load"):
        raise ImportError(
            f"`import evaluate` found {getattr(evaluate, '__file__', evaluate)}, not the `evaluate` library: a "
            "file named evaluate.py on sys.path shadows it (run scripts from another folder or rename the file)."
        )
    return evaluate.load(str(path_of(name)), keep_in_memory=True)


def _logits(outputs: Any) -> torch.Tensor:
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def argmax_logits(logits: Any, labels: torch.Tensor) -> torch.Tensor:
    """``preprocess_logits_for_metrics`` for accuracies: the argmax ids, (B,) or (B, T)."""
    return _logits(logits).argmax(dim=-1)


def token_nll_sums(logits: Any, labels: torch.Tensor) -> torch.Tensor:
    """``preprocess_logits_for_metrics`` for perplexity: (B, 2) float64 of each sequence's summed token loss
    (nats; ``logits[:, :-1]`` against ``labels[:, 1:]``, ``-100`` not scored) and its number of scored tokens."""
    logits = _logits(logits)[:, :-1].float()
    targets = labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    return torch.stack([losses.double().sum(dim=1), counts.double()], dim=1)


def _predictions(eval_pred: Any) -> np.ndarray:
    predictions = eval_pred.predictions
    return np.asarray(predictions[0] if isinstance(predictions, tuple) else predictions)


def accuracy_from_eval_pred(eval_pred: Any) -> dict[str, float]:
    """``compute_metrics`` for classification (logits (N, C) or argmax ids (N,))."""
    predictions = _predictions(eval_pred)
    if predictions.ndim == 2:
        predictions = predictions.argmax(-1)
    return load("accuracy").compute(predictions=predictions, references=np.asarray(eval_pred.label_ids))


def token_accuracy_from_eval_pred(eval_pred: Any) -> dict[str, float]:
    """``compute_metrics`` for token tasks (argmax ids (N, T) from `argmax_logits` and labels (N, T))."""
    result = load("token_accuracy").compute(
        predictions=_predictions(eval_pred), references=np.asarray(eval_pred.label_ids)
    )
    return {"accuracy": result["accuracy"]}


def perplexity_from_eval_pred(eval_pred: Any) -> dict[str, float]:
    """``compute_metrics`` for causal LMs (the (N, 2) sums of `token_nll_sums`)."""
    sums = _predictions(eval_pred)
    result = load("perplexity").compute(nll_sums=sums[:, 0], token_counts=sums[:, 1].astype(np.int64))
    return {"perplexity": result["perplexity"]}  # the token-mean loss is the Trainer's own eval_loss


__all__ = [
    "METRICS_DIR",
    "NAMES",
    "accuracy_from_eval_pred",
    "argmax_logits",
    "load",
    "path_of",
    "perplexity_from_eval_pred",
    "token_accuracy_from_eval_pred",
    "token_nll_sums",
]
