"""PatchNCE and the CUT loss: a hand-computed case, pooling layout, selection order (SPEC §3)."""
import math

import pytest
import torch
import torch.nn.functional as F

from cpds_exp.cut import cut_loss, cut_losses, patch_nce, pool_and_normalise


def first_n(features, n):
    return torch.arange(n)


def test_patch_nce_hand_computed():
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    trg = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    tau = 0.07
    # row 0: positive ⟨r0,t0⟩ = 1, negatives: diagonal → −10, ⟨r0,t1⟩ = 0.6
    row0 = [1.0, -10.0, 0.6]
    # row 1: positive ⟨r1,t1⟩ = 0.8, negatives: ⟨r1,t0⟩ = 0, diagonal → −10
    row1 = [0.8, 0.0, -10.0]

    def ce(row):
        return math.log(sum(math.exp(v / tau) for v in row)) - row[0] / tau

    got = patch_nce(ref, trg, tau)
    assert got.shape == (2,)
    assert got[0].item() == pytest.approx(ce(row0), rel=1e-9)
    assert got[1].item() == pytest.approx(ce(row1), rel=1e-9)


def test_patch_nce_gradient_reaches_keys_only():
    ref = F.normalize(torch.randn(5, 3), dim=-1).requires_grad_(True)
    trg = F.normalize(torch.randn(5, 3), dim=-1).requires_grad_(True)
    patch_nce(ref, trg).sum().backward()
    assert ref.grad is None
    assert trg.grad is not None and trg.grad.abs().sum() > 0


def test_pool_and_normalise_uses_row_major_token_layout():
    # 4×4 tokens, token k has feature [k, 1]; 2×2 pooling of the top-left patch averages tokens 0, 1, 4, 5
    tokens = torch.stack([torch.arange(16.0), torch.ones(16)], dim=-1).unsqueeze(0)
    pooled = pool_and_normalise(tokens, 2, (4, 4))
    assert pooled.shape == (1, 4, 2)
    assert torch.allclose(pooled[0, 0], F.normalize(torch.tensor([2.5, 1.0]), dim=0))
    assert torch.allclose(pooled[0, 1], F.normalize(torch.tensor([4.5, 1.0]), dim=0))
    assert torch.allclose(pool_and_normalise(tokens, 1, (4, 4)).norm(dim=-1), torch.ones(1, 16))


def test_cut_loss_calls_select_per_batch_layer_patch_size_in_order():
    g = torch.Generator().manual_seed(0)
    ref = [torch.randn(2, 16, 6, generator=g), torch.randn(2, 64, 3, generator=g)]
    trg = [torch.randn(2, 16, 6, generator=g), torch.randn(2, 64, 3, generator=g)]
    calls = []

    def recording(features, n):
        calls.append((features.shape, n))
        assert torch.allclose(features.norm(dim=-1), torch.ones(features.shape[0]))
        return torch.randperm(features.shape[0], generator=g)[:n]

    cut_loss(ref, trg, recording, patch_sizes=(1, 2), n_patches=8)
    one_image = [((16, 6), 8), ((4, 6), 4), ((64, 3), 8), ((16, 3), 8)]
    assert [(tuple(s), n) for s, n in calls] == one_image * 2


def test_cut_loss_is_the_sum_of_mean_patch_nce():
    g = torch.Generator().manual_seed(1)
    ref = [torch.randn(2, 16, 4, generator=g), torch.randn(2, 4, 8, generator=g)]
    trg = [torch.randn(2, 16, 4, generator=g), torch.randn(2, 4, 8, generator=g)]
    expected = torch.zeros(2, 2)
    for b in range(2):
        for layer, (r, t) in enumerate(zip(ref, trg)):
            side = int(r.shape[1] ** 0.5)
            for p in (1, 2):
                rp = pool_and_normalise(r[b:b + 1], p, (side, side))[0]
                tp = pool_and_normalise(t[b:b + 1], p, (side, side))[0]
                n = min(5, rp.shape[0])
                expected[b, layer] += patch_nce(rp[:n], tp[:n]).mean()
    per = cut_losses(ref, trg, first_n, patch_sizes=(1, 2), n_patches=5)
    assert torch.allclose(per, expected)
    assert torch.allclose(cut_loss(ref, trg, first_n, patch_sizes=(1, 2), n_patches=5), expected.sum())


def test_cut_losses_rows_do_not_mix():
    """Each batch row's loss depends on that row alone (batched edits stay independent)."""
    g = torch.Generator().manual_seed(2)
    ref = [torch.randn(2, 16, 4, generator=g)]
    trg = [torch.randn(2, 16, 4, generator=g)]
    both = cut_losses(ref, trg, first_n, n_patches=6)
    alone = cut_losses([ref[0][1:]], [trg[0][1:]], first_n, n_patches=6)
    assert torch.allclose(both[1], alone[0])


def test_non_square_grids_need_shapes():
    feats = [torch.randn(1, 8, 4)]
    with pytest.raises(ValueError, match="square"):
        cut_loss(feats, feats, first_n)
    loss = cut_loss(feats, feats, first_n, spatial_shapes=[(2, 4)])
    assert torch.isfinite(loss)
