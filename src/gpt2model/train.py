"""Training: ``train(cfg)`` runs the whole loop; everything one optimizer step does is visible in it.

The pieces around the loop are small functions the benchmark and tests use too: ``setup_device``
(device, autocast, TF32, grad scaler), ``measure_matmul_peak`` (the FLOP/s that MFU divides by),
``lr_at`` (warmup + cosine), ``configure_optimizer`` (AdamW, decay on >=2-D weights only) and
``evaluate`` (mean loss over a fixed set of windows).

Distributed: under ``torchrun --nproc_per_node N -m gpt2model train ...`` every process runs
``train``; DDP averages gradients (gloo on CPU, NCCL on GPU), each rank draws its own rows of one
shared random batch (``BatchSampler(rank, world_size)``), and only rank 0 logs and writes files.
Global batch = batch_size * grad_accum * world_size windows.

Run folder layout and why a kill at any instant leaves it consistent: see ``checkpoint.py``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import (
    CONFIG_FILE,
    TRAINING_STATE_FILE,
    WEIGHTS_FILE,
    atomic_path,
    atomic_write_json,
    load_training_state,
    read_json,
    recover_dir,
    replace_dir,
    rng_state,
    save_model,
    save_training_checkpoint,
    set_rng_state,
)
from .config import MODEL_FIELDS, GPTconfig, TrainConfig
from .data import BatchSampler, eval_batches, open_dataset
from .model import GPT, next_token_loss

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
BEST_DIR = "best"
BEST_INFO_FILE = "best.json"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step and the last checkpoint."""


# --- device and precision -------------------------------------------------------------------------
@dataclass
class DeviceSetup:
    """Where and in which precision to compute. ``dtype`` is the autocast dtype; float32 means plain
    fp32 (no autocast). Weights and optimizer state always stay fp32."""

    device: torch.device
    dtype: torch.dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context to run forward passes (and the loss) in."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16's narrow exponent range needs loss scaling; for bf16/fp32 the scaler is a no-op."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)


def setup_device(device: str = "auto", dtype: str = "auto") -> DeviceSetup:
    """Pick the device (``auto``: cuda, then mps, then cpu; under torchrun each process takes GPU
    ``LOCAL_RANK``), the compute dtype (``auto``: bf16 on GPUs that have it, fp16 on older GPUs,
    fp32 elsewhere) and allow TF32 matmuls on CUDA."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but no CUDA GPU is visible; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        # TF32 tensor cores for the fp32 matmuls that remain (10-bit mantissa; fine for training).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for, but MPS is not available; use --device cpu")
    if dtype == "auto":
        if dev.type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    if dtype == "float16" and dev.type != "cuda":
        raise ValueError("float16 training needs a CUDA GPU (it relies on a grad scaler); use --dtype bfloat16 "
                         "or float32 on this device")
    if dtype == "bfloat16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bfloat16 support; use --dtype float16")
    return DeviceSetup(dev, getattr(torch, dtype))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_matmul_peak(dtype: torch.dtype, device: str | torch.device) -> float:
    """Peak FLOP/s of this device, measured with a short square-matmul probe (bf16/fp16 for those
    compute dtypes, fp32 otherwise) and cached per (dtype, device) for the life of the process.

    A measured peak, not a datasheet number, is what MFU divides by here: it works on any CPU or
    GPU, and on a shared CPU it reflects the cores this process actually gets."""
    probe = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
    return _matmul_peak(probe, str(torch.device(device)))


@functools.cache
def _matmul_peak(dtype: torch.dtype, device: str) -> float:
    dev = torch.device(device)
    # Big enough to reach the BLAS kernel's steady state (1024^2 reads ~40% low on a CPU).
    n = 2048 if dev.type == "cpu" else 4096
    # Constant inputs: matmul speed doesn't depend on the values, and no RNG stream is consumed.
    a = torch.full((n, n), 0.5, dtype=dtype, device=dev)
    b = torch.full((n, n), 0.5, dtype=dtype, device=dev)
    for _ in range(2):  # warm up kernels / thread pools
        a @ b
    _synchronize(dev)
    # Best of several short timings: a peak is what the hardware can do, and on a shared machine
    # the best sample is the one least disturbed by other processes.
    best, deadline = 0.0, time.perf_counter() + 1.0
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(2):
            a @ b
        _synchronize(dev)
        best = max(best, 2 * 2 * n**3 / (time.perf_counter() - start))
    return best


# --- optimizer and schedule -----------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``lr`` over
    ``warmup_steps``, cosine decay to ``min_lr`` at ``cfg.decay_steps``, then ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.decay_steps:
        return cfg.min_lr
    ratio = (step - cfg.warmup_steps) / (cfg.decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def configure_optimizer(model: GPT, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW with weight decay on the >=2-D weights (matmuls, embeddings) and none on biases and
    LayerNorm gains; the fused kernel on CUDA and CPU, foreach (multi-tensor) elsewhere."""
    params = [p for p in model.parameters() if p.requires_grad]  # the tied head counts once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel (CUDA and CPU) updates all tensors in one pass: on CPU it is ~8x faster than
    # foreach for the seed model (45 ms vs 374 ms per step, 10.7M parameters).
    kind = {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **kind)


