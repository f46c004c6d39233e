"""Explicit layer-by-layer runs of a LLaVA LLM with in-LLM token dropping (and recycled tokens): the slow,
obviously-correct computation the staged stage-D policies (PyramidDrop, SparseVLM) are compared with.

The run uses the model's own decoder modules, batch size 1, no padding. Before each pruning layer a
``decide`` callback looks at the current rows and returns the rows of the next sequence; every later
layer runs on that sequence with a causal mask and either contiguous positions (``"renumber"``) or
the original position of each row (``"original"``), cos/sin from the model's own ``rotary_emb``.
Cached generation is checked against :func:`no_cache_generate`, which re-runs the explicit run from
scratch on prompt + generated tokens, replaying the prefill's decisions (generated tokens are always
kept, after the prompt).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function


class _Stop(Exception):
    pass


def layer0_input(model, inp) -> torch.Tensor:
    """(1, L, D) input hidden states of decoder layer 0 of the unpatched model for ``inp``."""
    got = {}

    def grab(m, args, kwargs):
        got["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    hk = model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inp)
    except _Stop:
        pass
    finally:
        hk.remove()
    return got["h"]


def causal_mask(model, n: int, dtype) -> torch.Tensor:
    cfg = model.model.language_model.config
    fn = ALL_MASK_ATTENTION_FUNCTIONS[cfg._attn_implementation]
    return fn(batch_size=1, q_length=n, kv_length=n, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
              attention_mask=torch.ones(1, n, dtype=torch.bool), allow_is_causal_skip=False, dtype=dtype,
              config=cfg, device=torch.device("cpu"))


@dataclass
class Decision:
    """The sequence after one pruning layer: per new row, the current row it copies (``rows``), the
    LLM-input index it stands for (``index``), and replacement hidden states ``{new row: (D,)}``
    (recycled tokens)."""

    rows: list[int]
    index: list[int]
    vectors: dict = field(default_factory=dict)


class replaced_rows:
    """Context manager: a pre-hook on decoder layer ``p`` that, at prefill, sets ``hidden[b, row] = value``
    for every ``(b, row, value)`` of ``fill(hidden)`` (computed from that layer's input): the slots of
    recycled tokens in the unpatched model."""

    def __init__(self, model, p, fill):
        self.layer = model.model.language_model.layers[p]
        self.fill = fill

    def _hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == 1:
            return None
        new = hidden.clone()
        for b, row, value in self.fill(hidden):
            new[b, row] = value.to(new.dtype)
        if args:
            return (new,) + tuple(args[1:]), kwargs
        kwargs["hidden_states"] = new
        return args, kwargs

    def __enter__(self):
        self.handle = self.layer.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def attention_weights(layer, h, rope, mask) -> torch.Tensor:
    """(H, L, L) eager attention probabilities of ``layer`` on input ``h`` (1, L, D)."""
    _, w = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=rope, attention_mask=mask)
    return w[0]


def explicit_run(model, inp, decide, prune_layers, *, positions: str = "renumber", replay=None, n_prompt=None):
    """Run ``model``'s LLM layer by layer (``model`` must use eager attention so ``decide`` can read
    attention weights). ``decide(layer, h (1, L', D), index (L',) LLM-input indices, tables, inputs) ->
    Decision`` where ``tables(h, index) -> (pos, rope, mask)`` gives the current positions / cos-sin /
    mask and ``inputs[j] = (h_j, index_j)`` is the input of every earlier layer j. ``replay`` (list of Decisions over the prompt) replays a prefill on prompt + generated tokens.

    Returns ``(last logits (1, V) fp32, decisions)``.
    """
    lm = model.model.language_model
    h = layer0_input(model, inp)
    L = h.shape[1]
    n_prompt = L if n_prompt is None else n_prompt
    index = torch.arange(L)
    decisions = []
    inputs = {}

    def tables(x, idx):
        pos = torch.arange(x.shape[1])[None] if positions == "renumber" else idx[None]
        return pos, lm.rotary_emb(x, pos), causal_mask(model, x.shape[1], x.dtype)

    with torch.no_grad():
        for l, layer in enumerate(lm.layers):
            if l in prune_layers:
                if replay is None:
                    d = decide(l, h, index, tables, inputs)
                else:  # prompt rows as at prefill, then every generated token
                    d0 = replay[list(prune_layers).index(l)]
                    n_cur_prompt = int((index < n_prompt).sum())
                    rows = list(d0.rows) + list(range(n_cur_prompt, h.shape[1]))
                    d = Decision(rows, list(d0.index) + index[n_cur_prompt:].tolist(), d0.vectors)
                decisions.append(d)
                new_h = h[:, torch.tensor(d.rows)].clone()
                for r, v in d.vectors.items():
                    new_h[0, r] = v.to(new_h.dtype)
                h, index = new_h, torch.tensor(d.index)
            inputs[l] = (h, index)
            pos, rope, mask = tables(h, index)
            out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=rope)
            h = out[0] if isinstance(out, tuple) else out
        logits = model.lm_head(lm.norm(h)[:, -1:]).float()[:, -1]
    return logits, decisions


def no_cache_generate(model, inp, decisions, prune_layers, *, positions: str = "renumber", n_new: int = 10):
    """Greedy tokens and per-step logits of :func:`explicit_run` re-run from scratch at every step."""
    ids = inp["input_ids"]
    n_prompt = ids.shape[1]
    tokens, logits = [], []
    for _ in range(n_new):
        cur = torch.cat([ids, torch.tensor([tokens], dtype=ids.dtype)], 1) if tokens else ids
        step = dict(inp, input_ids=cur, attention_mask=torch.ones_like(cur))
        lg, _ = explicit_run(model, step, None, prune_layers, positions=positions, replay=decisions, n_prompt=n_prompt)
        logits.append(lg)
        tokens.append(int(lg.argmax(-1)))
    return tokens, logits


# ------------------------------------------------------------------------------ hybrid LLMs (Qwen3.5)
def last_full_attention_layer(model, layer: int) -> int:
    """The last full-attention decoder layer at or before ``layer`` (from ``layer_types``; every layer of
    an attention-only LLM): where the rows asked for ``layer`` are read on a hybrid LLM."""
    types = getattr(model.model.language_model.config, "layer_types", None)
    full = [i for i in range(layer + 1) if types is None or types[i] != "linear_attention"]
    assert full, f"no full-attention layer at or before {layer}"
    return full[-1]


def shortened_layer_inputs(model, inp, stages: dict, layers, replace: dict | None = None) -> dict:
    """The physically shortened run (``oracles.physically_shortened_run``; ``inp`` one unpadded sample) with
    ``stages`` ``{layer: (1, L) keep}`` and ``replace`` applied: ``{layer: (h (n, D) the input the layer
    runs on, cols (n,) LLM-input columns of its rows, (cos, sin))}`` for each of ``layers``."""
    from oracles import physically_shortened_run

    got = {}

    def grab(i, b, h, cols, rope):
        if i in layers:
            got[i] = (h, cols, rope)

    physically_shortened_run(model, inp, stages, None, 1, replace=replace, observe=grab)
    return got


def shortened_attention(model, inp, stages: dict, layer: int, replace: dict | None = None):
    """``(probs (H, n, n), cols (n,), h (n, D))``: the eager attention (``model`` eager) of full-attention
    ``layer`` on the input it runs on in the physically shortened run (:func:`shortened_layer_inputs`)."""
    h, cols, rope = shortened_layer_inputs(model, inp, stages, [layer], replace)[layer]
    dec = model.model.language_model.layers[layer]
    probs = attention_weights(dec, h[None], rope, causal_mask(model, h.shape[0], h.dtype)).float()
    return probs, cols, h
