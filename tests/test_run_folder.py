"""what scripts/train.py does with its --output_dir.

3. A finished run is reported and left alone (exit 0); a non-empty folder that is not a run of the same settings
   is refused (exit 2) unless --overwrite_output_dir, which deletes the old run's checkpoints and results.
4. One run at a time per folder: a lock file (pid, host); a live holder refuses a second run (exit 2), a dead one's
   lock is taken over; in DDP only the main process takes it.
12. A folder that cannot be written: one line, exit 2, nothing written.
"""

import hashlib
import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

from compressssm_app import UsageError, parse_arguments, run_training
from compressssm_app.output_dir import LOCK_FILE, RUN_FILE, OutputDirLock, settings_differences


REPO = Path(__file__).resolve().parent.parent
TINY = ["--preset", "tiny", "--seed", "0", "--max_eval_samples", "2", "--disable_tqdm", "true"]
SAVING = ["--save_strategy", "steps", "--save_steps", "2"]


@pytest.fixture
def hf_warnings(caplog):
    hf_logging.enable_propagation()
    caplog.set_level(logging.WARNING)
    yield caplog
    hf_logging.disable_propagation()


@pytest.fixture(scope="module")
def train_script():
    return importlib.import_module("train")


def _train(out, *extra):
    return run_training(*parse_arguments([*TINY, "--output_dir", str(out), *extra]))


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _one_error(err: str, needle: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and needle in lines[0], err[-3000:]
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run with checkpoints 2, 4, 6 (each with its run record)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    _train(out, *SAVING)
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------------- item 3
def test_rerunning_a_finished_run_changes_nothing(finished, tmp_path, train_script, capsys):
    out = _copy(finished, tmp_path / "run")
    assert (out / "checkpoint-4" / RUN_FILE).is_file(), "each checkpoint carries the run record"
    before = _snapshot(out)
    # the same command, with arguments that do not change the result (logging, saving) changed
    argv = [*TINY, *SAVING, "--output_dir", str(out), "--logging_steps", "1", "--save_total_limit", "2"]
    assert train_script.main(argv) == 0
    stdout = capsys.readouterr().out
    assert stdout.strip().splitlines() == [
        f"{out} already holds the finished run of these settings: nothing to do (pass --overwrite_output_dir to "
        "train it again from scratch, or choose another --output_dir)."
    ]
    assert _snapshot(out) == before, "not one step more, not one file changed"
    results = _train(out, *SAVING)
    assert (
        results["already_finished"]
        and results["state_sizes_after"] == json.loads((out / "config.json").read_text())["state_sizes"]
    )


def test_another_experiment_is_refused_and_overwrite_removes_the_old_run(finished, tmp_path, train_script, capsys):
    out = _copy(finished, tmp_path / "run")
    before = _snapshot(out)
    assert train_script.main([*TINY, "--output_dir", str(out), "--learning_rate", "0.01", "--tau", "0.3"]) == 2
    line = _one_error(capsys.readouterr().err, "holds a finished run with other settings")
    assert "learning_rate: 0.002 there, 0.01 now" in line and "tau: 0.2 there, 0.3 now" in line
    assert "--overwrite_output_dir" in line
    assert _snapshot(out) == before

    # --overwrite_output_dir: a fresh run; the old checkpoints go (a later resume cannot pick them), results replaced
    assert (
        train_script.main([*TINY, "--output_dir", str(out), "--learning_rate", "0.01", "--overwrite_output_dir"]) == 0
    )
    assert not list(out.glob("checkpoint-*"))
    record = json.loads((out / RUN_FILE).read_text())
    assert record["training"]["learning_rate"] == 0.01 and "results" in record
    assert not (out / LOCK_FILE).exists()
    capsys.readouterr()
    assert train_script.main([*TINY, "--output_dir", str(out), "--learning_rate", "0.01"]) == 0
    assert "already holds the finished run" in capsys.readouterr().out


def test_a_folder_with_other_files_is_refused_unless_overwrite(tmp_path, train_script, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    assert train_script.main([*TINY, "--output_dir", str(out)]) == 2
    _one_error(capsys.readouterr().err, "is not empty (notes.txt) and holds no run record")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert train_script.main([*TINY, "--output_dir", str(out), "--overwrite_output_dir"]) == 0
    assert (out / "notes.txt").read_text() == "my notes", "only what a run writes is replaced"
    assert (out / "model.safetensors").is_file()


def test_an_unfinished_run_resumes_only_with_the_same_settings(finished, tmp_path, train_script, capsys, hf_warnings):
    out = _copy(finished, tmp_path / "run")
    for name in (RUN_FILE, "model.safetensors"):  # as if killed after the last checkpoint, before the final save
        (out / name).unlink()
    assert train_script.main([*TINY, *SAVING, "--output_dir", str(out), "--seed", "1"]) == 2
    line = _one_error(capsys.readouterr().err, "holds a run with other settings (seed: 0 there, 1 now")
    assert str(out / "checkpoint-6" / RUN_FILE) in line
    assert train_script.main([*TINY, *SAVING, "--output_dir", str(out)]) == 0
    assert f"resuming from {out / 'checkpoint-6'}" in hf_warnings.text
    assert "results" in json.loads((out / RUN_FILE).read_text())

    # checkpoints that carry no run record (an older version): refused, naming --resume_from_checkpoint
    legacy = _copy(finished, tmp_path / "legacy")
    for path in [legacy / RUN_FILE, *legacy.glob(f"checkpoint-*/{RUN_FILE}")]:
        path.unlink()
    assert train_script.main([*TINY, *SAVING, "--output_dir", str(legacy)]) == 2
    _one_error(capsys.readouterr().err, f"pass --resume_from_checkpoint {legacy}/checkpoint-N")


def test_settings_that_do_not_change_the_result_are_ignored():
    args = parse_arguments([*TINY, "--output_dir", "a"])
    from compressssm_app.output_dir import run_settings

    base = run_settings(args[0], args[1], args[2], args[3])
    other = parse_arguments(
        [*TINY, "--output_dir", "b", "--logging_steps", "1", "--report_to", "tensorboard", "--save_strategy", "steps"]
        + ["--overwrite_output_dir", "--push_to_hub", "--hub_model_id", "me/x", "--preprocessing_num_workers", "2"]
    )
    assert settings_differences(base, run_settings(other[0], other[1], other[2], other[3])) == []
    changed = parse_arguments([*TINY, "--output_dir", "a", "--block_size", "32", "--hidden_size", "16"])
    assert settings_differences(base, run_settings(changed[0], changed[1], changed[2], changed[3])) == [
        "hidden_size: 32 there, 16 now",  # model arguments first, then data
        "block_size: 64 there, 32 now",
    ]
    legacy = {k: v for k, v in base.items() if k not in ("training", "compression")}
    assert settings_differences(legacy, base) == [
        "its training arguments are not recorded (written by an older version)",
        "its compression arguments are not recorded (written by an older version)",
    ]


# ---------------------------------------------------------------------------------------------------- item 4
HOLD = """
import sys, time
sys.path[:0] = [{repo!r}, {repo!r} + '/scripts']
from compressssm_app.output_dir import OutputDirLock
lock = OutputDirLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path, train_script, capsys, hf_warnings):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(repo=str(REPO)), str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert train_script.main([*TINY, "--output_dir", str(out)]) == 2
        line = _one_error(capsys.readouterr().err, f"--output_dir {out} is in use by another run")
        assert f"pid {holder.pid} on host {socket.gethostname()}" in line and "another --output_dir" in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE], "the second run wrote nothing"
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: a stale lock is left behind
        holder.wait()
    assert (out / LOCK_FILE).is_file()
    assert train_script.main([*TINY, "--output_dir", str(out)]) == 0
    assert f"taking over the stale lock of {out} (pid {holder.pid}" in hf_warnings.text
    assert (out / "model.safetensors").is_file() and not (out / LOCK_FILE).exists(), "removed at exit"


def test_lock_file_rules(tmp_path, hf_warnings):
    out = tmp_path / "run"
    first = OutputDirLock(out)
    first.acquire()
    with pytest.raises(UsageError, match=f"pid {os.getpid()} on host"):
        OutputDirLock(out).acquire()
    first.release()
    assert not out.exists(), "a folder made only for the lock goes with it"

    out.mkdir()
    lock = out / LOCK_FILE
    lock.write_text(json.dumps({"pid": 1, "host": "another-machine"}))  # cannot tell: refuse, say how to proceed
    with pytest.raises(UsageError, match=f"on another machine\\), delete {lock}"):
        OutputDirLock(out).acquire()
    lock.write_text("{")  # a crash while the lock was written, long ago
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with OutputDirLock(out) as taken:
        assert json.loads(lock.read_text())["pid"] == os.getpid() and taken.held
    assert "removing the unreadable lock file" in hf_warnings.text
    assert not lock.exists() and out.is_dir(), "the folder existed before: it stays"


@pytest.mark.slow
def test_ddp_ranks_share_the_lock_decision(tmp_path):
    """torchrun with 2 ranks on a folder another process holds: both ranks stop at once with the error (only the
    main process looks at the lock; the other must not wait forever for it)."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(repo=str(REPO)), str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
            + [str(REPO / "scripts" / "train.py"), *TINY, "--output_dir", str(out)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "train.py: error:" in line]
    assert len(errors) == 2 and all(f"pid {holder.pid}" in e for e in errors), proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


# ---------------------------------------------------------------------------------------------------- item 12
def test_an_output_dir_that_cannot_be_written(tmp_path, train_script, capsys, monkeypatch):
    """Tests run as root, where a read-only mode does not stop writes: a path under a regular file fails for
    root too, and a refused write (EACCES, EROFS) is simulated on the lock file."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert train_script.main([*TINY, "--output_dir", str(a_file / "out")]) == 2
    _one_error(capsys.readouterr().err, f"{a_file} is a file, not a folder; choose another --output_dir")
    assert train_script.main([*TINY, "--output_dir", str(a_file)]) == 2
    _one_error(capsys.readouterr().err, "is a file, not a folder")

    import errno

    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).endswith(LOCK_FILE):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    out = tmp_path / "ro" / "out"
    assert train_script.main([*TINY, "--output_dir", str(out)]) == 2
    _one_error(capsys.readouterr().err, f"cannot write to --output_dir {out}: Read-only file system")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"], "nothing written"
