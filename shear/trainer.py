"""One training run, shared by retraining (shear/train.py) and Sheared-LLaMA pruning
(shear/prune/sheared.py): launch, budget, schedule, optimizer groups, the loop, checkpoints.

One optimizer step, on each of the `world` processes:

    objective.begin_step(step)                     e.g. draw this step's hard-concrete masks
    for each of grad_accum micro-batches:
        draw one global micro-batch (batch_size x world rows) from the seeded sampler and
        keep this rank's slice; loss = objective.loss(model, ids); backward(loss / grad_accum)
        (DDP / FSDP average the gradients on the last micro-batch only: `no_sync` before)
    objective.before_update()                      e.g. average the mask gradients over ranks
    clip the gradient norm, AdamW step at peak_lr x lr_factor(step)

Every process draws the same global batch from one sampler with the same seed, so the
sampler's state is the same everywhere and rank 0 checkpoints it for all; a run on N
processes sees the same global batch as one process with N times the micro-batch.

Learning-rate shape: linear warm-up over `warmup_steps`, then either cosine decay to
FINAL_LR_RATIO of the peak at the last step (LLaMA's, and Sheared-LLaMA's reference run) or
linear decay towards zero (the Hugging Face Trainer's default, which Alpaca-LoRA and
Shortened LLaMA's LoRA retraining use). The schedule is a function of the step, so the step
is all of its checkpointed state.

Checkpoints (no pickle anywhere): `<dir>/last/meta.json` holds the run's fingerprint, the
step and every non-tensor value (sampler, losses); the tensors (weights, optimizer moments,
masks, multipliers, RNG states) are in `tensors-NNNNN.safetensors` shards of at most
SHARD_BYTES, each stamped with the fingerprint and step in its header. `meta.json` is read
and its fingerprint checked before any tensor file is opened, and safetensors parses only a
JSON header and raw bytes. Saving never holds two full copies: each shard is written to a
temporary file and renamed over its predecessor one at a time (peak: one checkpoint plus one
shard), then `meta.json` is replaced last. A kill in the middle leaves shards of two steps,
which the reader detects from their headers and refuses (the run starts afresh, saying so).

Under FSDP no process holds the whole model, so the weights and their AdamW moments are
written by every rank, its own shards only, through torch.distributed.checkpoint's
safetensors writer into `<dir>/last/sharded/` (one `shard-RRRRR-model-00001-of-00001.safetensors`
per rank; each tensor's offset in the whole is JSON in the safetensors header; no pickle,
no `.metadata` file). The previous checkpoint is deleted first, `meta.json` first of all (peak
disk: one checkpoint; a kill during the save leaves no checkpoint and the run starts afresh),
and rank 0 writes the rest (masks, sampler, RNG) as above with the shard files' sizes in
`meta.json`, last. torch's reader reassembles the shards for any number of processes, FSDP or
not: a sharded checkpoint resumes on another process count (see `load_weights_and_optimizer`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from shear.errors import ShearError
from shear.io import atomic_file, read_json, trim_logs
from shear.models import pick_device, resolve_dtype

FINAL_LR_RATIO = 0.1  # cosine decay ends at 10% of the peak learning rate
SHARD_BYTES = 1 << 30  # the most a save holds twice on disk: one shard
CHECKPOINT_FORMAT = 1
SHARDED_DIR = "sharded"  # under <checkpoint>/last: the FSDP ranks' shards of weights and optimizer
ACCELERATE_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"


# ----------------------------------------------------------------------------- launch and plan


def make_accelerator(device: str = "auto", dtype: str = "auto"):
    """An `accelerate.Accelerator` for `run.device` (gloo processes on CPU), with bf16 autocast
    when `run.dtype` resolves to bfloat16 (auto: on CUDA). The trained weights stay float32.

    Under `accelerate launch --config_file configs/accelerate/fsdp.yaml` the model is sharded
    with accelerate's FSDP2 plugin: bf16 compute over float32 master weights on CUDA, with the
    gradients reduced in float32 (accelerate's default would reduce them in bf16).
    """
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    target = pick_device(device)
    cuda = target.type == "cuda"
    bf16 = resolve_dtype(dtype, target) == torch.bfloat16
    plugin = None
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        policy = {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32, "output_dtype": torch.bfloat16}
        plugin = FullyShardedDataParallelPlugin(mixed_precision_policy=policy if cuda and bf16 else None)
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no", fsdp_plugin=plugin)
    if plugin is not None and accelerator.distributed_type.name == "MULTI_CPU":
        # accelerate 1.x turns its FSDP plugin on for GPU-class devices only (AcceleratorState
        # leaves gloo processes MULTI_CPU); torch's FSDP2 itself shards over gloo, so on CPU
        # the state is switched here and everything after is accelerate's own FSDP2 path.
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        # what AcceleratorState.__init__ does on GPUs: every later AcceleratorState() copies it from here
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def launched() -> bool:
    """True inside a process started by `accelerate launch` (or torchrun)."""
    return "LOCAL_RANK" in os.environ


def relaunch(stage: str, num_processes: int, params_path: str, fsdp: bool = False) -> int:
    """Run `python -m <stage>` again under `accelerate launch` with `num_processes` processes."""
    with socket.socket() as s:  # a free port, so two runs on one machine do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(ACCELERATE_CONFIGS / ("fsdp.yaml" if fsdp else "ddp.yaml")),
           "--num_processes", str(num_processes), "--num_machines", "1", "--main_process_port", str(port),
           "-m", stage, "--params", params_path]
    print(f"{stage}: " + " ".join(cmd[1:]), flush=True)
    return subprocess.run(cmd).returncode


@dataclass(frozen=True)
class RunPlan:
    """How a token budget becomes optimizer steps; `batch_size` is rows per process per micro-batch."""

    batch_size: int
    seq_len: int
    grad_accum: int
    world_size: int
    total_steps: int
    warmup_steps: int

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum * self.world_size


def plan_run(section: str, tokens: int, batch_size: int, seq_len: int, grad_accum: int, world_size: int,
             lr_warmup_fraction: float) -> RunPlan:
    """Optimizer steps the budget pays for (floor); a budget below one step is an error naming `section`."""
    per_step = batch_size * seq_len * grad_accum * world_size
    if tokens < per_step:
        raise ShearError(
            f"params.yaml: {section}.tokens={tokens} is smaller than one optimizer step of {per_step} tokens "
            f"(batch_size {batch_size} x seq_len {seq_len} x grad_accum {grad_accum} x {world_size} processes); "
            f"set {section}.tokens >= {per_step} or a smaller batch"
        )
    total = tokens // per_step
    return RunPlan(batch_size, seq_len, grad_accum, world_size, total, round(lr_warmup_fraction * total))


def check_seq_len(section: str, seq_len: int, config) -> None:
    """Refuse sequences longer than the model's positions (RoPE past them is untrained)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ShearError(f"params.yaml: {section}.seq_len={seq_len} is longer than the model's "
                         f"max_position_embeddings={limit}; set {section}.seq_len <= {limit}")


