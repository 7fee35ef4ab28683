"""The export-time replacements of edgeprune/export/torchscript_fixes.py compute the originals' numbers exactly
(torch.equal) in eager mode; the family tests show that each exports."""
from __future__ import annotations

import torch

from edgeprune.export import torchscript_fixes as fx


def replacement(fixes, owner, name):
    return next(new for o, n, new in fixes if o is owner and n == name)


def test_each_replacement_is_the_original_exactly():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9)
    unfold = replacement(fx.sliced_unfold(), torch.Tensor, "unfold")
    for dim, size in ((-1, 4), (1, 2), (2, 1), (0, 2)):
        assert torch.equal(unfold(x, dim, size, 1), x.unfold(dim, size, 1))
    assert torch.equal(unfold(x, -1, 3, 2), x.unfold(-1, 3, 2))  # other steps: the original
    rep = replacement(fx.expanded_repeat_interleave(), torch, "repeat_interleave")
    for dim in (0, 1, -1):
        assert torch.equal(rep(x, 3, dim), torch.repeat_interleave(x, 3, dim))
    split = replacement(fx.sliced_tensor_split(), torch, "tensor_split")
    assert all(torch.equal(a, b) for a, b in zip(split(x, [2, 5], -1), torch.tensor_split(x, [2, 5], -1)))
    cumsum = replacement(fx.integer_cumsum(), torch, "cumsum")
    mask = x > 0
    assert torch.equal(cumsum(mask, -1), torch.cumsum(mask, -1))
    permute = replacement(fx.positive_permute(), torch.Tensor, "permute")
    assert torch.equal(permute(x, 0, -1, -2), x.permute(0, -1, -2))
    scatter = replacement(fx.scalar_scatter(), torch.Tensor, "scatter")
    idx = torch.randint(0, 9, (2, 3, 4))
    assert torch.equal(scatter(x, -1, idx, 0.0), x.scatter(-1, idx, 0.0))
    assert torch.equal(scatter(mask, -1, idx, True), mask.scatter(-1, idx, True))
