"""Typed job configs: sectioned dataclasses, named presets, ``key=value`` overrides.

Every job (pretrain, dense, prune, sweep, bridge) has one dataclass built from
sections. A config is resolved in three layers: the dataclass defaults, a
preset from ``sparse_lm/presets/<name>.json`` (package data, so an installed
wheel has them too; or any JSON path), then command-line overrides such as
``train.steps=200`` or ``model.d_model=128``. Unknown keys and values of the
wrong type are errors that name the key and the allowed choices; the resolved
config is saved as JSON next to every output.

A section may list renamed keys in a class attribute ``RENAMED = {old: new}``.
In presets and overrides an old name is an error that says what to rename it to;
in saved run configs (:func:`load`, ``legacy=True``) it is read under its new
name with a DeprecationWarning, so runs written before the rename still resume.

Fields carry their documentation in ``metadata["help"]`` (see :func:`field`),
so ``describe()`` can print every knob with its meaning.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from sparse_lm.io import write_json

# Presets are package data (pyproject.toml package-data), found beside this module in a checkout and a wheel alike.
PRESET_DIR = Path(__file__).resolve().parent / "presets"

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be resolved: unknown key, wrong type, bad value."""


def field(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field with a help string (mutable defaults become factories)."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def section(cls: type[T], help: str = "") -> Any:
    return dataclasses.field(default_factory=cls, metadata={"help": help})


# ---------------------------------------------------------------------------
# type checking / coercion


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; convert where lossless (int->float)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(value, opt, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} is not {' or '.join(_type_name(o) for o in options)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in get_args(tp))}")
        return value
    if origin in (list, tuple):
        (inner, *_) = get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _renamed(cls: type, data: dict[str, Any], prefix: str, legacy: bool) -> dict[str, Any]:
    """Old key names of ``cls.RENAMED``: mapped (saved configs, ``legacy``) or an error that says the new name."""
    renamed = {old: new for old, new in getattr(cls, "RENAMED", {}).items() if old in data}
    if not renamed:
        return data
    what = ", ".join(f"{prefix}{old} -> {prefix}{new}" for old, new in renamed.items())
    if not legacy:
        raise ConfigError(f"renamed config key{'s' if len(renamed) > 1 else ''}: {what}; use the new name")
    import warnings

    warnings.warn(f"saved config uses old key names ({what}); read under the new names", DeprecationWarning,
                  stacklevel=3)
    out = {k: v for k, v in data.items() if k not in renamed}
    for old, new in renamed.items():
        if new in out:
            raise ConfigError(f"saved config has both {prefix}{old} and {prefix}{new}: keep only {prefix}{new}")
        out[new] = data[old]
    return out


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "", legacy: bool = False) -> T:
    """Build ``cls`` from a (nested) dict; unknown keys and bad types raise ConfigError.

    ``legacy``: the dict is a saved config; keys a section renamed are read under their new names.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    data = _renamed(cls, data, prefix, legacy)
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(prefix + k for k in unknown)}; known keys of {prefix or cls.__name__ + '.'}: "
            f"{', '.join(sorted(names))}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, value, key = hints[f.name], data[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = from_dict(tp, value, prefix=key + ".", legacy=legacy)
        else:
            kwargs[f.name] = _coerce(value, tp, key)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``"train.steps=200"`` -> ``{"train": {"steps": 200}}`` (value parsed as JSON if it can be)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.steps=200)")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = {"none": None, "null": None, "True": True, "False": False}.get(raw, raw)
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def list_presets(job: str | None = None) -> list[str]:
    """Names of the packaged presets (of one job when given)."""
    names = []
    for p in sorted(PRESET_DIR.glob("*.json")):
        if job is None or json.loads(p.read_text()).get("job") == job:
            names.append(p.stem)
    return names


def read_preset(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ConfigError(
            f"no preset {name_or_path!r} (looked for {path}); presets: {', '.join(list_presets()) or 'none'}"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"preset {path} is not valid JSON: {e}") from e


def resolve(cls: type[T], job: str, preset: str | None = None, overrides: list[str] | None = None) -> T:
    """Defaults <- preset <- overrides, checked against ``cls``."""
    data: dict[str, Any] = {}
    if preset:
        raw = read_preset(preset)
        preset_job = raw.pop("job", job)
        if preset_job != job:
            raise ConfigError(
                f"preset {preset!r} is a {preset_job!r} preset, not {job!r}; "
                f"{job} presets: {', '.join(list_presets(job)) or 'none'}"
            )
        raw.pop("description", None)
        data = merge(data, raw)
    for o in overrides or []:
        data = merge(data, parse_override(o))
    return from_dict(cls, data)


def save(obj: Any, path: str | Path, job: str | None = None) -> None:
    d = to_dict(obj)
    if job:
        d = {"job": job, **d}
    write_json(path, d)


def load(cls: type[T], path: str | Path) -> T:
    """A config saved by :func:`save` (old key names of renamed sections are still read)."""
    data = json.loads(Path(path).read_text())
    data.pop("job", None)
    return from_dict(cls, data, legacy=True)


def describe(cls_or_obj: Any, prefix: str = "") -> str:
    """One line per field: ``key = value  # help``."""
    lines = []
    obj = cls_or_obj if not isinstance(cls_or_obj, type) else cls_or_obj()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"[{prefix}{f.name}]  {f.metadata.get('help', '')}".rstrip())
            lines.append(describe(value, prefix + f.name + "."))
        else:
            lines.append(f"{prefix}{f.name} = {json.dumps(value)}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)
