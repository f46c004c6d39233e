"""Benchmark loaders: tiny fixtures in each official format, scored against hand-computed values."""
import base64
import io
import json
import pickle

import pytest
from PIL import Image

from vtprune.eval.benchmarks import (
    BENCHMARKS, GQA, MME, POPE, Base64Image, BenchmarkFormatError, JSONLBenchmark, MMBench, Sample,
    ScienceQA, TextVQA, VQAv2, load_benchmark,
)
from vtprune.eval.benchmarks.base import CHOICE_PROMPT, SHORT_ANSWER_PROMPT


def png(path, color=(255, 0, 0), size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def png_b64(color=(0, 0, 255)):
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_registry_names():
    for name in ("pope", "mme", "gqa", "textvqa", "vqav2", "scienceqa_img", "mmbench", "embedded",
                 "imagefolder", "retrieval"):
        assert name in BENCHMARKS
    with pytest.raises(KeyError):
        load_benchmark("nope", ".")


def test_missing_path_is_a_format_error(tmp_path):
    with pytest.raises(BenchmarkFormatError, match="does_not_exist"):
        load_benchmark("gqa", tmp_path / "does_not_exist.json")
    assert issubclass(BenchmarkFormatError, ValueError)


# ---------------------------------------------------------------------------------------------- POPE

def _pope_rows(labels):
    return [{"question_id": i + 1, "image": f"COCO_val2014_{i:012d}.jpg",
             "text": f"Is there a thing {i} in the image?", "label": l} for i, l in enumerate(labels)]


def test_pope_load_score_per_split(tmp_path):
    d = tmp_path / "pope"
    labels = ["yes"] * 4 + ["no"] * 6
    jsonl(d / "coco_pope_adversarial.json", _pope_rows(labels))
    jsonl(d / "coco_pope_random.json", _pope_rows(["yes", "no"]))
    png(d / "val2014" / "COCO_val2014_000000000000.jpg")
    b = load_benchmark("pope", d)
    assert len(b) == 12
    s0 = b.samples[0]
    assert s0.id == "adversarial/1" and s0.answers == "yes" and s0.meta["split"] == "adversarial"
    assert s0.load_image().size == (8, 8)                     # image root = <dir>/val2014
    assert b.prompt(s0) == "Is there a thing 0 in the image?\n" + SHORT_ANSWER_PROMPT
    preds = {}
    texts = ["Yes", "yes, there is", "No", "Yes.", "No.", "There is no dog.", "not sure", "Yes", "no",
             "I think so"]
    for i, t in enumerate(texts):
        preds[f"adversarial/{i + 1}"] = t
    preds["random/1"] = "Yes"
    preds["random/2"] = "Yes"
    preds["other/9"] = "Yes"
    out = b.score(preds)
    adv = out["adversarial"]
    # the worked matrix of test_metrics: TP 3, FN 1, FP 2, TN 4
    assert adv["f1"] == pytest.approx(2 / 3) and adv["accuracy"] == pytest.approx(0.7)
    rnd = out["random"]   # TP 1, FP 1: P 0.5, R 1, F1 2/3, acc 0.5, yes 1.0
    assert (rnd["precision"], rnd["recall"], rnd["accuracy"], rnd["yes_ratio"]) == (0.5, 1.0, 0.5, 1.0)
    assert out["avg_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert out["avg_accuracy"] == pytest.approx((0.7 + 0.5) / 2)
    assert out["primary"] == out["avg_f1"]
    assert (out["n"], out["n_missing"], out["n_extra"]) == (12, 0, 1)
    # one file, one split
    single = POPE.load(d / "coco_pope_random.json")
    assert [s.id for s in single] == ["random/1", "random/2"]
    # a missing prediction counts as wrong ("" parses as "yes")
    assert single.score({"random/1": "yes"})["n_missing"] == 1


def test_pope_malformed_names_file_and_line(tmp_path):
    f = tmp_path / "coco_pope_popular.json"
    rows = _pope_rows(["yes", "no", "yes"])
    rows[1]["label"] = "maybe"
    jsonl(f, rows)
    with pytest.raises(BenchmarkFormatError) as e:
        POPE.load(f)
    msg = str(e.value)
    assert "coco_pope_popular.json" in msg and "line 2" in msg and "yes" in msg and "Expected" in msg
    f.write_text(json.dumps(_pope_rows(["yes"])[0]) + "\n{not json\n")
    with pytest.raises(BenchmarkFormatError, match=r"coco_pope_popular\.json: line 2: invalid JSON"):
        POPE.load(f)
    del rows[1]["label"]
    rows[1]["label_x"] = "no"
    jsonl(f, rows)
    with pytest.raises(BenchmarkFormatError, match=r"line 2: missing key 'label'"):
        POPE.load(f)


def test_missing_image_is_a_format_error(tmp_path):
    f = jsonl(tmp_path / "coco_pope_random.json", _pope_rows(["yes"]))
    s = POPE.load(f).samples[0]                           # loading never opens images
    with pytest.raises(BenchmarkFormatError, match="COCO_val2014_000000000000.jpg: image file not found"):
        s.load_image()
    (tmp_path / "COCO_val2014_000000000000.jpg").write_bytes(b"not an image")
    with pytest.raises(BenchmarkFormatError, match="cannot decode"):
        s.load_image()


# ----------------------------------------------------------------------------------------------- MME

def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_mme_folder_layouts_and_scores(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    # layout 1: <task>/questions_answers_YN/*.txt + <task>/images/*
    for stem in ("img1", "img2"):
        png(root / "artwork" / "images" / f"{stem}.jpg")
        _write(root / "artwork" / "questions_answers_YN" / f"{stem}.txt",
               f"Is {stem} a painting? Please answer yes or no.\tYes\n"
               f"Is {stem} a statue? Please answer yes or no.\tNo\n")
    # layout 2: <task>/<stem>.txt next to <task>/<stem>.png
    png(root / "code_reasoning" / "0001.png")
    _write(root / "code_reasoning" / "0001.txt", "Does it print 3?\tYes\nDoes it print 4?\tNo\n")
    (root / "eval_tool").mkdir()                          # ignored: not a subtask
    b = MME.load(root)
    assert len(b) == 6
    ids = [s.id for s in b]
    assert "artwork/img1.jpg/0" in ids and "code_reasoning/0001.png/1" in ids
    s = b.by_id("artwork/img2.jpg/1")
    assert s.answers == "No" and s.load_image().size == (8, 8)
    preds = {"artwork/img1.jpg/0": "Yes", "artwork/img1.jpg/1": "No",
             "artwork/img2.jpg/0": "Yes", "artwork/img2.jpg/1": "Yes",   # img2: one wrong
             "code_reasoning/0001.png/0": "yes.", "code_reasoning/0001.png/1": "No, it does not."}
    out = b.score(preds)
    art = out["tasks"]["artwork"]
    assert art["acc"] == pytest.approx(0.75) and art["acc_plus"] == pytest.approx(0.5)
    assert art["score"] == pytest.approx(125.0)          # 75 + 50
    assert out["tasks"]["code_reasoning"]["score"] == pytest.approx(200.0)
    assert out["perception"] == pytest.approx(125.0)
    assert out["cognition"] == pytest.approx(200.0)
    assert out["total"] == pytest.approx(325.0) == out["primary"]


def test_mme_flat_task_file(tmp_path):
    png(tmp_path / "count" / "a.png")
    png(tmp_path / "count" / "b.png")
    _write(tmp_path / "count.txt",
           "a.png\tAre there two cats?\tYes\na.png\tAre there three cats?\tNo\n"
           "b.png\tIs there one dog?\tYes\tYes\nb.png\tAre there two dogs?\tNo\n")
    b = load_benchmark("mme", tmp_path)
    assert [s.id for s in b] == ["count/a.png/0", "count/a.png/1", "count/b.png/0", "count/b.png/1"]
    assert b.samples[2].load_image().size == (8, 8)
    out = b.score({"count/a.png/0": "Yes", "count/a.png/1": "No", "count/b.png/0": "No"})
    # 2/4 right (one missing), a.png fully right -> acc 0.5, acc+ 0.5, score 100
    assert out["tasks"]["count"]["score"] == pytest.approx(100.0)
    assert out["perception"] == pytest.approx(100.0) and out["cognition"] == 0
    assert out["n_missing"] == 1


def test_mme_malformed(tmp_path):
    png(tmp_path / "count" / "a.png")
    _write(tmp_path / "count.txt", "a.png\tAre there two cats?\tYes\na.png\tAre there three cats?\tPerhaps\n")
    with pytest.raises(BenchmarkFormatError) as e:
        load_benchmark("mme", tmp_path)
    assert "count.txt" in str(e.value) and "line 2" in str(e.value) and "Yes/No" in str(e.value)
    _write(tmp_path / "count.txt", "a.png Are there two cats? Yes\n")
    with pytest.raises(BenchmarkFormatError, match=r"count\.txt: line 1: 1 tab-separated field"):
        load_benchmark("mme", tmp_path)
    with pytest.raises(BenchmarkFormatError, match="no MME subtask"):
        load_benchmark("mme", tmp_path / "count")


# ----------------------------------------------------------------------------------------------- GQA

def test_gqa(tmp_path):
    qs = {
        "201": {"imageId": "n1", "question": "Is it red?", "answer": "yes",
                "types": {"structural": "verify", "semantic": "attr"}},
        "202": {"imageId": "n1", "question": "Which side?", "answer": "left",
                "types": {"structural": "query", "semantic": "rel"}},
        "203": {"imageId": "n2", "question": "What is it?", "answer": "chair",
                "types": {"structural": "query", "semantic": "obj"}},
    }
    f = tmp_path / "testdev_balanced_questions.json"
    f.write_text(json.dumps(qs))
    png(tmp_path / "images" / "n1.jpg")
    b = load_benchmark("gqa", tmp_path)
    assert [s.id for s in b] == ["201", "202", "203"]
    assert b.samples[0].load_image().size == (8, 8)
    out = b.score({"201": "Yes.", "202": " Left", "203": "table"})
    assert out["accuracy"] == pytest.approx(2 / 3) == out["primary"]
    assert out["by_structural"] == {"query": 0.5, "verify": 1.0}
    del qs["202"]["answer"]
    f.write_text(json.dumps(qs, indent=1))
    with pytest.raises(BenchmarkFormatError) as e:
        GQA.load(f)
    assert "testdev_balanced_questions.json" in str(e.value) and '$["202"]["answer"]' in str(e.value)
    f.write_text('{"201": {"imageId": "n1",\n "question": }')
    with pytest.raises(BenchmarkFormatError, match=r"line 2 column \d+: invalid JSON"):
        GQA.load(f)


# ------------------------------------------------------------------------------------------- TextVQA

def test_textvqa(tmp_path):
    data = {"dataset_name": "textvqa", "data": [
        {"question_id": 1, "image_id": "abc", "question": "What brand?",
         "answers": ["Nike"] * 3 + ["adidas"] * 7},
        {"question_id": 2, "image_id": "def", "question": "How many?",
         "answers": ["2", "two"] + ["3"] * 8},
    ]}
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    png(tmp_path / "train_images" / "abc.jpg")
    b = TextVQA.load(tmp_path)
    assert b.samples[0].load_image().size == (8, 8)
    assert len(b.samples[0].answers) == 10
    out = b.score({"1": "nike", "2": "Two"})
    # q1: 3 matches -> 0.9; q2: "two" == "2" after normalisation, 2 matches -> 0.6
    assert out["accuracy"] == pytest.approx((0.9 + 0.6) / 2)
    data["data"][1]["answers"] = "3"
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    with pytest.raises(BenchmarkFormatError, match=r'\$\["data"\]\[1\]\["answers"\]: not a list'):
        TextVQA.load(tmp_path)


# ---------------------------------------------------------------------------------------------- VQAv2

def test_vqav2(tmp_path):
    qs = {"data_subtype": "val2014", "questions": [
        {"question_id": 42000, "image_id": 42, "question": "What color is the bus?"},
        {"question_id": 42001, "image_id": 42, "question": "How many wheels?"},
    ]}
    anns = {"annotations": [
        {"question_id": 42000, "image_id": 42, "answer_type": "other", "question_type": "what color",
         "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(["red"] * 2 + ["blue"] * 8)]},
        {"question_id": 42001, "image_id": 42, "answer_type": "number", "question_type": "how many",
         "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(["4"] * 9 + ["6"])]},
    ]}
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(qs))
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(anns))
    png(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    b = load_benchmark("vqav2", tmp_path)
    assert b.samples[1].load_image().size == (8, 8)
    out = b.score({"42000": "Red", "42001": "four"})
    assert out["by_answer_type"] == {"number": pytest.approx(1.0), "other": pytest.approx(0.6)}
    assert out["accuracy"] == pytest.approx(0.8) == out["primary"]
    # a questions file alone finds its sibling annotations of the same subtype
    b1 = VQAv2.load(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json")
    assert b1.samples[0].answers == ["red"] * 2 + ["blue"] * 8
    assert b1.samples[0].image == b.samples[0].image
    # questions only (test-dev): loads with empty answers, cannot be scored locally
    td = tmp_path / "testdev"
    td.mkdir()
    (td / "v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text(
        json.dumps({**qs, "data_subtype": "test-dev2015"}))
    b2 = VQAv2.load(td)
    assert b2.samples[0].answers == [] and b2.samples[0].image.endswith("COCO_test2015_000000000042.jpg")
    with pytest.raises(ValueError, match="no annotations"):
        b2.score({"42000": "red"})
    anns["annotations"].pop()
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(anns))
    with pytest.raises(BenchmarkFormatError, match="no annotation for question_id 42001"):
        load_benchmark("vqav2", tmp_path)


# ------------------------------------------------------------------------------------------ ScienceQA

def test_scienceqa_img(tmp_path):
    problems = {
        "1": {"question": "Which is a mammal?", "choices": ["frog", "dog"], "answer": 1,
              "hint": "Look at the picture.", "image": "image.png", "subject": "natural science"},
        "2": {"question": "Which word rhymes?", "choices": ["cat", "dog", "hat"], "answer": 2,
              "hint": "", "image": "image.png", "subject": "language science"},
        "3": {"question": "No image here?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None},
        "4": {"question": "Train.", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png"},
    }
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"train": ["4"], "test": ["1", "2", "3"]}))
    png(tmp_path / "images" / "test" / "1" / "image.png")
    b = load_benchmark("scienceqa_img", tmp_path)
    assert [s.id for s in b] == ["1", "2"]                   # image-only test problems
    s1 = b.samples[0]
    assert s1.answers == "B" and s1.choices == ["frog", "dog"]
    assert s1.load_image().size == (8, 8)
    assert b.prompt(s1) == ("Context: Look at the picture.\nWhich is a mammal?\nA. frog\nB. dog\n"
                            + CHOICE_PROMPT)
    assert b.prompt(b.samples[1]).startswith("Which word rhymes?\nA. cat\nB. dog\nC. hat\n")
    assert b.score({"1": "B", "2": "The answer is A."})["accuracy"] == 0.5
    assert b.score({"1": "dog", "2": "(C)"})["accuracy"] == 1.0
    problems["2"]["answer"] = 5
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    with pytest.raises(BenchmarkFormatError, match=r'problems\.json: JSON path \$\["2"\]\["answer"\]'):
        ScienceQA.load(tmp_path)


# -------------------------------------------------------------------------------------------- MMBench

def _mmbench_tsv(path, rows, header=("index", "question", "hint", "A", "B", "C", "D", "answer",
                                     "category", "image")):
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    return path


def test_mmbench_plain_and_circular(tmp_path):
    img = png_b64()
    f = _mmbench_tsv(tmp_path / "MMBench_DEV_EN.tsv", [
        ["0", "What colour?", "nan", "red", "blue", "green", "white", "B", "color", img],
        ["1", "Which shape?", "A hint.", "circle", "square", "", "", "A", "shape", "0"],  # reuses row 0's image
    ])
    b = load_benchmark("mmbench", f)
    assert [s.id for s in b] == ["0", "1"]
    s0, s1 = b.samples
    assert s0.choices == ["red", "blue", "green", "white"] and s1.choices == ["circle", "square"]
    assert isinstance(s0.image, Base64Image) and s0.load_image().size == (6, 4)
    assert s1.load_image().size == (6, 4)
    assert pickle.loads(pickle.dumps(s1)).load_image().size == (6, 4)   # picklable for workers
    assert b.prompt(s1) == "A hint.\nWhich shape?\nA. circle\nB. square\n" + CHOICE_PROMPT
    assert b.prompt(s0).startswith("What colour?\nA. red\n")
    out = b.score({"0": "B", "1": "B"})
    assert out["accuracy"] == 0.5 == out["primary"]
    assert out["by_category"] == {"color": 1.0, "shape": 0.0}

    c = MMBench.load(f, circular=True)
    # 4 rotations of row 0, 2 of row 1; ids follow the legacy index + k * 1e6 convention
    assert [s.id for s in c] == ["0", "1000000", "2000000", "3000000", "1", "1000001"]
    r1 = c.by_id("1000000")
    assert r1.choices == ["blue", "green", "white", "red"] and r1.answers == "A"
    assert c.by_id("3000000").answers == "C" and c.by_id("1000001").answers == "B"
    preds = {"0": "B", "1000000": "A", "2000000": "D", "3000000": "C",   # row 0: all 4 right
             "1": "A", "1000001": "A"}                                      # row 1: one wrong
    out = c.score(preds)
    assert out["accuracy"] == pytest.approx(5 / 6)
    assert out["circular_accuracy"] == 0.5 == out["primary"]
    assert out["by_category"] == {"color": 1.0, "shape": 0.0}


def test_mmbench_malformed_row(tmp_path):
    img = png_b64()
    f = _mmbench_tsv(tmp_path / "mmb.tsv", [
        ["0", "Q?", "nan", "a", "b", "c", "d", "A", "cat", img],
        ["1", "Q?", "nan", "a", "b", "c", "d", "E", "cat", img],
    ])
    with pytest.raises(BenchmarkFormatError) as e:
        MMBench.load(f)
    assert "mmb.tsv" in str(e.value) and "TSV row 2 (line 3)" in str(e.value) and "'E'" in str(e.value)
    _mmbench_tsv(f, [["0", "Q?", "nan", "a", "b"]])
    with pytest.raises(BenchmarkFormatError, match=r"TSV row 1 \(line 2\): 5 fields, header has 10"):
        MMBench.load(f)
    _mmbench_tsv(f, [["0", "Q?", "nan", "a", "b", "c", "d", "A", "cat", "!!notbase64!!"]])
    s = MMBench.load(f).samples[0]
    with pytest.raises(BenchmarkFormatError, match=r"mmb\.tsv: TSV row 1 \(line 2\): cannot decode"):
        s.load_image()


# ------------------------------------------------------------------------------------------- embedded

def test_embedded_jsonl(tmp_path):
    rows = [
        {"id": "q1", "image": "img/0.png", "question": "What colour is the square?", "answer": "red",
         "type": "color", "relevant_tokens": [1, 2]},
        {"id": "q2", "image": "img/0.png", "question": "How many circles?", "answer": ["2", "two"],
         "type": "count"},
        {"id": 3, "image": "img/1.png", "question": "Is there a star?", "answer": "no", "type": "exists"},
        {"id": "q4", "image": "img/1.png", "question": "How many squares?", "answer": "1", "type": "count"},
    ]
    f = jsonl(tmp_path / "bench" / "benchmark.jsonl", rows)
    png(tmp_path / "bench" / "img" / "0.png")
    b = load_benchmark("embedded", tmp_path / "bench")
    assert [s.id for s in b] == ["q1", "q2", "3", "q4"]
    assert b.samples[0].meta["relevant_tokens"] == [1, 2] and b.samples[0].meta["type"] == "color"
    assert b.samples[0].load_image().size == (8, 8)
    out = b.score({"q1": "Red.", "q2": "Two", "3": "yes", "q4": "1"})
    assert out["accuracy"] == 0.75 == out["primary"]
    assert out["by_type"] == {"color": 1.0, "count": 1.0, "exists": 0.0}
    sub = b.subset(limit=3, shard=1, num_shards=2)
    assert [s.id for s in sub] == ["q2"] and len(b) == 4
    assert sub.score({"q2": "2"})["accuracy"] == 1.0
    # the shipped embedded layout: questions.jsonl next to scenes.jsonl and images/
    shipped = tmp_path / "shipped"
    jsonl(shipped / "questions.jsonl", rows)
    jsonl(shipped / "scenes.jsonl", [{"image": "img/0.png", "objects": []}])
    assert [s.id for s in load_benchmark("embedded", shipped)] == ["q1", "q2", "3", "q4"]
    rows[2]["relevant_tokens"] = ["a"]
    jsonl(f, rows)
    with pytest.raises(BenchmarkFormatError, match=r"benchmark\.jsonl: line 3: relevant_tokens"):
        JSONLBenchmark.load(f)
    rows[2]["relevant_tokens"] = [0]
    rows[3]["id"] = "q1"
    jsonl(f, rows)
    with pytest.raises(BenchmarkFormatError, match=r"line 4: id 'q1' repeats line 1"):
        JSONLBenchmark.load(f)


# ------------------------------------------------------------------------------- classification & retrieval

def test_imagefolder_classification(tmp_path):
    for cls, n in (("cat", 2), ("dog", 1), ("fish", 1)):
        for i in range(n):
            png(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    b = load_benchmark("imagefolder", tmp_path)
    assert b.classes == ["cat", "dog", "fish"]
    assert [s.id for s in b] == ["cat/0.png", "cat/1.png", "dog/0.png", "fish/0.png"]
    assert [s.meta["label"] for s in b] == [0, 0, 1, 2]
    assert b.class_prompts()[1] == "a photo of a dog."
    scores = {"cat/0.png": [0.9, 0.05, 0.05],    # rank 0
              "cat/1.png": [0.2, 0.5, 0.3],      # rank 2
              "dog/0.png": [0.6, 0.3, 0.1],      # rank 1
              "fish/0.png": [0.1, 0.1, 0.8]}     # rank 0
    out = b.score_scores(scores, ks=(1, 2, 5))
    assert out["top1"] == 0.5 and out["top2"] == 0.75 and "top5" not in out   # only 3 classes
    assert b.score({"cat/0.png": "Cat", "dog/0.png": "dog", "cat/1.png": "dog"})["accuracy"] == 0.5


def test_karpathy_retrieval(tmp_path):
    data = {"dataset": "flickr30k", "images": [
        {"filename": "a.jpg", "imgid": 0, "split": "test", "sentences": [{"raw": "A cat."}, {"raw": "A kitten."}]},
        {"filename": "b.jpg", "imgid": 1, "split": "train", "sentences": [{"raw": "Train."}]},
        {"filename": "c.jpg", "imgid": 2, "split": "test", "sentences": [{"raw": "A dog."}, {"raw": "A pup."}]},
    ]}
    f = tmp_path / "dataset_flickr30k.json"
    f.write_text(json.dumps(data))
    png(tmp_path / "images" / "a.jpg")
    b = load_benchmark("retrieval", f)
    assert [s.id for s in b] == ["0", "2"]
    assert b.texts == ["A cat.", "A kitten.", "A dog.", "A pup."] and b.text_to_image == [0, 0, 1, 1]
    assert b.samples[0].load_image().size == (8, 8)
    sim = [[0.9, 0.1, 0.8, 0.2], [0.7, 0.6, 0.5, 0.4]]          # the matrix of test_metrics
    out = b.score_similarity(sim, ks=(1, 2, 3))
    assert (out["i2t_r1"], out["t2i_r1"], out["t2i_r2"]) == (0.5, 0.5, 1.0)
    out10 = b.score({"0": sim[0], "2": sim[1]})               # default ks = (1, 5, 10)
    assert out10["i2t_r1"] == 0.5 and out10["i2t_r5"] == 1.0 and out10["t2i_r10"] == 1.0
    assert out10["mean_recall"] == pytest.approx(5 / 6) == out10["primary"]
    data["images"][2]["sentences"][1] = {"text": "no raw"}
    f.write_text(json.dumps(data))
    with pytest.raises(BenchmarkFormatError, match=r'\$\["images"\]\[2\]\["sentences"\]\[1\]\["raw"\]'):
        load_benchmark("retrieval", f)


def test_sample_and_subset_basics(tmp_path):
    s = Sample(id="x", image=lambda: Image.new("L", (3, 3)), question="q", answers="a")
    assert s.load_image().mode == "RGB" and s.load_image(mode=None).mode == "L"
    assert s.answer_list == ["a"]
    with pytest.raises(BenchmarkFormatError, match="duplicate sample id"):
        JSONLBenchmark([s, s])
