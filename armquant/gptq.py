"""GPTQ: second-order weight quantization (Frantar et al., arXiv 2210.17323), pure tensor math.

`accumulate_hessian` builds H = 2/n * sum(x x^T) over a layer's calibration inputs, and `gptq`
quantizes a weight column by column, spreading each column's rounding error over the columns
not yet quantized through the inverse Hessian's Cholesky factor. Nothing here knows about models:
`armquant.quantize` adds the hooks and calls these.

The integer grid is the one of `armquant.quantize.group_qparams` (4-bit, per group, symmetric
or asymmetric), so a GPTQ result packs into the same checkpoint layout as round-to-nearest.
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `weight` [N, K] given the Hessian [K, K] of its inputs.

    Returns (codes [N, K] uint8 in [0, 2**bits), scale [N, K // group_size], zero [N, K // group_size]),
    with weight ~ (codes - zero) * scale per group of `group_size` consecutive input columns.

    act_order: quantize columns in order of decreasing Hessian diagonal (most important first).
    Groups stay the contiguous column ranges of the stored layout ("static groups"): their scales
    come from the unquantized weight, so the checkpoint needs no column permutation index.
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

    n_groups = k // group_size
    scale = torch.empty(n_out, n_groups)
    zero = torch.empty(n_out, n_groups)
    if act_order:
        for g in range(n_groups):  # static groups, from the weight before any error feedback
            scale[:, g], zero[:, g] = group_qparams(W[:, g * group_size:(g + 1) * group_size], bits, symmetric)
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(k)
    group_of = perm // group_size  # group of the column at each position of the processing order

    H += torch.eye(k) * (damp * torch.mean(torch.diag(H)))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    codes = torch.zeros(n_out, k, dtype=torch.uint8)
    block = group_size * max(1, -(-128 // group_size))  # a whole number of groups per block
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(group_of[col])
            if not act_order and col % group_size == 0:
                # Groups in natural order: scales from the weight as updated so far (the block holds whole groups).
                scale[:, g], zero[:, g] = group_qparams(W1[:, i:i + group_size], bits, symmetric)
            w = W1[:, i]
            q = quantize_codes(w, scale[:, g], zero[:, g], bits)
            codes[:, col] = q.to(torch.uint8)
            err = (w - _dequantize(q, scale[:, g], zero[:, g])) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return codes, scale, zero
