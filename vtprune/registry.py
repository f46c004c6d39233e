"""Method registry: name -> policy class, plus spec-string parsing.

Third-party methods register through the entry-point group ``vtprune.methods`` (each entry point
resolves to a policy class with a ``name``), or by calling :func:`register` directly.

Spec strings: ``"fastv:layer=2,keep=0.5"``; several policies compose with ``+``:
``"hiprune:keep=192 + fastv:layer=2,keep=0.5"``; list values separate items with ``|``:
``"transprune:prune_layers=7|9|12"``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from importlib.metadata import entry_points
from typing import Any

from .policy import Policy

_REGISTRY: dict[str, type[Policy]] = {}
_LOADED = False


def register(cls: type[Policy]) -> type[Policy]:
    """Class decorator: register a policy class under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    _REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import vtprune.methods  # noqa: F401  (registers the built-in methods)

    for ep in entry_points(group="vtprune.methods"):
        cls = ep.load()
        register(cls)


def registered() -> dict[str, type[Policy]]:
    _load()
    return dict(sorted(_REGISTRY.items()))


def methods() -> dict[str, str]:
    """Registered methods with a one-line description each."""
    return {name: cls.description for name, cls in registered().items()}


def _coerce(text: str) -> Any:
    t = text.strip()
    if "|" in t:  # a list value: "prune_layers=7|9|12"
        return tuple(_coerce(x) for x in t.split("|") if x.strip())
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return t


def parse_spec(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """``"a:x=1,y=0.5 + b"`` -> ``[("a", {"x": 1, "y": 0.5}), ("b", {})]``; raises ``ValueError``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty method spec; use e.g. 'fastv:layer=2,keep=0.5' (see vtprune.methods())")
    out = []
    for part in spec.split("+"):
        part = part.strip()
        if not part:
            raise ValueError(f"malformed method spec {spec!r}: empty part around '+'")
        name, _, rest = part.partition(":")
        name = name.strip()
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"malformed method spec {spec!r}: bad method name {name!r}")
        params: dict[str, Any] = {}
        if rest.strip():
            for item in rest.split(","):
                key, eq, val = item.partition("=")
                key = key.strip()
                if not eq or not key.isidentifier() or not val.strip():
                    raise ValueError(
                        f"malformed method spec {spec!r}: expected 'name:key=value,key=value', got {item!r}"
                    )
                params[key] = _coerce(val)
        out.append((name, params))
    return out


def _type_matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the field type ``tp`` (unions, None, bool, int, float, str, tuples).

    A ``tuple[X, ...]`` field also takes a single ``X`` or a string (methods accept ``7`` and ``"7/9/12"``
    and parse them themselves); an int fits a float field; unknown types are not checked.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item = args[0] if len(args) == 1 else Any
        if isinstance(value, (tuple, list)):
            return all(_type_matches(v, item) for v in value)
        return isinstance(value, str) or _type_matches(value, item)
    return True


def _describe(tp: Any) -> str:
    """``int | float | None`` -> ``"an int or a float (or None)"``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        parts = [_describe(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return text + (" (or None)" if type(None) in args else "")
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        inner = _describe(args[0]).split(" ", 1)[-1] if len(args) == 1 else "value"
        return f"a list of {inner}s ('a|b|c')"
    names = {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def check_param_types(cls: type[Policy], params: dict[str, Any]) -> None:
    """``ValueError`` naming the parameter and the type it takes when a value does not fit its field."""
    hints = typing.get_type_hints(cls)
    for key, value in params.items():
        tp = hints.get(key)
        if tp is not None and not _type_matches(value, tp):
            raise ValueError(f"{cls.name}: {key}={value!r} must be {_describe(tp)}")


def build(name: str, params: dict[str, Any]) -> Policy:
    """Instantiate a registered policy; unknown names or fields, renamed fields and values of the wrong
    type raise ``ValueError`` naming the choices / the type the parameter takes."""
    reg = registered()
    if name not in reg:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(reg)}")
    cls = reg[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for old, new in cls.renamed.items():
        if old in params and old not in fields:
            raise ValueError(f"{name}: the parameter {old}= is now called {new}= (e.g. '{name}:{new}=...')")
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ValueError(
            f"method {name!r} has no parameter(s) {', '.join(unknown)}; its parameters: {', '.join(fields)}"
        )
    check_param_types(cls, params)
    return cls(**params)
