"""GPU training benchmark in one command (issue 11): the GPT-2 124M training step and the
shakespeare_char recipe, ours beside HF transformers and, when its files are given, nanoGPT.

    python bench/gpu.py                                    # one CUDA GPU: sections step and recipe
    python bench/gpu.py --nanogpt ~/nanoGPT/model.py       # adds nanoGPT's model (and its train.py); ~6 min
    python bench/gpu.py --only decode                      # issue 10's decode table (~2.5 min)
    python bench/gpu.py --only loss                        # the loss kernel's configurations alone (~30 s)
    python bench/gpu.py --device cpu --tiny                # the harness end to end on tiny shapes (a test)

Section ``step``: training steps of the 124M shape (batch 16 x 1024, bf16 autocast where the GPU has
it, fused AdamW, gradient clipping at 1.0) on one fixed random batch, every case from the same
weights and each in a fresh process (so peak memory is per case): ours eager and ``torch.compile``d
(as ``gpt2 train --compile`` does it: ``compile_mode`` auto, CUDA graphs on one GPU),
HF ``GPT2LMHeadModel`` (sdpa) eager, and nanoGPT's ``GPT`` compiled (its vocabulary padded to
50,304 as nanoGPT does, the extra rows zero). On CUDA our loss's softmax and gradient run in the
fused Triton kernel (``model.LOSS_KERNEL``; each row's note says which code ran). ``--levers``
adds ours compiled and eager with the loss as torch ops instead (``inductor loss``, ``torch
loss``), ours compiled without CUDA graphs, with 512 MiB loss chunks, with FlashAttention-2, with
the plain full-logits loss, without the padded head, with inductor's coordinate-descent tuning,
with clipping + AdamW compiled, with max-autotune, and with the residual stream in fp32 as nanoGPT
keeps it (``fp32 residual``: ``gpt2 train --no-bf16-residual``; every other case of ours keeps it in
bf16 under bf16 autocast, the trainer's default; to see what each lever pays), and nanoGPT
compiled with CUDA graphs and eager (``--cases`` may name any of them). Time on an H200 (measured
2026-11-26): about 40 s per case (compilation and process start dominate; ~2.7 minutes for the
four default cases), 3.5 minutes for the recipe section (ours 88 s, nanoGPT's 120 s), 2.5 for
``decode`` (three CUDA-graph captures).
Per case: tokens/s (median of timed windows; min and max in the JSON), MFU (6N + 12·L·T·d FLOPs
per token, the same count for every case, over this device's measured matmul peak in the compute
dtype: ``measure_matmul_peak``), peak memory (``torch.cuda.max_memory_allocated``; on a CPU the
process's peak RSS), the first loss (same weights and batch: ours and HF agree; nanoGPT's softmax also
covers its padded ids, about log(50304/50257) = 0.001 higher at init) and the largest logit difference
from ours before training (fp32: the weights arrived intact).

Section ``recipe``: ``recipes/shakespeare_char_gpu.toml`` with our trainer and, when ``--nanogpt``'s
folder holds ``train.py``, nanoGPT's own ``train.py config/train_shakespeare_char.py`` on the same
data files (our prepared ``train.bin``/``val.bin`` are nanoGPT's format; a ``meta.pkl`` with the
vocabulary size is written beside them): wall time and best val loss of each.

Section ``decode`` (issue 10): batch-1 and batch-8 greedy decode of the 124M shape in the compute
dtype (prompt 16, ``--new-tokens`` 200): ours eager, ours ``compile=True`` (the generation step,
sampling and the loop's bookkeeping included, captured as one CUDA graph), ours int8 compiled
(``--no-compile``: int8 eager instead), and HF ``generate``. Per case and batch: tokens/s (new tokens
of all rows over the wall time of the whole ``generate`` call, prefill included; median of
``--repeats``), decode ms/token (the steps alone: a call timed token by token, synced once after
its first token) and the time to that first token (setup + prefill), the first call's time
(compilation and graph capture), the ratio to our eager path and to HF, and whether the greedy
tokens equal our eager ones (and a seeded sampled run, for the compiled step). Each case runs in a
fresh process. ``--profile 1`` adds the kernel table of the compiled case's batch-1 call and the
runtime calls (CUDA: kernel launches, copies, graph launches) or aten ops (CPU) it ran per token.

Section ``loss``: the training loss's pass over the step's logits alone (16,384 x 50,304 bf16 on
the GPT-2 shape), inductor's compiled torch ops against the fused Triton kernel in several block
and warp configurations (``LOSS_KERNEL_CONFIGS``): ms, bandwidth and the difference from
inductor's result, in one process (about 30 s on a GPU: no model, one compilation).

Results print as tables and go to ``bench/results/gpu-<time>.json`` (or ``--out``), rewritten after
each section so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import re
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ modules

from common import RESULTS_DIR, format_table, machine_info  # noqa: E402

GPT2_SHAPE = dict(context_length=1024, vocab_size=50257, n_layer=12, n_head=12, d_model=768)
TINY_SHAPE = dict(context_length=32, vocab_size=65, n_layer=2, n_head=2, d_model=32)
RECIPE = ROOT / "recipes" / "shakespeare_char_gpu.toml"
# What a tiny recipe run changes (the harness, not the numbers, is what --tiny checks).
TINY_RECIPE = dict(max_steps=20, n_layer=1, n_head=2, d_model=32, context_length=32, batch_size=4,
                   eval_interval=10, eval_steps=2, compile=False, dropout=0.0)
# nanoGPT's published-in-issue-11 figure for its recipe, shown when its train.py is not given.
NANOGPT_RECIPE_REFERENCE = "nanoGPT on one H200 (issue 11): best val 1.4673 in 99 s (ours there: 1.4693 in 79 s)"

STEP_COLUMNS = [("case", "case"), ("tok_s", "tokens/s"), ("mfu_pct", "MFU %"), ("peak_mem_gib", "peak mem GiB"),
                ("vs_nanogpt", "vs nanoGPT compiled"), ("first_loss", "first loss"),
                ("last_loss", "loss after all steps"), ("max_logit_diff_vs_ours", "max |Δlogit| vs ours"),
                ("note", "note")]
DECODE_COLUMNS = [("case", "case"), ("batch", "batch"), ("tok_s", "tokens/s"), ("vs_eager", "vs ours eager"),
                  ("vs_hf", "vs HF"), ("decode_ms", "decode ms/token"), ("first_token_ms", "first token ms"),
                  ("first_call_s", "first call s"), ("same_greedy", "greedy = eager"), ("note", "note")]
LOSS_COLUMNS = [("case", "case"), ("ms", "ms per call"), ("gb_s", "GB/s (logits read + written once)"),
                ("vs_inductor", "vs inductor"), ("note", "note")]
# (columns per block, warps) of the fused loss kernel timed by --only loss; the first is losskernel's default.
# H200 (2026-11-26): 4096/8 1.28 ms, 8192/16 1.45, 8192/32 1.48, 16384/32 1.81; 32768 columns at 32 warps
# (Liger-Kernel's choice) spills registers (2.03 ms).
LOSS_KERNEL_CONFIGS = [(4096, 8), (4096, 4), (2048, 4), (2048, 8), (8192, 16)]
RECIPE_COLUMNS = [("impl", "trainer"), ("best_val", "best val loss"), ("train_s", "training s"),
                  ("wall_s", "wall s (process)"), ("note", "note")]


def profile_table(run: Any, device: Any, rows: int = 40) -> str:
    """Run ``run()`` under ``torch.profiler``; the top ``rows`` ops by self device time (CUDA) or
    self CPU time (CPU), as torch prints them."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=90)


