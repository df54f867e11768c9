"""Training throughput: our GPT against HF ``GPT2LMHeadModel`` (sdpa) with the same weights and optimizer.

One case = one implementation ("ours" | "hf") x one precision ("fp32" | "bf16" autocast) x eager or
``torch.compile``, trained on a fixed random batch. ``train_case`` runs a case in the current
process; ``bench/run.py`` runs each case in a fresh child (``common.run_isolated``) so that peak
RSS is per case, and interleaves the cases over several rounds so that a noisy neighbour hits all
of them alike. ``loss_curve`` trains the seed model on Tiny Shakespeare to compare bf16 with fp32.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from common import time_iterations
from torch.nn import functional as F

from gpt2model.config import GPTconfig
from gpt2model.model import GPT

# The optimizer of the seed recipe (nanoGPT's shakespeare_char), identical for both models.
# fused=True is PyTorch's single-kernel AdamW (CPU support since 2.4): one step over the seed
# model's 10.7M parameters took 45 ms fused, 374 ms foreach, 450 ms for-loop (2 cores, torch 2.13).
# Using the fastest for both keeps the comparison about the model.
ADAMW = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, fused=True)


def build_model(config: GPTconfig, seed: int = 0) -> GPT:
    """Our model with a fixed seed (the weights every case starts from)."""
    torch.manual_seed(seed)
    model = GPT(config)
    model.check_inputs = False  # the trainer checks the dataset once; the range check syncs
    return model


def hf_model_from(model: GPT) -> torch.nn.Module:
    """HF ``GPT2LMHeadModel`` (sdpa attention) holding exactly ``model``'s weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2model.hf import config_to_hf, state_dict_to_hf

    d = config_to_hf(model.config)
    d.pop("gpt2model")
    hf = GPT2LMHeadModel(GPT2Config(**d, attn_implementation="sdpa"))
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(model.state_dict(), model.config), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"HF weight mapping failed: missing={missing} unexpected={unexpected}")
    return hf


def make_loss_fn(impl: str, model: torch.nn.Module) -> Any:
    """``loss_fn(x, y) -> scalar`` as each library's users write it."""
    if impl == "ours":
        return model.loss

    def hf_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # What HF's loss does (upcast the logits, then cross-entropy), minus its internal shift of
        # the labels, so that both models predict exactly the same T tokens per row.
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    return hf_loss


def train_case(impl: str, config: dict[str, Any], batch_size: int, seq_len: int, precision: str = "fp32",
               compile: bool = False, warmup: int = 2, iters: int = 5, seed: int = 0) -> dict[str, Any]:
    """Time ``iters`` AdamW training steps of one case after ``warmup`` steps.

    Returns seconds per step (``times``), tokens per step, FLOPs per token (6N + 12·L·T·d), the
    first loss (a cross-check that both implementations compute the same thing) and a ``note``.
    """
    if impl not in ("ours", "hf"):
        raise ValueError(f"impl must be 'ours' or 'hf', got {impl!r}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    cfg = GPTconfig(**config)
    ours = build_model(cfg, seed)
    flops_per_token = ours.flops_per_token(seq_len)
    model = ours if impl == "ours" else hf_model_from(ours)
    del ours
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=g)
    y = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=g)
    loss_fn = make_loss_fn(impl, model)
    note = ""
    compile_s = None
    if compile:
        loss_fn = torch.compile(loss_fn)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    losses: list[float] = []

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(x, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())  # kept as a tensor: no host sync inside the timed step

    if compile:
        t0 = time.perf_counter()
        step()  # the first call compiles; time it separately
        compile_s = time.perf_counter() - t0
        note = f"compile {compile_s:.0f} s"
    times = time_iterations(step, warmup=warmup, iters=iters)
    return {"impl": impl, "precision": precision, "compile": compile, "batch_size": batch_size,
            "seq_len": seq_len, "tokens_per_step": batch_size * seq_len, "flops_per_token": flops_per_token,
            "times": times, "first_loss": float(losses[0]), "compile_s": compile_s, "note": note}


def loss_curve(precision: str, steps: int = 200, batch_size: int = 12, seq_len: int = 256,
               seed: int = 1337) -> list[float]:
    """Training losses of the seed model on Tiny Shakespeare (char level) for ``steps`` steps.

    Same init, same batches for every precision, so the curves differ only by arithmetic.
    """
    from gpt2model.assets import asset_path

    text = asset_path("tinyshakespeare/input.txt").read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    model = build_model(GPTconfig(vocab_size=len(chars), context_length=seq_len), seed)
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    g = torch.Generator().manual_seed(seed)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    losses = []
    for _ in range(steps):
        ix = torch.randint(len(data) - seq_len - 1, (batch_size,), generator=g)
        x = torch.stack([data[i:i + seq_len] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + seq_len] for i in ix])
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model.loss(x, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return [float(v) for v in losses]
