"""What `CompreSSMCallback` keeps in a Trainer checkpoint, which checkpoint folders are complete, and the Trainer
settings that checkpoints constrain (PEFT, ``load_best_model_at_end``).

The callback's JSON-able state (the compressor's progress through the schedule, the pending pragmatic check's
bookkeeping, the arguments) travels
the HF way, in ``trainer_state.json`` (``stateful_callbacks``, via `transformers.trainer_callback.ExportableState`).
Its tensors (the recent calibration batches, the random-selection generator, a pending check's model and optimizer
snapshot) go into the checkpoint folder as ``compressssm_state.safetensors`` (one file per process:
``compressssm_state-rank{r}.safetensors`` for ranks > 0), atomically (temporary file + rename), *before* the
Trainer writes ``trainer_state.json``: the Trainer's ``_save_checkpoint`` writes the model, optimizer, scheduler and
RNG files, then calls ``state()`` of every `ExportableState` callback, then writes ``trainer_state.json``, then
deletes older checkpoints (``save_total_limit``); ``on_save`` runs only after all of that. So the saving process
writes its file from ``state()``, and the other processes write theirs at the end of the step that asked for the
save (then all wait at a barrier). A checkpoint whose ``trainer_state.json`` parses is therefore complete, and an
older one is deleted only after a newer one is complete: a kill at any point leaves one checkpoint to resume from.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from transformers.utils import logging

from ..compression.atomic_io import write_safetensors_atomic


logger = logging.get_logger(__name__)

STATE_FILE = "compressssm_state.safetensors"
CALLBACK_NAME = "CompreSSMCallback"
TRAINER_STATE = "trainer_state.json"
JIT_SENTINEL = "checkpoint-is-incomplete.txt"  # transformers' JIT (preemption) checkpoint, removed when it is done
WEIGHT_FILES = (
    "model.safetensors",
    "adapter_model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "adapter_model.bin",
)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def state_file_name(process_index: int = 0) -> str:
    return STATE_FILE if process_index == 0 else STATE_FILE.replace(".safetensors", f"-rank{process_index}.safetensors")


# ---------------------------------------------------------------- nested structures <-> flat tensors + JSON
def flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` (dicts, lists, tensors, JSON scalars) as JSON, each tensor replaced by ``{"__tensor__": name}``."""
    if torch.is_tensor(obj):
        tensors[prefix] = obj.detach()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [flatten(k, f"{prefix}.k{i}", tensors), flatten(v, f"{prefix}.{i}", tensors)]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, (list, tuple)):
        items = [flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a CompreSSM checkpoint ({prefix}).")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        return {unflatten(k, tensors): unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


def save_state_file(folder: str, payload: dict[str, Any], global_step: int, process_index: int = 0) -> str:
    """Write ``payload`` (nested dicts/lists of tensors and JSON scalars) to ``folder`` atomically."""
    tensors: dict[str, torch.Tensor] = {}
    meta = flatten(payload, "t", tensors)
    os.makedirs(folder, exist_ok=True)
    metadata = {"global_step": str(int(global_step)), "payload": json.dumps(meta)}
    return write_safetensors_atomic(os.path.join(folder, state_file_name(process_index)), tensors, metadata)


def load_state_file(path: str) -> tuple[int, dict[str, Any]]:
    """``(global_step, payload)`` of a file written by :func:`save_state_file` (tensors on CPU)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "payload" not in metadata or "global_step" not in metadata:
        raise ValueError(f"{path} is not a CompreSSM callback state file.")
    return int(metadata["global_step"]), unflatten(json.loads(metadata["payload"]), tensors)


def find_state_file(candidates: list[str | None], global_step: int, process_index: int = 0) -> str | None:
    """The first candidate folder holding this process's state file saved at ``global_step``, or None."""
    from safetensors import safe_open

    name = state_file_name(process_index)
    seen = set()
    for folder in candidates:
        if not folder or folder in seen:
            continue
        seen.add(folder)
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with safe_open(path, framework="pt") as f:
                step = int((f.metadata() or {}).get("global_step", -1))
        except Exception as err:  # an unreadable file is the wrong one; keep looking
            logger.warning(f"CompreSSM: cannot read {path}: {err}")
            continue
        if step == global_step:
            return path
    return None


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def save_in_progress(folder: str) -> bool:
    """Whether the Trainer is writing the checkpoint ``folder`` now: it exists and its ``trainer_state.json`` (the
    Trainer's last file) is missing or older than its weights (a save of the same step again, e.g. a preemption
    checkpoint after the regular one, rewrites the weights first)."""
    if not os.path.isdir(folder):
        return False
    state = _mtime(os.path.join(folder, TRAINER_STATE))
    if state is None:
        return True
    weights = [t for t in (_mtime(os.path.join(folder, n)) for n in WEIGHT_FILES) if t is not None]
    return bool(weights) and max(weights) > state


def saved_callback_state(trainer_state) -> dict | None:
    """The callback state kept in the ``trainer_state.json`` being resumed (None for a fresh run or none kept)."""
    if trainer_state.global_step == 0:
        return None
    saved = (trainer_state.stateful_callbacks or {}).get(CALLBACK_NAME)
    if isinstance(saved, list):
        saved = saved[0] if saved else None
    if isinstance(saved, dict):
        return (saved.get("attributes") or {}).get("_resume_state")
    return None


def load_saved_tensors(args, trainer_state, saved: dict) -> dict[str, Any]:
    """The tensors this process saved with the checkpoint being resumed (`load_state_file`), looked for in
    ``TrainingArguments.resume_from_checkpoint``, in the folder they were saved to and in ``output_dir/checkpoint-N``;
    `ValueError` naming the folders when none holds them."""
    step = trainer_state.global_step
    resume = args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) else None
    candidates = [resume, saved.get("folder"), os.path.join(args.output_dir, f"checkpoint-{step}")]
    rank = int(getattr(args, "process_index", 0) or 0)
    path = find_state_file(candidates, step, rank)
    if path is None:
        raise ValueError(
            f"CompreSSM: resuming at step {step} needs the callback state saved with the checkpoint "
            f"({state_file_name(rank)}), found in none of {[c for c in candidates if c]}. Pass the checkpoint folder "
            "in TrainingArguments(resume_from_checkpoint=...) as well as to trainer.train(), or copy that file along "
            "with the checkpoint."
        )
    _, payload = load_state_file(path)
    logger.info(f"CompreSSM: restoring the callback state of step {step} from {path}.")
    return payload


