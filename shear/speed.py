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
from shear.records import batch_key, batch_rows

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
    """The model's call compiled for decode: static shapes; CUDA graphs on CUDA.

    Graphs of other models compiled before stay (several models are timed in turn); the
    callers reset dynamo before and after a measurement."""
    # one graph per batch size and model; the default limit (8) would silently fall back to eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(model.__call__, mode=mode, dynamic=False)


def _prompt(config, batch: int, prompt_len: int, device: torch.device) -> torch.Tensor:
    """Seeded random token ids (speed does not depend on which tokens)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, config.vocab_size, (batch, prompt_len), generator=g).to(device)


def _loop_runner(model, step, batch, prompt_len, new_tokens, device):
    """A callable timing one `greedy_decode` run: (prefill ms, decode ms/token)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens)
    prompt = _prompt(model.config, batch, prompt_len, device)

    def run() -> tuple[float, float]:
        _sync(device)
        clock = Clock(device)
        greedy_decode(model, prompt, new_tokens, cache, step=step, clock=clock)
        prefill, decode = clock.intervals_ms()
        return prefill, decode / (new_tokens - 1)

    return run


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


def _generate_runner(model, batch, prompt_len, new_tokens, device, static: bool):
    """A callable timing one greedy `model.generate` (by a streamer): (prefill ms, decode ms/token).

    `static=True` passes a `StaticCache`, with which generate compiles its decode step on
    CUDA; `static=False` is the plain call (dynamic cache, eager), the straightforward way.
    """
    from transformers import StaticCache

    prompt = _prompt(model.config, batch, prompt_len, device)
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens) if static else None
    pad = model.generation_config.pad_token_id

    def run() -> tuple[float, float]:
        if cache is not None:
            cache.reset()
        times = _TokenTimes()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad if pad is not None else 0,
                       past_key_values=cache, streamer=times)
        t = times.times  # prompt, then one mark per new token
        return (t[1] - t[0]) * 1e3, (t[-1] - t[1]) * 1e3 / (new_tokens - 1)

    return run


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


def _runner(model, path, batch, prompt_len, new_tokens, device, step_cache):
    """(callable timing one run, number of untimed warm-up runs it needs) for one path and batch size."""
    if path == "eager":
        return _loop_runner(model, None, batch, prompt_len, new_tokens, device), WARMUP_EAGER
    if path == "compiled":
        if "compiled" not in step_cache:
            step_cache["compiled"] = compile_step(model, device)
        return _loop_runner(model, step_cache["compiled"], batch, prompt_len, new_tokens, device), WARMUP_COMPILED
    static = path == "generate_static"  # else plain "generate"
    return (_generate_runner(model, batch, prompt_len, new_tokens, device, static),
            WARMUP_COMPILED if static else WARMUP_EAGER)


def _measure(model, path, batch, prompt_len, new_tokens, repeats, device, step_cache):
    """One batch size on one path: summary dict (raises whatever compilation raises)."""
    run, warmup = _runner(model, path, batch, prompt_len, new_tokens, device, step_cache)
    for _ in range(warmup):
        run()
    return _summary([run() for _ in range(repeats)])


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


def _check_paths(paths: list[str]) -> None:
    if set(paths) - set(PATHS):
        raise ShearError(f"speed paths {paths} are not valid; choose from {', '.join(PATHS)}")