def check_train_tokens(section: str, domains: dict[str, np.ndarray], seq_len: int, shards_dir: str | Path) -> None:
    """Refuse shards in which no domain's train split holds one sequence of `seq_len` tokens."""
    largest = max((int(np.asarray(a).size) for a in domains.values()), default=0)
    if largest < seq_len:
        raise ShearError(
            f"{shards_dir}: no domain's train split holds one sequence of {section}.seq_len={seq_len} tokens "
            f"(the largest holds {largest}); lower {section}.seq_len or add text to the corpus"
        )


LR_SCHEDULES = ("cosine", "linear")


def lr_factor(step: int, total_steps: int, warmup_steps: int, shape: str = "cosine") -> float:
    """Learning-rate multiplier of optimizer step `step` (0-based): linear warm-up, then a decay of `shape`.

    Warm-up reaches 1 at step warmup_steps - 1. cosine: reaches FINAL_LR_RATIO at the last step.
    linear: the Hugging Face Trainer's (total - step) / (total - warmup), which would reach 0 one
    step after the last, so no step is spent at a zero learning rate.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if shape == "linear":
        return (total_steps - step) / max(1, total_steps - warmup_steps)
    if shape != "cosine":
        raise ValueError(f"unknown learning-rate schedule {shape!r}; valid: {', '.join(LR_SCHEDULES)}")
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps - 1)
    return FINAL_LR_RATIO + (1 - FINAL_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_activation_checkpointing(model, on: bool) -> None:
    """Recompute each block's activations in backward instead of keeping them (transformers 5.17 and 5.23+)."""
    if on:
        if hasattr(model, "activation_checkpointing_enable"):  # the name since 5.23
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def decay_groups(params, lr: float, weight_decay: float) -> list[dict]:
    """Parameter groups of the trainable `params`: matrices decay, vectors (norms, biases) do not."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(groups: list[dict], betas, fused: Optional[bool] = None):
    """AdamW over `groups`; each group's `lr` is its peak, kept as `peak_lr` for the schedule."""
    for g in groups:
        g["peak_lr"] = g["lr"]
    return torch.optim.AdamW(groups, betas=tuple(betas), eps=1e-8, fused=fused)


