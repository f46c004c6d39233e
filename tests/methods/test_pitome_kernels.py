"""PiToMe pure kernels: the hand examples and invariants of docs/methods/pitome.md section 7.

Not encoded here (need real models or the reference repository; belong to policy/adapter tests):
recipe 6 "rho = 1 gives the unpatched model" at model level and "the encoder runs with SDPA", and
recipe 7 (reference equivalence against ``pitome_vision``/``merge_mean`` fixtures).
"""
import math

import pytest
import torch

from vtprune.methods import pitome as P

# Hand-example tokens (spec section 7): CLS, t0..t4; the metric is x itself.
CLS = [0.5, 0.5, 0.5]
T0 = [1.0, 0.0, 0.0]
T1 = [0.98, 0.2, 0.0]
T2 = [0.9, 0.1, 0.3]
T3 = [0.0, 1.0, 0.0]
T4 = [0.0, 0.0, 1.0]
RHOS = [0.975, 0.95, 0.925, 0.9, 0.875, 0.85]
FINAL = [330, 183, 101, 54, 30, 17]


def hand_x():
    return torch.tensor([[CLS, T0, T1, T2, T3, T4]], dtype=torch.float64)


def rand_x(b=1, n=577, c=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, c, generator=g, dtype=torch.float64)


def assert_rows(out, rows, atol=1e-12):
    exp = torch.tensor(rows, dtype=out.dtype)
    assert out.shape == exp.shape
    assert torch.allclose(out, exp, atol=atol), out


# ------------------------------------------------------------------------------ hand examples
def test_merge_count_hand_values():
    assert P.merge_count(5, 0.8) == 1  # floor(5 - 4.0)
    assert P.merge_count(5, 0.6) == 2
    assert P.merge_count(6, 0.7) == 1  # floor(1.8)
    assert P.merge_count(577, 0.9) == 57
    assert P.merge_count(577, 1.0) == 0


def test_recipe1_energy_row_and_values():
    x = hand_x()[0, 1:]
    v = torch.nn.functional.normalize(x, dim=-1)
    S = v @ v.T
    # cosine row of t0 and its shifted ELU
    assert S[0].tolist() == pytest.approx([1, 0.9798, 0.9435, 0, 0], abs=1e-4)
    elu = torch.nn.functional.elu(S[0] - 0.5)
    assert elu.tolist() == pytest.approx([0.5, 0.4798, 0.4435, -0.3935, -0.3935], abs=1e-4)
    E = P.energy_scores(S, 0.5)
    assert E.tolist() == pytest.approx([0.1273, 0.1545, 0.1786, -0.1745, -0.1699], abs=1e-4)


def test_recipe1_pitome_rho08():
    x = hand_x()
    r = P.merge_count(5, 0.8)
    assert r == 1
    out = P.pitome_merge(x, x, r, margin=0.5)
    # order = [t2, t1, t0, t4, t3]; A = [t2] -> B = [t1]; protected = [t0, t4, t3]
    assert_rows(out.x[0], [CLS, T0, T4, T3, [0.94, 0.15, 0.15]])
    assert out.sizes is None and out.sources is None


def test_recipe2_pitome_rho06():
    x = hand_x()
    r = P.merge_count(5, 0.6)
    assert r == 2
    out = P.pitome_merge(x, x, r, margin=0.5)
    # A = [t2, t0] both -> t1, B = [t1, t4]; protected = [t3]
    assert_rows(out.x[0], [CLS, T3, [0.96, 0.1, 0.1], T4])


def test_recipe3_bsm_rho07():
    x = hand_x()
    r = P.merge_count(6, 0.7)
    assert r == 1
    out = P.bsm_merge(x, x, r)
    # a = [CLS, t1, t3], b = [t0, t2, t4]; t1 -> t0; unm = [CLS, t3]
    assert_rows(out.x[0], [CLS, T3, [0.99, 0.1, 0.0], T2, T4])


def test_recipe3_bsm_node_max():
    x = hand_x()[0]
    v = x / x.norm(dim=-1, keepdim=True)
    S = v[0::2] @ v[1::2].T
    assert S[1].max().item() == pytest.approx(0.9798, abs=1e-4)  # t1 -> t0
    assert S[2, 1].item() == pytest.approx(0.1048, abs=1e-4)  # t3 -> t2
    assert S[2].argmax().item() == 1


# --------------------------------------------------------------------------------------- counts
def test_recipe4_final_counts_schedule():
    for rho, n in zip(RHOS, FINAL):
        sched = P.reference_schedule(rho)
        assert len(sched) == 23
        assert P.schedule_counts(sched)[-1] - 1 == n