class _Subject:
    """One model under measurement: moved to the device and dtype once, with the facts its floors need."""

    def __init__(self, model, device: torch.device, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.non_embedding = count_parameters(model)["non_embedding"]
        unique = {id(p): p for p in model.parameters()}.values()  # tied weights once
        self.weight_bytes = sum(p.numel() * p.element_size() for p in unique)
        self.step_cache: dict = {}  # its compiled decode step, made on first use


class _Machine:
    """The device's measured bandwidth and matmul rate, and the dtype models run in there."""

    def __init__(self, device: torch.device):
        self.device = device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.dtype_bytes = torch.finfo(self.dtype).bits // 8
        self.bandwidth = memory_bandwidth(device)
        self.flops_rate = matmul_rate(device, self.dtype)

    def row(self, subject: _Subject, summary: dict, batch: int, prompt_len: int, new_tokens: int,
            transient_bytes: int) -> dict:
        """A timing summary with tokens/s, floors, their ratios and the memory it needed.

        Peak memory = the weights + the static KV cache + (on CUDA) the most the run
        allocated on top of what was already allocated; on CPU the transient part is not
        measured (the process RSS high-water mark spans every model of the process).
        """
        config = subject.model.config
        fl = floors(config, subject.non_embedding, batch, prompt_len, new_tokens, self.dtype_bytes,
                    self.bandwidth, self.flops_rate)
        kv = kv_cache_bytes(config, batch, prompt_len + new_tokens, self.dtype_bytes)
        return dict(
            summary,
            tokens_per_s=batch * 1e3 / summary["decode_ms_per_token"],
            decode_floor_ms=fl["decode_floor_ms"],
            decode_ratio_to_floor=summary["decode_ms_per_token"] / fl["decode_floor_ms"],
            prefill_floor_ms=fl["prefill_floor_ms"],
            prefill_ratio_to_floor=summary["prefill_ms"] / fl["prefill_floor_ms"],
            kv_cache_bytes=kv,
            peak_memory_bytes=subject.weight_bytes + kv + transient_bytes,
        )


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def _timed_run(run, device: torch.device) -> tuple[tuple[float, float], int]:
    """One timed run and the bytes it allocated on top of what was allocated before it (CUDA; 0 on CPU)."""
    if device.type != "cuda":
        return run(), 0
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = run()
    return result, torch.cuda.max_memory_allocated(device) - before


def _interleaved(subjects: dict[str, _Subject], path_of: dict[str, list[str]], batch: int, prompt_len: int,
                 new_tokens: int, repeats: int, device: torch.device, errors: dict) -> dict[str, tuple]:
    """Time every model at one batch size, their runs interleaved: {name: (path, summary, transient bytes)}.

    Each model gets its runner (its first path that builds and survives warm-up; failures
    are noted in `errors`), then repeat r runs every model once, starting from model r mod n,
    so a change of machine load during the measurement slows every model alike and no model
    always runs right after the same neighbour.
    """
    runners = {}
    for name, subject in subjects.items():
        for path in path_of[name]:
            try:
                run, warmup = _runner(subject.model, path, batch, prompt_len, new_tokens, device, subject.step_cache)
                for _ in range(warmup):
                    run()
            except Exception as e:  # noqa: BLE001 - compilers raise many types; all are recorded
                errors.setdefault(name, {})[f"{path}_bs{batch}"] = _first_line(e)
                continue
            runners[name] = (path, run)
            break
        else:
            raise ShearError(f"speed: every decode path failed for {name} on {device} at batch size {batch}: "
                             f"{errors.get(name)}")
    names = list(runners)
    runs = {name: [] for name in names}
    transient = {name: 0 for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            timing, extra = _timed_run(runners[name][1], device)
            runs[name].append(timing)
            transient[name] = max(transient[name], extra)
    return {name: (runners[name][0], _summary(runs[name]), transient[name]) for name in names}


def compare_speed(models: dict, device, batch_sizes: list[int], prompt_len: int, new_tokens: int, repeats: int,
                  *, paths: list[str] | None = None) -> dict:
    """Prefill and decode speed of several models, measured in one process with their runs interleaved.

    The first model is the reference (the base model). The decode path is chosen once, on
    it: each candidate (`default_paths` unless given) is timed at the smallest batch size
    and the fastest is used for every model and batch size (a model on which it fails uses
    the next fastest, recorded in its rows' `path` and in `errors`). Then, per batch size,
    the models' timed runs alternate (see `_interleaved`), so the ratios between them do
    not depend on when each model happened to run. Moves every model to `device` in place,
    in bf16 on CUDA and float32 on CPU.

    Returns {"models": {name: speed section}, "speedup": {name: `speedup` over the
    reference} for every other model}; a speed section has the schema `measure_speed` gives.
    """
    device = torch.device(device)
    if new_tokens < 2:
        raise ShearError(f"evaluate.speed.new_tokens={new_tokens} must be >= 2 "
                         "(decode speed needs a step after the prompt)")
    if not models:
        raise ShearError("speed: no model to measure")
    paths = list(paths or default_paths(device))
    _check_paths(paths)
    machine = _Machine(device)
    subjects = {name: _Subject(m, device, machine.dtype) for name, m in models.items()}
    sizes = sorted(set(batch_sizes))
    reference = next(iter(subjects))
    torch._dynamo.reset()  # no graphs of models measured earlier in this process
    errors: dict[str, dict] = {}
    rows: dict[str, dict] = {name: {} for name in subjects}
    with torch.inference_mode():
        candidates = {}
        for path in paths if len(paths) > 1 else []:  # choose the path on the reference (figures kept apart)
            try:
                candidates[path] = _measure(subjects[reference].model, path, sizes[0], prompt_len, new_tokens,
                                            repeats, device, subjects[reference].step_cache)
            except Exception as e:  # noqa: BLE001 - recorded, the other paths still run
                errors.setdefault(reference, {})[f"{path}_bs{sizes[0]}"] = _first_line(e)
        if len(paths) > 1 and not candidates:
            raise ShearError(f"speed: every decode path failed on {device}: {errors[reference]}")
        ranked = sorted(candidates, key=lambda p: candidates[p]["decode_ms_per_token"]) or paths
        path_of = {name: ranked for name in subjects}
        for batch in sizes:
            for name, (path, summary, transient) in _interleaved(subjects, path_of, batch, prompt_len, new_tokens,
                                                                 repeats, device, errors).items():
                row = machine.row(subjects[name], summary, batch, prompt_len, new_tokens, transient)
                rows[name][batch_key(batch)] = dict(row, path=path)
    if {"compiled", "generate_static"} & set(paths):
        torch._dynamo.reset()  # free the compiled graphs (and CUDA graph pools)
    sections = {}
    for name, subject in subjects.items():
        sections[name] = {
            "path": ranked[0],
            "device": str(device),
            "dtype": str(machine.dtype).removeprefix("torch."),
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "non_embedding_params": subject.non_embedding,
            "weight_bytes": subject.weight_bytes,
            "bandwidth_gb_s": machine.bandwidth / 1e9,
            "matmul_tflops": machine.flops_rate / 1e12,
            "peak_memory_kind": ("weights_plus_kv_cache_plus_cuda_transient" if device.type == "cuda"
                                 else "weights_plus_kv_cache"),
            "errors": errors.get(name, {}),
            "batch": rows[name],
        }
    # what chose the path: each candidate's figures on the reference at the smallest batch size
    sections[reference]["candidates"] = {p: {"decode_ms_per_token": c["decode_ms_per_token"],
                                             "prefill_ms": c["prefill_ms"]} for p, c in candidates.items()}
    return {"models": sections,
            "speedup": {name: speedup(sections[name], sections[reference]) for name in sections if name != reference}}


def measure_speed(model, device, batch_sizes: list[int], prompt_len: int, new_tokens: int, repeats: int,
                  *, paths: list[str] | None = None, baseline: bool = False) -> dict:
    """Prefill and decode speed of one model per batch size, with floors (`compare_speed` of it alone).

    `baseline=True` also times plain `model.generate` (the straightforward way) at every
    batch size and records the ratio (`speedup_over_generate`).
    """
    device = torch.device(device)
    result = compare_speed({"model": model}, device, batch_sizes, prompt_len, new_tokens, repeats,
                           paths=paths)["models"]["model"]
    result["process_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if baseline:
        result["baseline"] = {}
        with torch.inference_mode():
            for batch, row in batch_rows(result).items():
                base = _measure(model, "generate", batch, prompt_len, new_tokens, repeats, device, {})
                result["baseline"][batch_key(batch)] = base
                row["speedup_over_generate"] = base["decode_ms_per_token"] / row["decode_ms_per_token"]
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