# ----------------------------------------------------------------------------- checkpoints


def _pack(obj: Any, name: str, tensors: dict[str, torch.Tensor], seen: dict[int, str]) -> Any:
    """`obj` with every tensor replaced by {"__tensor__": key}, the tensors collected in `tensors`."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        if t.numel() and t.data_ptr() in seen:  # tied weights: safetensors refuses shared storage
            t = t.clone()
        if t.numel():
            seen[t.data_ptr()] = name
        tensors[name] = t
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _pack(v, f"{name}.{k}", tensors, seen) for k, v in obj.items()}
        return {"__items__": [[k, _pack(v, f"{name}.{k}", tensors, seen)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_pack(v, f"{name}.{i}", tensors, seen) for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return obj


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {k: _unpack(v, tensors) for k, v in obj["__items__"]}
        return {k: _unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    return obj


def save_checkpoint(directory: str | Path, fingerprint: str, step: int, state: dict) -> None:
    """Write `state` (nested dicts/lists of tensors and JSON values) as the checkpoint of `step`.

    Shards are renamed over their predecessors one by one, `meta.json` last (see the module doc).
    """
    from safetensors.torch import save_file

    path = Path(directory) / "last"
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _pack(state, "s", tensors, {})
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    stamp = {"fingerprint": fingerprint, "step": str(step)}
    files = []
    for i, shard in enumerate(shards):
        name = f"tensors-{i + 1:05d}.safetensors"
        tmp = path / f".{name}.tmp-{os.getpid()}"
        save_file(shard, str(tmp), metadata=stamp)
        os.replace(tmp, path / name)
        files.append(name)
    for old in [*path.glob("tensors-*.safetensors"), path / "state.pt", Path(directory) / "state.pt"]:
        if old.name not in files and old.is_file():  # shards of a larger checkpoint, the old pickle format
            old.unlink()
    meta = {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "step": step, "files": files,
            "state": skeleton}
    with atomic_file(path / "meta.json") as f:
        json.dump(meta, f)
    if "sharded" not in state:  # the shards of an earlier FSDP run are no part of this checkpoint
        shutil.rmtree(path / SHARDED_DIR, ignore_errors=True)


class StoredTensor:
    """A tensor of a checkpoint shard, read only when it is loaded into place: a resume streams
    the weights and optimizer moments one tensor at a time, never holding the checkpoint whole."""

    def __init__(self, file: Path, key: str):
        self.file, self.key = file, key

    def load(self, device: str | torch.device = "cpu") -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.file), framework="pt", device=str(device)) as f:
            return f.get_tensor(self.key)


def _read_all(obj: Any) -> Any:
    """`obj` with every StoredTensor read (on the CPU)."""
    if isinstance(obj, StoredTensor):
        return obj.load()
    if isinstance(obj, dict):
        return {k: _read_all(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_read_all(v) for v in obj]
    return obj


def _loaded(value: Any, device: str | torch.device) -> Any:
    """A stored tensor read onto `device`; anything else as it is."""
    return value.load(device) if isinstance(value, StoredTensor) else value


STREAMED = ("weights", "optimizer")  # the large parts of a training state (12 bytes per trained parameter)


def read_checkpoint(directory: str | Path, fingerprint: str, who: str, announce: bool = True,
                    stream: bool = False) -> Optional[dict]:
    """The state saved by `save_checkpoint` if it belongs to run `fingerprint`, else None (saying why).

    The fingerprint is compared before any tensor file is opened; an unreadable file is a
    one-line ShearError naming it. Files of the old pickle format (state.pt) are never read.
    Every shard's header is read here; with `stream` the weights and optimizer moments stay
    `StoredTensor`s that `fit` reads one at a time straight into place (on the training
    device), else every tensor is read now (on the CPU).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(directory) / "last"
    say = print if announce else (lambda *a, **k: None)
    if not (path / "meta.json").is_file():
        if (path / "state.pt").exists() or (Path(directory) / "state.pt").exists():
            say(f"{who}: ignoring {path} (a checkpoint of the old pickle format, which is never loaded); "
                "starting afresh")
        return None
    meta = read_json(path / "meta.json")
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT or not isinstance(meta.get("files"), list):
        raise ShearError(f"{path}/meta.json: not a shear checkpoint (format {CHECKPOINT_FORMAT}); delete {path} "
                         "to start afresh")
    if meta.get("fingerprint") != fingerprint:
        say(f"{who}: ignoring the checkpoint in {path} (step {meta.get('step')}): it was made with other params, "
            f"start model or data (run {meta.get('fingerprint')}, now {fingerprint}); starting afresh")
        return None
    tensors: dict[str, StoredTensor] = {}
    for name in meta["files"]:
        file = path / str(name)
        if Path(str(name)).name != str(name) or not file.is_file():
            raise ShearError(f"{file}: missing from the checkpoint listed in {path}/meta.json; delete {path} "
                             "to start afresh")
        try:  # the header only: safe_open checks that the tensors it lists cover the file exactly
            with safe_open(str(file), framework="pt", device="cpu") as f:
                stamp = f.metadata() or {}
                if stamp.get("fingerprint") != fingerprint or stamp.get("step") != str(meta["step"]):
                    say(f"{who}: ignoring the checkpoint in {path}: {name} is of step {stamp.get('step')}, "
                        f"meta.json of step {meta['step']} (a save was interrupted); starting afresh")
                    return None
                tensors.update((key, StoredTensor(file, key)) for key in f.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise ShearError(f"{file}: corrupt checkpoint file ({str(e).splitlines()[0]}); delete {path} "
                             "to start afresh") from None
    try:
        state = _unpack(meta["state"], tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise ShearError(f"{path}/meta.json: does not match its tensor files ({e!r}); delete {path} "
                         "to start afresh") from None
    state = {k: v if stream and k in STREAMED else _read_all(v) for k, v in state.items()}
    if "sharded" in state:
        found = {f.name: f.stat().st_size for f in sorted((path / SHARDED_DIR).glob("*.safetensors"))}
        if found != state["sharded"]:
            say(f"{who}: ignoring the checkpoint in {path}: {path / SHARDED_DIR} does not hold the shard files "
                "meta.json lists (a save was interrupted or a file was changed); starting afresh")
            return None
        state["sharded_dir"] = str(path / SHARDED_DIR)
    say(f"{who}: resuming from {path} at step {meta['step']}")
    return state


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU, and CUDA when present) as tensors."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore states from `rng_state`."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def is_fsdp(accelerator) -> bool:
    """True when `accelerator` shards the model (FSDP) rather than copying it to every process."""
    return accelerator.distributed_type.name == "FSDP"


def weights_and_optimizer_state(accelerator, model, optimizer) -> tuple[dict, dict]:
    """Full state dicts of the trainable weights and of the optimizer (empty when it is None).

    Without FSDP every rank holds the same state and the plain dicts (optimizer indexed by
    position) are it; FSDP checkpoints go through `save_sharded` instead.
    """
    plain = accelerator.unwrap_model(model)
    weights = {n: p for n, p in plain.named_parameters() if p.requires_grad}
    return weights, optimizer.optimizer.state_dict() if optimizer is not None else {}


def _sharded_state(model, optimizer) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """The trainable weights and their optimizer state as torch.distributed.checkpoint sees them
    (keyed by parameter name; under FSDP this rank's shards), and flattened into one dict of
    tensors for its writer and reader. Collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_state_dict)

    options = StateDictOptions(ignore_frozen_params=True)
    if optimizer is None:
        weights, optim = get_model_state_dict(model, options=options), {"state": {}}
    else:  # AdamW's moments are created (zeros) when it has not stepped yet: a resume fills them
        weights, optim = get_state_dict(model, optimizer.optimizer, options=options)
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    flat: dict[str, torch.Tensor] = {}
    # Tied embeddings once (safetensors refuses shared storage), and never when frozen: torch's
    # ignore_frozen_params drops the frozen parameter's own name but keeps its tied alias.
    seen = {local(p).data_ptr() for p in model.parameters() if not p.requires_grad}
    for name, t in weights.items():
        if local(t).data_ptr() in seen:
            continue
        seen.add(local(t).data_ptr())
        flat[f"weights.{name}"] = t
    for name, moments in optim["state"].items():
        for key, t in moments.items():
            flat[f"optimizer.{name}.{key}"] = t
    return flat, weights, optim


def save_sharded(accelerator, path: Path, model, optimizer) -> dict[str, int]:
    """Every rank writes its shards of the weights and optimizer state to `path`/sharded (collective).

    The checkpoint in `path` is deleted first, meta.json first of all, so that no meta.json
    ever lists files of another step. Returns the written files and their sizes in bytes.
    """
    from torch.distributed.checkpoint import HuggingFaceStorageWriter, save

    flat, _, _ = _sharded_state(model, optimizer)
    target = path / SHARDED_DIR
    if accelerator.is_main_process:
        (path / "meta.json").unlink(missing_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save(flat, storage_writer=HuggingFaceStorageWriter(str(target), save_distributed=True))
    accelerator.wait_for_everyone()
    return {f.name: f.stat().st_size for f in sorted(target.glob("*.safetensors"))}


def optimizer_state_by_name(model, optimizer, state: dict) -> dict:
    """An optimizer state dict indexed by position (`torch.optim.Optimizer.state_dict`) keyed by
    parameter name instead, as torch.distributed.checkpoint's `set_state_dict` takes it."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {order[int(i)]: moments for i, moments in state["state"].items()},
            "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in state["param_groups"]]}


def load_weights_and_optimizer(accelerator, model, optimizer, state: dict) -> None:
    """Put a checkpoint's weights and optimizer state (from `read_checkpoint`) into `model` and `optimizer`.

    A sharded checkpoint (written under FSDP) loads on any number of processes, FSDP or not:
    torch's reader gives each rank the slices of the saved shards it holds now. A full one
    loads as it is, or under FSDP through `set_state_dict`, which keeps each rank's slice.
    """
    if "sharded_dir" in state:
        from torch.distributed.checkpoint import HuggingFaceStorageReader, load
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        flat, weights, optim = _sharded_state(model, optimizer)
        load(flat, storage_reader=HuggingFaceStorageReader(state["sharded_dir"]))
        if optimizer is None:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(model, weights, options=StateDictOptions(strict=False))
        else:
            set_state_dict(model, optimizer.optimizer, model_state_dict=weights, optim_state_dict=optim,
                           options=StateDictOptions(strict=False))
        return
    weights, optim_state = state["weights"], state["optimizer"]
    if is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        weights, optim_state = _read_all(weights), _read_all(optim_state)  # set_state_dict takes whole tensors
        if optim_state["state"] and all(isinstance(k, int) for k in optim_state["state"]):
            optim_state = optimizer_state_by_name(model, optimizer.optimizer, optim_state)
        set_state_dict(model, optimizer.optimizer, model_state_dict=weights, optim_state_dict=optim_state,
                       options=StateDictOptions(full_state_dict=True, strict=False))
        return
    plain = accelerator.unwrap_model(model)
    params = dict(plain.named_parameters())
    missing = set(weights) - set(params)
    if missing:
        raise ShearError(f"checkpoint weights {sorted(missing)[:3]} are not parameters of this model; "
                         "delete the checkpoint to start afresh")
    with torch.no_grad():  # one tensor at a time, read onto its parameter's device and copied into it
        for name, value in weights.items():
            params[name].copy_(_loaded(value, params[name].device))
    if optimizer is None:
        return
    # The moments straight onto their parameter's device and dtype (load_state_dict then keeps them
    # as they are); the step counters where AdamW expects them, which load_state_dict decides.
    inner = optimizer.optimizer
    by_index = dict(zip((i for g in optim_state["param_groups"] for i in g["params"]),
                        (p for g in inner.param_groups for p in g["params"])))
    state = {i: {k: _loaded(v, "cpu" if k == "step" else by_index[i].device) for k, v in slots.items()}
             for i, slots in optim_state["state"].items()}
    inner.load_state_dict({**optim_state, "state": state})


def gather_model(accelerator, model):
    """The trained model as a plain CPU module on rank 0, None on other ranks (collective under FSDP,
    whose float32 master weights it gathers into a fresh float32 model)."""
    if is_fsdp(accelerator):
        # The weights are sharded: gather a full state dict on rank 0 and load it into a fresh copy.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from transformers import AutoModelForCausalLM

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not accelerator.is_main_process:
            return None
        # A real (not meta) model: non-persistent buffers such as RoPE's inv_freq are not in the state dict.
        fresh = AutoModelForCausalLM.from_config(accelerator.unwrap_model(model).config, dtype=torch.float32)
        fresh.load_state_dict(state)
        return fresh
    if not accelerator.is_main_process:
        return None
    return accelerator.unwrap_model(model, keep_fp32_wrapper=False).to("cpu")


# ----------------------------------------------------------------------------- logging


def open_live(log_dir: str | Path, resume_step: Optional[int]):
    """A DVCLive `Live` in `log_dir`: a fresh run clears it, a resumed one drops rows after its step."""
    from dvclive import Live

    if resume_step is not None:
        trim_logs(log_dir, resume_step)
    return Live(dir=str(log_dir), resume=resume_step is not None, dvcyaml=None, save_dvc_exp=False, report=None)


def log_metrics(live, step: int, metrics: dict[str, float]) -> None:
    """Log `metrics` at `step` (no-op without a Live, i.e. on ranks other than 0)."""
    if live is None:
        return
    live.step = step
    for name, value in metrics.items():
        live.log_metric(name, float(value))


# ----------------------------------------------------------------------------- the loop


class Objective:
    """What a trainer adds to the shared loop; the defaults are plain next-token training."""

    def extra_parameters(self) -> list[torch.nn.Parameter]:
        """Trained parameters outside the model (clipped with it)."""
        return []

    def extra_optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The optimizer of `extra_parameters`, stepped with the model's on the same schedule
        (kept apart: accelerate's FSDP shards a model together with an optimizer of its own
        parameters only). Its state belongs in `state()`."""
        return None

    def begin_step(self, step: int) -> None:
        """Called before the first micro-batch of optimizer step `step`."""

    def loss(self, model, ids: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch loss to minimise and its detached parts to log (summed over micro-batches / grad_accum)."""
        raise NotImplementedError

    def before_update(self) -> None:
        """Called after the last backward of a step, before clipping and the optimizer step."""

    def step_metrics(self, step: int) -> dict[str, float]:
        """Extra metrics to log after optimizer step `step` (1-based: steps done)."""
        return {}

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """Context in which held-out losses are measured."""
        yield

    def state(self) -> dict:
        """Objective state to checkpoint (tensors and JSON values)."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore `state()`."""


def eval_losses(model, rows: Optional[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Per-domain held-out loss plus their mean; rank 0's numbers on every rank."""
    from accelerate.utils import broadcast_object_list

    from shear import mixture

    if not rows:
        return {}
    losses = mixture.domain_losses(model, rows)
    losses["mean"] = float(np.mean(list(losses.values())))
    return broadcast_object_list([losses])[0]


def to_device(ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a batch to the GPU without a host sync: from pinned memory, asynchronously."""
    if device.type != "cuda":
        return ids
    # A copy from ordinary (pageable) memory makes the host wait for the GPU to drain.
    return ids.pin_memory().to(device, non_blocking=True)


@dataclass
class RunResult:
    """What a finished run reports: steps, losses, time and where it resumed."""

    plan: RunPlan
    resumed_from_step: Optional[int]
    last: dict[str, float]
    losses_before: dict[str, float]
    losses_after: dict[str, float]
    train_s: float


def fit(model, optimizer, objective: Objective, sampler, plan: RunPlan, accelerator, *, desc: str,
        grad_clip: float = 1.0, eval_rows: Optional[dict[str, torch.Tensor]] = None,
        eval_every: Optional[int] = None, update_every: Optional[int] = None, live=None,
        checkpoint_dir: Optional[str | Path] = None, checkpoint_every: int = 1, fingerprint: str = "",
        resume: Optional[dict] = None, seed: int = 0, lr_schedule: str = "cosine",
        on_eval: Optional[Callable[[int, dict], None]] = None) -> RunResult:
    """Run `plan.total_steps` optimizer steps of `objective` on a prepared `model` and `optimizer`
    (None: no weight of the model trains).

    eval_rows: held-out rows per domain, measured before training, every `eval_every` steps
    and at the end (logged as eval/loss/*), and every `update_every` steps fed to the
    sampler's dynamic mixture (None = fixed mixture). live: a DVCLive `Live` on rank 0.
    checkpoint_dir / fingerprint: where and as which run to checkpoint every
    `checkpoint_every` steps and at the end; resume: a state from `read_checkpoint`.
    lr_schedule: the decay after warm-up, cosine | linear (`lr_factor`).
    """
    from shear import mixture

    world, rank = accelerator.num_processes, accelerator.process_index
    device, total, b = accelerator.device, plan.total_steps, plan.batch_size
    # One norm over the model's gradients (DTensor shards under FSDP) and the objective's own.
    clipped = list(model.parameters()) + objective.extra_parameters()
    optimizers = [o for o in (optimizer, objective.extra_optimizer()) if o is not None]

    if resume is not None:
        load_weights_and_optimizer(accelerator, model, optimizer, resume)
        sampler.load_state_dict(resume["sampler"])
        if rank < len(resume["rng"]):
            set_rng_state(resume["rng"][rank])
        else:  # resumed on more processes than saved: this rank's stream starts as in a fresh run
            torch.manual_seed(seed + rank)
        objective.load_state(resume["objective"])
        start, before, earlier_s, last = resume["step"], resume["losses_before"], resume["train_s"], resume["last"]
    else:
        torch.manual_seed(seed + rank)  # a different dropout stream on each rank, the same every run
        with objective.evaluation():
            before = eval_losses(model, eval_rows)
        start, earlier_s, last = 0, 0.0, {}
        log_metrics(live, 0, {f"eval/loss/{d}": v for d, v in before.items()})
        if update_every and live is not None:
            mixture.log_mixture(live, sampler, before, 0)

    model.train()
    bar = tqdm(total=total, initial=start, desc=desc, unit="step", disable=not accelerator.is_main_process)
    t_start, after = time.perf_counter(), None
    for step in range(start, total):
        t0 = time.perf_counter()
        factor = lr_factor(step, total, plan.warmup_steps, lr_schedule)
        for group in (g for o in optimizers for g in o.param_groups):
            group["lr"] = group["peak_lr"] * factor
        objective.begin_step(step)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(plan.grad_accum):
            ids, _ = sampler.next_batch(b * world)
            ids = to_device(ids[rank * b:(rank + 1) * b], device)
            last_micro = micro == plan.grad_accum - 1
            with contextlib.nullcontext() if last_micro else accelerator.no_sync(model):
                with accelerator.autocast():
                    loss, parts = objective.loss(model, ids, step)
                accelerator.backward(loss / plan.grad_accum)
            for name, value in {"loss": loss.detach(), **parts}.items():
                sums[name] = sums.get(name, 0) + value.float() / plan.grad_accum
        objective.before_update()
        grad_norm = accelerator.clip_grad_norm_(clipped, grad_clip) if grad_clip > 0 else None
        for o in optimizers:
            o.step()
            o.zero_grad(set_to_none=True)
        done = step + 1

        # One host sync per step, for the progress bar and the logs: the losses averaged over ranks.
        reduced = accelerator.reduce(torch.stack(list(sums.values())), reduction="mean").tolist()
        last = {k: v for k, v in zip(sums, reduced)}
        seconds = time.perf_counter() - t0
        metrics = {f"train/{k}": v for k, v in last.items()}
        metrics.update({"train/lr": optimizers[0].param_groups[0]["lr"], "train/lr_factor": factor,
                        "train/tokens_per_s": plan.tokens_per_step / seconds})
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        if live is not None:
            metrics.update(objective.step_metrics(done))
        log_metrics(live, done, metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{plan.tokens_per_step / seconds:,.0f}")

        losses = None
        if update_every and done % update_every == 0:
            with objective.evaluation():
                losses = eval_losses(model, eval_rows)
            sampler.update({d: v for d, v in losses.items() if d != "mean"})
            if live is not None:
                mixture.log_mixture(live, sampler, losses, done)
        if eval_rows and ((eval_every and done % eval_every == 0) or done == total):
            if losses is None:  # the same model as the mixture's measurement: reuse it
                with objective.evaluation():
                    losses = eval_losses(model, eval_rows)
            after = losses
            log_metrics(live, done, {f"eval/loss/{d}": v for d, v in after.items()})
        if checkpoint_dir is not None and (done % checkpoint_every == 0 or done == total):
            _checkpoint(accelerator, checkpoint_dir, fingerprint, done, model, optimizer, sampler, objective, {
                "losses_before": before, "last": last, "train_s": earlier_s + time.perf_counter() - t_start})
        if live is not None:
            live.summary["train_s"] = round(earlier_s + time.perf_counter() - t_start, 1)  # wall time so far
            live.make_summary()
    bar.close()

    if after is None:  # resumed from the final checkpoint, or no held-out rows
        with objective.evaluation():
            after = eval_losses(model, eval_rows)
    return RunResult(plan, start if resume is not None else None, last, before, after,
                     earlier_s + time.perf_counter() - t_start)


def _checkpoint(accelerator, directory, fingerprint: str, step: int, model, optimizer, sampler,
                objective: Objective, extra: dict) -> None:
    """Write the checkpoint of `step`: under FSDP every rank its shards (`save_sharded`), then
    rank 0 the rest; otherwise rank 0 all of it."""
    from accelerate.utils import gather_object

    rng = gather_object([rng_state()])  # one entry per rank: dropout masks differ across ranks
    state = {"step": step, "sampler": sampler.state_dict(), "rng": rng, "objective": objective.state(), **extra}
    if is_fsdp(accelerator):
        state["sharded"] = save_sharded(accelerator, Path(directory) / "last", model, optimizer)
    else:
        state["weights"], state["optimizer"] = weights_and_optimizer_state(accelerator, model, optimizer)
    if accelerator.is_main_process:
        save_checkpoint(directory, fingerprint, step, state)
    accelerator.wait_for_everyone()
