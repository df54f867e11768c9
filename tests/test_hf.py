"""Parity with the reference implementation, HF transformers' GPT2LMHeadModel, and the model
folder format (HF's layout) in both directions."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gpt2model import GPT, GPTconfig
from gpt2model.checkpoint import CheckpointError

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

SHAPES = {
    "seed": GPTconfig(),
    "gpt2-vocab-ctx1024": GPTconfig(context_length=1024, vocab_size=50257, n_layer=2, n_head=4, d_model=64),
    "odd": GPTconfig(context_length=96, vocab_size=1000, n_layer=3, n_head=3, d_model=48),
}


def hf_reference(directory: Path) -> GPT2LMHeadModel:
    """Load with HF and demand a clean load: no missing, unexpected or mismatched weights."""
    model, info = GPT2LMHeadModel.from_pretrained(directory, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def random_hf(config: GPTconfig, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.d_model,
                     n_layer=config.n_layer, n_head=config.n_head, bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(cfg).eval()
    # HF zero-initialises biases and sets LayerNorm to 1/0; randomise everything so a swapped
    # or untransposed tensor cannot hide.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(SHAPES))
def test_ours_to_hf_logits_match(name: str, tmp_path: Path) -> None:
    config = SHAPES[name]
    torch.manual_seed(1)
    ours = GPT(config).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorm params
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours.save_pretrained(tmp_path)
    hf = hf_reference(tmp_path)
    x = torch.randint(0, config.vocab_size, (2, min(config.context_length, 300)))
    with torch.no_grad():
        assert max_diff(ours(x), hf(x).logits) <= 1e-5


@pytest.mark.parametrize("name", list(SHAPES))
def test_hf_to_ours_logits_match(name: str, tmp_path: Path) -> None:
    config = SHAPES[name]
    hf = random_hf(config)
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    assert ours.config.to_dict() == {**config.to_dict(), "dropout": 0.1}  # HF's default pdrop
    x = torch.randint(0, config.vocab_size, (3, min(config.context_length, 200)))
    with torch.no_grad():
        assert max_diff(ours(x), hf(x).logits) <= 1e-5
        # Greedy next tokens agree too.
        assert torch.equal(ours(x).argmax(-1), hf(x).logits.argmax(-1))


def test_loss_matches_hf(tmp_path: Path) -> None:
    config = SHAPES["odd"]
    hf = random_hf(config)
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    x = torch.randint(0, config.vocab_size, (2, 50))
    with torch.no_grad():
        assert abs(ours.loss(x[:, :-1], x[:, 1:]).item() - hf(x, labels=x).loss.item()) < 1e-5


def test_save_load_round_trip_is_bit_identical(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT(SHAPES["odd"]).eval()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = GPT.from_pretrained(tmp_path)
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    x = torch.randint(0, 1000, (2, 40))
    assert torch.equal(model(x), loaded(x))


def test_no_bias_model_exports_to_hf(tmp_path: Path) -> None:
    cfg = GPTconfig(context_length=64, vocab_size=300, n_layer=2, n_head=2, d_model=32, bias=False)
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    ours.save_pretrained(tmp_path)
    hf = hf_reference(tmp_path)
    x = torch.randint(0, 300, (2, 64))
    with torch.no_grad():
        assert max_diff(ours(x), hf(x).logits) <= 1e-5
    again = GPT.from_pretrained(tmp_path)
    assert again.config.bias is False and torch.equal(again(x), ours(x))


def test_a_model_changed_and_saved_by_transformers_loads_as_transformers_reads_it(tmp_path: Path) -> None:
    """transformers keeps our "gpt2model" config block verbatim while its tools change its own keys:
    HF's keys win (a stale block made resize_token_embeddings' output unloadable), and a bias=False
    model whose zero biases HF trained loads with its biases."""
    torch.manual_seed(0)
    GPT(GPTconfig(context_length=32, vocab_size=50, n_layer=2, n_head=2, d_model=16, bias=False)).save_pretrained(
        tmp_path / "ours")
    hf = hf_reference(tmp_path / "ours")
    hf.resize_token_embeddings(53, mean_resizing=False)  # e.g. a chat fine-tune's <|im_start|>, <|im_end|>, pad
    with torch.no_grad():  # what fine-tuning does to the zero biases HF loaded
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    hf.config.layer_norm_epsilon = 1e-3
    hf.save_pretrained(tmp_path / "hf")
    assert "gpt2model" in json.loads((tmp_path / "hf" / "config.json").read_text())  # the stale block is kept
    ours = GPT.from_pretrained(tmp_path / "hf")
    assert (ours.config.vocab_size, ours.config.bias, ours.config.layer_norm_eps) == (53, True, 1e-3)
    x = torch.randint(0, 53, (2, 32))
    with torch.no_grad():
        assert max_diff(ours(x), hf_reference(tmp_path / "hf")(x).logits) <= 1e-5


def test_saving_over_a_folder_updates_its_generation_config_eos(tmp_path: Path) -> None:
    """A downloaded GPT-2's generation_config.json (eos 50256), which HF's generate and `gpt2 sample/serve`
    read before config.json, kept stopping at end-of-text after a chat fine-tune was saved over it."""
    from gpt2model.hf import find_eos_ids
    from gpt2model.tokenizer import BPETokenizer

    tok = BPETokenizer.train(["hello world, a chat " * 50], 300)
    tok._tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok = BPETokenizer(tok._tok)
    tok.eos_token = "<|im_end|>"
    im_end = tok.special_tokens["<|im_end|>"]
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 50256, "eos_token_id": 50256,
                                                                 "do_sample": True}))
    GPT(GPTconfig(context_length=8, vocab_size=tok.vocab_size, n_layer=1, n_head=1, d_model=8)).save_pretrained(
        tmp_path, tokenizer=tok)
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {
        "bos_token_id": tok.eot, "eos_token_id": im_end, "do_sample": True}  # its other settings kept
    assert find_eos_ids(tmp_path) == (im_end,)


def test_hf_writes_no_weight_warnings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    GPT(SHAPES["odd"]).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        GPT2LMHeadModel.from_pretrained(tmp_path)
    # HF logs a "LOAD REPORT" table listing MISSING / UNEXPECTED / MISMATCHED keys when anything is off.
    noisy = ("load report", "missing", "unexpected", "mismatch", "newly initialized", "weight", "deprecated")
    assert not [r for r in caplog.records if any(w in r.getMessage().lower() for w in noisy)]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    # llama.cpp's convert_hf_to_gguf.py reads n_ctx (OpenAI's configs carry it); the dtype is the tensors'.
    assert cfg["n_ctx"] == cfg["n_positions"] == 96 and cfg["dtype"] == "float32"


def test_config_json_names_the_saved_dtype(tmp_path: Path) -> None:
    GPT(SHAPES["odd"]).to(torch.bfloat16).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    hf = GPT2LMHeadModel.from_pretrained(tmp_path, dtype="auto")
    assert hf.dtype == torch.bfloat16


def test_hub_style_keys_and_legacy_bin(tmp_path: Path) -> None:
    """OpenAI's original upload: keys without 'transformer.', no lm_head, causal-mask buffers,
    in a pytorch_model.bin."""
    config = SHAPES["odd"]
    hf = random_hf(config)
    hf.config.save_pretrained(tmp_path)
    sd = {k.removeprefix("transformer."): v.clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 96, 96))
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    ours = GPT.from_pretrained(tmp_path)
    x = torch.randint(0, config.vocab_size, (2, 30))
    with torch.no_grad():
        assert max_diff(ours(x), hf(x).logits) <= 1e-5
    # Same keys in a safetensors file.
    (tmp_path / "pytorch_model.bin").unlink()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    with torch.no_grad():
        assert max_diff(GPT.from_pretrained(tmp_path)(x), hf(x).logits) <= 1e-5


class _Evil:
    def __reduce__(self):
        return (print, ("this code ran while loading",))


def test_pickled_code_is_never_run(tmp_path: Path, capsys) -> None:
    """A .bin holding objects besides tensors (a pickle with code, a whole model saved with
    torch.save(model)) is refused without unpickling, and the error says why and how to convert
    it (it said "the file is corrupt or truncated; re-download it", which it is not)."""
    GPT(SHAPES["odd"]).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": _Evil()}, f)
    with pytest.raises(CheckpointError, match="holds pickled Python objects besides tensors, which gpt2model never "
                                              "unpickles .* safetensors"):
        GPT.from_pretrained(tmp_path)
    torch.save(GPT(SHAPES["odd"]), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="holds pickled Python objects besides tensors"):
        GPT.from_pretrained(tmp_path)
    assert "this code ran" not in capsys.readouterr().out
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        GPT.from_pretrained(tmp_path)


def test_crop_context_on_load(tmp_path: Path) -> None:
    config = SHAPES["gpt2-vocab-ctx1024"]
    hf = random_hf(config)
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path, context_length=128)
    assert ours.config.context_length == 128 and ours.transformer.wpe.weight.shape == (128, 64)
    x = torch.randint(0, config.vocab_size, (1, 128))
    with torch.no_grad():
        assert max_diff(ours(x), hf(x).logits) <= 1e-5
    with pytest.raises(ValueError, match="exceeds the model's context_length 128"):
        ours(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(CheckpointError, match="cannot be grown"):
        GPT.from_pretrained(tmp_path, context_length=2048)


def test_dtype_device_and_dropout_overrides(tmp_path: Path) -> None:
    GPT(SHAPES["odd"]).save_pretrained(tmp_path)
    m = GPT.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu", dropout=0.25)
    assert m.dtype == torch.bfloat16 and m.config.dropout == 0.25 and not m.training
    # dtype names as HF's from_pretrained takes them ("auto": the saved tensors' dtype); clear errors for
    # the rest and for a device this machine lacks (were TypeError / AssertionError from inside torch)
    assert GPT.from_pretrained(tmp_path, dtype="bfloat16").dtype == torch.bfloat16
    assert GPT.from_pretrained(tmp_path, dtype="float16", device="auto").dtype == torch.float16
    m.save_pretrained(tmp_path / "bf16")
    assert GPT.from_pretrained(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16
    assert GPT.from_pretrained(tmp_path / "bf16").dtype == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int4': use float32, bfloat16, float16 or auto"):
        GPT.from_pretrained(tmp_path, dtype="int4")
    with pytest.raises(ValueError, match=r"model.quantize\('int8'\) after loading"):
        GPT.from_pretrained(tmp_path, dtype=torch.int8)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is visible"):
            GPT.from_pretrained(tmp_path, device="cuda")


def test_bad_model_folders(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no model folder at"):
        GPT.from_pretrained(tmp_path / "nope")
    GPT(SHAPES["odd"]).save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        GPT.from_pretrained(tmp_path / "m")
    weights.write_bytes(b"\x00" * 100)  # garbage
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        GPT.from_pretrained(tmp_path / "m")
    weights.unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        GPT.from_pretrained(tmp_path / "m")
    # config.json that does not describe the weights
    GPT(SHAPES["odd"]).save_pretrained(tmp_path / "k")
    cfg = json.loads((tmp_path / "k" / "config.json").read_text())
    cfg["n_layer"] = 4
    (tmp_path / "k" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match its config.json"):
        GPT.from_pretrained(tmp_path / "k")
    (tmp_path / "k" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        GPT.from_pretrained(tmp_path / "k")


def test_unsupported_hf_variant_is_refused(tmp_path: Path) -> None:
    hf = random_hf(SHAPES["odd"])
    hf.config.scale_attn_by_inverse_layer_idx = True
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        GPT.from_pretrained(tmp_path)


def test_hub_name_without_network_gives_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="Without a network, download the folder elsewhere"):
        GPT.from_pretrained("gpt2")


def test_a_hub_download_fetches_what_serving_and_export_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A hub download fetched config, weights and tokenizer files only: a chat fine-tune's
    generation_config.json (its eos ids), tokenizer_config.json / chat_template.jinja (its chat
    template, which `gpt2 serve` uses) and a slow tokenizer's added_tokens.json were left behind.
    The hub's bare name distilgpt2 (a GPT-2) was "no model folder"."""
    import fnmatch

    import huggingface_hub

    from gpt2model.checkpoint import resolve_model_dir

    seen = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, allow_patterns: seen.append((repo, allow_patterns)) or str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("distilgpt2") == tmp_path and seen[-1][0] == "distilbert/distilgpt2"
    assert resolve_model_dir("someone/chat-gpt2") == tmp_path and seen[-1][0] == "someone/chat-gpt2"
    for name in ("config.json", "generation_config.json", "model.safetensors", "model-00001-of-00002.safetensors",
                 "model.safetensors.index.json", "tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json",
                 "special_tokens_map.json", "tokenizer_config.json", "chat_template.jinja"):
        assert any(fnmatch.fnmatch(name, p) for p in seen[-1][1]), name
    assert not any(fnmatch.fnmatch("pytorch_model.bin", p) for p in seen[-1][1])  # nothing to unpickle


