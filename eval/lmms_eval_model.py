"""lmms-eval model wrapper: evaluate any vtprune method with lmms-eval, without forking lmms-eval.

    pip install "vtprune[lmms]"      # lmms-eval==0.7.3, filelock<4, decord
    python -m lmms_eval --model vtprune \\
        --model_args pretrained=/path/to/llava-1.5-7b-hf,method=hiprune,keep=64 --tasks mme

The model is registered with lmms-eval through the entry-point group ``lmms_eval.models`` (see
``setup.cfg``); lmms-eval 0.7.3 expects that entry point to be a ``ModelManifest`` (or a callable
returning one), which is :func:`lmms_eval_manifest` below -- *not* the model class itself.

``--model_args`` keys (everything else is a parameter of the vtprune method):

* ``pretrained``: a local checkpoint directory (stock ``AutoModelForImageTextToText.from_pretrained``
  + ``AutoProcessor.from_pretrained``; any hub id ``from_pretrained`` accepts works too when online);
  or the name of a builtin model of the sweep harness (:data:`vtprune.eval.sweep.BUILTIN_MODELS`:
  ``tiny-llava``, ``tiny-llava_next``, ``tiny-qwen2_vl``, ``tiny-qwen2_5_vl`` (random tiny models of
  :mod:`vtprune.testing`, for tests), ``embedded``).
* ``method``: a vtprune spec string (``hiprune``, ``fastv:layer=2``, ``pitome + fastv:layer=2``;
  default ``none``: every token kept, through the patch machinery so token stats are recorded).
* method parameters: ``keep=64``, ``layer=2``, ... (coerced like :func:`vtprune.parse_spec`: ints,
  floats, ``true``/``false``, ``none``); they apply to a single method, as with :func:`vtprune.patch`.
  A composed spec with parameters goes in quotes: ``method="random:keep=0.5 + fastv:layer=2,keep=0.5"``.
* ``batch_size`` (int; ``auto`` -> 1), ``device`` (default ``cuda`` if available else ``cpu``),
  ``dtype`` (``auto``/``float32``/``bfloat16``/``float16``), ``max_new_tokens`` (overrides the task's),
  ``seed`` (for stochastic methods and sampling), ``prompt`` (``auto``: the processor's chat template
  when it has one, else ``plain``: image placeholders, a newline and the task text),
  ``attn_implementation``, ``token_counts`` (default true: ``generate_until`` returns lmms-eval
  ``GenerationResult`` objects whose ``TokenCounts.input_tokens`` are the tokens entering the first
  decoder layer *after* pruning, so lmms-eval's ``efficiency`` block of the results reflects the
  method; false: plain strings), ``nll`` (``mean``, the default, or ``sum``: how ``loglikelihood``
  reduces the continuation's token log-probabilities; see :meth:`VTPruneLMM.loglikelihood`).

Output types: ``generate_until`` and ``loglikelihood`` / ``multiple_choice`` tasks, scored by
lmms-eval itself (tested end to end through ``python -m lmms_eval`` on local tasks). lmms-eval 0.7.3
does not read cached loglikelihood responses back (``--use_cache``): run those tasks without it.

Per-request visual-token counts from :attr:`vtprune.Patch.stats` are accumulated in running means
(:attr:`VTPruneLMM.visual_tokens_mean` and friends, :attr:`VTPruneLMM.token_stats`) and logged after
every ``generate_until`` / ``loglikelihood`` call. Single-process only (no accelerate data parallelism).
"""
from __future__ import annotations

# Defined before anything imports lmms_eval: lmms-eval loads this entry point while its
# ``lmms_eval.models`` package is initialising, possibly while this module is itself half-imported.
MODEL_NAME = "vtprune"
CLASS_PATH = "vtprune.eval.lmms_eval_model.VTPruneLMM"


