"""Typed-config machinery: dataclass sections, YAML files, dotted overrides, checks naming the key.

Why it sits on the lowest floor: every stage package owns its own config dataclass (beside the
code it configures, as ``data/config.py``, ``clustering/config.py``, ``training/config.py``);
``pipelines/config.py`` composes them into the run config. They all need the same loader and
the same error type, so those live here, below every stage.

Each field carries a docstring (the string literal right after it), which
``megaclass config-help`` prints. Unknown keys and values of the wrong type are errors that
name the dotted key, e.g. ``cluster.k: expected int, got 'many'``. A section lists the allowed
values of its string fields in a class attribute ``CHOICES`` (field -> tuple of values), built
from the registry of the code that owns the choice, so the config accepts exactly what the code
can run.

Overrides on the command line use dotted keys: ``cluster.k=256 train.steps=50``; values are
parsed as YAML scalars (``true``, ``1e-3``, ``[1, 2]``) and then checked like file values.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from megaclass.core.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value or key is invalid; the message names the dotted key."""


# --------------------------------------------------------------------------------------
# Loading, overriding, validating
# --------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> docstring (the string literal following the field in the class body)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(src).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; allow int->float; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected str, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"{where}: unknown key (valid: {', '.join(sorted(names))})")
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else k
        kwargs[k] = _coerce(v, hints[k], key)
        choices = getattr(cls, "CHOICES", {}).get(k)
        if choices is not None and kwargs[k] not in choices:
            raise ConfigError(f"{key}: {kwargs[k]!r} is not one of {', '.join(choices)}")
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["cluster.k=8", "train.lr=1e-3"]`` -> nested dict with YAML-parsed values."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
        # YAML reads "1e-3" as a string; accept it as a float where one is expected later.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in "eE.") else value
            except ValueError:
                pass
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _fix_str_floats(tree: dict[str, Any], cls: type, prefix: str = "") -> None:
    """YAML 1.1 reads '1e-3' as a string: turn such strings into floats where a float is expected."""
    hints = typing.get_type_hints(cls)
    for k, v in list(tree.items()):
        tp = hints.get(k)
        if tp is None:
            continue
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            _fix_str_floats(v, tp, f"{prefix}{k}.")
        elif tp in (float, float | None) and isinstance(v, str):
            try:
                tree[k] = float(v)
            except ValueError:
                pass


def load_tree(
    root: type, path: str | Path | None = None, overrides: list[str] | None = None
) -> Any:
    """Read a YAML file (or the defaults when ``path`` is None) into the dataclass ``root``,
    then apply dotted overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        tree = loaded
    if overrides:
        tree = _merge(tree, parse_overrides(overrides))
    _fix_str_floats(tree, root)
    return _build(root, tree)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any) -> str:
    """The config as YAML, in field order."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_help(root: type) -> str:
    """Every field of every section with its type, default and docstring."""
    lines = []

    def walk(cls: type, prefix: str) -> None:
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                lines.append(f"\n[{key}]  {docs.get(f.name, '')}")
                walk(tp, key + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            choices = getattr(cls, "CHOICES", {}).get(f.name)
            one_of = f", one of {', '.join(choices)}" if choices else ""
            lines.append(
                f"  {key} ({_type_name(tp)}, default {default!r}{one_of}): {docs.get(f.name, '')}"
            )

    walk(root, "")
    return "\n".join(lines).lstrip()