def test_a_hub_models_own_tokenizer_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`gpt2 sample --model someone/chat-gpt2` (a fine-tune with tokens added to GPT-2's) got
    OpenAI's GPT-2 tokenizer instead of the downloaded folder's, which cannot decode the added ids."""
    import huggingface_hub

    from gpt2model.checkpoint import load_model_and_tokenizer
    from gpt2model.tokenizer import BPETokenizer

    transformers = pytest.importorskip("transformers")
    data = Path(os.environ.get("GPT2MODEL_DATA", ""))
    if not (data / "gpt2" / "vocab.bpe").is_file():
        pytest.skip("data files not found: set GPT2MODEL_DATA")
    folder = tmp_path / "snapshot"
    GPT(GPTconfig(n_layer=1, n_head=2, d_model=16, context_length=16, vocab_size=50258)).save_pretrained(folder)
    hf = transformers.GPT2TokenizerFast(str(data / "gpt2" / "encoder.json"), str(data / "gpt2" / "vocab.bpe"))
    hf.add_special_tokens({"pad_token": "[PAD]"})
    hf.save_pretrained(str(folder))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, allow_patterns: str(folder))
    monkeypatch.chdir(tmp_path)
    model, tok = load_model_and_tokenizer("someone/chat-gpt2")
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 50258 and tok.decode([50257]) == "[PAD]"

