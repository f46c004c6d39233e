"""Ablation studies, each a sweep over one method's knobs (issue #5 item 6).

    python -m vtprune.eval.ablations hiprune                       # on the embedded default
    python -m vtprune.eval.ablations globalcom2                    # on embedded-anyres (its default model)
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
| globalcom2 | with vs without the thumbnail's global guidance (runs on `embedded-anyres`, the AnyRes embedded model, by default) |
| pitome | energy margin, inside the vision encoder (stage V) and after the projector (pitome-p) |
| visionzip | how the contextual tokens are merged (reference vs mean) |
| fastv | layer K x keep ratio R |
| dart | pivot split (image + text of 8) and pivot visiting order |
| pyramiddrop | lambda (image tokens kept after stage s = lambda^s), as the budget |
| sparsevlm | token recycling on/off and version (v1.5 vs v2.0) at the retain presets |
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
        "model": "embedded-anyres",  # needs a LLaVA-NeXT (AnyRes: thumbnail + crops) model
        "methods": [
            {"name": "globalcom2", "label": "with global guidance"},
            {"name": "globalcom2", "params": {"guidance": False}, "label": "without global guidance"},
        ],
        "budgets": [0.25, 0.125],
    },
    "pitome": {
        "about": "PiToMe energy margin, merging inside the vision encoder (stage V) and after the projector (pitome-p)",
        "methods": [
            {"name": "pitome", "budget_param": "keep", "params": {"margin": m}, "label": f"pitome margin {m}"}
            for m in (0.5, 0.9)
        ] + [
            {"name": "pitome-p", "params": {"margin": m}, "label": f"pitome-p margin {m}"}
            for m in (0.3, 0.5, 0.7, 0.9)
        ],
        "budgets": [0.25, 0.125],
    },
    "visionzip": {
        "about": "VisionZip contextual tokens: the reference's merge (assign to the nearest target, average) vs "
                 "a plain mean of each group (target included)",
        "methods": [
            {"name": "visionzip", "params": {"contextual_mode": m}, "label": f"visionzip contextual {m}"}
            for m in ("reference", "mean")
        ],
        "budgets": [0.25, 0.125],
    },
    "dart": {
        "about": "DART pivots: image/text split of the 8 pivots, and the reference's set order vs score order",
        "methods": [
            {"name": "dart", "params": {"pivot_image": pi, "pivot_text": pt}, "label": f"dart pivots {pi}+{pt}"}
            for pi, pt in ((4, 4), (8, 0), (0, 8), (2, 2))
        ] + [{"name": "dart", "params": {"pivot_order": "score"}, "label": "dart pivots 4+4, score order"}],
        "budgets": [0.25, 0.125],
    },
    "pyramiddrop": {
        "about": "PyramidDrop lambda (the budget knob: image tokens kept after stage s = lambda^s), stages at "
                 "1/4, 1/2, 3/4 of the LLM depth",
        "methods": lambda d: [
            {"name": "pyramiddrop", "budget_param": "lam",
             "params": {"layer_list": tuple(sorted({max(1, min(d["llm"] - 1, round(d["llm"] * f)))
                                                     for f in (0.25, 0.5, 0.75)}))},
             "label": "pyramiddrop"}
        ],
        "budgets": [0.75, 0.5, 0.35],
    },
    "sparsevlm": {
        "about": "SparseVLM token recycling and version: v1.5 with vs without recycling, v2.0 (SparseVLM+), at "
                 "the retain presets 192/128/64 (random at the matching fractions of 576)",
        "methods": lambda d: [
            {"name": "sparsevlm", "budget_param": "retain", "budgets": [192, 128, 64],
             "params": dict(params, layers=_sparsevlm_layers(d["llm"])), "label": label}
            for label, params in (("sparsevlm v1.5", {}), ("sparsevlm v1.5 no recycling", {"recycle": False}),
                                  ("sparsevlm v2.0", {"version": "2.0"}))
        ],
        "budgets": [0.333, 0.222, 0.111],
    },
    "fastv": {
        "about": "FastV layer K x keep ratio R",
        "methods": lambda d: [
            {"name": "fastv", "params": {"layer": k}, "label": f"fastv K{k}"}
            for k in sorted({1, 2, min(3, d["llm"] - 1), max(1, d["llm"] // 2)})
        ],
        "budgets": [0.75, 0.5, 0.25, 0.125],
    },
    "divprune": {
        "about": "DivPrune's max-min objective and isolated seed vs a CLS-pivot seed and vs max-sum (same features)",
        "methods": [
            {"name": "divprune", "label": "max-min, isolated seed (divprune)"},
            {"name": "todre", "params": {"diversity": "kcenter", "relevance": "off"},
             "label": "max-min, pivot seed (todre k-center)"},
            {"name": "todre", "params": {"diversity": "maxsum", "relevance": "off"},
             "label": "max-sum, pivot seed (todre)"},
        ],
        "budgets": [0.25, 0.125],
    },
    "vispruner": {
        "about": "VisPruner important ratio: attention-only (1.0) to diversity-only (0.0)",
        "methods": [
            {"name": "vispruner", "params": {"important_ratio": r}, "label": f"vispruner r{r}"}
            for r in (0.0, 0.25, 0.5, 0.75, 1.0)
        ],
        "budgets": [0.25, 0.125],
    },
    "cdpruner": {
        "about": "CDPruner conditioning: negated relevance (reference) vs plain cosine vs unconditional DPP, and theta",
        "methods": [
            {"name": "cdpruner", "label": "cdpruner negated (reference)"},
            {"name": "cdpruner", "params": {"relevance": "cosine"}, "label": "cdpruner cosine"},
            {"name": "cdpruner", "params": {"relevance": "off"}, "label": "cdpruner unconditional DPP"},
            {"name": "cdpruner", "params": {"theta": 0.5}, "label": "cdpruner theta 0.5"},
        ],
        "budgets": [0.25, 0.125],
    },
}


def _sparsevlm_layers(n_llm: int) -> tuple[int, ...]:
    """SparseVLM's ranking layers 2/6/15 of 32 spread over an ``n_llm``-layer LLM (at most n - 2)."""
    layers = tuple(sorted({min(n_llm - 2, round(l * n_llm / 32)) for l in (2, 6, 15)}))
    return layers if len(layers) == 3 else (0, 1, 2)


