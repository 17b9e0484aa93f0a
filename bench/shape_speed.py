"""Why uneven width-pruned shapes can run slower than aligned ones: matmul and attention timings.

A width-pruned model's linear layers have odd sizes (MLP 8576 or 1500 instead of 8192 or
1536, hidden 3810, 28 heads). Matmul kernels work in tiles (and vector units in lanes), so
a dimension that is not a multiple of the tile leaves part of the last tile idle, and some
libraries switch to a slower kernel for it. This measures, per shape, the time of
`x @ W.T` (the q/o/gate/up/down projections) and of decode attention, and reports the
cost per weight (or per head) relative to an aligned reference of the same kind:
1.00 = as efficient as the aligned size, 1.10 = each parameter costs 10% more time.

Shapes: LLaMA-2-7B dims (hidden 4096, MLP 11008, head_dim 128) and the default model's
(SmolLM2-135M: hidden 576, MLP 1536, head_dim 64), on this CPU (float32) and on CUDA when
present (bf16). Backs the planner's `prune.target.align` knob (default 64). Writes
bench/results/shape_speed_<device>.{json,md}.

    python -m bench.shape_speed                 # CUDA when present, else CPU
    python -m bench.shape_speed --device cpu --repeats 5
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from shear.io import atomic_file, write_json
from shear.models import offline
from shear.speed import Clock, machine_info

RESULTS = Path(__file__).resolve().parent / "results"

# (group, "out" or "in" (which side varies), the fixed side, reference size, sizes): one linear
# layer at several widths. 7B: MLP 11008 (dense), 8192 / 8576 (multiples of 128), 8640 (of 64),
# 8600 (of 8), 8191 (odd); hidden 3840 (the align=64 planner shape for 20% fewer parameters)
# vs 3810 (its align=1 shape), into a 30-head q_proj (3840 wide). 135M: MLP 1536 (dense),
# 1472 / 1344 / 1152 (multiples of 64), 1500, 1424, 1126; hidden 576 vs 522 (align=1 shape), 512.
GROUPS_7B = [
    ("mlp up/gate 4096->m", "out", 4096, 8192, [11008, 8192, 8576, 8640, 8600, 8191]),
    ("mlp down m->4096", "in", 4096, 8192, [11008, 8192, 8576, 8640, 8600, 8191]),
    ("q_proj h->3840", "in", 3840, 3840, [3840, 3810, 3776, 3584]),
]
GROUPS_135M = [
    ("mlp up/gate 576->m", "out", 576, 1536, [1536, 1472, 1500, 1424, 1344, 1152, 1126]),
    ("mlp down m->576", "in", 576, 1536, [1536, 1472, 1500, 1424, 1344, 1152, 1126]),
    ("q_proj h->576", "in", 576, 576, [576, 522, 512]),
]


def block_ms(fn, calls: int, device: torch.device) -> float:
    """Mean ms per call over one block of `calls` calls."""
    clock = Clock(device)
    clock.mark()
    for _ in range(calls):
        fn()
    clock.mark()
    return clock.intervals_ms()[0] / calls


def interleaved_ms(fns: list, device: torch.device, repeats: int, min_block_ms: float) -> list[float]:
    """Fastest ms per call of each of `fns` over `repeats` rounds (one block of each per round,
    so a machine whose load drifts slows every case alike; other load only ever adds time, so
    the fastest round is the shape's own cost); a block lasts >= min_block_ms."""
    calls = []
    for fn in fns:
        fn()  # warm-up
        n = 1
        while block_ms(fn, n, device) * n < min_block_ms and n < 4096:
            n *= 2
        calls.append(n)
    rounds = [[block_ms(fn, n, device) for fn, n in zip(fns, calls)] for _ in range(repeats)]
    return [min(r[i] for r in rounds) for i in range(len(fns))]


def linear_cases(groups, token_counts, device, dtype, repeats, min_block_ms):
    """Time `x @ W.T` for every size in every group and token count (sizes of a group interleaved)."""
    rows = []
    for name, kind, fixed, reference, sizes in groups:
        shapes = [(fixed, n) if kind == "out" else (n, fixed) for n in sizes]  # (in, out)
        weights = [torch.randn(d_out, d_in, device=device, dtype=dtype) for d_in, d_out in shapes]
        for tokens in token_counts:
            xs = [torch.randn(tokens, d_in, device=device, dtype=dtype) for d_in, _ in shapes]
            fns = [lambda x=x, w=w: F.linear(x, w) for x, w in zip(xs, weights)]
            times = interleaved_ms(fns, device, repeats, min_block_ms)
            for n, (d_in, d_out), w, ms in zip(sizes, shapes, weights, times):
                rows.append({"group": name, "tokens": tokens, "size": n, "reference": reference,
                             "in": d_in, "out": d_out, "ms": ms, "weights": d_in * d_out,
                             "gb_s": w.numel() * w.element_size() / ms / 1e6,
                             "tflops": 2 * tokens * d_in * d_out / ms / 1e9})
        del weights
    return _relative(rows, "weights")


def attention_cases(head_counts, head_dim, batch, context, device, dtype, repeats, min_block_ms):
    """Time one decode step of attention (1 query over `context` keys) for each head count."""
    fns = []
    for heads in head_counts:
        q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype)
        k = torch.randn(batch, heads, context, head_dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        fns.append(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
    times = interleaved_ms(fns, device, repeats, min_block_ms)
    rows = [{"group": f"decode attention d{head_dim} ctx{context}", "tokens": batch, "size": heads,
             "reference": head_counts[0], "ms": ms, "weights": heads} for heads, ms in zip(head_counts, times)]
    return _relative(rows, "weights")


def _relative(rows, per):
    """Add `cost_vs_ref`: (time / work) over the reference size's (time / work), same group and tokens."""
    for r in rows:
        ref = next(x for x in rows if x["group"] == r["group"] and x["tokens"] == r["tokens"]
                   and x["size"] == r["reference"])
        r["cost_vs_ref"] = (r["ms"] / r[per]) / (ref["ms"] / ref[per])
    return rows


def table(rows) -> str:
    lines = ["| group | tokens | size | ms | GB/s (weights) | TFLOP/s | cost per unit vs ref |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        gb = f"{r['gb_s']:.1f}" if "gb_s" in r else ""
        tf = f"{r['tflops']:.3f}" if "tflops" in r else ""
        ref = " (ref)" if r["size"] == r["reference"] else ""
        lines.append(f"| {r['group']} | {r['tokens']} | {r['size']}{ref} | {r['ms']:.4f} | {gb} | {tf} | {r['cost_vs_ref']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (the fastest counts)")
    parser.add_argument("--skip-7b", action="store_true", help="only the default model's dims")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--out", help="output path without suffix (default: bench/results/shape_speed_<device>)")
    args = parser.parse_args(argv)
    offline()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    min_block = 2.0 if cuda else 20.0
    tokens = [1, 8, 32, 4096] if cuda else [1, 8, 128]

    results = {}
    with torch.inference_mode():
        results["default_linear"] = linear_cases(GROUPS_135M, tokens, device, dtype, args.repeats, min_block)
        results["default_attention"] = attention_cases([9, 8, 6, 3], 64, 8, 256, device, dtype, args.repeats, min_block)
        if not args.skip_7b:
            results["7b_linear"] = linear_cases(GROUPS_7B, tokens, device, dtype, args.repeats, min_block)
            results["7b_attention"] = attention_cases([32, 30, 28, 24], 128, 8, 512, device, dtype, args.repeats, min_block)

    info = machine_info(device)
    out = Path(args.out) if args.out else RESULTS / f"shape_speed_{device.type}"
    write_json(out.with_suffix(".json"), {"machine": info, "dtype": str(dtype).removeprefix("torch."),
                                          "results": results})
    md = (f"# Shape speed ({device.type})\n\n"
          f"Machine: {info.get('gpu', info['cpu'])}; torch {info['torch']}; {info['torch_threads']} threads; "
          f"{str(dtype).removeprefix('torch.')}.\n"
          f"`cost per unit vs ref` = (time / weights, or / heads for attention) relative to the reference size "
          f"of the same group and token count: above 1 means each parameter of that shape costs more time.\n")
    for name, rows in results.items():
        md += f"\n## {name}\n\n" + table(rows)
    with atomic_file(out.with_suffix(".md")) as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
