"""The presets of the scripts: one YAML file per preset under ``configs/presets/<script>/`` (``train``,
``benchmark``, ``score_study``), read by `load_preset` for all three.

A preset file is a mapping of field names to values. Two keys are the loader's own: ``extends: NAME`` starts
from the preset NAME of the same script (its values, then this file's on top), and ``order: N`` places the preset
among the others (`preset_names`; by name when equal). What the fields mean is the script's business (`preset_into`
checks them against a dataclass).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any


PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "presets"
_OWN_KEYS = ("extends", "order")


class PresetError(ValueError):
    """A preset that does not exist, or a file that is not a valid preset."""


def _folder(script: str) -> Path:
    return PRESETS_DIR / script


def _read(script: str, name: str) -> dict[str, Any]:
    path = _folder(script) / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(preset_names(script)) or "none"
        raise PresetError(f"unknown preset {name!r}; choose one of {known} (files in {_folder(script)}).")
    try:
        import yaml
    except ImportError as err:
        raise PresetError('the presets are YAML files: `pip install pyyaml` (or ".[scripts]").') from err
    values = yaml.safe_load(path.read_text(encoding="utf-8"))
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise PresetError(f"{path} must hold a mapping of field names to values.")
    return values


def preset_names(script: str) -> list[str]:
    """The presets of ``script`` (the YAML files of its folder), by their ``order`` key, then by name."""
    import yaml

    files = sorted(_folder(script).glob("*.yaml"))
    orders = {f.stem: (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("order", 0) for f in files}
    return sorted(orders, key=lambda name: (orders[name], name))


def preset_chain(script: str, name: str) -> list[dict[str, Any]]:
    """Preset ``name`` of ``script`` and the presets it ``extends``, the farthest base first, without the loader's
    own keys (a script whose fields nest, like ``train``'s per-task values, merges them itself)."""
    seen: list[str] = []
    chain: list[dict[str, Any]] = []
    current: str | None = name
    while current is not None:
        if current in seen:
            raise PresetError(f"preset {name!r} of {script}: circular 'extends' ({' -> '.join([*seen, current])}).")
        seen.append(current)
        values = _read(script, current)
        chain.append({k: v for k, v in values.items() if k not in _OWN_KEYS})
        current = values.get("extends")
    return chain[::-1]


def load_preset(script: str, name: str) -> dict[str, Any]:
    """The values of preset ``name`` of ``script``: those of the presets it ``extends``, then its own."""
    merged: dict[str, Any] = {}
    for values in preset_chain(script, name):
        merged.update(values)
    return merged


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against the annotation ``hint`` (int → float where a float is expected)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _check_type(value, option, where)
            except PresetError as err:
                errors.append(str(err))
        raise PresetError(errors[0] if errors else f"{where}: {value!r} is not allowed")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise PresetError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise PresetError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


def preset_into(cls: type, values: dict[str, Any], where: str = "preset") -> Any:
    """``cls(**values)`` for a dataclass ``cls``, each value checked against its field's type (unknown fields and
    wrong types raise `PresetError` naming the field)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise PresetError(f"{where}: unknown field(s) {', '.join(unknown)}; fields: {', '.join(sorted(names))}.")
    return cls(**{k: _check_type(v, hints[k], f"{where}: {k}") for k, v in values.items()})


__all__ = ["PRESETS_DIR", "PresetError", "load_preset", "preset_chain", "preset_into", "preset_names"]
