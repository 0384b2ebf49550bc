"""SmoothQuant (Xiao et al., arXiv 2211.10438), pure tensor math.

Activation outliers sit in a few input channels. Dividing those channels of the activation by
s and multiplying the matching weight columns by s leaves the product unchanged and moves the
difficulty from activations (quantized per token, hard) to weights (per channel, easy):
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha). The division is folded into whatever produced the
activation (a norm's weight, or the rows of a previous linear), so it costs nothing at run time.
`armquant.quantize` finds the (producer, consumers) pairs in a model and calls these.
"""

from __future__ import annotations

import torch

__all__ = ["smoothing_scales", "smooth"]


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Per-input-channel factors s [K] for consumers `weights` ([N_i, K] each) of an activation
    whose per-channel max |x| over calibration data is `act_absmax` [K]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant alpha={alpha} must lie in [0, 1]")
    k = act_absmax.shape[0]
    for w in weights:
        if w.shape[-1] != k:
            raise ValueError(f"weight with {w.shape[-1]} input channels cannot consume an activation with {k} channels")
    w_absmax = torch.stack([w.detach().abs().amax(dim=0) for w in weights]).amax(dim=0).float()  # [K]
    a = act_absmax.float().clamp(min=1e-5)
    s = a.pow(alpha) / w_absmax.clamp(min=1e-5).pow(1.0 - alpha)
    return s.clamp(min=1e-5)


def smooth(
    scales: torch.Tensor,
    producer: torch.Tensor,
    consumers: list[torch.Tensor],
    producer_offset: float = 0.0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Fold s [K] into a producer and its consumers; returns (new producer, new consumers).

    producer: a norm weight [K] (output = (offset + weight) * normalized x, offset 1 for Gemma's
    norms, 0 otherwise) or a linear weight [K, M] whose output rows make the activation.
    consumers: linear weights [N_i, K]; their columns are multiplied by s.
    """
    s = scales.to(torch.float32)
    if producer.dim() == 1:
        new_producer = (producer.float() + producer_offset) / s - producer_offset
    else:
        new_producer = producer.float() / s.unsqueeze(1)
    new_consumers = [w.float() * s.unsqueeze(0) for w in consumers]
    return new_producer.to(producer.dtype), [c.to(w.dtype) for c, w in zip(new_consumers, consumers)]
