"""Prefill and decode speed, measured the way a deployment would run the model.

Plain `model.generate` is bound by Python and kernel-launch overhead (on an H100 a 7B
model decodes at ~30 ms/token at batch 1 and 32 alike, six times its weight-read floor),
so its figures say nothing about how much faster a pruned model is. Here:

- the KV cache is a transformers `StaticCache` (fixed shapes, updated in place);
- the decode step is `torch.compile`d; on CUDA with `mode="reduce-overhead"` (CUDA
  graphs), in bf16. The prompt (prefill) runs eagerly, as `generate` does;
- greedy decoding of a fixed number of tokens, no early stop at EOS;
- warm-up runs (compilation, graph capture) are outside the timing; CUDA events time the
  GPU; each figure is the median of `repeats` runs, with its spread (max - min) / median;
- the path ("compiled", "eager", "generate_static") is chosen by measurement at the
  smallest batch size and recorded, as are the numbers of every candidate;
- every figure carries its floor: decode = bytes read per step (weights + KV cache) over
  the measured memory bandwidth, prefill = FLOPs over the measured matmul rate (each the
  larger of its memory and compute bound), and the ratio of the measurement to it.

A note on CUDA graphs: `torch.compile(mode="reduce-overhead")` reuses its output buffers,
so a tensor returned by one step is overwritten by the next ("accessing tensor output of
CUDAGraphs that has been overwritten"). The loop below therefore keeps nothing from a
step but the argmax token (a fresh tensor made outside the graph), drops the step's output
before the next call, and marks each step with `torch.compiler.cudagraph_mark_step_begin()`.
The KV cache survives because it is an input mutated in place at a static address
(`StaticCache` marks it), not an output.
"""
from __future__ import annotations

import functools
import inspect
import os
import platform
import resource
import statistics
import time

import torch

from shear.errors import ShearError
from shear.models import count_parameters, head_dim

# Untimed runs first: compiled paths compile in the first run (and capture CUDA graphs in the
# second); eager paths only need caches and allocator warmed.
WARMUP_COMPILED, WARMUP_EAGER = 2, 1


# ----------------------------------------------------------------------------- machine


def machine_info(device: torch.device | str = "cpu") -> dict:
    """CPU model, GPU name, core count and library versions, recorded next to every result."""
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),  # CPU figures taken beside other work read slower
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


class Clock:
    """Time marks: CUDA events on CUDA (no sync per mark), `perf_counter` on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (waits for the GPU on CUDA)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_ms(fn, device: torch.device, runs: int) -> float:
    """Fastest of `runs` timed calls of `fn` after one untimed call, in ms."""
    fn()
    times = []
    for _ in range(runs):
        _sync(device)
        clock = Clock(device)
        clock.mark()
        fn()
        clock.mark()
        times.append(clock.intervals_ms()[0])
    return min(times)


@functools.cache
def memory_bandwidth(device: torch.device) -> float:
    """Measured memory bandwidth in bytes/s: best of several large tensor copies.

    A copy reads and writes every byte, so bandwidth = 2 * bytes / time. The buffer
    (1 GiB on CUDA, 256 MiB on CPU) is far larger than any cache. Cached per process.
    """
    nbytes = 2**30 if device.type == "cuda" else 2**28
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _best_ms(lambda: dst.copy_(src), device, runs=10 if device.type == "cuda" else 5)
    return 2 * nbytes / (ms / 1e3)


@functools.cache
def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul rate in FLOP/s: best of several square matmuls in `dtype`."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = _best_ms(lambda: a @ b, device, runs=10 if device.type == "cuda" else 3)
    return 2 * n**3 / (ms / 1e3)


# ----------------------------------------------------------------------------- floors


def floors(config, non_embedding: int, batch: int, prompt_len: int, new_tokens: int,
           dtype_bytes: int, bandwidth: float, flops_rate: float) -> dict:
    """Lower bounds on prefill time and on decode time per step, in ms.

    Decode (one token per sequence, attending over the mean context of the timed steps,
    prompt_len + new_tokens / 2): reads every weight once (the non-embedding weights and
    the vocab x hidden output matrix; the input embedding reads only `batch` rows) and the
    keys and values of that context, and does 2 FLOPs per weight per token plus attention.
    Prefill (batch x prompt_len tokens, causal, logits for the last position only): 2 FLOPs
    per non-embedding weight per token, the output matrix for one token per sequence, and
    causal attention (QK^T and AV, 2 * P^2 * head_dim FLOPs per head). Each floor is the
    larger of bytes / bandwidth and FLOPs / matmul rate.
    """
    layers, heads, kv_heads = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    d = head_dim(config)
    out_matrix = config.vocab_size * config.hidden_size
    weights = non_embedding + out_matrix
    context = prompt_len + new_tokens / 2
    decode_bytes = weights * dtype_bytes + 2 * layers * kv_heads * d * batch * context * dtype_bytes
    decode_flops = 2 * weights * batch + 4 * layers * heads * d * batch * context
    prefill_flops = (2 * non_embedding * batch * prompt_len + 2 * out_matrix * batch
                     + 2 * layers * heads * d * batch * prompt_len**2)
    prefill_bytes = weights * dtype_bytes + 2 * layers * kv_heads * d * batch * prompt_len * dtype_bytes
    return {
        "decode_floor_ms": 1e3 * max(decode_bytes / bandwidth, decode_flops / flops_rate),
        "prefill_floor_ms": 1e3 * max(prefill_flops / flops_rate, prefill_bytes / bandwidth),
        "decode_bytes": decode_bytes,
        "decode_flops": decode_flops,
        "prefill_flops": prefill_flops,
    }


def kv_cache_bytes(config, batch: int, length: int, dtype_bytes: int) -> int:
    """Bytes of a static KV cache holding `length` positions for `batch` sequences."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config) * batch * length * dtype_bytes


