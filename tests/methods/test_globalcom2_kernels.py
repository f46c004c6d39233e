"""GlobalCom² pure kernels: the hand examples and invariants of docs/methods/globalcom2.md section 7.

Not encoded here (need real models or the reference repository): recipe 5 (logit oracle on a tiny
eager CLIP; only the pure head-mean reduction is checked below), recipe 6 "batch == each image alone"
(the kernels are per image; batching is the policy's), the model-level "keep everything == unpatched
model" (checked here at the layout level only), and recipe 7 (reference equivalence fixtures).
"""
import pytest
import torch
import torch.nn.functional as F

from vtprune.methods import globalcom2 as G

NL = G.NEWLINE


def tokens(seq):
    return [e for e in seq if e != NL]


def n_newlines(seq):
    return sum(1 for e in seq if e == NL)


# --------------------------------------------------------------------------------- recipe 1
def recipe1_g():
    g = torch.zeros(24, 24, dtype=torch.float64)
    g[:12, :12] = 10 / 144
    return g


def test_recipe1_scales_hand_example():
    g = recipe1_g()
    assert G.region_sums(g, 2, 2).tolist() == pytest.approx([10, 0, 0, 0], abs=1e-12)
    sigma = G.region_softmax(G.region_sums(g, 2, 2), 10.0)
    assert sigma.tolist() == pytest.approx([0.47537, 0.17488, 0.17488, 0.17488], abs=1e-5)
    s = G.crop_scales(g, 2, 2, r=0.25, tau=10.0)
    assert s.dtype == torch.float64
    assert s.tolist() == pytest.approx([0.30634, 0.23122, 0.23122, 0.23122], abs=1e-5)
    assert s.sum().item() == pytest.approx(0.25 * 4, abs=1e-7)  # sum s_c = r*k before clipping


def test_recipe1_budgets_672():
    g = recipe1_g()
    valid = G.valid_region(672, 672, 2, 2)
    assert valid.n_valid() == [576, 576, 576, 576]
    s = G.crop_scales(g, 2, 2)
    assert G.crop_budgets(valid.n_valid(), s) == [176, 133, 133, 133]
    gen = torch.Generator().manual_seed(0)
    crop_logits = torch.randn(4, 576, generator=gen)
    sel = G.globalcom2_select(g.flatten().float(), crop_logits, valid, r=0.25, tau=10.0)
    assert sel.thumbnail.numel() == 144
    assert [c.numel() for c in sel.crops] == [176, 133, 133, 133]
    seq = G.assemble_native(sel.thumbnail, sel.crops, valid)
    assert len(tokens(seq)) == 719
    assert n_newlines(seq) == 48


# --------------------------------------------------------------------------------- recipe 2
def test_recipe2_three_by_one():
    g = torch.arange(576, dtype=torch.float64) / 576  # nph = 1, npw = 3, pw = 8
    S = G.region_sums(g, 1, 3)
    assert S.tolist() == pytest.approx([93.1667, 95.8333, 98.5], abs=1e-4)
    sigma = G.region_softmax(S, 10.0)
    assert sigma.tolist() == pytest.approx([0.24936, 0.32557, 0.42507], abs=1e-5)
    s = G.crop_scales(g, 1, 3, r=0.25)
    assert s.tolist() == pytest.approx([0.22901, 0.24806, 0.27293], abs=1e-5)
    assert G.crop_budgets([576] * 3, s) == [131, 142, 157]


def test_scales_clip_above_only():
    g = torch.zeros(24, 24, dtype=torch.float64)
    g[:12, :12] = 100.0  # S = [14400, 0, 0, 0]: sigma ~ [1, 0, 0, 0]
    s = G.crop_scales(g, 2, 2, r=0.75)
    assert s[0].item() == 1.0  # 0.75 * (1 + 1 - .25) > 1 -> clipped
    assert s[1].item() == pytest.approx(0.75 * (1 - 0.25), abs=1e-7)  # no lower clip (1e-8 in sigma)


def test_region_assignment_remainder_goes_to_last_crop():
    # 24 // 5 = 4 rows per region; rows 20..23 belong to the last region (min(i // ph, nph - 1))
    g = torch.zeros(24, 24, dtype=torch.float64)
    g[22, 0] = 1.0
    S = G.region_sums(g, 5, 1)
    assert S.tolist() == [0, 0, 0, 0, 1.0]