def test_recipe4_per_layer_counts_rho09():
    counts = P.schedule_counts(P.reference_schedule(0.9))
    assert counts[:4] == [577, 520, 468, 422]
    assert counts[13] == 150  # after layer 12
    assert counts[14] == 136  # after layer 13
    assert counts[-1] == 55  # after layer 22
    sched = P.reference_schedule(0.9)
    assert [s.algorithm for s in sched] == ["bsm"] * 13 + ["pitome"] * 10
    assert sched[0].margin is None
    assert sched[13].margin == pytest.approx(0.9 - 0.9 * 13 / 24)
    assert sched[22].margin == pytest.approx(0.9 - 0.9 * 22 / 24)


def test_recipe4_integer_recurrence():
    # BSM (l <= 12): T counts CLS; PiToMe: T excludes CLS (spec section 3).
    for rho in RHOS:
        sched = P.reference_schedule(rho)
        n = 577
        for l, step in enumerate(sched):
            T = n if l <= 12 else n - 1
            assert step.r == math.floor(T - T * rho)
            n -= step.r


def run_schedule(x, sched, sources=None, mode="mean"):
    sizes = None
    for step in sched:
        if step.algorithm == "bsm":
            res = P.bsm_merge(x, x, step.r, sizes=sizes, mode=mode, sources=sources)
        elif step.algorithm == "pitome":
            res = P.pitome_merge(x, x, step.r, step.margin, sizes=sizes, mode=mode, sources=sources)
        else:
            continue
        x, sizes, sources = res
    return x, sizes, sources


def test_recipe4_kernel_counts_random_inputs():
    x0 = rand_x(c=8)
    for rho, n in zip(RHOS, FINAL):
        x = x0
        for step, expect in zip(P.reference_schedule(rho), P.schedule_counts(P.reference_schedule(rho))[1:]):
            fn = P.bsm_merge if step.algorithm == "bsm" else P.pitome_merge
            args = (x, x, step.r) if step.algorithm == "bsm" else (x, x, step.r, step.margin)
            x = fn(*args).x
            assert x.shape[1] == expect
        assert x.shape[1] - 1 == n


# ------------------------------------------------------------------------------------ merge maths
def test_recipe5_scatter_mean_include_self():
    # recipe 2: t1 receives t2 and t0 -> (x_b + sum x_a) / (1 + n_a)
    x = hand_x()
    out = P.pitome_merge(x, x, 2, margin=0.5).x[0, 2]
    exp = (x[0, 2] + x[0, 3] + x[0, 1]) / 3
    assert torch.allclose(out, exp, atol=1e-15)


def test_recipe5_wavg_hand_sizes():
    x = hand_x()
    sizes = torch.tensor([[1.0, 3.0, 1.0, 2.0, 1.0, 1.0]], dtype=torch.float64)
    out = P.pitome_merge(x, x, 2, margin=0.5, sizes=sizes, mode="wavg")
    # t1 (size 1) + t2 (size 2) + t0 (size 3): (1*t1 + 2*t2 + 3*t0) / 6
    merged = [(0.98 + 1.8 + 3.0) / 6, (0.2 + 0.2) / 6, 0.6 / 6]
    assert_rows(out.x[0], [CLS, T3, merged, T4])
    assert out.sizes[0].tolist() == [1.0, 1.0, 6.0, 1.0]


def test_recipe5_wavg_merge_then_merge_sizes():
    x = rand_x(n=41, c=6, seed=3)
    src = P.init_sources(1, 41, dtype=torch.float64)
    r1 = P.bsm_merge(x, x, 8, mode="wavg", sources=src)
    assert r1.sizes.sum().item() == 41
    r2 = P.pitome_merge(r1.x, r1.x, 6, 0.5, sizes=r1.sizes, mode="wavg", sources=r1.sources)
    assert r2.sizes.sum().item() == 41
    # sizes == number of original tokens each output holds
    assert torch.equal(r2.sizes, r2.sources.sum(-1))
    # size-weighted average over two merges == plain mean of the member originals
    exp = (r2.sources @ x[0]) / r2.sources.sum(-1, keepdim=True)
    assert torch.allclose(r2.x, exp, atol=1e-12)


def test_mean_mode_tracks_sizes_when_given():
    x = hand_x()
    out = P.bsm_merge(x, x, 1, sizes=torch.ones(1, 6, dtype=torch.float64))
    assert out.sizes[0].tolist() == [1.0, 1.0, 2.0, 1.0, 1.0]


# ------------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("rho", [0.9, 0.85])
def test_recipe6_cls_never_merged_and_no_token_lost(rho):
    x = rand_x(b=2, c=8, seed=1)
    src = P.init_sources(2, 577, dtype=torch.float64)
    out, _, sources = run_schedule(x, P.reference_schedule(rho), sources=src)
    assert torch.equal(out[:, 0], x[:, 0])  # CLS first and untouched
    assert sources[:, 0].tolist() == [[1.0] + [0.0] * 576] * 2
    # every original token belongs to exactly one output token
    assert torch.equal(sources.sum(1), torch.ones(2, 577, dtype=torch.float64))
    assert set(sources.unique().tolist()) <= {0.0, 1.0}


