"""How close each INT4 grid lands to a model's weights, before any perplexity is measured.

The bundled SmolLM2 was dequantized from GGUF Q4_1: each group of 32 weights is min + d * q with
float16 min and d and q in [0, 15]. A grid with that float offset reproduces them exactly. The
grids of `armquant quantize` (and of GPTQ/AWQ checkpoints and ONNX Runtime's MatMulNBits) use an
integer zero point instead, (q - z) * s, which cannot land on an arbitrary offset; this prints
by how much each misses, over every linear projection of the decoder.

    python benchmarks/bench_int4_grid.py [MODEL] [--json benchmarks/results/int4_grid.json]
"""

import argparse

import torch

from armquant._io import write_json
from armquant._provenance import format_provenance, provenance
from armquant.quantize import dequantize_int4, int4_groupwise, pack_int4


def integer_zero_grid(weight: torch.Tensor, group_size: int, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest on armquant's grid, dequantized."""
    codes, scale, zero = int4_groupwise(weight, group_size, symmetric)
    return dequantize_int4(pack_int4(codes), scale, zero, in_features=weight.shape[1])


def float_offset_grid(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """GGUF Q4_1's grid: min + d * q, d = (max - min) / 15, both stored as float16."""
    groups = weight.reshape(-1, group_size)
    low, high = groups.amin(1, keepdim=True), groups.amax(1, keepdim=True)
    step = ((high - low) / 15).half().float()
    step = torch.where(step > 0, step, torch.ones_like(step))
    low = low.half().float()
    return (low + step * torch.clamp(torch.round((groups - low) / step), 0, 15)).reshape(weight.shape)


GRIDS = {
    "asym g32": lambda w: integer_zero_grid(w, 32, symmetric=False),
    "asym g64": lambda w: integer_zero_grid(w, 64, symmetric=False),
    "asym g128": lambda w: integer_zero_grid(w, 128, symmetric=False),
    "sym g32": lambda w: integer_zero_grid(w, 32, symmetric=True),
    "sym g128": lambda w: integer_zero_grid(w, 128, symmetric=True),
    "float offset g32 (GGUF Q4_1)": lambda w: float_offset_grid(w, 32),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m", help="bundled name, .gguf file or checkpoint folder")
    parser.add_argument("--json", default="benchmarks/results/int4_grid.json")
    args = parser.parse_args()

    from armquant.models import load

    model, _ = load(args.model)
    weights = {name: module.weight.detach().float() for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and ".layers." in name}
    rows = []
    for label, grid in GRIDS.items():
        error = norm = 0.0
        exact = 0
        for weight in weights.values():
            miss = grid(weight) - weight
            error += miss.pow(2).sum().item()
            norm += weight.pow(2).sum().item()
            exact += int((miss == 0).sum())
        total = sum(w.numel() for w in weights.values())
        rows.append({"grid": label, "relative_rms_error": (error / norm) ** 0.5, "exact_fraction": exact / total})

    info = provenance()
    print(f"{args.model}: {len(weights)} decoder projections, round to nearest on each grid")
    print("| grid | relative RMS error | weights reproduced exactly |")
    print("| --- | --- | --- |")
    for r in rows:
        print(f"| {r['grid']} | {100 * r['relative_rms_error']:.3f}% | {100 * r['exact_fraction']:.2f}% |")
    print(format_provenance(info))
    write_json(args.json, {"model": args.model, "projections": len(weights), "grids": rows, **info})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
