"""Memory plan: will each stage fit, before any work, from the model's config alone.

    python -m shear.plan [--params params.yaml] [--device-gb 80] [--config path/config.json]

For every heavy stage it prints the peak memory of one device (weights, gradients,
optimizer state, activations at the configured micro-batch, KV cache, calibration
states, the process's own runtime), the checkpoint's size on disk, and the number of
processes and the micro-batch that make it fit on a device of the given size (default:
the visible GPU, else host RAM). The parameter counts come from the architecture built on
the meta device (no weights are read). Stages call `check_stage` (the speed stage, which holds
base, pruned and retrained at once, `check_speed`) first and stop with one line naming what
to change when their plan does not fit.

What is counted (bytes; w = the weights' dtype size, 4 for float32, 2 for bf16):
  weights      every parameter once (tied embeddings once), w each
  gradients    4 per trained parameter (training keeps float32 master weights and
               gradients, see shear.models.resolve_dtype)
  optimizer    AdamW's two float32 moments: 8 per trained parameter
  activations  in the run dtype (bf16 weights compute in bf16; training runs under bf16
               autocast exactly when the run dtype is bf16);
               training: what autograd saves per token per block (`saved_per_token`) plus
               the logits (float32 logits, log-probabilities and their gradient);
               inference: the largest transient of one forward pass (`forward_transient`)
  calibration  scoring: the hidden states kept between blocks
  kv_cache     the speed measurement's static cache at its largest batch
  runtime      the process itself: interpreter, torch and transformers, allocator slack
               (CPU: measured RSS after imports; CUDA: context and workspaces)
Sharding (FSDP full shard over N processes) divides weights, gradients and optimizer by N
and adds two gathered blocks (the running one and the prefetched one).
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from shear.errors import ShearError
from shear.nll import LOGITS_CHUNK
from shear.speed import kv_cache_bytes

GiB = 2**30
# CPU: RSS of a stage process after importing torch, transformers and shear (0.37 GiB measured, see
# bench/results/memory_plan.md) plus allocator slack; CUDA: context, cuBLAS/cuDNN workspaces
RUNTIME_BYTES = {"cpu": int(0.4 * GiB), "cuda": 1 * GiB}
PROCESS_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class ModelShape:
    """Architecture facts and parameter counts of a LLaMA-layout model."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    block_params: int       # one transformer block
    embedding_params: int   # input embeddings (the LM head too when tied)
    head_params: int        # untied LM head, else 0
    norm_params: int        # final norm

    @property
    def total(self) -> int:
        return self.layers * self.block_params + self.embedding_params + self.head_params + self.norm_params


def model_shape(config) -> ModelShape:
    """Counts from the architecture instantiated on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    from shear.models import head_dim

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    head = model.get_output_embeddings()
    tied = head.weight is model.get_input_embeddings().weight
    return ModelShape(
        layers=config.num_hidden_layers, hidden=config.hidden_size, heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads, head_dim=head_dim(config), intermediate=config.intermediate_size,
        vocab=config.vocab_size, tied=tied, block_params=count(model.model.layers[0]),
        embedding_params=count(model.model.embed_tokens), head_params=0 if tied else count(head),
        norm_params=count(model.model.norm))


def saved_per_token(s: ModelShape, act_bytes: int) -> int:
    """Bytes autograd keeps per token per block for the backward pass.

    Inputs of q/k/v and of gate/up (d each), rotated q and k, attention's q, expanded k and
    v and output (4 q-widths under GQA, as SDPA sees them), o_proj's input, gate, up,
    act(gate) and their product (4 I): in the activation dtype; each RMSNorm keeps its
    input and normalised output in float32 (2 x 2 x d x 4).
    """
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return act_bytes * (2 * s.hidden + q + kv + 4 * q + q + 4 * s.intermediate) + 16 * s.hidden


def forward_transient(s: ModelShape, tokens: int, batch: int, seq: int, w: int, logits_positions: int) -> int:
    """The largest live temporaries of one no-grad forward: one block's (residual, normed,
    q/k/v, attention scores, MLP gate/up/product) and the logits with their float32 copy
    and log-probabilities."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    block = tokens * w * (3 * s.hidden + q + 2 * kv + 3 * s.intermediate) + batch * s.heads * seq * seq * w
    logits = logits_positions * s.vocab * (w + 4 + 4)
    return max(block, logits) + tokens * s.hidden * w


