"""POPE (object hallucination, yes/no).

Format (the official release, e.g. ``coco_pope_adversarial.json``; JSON Lines despite the suffix), one
object per line::

    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?", "label": "yes"}

``path`` is one such file or a folder holding the split files; the split is the first of
``adversarial``/``popular``/``random`` contained in the file name (else the file stem). Images are
``<image_root>/<image>``; ``image_root`` defaults to the first existing of ``<dir>/images``,
``<dir>/val2014``, ``<dir>``. Sample ids are ``"<split>/<question_id>"``.

Metrics (official ``evaluate.py`` answer rule, see :func:`vtprune.eval.metrics.pope_parse`): per
split accuracy, precision, recall, F1, yes-ratio; ``avg_*`` = mean over the splits; ``primary`` =
``avg_f1``.
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from ..metrics import pope_metrics
from .base import (Benchmark, Layout, Need, Sample, as_folder, format_error, iter_jsonl, pick_dir, require_path)

SPLITS = ("adversarial", "popular", "random")
EXPECTED = ('JSON Lines, one object per line: {"question_id": int|str, "image": "<file name>", '
            '"text": "<question>", "label": "yes"|"no"}')
_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
#: The official split file of each split, and the image folders tried (in order) under the benchmark folder.
SPLIT_FILE = "coco_pope_{split}.json"
IMAGE_DIRS = ("images", "val2014")
SOURCE = ("POPE: the split files coco_pope_adversarial.json, coco_pope_popular.json and coco_pope_random.json "
          "of the POPE repository (github.com/AoiDragon/POPE, folder output/coco; JSON Lines despite the suffix); "
          "images: COCO val2014 (cocodataset.org, val2014.zip) unpacked as val2014/ next to them")


def _split_of(path: Path) -> str:
    name = path.name.lower()
    for s in SPLITS:
        if s in name:
            return s
    return path.stem


class POPE(Benchmark):
    name = "pope"

    @classmethod
    def load(cls, path: str | os.PathLike, image_root: str | os.PathLike | None = None,
             splits: Sequence[str] | None = None, **kw) -> "POPE":
        p = require_path(path, "a POPE split file (JSONL) or a folder of them")
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in (".json", ".jsonl")
                           and any(s in f.name.lower() for s in SPLITS))
            if not files:
                raise format_error(p, None, "no POPE split file in this folder",
                                   "files named like coco_pope_<adversarial|popular|random>.json")
            base = p
        else:
            files, base = [p], p.parent
        if splits is not None:
            files = [f for f in files if _split_of(f) in splits]
            if not files:
                raise format_error(p, None, f"none of the splits {list(splits)} found",
                                   "files named like coco_pope_<split>.json")
        root = Path(image_root) if image_root is not None else pick_dir(
            [*(base / d for d in IMAGE_DIRS), base])
        samples: list[Sample] = []
        seen_splits: dict[str, Path] = {}
        first_line: dict[str, int] = {}
        for f in files:
            split = _split_of(f)
            if split in seen_splits:
                raise format_error(f, None, f"split {split!r} also given by {seen_splits[split]}",
                                   "one file per split")
            seen_splits[split] = f
            for n, obj in iter_jsonl(f, EXPECTED):
                for key in ("question_id", "image", "text", "label"):
                    if key not in obj:
                        raise format_error(f, f"line {n}", f"missing key {key!r}", EXPECTED)
                label = str(obj["label"]).strip().lower()
                if label not in ("yes", "no"):
                    raise format_error(f, f"line {n}", f"label {obj['label']!r} is not yes/no", EXPECTED)
                if not isinstance(obj["image"], str) or not isinstance(obj["text"], str):
                    raise format_error(f, f"line {n}", "image and text must be strings", EXPECTED)
                sid = f"{split}/{obj['question_id']}"
                if sid in first_line:
                    raise format_error(f, f"line {n}", f"question_id {obj['question_id']!r} repeats "
                                       f"line {first_line[sid]}", "unique question_id per split")
                first_line[sid] = n
                meta = {k: v for k, v in obj.items() if k not in ("image", "text", "label")}
                meta.update(split=split, file=str(f), line=n)
                samples.append(Sample(id=sid, image=str(root / obj["image"]),
                                      question=obj["text"], answers=label, meta=meta))
        return cls(samples, source=p, **kw)

    @classmethod
    def layout(cls, path, image_root=None, splits: Sequence[str] | None = None, **kw) -> Layout:
        folder, file = as_folder(path)
        if file is not None:
            needs = [Need(file, "file", f"POPE {_split_of(file)} split (JSON Lines)")]
        else:
            needs = [Need(folder / SPLIT_FILE.format(split=s), "file",
                          f"POPE {s} split (JSON Lines; the `splits` option runs fewer)",
                          (folder / f"*{s}*.json", folder / f"*{s}*.jsonl")) for s in (splits or SPLITS)]
        if image_root is not None:
            needs.append(Need(Path(image_root), "dir", "COCO val2014 images"))
        else:
            needs.append(Need(folder / IMAGE_DIRS[1], "dir", "COCO val2014 images (COCO_val2014_*.jpg)",
                              (folder / IMAGE_DIRS[0], folder / "COCO_val2014_*.jpg")))
        return Layout(Path(path), tuple(needs), SOURCE)

    def _score(self, pairs):
        by_split: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
        for s, pred in pairs:
            preds, labels = by_split[s.meta["split"]]
            preds.append(pred)
            labels.append(s.answers)
        out: dict = {}
        for split in sorted(by_split):
            m = pope_metrics(*by_split[split])
            out[split] = m
        for k in _METRICS:
            out[f"avg_{k}"] = sum(out[s][k] for s in by_split) / len(by_split)
        out["primary"] = out["avg_f1"]
        return out
