#!/usr/bin/env python
"""Evaluate a CompreSSM (or stock) Mamba model: quality on the matching split, size, state sizes, throughput.

    python scripts/evaluate_model.py outputs/compressssm-kjv            # folder written by scripts/train.py
    python scripts/evaluate_model.py owner/name                          # Hub id (or HF cache with HF_HUB_OFFLINE=1)
    python scripts/evaluate_model.py MODEL --task causal_lm --validation_file held_out.txt --output report.json
    python scripts/evaluate_model.py MODEL --update_card                 # also put the measurements in MODEL/README.md
    python scripts/evaluate_model.py MODEL --compare_to FULL_MODEL --update_card   # + a full-vs-compressed table

The task and data come from the model's ``compressssm_run.json`` (written by the train script into the final folder
and into each checkpoint-N; for a checkpoint without one, its run folder's) unless given; a Trainer checkpoint
with no such record is refused rather than evaluated on a guessed split (name the data: --dataset_name,
--train_file, --validation_file or --task). The model (and --compare_to) is loaded and checked (weights complete,
config.json matching them, vocabulary covering the data) before anything is measured. Perplexity is exp(mean token loss) on the fixed validation split; accuracy is over the test split
(pixel_classification) or over the labelled positions (mqar, selective_copying). Prints a table and writes JSON.
"""

import argparse
import json
import os
import re
import sys
from dataclasses import fields


# Copies of compressssm_app.TASKS / RUN_FILE (checked once the package is imported): the argument checks run
# before torch and transformers are imported, so that a wrong path fails at once.
TASKS = ("causal_lm", "pixel_classification", "mqar", "selective_copying")
RUN_FILE = "compressssm_run.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
REPORT_FILE = "evaluation.json"