# --- one training-step case (runs in its own process) ---------------------------------------------
def load_nanogpt(path: str | Path) -> Any:
    """nanoGPT's ``model.py`` as a module (it is not a dependency: the user gives its path)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "model.py"
    if not path.is_file():
        raise SystemExit(f"--nanogpt {path}: no such file; pass the path of nanoGPT's model.py "
                         f"(git clone https://github.com/karpathy/nanoGPT)")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (GPTConfig) look their module up there
    spec.loader.exec_module(module)
    if not (hasattr(module, "GPT") and hasattr(module, "GPTConfig")):
        raise SystemExit(f"--nanogpt {path}: no GPT / GPTConfig in it; is it nanoGPT's model.py?")
    return module


def nanogpt_from(model: Any, module: Any) -> Any:
    """nanoGPT's ``GPT`` holding ``model``'s weights: same parameter names and ``nn.Linear`` layout;
    the vocabulary padded to a multiple of 64 with zero rows, as nanoGPT pads GPT-2's."""
    import torch

    cfg = model.config
    padded = -(-cfg.vocab_size // 64) * 64
    conf = module.GPTConfig(block_size=cfg.context_length, vocab_size=padded, n_layer=cfg.n_layer,
                            n_head=cfg.n_head, n_embd=cfg.d_model, dropout=0.0, bias=cfg.bias)
    nano = module.GPT(conf)
    state = dict(model.state_dict())
    for key in ("transformer.wte.weight", "lm_head.weight"):
        w = state[key]
        state[key] = torch.cat([w, w.new_zeros(padded - w.size(0), w.size(1))])
    missing, unexpected = nano.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(".attn.bias")]  # its mask buffer without flash attention
    if missing or unexpected:
        raise RuntimeError(f"nanoGPT weight mapping failed: missing={missing} unexpected={unexpected}")
    return nano