# ---------------------------------------------------------------- Trainer settings checkpoints constrain
def check_peft_checkpointing(args, model, schedule: list[int]) -> None:
    """PEFT + cuts + Trainer checkpoints: refused before any step (a checkpoint of a PEFT model holds only the
    adapter, not the base model the cuts shrink)."""
    if not schedule or not any(hasattr(m, "base_layer") for m in model.modules()):
        return
    save_strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
    jit = bool(getattr(args, "enable_jit_checkpoint", False))
    if save_strategy == "no" and not jit:
        return
    setting = f"save_strategy={save_strategy!r}" + (" and enable_jit_checkpoint=True" if jit else "")
    raise ValueError(
        f"CompreSSM cannot cut a PEFT model that the Trainer checkpoints ({setting}): a checkpoint of a PEFT "
        "model holds only the adapter weights, not the base model that the cuts shrink, so it could not be "
        "resumed and its adapter would fit no saved base. Train with save_strategy='no' (and without "
        "enable_jit_checkpoint) and save the result at the end (model.merge_and_unload().save_pretrained(...)), "
        "or compress the base model first (a run without adapters, or compress_model) and add the adapters to "
        "the compressed model."
    )


def forget_best_checkpoint(args, state, change: str) -> None:
    """``load_best_model_at_end``: a checkpoint saved at other state sizes cannot be loaded into the model, so the
    best metric so far is forgotten; the best model is chosen among the checkpoints saved from now on."""
    if not getattr(args, "load_best_model_at_end", False):
        return
    if state.best_metric is None and state.best_global_step is None and state.best_model_checkpoint is None:
        return
    if state.is_world_process_zero:
        logger.warning(
            f"CompreSSM: {change} changed the state sizes, so the best checkpoint so far "
            f"({state.best_model_checkpoint or f'step {state.best_global_step}'}, {args.metric_for_best_model} "
            f"{state.best_metric}) no longer fits the model: load_best_model_at_end will pick the best "
            "checkpoint saved from now on."
        )
    state.best_metric = None
    state.best_global_step = None
    state.best_model_checkpoint = None


