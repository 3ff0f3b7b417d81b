"""Measure a trained model: quality on the matching split, size, per-layer state sizes and throughput.

Quality goes through the package's offline ``evaluate`` modules (`hf_compressssm.metrics`: ``perplexity``,
``accuracy``, ``token_accuracy``), the same ones the Trainer's ``compute_metrics`` uses.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import default_data_collator
from transformers.utils import logging

from hf_compressssm import metrics
from hf_compressssm.families import layer_state_sizes


logger = logging.get_logger(__name__)


WEIGHTS_FILE, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def weights_problem(
    folder: str | os.PathLike, config: Any, auto_class: Any, trust_remote_code: bool = False
) -> str | None:
    """Why the safetensors weights of a local model ``folder`` cannot be loaded with ``config`` (its config.json),
    checked from the file headers only (no tensor is read): a missing, truncated or unreadable weights file, or
    tensors whose shapes differ from the ones the config builds (an edited config.json). None: nothing found
    (weights in another format are left to ``from_pretrained``)."""
    from safetensors import safe_open

    folder = os.fspath(folder)
    if os.path.isfile(os.path.join(folder, WEIGHTS_INDEX)):
        try:
            with open(os.path.join(folder, WEIGHTS_INDEX), encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            return f"{WEIGHTS_INDEX} is unreadable ({_first_line(err)})"
    elif os.path.isfile(os.path.join(folder, WEIGHTS_FILE)):
        files = [WEIGHTS_FILE]
    else:
        return None
    shapes: dict[str, tuple[str, list[int]]] = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    shapes[key] = (name, list(f.get_slice(key).get_shape()))
        except Exception as err:  # SafetensorError: truncated (a copy cut short) or not a safetensors file
            return f"{name} is truncated or unreadable ({_first_line(err)}): copy or save the model again"
    try:
        with torch.device("meta"):
            model = auto_class.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # the config cannot build a model: from_pretrained will say why
        return None
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    mismatched = [k for k, (_, shape) in shapes.items() if k in expected and expected[k] != shape]
    if not mismatched:
        return None
    key = mismatched[0]
    more = f" (and {len(mismatched) - 1} more tensors)" if len(mismatched) > 1 else ""
    return (
        f"config.json does not match the weights: {key} is {shapes[key][1]} in {shapes[key][0]} but config.json "
        f"builds {expected[key]}{more}; was config.json edited? Restore the config.json saved with these weights"
    )


def load_model(path: str, auto_class: Any, trust_remote_code: bool = False, config: Any = None) -> nn.Module:
    """``auto_class.from_pretrained(path)`` with every way it can fail turned into one `ValueError` line: a local
    folder's weights are checked against its config first (`weights_problem`), before anything is loaded."""
    if config is not None and os.path.isdir(path):
        problem = weights_problem(path, config, auto_class, trust_remote_code)
        if problem:
            raise ValueError(f"cannot load the model in {path}: {problem}.")
    try:
        return auto_class.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise ValueError(f"cannot load the model from {path}: {type(err).__name__}: {_first_line(err)}") from err


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _is_classifier(model: nn.Module) -> bool:
    return "SequenceClassification" in type(model).__name__