@dataclass
class Memory:
    """Peak bytes on one device, by kind."""

    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    calibration: int = 0
    kv_cache: int = 0
    runtime: int = 0

    @property
    def total(self) -> int:
        return sum(asdict(self).values())


@dataclass
class StagePlan:
    """One stage: memory per device at the settings given, disk, and what it would need to fit."""

    stage: str
    memory: Memory
    processes: int = 1
    micro_batch: int = 0          # training / scoring batch per device
    activation_checkpointing: bool = False  # needed to fit at that micro-batch
    fitted_bytes: int = 0         # per device at processes x micro-batch (training stages)
    checkpoint_bytes: int = 0     # one training checkpoint on disk
    layerwise: bool = False       # scoring one block at a time
    sharded: bool = False         # training: FSDP over `num_processes` (else DDP / one process)
    notes: list[str] = field(default_factory=list)

    def fits(self, device_bytes: int) -> bool:
        return self.memory.total <= device_bytes


def _train_memory(s: ModelShape, trained: int, frozen_bytes: int, micro_batch: int, seq: int, act_bytes: int,
                  shards: int, checkpointing: bool, runtime: int, extra: int = 0, foreach_adam: bool = False,
                  logits_copies: int = 3, grads_persist: bool = False, first_grads: int = 0) -> Memory:
    """A training step: float32 master weights, gradients and AdamW moments for `trained`
    parameters, sharded over `shards` processes (FSDP: plus two gathered blocks; 1 = DDP or
    one process), `frozen_bytes` of weights that are only read, activations of one micro-batch.

    Under bf16 autocast without sharding the forward's bf16 copies of the trained weights
    live until the backward ends (2 bytes each). `logits_copies`: float32 [tokens, vocab]
    tensors alive at the loss's backward (logits, log-probabilities, their gradient; a loss
    on a shifted slice adds the slice's copy and its gradient).

    The peak is the larger of two moments. At the start of the backward every activation is
    alive but, unless they persist (`grads_persist`: grad_accum > 1 accumulates into them,
    DDP keeps them in its buckets), only the gradients the backward makes before it frees a
    block's activations: `first_grads` parameters (the LM head's, or the tied embedding's);
    each block then frees more activations than its gradients take. At the optimizer step
    the activations are gone and every gradient is there, with foreach AdamW's float32
    temporary per parameter (the default on CUDA unless fused).
    """
    gathered = 2 * s.block_params * 4 if shards > 1 else 0
    autocast_copies = trained * 2 if act_bytes == 2 and shards == 1 else 0
    tokens = micro_batch * seq
    per_block = tokens * (act_bytes * s.hidden if checkpointing else saved_per_token(s, act_bytes))
    # with checkpointing one block's full activations exist again during its recomputation
    blocks = s.layers * per_block + (tokens * saved_per_token(s, act_bytes) if checkpointing else 0)
    logits = tokens * s.vocab * (4 * logits_copies + (act_bytes if act_bytes != 4 else 0))
    grads = math.ceil(trained * 4 / shards)
    at_backward = (grads if grads_persist else math.ceil(first_grads * 4 / shards), blocks + logits + extra)
    at_step = (grads, math.ceil(trained * 4 / shards) if foreach_adam else 0)
    gradients, activations = max(at_backward, at_step, key=sum)
    return Memory(weights=math.ceil(trained * 4 / shards) + gathered + autocast_copies + frozen_bytes,
                  gradients=gradients, optimizer=math.ceil(trained * 8 / shards), activations=activations,
                  runtime=runtime)