# ---------------------------------------------------------------- complete checkpoints
def _safetensors_problem(path: str) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            if keys:  # the last tensor's data must be in the file (a truncated file fails here)
                f.get_slice(keys[-1])
    except Exception as err:
        return f"{os.path.basename(path)} is unreadable ({err})"
    return None


def checkpoint_problem(folder: str) -> str | None:
    """Why ``folder`` is not a complete Trainer checkpoint (a kill during a save leaves it half-written), or None.

    Complete: ``trainer_state.json`` (written last by the Trainer) and ``config.json`` parse, the model weights are
    there and readable, and, when the checkpoint was saved with `CompreSSMCallback`, its state file is readable too.
    A preemption checkpoint (``enable_jit_checkpoint``) whose marker file is newer than ``trainer_state.json`` is
    being saved again over an earlier save of the same step, so it is incomplete too.
    """
    if not os.path.isdir(folder):
        return "it is not a folder"
    try:
        with open(os.path.join(folder, TRAINER_STATE)) as f:
            trainer_state = json.load(f)
    except FileNotFoundError:
        return f"{TRAINER_STATE} is missing"
    except (OSError, ValueError) as err:
        return f"{TRAINER_STATE} is unreadable ({err})"
    sentinel = _mtime(os.path.join(folder, JIT_SENTINEL))
    if sentinel is not None and sentinel > (_mtime(os.path.join(folder, TRAINER_STATE)) or 0):
        return f"a preemption checkpoint was being written into it ({JIT_SENTINEL} is newer than {TRAINER_STATE})"
    config_path = os.path.join(folder, "config.json")
    adapter = os.path.isfile(os.path.join(folder, "adapter_config.json"))
    if not adapter:
        try:
            with open(config_path) as f:
                json.load(f)
        except FileNotFoundError:
            return "config.json is missing"
        except (OSError, ValueError) as err:
            return f"config.json is unreadable ({err})"
    weights = [
        n
        for n in ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json")
        if os.path.isfile(os.path.join(folder, n))
    ]
    if not weights and not os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        return "no model weights (model.safetensors) in it"
    for name in weights:
        if name.endswith(".safetensors"):
            problem = _safetensors_problem(os.path.join(folder, name))
            if problem:
                return problem
    saved = (trainer_state.get("stateful_callbacks") or {}).get(CALLBACK_NAME)
    if isinstance(saved, list):
        saved = saved[0] if saved else None
    if isinstance(saved, dict) and (saved.get("attributes") or {}).get("_resume_state"):
        world = int(saved["attributes"]["_resume_state"].get("world_size", 1))
        for rank in range(world):
            path = os.path.join(folder, state_file_name(rank))
            if not os.path.isfile(path):
                return f"{state_file_name(rank)} (CompreSSM callback state) is missing"
            problem = _safetensors_problem(path)
            if problem:
                return problem
    return None


def checkpoint_folders(output_dir: str) -> list[str]:
    """``checkpoint-N`` folders of ``output_dir``, newest (largest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(output_dir) if (m := _CHECKPOINT.match(n))]
    return [os.path.join(output_dir, n) for _, n in sorted(found, reverse=True)]


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint of ``output_dir`` (None if there is none); every newer half-written one is
    skipped with a warning that names it and says what is wrong."""
    for folder in checkpoint_folders(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning(f"CompreSSM: skipping the incomplete checkpoint {folder}: {problem}.")
    return None
