"""Before a sweep loads anything: is every checkpoint and benchmark file on disk? If not, say exactly
what to download and where to put it.

The file lists come from the loaders themselves (``Benchmark.layout(path, **options)``: the files and
folders each one reads, and where the official release comes from) and from the config's model
entries (``hub:`` names the Hugging Face repository of a ``path`` model). vtprune never downloads:
the message prints the ``huggingface-cli download`` commands and the expected folder layout.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .config import Cell, SweepConfig
from .models import MissingAssetError, looks_like_hub_id, resolve_path, tried_paths
from .variables import unset_message

__all__ = ["preflight", "missing_images", "checkpoint_problems"]

#: Files a ``from_pretrained`` folder must hold, as (what, accepted names or patterns).
CHECKPOINT_FILES = (
    ("config.json", ("config.json",)),
    ("weights", ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")),
    ("tokenizer", ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")),
    ("image processor", ("preprocessor_config.json", "processor_config.json")),
)


def _has(folder: Path, patterns: Sequence[str]) -> bool:
    return any(any(folder.glob(p)) for p in patterns)


def checkpoint_problems(folder: Path) -> list[str]:
    """The parts of a ``from_pretrained`` folder that are missing (``[]`` when it looks complete)."""
    return [f"{what} ({' or '.join(names)})" for what, names in CHECKPOINT_FILES if not _has(folder, names)]


def _not_found(path: str, cfg: SweepConfig) -> str:
    """``not found`` plus the places tried for a relative path (none for an absolute or unresolved one)."""
    if Path(path).expanduser().is_absolute() or "${" in path:
        return "not found"
    return f"not found (tried {tried_paths(path, cfg)})"


def _download(entry, where: str) -> str:
    """The command that fetches ``entry``'s checkpoint into ``where`` (or how to find one)."""
    if entry.hub is None:
        return ("point 'path' at a from_pretrained folder (config.json, weights, processor files); add "
                "'hub: OWNER/NAME' to the model entry for a download command")
    if entry.open_clip:
        p = Path(where)
        return f"huggingface-cli download {entry.hub} {p.name} --local-dir {p.parent}"
    return f"huggingface-cli download {entry.hub} --local-dir {where}"


def _model_problem(entry, cfg: SweepConfig) -> str | None:
    if entry.builtin:
        from .models import BUILTIN_MODELS

        check = BUILTIN_MODELS[entry.builtin].check
        if check is not None:
            try:
                check()
            except MissingAssetError as exc:
                return str(exc)
        return None
    resolved = resolve_path(entry.path, cfg)
    if resolved is None:
        if not entry.open_clip and looks_like_hub_id(entry.path):
            return None  # a hub id: from_pretrained resolves it (and its cache) itself
        return (f"model {entry.name!r}: {entry.path} {_not_found(entry.path, cfg)}\n"
                f"      {_download(entry, entry.path)}")
    if entry.open_clip:
        if not resolved.is_file():
            return f"model {entry.name!r}: {resolved} is not a file (the open_clip weights file)\n      {_download(entry, str(resolved))}"
        return None
    missing = checkpoint_problems(resolved)
    if missing:
        return (f"model {entry.name!r}: {resolved} is incomplete, missing: {'; '.join(missing)}\n"
                f"      {_download(entry, str(resolved))}")
    return None


def _bench_problem(b, cfg: SweepConfig) -> tuple[Path | None, str | None]:
    from ..benchmarks import BENCHMARKS

    resolved = resolve_path(b.path, cfg)
    shown = resolved if resolved is not None else Path(b.path).expanduser()
    layout = BENCHMARKS[b.name].layout(shown, **b.options)
    missing = layout.missing()
    if resolved is not None and not missing:
        return resolved, None
    head = f"benchmark {b.label!r} (loader {b.name}) at {b.path}"
    if resolved is None:
        head += f": {_not_found(b.path, cfg)}"
    lines = [head, "      expected files and folders:"]
    for need in layout.needs:
        mark = "missing" if need in missing else "present"
        suffix = "/" if need.kind == "dir" else ""
        lines.append(f"        [{mark}] {need.path}{suffix}  ({need.what})")
    if layout.source:
        lines.append(f"      get them from: {layout.source}")
    return None, "\n".join(lines)


def preflight(cfg: SweepConfig, pending: Sequence[Cell]) -> dict[str, Path]:
    """Resolve every path the ``pending`` (unfinished) cells need; raise :class:`MissingAssetError` with
    what to download and where (unset ``${NAME}`` variables first), before anything is loaded."""
    paths: dict[str, Path] = {}
    models, benches = [], []
    for m in cfg.models:
        if any(c.model is m for c in pending):
            problem = _model_problem(m, cfg)
            if problem:
                models.append(problem)
    for b in cfg.benchmarks:
        resolved, problem = _bench_problem(b, cfg)
        if resolved is not None:
            paths[b.label] = resolved
        elif any(c.bench is b for c in pending):
            benches.append(problem)
    if not (models or benches or cfg.unset_variables):
        return paths
    parts = ["missing assets: nothing was loaded or run. vtprune downloads nothing: put these files in place, "
             "then run the same command again."]
    if cfg.unset_variables:
        parts.append("variables:\n  - " + unset_message(list(cfg.unset_variables), cfg.variables).replace("\n", "\n  - "))
    if models:
        parts.append("checkpoints:\n  - " + "\n  - ".join(models))
    if benches:
        parts.append("benchmarks:\n  - " + "\n  - ".join(benches))
    raise MissingAssetError("\n".join(parts))


def missing_images(bench: Any) -> list[str]:
    """The image files ``bench``'s samples name that are not on disk (each path once, in sample order)."""
    seen, out = set(), []
    for s in bench.samples:
        img = s.image
        if isinstance(img, (str, os.PathLike)):
            p = os.fspath(img)
            if p not in seen:
                seen.add(p)
                if not os.path.isfile(p):
                    out.append(p)
    return out
