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


def _pair(result):
    """The (nll, is_greedy) pair a loglikelihood result carries (see VTPruneLMM.loglikelihood)."""
    assert isinstance(result, GenerationResult) and result.token_counts.input_tokens > 0
    nll, greedy = result.text
    return nll, greedy


def test_loglikelihood_from_local_checkpoint(tmp_path):
    """Mean (default) and summed negative log-likelihood of the continuation, as lmms-eval's models
    return it, equal the stock model's own log-probabilities computed here."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, proc = tiny_llava()
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    docs = _docs()[:2]
    conts = [" " + d["answer"] for d in docs]

    lm = VTPruneLMM(pretrained=str(tmp_path / "ckpt"), method="none", batch_size=2)  # stock from_pretrained path
    got = [_pair(r) for r in lm.loglikelihood(_requests(lm, docs, None, kind="loglikelihood", continuations=conts))]
    lm_sum = VTPruneLMM(pretrained=str(tmp_path / "ckpt"), method="none", batch_size=1, nll="sum")
    summed = [_pair(r) for r in lm_sum.loglikelihood(_requests(lm_sum, docs, None, kind="loglikelihood",
                                                               continuations=conts))]

    ref = AutoModelForImageTextToText.from_pretrained(tmp_path / "ckpt")
    rproc = AutoProcessor.from_pretrained(tmp_path / "ckpt")
    for (nll, greedy), (nll_sum, greedy_sum), d, c in zip(got, summed, docs, conts):
        prompt = "<image>\n" + d["question"]
        n = len(rproc.tokenizer(prompt + c)["input_ids"]) - len(rproc.tokenizer(prompt)["input_ids"])
        inp = rproc(text=[prompt + c], images=[d["image"]], return_tensors="pt")
        with torch.inference_mode():
            lp = torch.log_softmax(ref(**inp).logits[0, -n - 1:-1].float(), -1)
        tgt = inp["input_ids"][0, -n:]
        token_lp = lp.gather(-1, tgt[:, None]).squeeze(-1)
        assert nll == pytest.approx(-token_lp.mean().item(), abs=1e-5) and nll > 0
        assert nll_sum == pytest.approx(-token_lp.sum().item(), abs=1e-4)
        assert greedy == greedy_sum == bool((lp.argmax(-1) == tgt).all())

    lm8 = VTPruneLMM(pretrained=str(tmp_path / "ckpt"), method="random", keep=8, batch_size=2)
    pruned = [_pair(r) for r in lm8.loglikelihood(_requests(lm8, docs, None, kind="loglikelihood", continuations=conts))]
    assert all(torch.isfinite(torch.tensor(nll)) and nll > 0 for nll, _ in pruned)
    assert lm8.visual_tokens_mean == 8
    with pytest.raises(ValueError, match="nll="):
        VTPruneLMM(pretrained="tiny-llava", nll="max")


# ----------------------------------------------------------------------------------------------------
# End to end through `python -m lmms_eval`: lmms-eval's own scoring of both output types


GEN_TASK, MC_TASK = TASK, "vtprune_tiny_mc"
CHOICES = ["red", "green", "blue", "cyan"]
MC_POST, GEN_POST = "\nAnswer:", "\nAnswer with a single word."
NO_ANSWER = "an answer no tiny model gives"


def _patched_tiny(method: str, params: dict):
    import vtprune

    model, proc = tiny_llava()
    return model, proc, vtprune.patch(model, method, seed=0, **params)


def _own_choice_nll(method: str, params: dict) -> list[list[float]]:
    """The library's own mean negative log-likelihood of each choice, one sample at a time."""
    model, proc, handle = _patched_tiny(method, params)
    out = []
    with handle, torch.inference_mode():
        for d in _docs():
            prompt = "<image>\n" + d["question"] + MC_POST
            row = []
            for choice in CHOICES:
                text = prompt + " " + choice
                n = len(proc.tokenizer(text)["input_ids"]) - len(proc.tokenizer(prompt)["input_ids"])
                inp = proc(text=[text], images=[d["image"]], return_tensors="pt")
                lp = torch.log_softmax(model(**inp).logits[0, -n - 1:-1].float(), -1)
                row.append(-lp.gather(-1, inp["input_ids"][0, -n:, None]).mean().item())
            out.append(row)
    return out


def _own_answers(method: str, params: dict) -> list[str]:
    """The library's own greedy answers (one sample at a time), cut at the task's stop string."""
    model, proc, handle = _patched_tiny(method, params)
    out = []
    with handle, torch.inference_mode():
        for d in _docs():
            inp = proc(text=["<image>\n" + d["question"] + GEN_POST], images=[d["image"]], return_tensors="pt")
            ids = model.generate(**inp, max_new_tokens=4, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id,
                                 eos_token_id=proc.tokenizer.eos_token_id)
            text = proc.tokenizer.decode(ids[0, inp["input_ids"].shape[1]:], skip_special_tokens=True)
            out.append(text.split("\n")[0].strip())
    return out


