"""Training: ``train(cfg)`` runs the whole loop; everything one optimizer step does is visible in it.

The pieces around the loop are small functions the benchmark and tests use too: ``lr_at`` (warmup +
cosine), ``configure_optimizer`` (AdamW, decay on >=2-D weights only) and ``estimate_loss`` (mean
loss over a fixed set of windows). Device and precision come from ``device.py``; the run folder
(training state, metrics, best model, and why a kill at any instant leaves it consistent) is
``runfolder.py``.

Distributed: under ``torchrun --nproc_per_node N -m gpt2model train ...`` every process runs
``train``; DDP averages gradients (gloo on CPU, NCCL on GPU), each rank draws its own rows of one
shared random batch (``BatchSampler(rank, world_size)``), and only rank 0 logs and writes files.
Global batch = batch_size * grad_accum * world_size windows.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import save_model
from .config import MODEL_FIELDS, GPTconfig, TrainConfig
from .data import BatchSampler, eval_batches, open_dataset
from .device import DeviceSetup, measure_matmul_peak, setup_device
from .model import GPT
from .runfolder import (
    PLOT_FILE,
    TRAINING_STATE_FILE,
    best_so_far,
    check_out,
    clean_up_after_kill,
    clear_out,
    load_training_state,
    lock_run_folder,
    open_metrics,
    plot_losses,
    read_metrics,
    rng_state,
    save_best,
    save_training_checkpoint,
    set_rng_state,
)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step and the last checkpoint."""


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
def estimate_loss(model: torch.nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], setup: DeviceSetup,
             distributed: bool = False) -> float:
    """Token-weighted mean loss over ``batches`` (on the device). ``distributed``: each rank holds
    its share of the rows and the sums are all-reduced, so every rank returns the same value."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=setup.device, dtype=torch.float64)  # sum of losses, number of tokens
    for x, y in batches:
        if y.numel():
            with setup.autocast():
                loss = model(x, targets=y)  # the model's own loss: no full logits
            total[0] += loss.double() * y.numel()
            total[1] += y.numel()
    if distributed:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


# --- setup ---------------------------------------------------------------------------------------
# torch.compile modes that replay the compiled forward and backward as CUDA graphs.
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def resolve_compile_mode(mode: str, device: torch.device, grad_accum: int = 1, world_size: int = 1) -> str:
    """The ``torch.compile`` mode to train with: ``mode`` itself, or for ``"auto"`` CUDA graphs
    (``"reduce-overhead"``) where they are safe, ``"default"`` elsewhere.

    CUDA graphs remove the per-kernel launch cost, which is most of a small model's step on a fast
    GPU. They are used only on one CUDA process with ``grad_accum == 1``: the backward graph's
    outputs become the ``.grad`` tensors, and accumulating a second micro-batch into them silently
    gives wrong gradients (pytorch/pytorch#169545), while DDP's all-reduce hooks run outside the
    graphs. Asking for a CUDA-graph mode in those cases is an error rather than a wrong result.
    """
    if mode == "auto":
        return "reduce-overhead" if device.type == "cuda" and grad_accum == 1 and world_size == 1 else "default"
    if mode in CUDAGRAPH_MODES and device.type == "cuda" and (grad_accum > 1 or world_size > 1):
        raise ValueError(f"compile_mode {mode!r} uses CUDA graphs, which give wrong gradients with gradient "
                         f"accumulation and do not cover DDP's all-reduce (grad_accum={grad_accum}, "
                         f"processes={world_size}): use --compile-mode default (or auto)")
    return mode


def uses_cuda_graphs(mode: str, device: torch.device) -> bool:
    """Whether a model compiled in (resolved) ``mode`` on ``device`` replays CUDA graphs, whose
    outputs the next replay overwrites (mark each step with ``cudagraph_mark_step_begin``)."""
    return mode in CUDAGRAPH_MODES and device.type == "cuda"


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
        if vocab_size > model.config.vocab_size and _adds_tokens(cfg.data, cfg.init_from):
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"gpt2 train: the dataset's tokenizer adds {vocab_size - model.config.vocab_size} token(s) to "
                      f"{cfg.init_from}'s: its token embedding grows to {vocab_size} rows (the new ones start as "
                      f"the mean of the others, as transformers' resize_token_embeddings)", flush=True)
            model = _grow_vocab(model, vocab_size)
    if vocab_size > model.config.vocab_size:
        raise ValueError(f"the dataset {cfg.data} has {vocab_size} token ids but the model's vocab_size is "
                         f"{model.config.vocab_size}: prepare the data with the model's tokenizer, or train "
                         f"from scratch")
    return model.train()


def _grow_vocab(model: GPT, vocab_size: int) -> GPT:
    """``model`` with ``vocab_size`` token ids: new embedding rows (and so, tied, head rows) are the
    mean of the old rows, what transformers' ``resize_token_embeddings`` starts them at (its
    default ``mean_resizing`` draws them from N(mean, 1e-9 * covariance)): a new token's logit
    then starts near the average one instead of dominating or vanishing."""
    old = model.transformer.wte.weight.detach()
    grown = GPT(GPTconfig.from_dict({**model.config.to_dict(), "vocab_size": vocab_size}))
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to wte
    state["transformer.wte.weight"] = torch.cat([old, old.mean(0, keepdim=True).expand(vocab_size - len(old), -1)])
    grown.load_state_dict(state, strict=False)
    return grown


def _init_tokenizer(init_from: str) -> Any:
    """The tokenizer of the model to fine-tune: its folder's, or GPT-2's for a hub name or a HF folder
    without tokenizer files whose vocabulary is GPT-2's (None where there is none to compare)."""
    from .tokenizer import model_tokenizer

    try:
        return model_tokenizer(init_from)
    except FileNotFoundError:
        return None