def run_step_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one case, train ``warmup`` + ``windows`` x ``iters`` steps, return its figures."""
    import contextlib

    import torch
    from torch.nn import functional as F

    import gpt2model.model as model_module
    from gpt2model import GPT, GPTconfig
    from gpt2model.model import next_token_loss
    from gpt2model.train import resolve_compile_mode, uses_cuda_graphs

    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    for key, value in spec.get("inductor", {}).items():  # a lever: one of inductor's config flags
        setattr(torch._inductor.config, key, value)
    if spec.get("sdpa") == "flash":  # a lever: FlashAttention-2 instead of the default choice (cuDNN on Hopper)
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    ours = GPT(GPTconfig(**spec["shape"]))
    ours.check_inputs = False  # the trainer's setting: the range check is a host sync
    flops_per_token = ours.flops_per_token(spec["seq_len"])
    impl, lever = spec["impl"], spec.get("lever")
    if impl == "ours":
        model = ours
        if lever == "no-pad":
            model_module.VOCAB_PAD_MULTIPLE = 1
        # The trainer's default: the residual stream in bf16 under bf16 autocast (see GPT.__init__);
        # the lever keeps it in fp32 as nanoGPT does (gpt2 train --no-bf16-residual).
        model.bf16_residual = lever != "fp32-residual"
        if spec.get("loss_chunk_mib"):
            model_module.LOSS_CHUNK_BYTES = spec["loss_chunk_mib"] * 2**20
        if spec.get("loss_kernel"):  # a lever: "torch" = the loss as torch ops (inductor's kernels when compiled)
            model_module.LOSS_KERNEL = spec["loss_kernel"]
    elif impl == "hf":
        from bench_train import hf_model_from

        model = hf_model_from(ours)
    elif impl == "nanogpt":
        model = nanogpt_from(ours, load_nanogpt(spec["nanogpt"]))
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    if impl != "ours":
        # The weights must have arrived intact: compare the logits over the real vocabulary in fp32.
        probe = torch.randint(0, ours.config.vocab_size, (2, min(16, spec["seq_len"])))
        with torch.no_grad():
            theirs = model(input_ids=probe).logits if impl == "hf" else model(probe, probe)[0]
            parity = (theirs[..., : ours.config.vocab_size] - ours(probe)).abs().max().item()
    del ours
    model.to(device).train()
    # One optimizer for every case (nanoGPT's and our trainer's: AdamW, decay on >= 2-D weights, fused),
    # so the comparison is about the models.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    compiled_optimizer = spec.get("compiled_optimizer", False) and dtype != torch.float16
    # The compiled-optimizer lever: clipping and AdamW (foreach) compiled into one function, so
    # inductor can fuse the clip's scaling into the update instead of a separate pass over the grads.
    optimizer = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95),
                                  **({"foreach": True} if compiled_optimizer else {"fused": True}))

    @torch.compile(fullgraph=False)
    def clip_and_step() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    # Ours compiles as `gpt2 train --compile` does (compile_mode auto: CUDA graphs on one CUDA
    # process); nanoGPT as its train.py does (the default mode) unless the case says otherwise.
    mode = resolve_compile_mode(spec.get("compile_mode") or ("auto" if impl == "ours" else "default"), device)
    net = torch.compile(model, mode=mode) if spec["compile"] else model
    cudagraphs = spec["compile"] and uses_cuda_graphs(mode, device)

    if impl == "ours" and lever != "plain-loss":
        loss_fn = lambda x, y: net(x, targets=y)  # our trainer's call: the chunked head + loss
    elif impl == "ours":
        loss_fn = lambda x, y: next_token_loss(net(x), y)  # the full fp32 logits, as before issue 11
    elif impl == "hf":
        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            # HF's loss (upcast logits, cross-entropy) minus its internal label shift: same T targets.
            logits = net(input_ids=x).logits
            return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
    else:
        loss_fn = lambda x, y: net(x, y)[1]

    g = torch.Generator().manual_seed(1)
    vocab = spec["shape"]["vocab_size"]
    x = torch.randint(0, vocab, (spec["batch_size"], spec["seq_len"]), generator=g).to(device)
    y = torch.randint(0, vocab, (spec["batch_size"], spec["seq_len"]), generator=g).to(device)
    autocast = (contextlib.nullcontext() if dtype == torch.float32
                else torch.autocast(device_type=device.type, dtype=dtype))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> torch.Tensor:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(x, y)
        scaler.scale(loss).backward()
        if compiled_optimizer:
            clip_and_step()
        else:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
        # No host sync inside the timed steps; a copy, since a CUDA graph's outputs are overwritten
        # by its next replay.
        return loss.detach().clone()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    first_loss = step()
    sync()
    first_step_s = time.perf_counter() - t0  # includes compilation when compiled
    for _ in range(spec["warmup"]):
        step()
    sync()
    tokens_per_step = spec["batch_size"] * spec["seq_len"]
    rates = []
    for _ in range(spec["windows"]):
        t0 = time.perf_counter()
        for _ in range(spec["iters"]):
            last_loss = step()
        sync()
        rates.append(spec["iters"] * tokens_per_step / (time.perf_counter() - t0))
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    if spec.get("profile"):
        def steps() -> None:
            for _ in range(spec["profile"]):
                step()
            sync()
        print(f"--- profile: {spec['impl']} {'compiled' if spec['compile'] else 'eager'}, {spec['profile']} steps\n"
              + profile_table(steps, device), flush=True)
    # Which code computed our loss's softmax and gradient: the fused Triton kernel or torch ops.
    loss_kernel = (("triton" if model_module._use_loss_kernel(device) else "torch")
                   if impl == "ours" and lever != "plain-loss" else None)
    return {"tok_s": median(rates), "tok_s_min": min(rates), "tok_s_max": max(rates),
            "flops_per_token": flops_per_token, "peak_mem_gib": peak_mem, "first_loss": float(first_loss),
            "last_loss": float(last_loss), "first_step_s": first_step_s, "loss_kernel": loss_kernel,
            "max_logit_diff_vs_ours": parity if impl != "ours" else 0.0}


def run_loss_case(spec: dict[str, Any]) -> dict[str, Any]:
    """The training loss's pass over the logits alone, at the step's shape (batch x seq rows of the
    padded vocabulary, in the compute dtype): the torch ops compiled by inductor (``LOSS_KERNEL =
    "torch"``) and the fused Triton kernel in each of ``LOSS_KERNEL_CONFIGS``. Per case: ms per call,
    the bandwidth of one read and one write of the logits, and (kernel) the largest difference from
    inductor's loss and gradient. Cheap (no model), so configurations can be compared in one run."""
    import torch

    import gpt2model.model as model_module

    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    n_rows = spec["batch_size"] * spec["seq_len"]
    vocab = spec["shape"]["vocab_size"]
    pad = model_module.VOCAB_PAD_MULTIPLE if device.type == "cuda" else 1
    padded = -(-vocab // pad) * pad
    torch.manual_seed(0)
    logits = torch.randn(n_rows, padded, device=device).mul_(2).to(dtype)
    targets = torch.randint(0, vocab, (n_rows,), device=device)
    targets[::50] = -100
    logits_bytes = 2 * logits.numel() * logits.element_size()

    def timed(fn: Any) -> float:
        for _ in range(2):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(spec["iters"]):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / spec["iters"] * 1e3

    inductor = torch.compile(lambda lg, tg: model_module._rows_loss(lg, tg, vocab, -100, False, True))
    # On clones: with fp32 logits the torch ops work in place on them (the model's are temporaries).
    loss_ref, grad_ref = inductor(logits.clone(), targets)
    work = logits.clone()
    rows = [{"case": "inductor (torch ops compiled)", "ms": timed(lambda: inductor(work, targets))}]
    kernel = model_module.losskernel
    if kernel is None or (device.type == "cpu" and not kernel.INTERPRETED):
        rows.append({"case": "Triton kernel", "note": "not run: needs Triton and a CUDA device"})
    else:
        work = logits.clone()  # overwritten by every call (the timing does not depend on the values)
        for block, warps in LOSS_KERNEL_CONFIGS if device.type == "cuda" else LOSS_KERNEL_CONFIGS[:1]:
            kernel.BLOCK, kernel.NUM_WARPS = block, warps
            grad = logits.clone()
            loss = kernel.cross_entropy_rows_(grad, targets, vocab, -100, True).sum()
            diff = max(abs(loss - loss_ref).item() / abs(loss_ref).item(),
                       (grad.float() - grad_ref.float()).abs().max().item())
            del grad
            ms = timed(lambda: kernel.cross_entropy_rows_(work, targets, vocab, -100, True))
            rows.append({"case": f"Triton kernel, BLOCK {block}, {warps} warps", "ms": ms,
                         "note": f"max diff vs inductor {diff:.1e} (loss rel., gradient abs.)"})
    for row in rows:
        if "ms" in row:
            row["gb_s"] = logits_bytes / row["ms"] / 1e6
            row["vs_inductor"] = rows[0]["ms"] / row["ms"]
    return {"rows": rows, "rows_x_vocab": [n_rows, padded]}


def spawn_case(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``run_step_case(spec)`` (or ``run_decode_case`` / ``run_loss_case`` when ``spec["section"]`` is
    ``decode`` / ``loss``) in a fresh Python process (clean GPU memory, compile caches, peak RSS)."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--run-case", json.dumps(spec),
               "--case-out", str(result_file)]
        try:  # a profiled case prints its tables (and TORCH_LOGS output) straight through
            proc = subprocess.run(cmd, capture_output=not spec.get("profile"), text=True, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not result_file.is_file():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-6:]
            return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}
        return json.loads(result_file.read_text())