def test_recipe6_output_length():
    x = rand_x(n=60, c=4, seed=2)
    for r in range(1, 29):
        assert P.pitome_merge(x, x, r, 0.5).x.shape[1] == 60 - r
        assert P.bsm_merge(x, x, r).x.shape[1] == 60 - r


def test_recipe6_deterministic_and_pure():
    x = rand_x(b=2, n=101, c=8, seed=4)
    x_copy = x.clone()
    a = P.pitome_merge(x, x, 20, 0.4, sources=P.init_sources(2, 101))
    b = P.pitome_merge(x, x, 20, 0.4, sources=P.init_sources(2, 101))
    assert torch.equal(a.x, b.x) and torch.equal(a.sources, b.sources)
    c = P.bsm_merge(x, x, 20)
    d = P.bsm_merge(x, x, 20)
    assert torch.equal(c.x, d.x)
    assert torch.equal(x, x_copy)  # inputs untouched


def test_recipe6_batch_equals_each_alone():
    x = rand_x(b=3, c=8, seed=5)
    src = P.init_sources(3, 577, dtype=torch.float64)
    sched = P.reference_schedule(0.9)
    out, _, sources = run_schedule(x, sched, sources=src)
    for i in range(3):
        o1, _, s1 = run_schedule(x[i : i + 1], sched, sources=src[i : i + 1])
        assert torch.equal(s1[0], sources[i])
        assert torch.allclose(o1[0], out[i], atol=1e-12)


def test_recipe6_rho_one_is_identity():
    sched = P.reference_schedule(1.0)
    assert all(s.r == 0 and s.algorithm == "none" for s in sched)
    x = rand_x(c=4)
    out, _, _ = run_schedule(x, sched)
    assert torch.equal(out, x)
    assert torch.equal(P.bsm_merge(x, x, 0).x, x)
    assert torch.equal(P.pitome_merge(x, x, 0, 0.5).x, x)


def test_metric_distinct_from_x():
    # the metric decides, x is what gets merged (here x = 10*metric + 1, so the result is affine)
    m = rand_x(n=31, c=5, seed=6)
    x = 10 * m + 1
    a = P.pitome_merge(x, m, 7, 0.3).x
    b = P.pitome_merge(m, m, 7, 0.3).x
    assert torch.allclose(a, 10 * b + 1, atol=1e-12)


def test_no_class_token_bsm_keeps_edge_order():
    # x = [t4, t1, t2, t3, t0]: a = [t4, t2, t0], b = [t1, t3]
    x = torch.tensor([[T4, T1, T2, T3, T0]], dtype=torch.float64)
    out = P.bsm_merge(x, x, 1, class_token=False)
    # node_max: t4 0, t2 .9454 (-> t1), t0 .9798 (-> t1); t0 merged into t1. Without a class token the
    # unmerged a tokens stay in descending-similarity order [t2, t4] (not ascending [t4, t2]).
    assert_rows(out.x[0], [T2, T4, [0.99, 0.1, 0.0], T3])


def test_infeasible_r_raises():
    x = hand_x()
    with pytest.raises(ValueError):
        P.pitome_merge(x, x, 3, 0.5)  # 2r = 6 > T = 5
    with pytest.raises(ValueError):
        P.bsm_merge(x, x, 3)  # only 2 non-CLS a tokens


# ----------------------------------------------------------------------------------- order=source
def test_source_order():
    x = hand_x()
    res = P.pitome_merge(x, x, 1, 0.5, sources=P.init_sources(1, 6, dtype=torch.float64))
    # output [CLS, t0, t4, t3, {t1, t2}] -> smallest originals 0, 1, 5, 4, 2
    perm = P.source_order(res.sources)
    assert perm[0].tolist() == [0, 1, 4, 3, 2]
    ordered = P.apply_order(res.x, perm)
    assert_rows(ordered[0], [CLS, T0, [0.94, 0.15, 0.15], T3, T4])


# ----------------------------------------------------------------------------------- budget mode
@pytest.mark.parametrize("n_keep", [1, 2, 17, 54, 64, 100, 128, 192, 330, 500, 575, 576])
def test_budget_schedule_exact(n_keep):
    sched = P.budget_schedule(n_keep)
    assert len(sched) == 23
    counts = P.schedule_counts(sched)
    assert counts[-1] - 1 == n_keep
    n = 577
    for step in sched:  # every step feasible: BSM r <= non-CLS a tokens, PiToMe 2r <= T
        if step.algorithm == "bsm":
            assert step.r <= (n + 1) // 2 - 1
        elif step.algorithm == "pitome":
            assert 2 * step.r <= n - 1
        n -= step.r


