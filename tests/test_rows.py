"""vtprune.rows.take_rows: the shared row copy equals torch.gather bitwise."""
from __future__ import annotations

import pytest
import torch

from vtprune.rows import take_rows


@pytest.mark.parametrize("shape,dim", [((1, 9, 4), 1), ((2, 9, 4), 1), ((2, 9), 1), ((3, 1, 9, 4), 2), ((3, 2, 9), 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.long])
def test_take_rows_equals_torch_gather(shape, dim, dtype):
    """Same values as torch.gather with an expanded index; a size-1 batch axis is broadcast to B."""
    g = torch.Generator().manual_seed(2)
    t = (torch.randn(shape, generator=g) * 100).to(dtype)
    index = torch.stack([torch.randperm(9, generator=g)[:5] for _ in range(2)])
    full = list(t.shape)
    full[dim - 1] = 2
    want_shape = list(full)
    want_shape[dim] = 5
    idx = index.view(*([1] * (dim - 1)), 2, 5, *([1] * (t.dim() - dim - 1))).expand(*want_shape)
    got = take_rows(t, index, dim)
    assert got.dtype == dtype
    assert torch.equal(got, torch.gather(t.expand(*full), dim, idx))


def test_take_rows_non_contiguous_and_repeats():
    """A transposed (non-contiguous) input and repeated / unsorted indices."""
    t = torch.randn(4, 7, 2).transpose(0, 1)  # (7, 4, 2), strides of a (4, 7, 2) tensor
    index = torch.tensor([[3, 3, 0]] * 7)
    want = torch.gather(t, 1, index[..., None].expand(-1, -1, 2))
    assert torch.equal(take_rows(t, index, 1), want)


def test_take_rows_errors():
    with pytest.raises(ValueError, match="batch axis has 3"):
        take_rows(torch.zeros(3, 5, 2), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="dim=0"):
        take_rows(torch.zeros(3, 5), torch.zeros(3, 1, dtype=torch.long), 0)
