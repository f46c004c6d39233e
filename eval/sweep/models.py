"""Model loading for sweeps: builtin models (one registry), local checkpoints, prompt templates, asset checks.

A config's ``builtin: NAME`` is looked up in :data:`BUILTIN_MODELS` (``NAME -> BuiltinModel``); adding a
builtin is one :func:`register_builtin` call (a loader, optionally a prompt format, an asset check and
a weightless skeleton for validation). ``path: DIR`` loads a stock checkpoint with
``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..store import ResultsStore
from .config import Cell, ModelEntry, SweepConfig

_REPO_ROOT = Path(__file__).resolve().parents[2]

#: ``prompt_fn(benchmark, sample) -> text``
PromptFn = Callable[[Any, Any], str]


class MissingAssetError(FileNotFoundError):
    """A model or benchmark named by the config is not on disk (the message names the fix)."""


# ----------------------------------------------------------------------------------------------------
# Builtin models


@dataclass(frozen=True)
class BuiltinModel:
    """A model a config names by ``builtin: NAME``.

    Attributes:
        load: ``load(dtype) -> (model, processor)`` on the CPU.
        prompt: ``prompt(processor) -> prompt_fn`` (the format the model expects); None: the generic
            chat template / ``USER: <image>\\n... ASSISTANT:`` fallback.
        check: raises :class:`MissingAssetError` naming the fix when the model's files are absent.
        skeleton: ``skeleton() -> model`` without weights (meta device) for validating patches before a
            sweep runs; None: ``load`` is cheap enough to use instead.
        description: one line for error messages and docs.
    """

    load: Callable[[Any], tuple[Any, Any]]
    prompt: Callable[[Any], PromptFn] | None = None
    check: Callable[[], None] | None = None
    skeleton: Callable[[], Any] | None = None
    description: str = ""


#: ``builtin`` name -> :class:`BuiltinModel` (iterating gives the names).
BUILTIN_MODELS: dict[str, BuiltinModel] = {}


def register_builtin(name: str, load: Callable[[Any], tuple[Any, Any]], *, prompt: Callable[[Any], PromptFn] | None = None,
                     check: Callable[[], None] | None = None, skeleton: Callable[[], Any] | None = None,
                     description: str = "") -> None:
    """Make ``builtin: name`` loadable in sweep configs (and ``pretrained=name`` in the lmms-eval wrapper)."""
    BUILTIN_MODELS[name] = BuiltinModel(load=load, prompt=prompt, check=check, skeleton=skeleton,
                                        description=description)


def _tiny(family: str) -> None:
    def load(dtype):
        from vtprune.testing import BUILDERS

        return BUILDERS[family](dtype=dtype)

    def prompt(proc) -> PromptFn:
        from vtprune.testing import prompt_for

        return lambda bench, s: prompt_for(family, bench.prompt(s))

    register_builtin(f"tiny-{family}", load, prompt=prompt,
                     description=f"tiny random {family} of vtprune.testing (for tests; answers are noise)")


for _family in ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl"):
    _tiny(_family)


def _embedded_dir() -> Path:
    try:
        from ..embedded.load import MODEL_DIR
    except ImportError as exc:  # the embedded model is not part of this checkout
        raise MissingAssetError(f"builtin model 'embedded' is not available in this checkout ({exc}); "
                                "use a 'tiny-*' builtin or a 'path' model") from exc
    return Path(MODEL_DIR)


def _embedded_check() -> None:
    if not (_embedded_dir() / "config.json").exists():
        raise MissingAssetError(f"builtin model 'embedded': no checkpoint at {_embedded_dir()}; train it with "
                                "`python scripts/train_embedded.py` (or use a 'tiny-*' builtin)")


def _embedded_load(dtype):
    from ..embedded import load_embedded

    return load_embedded(device="cpu", dtype=dtype)


def _embedded_prompt(proc) -> PromptFn:
    from ..embedded.model import prompt as embedded_prompt

    return lambda bench, s: embedded_prompt(s.question)  # the format the embedded model was trained on


register_builtin("embedded", _embedded_load, prompt=_embedded_prompt, check=_embedded_check,
                 skeleton=lambda: meta_model(_embedded_dir()),
                 description="the embedded default (DINOv2-S tower + small Llama trained on the embedded benchmark)")


# ----------------------------------------------------------------------------------------------------
# Paths


def _resolve(path: str, cfg: SweepConfig) -> Path | None:
    p = Path(path).expanduser()
    if p.is_absolute():
        return p if p.exists() else None
    for base in (Path.cwd(), cfg.source.resolve().parent if cfg.source else None, _REPO_ROOT):
        if base is not None and (base / p).exists():
            return base / p
    return None


def _tried(path: str, cfg: SweepConfig) -> str:
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    bases = [Path.cwd()] + ([cfg.source.resolve().parent] if cfg.source else []) + [_REPO_ROOT]
    return ", ".join(dict.fromkeys(str(b / p) for b in bases))


def preflight(cfg: SweepConfig, cells: Sequence[Cell], store: ResultsStore) -> dict[str, Path]:
    """Resolve every path the unfinished cells need; raise :class:`MissingAssetError` naming the fixes."""
    pending = [c for c in cells if not store.has(c.key)]
    paths: dict[str, Path] = {}
    problems: list[str] = []
    for b in cfg.benchmarks:
        p = _resolve(b.path, cfg)
        if p is not None:
            paths[b.label] = p
        elif any(c.bench is b for c in pending):
            fix = ""
            if b.name == "embedded" and Path(b.path).as_posix().rstrip("/").endswith("assets/embedded/bench"):
                fix = (" The embedded benchmark is generated, not downloaded: run "
                       "`python -m vtprune.eval.embedded.generator` (writes assets/embedded/bench).")
            problems.append(f"benchmark {b.label!r}: path {b.path!r} not found (tried {_tried(b.path, cfg)}).{fix}")
    for m in cfg.models:
        if not any(c.model is m for c in pending):
            continue
        if m.path is not None and _resolve(m.path, cfg) is None and not _looks_like_hub_id(m.path):
            problems.append(f"model {m.name!r}: path {m.path!r} not found (tried {_tried(m.path, cfg)}); point "
                            "'path' at a from_pretrained folder (config.json, weights, processor files)")
        check = BUILTIN_MODELS[m.builtin].check if m.builtin else None
        if check is not None:
            try:
                check()
            except MissingAssetError as exc:
                problems.append(str(exc))
    if problems:
        raise MissingAssetError("missing assets:\n  - " + "\n  - ".join(problems))
    return paths


def _looks_like_hub_id(path: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", path)) and not path.startswith(".")


# ----------------------------------------------------------------------------------------------------
# Loading


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def meta_model(source: str | Path):
    """A weightless (meta-device) model built from ``source``'s ``config.json``: enough for
    ``vtprune.patch`` to validate a method against the architecture, without reading the weights."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def builtin_skeleton(name: str, dtype: str = "float32"):
    """Builtin model ``name`` for validation or reading its config: weightless where that is cheaper."""
    b = BUILTIN_MODELS[name]
    return b.skeleton() if b.skeleton is not None else b.load(torch_dtype(dtype))[0]