def _linear_dims(s: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of a block."""
    q, kv, d, i = s.heads * s.head_dim, s.kv_heads * s.head_dim, s.hidden, s.intermediate
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}


def _lora_params(s: ModelShape, r: int, targets: list[str]) -> int:
    dims = _linear_dims(s)
    return s.layers * sum(r * sum(dims[t]) for t in targets if t in dims)


def _lora_dropout_saved(s: ModelShape, targets: list[str], act_bytes: int) -> int:
    """Bytes per token peft's LoRA dropout keeps for backward: each adapted layer's own dropped-out
    copy of its input and the dropout mask (1 byte)."""
    dims = _linear_dims(s)
    return s.layers * (act_bytes + 1) * sum(dims[t][0] for t in targets if t in dims)


def fsdp_chosen(sharding: str, num_processes: int, fits_one_device: bool) -> bool:
    """Whether a run on `num_processes` shards its model (FSDP) instead of copying it to every
    process (DDP): `sharding` fsdp forces it, ddp forbids it, auto takes it when one device cannot
    hold the unsharded run. One process never shards."""
    return num_processes > 1 and (sharding == "fsdp" or (sharding == "auto" and not fits_one_device))


def _fit_training(make, batch: int, device_bytes: int, max_processes: int) -> tuple[int, int, bool]:
    """(processes, micro-batch, activation checkpointing): the fewest processes, then without
    checkpointing if possible, then the largest micro-batch <= batch, that fit one device."""
    for n in (p for p in PROCESS_COUNTS if p <= max_processes):
        for checkpointing in (False, True):
            for mb in range(batch, 0, -1):
                if make(n, mb, checkpointing).total <= device_bytes:
                    return n, mb, checkpointing
    return 0, 0, False


def plan_stages(params, config, dtype: torch.dtype, device_type: str, device_bytes: int,
                max_processes: int = 128) -> dict[str, StagePlan]:
    """The plan of score, prune (sheared), retrain, evaluate and speed for `config` at `params`.

    `dtype` is the resolved run dtype (shear.models.resolve_dtype); `device_bytes` the memory
    of one device, for the processes / micro-batch that would fit.
    """
    s = model_shape(config)
    w = 2 if dtype == torch.bfloat16 else 4
    cuda = device_type == "cuda"
    # activations follow the run dtype: bf16 weights compute in bf16, and training runs under bf16
    # autocast exactly when the run dtype is bf16 (shear.trainer.make_accelerator)
    act = w
    runtime = RUNTIME_BYTES["cuda" if cuda else "cpu"]
    plans: dict[str, StagePlan] = {}

    # score: whole model, or one block at a time
    sc = params.score
    tokens = sc.batch_size * sc.calib_seq_len
    fwd = forward_transient(s, tokens, sc.batch_size, sc.calib_seq_len, w, tokens)
    whole = Memory(weights=s.total * w, calibration=(s.layers + 1) * tokens * s.hidden * w, activations=fwd,
                   runtime=runtime)
    taylor = [c for c in sc.block_criteria if c.startswith("taylor")] + \
        [f"width {c}" for c in sc.width_criteria if c == "taylor"]
    if taylor:  # gradients of every weight (width taylor) in the weights' dtype and a full backward
        grads = s.total * w if "taylor" in sc.width_criteria else s.layers * s.block_params * w
        backward = s.layers * tokens * saved_per_token(s, w) + tokens * s.vocab * 12
        whole.gradients = grads
        whole.activations = max(fwd, backward)
    n_calib = sc.calib_sequences * sc.calib_seq_len
    layerwise = Memory(
        weights=max(s.block_params, s.embedding_params, s.head_params + s.norm_params) * w,
        # the candidates' streams, the true state and the next one (shear.importance.layerwise)
        calibration=(s.layers + 2) * n_calib * s.hidden * w,
        activations=fwd, runtime=runtime)
    # score.layerwise: true forces it, false forbids it, auto takes it when the whole model does not fit
    use_layerwise = sc.layerwise is True or (sc.layerwise == "auto" and whole.total > device_bytes and not taylor)
    score = StagePlan("score", layerwise if use_layerwise else whole, micro_batch=sc.batch_size,
                      layerwise=use_layerwise)
    if whole.total > device_bytes and taylor:
        score.notes.append(f"{', '.join(taylor)} need the whole model: without them layer-by-layer scoring "
                           f"needs {layerwise.total / GiB:.1f} GiB")
    plans["score"] = score

    # prune: sheared trains weights, masks and multipliers (masks are tiny)
    sh = params.prune.sheared
    # the first gradients a full backward makes: the LM head's (the embedding's when tied) and the final norm's
    head_grads = (s.embedding_params if s.tied else s.head_params) + s.norm_params
    if params.prune.method == "sheared":
        make = lambda n, mb, ckpt: _train_memory(s, s.total, 0, mb, sh.seq_len, act, n, ckpt, runtime,  # noqa: E731
                                                 foreach_adam=cuda, grads_persist=sh.grad_accum > 1 or n > 1,
                                                 first_grads=head_grads)
        n, mb, ckpt = _fit_training(make, sh.batch_size, device_bytes, max_processes)
        # as configured: FSDP over num_processes when prune.sheared.sharding says so (shear/prune/sheared.py)
        unsharded = make(1, sh.batch_size, sh.activation_checkpointing)
        sharded = fsdp_chosen(sh.sharding, sh.num_processes, unsharded.total <= device_bytes)
        plans["prune"] = StagePlan("prune (sheared)", make(sh.num_processes, sh.batch_size, sh.activation_checkpointing)
                                   if sharded else unsharded, processes=n, micro_batch=mb,
                                   activation_checkpointing=ckpt, checkpoint_bytes=s.total * 12,
                                   fitted_bytes=make(n, mb, ckpt).total if n else 0, sharded=sharded)
    else:  # depth: load, drop blocks, save tensor by tensor; width: the sliced copy beside the original
        copies = 2 if params.prune.method == "width" else 1
        plans["prune"] = StagePlan(f"prune ({params.prune.method})",
                                   Memory(weights=copies * s.total * w, runtime=runtime))

    # retrain (of the model whose config is given; a distillation teacher is counted at its size)
    rt = params.retrain
    if rt.method != "none":
        teacher = s.total * w if rt.needs_teacher else 0
        teacher_logits = rt.batch_size * rt.seq_len * s.vocab * 4 if rt.distill > 0 else 0
        if rt.method == "lora":
            adapters = _lora_params(s, rt.lora.r, rt.lora.target_modules)
            dropout = _lora_dropout_saved(s, rt.lora.target_modules, act) if rt.lora.dropout > 0 else 0
            make = lambda n, mb, ckpt, replicas=1: _train_memory(  # noqa: E731
                s, adapters, s.total * w + teacher, mb, rt.seq_len, act, n, ckpt, runtime,
                extra=teacher_logits * mb // rt.batch_size + mb * rt.seq_len * dropout, logits_copies=5,
                grads_persist=rt.grad_accum > 1 or n > 1 or replicas > 1)
            checkpoint = adapters * 12
        else:
            make = lambda n, mb, ckpt, replicas=1: _train_memory(  # noqa: E731
                s, s.total, teacher, mb, rt.seq_len, act, n, ckpt, runtime,
                extra=teacher_logits * mb // rt.batch_size, logits_copies=5,
                grads_persist=rt.grad_accum > 1 or n > 1 or replicas > 1, first_grads=head_grads)
            checkpoint = s.total * 12
        n, mb, ckpt = _fit_training(make, rt.batch_size, device_bytes, max_processes)
        # as configured: FSDP shards CPT on CUDA; DDP (LoRA, or on CPU) replicates
        shards = rt.num_processes if rt.method == "cpt" and cuda else 1
        plans["retrain"] = StagePlan(f"retrain ({rt.method})", make(shards, rt.batch_size, False, rt.num_processes),
                                     processes=n, micro_batch=mb, activation_checkpointing=ckpt,
                                     checkpoint_bytes=checkpoint, fitted_bytes=make(n, mb, ckpt).total if n else 0)

    # evaluate: perplexity at the longest length (lm head in chunks of positions)
    ev = params.evaluate
    seq = max(ev.ppl_seq_lens)
    tokens = ev.batch_size * seq
    plans["evaluate"] = StagePlan("evaluate", Memory(
        weights=s.total * w, activations=forward_transient(s, tokens, ev.batch_size, seq, w, min(tokens, LOGITS_CHUNK)),
        runtime=runtime), micro_batch=ev.batch_size)

    # speed: decode with a static KV cache at the largest batch
    sp = ev.speed
    batch, length = max(sp.batch_sizes), sp.prompt_len + sp.new_tokens
    kv = kv_cache_bytes(config, batch, length, w)
    plans["speed"] = StagePlan("speed", Memory(
        weights=s.total * w, kv_cache=kv,
        activations=forward_transient(s, batch * sp.prompt_len, batch, sp.prompt_len, w, batch), runtime=runtime),
        micro_batch=batch)
    return plans


def device_memory(device: torch.device) -> int:
    """Bytes of one device: the GPU's total memory, else the host's physical RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(plan: StagePlan, device_bytes: int, what_to_change: str) -> None:
    """Stop with one line when the stage's plan does not fit one device, before any side effect."""
    if plan.fits(device_bytes):
        return
    raise ShearError(
        f"{plan.stage}: needs {plan.memory.total / GiB:.1f} GiB per device, the device has "
        f"{device_bytes / GiB:.1f} GiB; {what_to_change} (python -m shear.plan shows the breakdown)")


def what_to_change(stage: str, plan: StagePlan, params) -> str:
    """The one thing to change when `stage`'s plan does not fit, in params.yaml's words."""
    if stage == "score":
        if params.score.layerwise is False:
            return "set score.layerwise: auto (layer-by-layer scoring holds one block at a time)"
        if not plan.layerwise:
            return ("remove taylor/taylor+ from score.block_criteria and taylor/magnitude from score.width_criteria "
                    "(they need the whole model), so that scoring runs layer by layer")
        return "lower score.calib_sequences or score.batch_size"
    if stage == "evaluate":
        return "lower evaluate.batch_size or the longest evaluate.ppl_seq_lens, or set run.dtype: bfloat16"
    if stage == "speed":
        return "lower the largest evaluate.speed.batch_sizes or set run.dtype: bfloat16"
    if stage == "prune" and params.prune.method != "sheared":
        return (f"{params.prune.method} pruning holds only the weights ({plan.memory.weights / GiB:.1f} GiB): "
                "set run.dtype: bfloat16 or run.device: cpu (host memory)")
    section = "prune.sheared" if stage == "prune" else "retrain"
    if plan.processes == 0:
        return f"it does not fit at any process count up to {PROCESS_COUNTS[-1]} even at micro-batch 1"
    ckpt = " with activation checkpointing" if plan.activation_checkpointing else ""
    if plan.processes > 1:
        return (f"run on {plan.processes} devices (FSDP, num_processes={plan.processes}) at micro-batch "
                f"{plan.micro_batch}{ckpt}")
    return f"set {section}.batch_size={plan.micro_batch}{ckpt} (and raise grad_accum to keep the global batch)"


def check_stage(stage: str, params, model_dir: str | Path, device: torch.device) -> StagePlan:
    """The plan of `stage` (score | prune | retrain | evaluate | speed) for the model in `model_dir`
    on `device`; stops with one line naming what to change when it does not fit. Stages call
    it first, before any side effect."""
    from shear.models import read_config, resolve_dtype

    config = read_config(model_dir)
    device_bytes = device_memory(device)
    plan = plan_stages(params, config, resolve_dtype(params.run.dtype, device), device.type, device_bytes)[stage]
    check_fits(plan, device_bytes, what_to_change(stage, plan, params))
    return plan


def check_speed(params, model_dirs: list[str | Path], device: torch.device) -> StagePlan:
    """The speed stage's plan: it holds every model of `model_dirs` at once (their timed runs are
    interleaved), so their weights add up; the KV cache and activations of one timed run at a
    time come on top. Stops with one line when it does not fit, before any model is loaded."""
    from shear.models import read_config, resolve_dtype

    device_bytes = device_memory(device)
    dtype = resolve_dtype(params.run.dtype, device)
    each = [plan_stages(params, read_config(d), dtype, device.type, device_bytes)["speed"].memory for d in model_dirs]
    plan = StagePlan("speed", Memory(
        weights=sum(m.weights for m in each), kv_cache=max(m.kv_cache for m in each),
        activations=max(m.activations for m in each), runtime=each[0].runtime), micro_batch=max(params.evaluate.speed.batch_sizes))
    plan.notes.append(f"{len(each)} models held at once")
    check_fits(plan, device_bytes, what_to_change("speed", plan, params))
    return plan


# ----------------------------------------------------------------------------- command line


def base_config(source: str, directory: str | Path = "data/models/base"):
    """The base model's config: the saved base checkpoint, else read from base.source (no weights)."""
    from transformers import AutoConfig

    if (Path(directory) / "config.json").is_file():
        return AutoConfig.from_pretrained(directory)
    kind, _, arg = source.partition(":")
    if kind == "hf":
        return AutoConfig.from_pretrained(arg)
    if kind == "gguf":
        from shear.models import find_gguf

        file = find_gguf(arg)
        return AutoConfig.from_pretrained(file.parent, gguf_file=file.name)
    if kind == "tiny":
        from shear.models import make_tiny_model

        return make_tiny_model(arg)[0].config
    raise ShearError(f"params.yaml: base.source={source!r} is not valid; use gguf:, hf: or tiny:")


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def format_plan(plans: dict[str, StagePlan], device_bytes: int, title: str, max_processes: int = 128) -> str:
    """A markdown table of the plans (GiB per device, one process at the configured batch) and what
    it takes to fit on devices of `device_bytes`."""
    lines = [f"{title}; device {device_bytes / 1e9:.0f} GB ({device_bytes / GiB:.1f} GiB)", "",
             "| stage | weights | grads | optimizer | activations | calib | KV | runtime | total | fits | "
             "to fit: processes x micro-batch (GiB per device) | checkpoint |", "|---|" + "---|" * 11]
    for p in plans.values():
        m = p.memory
        fit = "yes" if p.fits(device_bytes) else "no"
        if p.checkpoint_bytes:  # training: sharded over processes
            need = (f"{p.processes} x {p.micro_batch}" + (" + act. ckpt" if p.activation_checkpointing else "")
                    + f" ({_gib(p.fitted_bytes)})") if p.processes else f"more than {max_processes} processes"
        else:
            need = ("layer by layer" if p.layerwise else "1") if p.fits(device_bytes) else \
                "weights alone exceed one device (not supported)" if m.weights > device_bytes else "lower the batch"
        lines.append(f"| {p.stage} | {_gib(m.weights)} | {_gib(m.gradients)} | {_gib(m.optimizer)} | "
                     f"{_gib(m.activations)} | {_gib(m.calibration)} | {_gib(m.kv_cache)} | {_gib(m.runtime)} | "
                     f"**{_gib(m.total)}** | {fit} | {need} | "
                     f"{_gib(p.checkpoint_bytes) + ' GiB' if p.checkpoint_bytes else '-'} |")
    notes = [f"- {p.stage}: {note}" for p in plans.values() for note in p.notes]
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv: list[str] | None = None) -> None:
    """`python -m shear.plan`: print the memory plan of the configured run."""
    import sys

    from shear.config import load_params
    from shear.models import offline, pick_device, resolve_dtype

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--config", help="a model's config.json (default: the base model's)")
    parser.add_argument("--device-gb", type=float, help="memory of one device in GB (default: the visible GPU, "
                                                        "else host RAM)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="plan for this device type (default: params)")
    args = parser.parse_args(argv)
    offline()
    try:
        params = load_params(args.params)
        if args.config:
            from transformers import AutoConfig

            if not Path(args.config).is_file():
                raise ShearError(f"--config {args.config}: file not found")
            config = AutoConfig.from_pretrained(Path(args.config).parent)
        else:
            config = base_config(params.base.source)
        device = torch.device(args.device) if args.device else pick_device(params.run.device)
        dtype = resolve_dtype(params.run.dtype, device)
        device_bytes = int(args.device_gb * 1e9) if args.device_gb else device_memory(device)
        plans = plan_stages(params, config, dtype, device.type, device_bytes)
    except ShearError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(format_plan(plans, device_bytes, f"Memory plan ({device.type}, {str(dtype).removeprefix('torch.')})"))


if __name__ == "__main__":
    main()
