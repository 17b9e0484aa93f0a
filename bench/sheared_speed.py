"""Cost of Sheared-LLaMA's masks: one training step with masks vs the same step without.

With masks (`shear.prune.sheared.ShearedObjective`'s step): sample every hard-concrete mask, forward
through the hooks, LM loss + Lagrangian, backward into weights, log-alphas and
multipliers, clip, one AdamW step over all three. Without masks (the straightforward
way): the plain model's LM loss, backward, clip, AdamW over the weights. Same model, same
batch, same process; the two are timed alternately and the median of each is reported,
with the ratio (target: at most 1.3x).

CPU: the default model (data/models/base, else the base.source GGUF) in float32.
CUDA (when present): a random-weight model of the Sheared-LLaMA-1.3B shape (24 layers,
hidden 2048, 16 heads, MLP 5504, vocab 32000) in float32 weights with bf16 autocast.
Writes bench/results/sheared_speed.{json,md}.

    python -m bench.sheared_speed                 # CPU, and CUDA when present
    python -m bench.sheared_speed --cpu-batch 1 --cpu-seq-len 128 --repeats 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from shear.io import atomic_file, write_json
from shear.models import architecture, count_parameters, offline
from shear.prune.l0 import L0Masks
from shear.prune.shapes import resolve_target
from shear.prune.sheared import GRAD_CLIP, BETAS, MaskHooks, ShearedObjective, make_weights_optimizer
from shear.speed import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
SHEARED_1_3B = dict(num_hidden_layers=24, hidden_size=2048, num_attention_heads=16, num_key_value_heads=16,
                    intermediate_size=5504, head_dim=128, vocab_size=32000, tie_word_embeddings=False)


def default_model():
    """The default model: the saved base checkpoint when there is one (fast), else the GGUF source."""
    from shear.config import Params
    from shear.models import load_model, load_source

    if Path("data/models/base/config.json").is_file():
        return load_model("data/models/base")[0]
    return load_source(Params().base.source)[0]


def random_model(shape: dict, device: torch.device):
    """A random-weight LlamaForCausalLM of `shape`, built directly on `device` in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=4096, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config)


def autocast(device: torch.device):
    """bf16 autocast on CUDA, as the training loop's accelerator uses; full precision on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def masked_step(model, objective: ShearedObjective, optimizer, batch: torch.Tensor) -> float:
    """One step of the shared training loop with the sheared objective (one process, one micro-batch);
    returns the loss."""
    objective.begin_step(1)
    with autocast(batch.device):
        loss, _ = objective.loss(model, batch, 1)
    loss.backward()
    optimizers = (optimizer, objective.extra_optimizer())  # the weights', the masks' and multipliers'
    torch.nn.utils.clip_grad_norm_([p for o in optimizers for g in o.param_groups for p in g["params"]], GRAD_CLIP)
    for o in optimizers:
        o.step()
        o.zero_grad(set_to_none=True)
    return loss.item()


def plain_step(model, optimizer, batch: torch.Tensor) -> None:
    """The straightforward training step: LM loss, backward, clip, AdamW."""
    with autocast(batch.device):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall ms, process CPU ms) of fn(); on CUDA the wall time is between events on a drained queue.

    On a shared CPU the process CPU time is the steadier measure: other processes inflate the
    wall time of whichever step they happen to overlap.
    """
    cpu = time.process_time()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end), (time.process_time() - cpu) * 1000
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000, (time.process_time() - cpu) * 1000


