"""Bring a saved folder's remote code up to date: ``python -m hf_compressssm upgrade FOLDER``.

A folder written by ``save_pretrained`` carries the package's configuration/modeling files (and the sibling files
they import) next to the weights, and ``config.json`` ``auto_map`` points at them. Folders saved by older versions
carry older files, which may import transformers names that no longer exist. `upgrade_folder` rewrites those files
and ``auto_map`` to what a fresh ``save_pretrained`` of the installed package writes, without touching weights or any
other file. The file set is discovered, not listed: each class's module file plus its single-dot relative imports
(recursively), as ``transformers.dynamic_module_utils.custom_object_save`` copies them.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


CONFIG_FILE = "config.json"


class UpgradeError(ValueError):
    """A folder that cannot be upgraded; the message names the problem and the fix."""


@dataclass
class _Plan:
    """What `upgrade_folder` would do to one folder."""

    folder: Path
    write: dict[str, bytes] = field(default_factory=dict)  # file name -> the package's current bytes
    remove: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None  # the new config.json content, None when auto_map is already current
    changes: list[str] = field(default_factory=list)


def _package_classes() -> dict[str, tuple[type, list[type]]]:
    """``model_type -> (config class, model classes marked for an Auto class)`` from the package's public names."""
    from transformers import PreTrainedModel

    from .. import models  # the package's __init__ has marked the classes for their Auto classes

    families: dict[str, tuple[type, list[type]]] = {}
    for name in models.__all__:
        obj = getattr(models, name)
        if not (isinstance(obj, type) and issubclass(obj, PreTrainedModel)):
            continue
        config_class = obj.config_class
        if getattr(config_class, "_auto_class", None) is None:
            continue
        entry = families.setdefault(config_class.model_type, (config_class, []))
        if getattr(obj, "_auto_class", None) is not None:
            entry[1].append(obj)
    return families


def _module_name(cls: type) -> str:
    """The ``auto_map`` module of ``cls``: the last part of its module name (as transformers writes it)."""
    return cls.__module__.rsplit(".", 1)[-1]


def _auto_map_value(cls: type) -> str:
    return f"{_module_name(cls)}.{cls.__name__}"


def _relative_imports(path: Path) -> list[str]:
    """Module names ``x`` of the single-dot relative imports (``from .x import ...``) in the file at ``path``."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            names.append(node.module.split(".")[0])
    return names


def code_files(module_files: list[Path], *, strict: bool = True) -> dict[str, Path]:
    """``module_files`` and every sibling file they import with single-dot relative imports, recursively.

    ``from . import x`` is not followed: transformers neither copies nor caches such a file for remote code.
    Returns ``file name -> path``. A relative import without a sibling ``.py`` file raises `FileNotFoundError` when
    ``strict`` (the package's own files), and is skipped otherwise (a saved folder's old files).
    """
    found: dict[str, Path] = {}
    todo = [Path(f) for f in module_files]
    while todo:
        path = todo.pop()
        if path.name in found:
            continue
        if not path.is_file():
            if strict:
                raise FileNotFoundError(f"{path} is imported by the package's remote code but does not exist.")
            continue
        found[path.name] = path
        todo.extend(path.parent / f"{name}.py" for name in _relative_imports(path))
    return found


def _module_of(value: Any) -> str | None:
    """The module part of an ``auto_map`` value (``"module.Class"``, or a tokenizer's ``[slow, fast]`` pair)."""
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if v), None)
    return value.split(".")[0] if isinstance(value, str) and "." in value else None


