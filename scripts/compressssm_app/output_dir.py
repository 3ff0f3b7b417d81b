"""The output folder of a training run: one run at a time, and what a re-run in a used folder does.

As transformers' example scripts handle ``--output_dir``:

* a folder that holds the **finished run of the same settings** is reported and left alone (re-running the command
  would train one more step and change the saved model);
* a folder holding an **unfinished run of the same settings** (its checkpoints) is resumed;
* any other **non-empty folder** is refused (`UsageError`) unless ``--overwrite_output_dir`` is given, which then
  deletes the old run's checkpoints and results (only files a run writes; nothing else in the folder) just before
  training starts, so that no later resume picks the old run's checkpoint.

"Same settings" compares the recorded arguments (`run_settings`: model, data, training, compression) without
those that do not change the result (`IGNORED_SETTINGS`: logging, output paths, saving, resume and Hub flags).
A run records them in each checkpoint (`RunRecordCallback`) and, once finished, in the folder's
``compressssm_run.json``.

`OutputDirLock` makes the folder one run's at a time: a lock file (owner pid, host, start time) created with
``O_CREAT | O_EXCL``; a lock whose owner is gone (same host, the pid no longer alive) is taken over with a warning;
it is removed when the run ends. In multi-process (DDP) runs only the main process takes it; `claim_output_dir`
shares its decision with the other processes.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.utils import logging

from hf_compressssm.compression.atomic_io import write_json_atomic
from hf_compressssm.trainer.checkpoint import checkpoint_folders, save_in_progress

from .arguments import UsageError


logger = logging.get_logger(__name__)

RUN_FILE = "compressssm_run.json"
LOCK_FILE = ".compressssm-run.lock"

# Arguments that do not change what a run computes: a re-run that differs only in these is the same run.
IGNORED_SETTINGS: dict[str, frozenset[str]] = {
    "model": frozenset({"overwrite_output_dir", "trust_remote_code", "scan_backend"}),
    "data": frozenset({"preset", "preprocessing_num_workers"}),
    "training": frozenset(
        {
            "output_dir",
            "run_name",
            "project",
            "report_to",
            "disable_tqdm",
            "include_num_input_tokens_seen",
            "skip_memory_metrics",
            "debug",
            "resume_from_checkpoint",
            "ignore_data_skip",
            "overwrite_output_dir",
            "enable_jit_checkpoint",
            "push_to_hub",
            "do_train",
            "do_eval",
            "do_predict",
            "local_rank",
            "use_cpu",
            "ddp_backend",
            "ddp_timeout",
            "dataloader_num_workers",
            "dataloader_pin_memory",
            "dataloader_persistent_workers",
            "dataloader_prefetch_factor",
            "dataloader_multiprocessing_context",
            "per_device_eval_batch_size",
            "eval_accumulation_steps",
            "eval_do_concat_batches",
            "eval_use_gather_object",
            "torch_empty_cache_steps",
        }
    ),
    "compression": frozenset(),
}
_IGNORED_PREFIXES = {"training": ("logging_", "log_", "save_", "hub_", "trackio_")}
SECTIONS = ("model", "data", "training", "compression")

# What a run writes at the top of its folder (removed by --overwrite_output_dir, with every checkpoint-N).
_RUN_OUTPUTS = (
    RUN_FILE,
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "compression_history.json",
    "README.md",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "all_results.json",
    "train_results.json",
    "eval_results.json",
    "trainer_state.json",
    "training_args.bin",
    "evaluation.json",
    "configuration_compressssm_*.py",
    "modeling_compressssm_*.py",
    "selective_scan.py",
    "kernel_policy.py",
    "ssd_scan.py",
    "ssd_numba_scan.py",
    "runs",
)


# ---------------------------------------------------------------------------------------------------------------- settings
def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def run_settings(model_args, data_args, training_args=None, comp_args=None) -> dict[str, Any]:
    """The arguments a run records (``compressssm_run.json`` and each checkpoint): ``task``, ``model``, ``data``
    and, when given, ``training`` (`TrainingArguments.to_dict`, tokens masked) and ``compression``."""
    data = {k: v for k, v in asdict(data_args).items() if k != "preset"}
    out: dict[str, Any] = {"task": data_args.task, "data": data, "model": asdict(model_args)}
    if training_args is not None:
        out["training"] = training_args.to_dict()
    if comp_args is not None:
        out["compression"] = comp_args.to_dict()
    return _jsonable(out)


def _significant(section: str, values: dict[str, Any]) -> dict[str, Any]:
    ignored, prefixes = IGNORED_SETTINGS.get(section, frozenset()), _IGNORED_PREFIXES.get(section, ())
    return {k: v for k, v in values.items() if k not in ignored and not k.startswith(prefixes)}


def settings_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The arguments that differ between a recorded run and this one (empty: the same run), as
    ``"name: recorded -> now"`` lines; a section the record lacks (an older version's file) is one difference."""
    differences = []
    for section in SECTIONS:
        if section not in current:
            continue
        if not isinstance(recorded.get(section), dict):
            differences.append(f"its {section} arguments are not recorded (written by an older version)")
            continue
        old, new = _significant(section, recorded[section]), _significant(section, _jsonable(current[section]))
        for key in sorted(old.keys() | new.keys()):
            if old.get(key, "<unset>") != new.get(key, "<unset>"):
                differences.append(f"{key}: {old.get(key, '<unset>')!r} there, {new.get(key, '<unset>')!r} now")
    return differences