# --------------------------------------------------------------------------------- recipe 3
GEOMETRY = [
    # (h, w), (nph, npw), (top, bottom, left, right), unpadded rows H_u, N_c, block (h_c, w_c)
    ((672, 672), (2, 2), (0, 48, 0, 48), 48, 576, (24, 24)),
    ((600, 800), (2, 2), (6, 42, 0, 48), 36, 432, (18, 24)),
    ((800, 600), (2, 2), (0, 48, 6, 42), 48, 432, (24, 18)),
    ((300, 1000), (1, 3), (1, 23, 0, 72), 22, 528, (22, 24)),
]


@pytest.mark.parametrize("hw,grid,bounds,rows,n_c,block", GEOMETRY)
def test_recipe3_geometry(hw, grid, bounds, rows, n_c, block):
    for rounding in ("hf", "original"):
        v = G.valid_region(*hw, *grid, rounding=rounding)
        assert tuple(v[:4]) == bounds
        assert v.H_u == rows
        assert v.n_valid() == [n_c] * (grid[0] * grid[1])
        blocks = G.guidance_blocks(torch.randn(576), v)
        assert [tuple(b.shape) for b in blocks] == [block] * (grid[0] * grid[1])
        assert sum(b.numel() for b in blocks) == v.H_u * v.W_u


def test_recipe3_newline_counts_native_vs_reference():
    expect = {(672, 672): (48, 48), (600, 800): (36, 48), (800, 600): (48, 48), (300, 1000): (22, 24)}
    for (hw, grid, *_rest) in GEOMETRY:
        v_hf = G.valid_region(*hw, *grid, rounding="hf")
        v_or = G.valid_region(*hw, *grid, rounding="original")
        keep = [torch.arange(n) for n in v_hf.n_valid()]
        nat = G.assemble_native(torch.arange(144), keep, v_hf)
        ref = G.assemble_reference(torch.arange(144), [torch.arange(n) for n in v_or.n_valid()], v_or)
        assert (n_newlines(nat), n_newlines(ref)) == expect[hw]


def test_rounding_hf_vs_original():
    # (110, 352) -> grid (1, 2): H = 24, W = 48, new_h = 110 * (48 / 352) = 14.999999999999998 in floats.
    # HF 5.x: int(round(x, 7)) = 15 -> pad 4 -> rows [4, 20); original LLaVA: int(x) = 14 -> rows [5, 19).
    assert tuple(G.valid_region(110, 352, 1, 2, rounding="hf")[:4]) == (4, 20, 0, 48)
    assert tuple(G.valid_region(110, 352, 1, 2, rounding="original")[:4]) == (5, 19, 0, 48)


def test_geometry_matches_installed_hf():
    mod = pytest.importorskip("transformers.models.llava_next.modeling_llava_next")
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    for hw, grid in [((672, 672), (2, 2)), ((600, 800), (2, 2)), ((800, 600), (2, 2)),
                     ((300, 1000), (1, 3)), ((110, 352), (1, 2))]:
        assert tuple(mod.get_anyres_image_grid_shape(hw, pinpoints, 336)) == grid
        v = G.valid_region(*hw, *grid, rounding="hf")
        grid_t = torch.arange(v.H * v.W).view(1, v.H, v.W)
        un = mod.unpad_image(grid_t, hw)
        assert torch.equal(un[0], grid_t[0, v.top : v.bottom, v.left : v.right])


def test_crop_valid_indices():
    v = G.valid_region(800, 600, 2, 2)  # valid columns [6, 42)
    assert G.crop_valid_indices(v, 0)[:20].tolist() == list(range(6, 24)) + [30, 31]
    assert G.crop_valid_indices(v, 1)[:20].tolist() == list(range(0, 18)) + [24, 25]
    v = G.valid_region(600, 800, 2, 2)  # valid rows [6, 42)
    assert G.crop_valid_indices(v, 0)[0].item() == 6 * 24
    assert G.crop_valid_indices(v, 2)[-1].item() == 17 * 24 + 23


