"""Method registry: name -> policy class, plus spec-string parsing.

Third-party methods register through the entry-point group ``vtprune.methods`` (each entry point
resolves to a policy class with a ``name``), or by calling :func:`register` directly.

Spec strings: ``"fastv:layer=2,keep=0.5"``; several policies compose with ``+``:
``"hiprune:keep=192 + fastv:layer=2,keep=0.5"``; list values separate items with ``|``:
``"transprune:prune_layers=7|9|12"``.
"""
from __future__ import annotations

import dataclasses
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


def build(name: str, params: dict[str, Any]) -> Policy:
    """Instantiate a registered policy; unknown names or fields raise ``ValueError`` with the choices."""
    reg = registered()
    if name not in reg:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(reg)}")
    cls = reg[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ValueError(
            f"method {name!r} has no parameter(s) {', '.join(unknown)}; its parameters: {', '.join(fields)}"
        )
    return cls(**params)