# ---------------------------------------------------------------------------------------------------------------- lock
def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # no psutil, or no such process
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


def _lock_owner_gone(info: dict[str, Any]) -> bool | None:
    """True when the lock's owner no longer runs (same host, pid dead or reused), False when it does, None when
    this machine cannot tell (another host)."""
    if info.get("host") != socket.gethostname():
        return None
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0 or not _alive(pid):
        return True
    started, now = info.get("process_start"), _process_start(pid)
    if isinstance(started, (int, float)) and now is not None and abs(now - started) > 2.0:
        return True  # the pid belongs to another process now
    return False


def _describe_owner(info: dict[str, Any]) -> str:
    parts = [f"pid {info.get('pid')} on host {info.get('host')}"]
    if info.get("started"):
        parts.append(f"since {info['started']}")
    if info.get("command"):
        parts.append(f"command: {info['command']}")
    return ", ".join(parts)


class OutputDirLock:
    """An exclusive lock on a run's output folder: ``LOCK_FILE`` there, created atomically, holding the owner's
    pid, host, process start time and command line. `acquire` raises `UsageError` when another live run holds it
    or the folder cannot be written; `release` removes it (and the folders `acquire` created, when empty)."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = os.path.abspath(os.fspath(output_dir))
        self.path = os.path.join(self.output_dir, LOCK_FILE)
        self.created_dirs: list[str] = []
        self.held = False
        self._token = ""

    def _make_dirs(self) -> None:
        missing, folder = [], self.output_dir
        while not os.path.isdir(folder):
            if os.path.lexists(folder) and not os.path.isdir(folder):
                raise UsageError(
                    f"--output_dir {self.output_dir}: {folder} is a file, not a folder; choose another --output_dir."
                )
            missing.append(folder)
            parent = os.path.dirname(folder)
            if parent == folder:
                break
            folder = parent
        for folder in reversed(missing):
            os.mkdir(folder)
            self.created_dirs.append(folder)

    def _read(self, path: str | None = None) -> tuple[str, dict[str, Any] | None]:
        try:
            with open(path or self.path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return "", None
        try:
            info = json.loads(text)
        except ValueError:
            return text, None
        return text, info if isinstance(info, dict) else None

    def _try_create(self) -> bool:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "process_start": _process_start(os.getpid()),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:500],
        }
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        self._token = json.dumps(info)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(self._token)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over(self, text: str) -> None:
        """Remove the stale lock whose content is ``text`` and nothing else: rename it aside, check that it is the
        one that was judged stale (another process may have taken over first), else put it back."""
        aside = f"{self.path}.stale-{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved, _ = self._read(aside)
        if moved != text:  # a fresh lock of another process: restore it
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        with contextlib.suppress(OSError):
            os.unlink(aside)

    def acquire(self) -> None:
        try:
            self._make_dirs()
            for _ in range(50):
                if self._try_create():
                    self.held = True
                    return
                text, info = self._read()
                if info is None:  # being written right now, or the remains of a crash while it was written
                    try:
                        age = time.time() - os.path.getmtime(self.path)
                    except FileNotFoundError:
                        continue
                    if age < 10.0:
                        time.sleep(0.2)
                        continue
                    logger.warning(f"CompreSSM: removing the unreadable lock file {self.path} (left by a crash).")
                    self._take_over(text)
                    continue
                gone = _lock_owner_gone(info)
                if gone:
                    logger.warning(
                        f"CompreSSM: taking over the stale lock of {self.output_dir} ({_describe_owner(info)}: "
                        "that process no longer runs)."
                    )
                    self._take_over(text)
                    continue
                fix = (
                    "wait for it to finish or stop it, or choose another --output_dir"
                    if gone is False
                    else "wait for it to finish or stop it, or choose another --output_dir; if that process no "
                    f"longer runs (it was on another machine), delete {self.path}"
                )
                raise UsageError(
                    f"--output_dir {self.output_dir} is in use by another run ({_describe_owner(info)}): {fix}."
                )
            raise UsageError(f"could not take the lock {self.path}: it keeps changing; try again.")
        except OSError as err:
            self.release()
            raise UsageError(
                f"cannot write to --output_dir {self.output_dir}: {err.strerror or err}"
                f"{f' ({err.filename})' if err.filename else ''}; choose a folder you can write to."
            ) from err
        except UsageError:
            self.release()
            raise

    def release(self) -> None:
        if self.held:
            text, _ = self._read()
            if text == self._token:  # ours (never another run's lock that replaced a lost one)
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            self.held = False
        for folder in reversed(self.created_dirs):  # nothing written: the folders this run made go too
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        self.created_dirs = []

    def __enter__(self) -> OutputDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------------------------- the folder
def read_run_file(folder: str) -> dict[str, Any] | None:
    """``folder``'s run record (None when it has none); `UsageError` when it cannot be read."""
    path = os.path.join(folder, RUN_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as err:
        raise UsageError(f"{path} is unreadable ({err})") from err
    if not isinstance(record, dict):
        raise UsageError(f"{path} is not a run record")
    return record


def checkpoint_record(output_dir: str) -> tuple[str, dict[str, Any]] | None:
    """The run record of the newest checkpoint of ``output_dir`` that has one (an unfinished run's settings)."""
    for folder in checkpoint_folders(output_dir):
        try:
            record = read_run_file(folder)
        except UsageError:
            continue
        if record is not None:
            return folder, record
    return None


def _is_finished(output_dir: str, record: dict[str, Any]) -> bool:
    weights = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
    return "results" in record and any(os.path.isfile(os.path.join(output_dir, n)) for n in weights)


def _entries(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir) if n != LOCK_FILE and not n.startswith(f"{LOCK_FILE}.stale-"))