def model_skeleton(entry: ModelEntry, cfg: SweepConfig):
    """The model of ``entry`` for validation only: without weights where that is cheaper than loading."""
    if entry.builtin:
        return builtin_skeleton(entry.builtin, entry.dtype)
    p = _resolve(entry.path, cfg)
    return meta_model(str(p) if p is not None else entry.path)


def load_model(entry: ModelEntry, cfg: SweepConfig, device) -> tuple[Any, Any, PromptFn]:
    """``(model, processor, prompt_fn)`` on ``device`` in eval mode, the tokenizer padding on the left."""
    dtype = torch_dtype(entry.dtype)
    if entry.builtin:
        model, proc = BUILTIN_MODELS[entry.builtin].load(dtype)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        p = _resolve(entry.path, cfg)
        src = str(p) if p is not None else entry.path
        model = AutoModelForImageTextToText.from_pretrained(src, dtype=dtype)
        proc = AutoProcessor.from_pretrained(src)
    model = model.to(device).eval()
    tok = getattr(proc, "tokenizer", proc)
    tok.padding_side = "left"
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return model, proc, prompt_fn(entry, proc)


def _fill(template: str, values: Mapping[str, str]) -> str:
    return re.sub(r"\{(image|prompt|question)\}", lambda m: values[m.group(1)], template)


def prompt_fn(entry: ModelEntry, proc) -> PromptFn:
    """The config's template, else the builtin's format, else the processor's chat template, else LLaVA's."""
    image = getattr(proc, "image_token", None) or "<image>"
    if entry.prompt is not None:
        return lambda bench, s: _fill(entry.prompt, {"image": image, "prompt": bench.prompt(s), "question": s.question})
    if entry.builtin and BUILTIN_MODELS[entry.builtin].prompt is not None:
        return BUILTIN_MODELS[entry.builtin].prompt(proc)
    if getattr(proc, "chat_template", None):
        def chat(bench, s):
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": bench.prompt(s)}]}]
            return proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

        return chat
    return lambda bench, s: f"USER: {image}\n{bench.prompt(s)} ASSISTANT:"