def ideal_speedup(dense_non_embedding: int, pruned_non_embedding: int) -> float:
    """The speed-up a memory-bound decoder would get: dense / pruned non-embedding parameters."""
    return dense_non_embedding / pruned_non_embedding


# ----------------------------------------------------------------------------- the decode path


def _takes_cache_position(model) -> bool:
    """transformers <= 5.17 takes `cache_position`; later versions track it inside the cache."""
    return "cache_position" in inspect.signature(model.model.forward).parameters


def greedy_decode(model, prompt: torch.Tensor, new_tokens: int, cache, step=None, clock: Clock | None = None):
    """Greedy tokens [batch, new_tokens] for `prompt` [batch, P] using a `StaticCache`.

    The prompt runs through the eager model (as `generate` does: its shape differs from a
    decode step's); each further token through `step` (the model itself, or a compiled
    call of it). `clock`, if given, is marked before the prompt, after the first token and
    after the last one. Exactly `new_tokens` tokens: EOS does not stop it.
    """
    step = step or model
    batch, plen = prompt.shape
    device = prompt.device
    extra = _takes_cache_position(model)
    compiled_cuda = step is not model and device.type == "cuda"
    # Inputs of every step made in advance: same shapes and strides each step, no work in the timed loop.
    positions = [torch.full((batch, 1), plen + i, dtype=torch.long, device=device) for i in range(new_tokens - 1)]
    cache_positions = [p[0] for p in positions]
    cache.reset()
    if clock:
        clock.mark()
    kwargs = {"cache_position": torch.arange(plen, device=device)} if extra else {}
    out = model(input_ids=prompt, position_ids=torch.arange(plen, device=device).expand(batch, plen),
                past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    del out
    tokens = [token]
    if clock:
        clock.mark()
    for i in range(new_tokens - 1):
        if compiled_cuda:
            torch.compiler.cudagraph_mark_step_begin()
        kwargs = {"cache_position": cache_positions[i]} if extra else {}
        out = step(input_ids=token, position_ids=positions[i], past_key_values=cache, use_cache=True, **kwargs)
        # argmax makes a new tensor outside the graph; `out` (graph-owned) is dropped before the next step.
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        del out
        tokens.append(token)
    if clock:
        clock.mark()
    return torch.cat(tokens, dim=1)


def compile_step(model, device: torch.device):
    """The model's call compiled for decode: static shapes; CUDA graphs on CUDA."""
    torch._dynamo.reset()  # forget graphs of earlier models (and free their CUDA graph memory)
    # one graph per batch size and model; the default limit (8) would silently fall back to eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(model.__call__, mode=mode, dynamic=False)


def _prompt(config, batch: int, prompt_len: int, device: torch.device) -> torch.Tensor:
    """Seeded random token ids (speed does not depend on which tokens)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, config.vocab_size, (batch, prompt_len), generator=g).to(device)


def _time_loop(model, step, batch, prompt_len, new_tokens, repeats, device):
    """Per-repeat (prefill ms, decode ms/token) of `greedy_decode`, after warm-up runs."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens)
    prompt = _prompt(model.config, batch, prompt_len, device)
    warmup = WARMUP_EAGER if step is None else WARMUP_COMPILED
    runs = []
    for r in range(warmup + repeats):
        _sync(device)
        clock = Clock(device)
        greedy_decode(model, prompt, new_tokens, cache, step=step, clock=clock)
        prefill, decode = clock.intervals_ms()
        if r >= warmup:
            runs.append((prefill, decode / (new_tokens - 1)))
    return runs


class _TokenTimes:
    """A `generate` streamer that notes when the prompt and each new token reach the host.

    generate hands the prompt to `put` before the prefill and each token after its step,
    copied to the CPU (which waits for the device), so the gaps are what a user sees.
    """

    def __init__(self):
        self.times = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _time_generate(model, batch, prompt_len, new_tokens, repeats, device, static: bool):
    """Per-repeat (prefill ms, decode ms/token) of greedy `model.generate`, timed by a streamer.

    `static=True` passes a `StaticCache`, with which generate compiles its decode step on
    CUDA; `static=False` is the plain call (dynamic cache, eager), the straightforward way.
    """
    from transformers import StaticCache

    prompt = _prompt(model.config, batch, prompt_len, device)
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens) if static else None
    pad = model.generation_config.pad_token_id
    warmup = WARMUP_COMPILED if static else WARMUP_EAGER
    runs = []
    for r in range(warmup + repeats):
        if cache is not None:
            cache.reset()
        times = _TokenTimes()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad if pad is not None else 0,
                       past_key_values=cache, streamer=times)
        t = times.times  # prompt, then one mark per new token
        if r >= warmup:
            runs.append(((t[1] - t[0]) * 1e3, (t[-1] - t[1]) * 1e3 / (new_tokens - 1)))
    return runs


