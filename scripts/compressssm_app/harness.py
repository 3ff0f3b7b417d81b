"""The benchmark harness: a resumable results file, runs in forked children, and where the code came from.

* `ResultsStore` – an append-only JSON-lines file: each finished run is written at once (one line, flushed and
  fsynced), a rerun skips what is done, and runs measured with other settings or another commit are detected.
* `in_child` – run a function in a forked child (clean peak memory per run, a crash costs one run).
* `git_state` – the commit and the changed files of the checkout.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = [
    "ResultsMismatchError",
    "ResultsStore",
    "fingerprint",
    "git_state",
    "in_child",
]


# ----------------------------------------------------------------------------------------------------------------
# Results store
# ----------------------------------------------------------------------------------------------------------------


class ResultsMismatchError(ValueError):
    """The results file holds runs measured with other settings than the ones asked for now."""


def fingerprint(settings: Any) -> str:
    """A short stable hash of JSON-serialisable ``settings`` (key order does not matter)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ResultsStore:
    """Finished runs in an append-only JSON-lines file, one record per line::

        {"id": "causal_lm/full/seed0", "group": "causal_lm", "fingerprint": "…", "commit": "…",
         "finished": "2026-…", "result": {…}}

    ``fingerprints`` maps each group (e.g. a task) to the hash of the settings its runs depend on. Opening a file
    whose records of a group carry another fingerprint raises `ResultsMismatchError` (naming the groups; pass
    ``fresh=True`` to discard the file, or use another path); groups not named in ``fingerprints`` are kept as they
    are. Records measured at another commit are reused and listed in `other_commits`. A torn last line (a run
    killed while writing) is dropped. Each `add` writes one line, flushed and fsynced, before returning.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fingerprints: Mapping[str, str],
        commit: str | None = None,
        fresh: bool = False,
    ):
        self.path = Path(path)
        self.fingerprints = dict(fingerprints)
        self.commit = commit
        self.records: dict[str, dict[str, Any]] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and self.path.exists():
            self.path.unlink()
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        lines = self.path.read_text().splitlines()
        good: list[str] = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                record["id"], record["result"]  # noqa: B018 - a record must have both
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                if number == len(lines):  # a run killed while its line was written
                    logger.warning(f"{self.path}: dropping a torn last line ({err}).")
                    self._rewrite(good)
                    break
                raise ResultsMismatchError(
                    f"{self.path} line {number} is not a results record ({err}); move the file away or pass fresh."
                ) from err
            good.append(line)
            self.records[record["id"]] = record
        changed = sorted(
            {
                r.get("group")
                for r in self.records.values()
                if r.get("group") in self.fingerprints and r.get("fingerprint") != self.fingerprints[r.get("group")]
            }
        )
        if changed:
            raise ResultsMismatchError(
                f"{self.path} holds runs of {', '.join(changed)} measured with other settings than now (the preset "
                "or the command changed). Rerun the same command to resume, use another output directory, or "
                "start over with --fresh (discards the file)."
            )

    def _rewrite(self, lines: list[str]) -> None:
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(f"{line}\n" for line in lines))
        os.replace(tmp, self.path)

    @property
    def other_commits(self) -> dict[str, int]:
        """Commits (other than the current one) that records were measured at, with their counts."""
        counts: dict[str, int] = {}
        for r in self.records.values():
            if r.get("commit") != self.commit:
                counts[str(r.get("commit"))] = counts.get(str(r.get("commit")), 0) + 1
        return counts

    def get(self, run_id: str) -> dict[str, Any] | None:
        """The stored result of ``run_id``, or None when it has not run yet."""
        record = self.records.get(run_id)
        return None if record is None else record["result"]

    def add(self, run_id: str, group: str, result: Mapping[str, Any]) -> None:
        """Append one finished run (flushed and fsynced before returning)."""
        if group not in self.fingerprints:
            raise KeyError(f"unknown group {group!r}; known: {sorted(self.fingerprints)}")
        record = {
            "id": run_id,
            "group": group,
            "fingerprint": self.fingerprints[group],
            "commit": self.commit,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "result": dict(result),
        }
        line = json.dumps(record)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[run_id] = record

    def results(self, group: str | None = None) -> list[dict[str, Any]]:
        """Results in file order, optionally of one group."""
        return [r["result"] for r in self.records.values() if group is None or r.get("group") == group]


# ----------------------------------------------------------------------------------------------------------------
# Processes and provenance
# ----------------------------------------------------------------------------------------------------------------


def _child(target: Callable[..., Any], result_path: str, *args: Any) -> None:
    try:
        payload = {"ok": True, "result": target(*args)}
    except BaseException as err:  # report anything, KeyboardInterrupt included, to the parent
        payload = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        with open(result_path, "w") as f:
            json.dump(payload, f)
        raise
    with open(result_path, "w") as f:
        json.dump(payload, f)


def in_child(target: Callable[..., Any], *args: Any) -> Any:
    """``target(*args)`` in a forked child process; returns its (JSON-serialisable) result, or raises
    `RuntimeError` with the child's traceback."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        path = handle.name
    try:
        proc = mp.get_context("fork").Process(target=_child, args=(target, path, *args))
        proc.start()
        proc.join()
        try:
            with open(path) as f:
                payload = json.load(f)
        except (OSError, json.JSONDecodeError):
            payload = {"ok": False, "error": f"child exited with code {proc.exitcode} and no result"}
    finally:
        os.unlink(path)
    if not payload["ok"]:
        raise RuntimeError(f"{payload['error']}\n{payload.get('traceback', '')}")
    return payload["result"]


def git_state(directory: str | os.PathLike, paths: Sequence[str] = ("hf_compressssm", "scripts")) -> dict[str, Any]:
    """``{"commit": HEAD or None, "dirty": changed files under ``paths`` or None}`` of the checkout at ``directory``."""

    def git(*argv: str) -> str | None:
        try:
            out = subprocess.run(["git", *argv], cwd=directory, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", *paths)
    return {
        "commit": head.strip() or None if head else None,
        "dirty": None if status is None else [line[3:] for line in status.splitlines() if line.strip()],
    }
