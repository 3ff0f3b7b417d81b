#!/usr/bin/env python
"""Train a Mamba (Mamba-1 or Mamba-2) model with in-training CompreSSM state-size compression.

    python scripts/train.py                                # the main job: small Mamba on the KJV Bible, ~5-10 min on CPU
    python scripts/train.py --preset tiny                  # a few steps of a tiny model (smoke test)
    python scripts/train.py --preset mamba2                # the main job with a Mamba-2 model at N=128
    python scripts/train.py --task pixel_classification --dataset_name fashion_mnist
    python scripts/train.py --model_name_or_path ./my-mamba --train_file corpus.txt --tau 0.1
    python scripts/train.py args.yaml                      # every argument from a .json / .yaml file
    torchrun --nproc_per_node 2 scripts/train.py ...       # 2 processes (DDP; gloo on CPU)
    accelerate launch --config_file configs/accelerate_cpu_2proc.yaml scripts/train.py ...   # the same with accelerate

Arguments: ModelArguments and DataArguments (scripts/compressssm_app), transformers' TrainingArguments and
CompressionArguments; see --help. Bad input prints one error line and exits with status 2, writing nothing.

Resume (like the transformers examples): with --save_strategy steps, rerunning the same command continues from the
newest complete checkpoint-N in --output_dir (a half-written one, left by a kill, is skipped with a warning), with
the model built from it (its reduced state sizes); --resume_from_checkpoint PATH picks a checkpoint. Rerunning a
finished command says so and changes nothing (exit 0). A non-empty --output_dir that is not a run of the same
settings (arguments that change the result) is refused (exit 2) unless --overwrite_output_dir is given, which
deletes the previous run's checkpoints and results there and starts afresh. One run at a time per --output_dir
(a lock file; a second run exits 2 naming the first). A failed --push_to_hub upload after training exits 1 with the
command that retries the upload alone. With --enable_jit_checkpoint, SIGTERM (a preemption) saves a checkpoint and
stops: the script prints "interrupted at step k of n ... re-run the same command to resume", writes no final model,
card or run file, and exits 143 (128 + SIGTERM); re-running the same command resumes from that checkpoint.
"""

import logging
import os
import sys


# Idle OpenMP threads that spin (the default) slow every step several-fold on a shared or busy CPU; torch reads this
# once, at import, so it is set before the package (and torch) is imported. An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from compressssm_app import UsageError, parse_arguments, run_training  # noqa: E402
from compressssm_app.launcher import launcher_mismatch  # noqa: E402
from compressssm_app.run import EXIT_INTERRUPTED, TrainingInterrupted, UploadError  # noqa: E402


def _print_summary(results: dict) -> None:
    before, after = results["state_sizes_before"], results["state_sizes_after"]
    print("\nPer-layer state sizes (before -> after):")
    for layer, (a, b) in enumerate(zip(before, after)):
        print(f"  layer {layer}: {a:4d} -> {b:4d}")
    print(f"  mean   : {sum(before) / len(before):6.1f} -> {sum(after) / len(after):6.1f}")
    print(f"Parameters: {results['parameters_before']:,} -> {results['parameters_after']:,}")
    ev = results["eval"]
    if "perplexity" in ev:
        print(f"Validation loss {ev['loss']:.4f} nats/token, perplexity {ev['perplexity']:.3f}")
    if "accuracy" in ev:
        print(f"Evaluation loss {ev['loss']:.4f}, accuracy {ev['accuracy']:.4f}")
    print(f"Training took {results['train_seconds']:.1f} s. Saved model, card and history to {results['output_dir']}")


def main(argv=None) -> int:
    try:
        model_args, data_args, training_args, comp_args = parse_arguments(argv)
        # The package's loggers (the "CompreSSM step ..." lines) follow the Trainer's per-process level: replicas
        # log at --log_level_replica (error in the presets), so each line appears once, from the main process.
        logging.getLogger("hf_compressssm").setLevel(training_args.get_process_log_level())
        mismatch = launcher_mismatch(int(os.environ.get("WORLD_SIZE", "1")), __file__)
        if mismatch:
            print(f"train.py: warning: {mismatch}", file=sys.stderr)
        results = run_training(model_args, data_args, training_args, comp_args)
    except UsageError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as err:  # SIGTERM with --enable_jit_checkpoint: checkpoint saved, nothing final
        print(f"train.py: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UploadError as err:  # trained and saved; only the upload failed
        _print_summary(err.results)
        print(f"train.py: error: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if results.get("already_finished"):
        print(_finished_line(training_args))
    else:
        _print_summary(results)
    return 0


def _finished_line(training_args) -> str:
    out = training_args.output_dir
    line = (
        f"{out} already holds the finished run of these settings: nothing to do (pass --overwrite_output_dir to "
        "train it again from scratch, or choose another --output_dir)"
    )
    if training_args.push_to_hub and training_args.hub_model_id:
        from hf_compressssm.hub.publish import upload_command

        line += f"; to upload it: {upload_command(out, training_args.hub_model_id)}"
    return line + "."


def _end_distributed() -> None:
    """Leave the process group before the interpreter exits (torchrun / accelerate launch): without it a process can
    abort at exit ("terminate called without an active exception") after all its work is done."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        code = main()
    finally:
        _end_distributed()
    sys.exit(code)
