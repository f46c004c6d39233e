"""Model loading for sweeps: builtin models (one registry), local checkpoints, prompt templates, path resolution.

A config's ``builtin: NAME`` is looked up in :data:`BUILTIN_MODELS` (``NAME -> BuiltinModel``); adding a
builtin is one :func:`register_builtin` call (a loader, optionally a prompt format, an asset check and
a weightless skeleton for validation). ``path: DIR`` loads a stock checkpoint with
``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .config import ModelEntry, SweepConfig

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


#: builtin name -> (load.py attribute of its checkpoint folder, its loader, its training script)
_EMBEDDED = {"embedded": ("MODEL_DIR", "load_embedded", "scripts/train_embedded.py"),
             "embedded-anyres": ("ANYRES_MODEL_DIR", "load_embedded_anyres", "scripts/train_embedded_anyres.py")}


def _embedded_dir(name: str = "embedded") -> Path:
    try:
        from ..embedded import load as embedded_load
    except ImportError as exc:  # the embedded model is not part of this checkout
        raise MissingAssetError(f"builtin model {name!r} is not available in this checkout ({exc}); "
                                "use a 'tiny-*' builtin or a 'path' model") from exc
    return Path(getattr(embedded_load, _EMBEDDED[name][0]))


def _embedded_check(name: str = "embedded") -> None:
    if not (_embedded_dir(name) / "config.json").exists():
        raise MissingAssetError(f"builtin model {name!r}: no checkpoint at {_embedded_dir(name)}; train it with "
                                f"`python {_EMBEDDED[name][2]}` (or use a 'tiny-*' builtin)")


def _embedded_load(dtype, name: str = "embedded"):
    from ..embedded import load as embedded_load

    return getattr(embedded_load, _EMBEDDED[name][1])(device="cpu", dtype=dtype)


def _embedded_prompt(proc) -> PromptFn:
    from ..embedded.model import prompt as embedded_prompt

    return lambda bench, s: embedded_prompt(s.question)  # the format the embedded models were trained on


register_builtin("embedded", _embedded_load, prompt=_embedded_prompt, check=_embedded_check,
                 skeleton=lambda: meta_model(_embedded_dir()),
                 description="the embedded default (DINOv2-S tower + small Llama trained on the embedded benchmark)")
register_builtin("embedded-anyres", lambda dtype: _embedded_load(dtype, "embedded-anyres"), prompt=_embedded_prompt,
                 check=lambda: _embedded_check("embedded-anyres"),
                 skeleton=lambda: meta_model(_embedded_dir("embedded-anyres")),
                 description="the embedded AnyRes model (LLaVA-NeXT: DINOv2-S tower, base view + 112 px crops, "
                             "small Llama trained on assets/embedded-anyres/bench's scenes)")


# ----------------------------------------------------------------------------------------------------
# Paths


def resolve_path(path: str, cfg: SweepConfig) -> Path | None:
    """``path`` as it exists: absolute, else tried against the working directory, the config file's folder
    and the repository root, in that order; ``None`` when it exists nowhere."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p if p.exists() else None
    for base in (Path.cwd(), cfg.source.resolve().parent if cfg.source else None, _REPO_ROOT):
        if base is not None and (base / p).exists():
            return base / p
    return None


def tried_paths(path: str, cfg: SweepConfig) -> str:
    """The places :func:`resolve_path` looks for ``path`` (for messages)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    bases = [Path.cwd()] + ([cfg.source.resolve().parent] if cfg.source else []) + [_REPO_ROOT]
    return ", ".join(dict.fromkeys(str(b / p) for b in bases))


def looks_like_hub_id(path: str) -> bool:
    """``owner/name``: a Hugging Face repository id that ``from_pretrained`` resolves itself."""
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
    """The model of ``entry`` for validation only: without weights where that is cheaper than loading
    (for an open_clip model: its ``visual`` tower, which the methods patch)."""
    if entry.open_clip:
        from .clip import clip_skeleton

        return clip_skeleton(entry)
    if entry.builtin:
        return builtin_skeleton(entry.builtin, entry.dtype)
    p = resolve_path(entry.path, cfg)
    return meta_model(str(p) if p is not None else entry.path)


def load_model(entry: ModelEntry, cfg: SweepConfig, device) -> tuple[Any, Any, PromptFn]:
    """``(model, processor, prompt_fn)`` on ``device`` in eval mode, the tokenizer padding on the left."""
    dtype = torch_dtype(entry.dtype)
    if entry.builtin:
        model, proc = BUILTIN_MODELS[entry.builtin].load(dtype)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        p = resolve_path(entry.path, cfg)
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