def _summary(runs: list[tuple[float, float]]) -> dict:
    """Medians and spreads of (prefill ms, decode ms/token) over repeats."""
    prefill = [r[0] for r in runs]
    decode = [r[1] for r in runs]

    def spread(xs):
        return (max(xs) - min(xs)) / statistics.median(xs)

    return {
        "prefill_ms": statistics.median(prefill),
        "prefill_spread": spread(prefill),
        "decode_ms_per_token": statistics.median(decode),
        "decode_spread": spread(decode),
    }


def _measure(model, path, batch, prompt_len, new_tokens, repeats, device, step_cache):
    """One batch size on one path: summary dict (raises whatever compilation raises)."""
    if path == "eager":
        runs = _time_loop(model, None, batch, prompt_len, new_tokens, repeats, device)
    elif path == "compiled":
        if "compiled" not in step_cache:
            step_cache["compiled"] = compile_step(model, device)
        runs = _time_loop(model, step_cache["compiled"], batch, prompt_len, new_tokens, repeats, device)
    else:  # "generate_static" or "generate"
        runs = _time_generate(model, batch, prompt_len, new_tokens, repeats, device, static=path == "generate_static")
    return _summary(runs)


# The decode paths: our loop (static cache) eager or compiled; generate with a static cache
# (which compiles its step on CUDA); plain generate (the baseline, not a candidate by default).
PATHS = ("compiled", "generate_static", "eager", "generate")


def default_paths(device: torch.device) -> list[str]:
    """Candidates tried by default: on CUDA the compiled paths first; on CPU eager only.

    On CPU, compiling costs minutes per model and shape while the compiled decode step was
    only ~13% faster than eager (bench/results/decode_speed_cpu.md), so the pipeline
    measures eager; `bench.decode_speed --paths eager compiled` measures both.
    """
    if device.type == "cuda":
        return ["compiled", "generate_static", "eager"]
    return ["eager"]