@pytest.mark.parametrize("n_keep", [17, 54, 64, 128, 192])
def test_budget_rho_is_smallest_at_resolution(n_keep):
    rho = P.budget_rho(n_keep)
    assert P.schedule_counts(P.reference_schedule(rho))[-1] - 1 >= n_keep
    assert P.schedule_counts(P.reference_schedule(rho - 1e-4))[-1] - 1 < n_keep
    # surplus is removed from the last layer backwards: earlier layers are untouched
    ref = P.reference_schedule(rho)
    sched = P.budget_schedule(n_keep)
    diff = [l for l in range(23) if sched[l].r != ref[l].r]
    assert all(sched[l].r > ref[l].r for l in diff)
    assert diff == [] or max(diff) == 22


def test_budget_schedule_cached_and_noop():
    assert P.budget_schedule(64) is P.budget_schedule(64)
    assert all(s.r == 0 for s in P.budget_schedule(576))
    assert P.budget_rho(576) == 1.0


def test_budget_schedule_runs_on_kernels():
    x = rand_x(c=8, seed=7)
    out, _, _ = run_schedule(x, P.budget_schedule(64))
    assert out.shape[1] == 65


# ------------------------------------------------------------------------------ post-merger (P)
def test_post_merger_plan():
    plan = P.post_merger_plan(100, 30)
    # 100 -> r = min(50, 70) = 50 -> 50 -> r = min(25, 20) = 20 -> 30; J = 2
    assert [r for r, _ in plan] == [50, 20]
    assert [m for _, m in plan] == pytest.approx([0.9, 0.45])
    assert P.post_merger_plan(64, 64) == []


def test_post_merger_merge_counts_and_representatives():
    g = torch.Generator().manual_seed(8)
    y = torch.randn(100, 12, generator=g, dtype=torch.float64)
    z, rep = P.post_merger_merge(y, 30)
    assert z.shape == (30, 12) and rep.shape == (30,)
    assert rep.tolist() == sorted(set(rep.tolist()))
    # protected tokens that were never merged are unchanged copies of their representative
    same = [(z[i] - y[rep[i]]).abs().max().item() < 1e-15 for i in range(30)]
    assert any(same)
    # batched == alone
    yb = torch.stack([y, torch.randn(100, 12, generator=g, dtype=torch.float64)])
    zb, repb = P.post_merger_merge(yb, 30)
    assert torch.equal(repb[0], rep) and torch.allclose(zb[0], z, atol=1e-12)


def test_post_merger_single_step_matches_pitome():
    y = hand_x()[0, 1:]  # t0..t4, no CLS; N' = 4 -> r = 1, J = 1, margin 0.9
    z, rep = P.post_merger_merge(y, 4)
    ref = P.pitome_merge(y[None], y[None], 1, 0.9, class_token=False).x[0]
    assert z.shape == (4, 3)
    assert sorted(map(tuple, z.tolist())) == sorted(map(tuple, ref.tolist()))
    assert rep.tolist() == sorted(rep.tolist())


def test_post_merger_noop():
    y = hand_x()[0]
    z, rep = P.post_merger_merge(y, 6)
    assert torch.equal(z, y) and rep.tolist() == list(range(6))


def test_post_merger_plan_margin_scales_the_schedule():
    from vtprune.methods.pitome import post_merger_plan

    assert post_merger_plan(16, 4) == [(8, 0.9), (4, 0.45)]
    assert post_merger_plan(16, 4, margin=0.5) == [(8, 0.5), (4, 0.25)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("rest", [(), (1,), (8,), (4, 3)])
def test_apply_plan_equals_scatter_reduce(dtype, rest):
    """The merge's fast path (row gathers, index_add_ in index order, count division) gives exactly the
    values of gather + ``scatter_reduce(include_self=True)``, with several sources per destination."""
    g = torch.Generator().manual_seed(3)
    B, N, r = 3, 61, 20
    t = torch.randn((B, N) + rest, generator=g).to(dtype)
    perm = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    keep, b_idx, src = perm[:, : N - 30 - r], perm[:, N - 30 - r : N - r], perm[:, N - r :]
    dst = torch.randint(0, 6, (B, r), generator=g)  # many sources per destination
    lead = lambda idx: idx.view(idx.shape + (1,) * len(rest)).expand(idx.shape + rest)  # noqa: E731
    rows = lambda idx: t.gather(1, lead(idx))  # noqa: E731
    for reduce in ("mean", "sum", "amax", "amin"):
        want = torch.cat([rows(keep), rows(b_idx).scatter_reduce(1, lead(dst), rows(src), reduce=reduce,
                                                                  include_self=True)], dim=1)
        plan = P._row_plan((keep, b_idx, src, dst), N)
        assert torch.equal(P._apply_plan(t, plan, reduce), want), reduce