_HOW = (
    "re-run with that run's arguments (to resume or keep it), choose another --output_dir, or pass "
    "--overwrite_output_dir to delete its checkpoints and results and start afresh"
)


def inspect_output_dir(
    output_dir: str, current: dict[str, Any], *, overwrite: bool = False, resume_from: str | None = None
) -> tuple[str, dict[str, Any] | None]:
    """What a run with settings ``current`` does in ``output_dir``: ``("fresh", None)``, ``("resume", record)``
    (an unfinished run of the same settings; its newest complete checkpoint is picked later), ``("finished",
    record)`` (the finished run of the same settings: nothing to do), or `UsageError` (another run's folder, or
    unknown files, without ``overwrite``)."""
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"--output_dir {output_dir} is a file, not a folder; choose another --output_dir.")
    if overwrite:
        if resume_from and os.path.abspath(resume_from).startswith(os.path.abspath(output_dir) + os.sep):
            raise UsageError(
                f"--overwrite_output_dir would delete the checkpoint given to --resume_from_checkpoint "
                f"({resume_from}); drop one of the two options."
            )
        return "fresh", None
    entries = _entries(output_dir)
    if not entries:
        return "fresh", None
    try:
        record = read_run_file(output_dir)
    except UsageError as err:
        raise UsageError(f"{err}: cannot tell which run --output_dir holds; {_HOW}.") from err
    source = os.path.join(output_dir, RUN_FILE)
    finished = record is not None and _is_finished(output_dir, record)
    if record is None or not finished:
        found = checkpoint_record(output_dir)
        if found is not None:
            source, record = os.path.join(found[0], RUN_FILE), found[1]
    if record is None:
        if resume_from:  # the user names the checkpoint: the folder's other contents are theirs to judge
            logger.warning(
                f"CompreSSM: {output_dir} has no run record ({RUN_FILE}); continuing from --resume_from_checkpoint "
                f"{resume_from} as asked."
            )
            return "resume", None
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        hint = f"to continue a checkpoint of it pass --resume_from_checkpoint {output_dir}/checkpoint-N, "
        raise UsageError(
            f"--output_dir {output_dir} is not empty ({shown}) and holds no run record ({RUN_FILE}) to tell "
            f"whether it is this run: {hint if checkpoint_folders(output_dir) else ''}choose another --output_dir, "
            "or pass --overwrite_output_dir to delete a previous run's checkpoints and results there and start afresh."
        )
    differences = settings_differences(record, current)
    if differences:
        shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6 else "")
        what = "finished run" if finished else "run"
        raise UsageError(
            f"--output_dir {output_dir} holds a {what} with other settings ({shown}; see {source}): {_HOW}."
        )
    return ("finished" if finished else "resume"), record