def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise UpgradeError(f"{folder} is not a folder: pass the folder the model was saved to (it holds config.json).")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UpgradeError(
            f"{folder} has no {CONFIG_FILE}: pass the folder save_pretrained wrote (config.json next to the weights)."
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UpgradeError(f"{path} is not readable JSON ({error}): restore it from the original save.") from error
    if not isinstance(config, dict):
        raise UpgradeError(f"{path} is not a JSON object: restore it from the original save.")
    return config


def _plan(folder: str | os.PathLike) -> _Plan:
    folder = Path(folder)
    config = _read_config(folder)
    families = _package_classes()
    model_type = config.get("model_type")
    if model_type not in families:
        raise UpgradeError(
            f"{folder / CONFIG_FILE} has model_type {model_type!r}, not one of hf_compressssm's "
            f"({', '.join(sorted(families))}): only folders saved by hf_compressssm models can be upgraded."
        )
    config_class, model_classes = families[model_type]
    old_map = config.get("auto_map") or {}
    if not isinstance(old_map, dict):
        raise UpgradeError(f"{folder / CONFIG_FILE} has an auto_map that is not an object: restore it.")

    # The model classes the folder holds: those whose Auto class its auto_map names, else those in `architectures`.
    held = [cls for cls in model_classes if cls._auto_class in old_map]
    if not held:
        architectures = config.get("architectures") or []
        held = [cls for cls in model_classes if cls.__name__ in architectures]
    new_entries = {config_class._auto_class: _auto_map_value(config_class)}
    new_entries.update({cls._auto_class: _auto_map_value(cls) for cls in held})

    module_files = [Path(sys.modules[cls.__module__].__file__) for cls in (config_class, *held)]
    new_files = code_files(module_files)
    # Our files in the folder: the modules the old auto_map names for the entries we rewrite, and their imports.
    old_modules = {_module_of(old_map[key]) for key in new_entries if key in old_map}
    old_files = code_files([folder / f"{m}.py" for m in old_modules if m], strict=False)
    ours = {Path(name).stem for name in (*old_files, *new_files)}

    plan = _Plan(folder)
    for name, source in sorted(new_files.items()):
        data = source.read_bytes()
        target = folder / name
        if not target.is_file() or target.read_bytes() != data:
            plan.write[name] = data
            plan.changes.append(f"{'updated' if target.exists() else 'added'} {name}")

    auto_map: dict[str, Any] = {}
    for key, value in old_map.items():
        if key in new_entries:
            auto_map[key] = new_entries[key]
        elif _module_of(value) not in ours:  # not ours (e.g. a tokenizer's): kept as is
            auto_map[key] = value
    auto_map.update({key: value for key, value in new_entries.items() if key not in auto_map})
    auto_map = dict(sorted(auto_map.items()))  # transformers writes config.json with sorted keys
    if auto_map != old_map:
        plan.config = {**config, "auto_map": auto_map}  # same key order, only auto_map's value replaced
        plan.changes.append(f"rewrote auto_map in {CONFIG_FILE}")

    still_named = {_module_of(value) for value in auto_map.values()}
    for name in sorted(old_files):
        if name.endswith(".py") and name not in new_files and Path(name).stem not in still_named:
            plan.remove.append(name)
            plan.changes.append(f"removed {name}")
    return plan


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder (fsync, then `os.replace`)."""
    if path.exists():
        mode = path.stat().st_mode & 0o777
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folder_needs_upgrade(folder: str | os.PathLike) -> bool:
    """True when `upgrade_folder` would change ``folder``: a shipped code file is missing or differs from the
    package's current one (byte for byte), ``auto_map`` differs from a fresh save's, or an obsolete code file is left.

    Raises `UpgradeError` for a folder that is not a saved hf_compressssm model.
    """
    return bool(_plan(folder).changes)


def upgrade_folder(folder: str | os.PathLike) -> list[str]:
    """Rewrite ``folder``'s remote-code files and ``config.json`` ``auto_map`` to what the installed package's
    ``save_pretrained`` writes today; returns what changed (empty when already current).

    Each file is replaced atomically; ``config.json`` is rewritten after the code files with only ``auto_map``
    changed, then code files of ours that the new set no longer needs (``.py`` files the old ``auto_map`` modules
    are or import) are removed. Weights and every other file are left alone. Raises `UpgradeError` (message: the
    problem and the fix) for a path that is not a folder, a folder without ``config.json``, or a foreign model_type.
    """
    plan = _plan(folder)
    for name, data in plan.write.items():
        _atomic_write(plan.folder / name, data)
    if plan.write:
        _fsync_dir(plan.folder)  # the new code is on disk before config.json points at it
    if plan.config is not None:
        text = json.dumps(plan.config, indent=2) + "\n"
        _atomic_write(plan.folder / CONFIG_FILE, text.encode("utf-8"))
    for name in plan.remove:
        (plan.folder / name).unlink()
    if plan.changes:
        _fsync_dir(plan.folder)
    return plan.changes


__all__ = ["UpgradeError", "code_files", "folder_needs_upgrade", "upgrade_folder"]
