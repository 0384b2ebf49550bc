"""Calibration: how ARM redistributes activations, and what that does to quantization error.

One pass over a calibration set runs every window twice, ARM off then ARM on (same tokens,
same ARM seed), with hooks at each decoder layer's sites:

    attn_in   input of q_proj/k_proj/v_proj (after input_layernorm)
    o_in      input of o_proj (the attention output)
    mlp_in    input of gate_proj/up_proj (after post_attention_layernorm)
    act_out   output of the gate activation: the ARM input
    arm_out   output of ARM (ARM layers only; with ARM off it equals act_out)
    down_in   input of down_proj: ARM(act(gate(x))) * up(x)

Each (layer, site, side) feeds a `TensorStats` observer: streaming moments merged in float64
(Chan et al.), a signed log-spaced histogram for percentiles, and INT8/INT4 quantization error.
Memory is fixed by the model's shape, never by the dataset. The result is a
`CalibrationReport`: JSON, a terminal table, figures, and the static activation scales
that quantization consumes (`calibration.safetensors` + `calibration.json`, see
calibration/README.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from armquant._io import atomic_file, write_json
from armquant.cli import positive_int

__all__ = ["calibrate", "CalibrationReport", "TensorStats", "HistogramSpec", "SITES", "load_artifacts"]

log = logging.getLogger(__name__)

REPORT_SCHEMA = "armquant.calibration_report/1"
ARTIFACT_SCHEMA = "armquant.calibration/1"
REPORT_FILE = "calibration_report.json"
ARTIFACT_TENSORS = "calibration.safetensors"
ARTIFACT_META = "calibration.json"

SITES: dict[str, str] = {
    "attn_in": "input of q_proj/k_proj/v_proj (after input_layernorm)",
    "o_in": "input of o_proj (attention output)",
    "mlp_in": "input of gate_proj/up_proj (after post_attention_layernorm)",
    "act_out": "output of the gate activation = ARM input",
    "arm_out": "ARM output (ARM layers only; equals act_out with ARM off)",
    "down_in": "input of down_proj = ARM(act(gate(x))) * up(x)",
}

# Linear-input sites -> the linear layers (relative to the decoder layer) that read them.
# Every family armquant supports uses these names.
LINEAR_SITES: dict[str, tuple[str, ...]] = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_in": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "down_in": ("mlp.down_proj",),
}

QUANT_FORMATS = {"int8": 127, "int4": 7}  # symmetric: q in [-qmax, qmax], scale = absmax / qmax
PERCENTILES = {"p99": 99.0, "p99_9": 99.9, "p99_99": 99.99}


# --- Streaming statistics (pure math) ---------------------------------------------------------


@dataclass(frozen=True)
class HistogramSpec:
    """Signed log-spaced bins: |x| in [10^min_decade, 10^max_decade) is split into
    `bins_per_decade` bins per decade on each side of zero; |x| below 10^min_decade falls in
    one zero bin, above 10^max_decade in the outermost bin. A percentile read from it lies
    within one bin of the exact value: a relative error below 10^(1/bins_per_decade) - 1
    (0.46% at the default 500)."""

    bins_per_decade: int = 500
    min_decade: int = -10
    max_decade: int = 6

    @property
    def bins_per_side(self) -> int:
        return self.bins_per_decade * (self.max_decade - self.min_decade)

    @property
    def size(self) -> int:
        return 2 * self.bins_per_side + 1  # negative side, zero bin, positive side

    @property
    def relative_resolution(self) -> float:
        return 10 ** (1 / self.bins_per_decade) - 1

    def magnitude_edges(self) -> np.ndarray:
        """Edges of the |x| bins: [0, 10^min, ..., 10^max] (bins_per_side + 2 values)."""
        logs = self.min_decade + np.arange(self.bins_per_side + 1) / self.bins_per_decade
        return np.concatenate([[0.0], 10.0**logs])

    def bin_of(self, x: torch.Tensor) -> torch.Tensor:
        """Bin index of each finite value of x, as int64."""
        # float32 log2 is enough: an error of 1e-6 decades only moves values sitting on an edge.
        k = x.abs().log2_().mul_(math.log10(2) * self.bins_per_decade).sub_(self.min_decade * self.bins_per_decade)
        k = k.floor_().clamp_(-1, self.bins_per_side - 1).add_(1)  # 0: the zero bin, 1..: magnitude bins
        return k.mul_(x.sign()).add_(self.bins_per_side).long()  # sign(0) = 0 lands in the zero bin

    def to_dict(self) -> dict:
        return {"bins_per_decade": self.bins_per_decade, "min_decade": self.min_decade, "max_decade": self.max_decade}


def _merge_moments(a: tuple, b: tuple) -> tuple:
    """Merge (n, mean, M2, M3, M4) of two disjoint samples (Chan, Golub & LeVeque; Pébay 2008)."""
    na, ma, m2a, m3a, m4a = a
    nb, mb, m2b, m3b, m4b = b
    if na == 0:
        return b
    if nb == 0:
        return a
    n = na + nb
    d = mb - ma
    mean = ma + d * nb / n
    m2 = m2a + m2b + d * d * na * nb / n
    m3 = m3a + m3b + d**3 * na * nb * (na - nb) / n**2 + 3 * d * (na * m2b - nb * m2a) / n
    m4 = (
        m4a + m4b + d**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
        + 6 * d * d * (na * na * m2b + nb * nb * m2a) / n**2 + 4 * d * (na * m3b - nb * m3a) / n
    )
    return n, mean, m2, m3, m4


def _batch_moments(x: torch.Tensor) -> tuple:
    """(n, mean, M2, M3, M4) of a 1-D float32 tensor. Within a batch, torch's cascaded float32
    summation (relative error ~1e-7); batches merge in float64."""
    n = x.numel()
    if n == 0:
        return 0, 0.0, 0.0, 0.0, 0.0
    mean = x.sum().item() / n
    d = x - mean
    shift = d.sum().item() / n  # corrects the rounding of the float32 mean
    d2 = d * d
    m2 = d2.sum().item() - n * shift * shift
    m3 = torch.dot(d2, d).item()
    m4 = torch.dot(d2, d2).item()
    return n, mean + shift, m2, m3, m4


def quantization_error(x: torch.Tensor, qmax: int, absmax: torch.Tensor) -> float:
    """sum (x - q(x))^2 for symmetric round-to-nearest with scale = absmax / qmax; x: [T, C],
    absmax: a scalar (per-tensor) or [T, 1] (per-token). Uses x - q(x) = s * (x/s - round(x/s)),
    and |x/s| <= qmax, so no clamp is needed."""
    scale = (absmax / qmax).clamp_min(torch.finfo(x.dtype).tiny)
    y = x / scale
    y.sub_(torch.round(y)).mul_(scale)
    y = y.reshape(-1)
    return torch.dot(y, y).item()


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """10 log10(sum x^2 / sum (x - q(x))^2); +inf when the quantization is exact."""
    if noise_power == 0:
        return math.inf if signal_power > 0 else math.nan
    return 10 * math.log10(signal_power / noise_power)


class TensorStats:
    """Streaming statistics of one activation tensor over many forward calls.

    update(x) takes x: [..., C]; the last dimension is the channel. Non-finite values are
    counted and left out of every statistic (quantization sees them as zeros).
    """

    def __init__(self, channels: Optional[int] = None, spec: HistogramSpec = HistogramSpec()):
        self.spec = spec
        self.moments = (0, 0.0, 0.0, 0.0, 0.0)
        self.nonfinite = 0
        self.min = math.inf
        self.max = -math.inf
        self.histogram = torch.zeros(spec.size, dtype=torch.int64)
        self.channel_absmax = torch.zeros(channels) if channels else None
        self.signal = 0.0  # sum of x^2
        self.noise = {f"{fmt}_{g}": 0.0 for fmt in QUANT_FORMATS for g in ("tensor", "token")}

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        x = x.reshape(-1, x.shape[-1])  # [tokens, C]
        moments = _batch_moments(x.reshape(-1))
        if not math.isfinite(moments[1]):  # rare: only then pay for the mask
            finite = torch.isfinite(x)
            self.nonfinite += x.numel() - int(finite.sum())
            x = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
            values = x[finite]
            moments = _batch_moments(values)
        else:
            values = x.reshape(-1)
        low, high = torch.aminmax(x, dim=0)  # per channel
        channel_absmax = torch.maximum(low.abs(), high.abs())
        if values.numel():
            self.moments = _merge_moments(self.moments, moments)
            self.min = min(self.min, values.min().item() if self.nonfinite else low.min().item())
            self.max = max(self.max, values.max().item() if self.nonfinite else high.max().item())
            self.histogram += torch.bincount(self.spec.bin_of(values), minlength=self.spec.size).cpu()
        if self.channel_absmax is None:
            self.channel_absmax = torch.zeros(channel_absmax.numel())
        if self.channel_absmax.numel() != channel_absmax.numel():
            raise ValueError(f"this observer saw {self.channel_absmax.numel()} channels before and {channel_absmax.numel()} now; "
                             "use one TensorStats per tensor")
        torch.maximum(self.channel_absmax, channel_absmax.cpu(), out=self.channel_absmax)
        self.signal += moments[2] + moments[0] * moments[1] ** 2  # sum x^2 = M2 + n mean^2
        tensor_absmax = channel_absmax.max()
        low, high = torch.aminmax(x, dim=1, keepdim=True)  # per token
        token_absmax = torch.maximum(low.abs(), high.abs())
        for fmt, qmax in QUANT_FORMATS.items():
            self.noise[f"{fmt}_tensor"] += quantization_error(x, qmax, tensor_absmax)
            self.noise[f"{fmt}_token"] += quantization_error(x, qmax, token_absmax)

    @property
    def count(self) -> int:
        return self.moments[0]

    def abs_percentile(self, q: float) -> float:
        """q-th percentile (0..100) of |x| from the histogram (within one bin, see HistogramSpec)."""
        return _abs_percentile(self.abs_histogram(), self.spec, q, max(abs(self.min), abs(self.max)))

    def abs_histogram(self) -> np.ndarray:
        """Counts of |x| over spec.magnitude_edges(): [zero bin, bins_per_side bins]."""
        h = self.histogram.numpy()
        c = self.spec.bins_per_side
        return np.concatenate([[h[c]], h[c + 1:] + h[:c][::-1]])

    def share_below(self, threshold: float) -> float:
        """Share of finite values with |x| < threshold (interpolated inside the threshold's bin)."""
        return _share_below(self.abs_histogram(), self.spec, threshold)

    def summary(self, near_zero: float) -> dict:
        n, mean, m2, _, m4 = self.moments
        std = math.sqrt(m2 / n) if n else math.nan
        absmax = max(abs(self.min), abs(self.max)) if n else math.nan
        out = {
            "count": n,
            "nonfinite": self.nonfinite,
            "min": self.min if n else math.nan,
            "max": self.max if n else math.nan,
            "absmax": absmax,
            "mean": mean if n else math.nan,
            "std": std,
            "kurtosis": n * m4 / (m2 * m2) if m2 > 0 else math.nan,
            **{name: self.abs_percentile(q) if n else math.nan for name, q in PERCENTILES.items()},
            "near_zero": self.share_below(near_zero) if n else math.nan,
            "crest": absmax / std if std > 0 else math.nan,
            "sqnr_db": {k: sqnr_db(self.signal, v) for k, v in self.noise.items()},
        }
        return out

    def sparse_histogram(self) -> dict:
        nonzero = torch.nonzero(self.histogram).flatten()
        return {"bin": nonzero.tolist(), "count": self.histogram[nonzero].tolist()}


def _abs_percentile(counts: np.ndarray, spec: HistogramSpec, q: float, absmax: float) -> float:
    total = int(counts.sum())
    if total == 0:
        return math.nan
    edges = spec.magnitude_edges()
    rank = (total - 1) * q / 100  # numpy's linear method ranks (0-based)
    cum = np.cumsum(counts)
    b = int(np.searchsorted(cum, rank, side="right"))
    b = min(b, len(counts) - 1)
    before = cum[b] - counts[b]
    frac = min(1.0, (rank - before + 0.5) / counts[b])
    lo, hi = edges[b], edges[b + 1]
    value = lo + frac * (hi - lo) if lo == 0 else lo * (hi / lo) ** frac
    return float(min(value, absmax))


def _share_below(counts: np.ndarray, spec: HistogramSpec, threshold: float) -> float:
    total = counts.sum()
    if total == 0:
        return math.nan
    edges = spec.magnitude_edges()
    b = int(np.searchsorted(edges, threshold, side="right")) - 1
    if b >= len(counts):
        return 1.0
    if b < 0:
        return 0.0
    lo, hi = edges[b], edges[b + 1]
    frac = (threshold - lo) / (hi - lo) if lo == 0 else math.log(threshold / lo) / math.log(hi / lo)
    return float((counts[:b].sum() + frac * counts[b]) / total)


# --- Hooks ------------------------------------------------------------------------------------


def _layers(model: nn.Module):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return decoder, decoder.layers


def site_modules(model: nn.Module) -> list[tuple[int, str, nn.Module, str]]:
    """(layer, site, module, "input"|"output") for every hooked site."""
    from armquant.models import ARMActivation

    _, layers = _layers(model)
    sites = []
    for i, layer in enumerate(layers):
        for site, names in LINEAR_SITES.items():
            if site == "down_in":
                continue
            sites.append((i, site, layer.get_submodule(names[0]), "input"))
        act = layer.mlp.act_fn
        if isinstance(act, ARMActivation):
            sites.append((i, "act_out", act.act, "output"))
            sites.append((i, "arm_out", act.arm, "output"))
        else:
            sites.append((i, "act_out", act, "output"))
        sites.append((i, "down_in", layer.get_submodule(LINEAR_SITES["down_in"][0]), "input"))
    return sites


@contextlib.contextmanager
def observe(model: nn.Module, record):
    """Call record(layer, site, tensor) at every site during forward passes; the hooks are
    removed when the block ends, whatever happens inside it."""
    handles = []
    try:
        for layer, site, module, where in site_modules(model):
            if where == "input":
                hook = lambda m, args, _l=layer, _s=site: record(_l, _s, args[0])  # noqa: E731
                handles.append(module.register_forward_pre_hook(hook))
            else:
                hook = lambda m, args, out, _l=layer, _s=site: record(_l, _s, out)  # noqa: E731
                handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _calibration_mode(model: nn.Module):
    """Eval mode and no gradients for the block; training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _arm_seed(model: nn.Module, seed: Optional[int]):
    """Temporarily give every ARM site the random-stream key `seed` (None: leave as is)."""
    from armquant.models import arm_sites

    sites = arm_sites(model)
    saved = {i: s.arm.config for i, s in sites.items()}
    try:
        if seed is not None:
            for site in sites.values():
                site.arm.config = site.arm.config.replace(seed=seed)
        yield
    finally:
        for i, site in sites.items():
            site.arm.config = saved[i]


# --- The pass ---------------------------------------------------------------------------------


def _windows_from(data, tokenizer, window: int, max_windows: Optional[int]) -> tuple[torch.Tensor, dict]:
    """Token windows [n, window] and a description of where they came from."""
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows={max_windows} must be at least 1 (or None for all windows)")
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"calibration windows must be token ids of shape [windows, length] (int64); got {tuple(data.shape)} {data.dtype}"
            )
        tokens, source = data.long()[:max_windows], "token windows"
    else:
        from armquant.data import load_texts, token_windows

        if tokenizer is None:
            raise ValueError(f"calibration data {data!r} is text: pass tokenizer= to tokenize it, or pass token windows")
        if isinstance(data, (list, tuple)):
            texts, source = list(data), f"{len(data)} texts"
        else:
            source = str(data)
            texts = load_texts(source)
        tokens = token_windows(tokenizer, texts, window, max_windows=max_windows)
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"the calibration data {source!r} holds no windows; give at least one window of tokens")
    if max_windows is not None and tokens.shape[0] < max_windows and not isinstance(data, torch.Tensor):
        log.warning("calibration data %r gives only %d windows of %d tokens (asked for %d)", source, tokens.shape[0], window, max_windows)
    return tokens, {"source": source, "windows": int(tokens.shape[0]), "length": int(tokens.shape[1]),
                    "tokens": int(tokens.numel()), "max_windows": max_windows}


def calibrate(
    model: nn.Module,
    data,
    *,
    tokenizer=None,
    window: int = 512,
    max_windows: Optional[int] = 128,
    seed: Optional[int] = None,
    spec: HistogramSpec = HistogramSpec(),
    progress: bool = True,
) -> "CalibrationReport":
    """Measure activations at every decoder layer with ARM off and on (see the module docstring).

    data: token windows [n, length] (LongTensor), a list of texts, or a source for
          armquant.data.load_texts ("sotu:calibration", a .txt file or folder); text needs tokenizer.
    window: tokens per window (text data); max_windows: how many windows to use (None: all).
    seed: ARM's random-stream key for the run (None: each ARM site keeps its own).
    A model without ARM is measured once, as the "off" side.
    """
    from tqdm.auto import tqdm

    from armquant.models import arm_enabled, arm_sites, describe

    tokens, data_info = _windows_from(data, tokenizer, window, max_windows)
    sites_arm = arm_sites(model)
    sides = ("off", "on") if sites_arm else ("off",)
    observers: dict[str, dict[tuple[int, str], TensorStats]] = {side: {} for side in sides}
    current = {"side": "off"}

    def record(layer: int, site: str, x: torch.Tensor) -> None:
        stats = observers[current["side"]].get((layer, site))
        if stats is None:
            stats = observers[current["side"]][(layer, site)] = TensorStats(x.shape[-1], spec)
        stats.update(x)

    environment = _environment()  # before the pass: the code that runs is the code at this revision
    decoder, _ = _layers(model)
    device = model.get_input_embeddings().weight.device  # the first device under a device map
    started = time.perf_counter()
    with _calibration_mode(model), _arm_seed(model, seed), observe(model, record):
        bar = tqdm(tokens, desc="calibrate", unit="window", disable=not progress)
        for row in bar:
            ids = row[None].to(device)  # [1, L]: full windows, no padding, so no attention mask
            for side in sides:
                current["side"] = side
                with arm_enabled(model, side == "on"):
                    decoder(input_ids=ids, use_cache=False)  # the LM head adds nothing to measure
        arm_info = None  # as run, with the seed of this run
        if sites_arm:
            arm_info = {"layers": sorted(sites_arm), "config": {str(i): s.arm.config.to_dict() for i, s in sites_arm.items()}}
    elapsed = time.perf_counter() - started
    return CalibrationReport.from_observers(
        observers, model_info=describe(model), arm=arm_info, data=data_info, seed=seed, spec=spec,
        elapsed_s=elapsed, environment=environment,
    )


# --- The report -------------------------------------------------------------------------------

METRICS = ("absmax", "p99_9", "crest", "kurtosis", "near_zero")
SQNR_KEYS = ("int8_tensor", "int8_token", "int4_tensor", "int4_token")


def _change(off: float, on: float, metric: str) -> Optional[float]:
    """Relative change in percent (dB difference for SQNR, points for shares)."""
    if off is None or on is None or not (math.isfinite(off) and math.isfinite(on)):
        return None
    if metric.startswith("sqnr") or metric == "near_zero":
        return on - off
    return 100 * (on - off) / abs(off) if off else None


@dataclass
class CalibrationReport:
    """Before/after statistics for every (layer, site), and the calibration artifacts.

    `data` is the JSON form (see `to_dict`); `channel_absmax` maps (layer, site, side) to the
    per-channel absmax, used for the artifacts and not saved in the JSON.
    """

    data: dict
    channel_absmax: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_observers(cls, observers, *, model_info, arm, data, seed, spec, elapsed_s, environment) -> "CalibrationReport":
        first = observers["off"]
        near_zero = {}  # one threshold per (layer, site), the same for both sides
        for key, stats in first.items():
            absmax = max(abs(stats.min), abs(stats.max)) if stats.count else 0.0
            near_zero[key] = absmax / (2 * QUANT_FORMATS["int8"])
        layers: dict[int, dict] = {}
        channel_absmax = {}
        for side, by_key in observers.items():
            for (layer, site), stats in sorted(by_key.items(), key=lambda kv: (kv[0][0], list(SITES).index(kv[0][1]))):
                entry = layers.setdefault(layer, {"layer": layer, "arm": arm is not None and layer in arm["layers"], "sites": {}})
                summary = stats.summary(near_zero.get((layer, site), 0.0))
                if entry["arm"]:  # histograms of every layer would make the report tens of MB
                    summary["histogram"] = stats.sparse_histogram()
                entry["sites"].setdefault(site, {})[side] = summary
                channel_absmax[(layer, site, side)] = stats.channel_absmax
        report = {
            "schema": REPORT_SCHEMA,
            "model": model_info,
            "arm": arm,
            "sides": list(observers),
            "note": None if arm else "the model carries no ARM layer: only the ARM-off side was measured",
            "data": data,
            "seed": seed,
            "sites": SITES,
            "definitions": {
                "percentiles": "of |x|, read from the histogram",
                "near_zero": "share of |x| below half an INT8 per-tensor step of the ARM-off tensor (absmax_off / 254)",
                "crest": "absmax / std",
                "kurtosis": "Pearson (normal distribution = 3)",
                "sqnr_db": "10 log10(sum x^2 / sum (x - q(x))^2), symmetric round-to-nearest; 'tensor' = one "
                "dynamic scale per window (absmax / qmax), 'token' = one per token; int8 qmax 127, int4 qmax 7",
                "change": "percent for ranges and shapes, dB for SQNR, difference of shares for near_zero",
                "histogram": "sparse signed log-spaced bin counts, kept at the ARM layers only",
            },
            "histogram": {**spec.to_dict(), "relative_resolution": spec.relative_resolution},
            "layers": [layers[i] for i in sorted(layers)],
            "elapsed_s": elapsed_s,
            "environment": environment,
        }
        report["summary"] = _summarize(report)
        return cls(report, channel_absmax)

    # JSON round trip
    def to_dict(self) -> dict:
        return self.data

    def save(self, path: str | os.PathLike) -> Path:
        write_json(path, _json_safe(self.data))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationReport":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no calibration report at {path}; run `armquant calibrate` first")
        data = json.loads(path.read_text())
        if data.get("schema") != REPORT_SCHEMA:
            raise ValueError(f"{path} is not a calibration report of schema {REPORT_SCHEMA} (found {data.get('schema')!r})")
        return cls(data)

    def stats(self, layer: int, site: str, side: str) -> dict:
        for entry in self.data["layers"]:
            if entry["layer"] == layer:
                return entry["sites"][site][side]
        raise KeyError(f"layer {layer} is not in the report")

    @property
    def summary(self) -> list[dict]:
        return self.data["summary"]

    def table(self, layers: Optional[list[int]] = None, sites: Optional[list[str]] = None) -> str:
        return format_table(self.data, layers, sites)

    # Calibration artifacts for quantization
    def artifacts(self, side: Optional[str] = None) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and metadata of calibration.safetensors/.json for the model as it runs
        (ARM on when the model carries ARM), or for `side`."""
        side = side or self.data["sides"][-1]
        if not self.channel_absmax:
            raise ValueError("this report was loaded from JSON and holds no per-channel statistics; rerun calibrate()")
        tensors = {}
        for entry in self.data["layers"]:
            layer = entry["layer"]
            for site, modules in LINEAR_SITES.items():
                if site not in entry["sites"]:
                    continue
                s = entry["sites"][site][side]
                channel = self.channel_absmax[(layer, site, side)].float().contiguous()
                for name in modules:
                    prefix = f"model.layers.{layer}.{name}"
                    tensors[f"{prefix}.input_channel_absmax"] = channel.clone()  # safetensors refuses shared storage
                    tensors[f"{prefix}.input_absmax"] = torch.tensor(s["absmax"], dtype=torch.float32)
                    tensors[f"{prefix}.input_p99_99"] = torch.tensor(s["p99_99"], dtype=torch.float32)
                    tensors[f"{prefix}.input_scale_int8"] = torch.tensor(s["absmax"] / QUANT_FORMATS["int8"], dtype=torch.float32)
        meta = {
            "schema": ARTIFACT_SCHEMA,
            "side": side,
            "arm": self.data["arm"] if side == "on" else None,
            "data": self.data["data"],
            "seed": self.data["seed"],
            "model": {k: self.data["model"][k] for k in ("model_type", "decoder_layers", "parameters")},
            "tensors": "<module>.input_channel_absmax [in_features], .input_absmax [], .input_p99_99 [], .input_scale_int8 []",
            "environment": self.data["environment"],
        }
        return tensors, meta

    def save_artifacts(self, out_dir: str | os.PathLike, side: Optional[str] = None) -> tuple[Path, Path]:
        from safetensors.torch import save_file

        tensors, meta = self.artifacts(side)
        out_dir = Path(out_dir)
        with atomic_file(out_dir / ARTIFACT_TENSORS) as tmp:
            save_file(tensors, str(tmp), metadata={"schema": ARTIFACT_SCHEMA, "side": meta["side"]})
        write_json(out_dir / ARTIFACT_META, _json_safe(meta))  # last: it vouches for the tensors
        return out_dir / ARTIFACT_TENSORS, out_dir / ARTIFACT_META


def load_artifacts(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read calibration.safetensors + calibration.json from a checkpoint folder."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_path, tensor_path = path / ARTIFACT_META, path / ARTIFACT_TENSORS
    if not meta_path.is_file() or not tensor_path.is_file():
        raise FileNotFoundError(f"no calibration artifacts in {path} (expected {ARTIFACT_META} and {ARTIFACT_TENSORS}); "
                                "run `armquant calibrate` on this checkpoint first")
    meta = json.loads(meta_path.read_text())
    if meta.get("schema") != ARTIFACT_SCHEMA:
        raise ValueError(f"{meta_path} has schema {meta.get('schema')!r}; expected {ARTIFACT_SCHEMA}")
    return load_file(str(tensor_path)), meta


def _json_safe(obj):
    """NaN and infinity are not JSON: write them as null and "inf"."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _num(v) -> float:
    if v is None:
        return math.nan
    if isinstance(v, str):
        return float(v)
    return v


def _metric(stats: dict, metric: str) -> float:
    if metric.startswith("sqnr_"):
        return _num(stats["sqnr_db"][metric[5:]])
    return _num(stats[metric])


SUMMARY_METRICS = METRICS + tuple(f"sqnr_{k}" for k in SQNR_KEYS)


def _summarize(report: dict) -> list[dict]:
    """Headline rows: each metric at each site of the ARM layers (off vs on), and its median
    change over the layers downstream of the first ARM layer."""
    if report["arm"] is None:
        return []
    first = min(report["arm"]["layers"])
    rows = []
    for entry in report["layers"]:
        if not entry["arm"]:
            continue
        for site in ("arm_out", "down_in"):
            off, on = entry["sites"][site]["off"], entry["sites"][site]["on"]
            for metric in SUMMARY_METRICS:
                a, b = _metric(off, metric), _metric(on, metric)
                rows.append({"where": f"layer {entry['layer']}", "site": site, "metric": metric, "off": a, "on": b,
                             "change": _change(a, b, metric)})
    downstream = [e for e in report["layers"] if e["layer"] > first]
    for site in ("attn_in", "o_in", "mlp_in", "act_out", "down_in"):
        for metric in SUMMARY_METRICS:
            changes = [
                _change(_metric(e["sites"][site]["off"], metric), _metric(e["sites"][site]["on"], metric), metric)
                for e in downstream if site in e["sites"]
            ]
            changes = [c for c in changes if c is not None]
            if changes:
                rows.append({
                    "where": f"layers {first + 1}-{downstream[-1]['layer']} (median)", "site": site, "metric": metric,
                    "off": None, "on": None, "change": float(np.median(changes)),
                    "max_abs_change": float(np.max(np.abs(changes))),
                })
    return rows


def _fmt(v, metric: str) -> str:
    v = _num(v)
    if v is None or not math.isfinite(v):
        return "-" if v is None or math.isnan(v) else ("inf" if v > 0 else "-inf")
    if metric == "near_zero":
        return f"{100 * v:.2f}%"
    if metric.startswith("sqnr"):
        return f"{v:.2f}"
    return f"{v:.4g}"


def _fmt_change(c, metric: str) -> str:
    if c is None:
        return "-"
    if metric.startswith("sqnr"):
        return f"{c:+.2f} dB"
    if metric == "near_zero":
        return f"{100 * c:+.2f} pt"
    return f"{c:+.1f}%"


TABLE_METRICS = ("absmax", "p99_9", "crest", "kurtosis", "near_zero", "sqnr_int8_tensor", "sqnr_int4_token")


def format_table(report: dict, layers=None, sites=None) -> str:
    """Per layer and site: each metric off -> on (change), or off alone for a model without ARM."""
    has_arm = report["arm"] is not None

    def cell(sides: dict, m: str) -> str:
        a = _metric(sides["off"], m)
        if not has_arm:
            return _fmt(a, m)
        b = _metric(sides["on"], m)
        return f"{_fmt(a, m)} -> {_fmt(b, m)} ({_fmt_change(_change(a, b, m), m)})"

    rows = [
        [f"{entry['layer']}{'*' if has_arm and entry['arm'] else ''}", site, *(cell(sides, m) for m in TABLE_METRICS)]
        for entry in report["layers"] if layers is None or entry["layer"] in layers
        for site, sides in entry["sites"].items() if sites is None or site in sites
    ]
    title = "ARM off -> on (change); * marks ARM layers" if has_arm else "ARM off only (the model carries no ARM layer)"
    header = [h.replace("sqnr_", "SQNR ") for h in ["layer", "site", *TABLE_METRICS]]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    return ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *rows]]


def format_summary(report: dict) -> str:
    """The headline: each metric at the ARM layers (off, on, change), and its median change over
    the layers downstream."""
    rows = report["summary"]
    if not rows:
        return report.get("note") or ""
    at_arm = [r for r in rows if r["off"] is not None]
    lines = []
    for where in dict.fromkeys(r["where"] for r in at_arm):
        for site in ("arm_out", "down_in"):
            sel = [r for r in at_arm if r["where"] == where and r["site"] == site]
            lines.append(f"{where}, {site} ({report['sites'][site]}):")
            lines += _grid(["metric", "ARM off", "ARM on", "change"],
                           [[r["metric"], _fmt(r["off"], r["metric"]), _fmt(r["on"], r["metric"]), _fmt_change(r["change"], r["metric"])] for r in sel])
            lines.append("")
    down = [r for r in rows if r["off"] is None]
    if down:
        where = down[0]["where"]
        sites = list(dict.fromkeys(r["site"] for r in down))
        lines.append(f"{where.replace(' (median)', '')}: median change ARM off -> on (largest |change| in brackets):")
        body = []
        for metric in dict.fromkeys(r["metric"] for r in down):
            cells = []
            for site in sites:
                r = next((r for r in down if r["site"] == site and r["metric"] == metric), None)
                cells.append("-" if r is None else f"{_fmt_change(r['change'], metric)} [{_fmt_change(r['max_abs_change'], metric).lstrip('+')}]")
            body.append([metric, *cells])
        lines += _grid(["metric", *sites], body)
    return "\n".join(lines).rstrip()


def _environment() -> dict:
    import transformers

    from armquant._provenance import provenance

    return {**provenance(), "transformers": transformers.__version__}


# --- CLI --------------------------------------------------------------------------------------

OUTPUT_FILES = (REPORT_FILE, ARTIFACT_TENSORS, ARTIFACT_META, "calibration_histograms.png", "calibration_layers.png")


def _output_dir(args) -> Path:
    if args.out:
        return Path(args.out)
    if (Path(args.model) / "config.json").is_file():
        return Path(args.model)  # next to the checkpoint
    raise ValueError(f"{args.model} is not a checkpoint folder, so there is nowhere beside it to write; pass --out DIR")


def _dispatch(model: nn.Module, device_map: str) -> nn.Module:
    """Spread the model over the available devices with accelerate (for models that do not fit one)."""
    from accelerate import dispatch_model, infer_auto_device_map

    _, layers = _layers(model)
    plan = infer_auto_device_map(model, no_split_module_classes=[type(layers[0]).__name__])
    log.info("device map: %s", plan)
    return dispatch_model(model, plan)


def _cmd_calibrate(args) -> int:
    from armquant.models import load_from_args

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = _output_dir(args)
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace them or choose --out")
    model, tokenizer = load_from_args(args, device="cpu" if args.device_map else args.device)
    if args.device_map:
        model = _dispatch(model, args.device_map)
    report = calibrate(model, args.data, tokenizer=tokenizer, window=args.window, max_windows=args.max_windows, seed=args.seed)
    data = report.data
    print(f"{args.model}: {data['data']['windows']} windows x {data['data']['length']} tokens from {data['data']['source']}, "
          f"{data['elapsed_s']:.0f} s")
    if args.table:
        print(report.table(sites=args.table_sites))
        print()
    print(format_summary(data))
    written = _write_outputs(report, out, figures=not args.no_figures, artifacts=not args.no_artifacts)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _write_outputs(report: CalibrationReport, out: Path, figures: bool = True, artifacts: bool = True) -> list[Path]:
    """Write everything into a staging folder first, then move the files into `out`, the report
    last: a failure on the way leaves no output behind, and never a half-written one."""
    import shutil
    import tempfile

    from armquant.plots import plot_histograms, plot_layers

    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".calibration.", suffix=".tmp", dir=out))
    try:
        staged = []
        if figures:
            if report.data["arm"] is not None:
                staged.append(plot_histograms(report.data, stage / "calibration_histograms.png"))
            staged.append(plot_layers(report.data, stage / "calibration_layers.png"))
        if artifacts:
            staged += report.save_artifacts(stage)
        staged.append(report.save(stage / REPORT_FILE))
        written = []
        for path in staged:
            os.replace(path, out / path.name)
            written.append(out / path.name)
        return written
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def add_cli(subparsers) -> None:
    from armquant.models import add_arm_arguments

    p = subparsers.add_parser(
        "calibrate", help="activation statistics with ARM off and on, and static activation scales",
        description="Run calibration windows through the model twice (ARM off, then ARM on with the same seed) "
        "with hooks on every decoder layer; print before/after statistics and quantization SQNR, write "
        f"{REPORT_FILE}, figures, and the activation scales quantization uses ({ARTIFACT_TENSORS} + {ARTIFACT_META}).",
    )
    p.add_argument("model", help="bundled name (smollm2-135m, gemma3-270m), .gguf file or checkpoint folder")
    p.add_argument("--data", default="sotu:calibration", help="data source (default: sotu:calibration; also a .txt file, a folder, hf:DATASET:CONFIG:SPLIT)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--max-windows", type=positive_int, default=128, help="number of windows (default 128)")
    p.add_argument("--seed", type=int, default=None, help="ARM random-stream key for the run (default: the model's)")
    p.add_argument("--out", help="output folder (default: the checkpoint folder itself)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier calibration outputs in the output folder")
    p.add_argument("--table", action="store_true", help="also print the per-layer table")
    p.add_argument("--table-sites", nargs="+", choices=list(SITES), help="sites in the per-layer table (default: all)")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-artifacts", action="store_true", help=f"skip {ARTIFACT_TENSORS} and {ARTIFACT_META}")
    p.add_argument("--device", default="cpu", help="device to run on (default cpu)")
    p.add_argument("--device-map", choices=["auto"], help="spread the model over the available devices with accelerate")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")
    add_arm_arguments(p)
    p.set_defaults(handler=_cmd_calibrate)