def clear_previous_run(output_dir: str) -> list[str]:
    """Delete what a previous run wrote in ``output_dir`` (every ``checkpoint-N``, the model, card, results, logs
    and run record); other files stay. Returns the names removed."""
    removed = []
    for folder in checkpoint_folders(output_dir):
        shutil.rmtree(folder)
        removed.append(os.path.basename(folder))
    for pattern in _RUN_OUTPUTS:
        for path in sorted(glob.glob(os.path.join(glob.escape(output_dir), pattern))):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(os.path.basename(path))
    return removed


class RunRecordCallback(TrainerCallback, ExportableState):
    """Keeps the run's record with its checkpoints (``compressssm_run.json`` in each ``checkpoint-N``: what a
    resume compares and what ``scripts/evaluate.py`` rebuilds the data from) and, with ``--overwrite_output_dir``,
    deletes the previous run's files when training starts (after every check has passed). Main process only.

    The record is written from ``state()`` (`ExportableState`), which the Trainer calls inside ``_save_checkpoint``
    just before ``trainer_state.json`` and before ``save_total_limit`` deletes older checkpoints: ``on_save`` runs
    only after both, and not at all for a preemption checkpoint (``--enable_jit_checkpoint``), so a kill there would
    leave the only checkpoint without its record (see `hf_compressssm.trainer.checkpoint`)."""

    def __init__(self, record: dict[str, Any], overwrite: bool = False) -> None:
        self.record = record
        self.overwrite = overwrite
        self._run = None  # (TrainingArguments, TrainerState) between on_train_begin and on_train_end

    def state(self) -> dict[str, Any]:
        if self._run is not None and self._run[1].global_step > 0:
            args, trainer_state = self._run
            folder = os.path.join(args.output_dir, f"checkpoint-{trainer_state.global_step}")
            if save_in_progress(folder):
                self._write(folder, trainer_state.global_step)
        return {"args": {"record": self.record}, "attributes": {}}

    def _write(self, folder: str, step: int) -> None:
        write_json_atomic(os.path.join(folder, RUN_FILE), {**self.record, "checkpoint_step": step})

    def on_train_end(self, args, state, control, **kwargs):
        self._run = None
        return control

    def on_train_begin(self, args, state, control, **kwargs):
        self._run = (args, state)
        if self.overwrite and state.is_world_process_zero and os.path.isdir(args.output_dir):
            removed = clear_previous_run(args.output_dir)
            if removed:
                logger.warning(
                    f"CompreSSM: --overwrite_output_dir: removed the previous run's {', '.join(removed[:8])}"
                    f"{', ...' if len(removed) > 8 else ''} from {args.output_dir}."
                )
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            self._write(folder, state.global_step)
        return control