# --- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], setup: DeviceSetup,
             distributed: bool = False) -> float:
    """Token-weighted mean loss over ``batches`` (on the device). ``distributed``: each rank holds
    its share of the rows and the sums are all-reduced, so every rank returns the same value."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=setup.device, dtype=torch.float64)  # sum of losses, number of tokens
    for x, y in batches:
        if y.numel():
            with setup.autocast():
                loss = next_token_loss(model(x), y)
            total[0] += loss.double() * y.numel()
            total[1] += y.numel()
    if distributed:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


# --- run folder -----------------------------------------------------------------------------------
def read_metrics(out: str | Path, max_step: int | None = None) -> list[dict[str, Any]]:
    """The records of ``OUT/metrics.jsonl`` (up to ``max_step``), skipping a torn last line."""
    path = Path(out) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if max_step is None or record["step"] <= max_step:
            records.append(record)
    return records


def plot_losses(records: Sequence[dict[str, Any]], path: str | Path) -> None:
    """PNG of per-step train loss and the eval-time train/val losses against step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)  # the object API: no pyplot global state, no display needed
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in records], [r["train_loss"] for r in records], lw=0.6, alpha=0.5,
            label="train (each step)")
    evals = [r for r in records if "val_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["train_eval_loss"] for r in evals], "o-", label="train (eval)")
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def _prepare_out(out: Path, cfg: TrainConfig, rank: int) -> None:
    """Refuse to mix two runs in one folder unless told to resume or overwrite."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder")
    if cfg.resume:
        return
    found = [name for name in (TRAINING_STATE_FILE, METRICS_FILE, WEIGHTS_FILE) if (out / name).exists()]
    if found and not cfg.overwrite:
        raise ValueError(f"{out} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                         f"--overwrite to replace it, or choose another --out")
    if found and rank == 0:
        for name in (TRAINING_STATE_FILE, METRICS_FILE, WEIGHTS_FILE, CONFIG_FILE, PLOT_FILE):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / BEST_DIR, ignore_errors=True)


def _remove_stale_temporaries(out: Path) -> None:
    """Undo what a killed run left half-done: a half-swapped best/, temp files and folders."""
    recover_dir(out / BEST_DIR)
    for path in [*out.glob(".*.tmp"), *out.glob(f"{BEST_DIR}/.*.tmp")]:
        path.unlink(missing_ok=True)
    for path in out.glob(f".{BEST_DIR}-tmp-*"):
        shutil.rmtree(path, ignore_errors=True)


def _build_model(cfg: TrainConfig, vocab_size: int, state: dict[str, Any] | None) -> GPT:
    """The model to train: the checkpoint's (resume), a loaded one (init_from) or a new one."""
    given = {k: getattr(cfg, k) for k in MODEL_FIELDS if getattr(cfg, k) is not None}
    if state is not None:
        config = GPTconfig.from_dict(state["model_config"])
        _check_shape(given, config, "the checkpoint being resumed", ())
        model = GPT(config)
        model.load_state_dict(state["model"])
    elif cfg.init_from == "scratch":
        model = GPT(GPTconfig(**{**given, "vocab_size": vocab_size}))
    else:
        model = GPT.from_pretrained(cfg.init_from, context_length=cfg.context_length, dropout=cfg.dropout)
        _check_shape(given, model.config, cfg.init_from, ("context_length", "dropout"))
    if vocab_size > model.config.vocab_size:
        raise ValueError(f"the dataset {cfg.data} has {vocab_size} token ids but the model's vocab_size is "
                         f"{model.config.vocab_size}: prepare the data with the model's tokenizer, or train "
                         f"from scratch")
    return model.train()


def _check_shape(given: dict[str, Any], config: GPTconfig, source: str, settable: Sequence[str]) -> None:
    for name, value in given.items():
        if name not in settable and getattr(config, name) != value:
            raise ValueError(f"{name}={value} differs from {source}'s {name}={getattr(config, name)}; "
                             f"drop the option (the model's shape is fixed) or start a new run")


def _check_data(data: Any, context_length: int, data_dir: str) -> None:
    for split in ("train", "val"):
        n = len(data.split(split))
        if n < context_length + 1:
            raise ValueError(f"the {split} split of {data_dir} has {n} tokens, fewer than one training window "
                             f"needs (context_length {context_length} + 1); use a smaller --context-length or "
                             f"more data")


def _save_best(out: Path, model: GPT, tokenizer: Any, step: int, val_loss: float) -> None:
    """Write the whole best/ folder aside, then swap it in (see checkpoint.replace_dir)."""
    tmp = out / f".{BEST_DIR}-tmp-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, tokenizer)
    atomic_write_json(tmp / BEST_INFO_FILE, {"step": step, "val_loss": val_loss})
    replace_dir(tmp, out / BEST_DIR)


def _best_so_far(out: Path, state: dict[str, Any] | None) -> float:
    """best/ may be newer than the training state (a kill between the two writes): trust the lower."""
    best = float(state["best_val_loss"]) if state is not None else math.inf
    info = out / BEST_DIR / BEST_INFO_FILE
    if state is not None and info.is_file():
        best = min(best, float(read_json(info)["val_loss"]))
    return best


# --- the loop -------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What ``train`` returns: the trained (raw, unwrapped) model and this call's metric records."""

    model: GPT
    step: int
    best_val_loss: float
    metrics: list[dict[str, Any]] = field(default_factory=list)


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume, or fine-tune) a GPT as ``cfg`` says, writing everything into ``cfg.out``."""
    cfg.check_paths()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    setup = setup_device(cfg.device, cfg.dtype)
    if world_size > 1:
        dist.init_process_group(backend="nccl" if setup.device.type == "cuda" else "gloo")
    try:
        return _train(cfg, setup, rank, world_size)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, setup: DeviceSetup, rank: int, world_size: int) -> TrainResult:
    from tqdm.auto import tqdm

    master = rank == 0
    device = setup.device
    out = Path(cfg.out)
    data = open_dataset(cfg.data)
    _prepare_out(out, cfg, rank)
    if master:
        _remove_stale_temporaries(out)
    state = load_training_state(out) if cfg.resume else None

    # Model: same seed on every rank, so every rank starts from the same weights.
    torch.manual_seed(cfg.seed)
    raw_model = _build_model(cfg, data.vocab_size, state)
    T = raw_model.config.context_length
    _check_data(data, T, cfg.data)
    raw_model.to(device)
    raw_model.check_inputs = False  # the dataset's ids are known to fit; skip the per-forward sync
    tokenizer = data.tokenizer()

    optimizer = configure_optimizer(raw_model, cfg, device.type)
    scaler = setup.grad_scaler()
    sampler = BatchSampler(data.split("train"), cfg.batch_size, T, seed=cfg.seed, rank=rank,
                           world_size=world_size)
    # Fixed evaluation windows, the same every time (so eval losses are comparable across steps)
    # and for any number of processes: batches of the global size, each rank taking every
    # world_size-th row.
    val_set, train_set = ([(x[rank::world_size].to(device), y[rank::world_size].to(device)) for x, y in
                           eval_batches(data.split(split), cfg.batch_size * world_size, T,
                                        max_batches=cfg.eval_steps)]
                          for split in ("val", "train"))

    step, elapsed_before = 0, 0.0
    best_val = _best_so_far(out, state)
    if state is not None:
        step, elapsed_before = int(state["step"]), float(state["elapsed_s"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        sampler.load_state_dict(state["sampler"])
        rngs = state["rng"]
        if len(rngs) == world_size:
            set_rng_state(rngs[rank])
        else:  # a different number of processes: fresh but reproducible dropout streams
            torch.manual_seed(cfg.seed + 1000 * step + rank)
        changed = {k: (v, cfg.to_dict()[k]) for k, v in state["train_config"].items()
                   if k not in ("resume", "overwrite") and cfg.to_dict().get(k) != v}
        if master and changed:
            print("resuming with changed options: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in
                                                                changed.items()))
    else:
        # Per-rank streams for dropout; python/numpy seeded too so anything using them is reproducible.
        torch.manual_seed(cfg.seed + rank)
        random.seed(cfg.seed + rank)
        np.random.seed(cfg.seed + rank)
    last_ckpt = f"{out} (step {step})" if state is not None else "none (no checkpoint was written yet)"

    model: torch.nn.Module = torch.compile(raw_model) if cfg.compile else raw_model
    eval_model = model  # evaluation needs no gradient sync, so it bypasses the DDP wrapper
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    metrics_file = None
    if master:
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save(out)  # once per start: `gpt2 sample --model OUT` needs it
        kept = read_metrics(out, max_step=step) if state is not None else []
        # Drop what a killed run logged after its last checkpoint: those steps are about to be redone.
        with atomic_path(out / METRICS_FILE) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        metrics_file = open(out / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115 - closed in finally
        if state is not None:
            save_model(raw_model, out)  # the export may be one checkpoint ahead of the state; realign it

    tokens_per_step = cfg.batch_size * T * cfg.grad_accum * world_size
    flops_per_step = raw_model.flops_per_token(T) * tokens_per_step
    peak = measure_matmul_peak(setup.dtype, device) * world_size
    records: list[dict[str, Any]] = []
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not master, unit="step", dynamic_ncols=True)
    run_start = time.perf_counter()
    t_last = run_start
    try:
        while step < cfg.max_steps:
            # --- one optimizer step ---
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                x, y = sampler.next_batch()
                if device.type == "cuda":
                    x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
                else:
                    x, y = x.to(device), y.to(device)
                # DDP all-reduces gradients during backward; do it only on the last micro-batch.
                last = micro == cfg.grad_accum - 1
                sync = model.no_sync() if world_size > 1 and not last else contextlib.nullcontext()
                with sync:
                    with setup.autocast():
                        # Scale so the accumulated gradient is that of the mean over all micro-batches.
                        loss = next_token_loss(model(x), y) / cfg.grad_accum
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            grad_norm = None
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1

            # --- logging: the loss (averaged over ranks) is the one host-device sync per step ---
            if world_size > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= world_size
            values = torch.stack([loss_sum.float(), grad_norm.float()]) if grad_norm is not None else loss_sum[None]
            values = values.tolist()
            train_loss = values[0]
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            if not math.isfinite(train_loss):
                raise NonFiniteLossError(f"the training loss is {train_loss} at step {step}; stopping. Last good "
                                         f"checkpoint: {last_ckpt}. Resume from it with --resume and a lower "
                                         f"--lr (or more --warmup-steps / a --grad-clip)")
            record: dict[str, Any] = {"step": step, "train_loss": train_loss, "lr": lr,
                                      "tokens_per_sec": tokens_per_step / dt, "mfu": flops_per_step / dt / peak,
                                      "elapsed_s": elapsed_before + now - run_start}
            if grad_norm is not None:
                record["grad_norm"] = values[1]

            # --- evaluation, best model, checkpoint ---
            final = step == cfg.max_steps
            if step % cfg.eval_interval == 0 or final:
                record["val_loss"] = evaluate(eval_model, val_set, setup, world_size > 1)
                record["train_eval_loss"] = evaluate(eval_model, train_set, setup, world_size > 1)
                if master:
                    bar.write(f"step {step}: train {record['train_eval_loss']:.4f}, val {record['val_loss']:.4f}")
                if record["val_loss"] < best_val:
                    best_val = record["val_loss"]
                    if master:
                        _save_best(out, raw_model, tokenizer, step, best_val)
            if master:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            records.append(record)
            if step % cfg.ckpt_interval == 0 or final:
                rngs = [rng_state()]
                if world_size > 1:
                    rngs = [None] * world_size
                    dist.all_gather_object(rngs, rng_state())
                if master:
                    save_training_checkpoint(out, raw_model, {
                        "step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                        "rng": rngs, "sampler": sampler.state_dict(), "best_val_loss": best_val,
                        "elapsed_s": record["elapsed_s"], "train_config": cfg.to_dict(),
                        "model_config": raw_model.config.to_dict(), "world_size": world_size,
                    })
                last_ckpt = f"{out} (step {step})"
            bar.set_postfix_str(f"loss {train_loss:.4f} | {record['tokens_per_sec']:,.0f} tok/s | "
                                f"mfu {record['mfu']:.1%}", refresh=False)
            bar.update(1)
            t_last = time.perf_counter()  # evaluation and checkpoint time don't count against tokens/s
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
    if master:
        all_records = read_metrics(out)
        if all_records:
            plot_losses(all_records, out / PLOT_FILE)
    return TrainResult(raw_model, step, best_val, records)