def _write_tasks(tmp_path: Path, answers: list[str], golds: list[int]) -> Path:
    import datasets

    docs = _docs()
    feats = datasets.Features({"question_id": datasets.Value("int64"), "image": datasets.Image(),
                               "question": datasets.Value("string"), "answer": datasets.Value("string"),
                               "choices": datasets.Sequence(datasets.Value("string")), "gold": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"question_id": list(range(4)), "image": [d["image"] for d in docs],
                                     "question": QUESTIONS, "answer": answers, "choices": [CHOICES] * 4,
                                     "gold": golds}, features=feats)
    data = tmp_path / "data"
    datasets.DatasetDict({"test": ds}).save_to_disk(str(data))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    shutil.copy(FIXTURES / "utils.py", tasks / "utils.py")
    for task in (GEN_TASK, MC_TASK):
        yaml_text = (FIXTURES / f"{task}.yaml").read_text().replace("__DATASET_PATH__", str(data))
        (tasks / f"{task}.yaml").write_text(yaml_text)
    return tasks


def _run_lmms_eval(tmp_path: Path, tasks: Path, model_args: str) -> tuple[dict, dict, str]:
    out = tmp_path / "out"
    env = dict(os.environ, **OFFLINE, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HOME=str(tmp_path / "hf_home"), WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "vtprune", "--model_args", model_args,
           "--tasks", f"{GEN_TASK},{MC_TASK}", "--include_path", str(tasks), "--batch_size", "2",
           "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    files = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    assert len(files) == 1, log[-3000:]
    samples = {}
    for task in (GEN_TASK, MC_TASK):
        (path,) = glob.glob(str(out / "**" / f"*_samples_{task}.jsonl"), recursive=True)
        samples[task] = sorted((json.loads(line) for line in Path(path).read_text().splitlines()),
                               key=lambda r: r["doc_id"])
    return json.loads(Path(files[0]).read_text()), samples, log


@pytest.mark.parametrize("method, params, visual", [("none", {}, 16), ("random", {"keep": 8}, 8)])
def test_lmms_eval_scores_equal_the_library_predictions(tmp_path, method, params, visual):
    """`python -m lmms_eval --model vtprune` on a local multiple_choice and a generate_until task: the
    scores lmms-eval computes equal those of the library's own predictions, computed here sample by
    sample. The answer keys are built from those predictions so that the scoring convention shows:
    0.75 (mc) and 0.5 (generation) when right; picking the largest of the same values gives 0.0, and
    the wrapper's former log-likelihood sums (larger is better) gave 0.5 on this task."""
    nll = _own_choice_nll(method, params)
    best = [min(range(len(CHOICES)), key=row.__getitem__) for row in nll]
    worst = [max(range(len(CHOICES)), key=row.__getitem__) for row in nll]
    middle = next(j for j in range(len(CHOICES)) if j not in (best[3], worst[3]))
    golds = best[:3] + [middle]
    own = _own_answers(method, params)
    answers = own[:2] + [NO_ANSWER, NO_ANSWER]
    assert NO_ANSWER not in own

    args = ",".join([f"pretrained=tiny-llava,method={method}"] + [f"{k}={v}" for k, v in params.items()])
    res, samples, log = _run_lmms_eval(tmp_path, _write_tasks(tmp_path, answers, golds), args)

    assert res["results"][MC_TASK]["acc,none"] == pytest.approx(0.75)
    assert res["results"][GEN_TASK]["exact_match,none"] == pytest.approx(0.5)
    for d, row in enumerate(samples[MC_TASK]):  # lmms-eval saw the library's values, choice by choice
        got = [float(resp[0]) for resp in row["filtered_resps"]]  # the log writes them as strings
        assert got == pytest.approx(nll[d], abs=1e-4) and row["acc"] == float(d < 3)
    assert [row["filtered_resps"] for row in samples[GEN_TASK]] == own
    assert res["config"]["model"] == "vtprune"
    eff = res["efficiency"]["by_task"][GEN_TASK]  # our TokenCounts reach lmms-eval's efficiency summary
    assert eff["docs"] == 4 and eff["docs_with_token_counts"] == 4 and eff["total_input_tokens"] > 0
    stats = [json.loads(m) for m in re.findall(r"vtprune token stats: (\{.*?\})(?:\x1b\[0m)?\s*$", log, flags=re.MULTILINE)]
    assert stats and all(s["visual_tokens_mean"] == visual and s["visual_tokens_in_mean"] == 16 for s in stats)