# ---------------------------------------------------------------------------------------------------------------- claim
@dataclass
class OutputDirClaim:
    """The outcome of `claim_output_dir`: ``decision`` is "fresh", "resume" or "finished" (``record``: the
    finished run's record); ``callback`` goes to the Trainer."""

    decision: str
    record: dict[str, Any] | None
    callback: RunRecordCallback
    main: bool = True  # this process holds the lock (the main process) and writes the folder


def _share(outcome: dict[str, Any], training_args) -> dict[str, Any]:
    """The main process's ``outcome`` on every process (DDP); unchanged in a single process."""
    if training_args.world_size <= 1:
        return outcome
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return outcome
    box = [outcome]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def claim_output_dir(
    model_args, data_args, training_args, comp_args, checks: Sequence[Callable[[], Any]] = ()
) -> Iterator[OutputDirClaim]:
    """Lock ``--output_dir`` for this run (main process), decide what the run does there (`inspect_output_dir`)
    and release the lock at the end. ``checks`` run on the main process after the decision (a `UsageError` of
    theirs stops every process, e.g. the Hub check of ``--push_to_hub``; not run for a finished run). `UsageError`
    on every process when the folder is another run's, in use, or not writable; nothing is written then (a folder
    created for the lock is removed again)."""
    output_dir = training_args.output_dir
    current = run_settings(model_args, data_args, training_args, comp_args)
    overwrite = bool(model_args.overwrite_output_dir)
    main = training_args.process_index == 0
    lock = OutputDirLock(output_dir) if main else None
    try:
        if main:
            try:
                lock.acquire()
                decision, record = inspect_output_dir(
                    output_dir, current, overwrite=overwrite, resume_from=training_args.resume_from_checkpoint
                )
                if decision != "finished":
                    for check in checks:
                        check()
                outcome: dict[str, Any] = {"decision": decision, "record": record}
            except UsageError as err:
                outcome = {"error": str(err)}
            except Exception as err:  # never leave the other processes waiting for the decision
                outcome = {"error": f"cannot use --output_dir {output_dir}: {type(err).__name__}: {err}"}
        else:
            outcome = {}
        outcome = _share(outcome, training_args)
        if "error" in outcome:
            raise UsageError(outcome["error"])
        yield OutputDirClaim(outcome["decision"], outcome.get("record"), RunRecordCallback(current, overwrite), main)
    finally:
        if lock is not None:
            lock.release()


__all__ = [
    "IGNORED_SETTINGS",
    "LOCK_FILE",
    "OutputDirClaim",
    "OutputDirLock",
    "RUN_FILE",
    "RunRecordCallback",
    "checkpoint_record",
    "claim_output_dir",
    "clear_previous_run",
    "inspect_output_dir",
    "read_run_file",
    "run_settings",
    "settings_differences",
]