@torch.no_grad()
def evaluate_quality(model: nn.Module, dataset: Dataset, task: str, batch_size: int = 32) -> dict[str, float]:
    """Loss and perplexity (``causal_lm``) or loss and accuracy (classification, synthetic tasks) over ``dataset``.

    Causal-LM loss is the mean over all scored tokens (``labels[:, 1:] != -100``), perplexity its exp (the
    ``perplexity`` module); accuracy is the ``accuracy`` module for classifiers and ``token_accuracy`` (labelled
    positions, causal shift) for synthetic tasks.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=default_data_collator)
    classifier = _is_classifier(model)
    metric = metrics.load("perplexity" if task == "causal_lm" else "accuracy" if classifier else "token_accuracy")
    total_loss, batches = 0.0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        batches += 1
        if classifier:
            total_loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            metric.add_batch(predictions=logits.argmax(-1).cpu(), references=labels.cpu())
            continue
        sums = metrics.token_nll_sums(logits, labels).cpu()
        total_loss += float(sums[:, 0].sum())
        if task == "causal_lm":
            metric.add_batch(nll_sums=sums[:, 0], token_counts=sums[:, 1].long())
        else:
            metric.add_batch(predictions=logits.argmax(-1).cpu(), references=labels.cpu())
    model.train(was_training)
    if batches == 0:
        raise ValueError("the evaluation set is empty.")
    result = metric.compute()
    if task == "causal_lm":
        return {"loss": result["loss"], "perplexity": result["perplexity"], "tokens": result["tokens"]}
    scored = len(dataset) if classifier else result["scored"]
    if scored == 0:
        raise ValueError("the evaluation set has no scored position.")
    return {"loss": total_loss / scored, "accuracy": result["accuracy"], "scored": scored}


def _example_batch(dataset: Dataset, batch_size: int) -> dict[str, torch.Tensor]:
    if not hasattr(dataset, "__len__"):  # a stream: its first items (repeated if it is shorter)
        head = list(itertools.islice(iter(dataset), batch_size))
        if not head:
            raise ValueError("the dataset is empty.")
        return default_data_collator([head[i % len(head)] for i in range(batch_size)])
    items = [dataset[i % len(dataset)] for i in range(batch_size)]
    return default_data_collator(items)


def training_throughput(
    model: nn.Module, dataset: Dataset, batch_size: int = 8, steps: int = 3, warmup: int = 1
) -> dict[str, float]:
    """Forward + backward + AdamW step on a copy of ``model`` (the model itself is untouched).

    Returns seconds per step, sequences/s and tokens/s (tokens = batch × sequence length).
    """
    work = copy.deepcopy(model).train()
    device = next(work.parameters()).device
    batch = {k: v.to(device) for k, v in _example_batch(dataset, batch_size).items()}
    optimizer = torch.optim.AdamW(work.parameters(), lr=1e-4)
    timings = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        work(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            timings.append(time.perf_counter() - start)
    seconds = sorted(timings)[len(timings) // 2]
    tokens = batch["input_ids"].numel()
    return {
        "train_step_seconds": seconds,
        "train_sequences_per_second": batch_size / seconds,
        "train_tokens_per_second": tokens / seconds,
    }


@torch.no_grad()
def generation_throughput(
    model: nn.Module, dataset: Dataset, batch_size: int = 1, prompt_length: int = 32, new_tokens: int = 64
) -> dict[str, float]:
    """Greedy decoding speed with the recurrent cache (causal LMs), or inference speed (classifiers).

    Causal LM: ``new_tokens`` tokens after a ``prompt_length`` prompt taken from ``dataset``; tokens/s counts new
    tokens of the whole batch. Classifier: sequences/s of a forward pass.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch = _example_batch(dataset, batch_size)
    try:
        if _is_classifier(model):
            inputs = batch["input_ids"].to(device)
            model(input_ids=inputs)  # warm-up
            start = time.perf_counter()
            model(input_ids=inputs)
            seconds = time.perf_counter() - start
            return {"inference_sequences_per_second": batch_size / seconds}
        prompt = batch["input_ids"][:, :prompt_length].to(device)
        kwargs = dict(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=model.config.pad_token_id,
        )
        model.generate(prompt, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        start = time.perf_counter()
        out = model.generate(prompt, **kwargs)
        seconds = time.perf_counter() - start
        generated = (out.shape[1] - prompt.shape[1]) * batch_size
        return {
            "generate_tokens_per_second": generated / seconds,
            "generate_ms_per_token": 1000 * seconds / max(1, generated / batch_size),
        }
    finally:
        model.train(was_training)


def format_table(rows: Iterable[tuple[str, Any]], title: str = "") -> str:
    """A two-column plain-text table."""
    rows = [(str(k), v) for k, v in rows]
    cells = []
    for key, value in rows:
        if isinstance(value, float):
            text = f"{value:,.4f}" if abs(value) < 100 else f"{value:,.1f}"
        elif isinstance(value, int) and not isinstance(value, bool):
            text = f"{value:,}"
        else:
            text = str(value)
        cells.append((key, text))
    width = max((len(k) for k, _ in cells), default=10)
    vwidth = max((len(v) for _, v in cells), default=10)
    line = "-" * (width + vwidth + 3)
    out = [title, line] if title else [line]
    out += [f"{k:<{width}} | {v:>{vwidth}}" for k, v in cells]
    out.append(line)
    return "\n".join(out)


__all__ = [
    "count_parameters",
    "evaluate_quality",
    "format_table",
    "generation_throughput",
    "layer_state_sizes",
    "training_throughput",
]
