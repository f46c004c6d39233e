"""VQAv2 (official layout: a questions file and, for val, an annotations file).

Formats:

- questions: ``{"data_subtype": "val2014", "questions": [{"question_id": int, "image_id": int,
  "question": str}]}`` (``v2_OpenEnded_mscoco_val2014_questions.json``);
- annotations: ``{"annotations": [{"question_id": int, "image_id": int, "answers": [{"answer": str,
  "answer_id": int, ...} x10], "answer_type": str, "question_type": str, "multiple_choice_answer": str}]}``
  (``v2_mscoco_val2014_annotations.json``).

``path`` is the questions file (then ``annotations=`` names the annotations file, else a sibling
``*annotations*.json`` of the same subtype is used if present) or a folder holding both. Without
annotations (test-dev) the benchmark loads with empty answers and cannot be scored locally.
Images are ``<image_root>/COCO_<subtype>_<image_id:012d>.jpg`` where ``subtype`` is the questions'
``data_subtype`` (``test-dev2015`` -> ``test2015``); ``image_root`` defaults to the first existing of
``<dir>/<subtype>``, ``<dir>/images``, ``<dir>``.

Metric: the standard VQA accuracy (:func:`vtprune.eval.metrics.vqa_accuracy`), ``accuracy`` =
``primary`` plus ``by_answer_type`` (yes/no, number, other).
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from ..metrics import vqa_accuracy
from .base import (Benchmark, Layout, Need, Sample, as_folder, format_error, json_path, pick_dir, read_json,
                   require_path)

#: The official file names for a subtype (val2014, test-dev2015, ...), the default subtype of a layout,
#: and the image folder of a subtype (test-dev questions use the test2015 images).
QUESTIONS_FILE = "v2_OpenEnded_mscoco_{subtype}_questions.json"
ANNOTATIONS_FILE = "v2_mscoco_{subtype}_annotations.json"
DEFAULT_SUBTYPE = "val2014"
SOURCE = ("VQAv2 (visualqa.org/download.html): the val2014 questions (v2_Questions_Val_mscoco.zip) and annotations "
          "(v2_Annotations_Val_mscoco.zip); images: COCO val2014 (cocodataset.org, val2014.zip) unpacked as "
          "val2014/ next to them. The papers' test-dev split has no public answers (scored by the evaluation server)")


def image_subtype(subtype: str) -> str:
    return subtype.replace("test-dev", "test")


EXPECTED_Q = ('{"data_subtype": str, "questions": [{"question_id": int, "image_id": int, '
              '"question": str}]} (v2_OpenEnded_mscoco_<subtype>_questions.json)')
EXPECTED_A = ('{"annotations": [{"question_id": int, "answers": [{"answer": str}, ...], '
              '"answer_type": str}]} (v2_mscoco_<subtype>_annotations.json)')


def _find(folder: Path, pattern: str, prefer: str | None) -> Path | None:
    files = sorted(folder.glob(pattern))
    if prefer:
        pref = [f for f in files if prefer in f.name]
        files = pref or files
    return files[0] if files else None


class VQAv2(Benchmark):
    name = "vqav2"

    @classmethod
    def load(cls, path: str | os.PathLike, annotations: str | os.PathLike | None = None,
             image_root: str | os.PathLike | None = None, subtype: str | None = None,
             image_template: str = "COCO_{subtype}_{image_id:012d}.jpg", **kw) -> "VQAv2":
        p = require_path(path, "a VQAv2 questions JSON or a folder holding it")
        if p.is_dir():
            q = _find(p, "*questions*.json", subtype)
            if q is None:
                raise format_error(p, None, "no *questions*.json in this folder", EXPECTED_Q)
            folder, p = p, q
        else:
            folder = p.parent
        qdata = read_json(p, EXPECTED_Q)
        if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
            raise format_error(p, json_path("questions"), "missing or not a list", EXPECTED_Q)
        sub = subtype or qdata.get("data_subtype")
        if not isinstance(sub, str):
            raise format_error(p, json_path("data_subtype"), "missing (pass subtype=)", EXPECTED_Q)
        if annotations is None:
            a = _find(folder, f"*{sub}*annotations*.json", None)
        else:
            a = require_path(annotations, EXPECTED_A, kind="file")
        anns: dict = {}
        if a is not None:
            adata = read_json(a, EXPECTED_A)
            if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
                raise format_error(a, json_path("annotations"), "missing or not a list", EXPECTED_A)
            for i, ann in enumerate(adata["annotations"]):
                if not isinstance(ann, dict) or "question_id" not in ann:
                    raise format_error(a, json_path("annotations", i, "question_id"), "missing", EXPECTED_A)
                ans = ann.get("answers")
                if (not isinstance(ans, list) or not ans
                        or not all(isinstance(x, dict) and isinstance(x.get("answer"), str) for x in ans)):
                    raise format_error(a, json_path("annotations", i, "answers"),
                                       "not a non-empty list of {\"answer\": str}", EXPECTED_A)
                anns[ann["question_id"]] = ann
        img_sub = image_subtype(sub)
        root = Path(image_root) if image_root is not None else pick_dir(
            [folder / img_sub, folder / "images", folder])
        samples = []
        for i, q in enumerate(qdata["questions"]):
            if not isinstance(q, dict):
                raise format_error(p, json_path("questions", i), "not an object", EXPECTED_Q)
            for key, typ in (("question_id", int), ("image_id", int), ("question", str)):
                if not isinstance(q.get(key), typ):
                    raise format_error(p, json_path("questions", i, key), "missing or wrong type",
                                       EXPECTED_Q)
            meta = {"image_id": q["image_id"]}
            answers: list[str] = []
            if a is not None:
                ann = anns.get(q["question_id"])
                if ann is None:
                    raise format_error(a, json_path("annotations"),
                                       f"no annotation for question_id {q['question_id']}", EXPECTED_A)
                answers = [x["answer"] for x in ann["answers"]]
                meta.update(answer_type=ann.get("answer_type"), question_type=ann.get("question_type"),
                            multiple_choice_answer=ann.get("multiple_choice_answer"))
            img = image_template.format(subtype=img_sub, image_id=q["image_id"])
            samples.append(Sample(id=str(q["question_id"]), image=str(root / img),
                                  question=q["question"], answers=answers, meta=meta))
        return cls(samples, source=p, annotations=str(a) if a else None, **kw)

    @classmethod
    def layout(cls, path, annotations=None, image_root=None, subtype: str | None = None, **kw) -> Layout:
        folder, file = as_folder(path)
        sub = subtype or DEFAULT_SUBTYPE
        needs = [Need(file, "file", "VQAv2 questions (JSON)") if file is not None else
                 Need(folder / QUESTIONS_FILE.format(subtype=sub), "file", f"VQAv2 {sub} questions (JSON)",
                      (folder / f"*{sub}*questions*.json",))]
        if annotations is not None:
            needs.append(Need(Path(annotations), "file", "VQAv2 annotations (JSON)"))
        elif not sub.startswith("test"):
            needs.append(Need(folder / ANNOTATIONS_FILE.format(subtype=sub), "file", f"VQAv2 {sub} annotations (JSON)",
                              (folder / f"*{sub}*annotations*.json",)))
        img = image_subtype(sub)
        needs.append(Need(Path(image_root), "dir", "COCO images") if image_root is not None else
                     Need(folder / img, "dir", f"COCO {img} images (COCO_{img}_*.jpg)",
                          (folder / "images", folder / f"COCO_{img}_*.jpg")))
        return Layout(Path(path), tuple(needs), SOURCE)

    def _score(self, pairs):
        if any(not s.answers for s, _ in pairs):
            raise ValueError(f"{self.source}: no annotations loaded (test split?); submit to the "
                             "official server instead")
        by_type = defaultdict(list)
        acc = []
        for s, pred in pairs:
            v = vqa_accuracy(pred, s.answers)
            acc.append(v)
            if s.meta.get("answer_type"):
                by_type[s.meta["answer_type"]].append(v)
        out: dict = {"accuracy": sum(acc) / len(acc),
                     "by_answer_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())}}
        out["primary"] = out["accuracy"]
        return out