def compare(model, device: torch.device, batch_size: int, seq_len: int, repeats: int, warmup: int) -> dict:
    """Time the masked and the plain step alternately on one model and one batch."""
    model.to(device).train()
    source = architecture(model.config)
    # A target of about half the non-embedding parameters, as a real run would use.
    half = count_parameters(model)["non_embedding"] // 2
    target = resolve_target(model.config, {"params": half}, 64)
    masks = L0Masks(source, target).to(device)
    batch = torch.randint(0, model.config.vocab_size, (batch_size, seq_len),
                          generator=torch.Generator().manual_seed(0)).to(device)
    plain_opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=BETAS, weight_decay=0.0)
    masked_opt = make_weights_optimizer(model, 1e-4)

    times = {"masked": [], "plain": []}
    for i in range(warmup + repeats):
        hooks = MaskHooks(model, masks)  # attached for the masked step only: the plain step runs hook-free
        objective = ShearedObjective(masks, hooks, None, lagrangian_warmup_steps=2, source_params=1.0, seed=i)
        masked = timed(lambda: masked_step(model, objective, masked_opt, batch), device)  # noqa: B023 (called at once)
        hooks.remove()
        plain = timed(lambda: plain_step(model, plain_opt, batch), device)
        if i >= warmup:
            times["masked"].append(masked)
            times["plain"].append(plain)
    masked_ms, plain_ms = (statistics.median(t[0] for t in times[k]) for k in ("masked", "plain"))
    masked_cpu, plain_cpu = (statistics.median(t[1] for t in times[k]) for k in ("masked", "plain"))
    return {
        "shape": {k: source[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                         "num_key_value_heads", "intermediate_size", "vocab_size")},
        "target": target,
        "batch_size": batch_size, "seq_len": seq_len, "repeats": repeats, "warmup": warmup,
        "masked_ms": masked_ms, "plain_ms": plain_ms, "ratio": masked_ms / plain_ms,
        "masked_cpu_ms": masked_cpu, "plain_cpu_ms": plain_cpu, "ratio_cpu_time": masked_cpu / plain_cpu,
        "masked_all_ms": [t[0] for t in times["masked"]], "plain_all_ms": [t[0] for t in times["plain"]],
        "load_average": list(os.getloadavg()),
        "machine": machine_info(device),
    }


def table(results: dict) -> str:
    """Markdown summary: one row per device."""
    lines = ["| device | model shape | batch x seq | with masks ms/step | without ms/step | ratio (wall) "
             "| ratio (process CPU time) |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        s = r["shape"]
        where = r["machine"].get("gpu") or r["machine"]["cpu"]
        lines.append(f"| {name} ({where}) | L{s['num_hidden_layers']} h{s['hidden_size']} "
                     f"H{s['num_attention_heads']}/{s['num_key_value_heads']} mlp{s['intermediate_size']} "
                     f"| {r['batch_size']} x {r['seq_len']} | {r['masked_ms']:.1f} | {r['plain_ms']:.1f} "
                     f"| {r['ratio']:.3f} | {r['ratio_cpu_time']:.3f} |")
    m = next(iter(results.values()))["machine"]
    loads = ", ".join(f"{name} {r['load_average'][0]:.1f}" for name, r in results.items())
    lines.append(f"\ntorch {m['torch']}, transformers {m['transformers']}, {m['torch_threads']} CPU threads, "
                 f"load average at the end ({loads}); median of the timed repeats; target ratio <= 1.3.\n")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-batch", type=int, default=1)
    parser.add_argument("--cpu-seq-len", type=int, default=128)
    parser.add_argument("--cuda-batch", type=int, default=4)
    parser.add_argument("--cuda-seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip-cpu", action="store_true", help="only the CUDA part")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    offline()

    results = {}
    if not args.skip_cpu:
        results["cpu"] = compare(default_model(), torch.device("cpu"), args.cpu_batch, args.cpu_seq_len,
                                 args.repeats, args.warmup)
        print(f"cpu: {results['cpu']['masked_ms']:.0f} ms with masks, {results['cpu']['plain_ms']:.0f} ms without "
              f"({results['cpu']['ratio']:.3f}x)")
    if torch.cuda.is_available():
        device = torch.device("cuda")
        results["cuda"] = compare(random_model(SHEARED_1_3B, device), device, args.cuda_batch, args.cuda_seq_len,
                                  args.repeats, args.warmup)
        print(f"cuda: {results['cuda']['masked_ms']:.1f} ms with masks, {results['cuda']['plain_ms']:.1f} ms "
              f"without ({results['cuda']['ratio']:.3f}x)")
    if not results:
        raise SystemExit("nothing to measure: --skip-cpu given and no CUDA device")
    write_json(args.out / "sheared_speed.json", results)
    with atomic_file(args.out / "sheared_speed.md") as f:
        f.write("# Sheared pruning: training step with masks vs without\n\n" + table(results))
    print(f"wrote {args.out / 'sheared_speed.json'} and sheared_speed.md")


if __name__ == "__main__":
    main()
