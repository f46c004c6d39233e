"""Zero-shot image classification from an ImageFolder tree.

Format: ``root/<class_name>/<image>.<png|jpg|...>`` (torchvision ImageFolder layout); classes are
the sub-folder names in sorted order (label = position); ``class_names=`` may map folder names to
readable names (a dict) for prompts. Sample ids are ``"<class_dir>/<file>"``; ``answers`` is the
class name, ``choices`` the list of all class names, ``meta["label"]`` the label index.

Metrics: ``score(predictions)`` takes generated class names (top-1 exact match, ``accuracy``);
``score_scores({id: per-class scores})`` or :func:`vtprune.eval.metrics.topk_accuracy` give
``top1``/``top5`` from class scores (e.g. CLIP image-text similarities); ``primary`` = ``top1``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from ..metrics import exact_match, topk_accuracy
from .base import IMAGE_EXTENSIONS, SHORT_ANSWER_PROMPT, Benchmark, Layout, Need, Sample, format_error, require_path

EXPECTED = "an ImageFolder tree: root/<class_name>/<image file>"


class ImageFolderClassification(Benchmark):
    name = "imagefolder"

    @classmethod
    def load(cls, path: str | os.PathLike, class_names: Mapping[str, str] | None = None,
             **kw) -> "ImageFolderClassification":
        p = require_path(path, EXPECTED, kind="dir")
        dirs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not dirs:
            raise format_error(p, None, "no class sub-folders", EXPECTED)
        names = [(class_names or {}).get(d.name, d.name) for d in dirs]
        samples = []
        for label, d in enumerate(dirs):
            files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            for f in files:
                samples.append(Sample(id=f"{d.name}/{f.name}", image=str(f), question="",
                                      answers=names[label], choices=names,
                                      meta={"label": label, "class_dir": d.name}))
        if not samples:
            raise format_error(p, None, "no image files in the class folders", EXPECTED)
        bench = cls(samples, source=p, **kw)
        bench.classes = names
        return bench

    @classmethod
    def layout(cls, path, class_names=None, **kw) -> Layout:
        return Layout(Path(path), (Need(Path(path), "dir", "an ImageFolder tree (<class>/<image>)"),),
                      "any ImageFolder tree, e.g. the ImageNet-1k val images sorted into one folder per class")

    def prompt(self, sample: Sample) -> str:
        return f"What is the main object in the image?\n{SHORT_ANSWER_PROMPT}"

    def class_prompts(self, template: str = "a photo of a {}.") -> list[str]:
        """One text per class for zero-shot CLIP-style scoring."""
        return [template.format(c) for c in self.classes]

    def _score(self, pairs):
        hits = [exact_match(pred, s.answers) for s, pred in pairs]
        acc = sum(hits) / len(hits)
        return {"accuracy": acc, "top1": acc, "primary": acc}

    def score_scores(self, scores: Mapping[str, Sequence[float]], ks: Sequence[int] = (1, 5)) -> dict:
        """Top-k accuracy from ``{sample_id: [score per class]}`` (every sample must have scores)."""
        missing = [s.id for s in self.samples if s.id not in scores]
        if missing:
            raise ValueError(f"{len(missing)} samples have no scores (first: {missing[0]!r})")
        ks = tuple(k for k in ks if k <= len(self.classes)) or (1,)
        out = topk_accuracy([scores[s.id] for s in self.samples], [s.meta["label"] for s in self.samples], ks)
        out.update(primary=out["top1"], n=len(self.samples))
        return out
