"""The model itself: the seed's usage, shapes, causality, batch independence, dropout, bad input,
parameter counts, and the loss."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from gpt2model import GPT, GPTconfig

TINY = GPTconfig(context_length=32, vocab_size=50, n_layer=2, n_head=2, d_model=32)


def test_seed_usage_verbatim() -> None:
    # The snippet from SEED.md, unchanged.
    from gpt2model import GPT, GPTconfig

    batch_size, seq_len = 2, 17
    config = GPTconfig()
    model = GPT(config)
    input_ids = torch.randint(0, config.vocab_size, (batch_size, seq_len))
    logits = model(input_ids)  # Shape: (batch_size, seq_len, vocab_size)
    assert logits.shape == (batch_size, seq_len, config.vocab_size)
    assert logits.dtype == torch.float32


def test_architecture_matches_the_seed() -> None:
    model = GPT(GPTconfig())
    assert model.lm_head.bias is None  # no bias in the LM head
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    assert model.transformer.wpe.weight.shape == (256, 384)  # learned positions
    assert len(model.transformer.h) == 6
    block = model.transformer.h[0]
    assert block.mlp.c_fc.out_features == 4 * 384
    # Pre-norm: each residual branch starts with its LayerNorm.
    x = torch.randn(1, 5, 384)
    torch.manual_seed(0)
    with torch.no_grad():
        manual = x + block.attn(block.ln_1(x))
        manual = manual + block.mlp(block.ln_2(manual))
        assert torch.allclose(block(x), manual)
        # tanh-GELU
        h = torch.randn(3, 384)
        expected = block.mlp.c_proj(0.5 * block.mlp.c_fc(h) * (1 + torch.tanh(
            (2 / torch.pi) ** 0.5 * (block.mlp.c_fc(h) + 0.044715 * block.mlp.c_fc(h) ** 3))))
        assert torch.allclose(block.mlp(h), expected, atol=1e-5)


def test_gpt2_initialisation() -> None:
    torch.manual_seed(0)
    model = GPT(GPTconfig(n_layer=8, d_model=256, n_head=4, vocab_size=5000))
    std = lambda t: t.detach().std().item()  # noqa: E731
    assert abs(std(model.transformer.wte.weight) - 0.02) < 0.002
    assert abs(std(model.transformer.h[0].mlp.c_fc.weight) - 0.02) < 0.002
    assert abs(std(model.transformer.h[0].attn.c_proj.weight) - 0.02 / (2 * 8) ** 0.5) < 0.001
    assert abs(std(model.transformer.h[3].mlp.c_proj.weight) - 0.02 / (2 * 8) ** 0.5) < 0.001
    assert torch.count_nonzero(model.transformer.h[0].attn.c_attn.bias) == 0
    assert torch.all(model.transformer.ln_f.weight == 1)


@pytest.mark.parametrize(
    "preset, expected",
    [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)],
)
def test_preset_parameter_counts(preset: str, expected: int) -> None:
    with torch.device("meta"):  # shapes only, no memory
        model = GPT(GPTconfig.preset(preset))
    assert model.num_params() == expected  # tied head counted once, as HF counts it
    assert model.num_params(non_embedding=True) == expected - 1024 * model.config.d_model


def test_causality() -> None:
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    x = torch.randint(0, TINY.vocab_size, (1, 20))
    base = model(x)
    for t in (0, 7, 19):
        y = x.clone()
        y[0, t] = (y[0, t] + 1) % TINY.vocab_size
        out = model(y)
        assert torch.equal(out[:, :t], base[:, :t]), f"changing token {t} changed earlier logits"
        assert not torch.allclose(out[:, t], base[:, t])


def test_batch_independence() -> None:
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    x = torch.randint(0, TINY.vocab_size, (4, 16))
    together = model(x)
    for i in range(4):
        assert torch.allclose(model(x[i : i + 1]), together[i : i + 1], atol=1e-6)


def test_eval_deterministic_and_dropout_only_in_train_mode() -> None:
    torch.manual_seed(0)
    model = GPT(GPTconfig(**{**TINY.to_dict(), "dropout": 0.3}))
    x = torch.randint(0, TINY.vocab_size, (2, 16))
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    a, b = model(x), model(x)
    assert not torch.allclose(a, b), "dropout should make train-mode forwards differ"
    # With dropout=0 train mode is deterministic too.
    torch.manual_seed(0)
    plain = GPT(TINY).train()
    assert torch.equal(plain(x), plain(x))


def test_attention_dropout_is_used() -> None:
    # Dropout on attention weights (not only residuals): with residual dropout modules disabled
    # the output must still vary in train mode.
    torch.manual_seed(0)
    model = GPT(GPTconfig(**{**TINY.to_dict(), "dropout": 0.5})).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    x = torch.randint(0, TINY.vocab_size, (1, 16))
    assert not torch.allclose(model(x), model(x))


@pytest.mark.parametrize(
    "make_input, fragment",
    [
        (lambda: torch.randn(1, 4), "integer token ids"),
        (lambda: torch.zeros(1, 4, dtype=torch.bool), "integer token ids"),
        (lambda: [[1, 2, 3]], "must be a torch.Tensor"),
        (lambda: torch.tensor([1, 2, 3]), "shape (batch, seq_len), got shape (3,) (for one sequence use"),
        (lambda: torch.zeros(1, 2, 3, dtype=torch.long), "shape (batch, seq_len), got shape (1, 2, 3)"),
        (lambda: torch.zeros(1, 0, dtype=torch.long), "empty"),
        (lambda: torch.zeros(1, 33, dtype=torch.long), "sequence length 33 exceeds the model's context_length 32"),
        (lambda: torch.tensor([[1, 50]]), "token id 50 is out of range: ids must be in [0, 50)"),
        (lambda: torch.tensor([[-1, 3]]), "token id -1 is out of range"),
    ],
)
def test_bad_input_raises_clear_value_error(make_input, fragment: str) -> None:
    model = GPT(TINY)
    with pytest.raises(ValueError) as e:
        model(make_input())
    assert fragment in str(e.value)


def test_int32_ids_accepted() -> None:
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    x = torch.randint(0, TINY.vocab_size, (2, 8))
    assert torch.equal(model(x.int()), model(x))


def test_loss_is_next_token_cross_entropy() -> None:
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    x = torch.randint(0, TINY.vocab_size, (3, 17))
    inp, tgt = x[:, :-1], x[:, 1:].clone()
    logits = model(inp)
    expected = F.cross_entropy(logits.reshape(-1, TINY.vocab_size), tgt.reshape(-1))
    assert torch.allclose(model.loss(inp, tgt), expected, atol=1e-6)
    # ignore_index: masked positions do not count
    tgt[:, :5] = -100
    masked = F.cross_entropy(logits[:, 5:].reshape(-1, TINY.vocab_size), tgt[:, 5:].reshape(-1))
    assert torch.allclose(model.loss(inp, tgt), masked, atol=1e-6)
    with pytest.raises(ValueError, match="targets must have the shape"):
        model.loss(inp, tgt[:, :3])


def test_loss_backward_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    model = GPT(TINY)
    x = torch.randint(0, TINY.vocab_size, (2, 9))
    model.loss(x[:, :-1], x[:, 1:]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_kv_cache_prefill_matches_plain_forward() -> None:
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    x = torch.randint(0, TINY.vocab_size, (2, 12))
    with torch.no_grad():
        plain = model(x)
        model.setup_cache(batch_size=2)
        cached = model(x, input_pos=torch.arange(12))
        step = model(x[:, 11:12] * 0 + 3, input_pos=torch.tensor([12]))
        model.clear_cache()
        y = torch.cat([x, torch.full((2, 1), 3)], dim=1)
        assert torch.allclose(cached, plain, atol=1e-5)
        assert torch.allclose(step[:, 0], model(y)[:, 12], atol=1e-5)
    with pytest.raises(ValueError, match="input_pos is only meaningful with a KV cache"):
        model(x, input_pos=torch.arange(12))


def test_gelu_tanh_compiled_cpu_form_is_the_same_function() -> None:
    """Under torch.compile on a CPU the MLP's GELU is written as x * sigmoid(2u) (faster there):
    values and gradients must equal PyTorch's tanh-approximate GELU."""
    from gpt2model.model import gelu_tanh

    x = torch.linspace(-12, 12, 4001, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    want = F.gelu(x64, approximate="tanh")  # the fp64 truth
    (want_grad,) = torch.autograd.grad(want.sum(), x64)
    got = torch.compile(gelu_tanh, fullgraph=True)(x)
    (got_grad,) = torch.autograd.grad(got.sum(), x)
    assert (got.double() - want).abs().max() < 2e-6  # fp32 rounding, as PyTorch's own fp32 kernel has
    assert (got_grad.double() - want_grad).abs().max() < 4e-6
    assert torch.equal(gelu_tanh(x), F.gelu(x, approximate="tanh"))  # eagerly, with autograd: PyTorch's kernel
    with torch.no_grad():  # inference: the sigmoid form in place, the same function
        fast = gelu_tanh(x)
    assert (fast.double() - want.detach()).abs().max() < 2e-6


def test_ids_of_any_integer_dtype_work_and_nanogpts_targets_get_a_clear_error() -> None:
    """uint8/int16 ids (a uint16 dataset's memmap as a tensor) passed the check and failed inside the
    embedding with torch's RuntimeError; nanoGPT's model(idx, targets) said only that input_pos needs
    a KV cache."""
    model = GPT(TINY)
    x = torch.randint(0, TINY.vocab_size, (1, 4))
    for dtype in (torch.uint8, torch.int16, torch.int32):
        assert torch.equal(model(x.to(dtype)), model(x))
    with pytest.raises(ValueError, match=r"model.loss\(idx, targets\)"):
        model(x, x)


def test_targets_outside_the_vocabulary_are_one_clear_error_unless_checks_are_off() -> None:
    """A target id outside [0, vocab_size) other than -100 (a dataset of another tokenizer, -1 as
    padding) was torch's opaque "index -1 is out of bounds" RuntimeError (a device assert on CUDA;
    a fused kernel reads past the logits): now one ValueError naming the ids and the vocabulary
    size. ``check_inputs = False`` (the trainer's: no host sync per step) skips it, as it skips the
    input ids' range check. Integer targets of any dtype work, as input ids do."""
    torch.manual_seed(0)
    model = GPT(TINY)
    x = torch.randint(0, TINY.vocab_size, (2, 6))
    want = model.loss(x, x)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert torch.equal(model.loss(x, x.to(dtype)), want)
    for bad, shown in (([-1, 7], "-1"), ([50, 3, 99, 50], "50, 99")):
        tgt = x.clone()
        tgt[0, :len(bad)] = torch.tensor(bad)
        for call in (lambda t: model.loss(x, t), lambda t: model(x, targets=t)):
            with pytest.raises(ValueError, match=rf"outside \[0, 50\) \(this model's vocab_size 50\): {shown};"):
                call(tgt)
    tgt = x.clone()
    tgt[0, 0] = -5
    assert torch.isfinite(model.loss(x, tgt, ignore_index=-5))  # the caller's ignore index counts as ignored
    with pytest.raises(ValueError, match="targets must be a tensor of integer token ids"):
        model.loss(x, x.float())
    model.check_inputs = False
    calls = []
    real = torch.aminmax
    try:
        me = threading.get_ident()  # count this thread's calls only: a server test's engine thread may run on
        torch.aminmax = lambda *a, **k: (threading.get_ident() == me and calls.append(1)) or real(*a, **k)
        model.loss(x, x)
    finally:
        torch.aminmax = real
    assert calls == []  # no range check (no host sync) with the checks off
