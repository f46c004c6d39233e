"""lmms-eval integration (``--model vtprune``), offline: a tiny local task, tiny random models.

Needs the ``lmms`` extra: ``pip install "lmms-eval==0.7.3" "filelock<4" decord`` (== ``pip install -e ".[lmms]"``).
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install \"lmms-eval==0.7.3\" \"filelock<4\" decord)")

from lmms_eval.api.instance import GenerationResult, Instance  # noqa: E402
from vtprune.eval.lmms_eval_model import VTPruneLMM  # noqa: E402
from vtprune.testing import tiny_images, tiny_llava  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures_lmms"
TASK = "vtprune_tiny_vqa"
QUESTIONS = ["What color is it?", "How many objects?", "Is it red?", "Where is the cat?"]
ANSWERS = ["red", "2", "yes", "left"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


def _docs():
    return [{"image": img, "question": q, "answer": a} for img, q, a in zip(tiny_images(4), QUESTIONS, ANSWERS)]


def _requests(lm, docs, gen_kwargs, task="t", split="test", kind="generate_until", continuations=None):
    lm.task_dict = {task: {split: docs}}
    reqs = []
    for i, d in enumerate(docs):
        second = dict(gen_kwargs) if kind == "generate_until" else continuations[i]
        reqs.append(Instance(request_type=kind, idx=0, metadata={"task": task, "doc_id": i, "repeats": 1},
                             arguments=(d["question"], second, lambda doc: [doc["image"]], i, task, split)))
    return reqs


def _texts(results):
    assert all(isinstance(r, GenerationResult) and isinstance(r.text, str) for r in results)
    return [r.text for r in results]


def test_entry_point_registers_vtprune():
    from importlib.metadata import entry_points

    from lmms_eval import models

    eps = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "vtprune"]
    assert eps, "entry point missing: run `pip install -e . --no-deps` after editing setup.cfg"
    assert "vtprune" in models.list_available_models()
    assert models.get_model("vtprune") is VTPruneLMM


def test_model_args_are_parsed_like_spec_strings():
    lm = VTPruneLMM.create_from_arg_string(
        "pretrained=tiny-llava,method=random:at=P,keep=8,batch_size=2,seed=3,max_new_tokens=2",
        {"batch_size": 1, "max_batch_size": None, "device": None},
    )
    assert lm.batch_size == 2 and lm.seed == 3 and lm.max_new_tokens == 2  # model_args win over CLI defaults
    assert lm.method == "random:at=P" and lm.method_params == {"keep": 8}
    assert isinstance(lm.method_params["keep"], int)
    assert "keep=8" in repr(lm.patch) and lm.family == "llava" and lm.device == torch.device("cpu")
    composed = VTPruneLMM.create_from_arg_string('pretrained=tiny-llava,method="random:keep=8 + fastv:layer=2,keep=0.5"')
    assert composed.method_params == {} and [p.name for p in composed.patch.policies] == ["random", "fastv"]
    with pytest.raises(ValueError, match="builtin tiny models"):
        VTPruneLMM(pretrained="tiny-nope")
    with pytest.raises(NotImplementedError, match="multi_round"):
        lm.generate_until_multi_round([])


def test_generate_until_two_requests_batched_and_stats():
    docs = _docs()[:2]
    gk = {"max_new_tokens": 4, "temperature": 0, "do_sample": False}

    lm = VTPruneLMM(pretrained="tiny-llava", method="random", keep=8, batch_size=2)
    out = lm.generate_until(_requests(lm, docs, gk))
    texts = _texts(out)
    assert len(texts) == 2
    assert lm.visual_tokens_mean == 8 and lm.visual_tokens_in_mean == 16 and lm.token_stats["requests"] == 2
    for r in out:  # tokens entering the LLM after pruning; output tokens generated
        assert r.token_counts.input_tokens > 0 and 1 <= r.token_counts.output_tokens <= 4

    # method=none through the wrapper == the stock model's greedy generate (batched, left padded)
    ref_model, ref_proc = tiny_llava()
    ref_proc.tokenizer.padding_side = "left"
    prompts = ["<image>\n" + d["question"] for d in docs]
    inputs = ref_proc(text=prompts, images=[d["image"] for d in docs], return_tensors="pt", padding=True)
    with torch.inference_mode():
        ids = ref_model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=ref_proc.tokenizer.pad_token_id,
                                 eos_token_id=ref_proc.tokenizer.eos_token_id)
    expected = ref_proc.tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    lm0 = VTPruneLMM(pretrained="tiny-llava", method="none", batch_size=2)
    plain = _texts(lm0.generate_until(_requests(lm0, docs, gk)))
    assert plain == expected
    assert lm0.visual_tokens_mean == 16 == lm0.visual_tokens_in_mean
    in_tokens = [r.token_counts.input_tokens for r in lm0.generate_until(_requests(lm0, docs, gk))]
    assert [r.token_counts.input_tokens for r in out] == [n - 8 for n in in_tokens]  # 8 visual tokens pruned

    # batch size 1 gives the same answers; `until` cuts the decoded text
    lm1 = VTPruneLMM(pretrained="tiny-llava", method="none", batch_size=1, token_counts=False)
    assert lm1.generate_until(_requests(lm1, docs, gk)) == plain
    stop = next((t[1] for t in plain if len(t) > 1), None)
    if stop is not None:
        cut = lm1.generate_until(_requests(lm1, docs, dict(gk, until=[stop])))
        assert cut == [t.split(stop)[0] for t in plain]


def test_loglikelihood_from_local_checkpoint(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, proc = tiny_llava()
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    docs = _docs()[:2]
    conts = [" " + d["answer"] for d in docs]

    lm = VTPruneLMM(pretrained=str(tmp_path / "ckpt"), method="none", batch_size=2)  # stock from_pretrained path
    got = lm.loglikelihood(_requests(lm, docs, None, kind="loglikelihood", continuations=conts))

    ref = AutoModelForImageTextToText.from_pretrained(tmp_path / "ckpt")
    rproc = AutoProcessor.from_pretrained(tmp_path / "ckpt")
    for (ll, greedy), d, c in zip(got, docs, conts):
        prompt = "<image>\n" + d["question"]
        n = len(rproc.tokenizer(prompt + c)["input_ids"]) - len(rproc.tokenizer(prompt)["input_ids"])
        inp = rproc(text=[prompt + c], images=[d["image"]], return_tensors="pt")
        with torch.inference_mode():
            lp = torch.log_softmax(ref(**inp).logits[0, -n - 1:-1].float(), -1)
        tgt = inp["input_ids"][0, -n:]
        assert ll == pytest.approx(lp.gather(-1, tgt[:, None]).sum().item(), abs=1e-4)
        assert greedy == bool((lp.argmax(-1) == tgt).all())

    lm8 = VTPruneLMM(pretrained=str(tmp_path / "ckpt"), method="random", keep=8, batch_size=2)
    pruned = lm8.loglikelihood(_requests(lm8, docs, None, kind="loglikelihood", continuations=conts))
    assert all(torch.isfinite(torch.tensor(ll)) and ll < 0 for ll, _ in pruned)
    assert lm8.visual_tokens_mean == 8


def _write_task(tmp_path: Path) -> Path:
    import datasets

    docs = _docs()
    feats = datasets.Features({"question_id": datasets.Value("int64"), "image": datasets.Image(),
                               "question": datasets.Value("string"), "answer": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"question_id": list(range(4)), "image": [d["image"] for d in docs],
                                     "question": QUESTIONS, "answer": ANSWERS}, features=feats)
    data = tmp_path / "data"
    datasets.DatasetDict({"test": ds}).save_to_disk(str(data))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    shutil.copy(FIXTURES / "utils.py", tasks / "utils.py")
    yaml_text = (FIXTURES / f"{TASK}.yaml").read_text().replace("__DATASET_PATH__", str(data))
    (tasks / f"{TASK}.yaml").write_text(yaml_text)
    return tasks


def test_lmms_eval_cli_end_to_end(tmp_path):
    tasks = _write_task(tmp_path)
    out = tmp_path / "out"
    env = dict(os.environ, **OFFLINE, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HOME=str(tmp_path / "hf_home"), WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "vtprune",
           "--model_args", "pretrained=tiny-llava,method=random,keep=8",
           "--tasks", TASK, "--include_path", str(tasks), "--limit", "4", "--batch_size", "2",
           "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]

    files = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    assert len(files) == 1, log[-3000:]
    res = json.loads(Path(files[0]).read_text())
    em = res["results"][TASK]["exact_match,none"]
    assert 0.0 <= em <= 1.0
    assert res["config"]["model"] == "vtprune"
    eff = res["efficiency"]["by_task"][TASK]  # our TokenCounts reach lmms-eval's efficiency summary
    assert eff["docs"] == 4 and eff["docs_with_token_counts"] == 4 and eff["total_input_tokens"] > 0
    samples = glob.glob(str(out / "**" / f"*_samples_{TASK}.jsonl"), recursive=True)
    assert len(samples) == 1 and len(Path(samples[0]).read_text().splitlines()) == 4

    m = re.findall(r"vtprune token stats: (\{.*?\})(?:\x1b\[0m)?\s*$", log, flags=re.MULTILINE)
    assert m, log[-3000:]
    stats = json.loads(m[-1])
    assert stats["requests"] == 4 and stats["visual_tokens_mean"] == 8 and stats["visual_tokens_in_mean"] == 16
