"""Dataclass configs that *are* the CLI (after sparsify's `config.py`).

Each field's attribute docstring (the string literal on the line after it) becomes its `--help` text,
so a field is documented once and the flag can never drift from the config.

    @dataclass
    class TrainConfig:
        lr: float = 1e-4
        \"\"\"Peak learning rate.\"\"\"

    cfg = parse_config(TrainConfig)          # --lr 3e-4 ...
    cfg = from_dict(TrainConfig, toml_table) # unknown keys are an error, not silently ignored
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import inspect
import json
import textwrap
import types
import typing
from functools import cache
from typing import Any, TypeVar

T = TypeVar("T")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (and its bases), read from the source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) for `X | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(tp: Any, value: Any, name: str) -> Any:
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"config field {name!r} may not be None")
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(base) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        items = [_coerce(inner, v, name) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is typing.Literal:
        if value not in typing.get_args(base):
            raise ValueError(f"config field {name!r} must be one of {typing.get_args(base)}, got {value!r}")
        return value
    if base is bool:
        if isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"config field {name!r} expects a boolean, got {value!r}")
        return bool(value)
    if base in (int, float, str):
        try:
            out = base(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"config field {name!r} expects {base.__name__}, got {value!r}") from e
        if base is int and isinstance(value, float) and value != out:
            raise ValueError(f"config field {name!r} expects an integer, got {value!r}")
        return out
    if dataclasses.is_dataclass(base) and isinstance(value, dict):
        return from_dict(base, value)
    return value


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build `cls` from a dict (a TOML table, a saved cfg.json). Unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    hints = _resolved_types(cls)
    kwargs = {k: _coerce(hints[k], v, k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_hash(cfg: Any) -> str:
    """Stable short hash of a resolved config: the key that says whether a stage must be redone."""
    blob = json.dumps(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--field-name` flag per dataclass field, help text from its attribute docstring."""
    docs, hints = field_docs(cls), _resolved_types(cls)
    for f in dataclasses.fields(cls):
        if f.init:
            _add_one(parser, f, hints[f.name], docs, f.name, "--" + f.name.replace("_", "-"))


def parse_config(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip().split("\n")[0])
    add_arguments(parser, cls)
    ns = parser.parse_args(argv)
    return from_dict(cls, vars(ns))


def replace(cfg: T, **changes: Any) -> T:
    return from_dict(type(cfg), {**dataclasses.asdict(cfg), **changes})  # type: ignore[arg-type]


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, title: str | None = None) -> None:
    """`add_arguments` for `cls` and, in a group each, for its dataclass-typed fields (one level: e.g.
    TrainConfig's `crosscoder`), whose flags are the nested field names, or `--<field>-<name>` where a
    name is taken by the outer config. Read the parsed namespace back with `config_from_arguments`."""
    hints = _resolved_types(cls)
    nested = {f.name: _base_type(hints[f.name])[0] for f in dataclasses.fields(cls)
              if dataclasses.is_dataclass(_base_type(hints[f.name])[0])}
    outer = parser.add_argument_group(title or cls.__name__)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.init and f.name not in nested:
            _add_one(outer, f, hints[f.name], docs, f.name, "--" + f.name.replace("_", "-"))
    taken = {f.name for f in dataclasses.fields(cls)}
    for name, sub in nested.items():
        group = parser.add_argument_group(f"{name} ({sub.__name__})")
        sub_docs, sub_hints = field_docs(sub), _resolved_types(sub)
        for f in dataclasses.fields(sub):
            if f.init and not dataclasses.is_dataclass(_base_type(sub_hints[f.name])[0]):
                flag = f"{name}-{f.name}" if f.name in taken else f.name
                _add_one(group, f, sub_hints[f.name], sub_docs, f"{name}.{f.name}", "--" + flag.replace("_", "-"))


def _add_one(group, f: dataclasses.Field, hint: Any, docs: dict[str, str], dest: str, flag: str) -> None:
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
    )
    base, _ = _base_type(hint)
    help_text = f"{docs.get(f.name, '')} (default: {default!r})".strip()
    if typing.get_origin(base) is typing.Literal:
        help_text += f" choices: {', '.join(map(str, typing.get_args(base)))}"
    group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"),
                       metavar=f.name.upper())


def config_from_arguments(cfg: T, ns: dict[str, Any]) -> T:
    """`cfg` with the flags given (the namespace of `add_config_arguments`; absent flags keep `cfg`'s values)."""
    data = to_dict(cfg)
    for dest, value in ns.items():
        outer, _, inner = dest.partition(".")
        if inner:
            data[outer][inner] = value
        else:
            data[outer] = value
    return from_dict(type(cfg), data)