def vanilla_order(valid, n_thumb=576):
    """HF LLaVA-NeXT packing, built independently: thumbnail raster, then the crops reshaped to the
    padded global grid, unpadded, one newline per unpadded row."""
    nph, npw, p = valid.nph, valid.npw, valid.pps
    ids = torch.stack([(c + 1) * 10000 + torch.arange(p * p) for c in range(nph * npw)])
    grid = ids.view(nph, npw, p, p).permute(0, 2, 1, 3).reshape(nph * p, npw * p)
    grid = grid[valid.top : valid.bottom, valid.left : valid.right]
    out = [(0, i) for i in range(n_thumb)]
    for row in grid.tolist():
        out += [(v // 10000, v % 10000) for v in row] + [NL]
    return out


@pytest.mark.parametrize("hw,grid", [(g[0], g[1]) for g in GEOMETRY])
def test_recipe6_keep_all_native_is_vanilla(hw, grid):
    v = G.valid_region(*hw, *grid)
    thumb = G.select_thumbnail(torch.randn(576), 1.0, order="raster")
    keep = [torch.arange(n) for n in v.n_valid()]
    assert G.assemble_native(thumb, keep, v) == vanilla_order(v)


def test_recipe3_reference_placement_portrait_p3():
    v = G.valid_region(800, 600, 2, 2, rounding="original")  # column padding: valid cols [6, 42)
    keep = [torch.arange(n) for n in v.n_valid()]
    seq = G.assemble_reference(torch.arange(0), keep, v)
    # padded row 0: crop 0 slots 0..23 hold valid indices 0..23 = patches 6..23 then 30..35 (P3),
    # then crop 1 slots 0..23 = patches 0..17 then 24..29; then one newline.
    row0 = [(1, p) for p in list(range(6, 24)) + list(range(30, 36))]
    row0 += [(2, p) for p in list(range(0, 18)) + list(range(24, 30))]
    assert seq[:49] == row0 + [NL]
    # crop 0 has 432 valid tokens -> slots 0..431 -> padded rows 0..17; rows 18..23 of crop row 0
    # hold no tokens, only newlines
    assert seq[18 * 49 : 18 * 49 + 6] == [NL] * 6
    nat = G.assemble_native(torch.arange(0), keep, G.valid_region(800, 600, 2, 2))
    assert nat[:37] == [(1, p) for p in range(6, 24)] + [(2, p) for p in range(0, 18)] + [NL]
    # the kept set and count are the same in both layouts
    assert sorted(tokens(seq)) == sorted(tokens(nat))


def test_recipe3_reference_placement_landscape_order_kept():
    # row padding: the token order is right, only the newline placement changes (P4)
    v_or = G.valid_region(600, 800, 2, 2, rounding="original")
    gen = torch.Generator().manual_seed(1)
    keep = [torch.randperm(432, generator=gen)[:100].sort().values for _ in range(4)]
    ref = G.assemble_reference(torch.arange(5), keep, v_or)
    nat = G.assemble_native(torch.arange(5), keep, G.valid_region(600, 800, 2, 2))
    assert tokens(ref) == tokens(nat)
    assert (n_newlines(ref), n_newlines(nat)) == (48, 36)


# --------------------------------------------------------------------------------- recipe 4
@pytest.mark.parametrize("hw,grid", [(g[0], g[1]) for g in GEOMETRY])
def test_recipe4_interpolation(hw, grid):
    v = G.valid_region(*hw, *grid)
    g = torch.randn(576, generator=torch.Generator().manual_seed(2))
    up = F.interpolate(g.view(1, 1, 24, 24), (v.H_u, v.W_u), mode="bilinear", align_corners=False)[0, 0]
    blocks = G.guidance_blocks(g, v)
    rows = [torch.cat(blocks[i * v.npw : (i + 1) * v.npw], dim=1) for i in range(v.nph)]
    assert torch.equal(torch.cat(rows, dim=0), up)
    assert sum(b.numel() for b in blocks) == v.H_u * v.W_u


def test_interpolation_hand_value():
    # 2x upsampling with align_corners=False: out[0,0] = g[0,0]; out[1,1] = .75^2 g00 + ... (hand)
    g = torch.zeros(24, 24)
    g[0, 0] = 16.0
    blocks = G.guidance_blocks(g, G.valid_region(672, 672, 2, 2))
    assert blocks[0][0, 0].item() == 16.0
    assert blocks[0][1, 1].item() == pytest.approx(16 * 0.75 * 0.75)
    assert blocks[0][2, 2].item() == pytest.approx(16 * 0.25 * 0.25)


# --------------------------------------------------------------------------------- recipe 5 (pure part)
def test_cls_logit_scores_hand():
    q0 = torch.tensor([[[1.0, 0, 0, 0], [0, 2.0, 0, 0]]])  # (V=1, H=2, hd=4)
    k = torch.tensor([[[[2.0, 0, 0, 0], [0, 1.0, 0, 0]],  # head 0: patches 0, 1
                       [[0, 1.0, 0, 0], [0, 3.0, 0, 0]]]])  # head 1
    # scale = 4 ** -0.5 = .5: head 0 -> [1, 0]; head 1 -> [1, 3]; mean -> [1, 1.5]
    out = G.cls_logit_scores(q0, k)
    assert out.shape == (1, 2)
    assert out[0].tolist() == pytest.approx([1.0, 1.5])
    assert G.cls_logit_scores(q0, k, scale=1.0)[0].tolist() == pytest.approx([2.0, 3.0])


# --------------------------------------------------------------------------------- selection
def test_select_thumbnail_order_and_ties():
    g = torch.tensor([2.0, 5.0, 1.0, 5.0, 3.0, 0.0, 3.0, 4.0])
    assert G.select_thumbnail(g, 0.5).tolist() == [1, 3, 7, 4]  # int(8*.5) = 4, ties lowest first
    assert G.select_thumbnail(g, 0.5, order="raster").tolist() == [1, 3, 4, 7]
    assert G.select_thumbnail(g, 0.3).tolist() == [1, 3]  # int(2.4) = 2


@pytest.mark.parametrize("r,k", [(0.25, 144), (0.1, 57), (0.5, 288), (0.75, 432)])
def test_recipe6_thumbnail_count(r, k):
    assert G.select_thumbnail(torch.randn(576), r).numel() == k


def test_select_crop_hand():
    loc = torch.tensor([3.0, 4.0, 0.0, 0.0])  # normalised [.6, .8, 0, 0]
    gam = torch.tensor([[0.0, 0.0], [2.0, 0.0]])  # flattened [0, 0, 2, 0] -> [0, 0, 1, 0]
    assert G.select_crop(loc, gam, 2).tolist() == [1, 2]  # scores [.6, .8, 1, 0]
    assert G.select_crop(loc, gam, 3).tolist() == [0, 1, 2]
    # ties by the lowest index; a zero guidance map normalises to zeros (eps)
    assert G.select_crop(torch.tensor([1.0, 1.0, 0.0]), torch.zeros(3), 1).tolist() == [0]


@pytest.mark.parametrize("hw,grid", [(g[0], g[1]) for g in GEOMETRY])
@pytest.mark.parametrize("r", [0.25, 0.1])
def test_recipe6_invariants(hw, grid, r):
    v = G.valid_region(*hw, *grid)
    gen = torch.Generator().manual_seed(3)
    k = grid[0] * grid[1]
    g = torch.randn(576, generator=gen) * 5
    crops = torch.randn(k, 576, generator=gen)
    sel = G.globalcom2_select(g, crops, v, r=r)
    assert sel.thumbnail.numel() == int(576 * r)
    assert sel.budgets == [int(n * s) for n, s in zip(v.n_valid(), sel.scales.tolist())]
    assert [c.numel() for c in sel.crops] == sel.budgets
    for c, kept in enumerate(sel.crops):
        assert kept.unique().numel() == kept.numel()
        assert kept.tolist() == sorted(kept.tolist())
        assert kept.max().item() < v.n_valid()[c]
    seq = G.assemble_native(sel.thumbnail, sel.crops, v)
    assert len(set(tokens(seq))) == len(tokens(seq)) == sel.thumbnail.numel() + sum(sel.budgets)
    assert n_newlines(seq) == v.H_u
    # score order: the thumbnail comes first, descending logits
    th = g[sel.thumbnail]
    assert torch.all(th[:-1] >= th[1:])
    sel2 = G.globalcom2_select(g, crops, v, r=r)  # deterministic
    assert torch.equal(sel.thumbnail, sel2.thumbnail)
    assert all(torch.equal(a, b) for a, b in zip(sel.crops, sel2.crops))


def test_select_crop_matches_holistic_definition():
    v = G.valid_region(600, 800, 2, 2)
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(576, generator=gen)
    loc = torch.randn(576, generator=gen)
    vi = G.crop_valid_indices(v, 3)
    block = G.guidance_blocks(g, v)[3]
    score = F.normalize(loc[vi], dim=0) + F.normalize(block.flatten(), dim=0)
    exp = torch.topk(score, 50).indices.sort().values
    assert torch.equal(G.select_crop(loc[vi], block, 50), exp)


def test_without_global_guidance_keeps_r_per_crop_by_local_logits():
    """Ablation switch: uniform ratio r per crop and ranking by the crop's own logits only."""
    from vtprune.methods.globalcom2 import globalcom2_select, valid_region

    valid = valid_region(672, 672, 2, 2)  # 2x2 crops, no padding: N_c = 576
    g = torch.zeros(576)
    g[:10] = 5.0  # guidance concentrated in crop 0 would raise its ratio
    crop_logits = torch.arange(4 * 576, dtype=torch.float32).view(4, 576).flip(-1)  # descending per crop
    sel = globalcom2_select(g, crop_logits, valid, r=0.25, tau=10.0, guidance=False)
    assert sel.budgets == [144, 144, 144, 144]
    for c in range(4):  # highest local logits = the first 144 valid indices
        assert sel.crops[c].tolist() == list(range(144))
    guided = globalcom2_select(g, crop_logits, valid, r=0.25, tau=10.0)
    assert guided.budgets[0] > 144