# --- one decode case (runs in its own process) ----------------------------------------------------
def _hf_first_token_streamer(sync: Any) -> Any:
    """An HF generation streamer noting when the first new token is ready (``.first``, perf_counter
    after a device sync; HF calls ``put`` with the prompt first, then once per new token)."""
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.puts, self.first = 0, None

        def put(self, value: Any) -> None:
            self.puts += 1
            if self.puts == 2:
                sync()
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    return FirstToken()


def run_decode_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Greedy ``generate`` at each batch size of one implementation; returns tokens/s (whole calls),
    the decode-only time per token and the time to the first token (from calls timed token by
    token), the first call's time and the tokens (compared across cases by the driver)."""
    import torch

    from gpt2model import GPT, GPTconfig
    from gpt2model.generate import generate, stream

    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    ours = GPT(GPTconfig(**spec["shape"]))
    impl = spec["impl"]
    if impl == "hf":
        from bench_train import hf_model_from

        model = hf_model_from(ours).to(device=device, dtype=dtype).eval()
    else:
        model = ours.to(device=device, dtype=dtype).eval()
        if spec.get("int8"):
            model.quantize("int8")
    P, N, V = spec["prompt_len"], spec["new_tokens"], spec["shape"]["vocab_size"]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(prompt: torch.Tensor, **sampling: Any) -> torch.Tensor:
        if impl == "hf":
            with torch.no_grad():
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=N,
                                     min_new_tokens=N, do_sample=False, pad_token_id=0, **sampling)
        else:
            out = generate(model, prompt, N, compile=spec["compile"], **({"temperature": 0} | sampling))
        return out[:, P:]

    def timed_by_token(prompt: torch.Tensor) -> tuple[float, float]:
        """(seconds to the first new token, seconds for the other N - 1): one call, synced once
        after its first token (what streaming costs anyway)."""
        sync()
        t0 = time.perf_counter()
        if impl == "hf":
            streamer = _hf_first_token_streamer(sync)
            run(prompt, streamer=streamer)
            first = streamer.first
        else:  # generate's own loop (views of the step buffers: no copy per token)
            it = stream(model, prompt, N, compile=spec["compile"], temperature=0, _views=True)
            next(it)
            sync()
            first = time.perf_counter()
            for _ in it:
                pass
        sync()
        return first - t0, time.perf_counter() - first

    result: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for rows in spec["batch_sizes"]:
            prompt = torch.randint(0, V, (rows, P), generator=torch.Generator().manual_seed(rows)).to(device)
            t0 = time.perf_counter()
            run(prompt)
            sync()
            first = time.perf_counter() - t0
            times, firsts, decodes = [], [], []
            for _ in range(spec["repeats"]):
                sync()
                t0 = time.perf_counter()
                tokens = run(prompt)
                sync()
                times.append(time.perf_counter() - t0)
                to_first, rest = timed_by_token(prompt)
                firsts.append(to_first)
                decodes.append(rest)
            result[str(rows)] = {"tok_s": rows * N / median(times), "first_call_s": first, "tokens": tokens.tolist(),
                                 "first_token_ms": 1000 * median(firsts),
                                 "decode_ms": 1000 * median(decodes) / max(1, N - 1)}
            if spec.get("sampled") and rows == spec["batch_sizes"][0]:
                result["sampled_tokens"] = run(prompt, temperature=0.8, top_k=200, seed=1234).tolist()
            if spec.get("profile") and rows == 1:
                print(f"--- profile: decode {spec['impl']}{' int8' if spec.get('int8') else ''}"
                      f"{' compiled' if spec['compile'] else ''}, batch {rows}, {N} tokens\n"
                      + profile_decode(lambda p=prompt: (run(p), sync()), device, N), flush=True)
    fallbacks = sorted({str(w.message)[:300] for w in caught if "decode step failed" in str(w.message)})
    if fallbacks:
        result["fallback"] = fallbacks  # the compiled step failed and generate decoded eagerly
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def profile_decode(run: Any, device: Any, new_tokens: int) -> str:
    """``profile_table`` of one decode call, then what ran outside graphs: kernel launches and
    copies (CUDA runtime calls; a compiled token should be one ``cudaGraphLaunch`` and nothing
    else) or top-level aten ops (CPU), per new token."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    outside: Counter[str] = Counter()
    for e in prof.events():
        if device.type == "cuda":
            if e.name.startswith(("cudaLaunchKernel", "cuLaunchKernel", "cudaMemcpy", "cudaMemset", "cudaGraphLaunch",
                                  "cudaStreamSynchronize")):
                outside[e.name] += 1
            continue
        parent, inside = e.cpu_parent, False
        while parent is not None and not inside:
            inside = parent.name.startswith("aten::") or "Compiled" in parent.name
            parent = parent.cpu_parent
        if not inside and e.name.startswith("aten::"):
            outside[e.name] += 1
    what = "runtime calls (all: prefill included)" if device.type == "cuda" else "top-level aten ops outside graphs"
    per_token = ", ".join(f"{name} {count / new_tokens:.2f}" for name, count in outside.most_common(12))
    return f"{table}\n{what} per new token: {per_token}"


def decode_cases(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    batches = [1, 2] if args.tiny else [1, 8]
    cases = [("ours eager", {"impl": "ours", "compile": False, "sampled": True, "batch_sizes": batches})]
    if not args.no_compile:
        cases += [("ours compiled", {"impl": "ours", "compile": True, "sampled": True, "batch_sizes": batches}),
                  ("ours int8 compiled", {"impl": "ours", "compile": True, "int8": True, "batch_sizes": batches})]
    else:
        cases.append(("ours int8 eager", {"impl": "ours", "compile": False, "int8": True, "batch_sizes": batches}))
    cases.append(("HF generate", {"impl": "hf", "compile": False, "batch_sizes": batches}))
    return cases


def same_prefix(a: list[list[int]], b: list[list[int]]) -> str:
    """``"yes"`` when equal, else how many leading tokens agree in the worst row."""
    if a == b:
        return "yes"
    agree = min(next((i for i, (x, y) in enumerate(zip(ra, rb, strict=True)) if x != y), len(ra))
                for ra, rb in zip(a, b, strict=True))
    return f"first {agree} of {len(a[0])}"


def decode_rows(results: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One table row per (case, batch), with ratios and token agreement against our eager path."""
    by_case = dict(results)
    eager, hf = by_case.get("ours eager", {}), by_case.get("HF generate", {})
    rows = []
    for name, result in results:
        if "error" in result:
            rows.append({"case": name, "note": f"failed: {result['error'][:200]}"})
            continue
        for batch, r in result.items():
            if not batch.isdigit():
                continue
            row = {"case": name, "batch": int(batch), "tok_s": r["tok_s"], "first_call_s": r["first_call_s"],
                   "decode_ms": r["decode_ms"], "first_token_ms": r["first_token_ms"]}
            if result.get("fallback"):
                row["note"] = "compile FAILED, ran eagerly: " + result["fallback"][0][:150]
            if batch in eager:
                row["vs_eager"] = r["tok_s"] / eager[batch]["tok_s"]
                if name != "ours eager":
                    row["same_greedy"] = same_prefix(r["tokens"], eager[batch]["tokens"])
            if batch in hf:
                row["vs_hf"] = r["tok_s"] / hf[batch]["tok_s"]
            first_batch = next(b for b in result if b.isdigit())
            compare = name != "ours eager" and "sampled_tokens" in result and "sampled_tokens" in eager
            if batch == first_batch and compare:
                row["note"] = "seeded sample = eager: " + same_prefix(result["sampled_tokens"], eager["sampled_tokens"])
            rows.append(row)
    return rows


