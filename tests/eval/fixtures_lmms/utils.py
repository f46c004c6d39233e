"""Task functions of the tiny offline lmms-eval task (see vtprune_tiny_vqa.yaml)."""


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def process_results(doc, results):
    pred = results[0].strip().lower()
    return {"exact_match": float(pred == doc["answer"].lower())}