def lmms_eval_manifest():
    """Entry point of group ``lmms_eval.models``: the ``ModelManifest`` registering ``vtprune``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


import json  # noqa: E402
import os  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

try:
    from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts  # noqa: F401
    from lmms_eval.api.model import lmms
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "vtprune.eval.lmms_eval_model needs lmms-eval; install it with "
        "`pip install \"lmms-eval==0.7.3\" \"filelock<4\" decord` (or `pip install \"vtprune[lmms]\"`)"
    ) from exc

try:
    from loguru import logger as eval_logger
except ImportError:  # pragma: no cover - loguru is a dependency of lmms-eval
    import logging

    eval_logger = logging.getLogger(__name__)

import vtprune  # noqa: E402
from vtprune.registry import _coerce  # noqa: E402  (the coercion parse_spec applies)

TINY_PREFIX = "tiny-"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


@dataclass
class _RunningMean:
    n: int = 0
    mean: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        self.mean += (float(x) - self.mean) / self.n


def _split_arg_string(arg_string: str) -> list[str]:
    try:  # lmms-eval's splitter keeps JSON values with commas together
        from lmms_eval.utils import _smart_comma_split

        return [a for a in _smart_comma_split(arg_string) if a.strip()]
    except ImportError:  # pragma: no cover
        return [a for a in arg_string.split(",") if a.strip()]


def _to_dtype(dtype) -> Any:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().replace("torch.", "")
    if name == "auto":
        return "auto"
    if name not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: use auto, float32, bfloat16 or float16")
    return _DTYPES[name]


def _family_of(model) -> str:
    from vtprune.adapters import get_adapter

    return get_adapter(model).family


class VTPruneLMM(lmms):
    """lmms-eval ``lmms`` model: a stock HF VLM patched with ``vtprune.patch(model, method, **params)``."""

    is_simple = True

    def __init__(self, pretrained: str = "tiny-llava", method: str = "none", batch_size: int | str = 1,
                 max_batch_size: int | None = None, device: str | None = None, dtype: str = "auto",
                 max_new_tokens: int | None = None, seed: int = 0, prompt: str = "auto",
                 attn_implementation: str | None = None, token_counts: bool | str = True, nll: str = "mean",
                 **method_params) -> None:
        super().__init__()
        pretrained = str(pretrained)
        method = "none" if method is None else str(method)
        if isinstance(batch_size, str) and batch_size.strip().lower().startswith("auto"):
            eval_logger.warning("vtprune: batch_size=auto is not supported; using 1")
            batch_size = 1
        self.batch_size_per_gpu = int(_coerce(str(batch_size)) if isinstance(batch_size, str) else batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.max_new_tokens = None if max_new_tokens in (None, "", "none", "None") else int(max_new_tokens)
        self.seed = int(seed)
        self.token_counts = token_counts if isinstance(token_counts, bool) else bool(_coerce(str(token_counts)))
        self.nll = str(nll).lower()
        if self.nll not in ("mean", "sum"):
            raise ValueError(f"nll={nll!r}: use mean (per continuation token, lmms-eval's convention) or sum")
        self.prompt_mode = str(prompt).lower()
        if self.prompt_mode not in ("auto", "chat", "plain"):
            raise ValueError(f"prompt={prompt!r}: use auto, chat or plain")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            eval_logger.warning("vtprune: the lmms-eval wrapper runs single-process; WORLD_SIZE>1 is ignored")

        if device in (None, "", "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = str(device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available; pass device=cpu")
        self._device = torch.device(device)

        self.pretrained = pretrained
        model, processor = self._load(pretrained, _to_dtype(dtype), attn_implementation)
        self._model = model.to(self._device).eval()
        self.processor = processor
        self._tokenizer = getattr(processor, "tokenizer", processor)
        self.family = _family_of(self._model)

        params = {k: (_coerce(v) if isinstance(v, str) else v) for k, v in method_params.items()}
        self.method = method
        self.method_params = params
        self.patch = vtprune.patch(self._model, method, seed=self.seed, **params)

        self._visual = _RunningMean()
        self._visual_in = _RunningMean()
        self._eq_visual = _RunningMean()
        eval_logger.info(f"vtprune: {type(self._model).__name__} ({self.family}) from {pretrained!r} on {self._device}, "
                         f"patched with {self.patch!r}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> VTPruneLMM:
        """Like ``lmms.create_from_arg_string`` but keeps the values as strings, so method parameters
        are coerced exactly like :func:`vtprune.parse_spec` (``layer=-1`` stays an int) and a spec with
        ``=`` inside (``method=fastv:layer=2``) survives. Quote a value that holds commas, e.g. a composed
        spec with parameters: ``method="pitome:keep=0.5 + fastv:layer=2,keep=0.5"``. ``--model_args`` win
        over CLI defaults (``--batch_size``, ``--device``)."""
        args: dict[str, Any] = {}
        for item in _split_arg_string(arg_string or ""):
            key, eq, val = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise ValueError(f"malformed --model_args item {item!r}; expected key=value")
            val = val.strip()
            if len(val) >= 2 and val[0] == val[-1] and val[0] in "\"'":
                val = val[1:-1]  # quoted value: may hold commas (a composed spec with parameters)
            args[key] = val
        for k, v in (additional_config or {}).items():
            if v is not None and k not in args:
                args[k] = v
        return cls(**args)

    @staticmethod
    def _load(pretrained: str, dtype, attn_implementation):
        from vtprune.eval.sweep.models import BUILTIN_MODELS

        path_given = os.path.isdir(pretrained) and os.path.exists(os.path.join(pretrained, "config.json"))
        if not path_given and pretrained.lower().startswith(TINY_PREFIX) and pretrained not in BUILTIN_MODELS:
            raise ValueError(f"pretrained={pretrained!r}: builtin tiny models are "
                             f"{', '.join(n for n in BUILTIN_MODELS if n.startswith(TINY_PREFIX))}")
        if not path_given and pretrained in BUILTIN_MODELS:
            builtin = BUILTIN_MODELS[pretrained]
            if builtin.check is not None:
                builtin.check()
            model, processor = builtin.load(torch.float32 if dtype in (None, "auto") else dtype)
            if attn_implementation:
                model.set_attn_implementation(attn_implementation)
            return model, processor
        from transformers import AutoModelForImageTextToText, AutoProcessor

        kw = {"dtype": "auto" if dtype is None else dtype}
        if attn_implementation:
            kw["attn_implementation"] = attn_implementation
        model = AutoModelForImageTextToText.from_pretrained(pretrained, **kw)
        processor = AutoProcessor.from_pretrained(pretrained)
        return model, processor

    # ------------------------------------------------------------------ lmms-eval properties
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def eot_token_id(self):
        return self._tokenizer.eos_token_id

    # ------------------------------------------------------------------ token stats
    @property
    def visual_tokens_mean(self) -> float:
        """Mean visual tokens per request at the LLM input (after stage V/P), over requests with images."""
        return self._visual.mean

    @property
    def visual_tokens_in_mean(self) -> float:
        """Mean visual tokens per request the unpatched model would have fed to the LLM."""
        return self._visual_in.mean

    @property
    def eq_visual_tokens_mean(self) -> float:
        """Mean over requests of the per-decoder-layer mean of visual tokens (includes stage-D pruning)."""
        return self._eq_visual.mean

    @property
    def token_stats(self) -> dict:
        return {
            "method": self.method,
            "method_params": dict(self.method_params),
            "requests": self._visual.n,
            "visual_tokens_mean": self.visual_tokens_mean,
            "visual_tokens_in_mean": self.visual_tokens_in_mean,
            "eq_visual_tokens_mean": self.eq_visual_tokens_mean,
        }

    def _record(self, n_requests: int) -> None:
        """Add the last batch's :attr:`Patch.stats` (one schedule per sample) to the running means."""
        scheds = self.patch.stats.schedules
        if not scheds:  # no image in this batch: the patch did not run a prefill selection
            return
        if len(scheds) != n_requests:  # pragma: no cover - defensive
            eval_logger.warning(f"vtprune: {len(scheds)} token schedules for {n_requests} requests; stats skipped")
            return
        for s in scheds:
            if s.visual_tokens_in == 0:
                continue  # a text-only sample of a mixed batch
            self._visual.add(sum(s.visual_tokens_per_image))
            self._visual_in.add(s.visual_tokens_in)
            self._eq_visual.add(s.eq_visual_tokens)

    def _log_stats(self) -> None:
        eval_logger.info(f"vtprune token stats: {json.dumps(self.token_stats)}")

    # ------------------------------------------------------------------ prompts and inputs
    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        if doc_to_visual is None:
            return []
        doc = self.task_dict[task][split][doc_id]
        vis = doc_to_visual(doc)
        if vis is None:
            return []
        if not isinstance(vis, (list, tuple)):
            vis = [vis]
        out = []
        for v in vis:
            if hasattr(v, "convert"):  # PIL image
                out.append(v.convert("RGB"))
            else:
                raise NotImplementedError(
                    f"the vtprune lmms-eval wrapper handles image tasks only; task {task!r} gave a "
                    f"{type(v).__name__} visual (video path / audio?)"
                )
        return out

    def _placeholder(self) -> str:
        if self.family.startswith("qwen"):
            return "<|vision_start|><|image_pad|><|vision_end|>"
        return getattr(self.processor, "image_token", None) or "<image>"

    def _use_chat(self) -> bool:
        if self.prompt_mode == "plain":
            return False
        has = getattr(self.processor, "chat_template", None) is not None
        if self.prompt_mode == "chat" and not has:
            raise ValueError("prompt=chat but the processor has no chat template")
        return has

    def _prompt(self, context: str, n_images: int) -> str:
        if self._use_chat():
            content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": context}]
            messages = [{"role": "user", "content": content}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        image_token = getattr(self.processor, "image_token", None) or "<image>"
        if n_images == 0 or image_token in context:
            return context
        return self._placeholder() * n_images + "\n" + context

    def _inputs(self, texts: list[str], images: list) -> dict:
        tok = self._tokenizer
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            inputs = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        finally:
            tok.padding_side = old_side
        inputs = inputs.to(self._device)
        dtype = self._model.dtype
        return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        gen_eos = getattr(self._model.generation_config, "eos_token_id", None)
        vocab = self._model.get_input_embeddings().num_embeddings
        for e in ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])) + [self._tokenizer.eos_token_id]:
            if e is not None and 0 <= int(e) < vocab and int(e) not in ids:
                ids.append(int(e))
        return ids

    # ------------------------------------------------------------------ requests
    def generate_until(self, requests) -> list:
        """Batched greedy (unless the task's gen_kwargs sample) generation with left padding; the
        task's ``until`` stop strings cut the decoded text. Returns ``GenerationResult`` objects (text
        + token counts) or, with ``token_counts=false``, plain strings."""
        if not requests:
            return []
        args = [r.args for r in requests]
        groups: dict[str, list[int]] = {}
        for i, a in enumerate(args):
            key = json.dumps(a[1] or {}, sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        results: list = [None] * len(args)
        try:
            from tqdm import tqdm

            pbar = tqdm(total=len(args), desc="vtprune responding", disable=self.rank != 0)
        except ImportError:  # pragma: no cover
            pbar = None
        for idxs in groups.values():
            gen_kwargs = dict(args[idxs[0]][1] or {})
            idxs = sorted(idxs, key=lambda i: -len(args[i][0]))
            for start in range(0, len(idxs), self.batch_size):
                chunk = idxs[start:start + self.batch_size]
                for i, text in zip(chunk, self._generate_batch([args[i] for i in chunk], gen_kwargs)):
                    results[i] = text
                if pbar is not None:
                    pbar.update(len(chunk))
        if pbar is not None:
            pbar.close()
        self._log_stats()
        return results  # type: ignore[return-value]

    def _generate_batch(self, batch: list[tuple], gen_kwargs: dict) -> list:
        until = gen_kwargs.pop("until", None)
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)):
            raise ValueError(f"gen_kwargs['until'] must be a str or a list of str, got {type(until).__name__}")
        until = [u for u in until if u]
        texts, images = [], []
        for context, _, doc_to_visual, doc_id, task, split in batch:
            vis = self._visuals(doc_to_visual, task, split, doc_id)
            images.extend(vis)
            texts.append(self._prompt(context, len(vis)))
        inputs = self._inputs(texts, images)

        max_new = self.max_new_tokens or int(gen_kwargs.get("max_new_tokens") or 128)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = bool(gen_kwargs.get("do_sample", False)) or temperature > 0
        kw: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": do_sample,
                              "num_beams": int(gen_kwargs.get("num_beams") or 1)}
        if do_sample:
            kw["temperature"] = temperature if temperature > 0 else 1.0
            for k in ("top_p", "top_k"):
                if gen_kwargs.get(k) is not None:
                    kw[k] = gen_kwargs[k]
            torch.manual_seed(self.seed)
        else:  # greedy: neutralise sampling fields a checkpoint's generation_config may carry
            kw.update(temperature=None, top_p=None, top_k=None)
        if gen_kwargs.get("repetition_penalty") is not None:
            kw["repetition_penalty"] = float(gen_kwargs["repetition_penalty"])
        eos = self._eos_ids()
        if eos:
            kw["eos_token_id"] = eos
        pad = self._tokenizer.pad_token_id
        kw["pad_token_id"] = pad if pad is not None else (eos[0] if eos else 0)

        self.patch.stats = vtprune.PatchStats()
        with torch.inference_mode():
            out = self._model.generate(**inputs, **kw)
        self._record(len(batch))
        new = out[:, inputs["input_ids"].shape[1]:]
        decoded = self._tokenizer.batch_decode(new, skip_special_tokens=True)
        scheds = self.patch.stats.schedules
        if len(scheds) != len(batch):
            scheds = [None] * len(batch)
        mask = inputs.get("attention_mask")
        res = []
        for row, ((context, *_), text, sched) in enumerate(zip(batch, decoded, scheds)):
            for u in until:
                text = text.split(u)[0]
            self.cache_hook.add_partial("generate_until", (context, dict(gen_kwargs, until=until)), text)
            if not self.token_counts:
                res.append(text)
                continue
            n_in = sched.prompt_tokens if sched is not None and sched.prompt_tokens else (
                int(mask[row].sum()) if mask is not None else int(inputs["input_ids"].shape[1]))
            res.append(GenerationResult(text=text, token_counts=TokenCounts(
                input_tokens=int(n_in), output_tokens=self._n_generated(new[row], eos))))
        return res

    @staticmethod
    def _n_generated(tokens, eos: list[int]) -> int:
        """Generated tokens up to and including the first eos (generate pads rows that finished)."""
        toks = tokens.tolist()
        for n, t in enumerate(toks, 1):
            if t in eos:
                return n
        return len(toks)

    def loglikelihood(self, requests) -> list:
        """Score each continuation given its context + images, with the patch active, in lmms-eval's
        convention: ``(nll, is_greedy)`` where ``nll`` is the continuation's negative log-likelihood
        (``nll=mean``, the default: mean over its tokens, the ``loss`` lmms-eval's own models return;
        ``nll=sum``: the total) and ``is_greedy`` whether greedy decoding would produce it. lmms-eval
        0.7.3 picks the multiple-choice answer with ``argmin`` of these values.

        Each pair travels as the ``text`` of an lmms-eval ``GenerationResult`` (whose token counts are
        the tokens entering the LLM after pruning): lmms-eval 0.7.3's evaluator turns any other
        non-string response into its ``str()``, which multiple-choice scoring cannot read. Requests
        of ``acc_mutual_info`` (context-free continuations, two arguments) are scored without images.

        One forward over prompt + continuation per request (batched, left padded). Pruning shortens
        the sequence the model sees (and so its logits), but only image tokens are removed, so the
        continuation is always the tail of the logits."""
        res: list = [None] * len(requests)
        args = [r.args for r in requests]
        order = sorted(range(len(args)), key=lambda i: -len(args[i][0]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            full_texts, images, n_cont = [], [], []
            for i in chunk:
                context, continuation, vis = self._scoring_request(args[i])
                prompt = self._prompt(context, len(vis)) if (context or vis) else context
                # image placeholders expand identically in both, so the difference is the continuation
                n_prompt = len(self._tokenizer(prompt)["input_ids"])
                n_cont.append(len(self._tokenizer(prompt + continuation)["input_ids"]) - n_prompt)
                full_texts.append(prompt + continuation)
                images.extend(vis)
            inputs = self._inputs(full_texts, images)
            ids = inputs["input_ids"]
            self.patch.stats = vtprune.PatchStats()
            with torch.inference_mode():
                logits = self._model(**inputs).logits.float()
            self._record(len(chunk))
            scheds = self.patch.stats.schedules
            scheds = scheds if len(scheds) == len(chunk) else [None] * len(chunk)
            mask = inputs.get("attention_mask")
            for row, (i, n, sched) in enumerate(zip(chunk, n_cont, scheds)):
                if n <= 0:
                    raise ValueError(f"loglikelihood request {i}: the continuation {args[i][1]!r} adds no token "
                                     "to the prompt; lmms-eval's scoring needs at least one")
                lp = torch.log_softmax(logits[row, -n - 1:-1], dim=-1)
                target = ids[row, -n:].to(lp.device)
                token_lp = lp.gather(-1, target[:, None]).squeeze(-1)
                nll = -(token_lp.mean() if self.nll == "mean" else token_lp.sum()).item()
                greedy = bool((lp.argmax(-1) == target).all())
                n_in = sched.prompt_tokens if sched is not None and sched.prompt_tokens else (
                    int(mask[row].sum()) if mask is not None else int(ids.shape[1]))
                res[i] = GenerationResult(text=(float(nll), greedy), token_counts=TokenCounts(input_tokens=int(n_in)))
                self.cache_hook.add_partial("loglikelihood", (args[i][0], full_texts[row]), (float(nll), greedy))
        self._log_stats()
        return res

    def _scoring_request(self, arguments: tuple) -> tuple[str, str, list]:
        """``(context, continuation, images)`` of a loglikelihood request (6 arguments, or 2 without a doc)."""
        if len(arguments) == 2:  # acc_mutual_info: the continuation alone, no document, no image
            return str(arguments[0]), str(arguments[1]), []
        context, continuation, doc_to_visual, doc_id, task, split = arguments
        if callable(continuation):  # `loglikelihood` tasks pass doc_to_target
            continuation = continuation(self.task_dict[task][split][doc_id])
        if isinstance(continuation, (list, tuple)):
            continuation = continuation[0]
        return str(context), str(continuation), self._visuals(doc_to_visual, task, split, doc_id)

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "the vtprune lmms-eval wrapper does not implement generate_until_multi_round (multi-round "
            "dialogue tasks); use single-round generate_until or loglikelihood tasks"
        )


__all__ = ["CLASS_PATH", "MODEL_NAME", "VTPruneLMM", "lmms_eval_manifest"]
