"""GGUF export (`gpt2 export MODEL --gguf OUT`): read the file back with gguf.GGUFReader and compare
every tensor and the metadata llama.cpp's gpt2 architecture reads; with a llama.cpp build on the
machine (LLAMA_CPP_DIR or /work/wt/tools), a slow test checks llama.cpp's greedy tokens too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gpt2model import GPT, GPTconfig, load_tokenizer  # noqa: E402
from gpt2model.cli import main  # noqa: E402
from gpt2model.export import export_gguf  # noqa: E402
from gpt2model.tokenizer import CharTokenizer  # noqa: E402


def _fields(reader) -> dict:
    """GGUF key -> python value (strings decoded, arrays as lists)."""
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = f.contents()
    return out


@pytest.fixture(scope="module")
def bpe_model_dir(tmp_path_factory) -> Path:
    if not (Path(os.environ.get("GPT2MODEL_DATA", "")) / "gpt2" / "encoder.json").is_file():
        pytest.skip("GPT-2 tokenizer files not found: set GPT2MODEL_DATA")
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("bpe_model")
    GPT(GPTconfig(vocab_size=50257, context_length=64, n_layer=2, n_head=2, d_model=64)).save_pretrained(
        d, tokenizer=load_tokenizer("gpt2"))
    return d


@pytest.fixture(scope="module")
def char_model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("char_model")
    tok = CharTokenizer("\n !'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.,;:?-&$3")
    GPT(GPTconfig(vocab_size=tok.vocab_size, context_length=32, n_layer=1, n_head=2, d_model=64)).save_pretrained(
        d, tokenizer=tok)
    return d


def test_f32_export_holds_every_tensor_exactly_under_llama_cpp_names(bpe_model_dir, tmp_path):
    out = tmp_path / "m.gguf"
    assert main(["export", str(bpe_model_dir), "--gguf", str(out)]) == 0
    model = GPT.from_pretrained(bpe_model_dir)
    r = gguf.GGUFReader(out)  # slow-ish (~3 s) on 50,257 token strings: read once
    tensors = {t.name: t for t in r.tensors}
    sd = model.state_dict()
    assert len(tensors) == 4 + 12 * 2  # 4 top-level + 12 per block, no output.weight (tied)
    assert "output.weight" not in tensors
    pairs = {"token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
             "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
             "blk.1.attn_qkv.weight": "transformer.h.1.attn.c_attn.weight",
             "blk.1.attn_qkv.bias": "transformer.h.1.attn.c_attn.bias",
             "blk.0.attn_output.weight": "transformer.h.0.attn.c_proj.weight",
             "blk.0.ffn_up.weight": "transformer.h.0.mlp.c_fc.weight",
             "blk.0.ffn_down.weight": "transformer.h.0.mlp.c_proj.weight",
             "blk.1.attn_norm.bias": "transformer.h.1.ln_1.bias",
             "blk.1.ffn_norm.weight": "transformer.h.1.ln_2.weight"}
    for gname, ours in pairs.items():
        t = tensors[gname]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        # GGUF lists dims innermost first: (in, out) for nn.Linear's (out, in) matrix.
        assert list(t.shape) == list(reversed(sd[ours].shape)), gname
        np.testing.assert_array_equal(np.asarray(t.data).reshape(sd[ours].shape), sd[ours].numpy())

    f = _fields(r)
    cfg = model.config
    assert f["general.architecture"] == "gpt2"
    assert f["gpt2.block_count"] == cfg.n_layer and f["gpt2.context_length"] == cfg.context_length
    assert f["gpt2.embedding_length"] == cfg.d_model and f["gpt2.feed_forward_length"] == 4 * cfg.d_model
    assert f["gpt2.attention.head_count"] == cfg.n_head
    assert f["gpt2.attention.layer_norm_epsilon"] == pytest.approx(cfg.layer_norm_eps)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    vocab = json.loads((bpe_model_dir / "vocab.json").read_text(encoding="utf-8"))
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == 50257 and all(tokens[i] == t for t, i in vocab.items())
    merges = [ln for ln in (bpe_model_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
              if ln and not ln.startswith("#version")]
    assert f["tokenizer.ggml.merges"] == merges
    types = f["tokenizer.ggml.token_type"]
    assert types[50256] == gguf.TokenType.CONTROL and types[0] == gguf.TokenType.NORMAL
    assert f["tokenizer.ggml.bos_token_id"] == f["tokenizer.ggml.eos_token_id"] == 50256
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert f["general.file_type"] == gguf.LlamaFileType.ALL_F32


@pytest.mark.parametrize("dtype, qtype, tol", [("f16", "F16", 1e-3), ("q8_0", "Q8_0", 0.01)])
def test_f16_and_q8_0_exports_dequantize_close_to_the_weights(char_model_dir, tmp_path, dtype, qtype, tol):
    out = export_gguf(char_model_dir, tmp_path / "m.gguf", dtype)
    model = GPT.from_pretrained(char_model_dir)
    sd = model.state_dict()
    r = gguf.GGUFReader(out)
    tensors = {t.name: t for t in r.tensors}
    for gname, ours in [("token_embd.weight", "transformer.wte.weight"),
                        ("blk.0.ffn_up.weight", "transformer.h.0.mlp.c_fc.weight")]:
        t = tensors[gname]
        assert t.tensor_type == getattr(gguf.GGMLQuantizationType, qtype)
        back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(sd[ours].shape)
        err = np.abs(back - sd[ours].numpy()).max()
        assert 0 < err < tol, (gname, err)  # lossy, but close
    # Norms, biases and the position embedding stay f32, as llama.cpp's converter keeps them.
    for name in ("position_embd.weight", "blk.0.attn_norm.weight", "blk.0.attn_qkv.bias"):
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
    want = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    assert _fields(r)["general.file_type"] == want
    # GGUF's spec: present when any tensor is quantized (as llama.cpp's convert_hf_to_gguf.py writes it)
    assert _fields(r)["general.quantization_version"] == gguf.GGML_QUANT_VERSION == 2
    assert _fields(r)["general.type"] == "model"


def test_char_model_without_biases_exports_byte_level_tokens_and_zero_biases(tmp_path):
    tok = CharTokenizer("\n !abcé€")
    model = GPT(GPTconfig(vocab_size=tok.vocab_size, context_length=32, n_layer=1, n_head=2, d_model=32,
                          bias=False))
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    r = gguf.GGUFReader(export_gguf(tmp_path / "m", tmp_path / "m.gguf"))
    f = _fields(r)
    # GPT-2's byte alphabet: space -> 'Ġ', newline -> 'Ċ'; é is two bytes, € three.
    assert f["tokenizer.ggml.tokens"] == ["Ċ", "Ġ", "!", "a", "b", "c", "Ã©", "âĤ¬"]
    assert f["tokenizer.ggml.merges"] == ["Ã ©", "â Ĥ", "âĤ ¬"]
    assert "tokenizer.ggml.bos_token_id" not in f  # a char vocabulary has no end-of-text
    tensors = {t.name: t for t in r.tensors}
    for name in ("blk.0.attn_qkv.bias", "blk.0.ffn_up.bias", "output_norm.bias"):
        assert not np.asarray(tensors[name].data).any()
    assert list(tensors["blk.0.ffn_up.bias"].shape) == [128]


def test_export_rejects_unknown_dtype_and_missing_folder(char_model_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="q4_0.*f32, f16, q8_0"):
        export_gguf(char_model_dir, tmp_path / "m.gguf", "q4_0")
    assert main(["export", str(tmp_path / "nope"), "--gguf", str(tmp_path / "m.gguf")]) == 2
    assert "no model folder" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def _llama_dir() -> Path | None:
    for d in (os.environ.get("LLAMA_CPP_DIR"), "/work/wt/tools/llama_cpp_python-0.3.36/vendor/llama.cpp"):
        if d and (Path(d) / "build" / "bin" / "llama-server").is_file():
            return Path(d)
    return None


@pytest.mark.slow
def test_an_ascii_char_vocabulary_still_writes_merges(char_model_dir, tmp_path):
    """llama.cpp refuses a gpt2 vocabulary without tokenizer.ggml.merges ("cannot find tokenizer
    merges"): an all-ASCII character vocabulary gets one merge that can never apply."""
    f = _fields(gguf.GGUFReader(export_gguf(char_model_dir, tmp_path / "m.gguf")))
    assert f["tokenizer.ggml.merges"] == ["À À"]  # bytes 0xC0 0xC0: never in UTF-8 text


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_llama_server_generates_our_greedy_tokens_from_the_export(kind, request, tmp_path):
    """llama.cpp loads the f32 export and its greedy continuation equals ours, token for token."""
    bpe_model_dir = request.getfixturevalue(f"{kind}_model_dir")
    import socket
    import time
    import urllib.request

    llama = _llama_dir()
    if llama is None:
        pytest.skip("no llama.cpp build: set LLAMA_CPP_DIR to a llama.cpp tree with build/bin/llama-server")
    out = export_gguf(bpe_model_dir, tmp_path / "m.gguf", "f32")
    model = GPT.from_pretrained(bpe_model_dir)
    tok = load_tokenizer(bpe_model_dir)
    prompt = "ROMEO: What light through yonder window breaks?"[:None if kind == "bpe" else 12]  # char: ctx 32
    ids = tok.encode(prompt)
    ours = model.generate(torch.tensor([ids]), 20, temperature=0)[0, len(ids):].tolist()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(llama / "build" / "bin" / "llama-server"), "-m", str(out), "--port", str(port),
                             "-c", "64", "-np", "1", "--no-warmup"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        body = json.dumps({"prompt": ids, "n_predict": 20, "temperature": 0, "top_k": 1, "samplers": ["top_k"],
                           "return_tokens": True, "ignore_eos": True, "cache_prompt": False}).encode()
        req = urllib.request.Request(url + "/completion", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            theirs = json.loads(resp.read())["tokens"]
        # llama.cpp's tokenizer agrees with ours on the prompt too.
        req = urllib.request.Request(url + "/tokenize", data=json.dumps({"content": prompt}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.loads(resp.read())["tokens"] == ids
    finally:
        proc.terminate()
        proc.wait(10)
    assert theirs == ours
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_chatml_fine_tune_exports_its_special_tokens_eos_and_chat_template(tmp_path):
    """A GPT-2-style BPE fine-tuned with ChatML tokens added (TRL's setup_chat_format): its added special
    tokens were NORMAL tokens in the GGUF (llama.cpp then cannot read "<|im_start|>" in text as one
    token), its eos <|im_end|> was written as end-of-text, and its chat template was lost; llama.cpp's
    convert_hf_to_gguf.py writes CONTROL / USER_DEFINED types, the folder's eos and the template."""
    from gpt2model.tokenizer import BPETokenizer

    base = BPETokenizer.train(["hello world, the quick brown fox jumps over the lazy dog. " * 20], 300)
    base._tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])  # noqa: SLF001 - as HF's add_special_tokens
    base._tok.add_tokens(["zzqq"])  # noqa: SLF001
    tok = BPETokenizer(base._tok)  # noqa: SLF001
    im_start, im_end, zz = tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"], tok.vocab_size - 1
    folder = tmp_path / "chatml"
    GPT(GPTconfig(vocab_size=tok.vocab_size, context_length=32, n_layer=1, n_head=1, d_model=8)).save_pretrained(
        folder, tokenizer=tok)
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": im_end}))
    f = _fields(gguf.GGUFReader(export_gguf(folder, tmp_path / "m.gguf")))
    types = f["tokenizer.ggml.token_type"]
    assert [types[i] for i in (tok.eot, im_start, im_end, zz, 100)] == [
        gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED,
        gguf.TokenType.NORMAL]
    assert [f["tokenizer.ggml.tokens"][i] for i in (im_start, im_end, zz)] == ["<|im_start|>", "<|im_end|>", "zzqq"]
    assert f["tokenizer.ggml.eos_token_id"] == im_end and f["tokenizer.ggml.bos_token_id"] == tok.eot
    assert f["tokenizer.chat_template"] == template
