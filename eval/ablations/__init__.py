"""Ablation studies, each a sweep over one method's knobs (issue #5 item 6).

    python -m vtprune.eval.ablations hiprune                       # on the embedded default
    python -m vtprune.eval.ablations fastv --model /models/llava-1.5-7b-hf --benchmark pope=/data/pope
    python -m vtprune.eval.ablations --list

Every ablation runs through :func:`vtprune.eval.sweep.run_sweep` (resumable, same store format, same
report), on the embedded model and benchmark by default, or on any local Hugging Face checkpoint
(``--model PATH``, loaded with ``AutoModelForImageTextToText.from_pretrained``) and any benchmark the
harness loads (``--benchmark LOADER=PATH``). The variants are named so the report's legend reads as
the ablation table.

| name | what varies |
|---|---|
| hiprune | object layer x alpha (anchor share) |
| todre | diversity rule: max-sum (v2) vs k-center (v1) vs random seeding (pivot) |
| transprune | TTV-only vs IGA-only vs both |
| globalcom2 | with vs without the thumbnail's global guidance (needs a LLaVA-NeXT model: on a single-view model such as the embedded default the sweep stops before the first cell with an error naming the fix) |
| pitome | energy margin (pitome-p, the post-merger variant that runs on every tower) |
| fastv | layer K x keep ratio R |
"""
from __future__ import annotations

from typing import Any

#: name -> (list of method entries for the sweep config, budgets, one-line description)
ABLATIONS: dict[str, dict[str, Any]] = {
    "hiprune": {
        "about": "HiPrune object layer (1-based, spread over the tower's depth) x alpha",
        "methods": lambda d: [
            {"name": "hiprune", "params": {"object_layer": layer, "alpha": alpha},
             "label": f"hiprune L{layer} a{alpha}"}
            for layer in sorted({max(1, round(d["vision"] * f)) for f in (0.25, 0.375, 0.5)})
            for alpha in (0.05, 0.1, 0.3)
        ],
        "budgets": [0.25, 0.125],
    },
    "todre": {
        "about": "ToDRE diversity rule and seeding (stage 1 only, so the rule is isolated)",
        "methods": [
            {"name": "todre", "params": {"diversity": "maxsum", "relevance": "off"}, "label": "max-sum (v2)"},
            {"name": "todre", "params": {"diversity": "kcenter", "relevance": "off"}, "label": "k-center (v1)"},
            {"name": "todre", "params": {"diversity": "maxsum", "pivot": "random", "relevance": "off"},
             "label": "max-sum, random seed"},
            {"name": "todre", "params": {"diversity": "kcenter", "pivot": "random", "relevance": "off"},
             "label": "k-center, random seed"},
        ],
        "budgets": [0.25, 0.125],
    },
    "transprune": {
        "about": "TransPrune scores: TTV-only vs IGA-only vs both (budget = the last stage's ratio)",
        "methods": lambda d: [
            {"spec": f"transprune:score={score},prune_layers={d['transprune_layers']},"
                     "keep_ratios=0.875|0.625|{budget}",
             "label": f"transprune {score}"}
            for score in ("ttv", "iga", "both")
        ],
        "budgets": [0.25, 0.125],
    },
    "globalcom2": {
        "about": "GlobalCom2 with and without global guidance",
        "methods": [
            {"name": "globalcom2", "label": "with global guidance"},
            {"name": "globalcom2", "params": {"guidance": False}, "label": "without global guidance"},
        ],
        "budgets": [0.25, 0.125],
    },
    "pitome": {
        "about": "PiToMe energy margin (post-merger variant)",
        "methods": [
            {"name": "pitome-p", "params": {"margin": m}, "label": f"pitome-p margin {m}"}
            for m in (0.3, 0.5, 0.7, 0.9)
        ],
        "budgets": [0.25, 0.125],
    },
    "fastv": {
        "about": "FastV layer K x keep ratio R",
        "methods": lambda d: [
            {"name": "fastv", "params": {"layer": k}, "label": f"fastv K{k}"}
            for k in sorted({1, 2, min(3, d["llm"] - 1)})
        ],
        "budgets": [0.75, 0.5, 0.25, 0.125],
    },
}


def ablation_config(name: str, *, model: str = "embedded", benchmark: str | None = None,
                    limit: int | None = None, batch_size: int = 8, max_new_tokens: int = 4) -> dict:
    """The sweep config of ablation ``name``; ``model`` is ``embedded``, a builtin or a local path.

    ``benchmark`` is ``LOADER=PATH`` (default: the embedded benchmark in ``assets/embedded/bench``).
    """
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; available: {', '.join(ABLATIONS)}")
    ab = ABLATIONS[name]
    depth = _depths(model)
    methods = ab["methods"](depth) if callable(ab["methods"]) else ab["methods"]
    from vtprune.eval.sweep import BUILTIN_MODELS

    if model in BUILTIN_MODELS:
        model_entry = {"name": model, "builtin": model}
    else:
        model_entry = {"name": model.rstrip("/").split("/")[-1], "path": model}
    if benchmark is None:
        bench_entry = {"name": "embedded", "path": "assets/embedded/bench"}
    else:
        loader, eq, path = benchmark.partition("=")
        if not eq or not loader or not path:
            raise ValueError(f"--benchmark {benchmark!r}: expected LOADER=PATH, e.g. pope=/data/pope")
        bench_entry = {"name": loader, "path": path}
    return {
        "name": f"ablation-{name}",
        "models": [model_entry],
        "benchmarks": [bench_entry],
        "methods": methods,
        "budgets": ab["budgets"],
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "limit": limit,
        "seed": 0,
    }


def _depths(model: str) -> dict[str, Any]:
    """Vision-tower and LLM depths of ``model``, read from its config (no weights are loaded)."""
    from vtprune.eval.sweep.models import BUILTIN_MODELS, builtin_skeleton

    if model in BUILTIN_MODELS:
        cfg = builtin_skeleton(model).config
    else:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model)
    vc, tc = cfg.vision_config, cfg.text_config
    vision = getattr(vc, "num_hidden_layers", None) or getattr(vc, "depth")
    llm = tc.num_hidden_layers
    tp = "7|9|12" if llm >= 16 else "|".join(str(i) for i in range(1, min(4, llm)))
    return {"vision": vision, "llm": llm, "transprune_layers": tp}