# --- the recipe, ours and nanoGPT's ------------------------------------------------------------------
def _run_timed(cmd: list[str], cwd: Path, timeout: float, env: dict[str, str]) -> tuple[float, str, str | None]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t0, "", f"timed out after {timeout:.0f} s"
    wall = time.perf_counter() - t0
    error = None
    if proc.returncode != 0:
        error = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
    return wall, proc.stdout + proc.stderr, error


def prepare_data(data: str | None, work: Path, env: dict[str, str]) -> Path:
    """The shakespeare_char dataset: ``--data`` as given, else prepared here (needs Tiny Shakespeare
    under GPT2MODEL_DATA or a network)."""
    if data:
        path = Path(data).expanduser()
        if not (path / "train.bin").is_file():
            raise SystemExit(f"--data {path}: no train.bin; prepare it with 'gpt2 prepare shakespeare_char --out DIR'")
        return path
    path = work / "shakespeare_char"
    cmd = [sys.executable, "-m", "gpt2model", "prepare", "shakespeare_char", "--out", str(path), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError("could not prepare shakespeare_char: " + (proc.stderr or proc.stdout).strip()[-400:])
    return path


def run_recipe_ours(data: Path, work: Path, device: str, tiny: bool, env: dict[str, str],
                    timeout: float) -> dict[str, Any]:
    out = work / "ours"
    cmd = [sys.executable, "-m", "gpt2model", "train", "--data", str(data), "--out", str(out), "--config",
           str(RECIPE), "--overwrite", "--device", device]
    if tiny:
        for key, value in TINY_RECIPE.items():
            flag = "--" + key.replace("_", "-")
            cmd += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
        cmd += ["--dtype", "float32"]
    wall, _, error = _run_timed(cmd, ROOT, timeout, env)
    row: dict[str, Any] = {"impl": "ours", "wall_s": wall}
    if error:
        return {**row, "note": f"failed: {error}"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    return {**row, "best_val": min(vals), "train_s": records[-1]["elapsed_s"], "steps": records[-1]["step"],
            "note": "training s: the trainer's elapsed_s (evaluations included)"}


def run_recipe_nanogpt(nanogpt: Path, data: Path, work: Path, device: str, tiny: bool,
                       env: dict[str, str], timeout: float) -> dict[str, Any]:
    """nanoGPT's train.py with its shakespeare_char config, run in a folder laid out as it expects
    (``data/shakespeare_char/{train,val}.bin, meta.pkl``, ``configurator.py`` in the working folder)."""
    root = nanogpt.parent if nanogpt.suffix == ".py" else nanogpt
    config = root / "config" / "train_shakespeare_char.py"
    if not (root / "train.py").is_file() or not config.is_file():
        return {"impl": "nanoGPT", "note": f"not run: no train.py / config/train_shakespeare_char.py in {root}"}
    run = work / "nanogpt"
    dataset = run / "data" / "shakespeare_char"
    dataset.mkdir(parents=True, exist_ok=True)
    for name in ("train.bin", "val.bin"):
        (dataset / name).symlink_to(data / name)
    vocab_size = json.loads((data / "meta.json").read_text())["vocab_size"]
    with open(dataset / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": vocab_size}, f)  # the one key train.py reads
    (run / "configurator.py").symlink_to(root / "configurator.py")
    cmd = [sys.executable, str(root / "train.py"), str(config), f"--out_dir={run / 'out'}", f"--device={device}"]
    if tiny:
        cmd += ["--compile=False", "--dtype=float32", "--max_iters=20", "--lr_decay_iters=20", "--eval_interval=10",
                "--eval_iters=2", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
                "--dropout=0.0", "--log_interval=10"]
    wall, output, error = _run_timed(cmd, run, timeout, env)
    row: dict[str, Any] = {"impl": "nanoGPT", "wall_s": wall}
    if error:
        return {**row, "note": f"failed: {error}"}
    vals = [float(v) for v in re.findall(r"step \d+: train loss [\d.]+, val loss ([\d.]+)", output)]
    if not vals:
        return {**row, "note": "failed: no 'val loss' lines in nanoGPT's output"}
    return {**row, "best_val": min(vals), "note": "its own train.py; wall s includes startup and compile"}


# --- driver --------------------------------------------------------------------------------------
def step_cases(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    compiled = [] if args.no_compile else [True]
    levers = args.levers or bool(args.cases)  # --cases may name lever cases without --levers
    cases = [("ours compiled", {"impl": "ours", "compile": True})] if compiled else []
    cases.append(("ours eager", {"impl": "ours", "compile": False}))
    if levers:
        # The loss as torch ops instead of the fused Triton kernel (the default on CUDA with Triton):
        # inductor's two kernels compiled, three chunks with fp32 copies eager.
        if compiled:
            cases.append(("ours compiled, inductor loss", {"impl": "ours", "compile": True, "loss_kernel": "torch"}))
        cases.append(("ours eager, torch loss", {"impl": "ours", "compile": False, "loss_kernel": "torch"}))
    if levers and compiled:
        cases += [("ours compiled, no CUDA graphs", {"impl": "ours", "compile": True, "compile_mode": "default"}),
                  ("ours compiled, 512 MiB loss chunks", {"impl": "ours", "compile": True, "loss_chunk_mib": 512}),
                  ("ours compiled, FlashAttention", {"impl": "ours", "compile": True, "sdpa": "flash"}),
                  ("ours compiled, plain loss (full logits)", {"impl": "ours", "compile": True, "lever": "plain-loss"}),
                  ("ours compiled, unpadded head", {"impl": "ours", "compile": True, "lever": "no-pad"}),
                  ("ours compiled, coordinate descent", {"impl": "ours", "compile": True,
                                                         "inductor": {"coordinate_descent_tuning": True}}),
                  ("ours compiled, compiled optimizer", {"impl": "ours", "compile": True, "compiled_optimizer": True}),
                  ("ours compiled, max-autotune", {"impl": "ours", "compile": True,
                                                   "compile_mode": "max-autotune-no-cudagraphs"}),
                  ("ours compiled, fp32 residual", {"impl": "ours", "compile": True, "lever": "fp32-residual"})]
    cases.append(("HF GPT2LMHeadModel eager", {"impl": "hf", "compile": False}))
    if args.nanogpt:
        if compiled:
            cases.append(("nanoGPT compiled", {"impl": "nanogpt", "compile": True}))
        if levers and compiled:
            cases.append(("nanoGPT compiled, CUDA graphs",
                          {"impl": "nanogpt", "compile": True, "compile_mode": "reduce-overhead"}))
        if levers or not compiled:  # issue 11's table has no nanoGPT eager row; it costs time
            cases.append(("nanoGPT eager", {"impl": "nanogpt", "compile": False}))
    return cases


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --tiny: the harness test)")
    p.add_argument("--dtype", default=None, help="autocast dtype: bfloat16 (default on GPUs that have it), "
                   "float16, float32 (default on CPU)")
    p.add_argument("--nanogpt", default=None, metavar="PATH/model.py",
                   help="nanoGPT's model.py (its train.py beside it runs the recipe too)")
    p.add_argument("--only", default="step,recipe",
                   help="sections: step, recipe, decode, loss (comma-separated; default step,recipe: issue 11's "
                   "tables)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--iters", type=int, default=10, help="steps per timed window (default 10)")
    p.add_argument("--windows", type=int, default=3, help="timed windows per case (default 3)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first (default 3)")
    p.add_argument("--new-tokens", type=int, default=200, help="decode section: new tokens per call (default 200)")
    p.add_argument("--repeats", type=int, default=3, help="decode section: timed calls per case (default 3)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="print each case's top kernels (torch.profiler) over N training steps / one decode call")
    p.add_argument("--cases", default=None, help="only the cases whose names are listed ('; '-separated; "
                   "--levers' cases included)")
    p.add_argument("--levers", action="store_true", help="also ours compiled with the plain loss / unpadded head")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and a 20-step recipe: checks the harness")
    p.add_argument("--data", default=None, help="a prepared shakespeare_char folder (default: prepare one)")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/gpu-<time>.json)")
    p.add_argument("--run-case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--case-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = sorted(set(args.only.split(",")) - {"step", "decode", "recipe", "loss"})
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from step, decode, recipe, loss")
    return args


def selected(cases: list[tuple[str, dict[str, Any]]], args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """The cases ``--cases`` names (all without it)."""
    if not args.cases:
        return cases
    names = {n.strip() for n in args.cases.split(";")}  # case names contain commas
    return [(name, case) for name, case in cases if name in names]


def step_section(args: argparse.Namespace, common: dict[str, Any], batch_size: int, seq_len: int, peak: float,
                 timeout: float) -> list[dict[str, Any]]:
    rows = []
    for name, case in selected(step_cases(args), args):
        spec = {**case, **common, "profile": args.profile, "batch_size": batch_size,
                "seq_len": seq_len, "iters": 2 if args.tiny else args.iters,
                "windows": 2 if args.tiny else args.windows, "warmup": 1 if args.tiny else args.warmup,
                "nanogpt": str(Path(args.nanogpt).expanduser().resolve()) if args.nanogpt else None}
        result = spawn_case(spec, timeout)
        row = {"case": name, **result}
        if "error" in result:
            row["note"] = f"failed: {result['error'][:200]}"
        else:
            row["mfu_pct"] = 100 * result["tok_s"] * result["flops_per_token"] / peak
            row["note"] = f"first step {result['first_step_s']:.1f} s"
            if result.get("loss_kernel"):
                row["note"] += f", loss: {'Triton kernel' if result['loss_kernel'] == 'triton' else 'torch ops'}"
        rows.append(row)
        print(f"  {name}: " + (row["note"] if "error" in result else f"{row['tok_s']:,.0f} tokens/s"), flush=True)
    reference = next((r for r in rows if r["case"] == "nanoGPT compiled" and "tok_s" in r), None)
    for row in rows:
        if reference and "tok_s" in row:
            row["vs_nanogpt"] = row["tok_s"] / reference["tok_s"]
    print(f"\nTraining step, {'tiny shape' if args.tiny else 'GPT-2 124M'}, batch {batch_size} x {seq_len}, "
          f"{common['dtype'] if common['dtype'] == 'float32' else common['dtype'] + ' autocast'}, fused AdamW:")
    print(format_table(rows, STEP_COLUMNS))
    return rows


def decode_section(args: argparse.Namespace, common: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    results = []
    for name, case in selected(decode_cases(args), args):
        profiled = name == ("ours eager" if args.no_compile else "ours compiled")  # --profile: its batch-1 call
        spec = {**case, **common, "section": "decode", "profile": bool(args.profile) and profiled,
                "prompt_len": 4 if args.tiny else 16,
                "new_tokens": 8 if args.tiny else args.new_tokens, "repeats": 1 if args.tiny else args.repeats}
        result = spawn_case(spec, timeout)
        results.append((name, result))
        print(f"  {name}: " + (f"failed: {result['error'][:200]}" if "error" in result else ", ".join(
            f"batch {b} {r['tok_s']:,.0f} tokens/s" for b, r in result.items() if b.isdigit())), flush=True)
    rows = decode_rows(results)
    print(f"\nDecode, {'tiny shape' if args.tiny else 'GPT-2 124M'}, {common['dtype']} weights, prompt "
          f"{4 if args.tiny else 16}, {8 if args.tiny else args.new_tokens} new tokens, greedy:")
    print(format_table(rows, DECODE_COLUMNS))
    return rows


def loss_section(args: argparse.Namespace, common: dict[str, Any], batch_size: int, seq_len: int,
                 timeout: float) -> list[dict[str, Any]]:
    spec = {**common, "section": "loss", "batch_size": batch_size, "seq_len": seq_len,
            "iters": 2 if args.tiny else 20}
    result = spawn_case(spec, timeout)
    if "error" in result:
        rows = [{"case": "loss section", "note": f"failed: {result['error'][:200]}"}]
    else:
        rows = result["rows"]
    print(f"\nLoss pass alone (softmax, loss, gradient) over {batch_size * seq_len:,} x "
          f"{result.get('rows_x_vocab', [0, '?'])[1]} {common['dtype']} logits:")
    print(format_table(rows, LOSS_COLUMNS))
    return rows


def recipe_section(args: argparse.Namespace, device: Any, env: dict[str, str]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        recipe_rows = []
        try:
            data = prepare_data(args.data, work, env)
        except RuntimeError as e:
            recipe_rows.append({"impl": "ours", "note": f"not run: {e}"})
        else:
            recipe_timeout = 240 if args.tiny else 900
            recipe_rows.append(run_recipe_ours(data, work, str(device), args.tiny, env, recipe_timeout))
            print(f"  ours: {recipe_rows[-1]}", flush=True)  # an interrupted run keeps it in the log
            if args.nanogpt:
                nanogpt = Path(args.nanogpt).expanduser().resolve()  # it runs in its own folder
                recipe_rows.append(run_recipe_nanogpt(nanogpt, data, work, str(device), args.tiny, env, recipe_timeout))
            else:
                recipe_rows.append({"impl": "nanoGPT", "note": NANOGPT_RECIPE_REFERENCE})
    print(f"\nRecipe {RECIPE.relative_to(ROOT)}{' (tiny: 20 steps of a 1-layer model)' if args.tiny else ''}:")
    print(format_table(recipe_rows, RECIPE_COLUMNS))
    return recipe_rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_case is not None:  # a child: one case
        spec = json.loads(args.run_case)
        run = {"decode": run_decode_case, "loss": run_loss_case}.get(spec.get("section"), run_step_case)
        Path(args.case_out).write_text(json.dumps(run(spec)))
        return 0

    import torch

    from gpt2model.device import measure_matmul_peak

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)  # the cases call torch.cuda.set_device, which needs an index
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: run this on a GPU machine, or check the harness with "
                         "--device cpu --tiny")
    dtype_name = args.dtype or ("float32" if device.type == "cpu" else
                                "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    dtype = getattr(torch, dtype_name)
    shape = TINY_SHAPE if args.tiny else GPT2_SHAPE
    batch_size, seq_len = (4, 32) if args.tiny else (args.batch_size, args.seq_len)
    info = machine_info()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    peak = measure_matmul_peak(dtype, device)
    results: dict[str, Any] = {"machine": info, "device": str(device), "dtype": dtype_name, "shape": shape,
                               "batch_size": batch_size, "seq_len": seq_len, "matmul_peak_tflops": peak / 1e12}
    print(f"{info.get('gpu', info['cpu'])}, torch {torch.__version__}; measured {dtype_name} matmul peak "
          f"{peak / 1e12:.3g} TFLOP/s")
    timeout = 120 if args.tiny else 300
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]  # the case children import this checkout's gpt2model

    path = Path(args.out) if args.out else RESULTS_DIR / f"gpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    common = {"device": str(device), "dtype": dtype_name, "shape": shape}
    for section in args.only.split(","):  # in the order given; the JSON is rewritten after each
        if section == "step":
            results["step"] = step_section(args, common, batch_size, seq_len, peak, timeout)
        elif section == "decode":
            results["decode"] = decode_section(args, common, timeout)
        elif section == "recipe":
            results["recipe"] = recipe_section(args, device, env)
        elif section == "loss":
            results["loss"] = loss_section(args, common, batch_size, seq_len, timeout)
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    failed = [r["case"] for r in results.get("step", []) if "error" in r]
    failed += [r["case"] for r in results.get("decode", []) if str(r.get("note", "")).startswith("failed")]
    failed += [r["impl"] for r in results.get("recipe", []) if str(r.get("note", "")).startswith("failed")]
    failed += [r["case"] for r in results.get("loss", []) if str(r.get("note", "")).startswith("failed")]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