def _adds_tokens(data: str, init_from: str) -> bool:
    """Whether the dataset's tokenizer is the model's with tokens added (``tokenizer.extends``)."""
    from .tokenizer import extends

    model_tok = _init_tokenizer(init_from)
    return model_tok is not None and extends(model_tok, open_dataset(data).tokenizer())


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


def _check_init_tokenizer(data: str, init_from: str, source: str = "--init-from") -> None:
    """Fine-tuning (and resuming: ``source`` "the run being resumed", the run folder's tokenizer)
    reads the dataset's ids as the loaded model's tokens: refuse a dataset prepared with another
    tokenizer (a char dataset for GPT-2 trained silently: its ids are in range)."""
    from .tokenizer import extends, same_ids

    if not Path(data).expanduser().is_dir() or not Path(init_from).expanduser().is_dir():
        return  # check_paths() names a missing dataset; a hub name is GPT-2's, checked by vocabulary size there
    model_tok = _init_tokenizer(init_from)
    if model_tok is None:
        return
    data_tok = open_dataset(data).tokenizer()
    # Tokens added to the model's tokenizer (a ChatML fine-tune's): --init-from grows the embedding
    if not same_ids(data_tok, model_tok) and not (source == "--init-from" and extends(model_tok, data_tok)):
        raise ValueError(f"--data {data} was tokenized with {data_tok!r}, not with the tokenizer of {source} "
                         f"{init_from} ({model_tok!r}): the model would read its ids as other tokens. Prepare the "
                         f"text with 'gpt2 prepare ... --tokenizer {init_from}' (or with a copy of that tokenizer "
                         f"with tokens added, e.g. HF's add_special_tokens)")


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
    if cfg.init_from != "scratch" and not cfg.resume:
        _check_init_tokenizer(cfg.data, cfg.init_from)
    if cfg.resume and (Path(cfg.out).expanduser() / TRAINING_STATE_FILE).is_file():
        # Resuming on another dataset is fine, on one of another tokenizer silently garbage
        _check_init_tokenizer(cfg.data, cfg.out, "the run being resumed, --out")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    setup = setup_device(cfg.device, cfg.dtype, tf32=True)  # TF32 is fine for gradient steps
    if cfg.bf16_residual is True and setup.dtype != torch.bfloat16:
        raise ValueError(f"bf16_residual keeps the residual stream in bfloat16 under bf16 autocast, but this run "
                         f"computes in {str(setup.dtype).removeprefix('torch.')} (dtype {cfg.dtype!r} on "
                         f"{setup.device}): pass --dtype bfloat16, or leave out --bf16-residual")
    # One process (group) per run folder; only rank 0 writes, so only it holds the lock.
    lock = lock_run_folder(Path(cfg.out)) if rank == 0 else None
    try:
        if world_size > 1:
            dist.init_process_group(backend="nccl" if setup.device.type == "cuda" else "gloo")
        try:
            return _train(cfg, setup, rank, world_size)
        finally:
            if world_size > 1:
                dist.destroy_process_group()
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, setup: DeviceSetup, rank: int, world_size: int) -> TrainResult:
    from tqdm.auto import tqdm

    master = rank == 0
    device = setup.device
    out = Path(cfg.out)
    data = open_dataset(cfg.data)
    resume = check_out(out, resume=cfg.resume, overwrite=cfg.overwrite)
    if master:
        clean_up_after_kill(out)
    state = load_training_state(out) if resume else None
    if cfg.bf16_residual is None:
        # Unset: a resumed run keeps the stream it was trained with (runs of versions before this default
        # stored false), so that it resumes exactly; a new run keeps it in bf16 under bf16 autocast. The
        # resolved value is what the checkpoints store.
        stored = (state or {}).get("train_config", {}).get("bf16_residual")
        cfg = replace(cfg, bf16_residual=stored if isinstance(stored, bool) else setup.dtype == torch.bfloat16)

    # Model: same seed on every rank, so every rank starts from the same weights. Built (and a
    # --init-from source read) before a previous run is cleared: the source may live in --out.
    torch.manual_seed(cfg.seed)
    raw_model = _build_model(cfg, data.vocab_size, state)
    if world_size > 1:
        dist.barrier()  # every rank has read --init-from before rank 0 clears the folder
    if master and state is None:
        clear_out(out)
    T = raw_model.config.context_length
    _check_data(data, T, cfg.data)
    raw_model.to(device)
    raw_model.check_inputs = False  # the dataset's ids are known to fit; skip the per-forward sync
    raw_model.bf16_residual = cfg.bf16_residual
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
    best_val = best_so_far(out, state)
    if state is not None:
        step, elapsed_before = _restore(state, cfg, optimizer, scaler, sampler, rank, world_size)
    else:
        # Per-rank streams for dropout; python/numpy seeded too so anything using them is reproducible.
        torch.manual_seed(cfg.seed + rank)
        random.seed(cfg.seed + rank)
        np.random.seed(cfg.seed + rank)
    last_ckpt = f"{out} (step {step})" if state is not None else None

    model: torch.nn.Module = raw_model
    cudagraphs = False
    if cfg.compile:
        mode = resolve_compile_mode(cfg.compile_mode, device, cfg.grad_accum, world_size)
        cudagraphs = uses_cuda_graphs(mode, device)
        model = torch.compile(raw_model, mode=mode)
    eval_model = model  # evaluation needs no gradient sync, so it bypasses the DDP wrapper
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    metrics_file = None
    if master:
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save(out)  # once per start: `gpt2 sample --model OUT` needs it
        metrics_file = open_metrics(out, step if state is not None else None)
        if state is not None:
            # the export may be one checkpoint ahead of the state; realign it
            save_model(raw_model, out, tokenizer, save_tokenizer=False)

    tokens_per_step = cfg.batch_size * T * cfg.grad_accum * world_size
    flops_per_step = raw_model.flops_per_token(T) * tokens_per_step
    peak = measure_matmul_peak(setup.dtype, device) * world_size
    if master:
        _warn_if_slow(flops_per_step / peak, T)
    records: list[dict[str, Any]] = []
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not master, unit="step", dynamic_ncols=True)
    run_start = time.perf_counter()
    t_last, step_last = run_start, step
    try:
        while step < cfg.max_steps:
            lr = lr_at(step, cfg)
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are done with
            loss_t, grad_norm_t = _optimizer_step(model, raw_model, optimizer, scaler, sampler, setup, cfg, lr,
                                                  world_size)
            step += 1
            final = step == cfg.max_steps
            evaluate_now = step % cfg.eval_interval == 0 or final
            checkpoint_now = step % cfg.ckpt_interval == 0 or final
            if not (evaluate_now or checkpoint_now or step % cfg.log_interval == 0):
                bar.update(1)
                continue  # nothing read back: the host queues the next step while the device works

            # --- logging: reading the loss back is the one host-device sync, every log_interval steps ---
            train_loss, grad_norm = _read_back(loss_t, grad_norm_t, world_size)
            now = time.perf_counter()
            if master and t_last == run_start and now - run_start > 10:  # the first log of this process
                bar.write(f"the first {step - step_last} step(s) took {now - run_start:.0f} s (with warm-up; later "
                          f"steps are usually faster)")
            dt = (now - t_last) / (step - step_last)  # seconds per step since the last log
            if not math.isfinite(train_loss):
                raise NonFiniteLossError(_non_finite_message(train_loss, step, last_ckpt))
            record: dict[str, Any] = {"step": step, "train_loss": train_loss, "lr": lr,
                                      "tokens_per_sec": tokens_per_step / dt, "mfu": flops_per_step / dt / peak,
                                      "elapsed_s": elapsed_before + now - run_start}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm

            # --- evaluation, best model, checkpoint ---
            if evaluate_now:
                record["val_loss"] = estimate_loss(eval_model, val_set, setup, world_size > 1)
                record["train_eval_loss"] = estimate_loss(eval_model, train_set, setup, world_size > 1)
                if master:
                    bar.write(f"step {step}: train {record['train_eval_loss']:.4f}, val {record['val_loss']:.4f}")
                if record["val_loss"] < best_val:
                    best_val = record["val_loss"]
                    if master:
                        save_best(out, raw_model, tokenizer, step, best_val)
            if master:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            records.append(record)
            if checkpoint_now:
                _save_checkpoint(out, raw_model, optimizer, scaler, sampler, cfg, step, best_val,
                                 record["elapsed_s"], rank, world_size, tokenizer)
                last_ckpt = f"{out} (step {step})"
            bar.set_postfix_str(f"loss {train_loss:.4f} | {record['tokens_per_sec']:,.0f} tok/s | "
                                f"mfu {record['mfu']:.1%}", refresh=False)
            bar.update(1)
            # Evaluation and checkpoint time don't count against tokens/s.
            t_last, step_last = time.perf_counter(), step
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
    if master:
        all_records = read_metrics(out)
        if all_records:
            plot_losses(all_records, out / PLOT_FILE)
    return TrainResult(raw_model, step, best_val, records)


