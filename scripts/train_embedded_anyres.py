"""Train the AnyRes embedded VLM (``embedded-anyres``: stock ``LlavaNextForConditionalGeneration``, the
frozen real DINOv2-S tower, a trained projector + image_newline + small Llama) and write
``assets/embedded-anyres/model/`` and its ``MODEL_CARD.md``.

    python scripts/train_embedded.py --steps 1500 --extra-sizes 84 140 --out /tmp/e4 --no-final-eval   # embedded's stage 1
    python scripts/train_embedded_anyres.py --init-from /tmp/e4 --steps 1000 --lr 1e-3 --warmup 60 --val-every 200

(1 torch thread each; about 18 and 25 min of training on a shared 2-core CPU.) The language model starts from
``embedded``'s stage-1 model (same widths and vocabulary; ``--init-from``): the base view is the kind of image it
was trained on, the crops and their packing are new.

Data: scenes of ``vtprune.eval.embedded.anyres`` (seed ``--data-seed`` for training, ``--val-seed`` for
progress only); the shipped held-out split (its own seed) is used only for the final scores. Sequences
and losses are those of ``scripts/train_embedded.py`` (its functions are reused): the image's FULL packed
visual-token sequence (base view, crops, newlines; no token is ever dropped), up to twelve questions with
their answers and a listing turn; loss on answers and listing words, plus the per-visual-token naming
auxiliary loss (``--aux-weight``, ``--aux-fields``: what lies on each visual token). The tower is frozen,
so its per-view features are computed once and
cached under ``$VTPRUNE_EMBEDDED_CACHE`` (or ``assets/_cache/``).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_embedded import (AUX_FIELDS, batch_tensors, cached_features, encode_sequence,  # noqa: E402
                            fold_standardisation, forward_loss, grow_from, make_optimizer, patch_targets,
                            save_trained, train_step)
from transformers import LlavaNextForConditionalGeneration, set_seed  # noqa: E402
from vtprune.eval.embedded import anyres as A  # noqa: E402
from vtprune.eval.embedded import generator as G  # noqa: E402
from vtprune.eval.embedded import model as M  # noqa: E402
from vtprune.eval.embedded.dinov2_from_onnx import build_dinov2  # noqa: E402
from vtprune.eval.embedded.evaluate import evaluate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def view_features(tower, processor, scenes, layer: int, batch: int = 16, log=print):
    """((total views, 64, 384) float16 hidden states of tower block ``layer``, CLS dropped; per-scene view
    offsets). Views are the image processor's own base view + crops."""
    out, offsets = [], [0]
    t0 = time.time()
    for i in range(0, len(scenes), batch):
        enc = processor.image_processor(images=[s.image for s in scenes[i:i + batch]], return_tensors="pt")
        n_views = [1 + int(np.prod(A.grid_shape(*map(int, hw)))) for hw in enc.image_sizes]
        pv = torch.cat([p[:n] for p, n in zip(enc.pixel_values, n_views)])
        out.append(tower(pixel_values=pv, output_hidden_states=True).hidden_states[layer][:, 1:].half())
        offsets += list(np.cumsum(n_views) + offsets[-1])
        if (i // batch) % 20 == 0:
            log(f"  tower features {i + len(n_views)}/{len(scenes)} ({time.time() - t0:.0f}s)")
    return torch.cat(out), torch.tensor(offsets)


def image_size(scene) -> tuple[int, int]:
    w, h = scene.image.size
    return h, w


def base_centre(o, size: tuple[int, int]) -> int:
    """The base-view token holding the centre of object ``o`` of an image of ``size`` (h, w)."""
    h, w = size
    return min(o.center[1] * A.SIDE // h, A.SIDE - 1) * A.SIDE + min(o.center[0] * A.SIDE // w, A.SIDE - 1)


def val_records(scenes, seed: int = 123) -> list[dict]:
    rng = np.random.default_rng(seed)
    recs = []
    for i, s in enumerate(scenes):
        for q in G.make_questions(s, 6, rng):
            recs.append(dict(q, image_path=f"{i:06d}", size=list(image_size(s))))
    return recs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(A.MODEL_DIR))
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--n-val", type=int, default=150)
    ap.add_argument("--data-seed", type=int, default=11)
    ap.add_argument("--val-seed", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0, help="init / batch-order seed")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--aux-weight", type=float, default=1.0)
    ap.add_argument("--aux-fields", nargs="+", default=list(AUX_FIELDS), choices=AUX_FIELDS,
                    help="per-patch naming targets (train_embedded.patch_targets; centre: the base-view token)")
    ap.add_argument("--layers", type=int, default=A.TEXT_KW["num_hidden_layers"])
    ap.add_argument("--heads", type=int, default=A.TEXT_KW["num_attention_heads"])
    ap.add_argument("--width", type=int, default=A.TEXT_KW["hidden_size"])
    ap.add_argument("--ffn", type=int, default=A.TEXT_KW["intermediate_size"])
    ap.add_argument("--bf16", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, default=55.0, help="hard stop of the training loop")
    ap.add_argument("--val-every", type=int, default=400)
    ap.add_argument("--init-from", default=None,
                    help="start from a single-view embedded checkpoint (scripts/train_embedded.py; same vocabulary "
                         "and widths, its layer count dividing --layers): projector, embeddings and language model "
                         "copied (train_embedded.grow_from), image_newline freshly initialised")
    ap.add_argument("--time-steps", type=int, default=0, help="only time this many steps, save nothing")
    ap.add_argument("--no-final-eval", action="store_true")
    args = ap.parse_args(argv)

    t_start = time.time()
    log = lambda *a: print(f"[{time.time() - t_start:7.1f}s]", *a, flush=True)
    set_seed(args.seed)
    tok = A.build_tokenizer()
    processor = A.build_processor(tok)
    cfg = A.build_config(tok)
    tc = cfg.text_config
    tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers = args.width, args.ffn, args.layers
    tc.num_attention_heads = tc.num_key_value_heads = args.heads
    tc.head_dim = args.width // args.heads
    model = LlavaNextForConditionalGeneration(cfg)
    if args.init_from:
        if M.build_tokenizer().get_vocab() != tok.get_vocab():
            raise SystemExit("--init-from: the single-view model's vocabulary differs from this one's")
        grow_from(model, Path(args.init_from), log)
    model.model.vision_tower.load_state_dict(build_dinov2(image_size=A.BASE).state_dict())
    model.model.vision_tower.requires_grad_(False).eval()
    layer = cfg.vision_feature_layer % (cfg.vision_config.num_hidden_layers + 1)
    kw = dict(prefix="embedded_anyres", make_scenes=A.scenes_for, compute=view_features)
    tr_scenes, (tr_views, tr_off), t_tr = cached_features("train", args.data_seed, args.n_train, layer,
                                                          model.model.vision_tower, processor, log, **kw)
    va_scenes, (va_views, va_off), t_va = cached_features("val", args.val_seed, args.n_val, layer,
                                                          model.model.vision_tower, processor, log, **kw)
    log(f"features ready (computation took {t_tr + t_va:.0f}s); train views {tuple(tr_views.shape)}")

    # per-dimension standardisation (training only; folded into linear_1 at the end)
    sample = tr_views[torch.randperm(len(tr_views), generator=torch.Generator().manual_seed(0))[:4000]].float()
    mu, sd = sample.reshape(-1, sample.shape[-1]).mean(0), sample.reshape(-1, sample.shape[-1]).std(0).clamp_min(1e-4)
    if args.init_from:  # the source's projector already has its standardisation folded in
        mu, sd = torch.zeros_like(mu), torch.ones_like(sd)
    norm = lambda f: (f.float() - mu) / sd
    sizes_tr = [image_size(s) for s in tr_scenes]

    def visual(model, batch):  # batch: (list of (n_views, 64, C) features, list of sizes)
        return A.pack(model, [norm(v) for v in batch[0]], batch[1])

    trainable, opt, sched = make_optimizer(model, args.lr, args.weight_decay, args.warmup, args.steps)
    n_trainable = sum(p.numel() for p in trainable)
    vocab = tok.get_vocab()
    img_id, eos_id, pad_id = vocab[M.IMAGE_TOKEN], tok.eos_token_id, tok.pad_token_id

    def val(budgets):
        model.eval()
        recs = val_records(va_scenes)
        with torch.no_grad():
            feats = visual(model, ([va_views[va_off[i]:va_off[i + 1]] for i in range(len(va_scenes))],
                                   [image_size(s) for s in va_scenes]))
        res = evaluate(model, processor, recs, budgets=budgets, feats=feats, select=A.select_record)
        model.train()
        model.model.vision_tower.eval()
        return [round(res[b]["acc"], 4) for b in budgets]

    rng = np.random.default_rng([args.seed, 7])
    model.train()
    model.model.vision_tower.eval()
    t_train = time.time()
    history, ema, step = [], None, 0
    for step in range(1, (args.time_steps or args.steps) + 1):
        idx = rng.choice(len(tr_scenes), size=args.batch, replace=False)
        n_tok = [len(A.token_views(*sizes_tr[i])) for i in idx]
        seqs = [encode_sequence(tr_scenes[i], rng, vocab, img_id, eos_id, n) for i, n in zip(idx, n_tok)]
        ids, lab, mask = batch_tensors(seqs, pad_id)
        aux = torch.full((len(args.aux_fields),) + ids.shape, -100, dtype=torch.long)
        for b, (i, n) in enumerate(zip(idx, n_tok)):
            targets = patch_targets(tr_scenes[i], vocab, n=n, fields=tuple(args.aux_fields),
                                    centre_of=partial(base_centre, size=sizes_tr[i]))
            on = torch.from_numpy(A.token_views(*sizes_tr[i]) >= 0)  # no naming target on newline slots
            aux[:, b, :n] = torch.where(on, torch.tensor(targets), -100)
        feats = ([tr_views[tr_off[i]:tr_off[i + 1]] for i in idx], [sizes_tr[i] for i in idx])
        loss = train_step(lambda: forward_loss(model, feats, ids, lab, mask, aux, args.aux_weight, visual=visual),
                          opt, sched, trainable, args.bf16)
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        if step % 25 == 0 or args.time_steps:
            log(f"step {step} loss {ema:.4f} lr {sched.get_last_lr()[0]:.2e} ({(time.time() - t_train) / step:.2f}s/step,"
                f" seq {ids.shape[1]})")
        if not args.time_steps and (step % args.val_every == 0 or step == args.steps):
            accs = val((("all", 1.0), ("random", 0.25), ("crop_aware", 0.25)))
            history.append((step, round(ema, 4), *accs))
            log(f"  val keep-all {accs[0]:.4f}  random@25% {accs[1]:.4f}  crop-aware@25% {accs[2]:.4f}")
        if time.time() - t_train > args.max_minutes * 60:
            log(f"time cap reached at step {step}")
            break
    if args.time_steps:
        return 0
    train_wall = time.time() - t_train
    model.eval()
    fold_standardisation(model, mu, sd)
    mu, sd = torch.zeros_like(mu), torch.ones_like(sd)
    acc_folded = val((("all", 1.0),))[0]
    log(f"val keep-all after folding the standardisation into linear_1: {acc_folded:.4f}")

    out = save_trained(model, tok, processor, args.out, torch.float16)
    info = {
        "steps": step, "batch": args.batch, "lr": args.lr, "warmup": args.warmup, "weight_decay": args.weight_decay,
        "schedule": "linear warm-up then cosine to 0", "clip": 1.0, "optimizer": "AdamW(0.9, 0.98)",
        "bf16_autocast": bool(args.bf16), "seed": args.seed, "data_seed": args.data_seed, "val_seed": args.val_seed,
        "aux_weight": args.aux_weight, "aux_fields": args.aux_fields, "token_dropping": False, "text_width": args.width, "text_ffn": args.ffn,
        "text_layers": args.layers, "text_heads": args.heads, "n_train_images": args.n_train,
        "init_from": (json.loads((Path(args.init_from) / "training_info.json").read_text())
                      if args.init_from else None),
        "n_val_images": args.n_val, "n_train_views": int(len(tr_views)), "trainable_parameters": n_trainable,
        "train_wall_s": round(train_wall, 1), "feature_wall_s": round(t_tr + t_va, 1),
        "history_columns": ["step", "smoothed loss", "keep-all", "random@25%", "crop-aware@25%"],
        "history": history, "val_keep_all_folded": acc_folded, "save_dtype": "float16",
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
    }
    (out / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"saved to {out}; train wall {train_wall:.0f}s")
    if args.no_final_eval:
        return 0
    from embedded_anyres_checks import main as checks

    return checks(["--card", "--model-dir", str(out)])


if __name__ == "__main__":
    sys.exit(main())