def _arguments(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("model", help="model folder or Hub id")
    p.add_argument("--task", choices=TASKS, help="default: from compressssm_run.json, else from the architecture")
    p.add_argument("--dataset_name", help="causal_lm: 'kjv' or an HF dataset; pixel_classification: the dataset")
    p.add_argument("--train_file", nargs="+", help="causal_lm: text the validation split is cut from")
    p.add_argument("--validation_file", nargs="+", help="causal_lm: explicit validation text file(s)")
    p.add_argument("--block_size", type=int, help="causal_lm: tokens per evaluated block")
    p.add_argument("--max_eval_samples", type=int, help="evaluate only the first N items")
    p.add_argument("--data_dir", help="fashion_mnist: folder of the IDX files")
    p.add_argument("--batch_size", type=int, default=32, help="evaluation batch size")
    p.add_argument("--train_batch_size", type=int, default=8, help="batch of the training-throughput measurement")
    p.add_argument("--generate_tokens", type=int, default=64, help="new tokens of the generation measurement")
    p.add_argument("--no_speed", action="store_true", help="skip the throughput measurements")
    p.add_argument("--output", help=f"JSON report path (default: MODEL/{REPORT_FILE} for a folder, else ./)")
    p.add_argument("--update_card", action="store_true", help="re-render MODEL/README.md with these measurements")
    p.add_argument(
        "--compare_to", help="a full-size (uncompressed) model folder evaluated on the same split, for comparison"
    )
    p.add_argument("--trust_remote_code", action="store_true", help="allow remote code for non-CompreSSM models")
    return p.parse_args(argv)


def _missing_folder(model: str) -> str | None:
    """Why ``model`` cannot be a model, decided without importing anything heavy or asking the Hub: a path that
    is not a folder (absolute, relative with ./ ../ ~, under an existing local folder, or not a Hub id)."""
    if os.path.isdir(model):
        return None
    if os.path.exists(model):
        return f"{model} is a file, not a model folder."
    first = model.split("/", 1)[0]
    local = model.startswith((".", "/", "~")) or not _HUB_ID.match(model) or ("/" in model and os.path.isdir(first))
    missing = f"model folder {model} does not exist (give the folder written by scripts/train.py, or a Hub id)."
    if local:
        return missing
    # ``owner/name`` that is no local folder: a Hub id only if it is cached or the Hub can be reached.
    if _in_hub_cache(model):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE"):
        return f"{missing[:-1]}; it is not in the Hugging Face cache either (HF_HUB_OFFLINE is set)."
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if not _reachable(endpoint):
        return f"{missing[:-1]}; no Hub repo of that name can be looked up ({endpoint} is unreachable)."
    return None


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the HF cache holds a model repo ``repo_id`` (the cache layout, read without importing the hub)."""
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub"
    )
    return os.path.isdir(os.path.join(cache, "models--" + repo_id.replace("/", "--")))


def _reachable(endpoint: str, timeout: float = 2.0) -> bool:
    """One TCP connection attempt to the Hub endpoint (no HTTP, no retries)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _read_record(path: str) -> dict:
    from compressssm_app import UsageError

    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as err:
        raise UsageError(
            f"{path} is unreadable ({err}); name the data instead (--dataset_name / --train_file)."
        ) from err
    if not isinstance(record, dict):
        raise UsageError(f"{path} is not a run record; name the data instead (--dataset_name / --train_file).")
    return record


def _is_checkpoint(folder: str) -> bool:
    """A Trainer checkpoint (or a run folder): it holds trainer_state.json."""
    return os.path.isfile(os.path.join(folder, "trainer_state.json"))


def _run_file(model: str) -> dict:
    """The run record of ``model``: its own ``compressssm_run.json``, else, for a Trainer checkpoint, its run
    folder's (the parent of ``checkpoint-N``); {} when there is none."""
    if os.path.isdir(model):
        folders = [model]
        if _is_checkpoint(model):
            folders.append(os.path.dirname(os.path.abspath(model)))
        for folder in folders:
            path = os.path.join(folder, RUN_FILE)
            if os.path.isfile(path):
                if folder != model:
                    print(
                        f"evaluate_model.py: using the run record {path} of the checkpoint's run folder",
                        file=sys.stderr,
                    )
                return _read_record(path)
        return {}
    try:
        from huggingface_hub import hf_hub_download

        return json.load(open(hf_hub_download(model, RUN_FILE)))
    except Exception:  # not on the Hub / offline without a cached copy: fall back to the CLI and the architecture
        return {}


def _prepare(args):
    """Everything that can fail because of the input, before anything is measured or written."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    import compressssm_app as app
    from compressssm_app import DataArguments, ModelArguments, UsageError, build_datasets, resolve_tokenizer
    from compressssm_app.evaluation import load_model

    assert (tuple(app.TASKS), app.RUN_FILE) == (TASKS, RUN_FILE), "scripts/evaluate_model.py: copies out of date"

    try:
        config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load a model config from {args.model!r}: {err}") from err
    run = _run_file(args.model)
    named_data = args.task or args.dataset_name or args.train_file or args.validation_file
    if not run and not named_data and os.path.isdir(args.model) and _is_checkpoint(args.model):
        raise UsageError(
            f"{args.model} is a training checkpoint without a run record ({RUN_FILE}), and its run folder has none: "
            "which data it was trained on is unknown. Name it: --dataset_name kjv (the default corpus), --train_file "
            "FILE or --validation_file FILE, or --task for the other tasks."
        )
    classifier = any("SequenceClassification" in a for a in (config.architectures or []))
    task = args.task or run.get("task") or ("pixel_classification" if classifier else "causal_lm")
    if classifier != (task == "pixel_classification"):
        raise UsageError(f"task {task} does not match the model's architecture {config.architectures}.")
    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    try:  # both models now: a truncated file or an edited config fails before anything is measured
        model = load_model(args.model, auto, args.trust_remote_code, config)
        full = None
        if args.compare_to:
            try:
                full_config = AutoConfig.from_pretrained(args.compare_to, trust_remote_code=args.trust_remote_code)
            except (OSError, ValueError) as err:
                raise UsageError(f"cannot load a model config from --compare_to {args.compare_to!r}: {err}") from err
            full_classifier = any("SequenceClassification" in a for a in (full_config.architectures or []))
            if full_classifier != classifier:
                raise UsageError(
                    f"--compare_to {args.compare_to} is a {full_config.architectures} model but {args.model} is a "
                    f"{config.architectures} model: compare models of the same task."
                )
            full = load_model(args.compare_to, auto, args.trust_remote_code, full_config)
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from err
    names = {f.name for f in fields(DataArguments)}
    values = {k: v for k, v in (run.get("data") or {}).items() if k in names} if run.get("task") == task else {}
    values["task"] = task
    if args.dataset_name or args.train_file or args.validation_file:  # a new data source replaces the recorded one
        for key in ("dataset_name", "dataset_config_name", "train_file", "validation_file"):
            values.pop(key, None)
    for key in ("dataset_name", "train_file", "validation_file", "block_size", "max_eval_samples", "data_dir"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    values.update(max_train_samples=max(args.train_batch_size, 1))  # only a batch of training data is used
    try:
        data_args = DataArguments(**values)
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from err
    tokenizer = None
    if task == "causal_lm":
        tokenizer = resolve_tokenizer(ModelArguments(model_name_or_path=args.model), "")
    task_data = build_datasets(data_args, tokenizer=tokenizer)
    if task_data.vocab_size > config.vocab_size:
        raise UsageError(f"the data uses {task_data.vocab_size} token ids but the model has {config.vocab_size}.")
    if full is not None and task_data.vocab_size > full.config.vocab_size:
        raise UsageError(
            f"--compare_to {args.compare_to} has a vocabulary of {full.config.vocab_size} token ids but the data "
            f"(tokenized for {args.model}) uses {task_data.vocab_size}: compare with a model trained on the same "
            "tokenizer."
        )
    if full is not None and classifier and full.config.num_labels != config.num_labels:
        raise UsageError(
            f"--compare_to {args.compare_to} has {full.config.num_labels} labels but {args.model} has "
            f"{config.num_labels}: compare models of the same task."
        )
    output = args.output or (
        os.path.join(args.model, REPORT_FILE)
        if os.path.isdir(args.model)
        else f"{REPORT_FILE[:-5]}-{args.model.replace('/', '--')}.json"
    )
    if not os.path.isdir(os.path.dirname(os.path.abspath(output))):
        raise UsageError(f"the folder of --output {output} does not exist.")
    if args.update_card and not os.path.isdir(args.model):
        raise UsageError("--update_card needs a local model folder.")
    return config, task, task_data, run, output, model, full


def main(argv=None) -> int:
    args = _arguments(argv)
    problem = _missing_folder(args.model) or (_missing_folder(args.compare_to) if args.compare_to else None)
    if problem:  # at once: before torch/transformers are imported and before any Hub lookup
        print(f"evaluate_model.py: error: {problem}", file=sys.stderr)
        return 2

    import hf_compressssm  # noqa: F401  (registers the Auto classes)
    from compressssm_app import UsageError

    try:
        config, task, task_data, run, output, model, full = _prepare(args)
    except UsageError as err:
        print(f"evaluate_model.py: error: {err}", file=sys.stderr)
        return 2

    import torch

    from compressssm_app.evaluation import (
        count_parameters,
        evaluate_quality,
        format_table,
        generation_throughput,
        layer_state_sizes,
        training_throughput,
    )

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    sizes = layer_state_sizes(model)
    report = {
        "model": args.model,
        "task": task,
        "dataset": task_data.dataset_description,
        "split": task_data.eval_description,
        "device": device,
        "parameters": count_parameters(model),
        "state_sizes": sizes,
        "initial_state_sizes": (getattr(config, "compression", None) or {}).get("initial_state_sizes", sizes),
    }
    report["quality"] = evaluate_quality(model, task_data.eval_dataset, task, batch_size=args.batch_size)
    if not args.no_speed:
        report["speed"] = {
            **training_throughput(model, task_data.train_dataset, batch_size=args.train_batch_size),
            **generation_throughput(model, task_data.eval_dataset, new_tokens=args.generate_tokens),
        }
    rows = [
        ("model", args.model),
        ("task", task),
        ("parameters", report["parameters"]),
        ("state sizes", " ".join(map(str, sizes))),
        ("initial state sizes", " ".join(map(str, report["initial_state_sizes"]))),
    ]
    if full is not None:
        full = full.to(device)
        full_quality = evaluate_quality(full, task_data.eval_dataset, task, batch_size=args.batch_size)
        keep = ("loss", "perplexity", "accuracy")
        full_sizes = layer_state_sizes(full)
        report["comparison"] = {
            f"full model (N={' '.join(map(str, full_sizes))})": {
                **{k: v for k, v in full_quality.items() if k in keep},
                "parameters": count_parameters(full),
            },
            f"this model (N={' '.join(map(str, sizes))})": {
                **{k: v for k, v in report["quality"].items() if k in keep},
                "parameters": report["parameters"],
            },
        }
        del full
    rows += [(k, v) for k, v in report["quality"].items()]
    for name, values in report.get("comparison", {}).items():
        rows += [(f"{name}: {k}", v) for k, v in values.items()]
    rows += [(f"{k} ({device})", v) for k, v in report.get("speed", {}).items()]
    print(format_table(rows, title=f"Evaluation on {task_data.eval_description}"))
    from hf_compressssm.compression.atomic_io import write_json_atomic

    write_json_atomic(output, report)  # never a half-written report
    print(f"Wrote {output}")
    if args.update_card:
        from hf_compressssm.hub.model_card import save_model_card

        card = dict(run.get("card") or {"task": task, "dataset_description": task_data.dataset_description})
        card["metrics"] = {k: v for k, v in report["quality"].items() if k in ("loss", "perplexity", "accuracy")}
        card["eval_split"] = task_data.eval_description
        speed_names = {
            "train_tokens_per_second": "training tokens/s",
            "generate_tokens_per_second": "generated tokens/s",
            "inference_sequences_per_second": "inference sequences/s",
        }
        card["speed"] = {
            f"{speed_names[k]} ({device}, batch {args.train_batch_size if k.startswith('train') else 1})": v
            for k, v in report.get("speed", {}).items()
            if k in speed_names
        }
        if "comparison" in report:
            card["comparison"] = report["comparison"]
        print(f"Updated {save_model_card(model, args.model, **card)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