def measure_speed(model, device, batch_sizes: list[int], prompt_len: int, new_tokens: int, repeats: int,
                  *, paths: list[str] | None = None, baseline: bool = False) -> dict:
    """Prefill and decode speed of `model` per batch size, with floors; for metrics.json `speed`.

    Moves the model to `device` in place, in bf16 on CUDA and float32 on CPU. Each
    candidate path (`default_paths` unless given) is measured at the smallest batch size;
    the fastest decode wins and measures the other batch sizes. `baseline=True` also
    times plain `model.generate` (the straightforward way) and records the ratio.
    Peak memory: CUDA `max_memory_allocated` per batch size; on CPU the bytes of the
    weights plus the static KV cache (the process RSS high-water mark is recorded beside
    it, but it spans the whole process).
    """
    device = torch.device(device)
    if new_tokens < 2:
        raise ShearError(f"evaluate.speed.new_tokens={new_tokens} must be >= 2 (decode speed needs a step after the prompt)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype_bytes = torch.finfo(dtype).bits // 8
    model.to(device=device, dtype=dtype).eval()
    config = model.config
    non_embedding = count_parameters(model)["non_embedding"]
    bandwidth = memory_bandwidth(device)
    flops_rate = matmul_rate(device, dtype)
    sizes = sorted(set(batch_sizes))
    paths = list(paths or default_paths(device))
    if set(paths) - set(PATHS):
        raise ShearError(f"speed paths {paths} are not valid; choose from {', '.join(PATHS)}")
    step_cache: dict = {}
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())

    def one(path, batch):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row = _measure(model, path, batch, prompt_len, new_tokens, repeats, device, step_cache)
        fl = floors(config, non_embedding, batch, prompt_len, new_tokens, dtype_bytes, bandwidth, flops_rate)
        row.update(
            tokens_per_s=batch * 1e3 / row["decode_ms_per_token"],
            decode_floor_ms=fl["decode_floor_ms"],
            decode_ratio_to_floor=row["decode_ms_per_token"] / fl["decode_floor_ms"],
            prefill_floor_ms=fl["prefill_floor_ms"],
            prefill_ratio_to_floor=row["prefill_ms"] / fl["prefill_floor_ms"],
            kv_cache_bytes=kv_cache_bytes(config, batch, prompt_len + new_tokens, dtype_bytes),
        )
        if device.type == "cuda":
            row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        else:
            row["peak_memory_bytes"] = weight_bytes + row["kv_cache_bytes"]
        return row

    def attempt(path, batch, errors):
        """`one(path, batch)`, or None with the error noted: a compiled path may fail on some
        machine (no C++ compiler, an op it cannot capture) while the others still run."""
        try:
            return one(path, batch)
        except Exception as e:  # noqa: BLE001 - compilers raise many types; all are recorded
            first_line = (str(e).strip().splitlines() or [""])[0][:300]
            errors[f"{path}_bs{batch}"] = f"{type(e).__name__}: {first_line}"
            return None

    candidates, errors = {}, {}
    with torch.inference_mode():
        for path in paths:
            row = attempt(path, sizes[0], errors)
            if row is not None:
                candidates[path] = row
        if not candidates:
            raise ShearError(f"speed: every decode path failed on {device}: {errors}")
        ranked = sorted(candidates, key=lambda p: candidates[p]["decode_ms_per_token"])
        chosen = ranked[0]
        batch_rows = {f"bs{sizes[0]}": dict(candidates[chosen], path=chosen)}
        for batch in sizes[1:]:  # the chosen path, or the next fastest if it fails at this size
            for path in ranked:
                row = attempt(path, batch, errors)
                if row is not None:
                    batch_rows[f"bs{batch}"] = dict(row, path=path)
                    break
            else:
                raise ShearError(f"speed: every decode path failed on {device} at batch size {batch}: {errors}")
        result = {
            "path": chosen,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "non_embedding_params": non_embedding,
            "weight_bytes": weight_bytes,
            "bandwidth_gb_s": bandwidth / 1e9,
            "matmul_tflops": flops_rate / 1e12,
            "peak_memory_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "weights_plus_kv_cache",
            "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            # each candidate's figures at the smallest batch size; failures are in `errors`
            "candidates": {p: {"decode_ms_per_token": row["decode_ms_per_token"], "prefill_ms": row["prefill_ms"]}
                           for p, row in candidates.items()},
            "errors": errors,
            "batch": batch_rows,
        }
        if baseline:
            result["baseline"] = {}
            for batch in sizes:
                base = _measure(model, "generate", batch, prompt_len, new_tokens, repeats, device, step_cache)
                result["baseline"][f"bs{batch}"] = base
                row = batch_rows[f"bs{batch}"]
                row["speedup_over_generate"] = base["decode_ms_per_token"] / row["decode_ms_per_token"]
    if {"compiled", "generate_static"} & set(paths):
        torch._dynamo.reset()  # free this model's compiled graphs (and CUDA graph pools)
    return result


def speedup(speed: dict, base_speed: dict) -> dict:
    """Speed-ups of `speed` over `base_speed` (both from `measure_speed`, same run), for metrics.json.

    Per batch size: decode (base ms/token over this ms/token), prefill, and decode over the
    ideal (dense non-embedding parameters / this model's).
    """
    ideal = ideal_speedup(base_speed["non_embedding_params"], speed["non_embedding_params"])
    out = {"ideal": ideal}
    for key, row in speed["batch"].items():
        base = base_speed["batch"].get(key)
        if base is None:
            continue
        decode = base["decode_ms_per_token"] / row["decode_ms_per_token"]
        out[key] = {
            "decode": decode,
            "prefill": base["prefill_ms"] / row["prefill_ms"],
            "decode_vs_ideal": decode / ideal,
        }
    return out