def _optimizer_step(model: torch.nn.Module, raw_model: GPT, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, sampler: BatchSampler, setup: DeviceSetup, cfg: TrainConfig,
                    lr: float, world_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over ``grad_accum`` micro-batches; returns this rank's mean loss and the
    gradient norm before clipping (None without clipping) as device tensors: nothing here waits
    for the device (``_read_back`` does, at logging steps)."""
    device = setup.device
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
                # The model returns the loss itself: its head never materialises the logits.
                loss = model(x, targets=y) / cfg.grad_accum
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    grad_norm = None
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss_sum, grad_norm


def _read_back(loss_sum: torch.Tensor, grad_norm: torch.Tensor | None, world_size: int) -> tuple[float, float | None]:
    """The step's loss (averaged over ranks) and gradient norm as numbers: the host-device sync.
    Every rank calls it at the same steps (the all-reduce is collective)."""
    if world_size > 1:
        loss_sum = loss_sum.clone()
        dist.all_reduce(loss_sum)
        loss_sum /= world_size
    values = torch.stack([loss_sum.float(), grad_norm.float()]) if grad_norm is not None else loss_sum[None]
    values = values.tolist()
    return values[0], (values[1] if grad_norm is not None else None)


def _warn_if_slow(seconds_at_peak: float, context_length: int) -> None:
    """Say so before the first step when one step will take long (no progress shows for that long)."""
    if seconds_at_peak > 30:
        print(f"warning: one optimizer step needs at least {seconds_at_peak:,.0f} s on this device (its FLOPs at "
              f"the measured matmul peak; context_length {context_length:,}, and attention grows with its "
              f"square). Use a smaller --context-length / --batch-size, or a faster device", flush=True)


def _non_finite_message(loss: float, step: int, last_ckpt: str | None) -> str:
    if last_ckpt is None:
        return (f"the training loss is {loss} at step {step}; stopping. No checkpoint was written yet, so there "
                f"is nothing to resume: start again (--overwrite) with a lower --lr (or more --warmup-steps / a "
                f"--grad-clip)")
    return (f"the training loss is {loss} at step {step}; stopping. Last good checkpoint: {last_ckpt}. Resume "
            f"from it with --resume and a lower --lr (or more --warmup-steps / a --grad-clip)")


def _restore(state: dict[str, Any], cfg: TrainConfig, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler, sampler: BatchSampler, rank: int, world_size: int) -> tuple[int, float]:
    """Continue a run from its training state: optimizer, scaler, batch stream and random streams.
    Returns the step and the training time so far."""
    step = int(state["step"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    try:
        sampler.load_state_dict(state["sampler"])
    except ValueError as e:  # name the options to pass: "the same command plus --resume"
        stored = state.get("train_config", {})
        given = [f"--{k.replace('_', '-')} {stored[k]}" for k in ("batch_size", "data")
                 if k in stored and stored[k] != getattr(cfg, k)]
        if not given:
            raise
        raise ValueError(f"{e}. The run was trained with {' '.join(given)}: resume with the command that started "
                         f"it plus --resume") from None
    rngs = state["rng"]
    if len(rngs) == world_size:
        set_rng_state(rngs[rank])
    else:  # a different number of processes: fresh but reproducible dropout streams
        torch.manual_seed(cfg.seed + 1000 * step + rank)
    if rank == 0:
        now = cfg.to_dict()
        stored = state["train_config"]
        gone = sorted(k for k in stored if k not in now)
        if gone:
            # Written by a version with options this one no longer has: nothing to apply them to.
            print(f"note: ignoring options of the saved run that this version does not know: {', '.join(gone)}")
        changed = {k: (v, now[k]) for k, v in stored.items()
                   if k in now and k not in ("resume", "overwrite") and now[k] != v}
        if changed:
            print("resuming with changed options: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in
                                                                changed.items()))
    return step, float(state["elapsed_s"])


def _save_checkpoint(out: Path, raw_model: GPT, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                     sampler: BatchSampler, cfg: TrainConfig, step: int, best_val: float, elapsed_s: float,
                     rank: int, world_size: int, tokenizer: Any) -> None:
    """Gather every rank's random streams and let rank 0 write the training state."""
    rngs = [rng_state()]
    if world_size > 1:
        rngs = [None] * world_size
        dist.all_gather_object(rngs, rng_state())
    if rank == 0:
        save_training_checkpoint(out, raw_model, {
            "step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "rng": rngs, "sampler": sampler.state_dict(), "best_val_loss": best_val,
            "elapsed_s": elapsed_s, "train_config": cfg.to_dict(),
            "model_config": raw_model.config.to_dict(), "world_size": world_size,
        }, tokenizer=tokenizer)
