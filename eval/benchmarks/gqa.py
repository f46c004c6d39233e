"""GQA (testdev-balanced by default; any official GQA questions file works).

Format: the official questions JSON, a dict ``question_id -> {"imageId": str, "question": str,
"answer": str, "types": {"structural", "semantic", "detailed"}, ...}`` (``testdev_balanced_questions.json``).
Images are ``<image_root>/<imageId>.jpg``; ``image_root`` defaults to the first existing of
``<dir>/images``, ``<dir>/../images``, ``<dir>``. Sample ids are the question ids.

Metric: LLaVA's GQA evaluation (``convert_gqa_for_eval`` then the official exact match): the
prediction is stripped, trailing periods removed and lowercased, then compared with the gold answer
(lowercased). ``accuracy`` (= ``primary``) plus ``by_structural`` / ``by_semantic`` accuracies.
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from ..metrics import gqa_normalize
from .base import (Benchmark, Layout, Need, Sample, as_folder, format_error, json_path, pick_dir, read_json,
                   require_path)

#: The default questions file (testdev-balanced, the split the papers report) and the image folder.
QUESTIONS_FILE = "testdev_balanced_questions.json"
IMAGE_DIR = "images"
SOURCE = ("GQA 1.2 (cs.stanford.edu/people/dorarad/gqa/download.html): testdev_balanced_questions.json from "
          "questions1.2.zip, and images.zip unpacked as images/ next to it (or one folder up)")
EXPECTED = ('a JSON object {question_id: {"imageId": str, "question": str, "answer": str, ...}} '
            '(GQA questions file, e.g. testdev_balanced_questions.json)')


class GQA(Benchmark):
    name = "gqa"

    @classmethod
    def load(cls, path: str | os.PathLike, image_root: str | os.PathLike | None = None,
             image_ext: str = ".jpg", **kw) -> "GQA":
        p = require_path(path, EXPECTED)
        if p.is_dir():
            cands = [p / QUESTIONS_FILE, *sorted(p.glob("*questions*.json"))]
            p = next((c for c in cands if c.is_file()), p / QUESTIONS_FILE)
        data = read_json(p, EXPECTED)
        if not isinstance(data, dict):
            raise format_error(p, json_path(), f"a JSON {type(data).__name__}, not an object", EXPECTED)
        root = Path(image_root) if image_root is not None else pick_dir(
            [p.parent / IMAGE_DIR, p.parent.parent / IMAGE_DIR, p.parent])
        samples = []
        for qid, q in data.items():
            if not isinstance(q, dict):
                raise format_error(p, json_path(qid), "not an object", EXPECTED)
            for key in ("imageId", "question", "answer"):
                if not isinstance(q.get(key), str):
                    raise format_error(p, json_path(qid, key), "missing or not a string", EXPECTED)
            types = q.get("types") or {}
            meta = {"imageId": q["imageId"], "full_answer": q.get("fullAnswer"),
                    "structural": types.get("structural"), "semantic": types.get("semantic"),
                    "detailed": types.get("detailed")}
            samples.append(Sample(id=str(qid), image=str(root / f"{q['imageId']}{image_ext}"),
                                  question=q["question"], answers=q["answer"], meta=meta))
        return cls(samples, source=p, **kw)

    @classmethod
    def layout(cls, path, image_root=None, **kw) -> Layout:
        folder, file = as_folder(path)
        needs = [Need(file, "file", "GQA questions (JSON)") if file is not None else
                 Need(folder / QUESTIONS_FILE, "file", "GQA testdev-balanced questions (JSON)",
                      (folder / "*questions*.json",))]
        needs.append(Need(Path(image_root), "dir", "GQA images") if image_root is not None else
                     Need(folder / IMAGE_DIR, "dir", "GQA images (<imageId>.jpg)", (folder.parent / IMAGE_DIR, folder / "*.jpg")))
        return Layout(Path(path), tuple(needs), SOURCE)

    def _score(self, pairs):
        groups = {"by_structural": defaultdict(list), "by_semantic": defaultdict(list)}
        hits = []
        for s, pred in pairs:
            ok = float(gqa_normalize(pred) == str(s.answers).strip().lower())
            hits.append(ok)
            for g, field in (("by_structural", "structural"), ("by_semantic", "semantic")):
                if s.meta.get(field):
                    groups[g][s.meta[field]].append(ok)
        out: dict = {"accuracy": sum(hits) / len(hits)}
        for g, d in groups.items():
            out[g] = {k: sum(v) / len(v) for k, v in sorted(d.items())}
        out["primary"] = out["accuracy"]
        return out
