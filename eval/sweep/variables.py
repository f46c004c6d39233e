"""``${NAME}`` variables in sweep configs: checkpoint and data locations that differ per machine.

A config writes ``path: ${MODELS}/llava-1.5-7b-hf``; the value comes from ``--set MODELS=DIR`` (the
``overrides``), else from the environment. The optional top-level ``variables:`` block documents
each name (``MODELS: folder of the Hugging Face checkpoints``); the messages quote it.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

#: ``${NAME}`` with NAME a shell-style identifier.
PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def used(obj: Any) -> list[str]:
    """The variable names ``obj`` (a parsed YAML tree) uses, in order of first use."""
    names: dict[str, None] = {}

    def walk(o: Any) -> None:
        if isinstance(o, str):
            names.update((m.group(1), None) for m in PATTERN.finditer(o))
        elif isinstance(o, Mapping):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(obj)
    return list(names)


def values_for(names: list[str], overrides: Mapping[str, str] | None,
               environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The value of each name: ``overrides`` first, then the environment; unset (or empty) names are left out."""
    env = os.environ if environ is None else environ
    out = {}
    for n in names:
        v = (overrides or {}).get(n) or env.get(n)
        if v:
            out[n] = v
    return out


def substitute(obj: Any, values: Mapping[str, str]) -> Any:
    """``obj`` with every ``${NAME}`` of ``values`` replaced (other placeholders stay as they are)."""
    if isinstance(obj, str):
        return PATTERN.sub(lambda m: values.get(m.group(1), m.group(0)), obj)
    if isinstance(obj, Mapping):
        return {k: substitute(v, values) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, values) for v in obj]
    return obj


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """``["MODELS=/m", "DATA=/d"]`` (the CLI's ``--set``) -> ``{"MODELS": "/m", "DATA": "/d"}``."""
    out: dict[str, str] = {}
    for it in items or []:
        name, eq, value = it.partition("=")
        name = name.strip()
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"--set {it!r}: expected NAME=VALUE, e.g. --set MODELS=/data/models")
        out[name] = value.strip()
    return out


def unset_message(names: list[str], described: Mapping[str, str]) -> str:
    """One line per unset variable: what it is and the two ways to set it."""
    lines = []
    for n in names:
        what = f" ({described[n]})" if described.get(n) else ""
        lines.append(f"${{{n}}} is not set: pass --set {n}=DIR or export {n}=DIR{what}")
    return "\n".join(lines)