#: the shipped held-out split of each embedded model (the default benchmark of an ablation on it)
EMBEDDED_BENCHMARKS = {"embedded": "assets/embedded/bench", "embedded-anyres": "assets/embedded-anyres/bench"}


def paper_layers(layers: tuple[int, ...], depth: int, paper_depth: int = 32) -> tuple[int, ...]:
    """1-based layers of a ``paper_depth``-layer LLM mapped to a ``depth``-layer one (l * depth / paper_depth,
    rounded half up): TransPrune's 7/9/12 of 32 -> 4/5/6 of 16."""
    return tuple(int(l * depth / paper_depth + 0.5) for l in layers)


def ablation_config(name: str, *, model: str | None = None, benchmark: str | None = None,
                    limit: int | None = None, batch_size: int = 8, max_new_tokens: int = 4) -> dict:
    """The sweep config of ablation ``name``; ``model`` is a builtin (default: ``embedded``, or the
    ablation's own default such as ``embedded-anyres`` for globalcom2) or a local path.

    ``benchmark`` is ``LOADER=PATH`` (default: the embedded model's own held-out split).
    """
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; available: {', '.join(ABLATIONS)}")
    ab = ABLATIONS[name]
    model = model or ab.get("model", "embedded")
    depth = _depths(model)
    methods = ab["methods"](depth) if callable(ab["methods"]) else ab["methods"]
    from vtprune.eval.sweep import BUILTIN_MODELS

    if model in BUILTIN_MODELS:
        model_entry = {"name": model, "builtin": model}
    else:
        model_entry = {"name": model.rstrip("/").split("/")[-1], "path": model}
    if benchmark is None:
        bench_entry = {"name": "embedded", "path": EMBEDDED_BENCHMARKS.get(model, EMBEDDED_BENCHMARKS["embedded"])}
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
    scaled = paper_layers((7, 9, 12), llm)
    fits = len(set(scaled)) == 3 and scaled[0] >= 1 and scaled[-1] <= llm - 1
    tp = "|".join(str(i) for i in (scaled if fits else range(1, min(4, llm))))
    return {"vision": vision, "llm": llm, "transprune_layers": tp}
