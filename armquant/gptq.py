"""GPTQ: second-order weight quantization (Frantar et al., arXiv 2210.17323), pure tensor math.

`accumulate_hessian` builds H = 2/n * sum(x x^T) over a layer's calibration inputs, and `gptq`
quantizes a weight column by column, spreading each column's rounding error over the columns
not yet quantized through the inverse Hessian's Cholesky factor. Nothing here knows about models:
`armquant.quantize` adds the hooks and calls these.

The integer grid is the one of `armquant.quantize.group_qparams` (4-bit, per group, symmetric
or asymmetric), so a GPTQ result packs into the same checkpoint layout as round-to-nearest;
with act-order it adds `g_idx`, the group of each input column.
"""

from __future__ import annotations

import torch

__all__ = ["accumulate_hessian", "gptq"]


def accumulate_hessian(hessian: torch.Tensor, count: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold the inputs `x` [..., K] into the running Hessian [K, K] of `count` earlier rows.

    Returns the new (hessian, count); the mean is kept (not the sum) so float32 stays accurate
    over many rows.
    """
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)  # [n, K]
    n = x.shape[0]
    total = count + n
    hessian = hessian * (count / total) + (x.t() @ x) * (2.0 / total)
    return hessian, total


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes - zero) * scale


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    symmetric: bool,
    act_order: bool = False,
    damp: float = 0.01,
    bits: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize `weight` [N, K] given the Hessian [K, K] of its inputs.

    Returns (codes [N, K] uint8 in [0, 2**bits), scale [N, G], zero [N, G], g_idx), G = K // group_size,
    with weight[:, j] ~ (codes[:, j] - zero[:, g]) * scale[:, g] for g = g_idx[j].

    act_order: quantize columns in order of decreasing Hessian diagonal (most important first), and
    form the groups in that order, each group's grid set from the weights as updated when the group
    starts (GPTQ's desc_act); g_idx [K] (int32) then says which group each column belongs to.
    Without act_order the groups are consecutive columns and g_idx is None.
    """
    from armquant.quantize import group_qparams, quantize_codes

    n_out, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}; expected ({k}, {k}) for weight {tuple(weight.shape)}")
    if k % group_size:
        raise ValueError(f"group_size={group_size} must divide in_features={k}")
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(torch.float32).clone()
    dead = torch.diag(H) == 0  # inputs never seen active: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]

    H += torch.eye(k) * (damp * torch.mean(torch.diag(H)))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    n_groups = k // group_size
    scale = torch.empty(n_out, n_groups)
    zero = torch.empty(n_out, n_groups)
    codes = torch.zeros(n_out, k, dtype=torch.uint8)
    one_group = group_size == k  # per channel: one grid per row, set before any correction
    if one_group:
        scale[:, 0], zero[:, 0] = group_qparams(W, bits, symmetric)
    block = 128 if one_group else group_size * max(1, -(-128 // group_size))  # whole groups per block
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = (i1 + i) // group_size
            if (i1 + i) % group_size == 0 and not one_group:
                # The group's grid from its weights as updated so far (the block holds whole groups).
                scale[:, g], zero[:, g] = group_qparams(W1[:, i:i + group_size], bits, symmetric)
            w = W1[:, i]
            q = quantize_codes(w, scale[:, g], zero[:, g], bits)
            codes[:, i1 + i] = q.to(torch.uint8)
            err = (w - _dequantize(q, scale[:, g], zero[:, g])) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if not act_order:
        return codes, scale, zero, None
    inverse = torch.argsort(perm)
    g_idx = (torch.arange(k) // group_size)[inverse].to(torch.int32)
    return codes[:, inverse], scale, zero, g_idx
