"""The CUT (PatchNCE) term of CDS and CPDS (SPEC §3).

Features are lists with one (B, HW, C) tensor per self-attention layer. For each batch element,
layer and patch size the source features pick n positions (through ``select``) and PatchNCE
contrasts each chosen source position with the target feature at the same place.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from cpds_exp.errors import CpdsError

#: Selects n row indices from (N, C) normalised source features.
Select = Callable[[torch.Tensor, int], torch.Tensor]
#: Sees (layer index, (B, N, C) source, (B, N, C) target) pooled, normalised features.
Observe = Callable[[int, torch.Tensor, torch.Tensor], None]

#: The published PatchNCE temperature and the value written on the diagonal of the negatives.
TAU = 0.07
NEGATIVE_DIAGONAL_FILL = -10.0


def patch_nce(ref: torch.Tensor, trg: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """Per-position PatchNCE losses (..., N) for (..., N, C) normalised features.

    Row i holds the positive ⟨ref_i, trg_i⟩ as class 0 followed by the negatives ⟨ref_i, trg_j⟩
    with the diagonal j = i filled with −10, all divided by τ (as the published code does).
    ``ref`` is the query and receives no gradient; gradients flow into ``trg``. Leading
    dimensions are independent batches (rows of a batched edit never see each other).
    """
    dtype = torch.promote_types(trg.dtype, torch.float32)  # half precision is too coarse for the logits
    ref = ref.detach().to(dtype)
    trg = trg.to(dtype)
    count = ref.shape[-2]
    positive = (ref * trg).sum(dim=-1, keepdim=True)
    negatives = ref @ trg.transpose(-1, -2)
    diagonal = torch.eye(count, dtype=torch.bool, device=ref.device)
    negatives = negatives.masked_fill(diagonal, NEGATIVE_DIAGONAL_FILL)
    logits = torch.cat([positive, negatives], dim=-1) / tau
    target = torch.zeros(logits.shape[:-1].numel(), dtype=torch.long, device=ref.device)
    losses = F.cross_entropy(logits.reshape(-1, count + 1), target, reduction="none")
    return losses.reshape(logits.shape[:-1])


def square_shape(tokens: int) -> tuple[int, int]:
    """(H, W) of a square token grid; refuses token counts that are not square."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{tokens} tokens do not form a square grid: pass spatial_shapes")
    return side, side


def pool_and_normalise(features: torch.Tensor, patch_size: int, shape: tuple[int, int]) -> torch.Tensor:
    """(B, HW, C) tokens → (B, N, C): p×p average pooling, then unit length over channels."""
    batch, tokens, channels = features.shape
    height, width = shape
    if patch_size > min(height, width):
        raise CpdsError(f"patch size {patch_size} is larger than a CUT layer's {height}x{width} grid: "
                        "use smaller patch_sizes (the paper: [1,2]) or leave that layer out of cut_layers")
    grid = features.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
    if patch_size > 1:
        grid = F.avg_pool2d(grid, patch_size)
    tokens_out = grid.flatten(2).transpose(1, 2)
    return F.normalize(tokens_out.to(torch.promote_types(tokens_out.dtype, torch.float32)), dim=-1)


def cut_losses(
    ref_feats: Sequence[torch.Tensor],
    trg_feats: Sequence[torch.Tensor],
    select: Select | Sequence[Select] | Sequence[Sequence[Select]],
    patch_sizes: Sequence[int] = (1, 2),
    n_patches: int = 256,
    tau: float = TAU,
    spatial_shapes: Sequence[tuple[int, int]] | None = None,
    observe: Observe | None = None,
) -> torch.Tensor:
    """(B, L) losses: per batch element and layer, the sum over patch sizes of the mean PatchNCE.

    ``select`` is one function for everything, a sequence with one per layer, or a nested
    sequence [batch element][layer]; it is called once per batch element, layer and patch size,
    in that nesting order. The losses themselves are computed for the whole batch at once.
    ``observe``, if given, sees every layer's pooled, normalised (B, N, C) source and target
    features once per patch size (the training data of learning selectors).
    """
    if len(ref_feats) != len(trg_feats):
        raise ValueError(f"{len(ref_feats)} reference layers but {len(trg_feats)} target layers")
    batch, layers = ref_feats[0].shape[0], len(ref_feats)
    if callable(select):
        selects = [[select] * layers] * batch
    elif callable(select[0]):
        selects = [list(select)] * batch
    else:
        selects = [list(row) for row in select]
    shapes = spatial_shapes or [square_shape(f.shape[1]) for f in ref_feats]
    pooled = [
        [(pool_and_normalise(r, p, s), pool_and_normalise(t, p, s)) for p in patch_sizes]
        for r, t, s in zip(ref_feats, trg_feats, shapes)
    ]
    if observe is not None:
        for layer, per_size in enumerate(pooled):
            for ref, trg in per_size:
                observe(layer, ref, trg.detach())
    chosen: dict[tuple[int, int], list[torch.Tensor]] = {}
    for b in range(batch):
        for layer, per_size in enumerate(pooled):
            for size, (ref, _) in enumerate(per_size):
                n = min(n_patches, ref.shape[1])
                chosen.setdefault((layer, size), []).append(selects[b][layer](ref[b], n))
    per_layer = []
    for layer, per_size in enumerate(pooled):
        total = 0.0
        for size, (ref, trg) in enumerate(per_size):
            idx = torch.stack(chosen[(layer, size)]).unsqueeze(-1).expand(-1, -1, ref.shape[-1])
            total = total + patch_nce(ref.gather(1, idx), trg.gather(1, idx), tau).mean(dim=-1)
        per_layer.append(total)
    return torch.stack(per_layer, dim=1)


def cut_loss(
    ref_feats: Sequence[torch.Tensor],
    trg_feats: Sequence[torch.Tensor],
    select: Select | Sequence[Select] | Sequence[Sequence[Select]],
    patch_sizes: Sequence[int] = (1, 2),
    n_patches: int = 256,
    **options,
) -> torch.Tensor:
    """Scalar CUT loss: the sum over batch elements, layers and patch sizes of the mean PatchNCE.

    ``options`` are :func:`cut_losses`'s (tau, spatial_shapes, observe).
    """
    return cut_losses(ref_feats, trg_feats, select, patch_sizes, n_patches, **options).sum()
