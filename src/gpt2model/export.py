"""Export a model folder to GGUF, the single-file format of llama.cpp, ollama and LM Studio.

Written directly with the ``gguf`` package (llama.cpp's own writer), in the layout llama.cpp's
``gpt2`` architecture loads (``src/models/gpt2.cpp``): ``token_embd``, ``position_embd``,
``blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up, ffn_down}`` (each with its bias),
``output_norm``; no ``output.weight`` because GPT-2 ties the head to the token embedding and
llama.cpp then reuses ``token_embd``. GGUF stores a matrix as numpy ``(rows, cols)`` =
``nn.Linear``'s ``(out_features, in_features)``, so our weights go in as they are (HF's transposed
Conv1D weights would need the transpose that llama.cpp's converter does).

The tokenizer goes in as ``tokenizer.ggml.model = gpt2`` (byte-level BPE: the token strings in
GPT-2's byte-to-unicode alphabet plus the merges) with ``tokenizer.ggml.pre = gpt-2`` (GPT-2's
pre-tokenizer regex, which both our GPT-2 and our trained BPE tokenizers use). A character
tokenizer is written the same way: each character is the token of its UTF-8 bytes, and a
multi-byte character gets the merges that join its bytes, so llama.cpp tokenizes text into
exactly our ids.

Precision (``--dtype``): ``f32`` (exact), ``f16``, or ``q8_0`` (llama.cpp's 8-bit blocks of 32,
quantized with ``gguf.quants``). As llama.cpp's converter does, 1-D tensors (norms, biases) and
the position embedding stay f32; a matrix whose rows are not a multiple of 32 long falls back to
f16 under ``q8_0``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .checkpoint import resolve_model_dir
from .fileio import atomic_path
from .hf import find_chat_template, find_eos_ids
from .tokenizer import SPEC_FILE, BPETokenizer, CharTokenizer, GPT2Tokenizer, byte_to_unicode, load_tokenizer

if TYPE_CHECKING:
    from .model import GPT

GGUF_DTYPES = ("f32", "f16", "q8_0")

# Our parameter names (after "transformer.h.N.") -> llama.cpp's per-block tensor names.
_BLOCK_NAMES = {
    "ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias",
    "attn.c_attn.weight": "attn_qkv.weight", "attn.c_attn.bias": "attn_qkv.bias",
    "attn.c_proj.weight": "attn_output.weight", "attn.c_proj.bias": "attn_output.bias",
    "ln_2.weight": "ffn_norm.weight", "ln_2.bias": "ffn_norm.bias",
    "mlp.c_fc.weight": "ffn_up.weight", "mlp.c_fc.bias": "ffn_up.bias",
    "mlp.c_proj.weight": "ffn_down.weight", "mlp.c_proj.bias": "ffn_down.bias",
}
_TOP_NAMES = {
    "transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
    "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
}


def gguf_tensors(model: GPT) -> dict[str, np.ndarray]:
    """The model's weights as fp32 numpy arrays under llama.cpp's ``gpt2`` names.

    A model without biases gets zero biases (llama.cpp's gpt2 graph requires them; zeros compute
    the same function)."""
    cfg = model.config
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out: dict[str, np.ndarray] = {}
    for name, t in state.items():
        if name == "lm_head.weight":
            continue  # tied to wte; llama.cpp duplicates token_embd when output.weight is absent
        if name in _TOP_NAMES:
            out[_TOP_NAMES[name]] = t.numpy()
            continue
        _, _, layer, rest = name.split(".", 3)  # transformer.h.N.rest
        out[f"blk.{layer}.{_BLOCK_NAMES[rest]}"] = t.numpy()
    if not cfg.bias:
        d = cfg.d_model
        sizes = {"attn_norm.bias": d, "attn_qkv.bias": 3 * d, "attn_output.bias": d, "ffn_norm.bias": d,
                 "ffn_up.bias": 4 * d, "ffn_down.bias": d}
        for i in range(cfg.n_layer):
            for suffix, n in sizes.items():
                out[f"blk.{i}.{suffix}"] = np.zeros(n, dtype=np.float32)
        out["output_norm.bias"] = np.zeros(d, dtype=np.float32)
    return out


def _char_vocab(tok: CharTokenizer) -> tuple[list[str], list[str]]:
    """A character vocabulary as a merge-built byte-level BPE: tokens and merges."""
    b2u = byte_to_unicode()
    tokens, merges, seen = [], [], set()
    for ch in tok.chars:
        pieces = [b2u[b] for b in ch.encode("utf-8")]
        tokens.append("".join(pieces))
        # Join the bytes left to right: (b0, b1) -> b0b1, (b0b1, b2) -> b0b1b2, ...
        acc = pieces[0]
        for p in pieces[1:]:
            merge = f"{acc} {p}"
            if merge not in seen:
                seen.add(merge)
                merges.append(merge)
            acc += p
    if not merges:
        # An all-ASCII vocabulary has no merges, but llama.cpp refuses a gpt2 vocabulary without the
        # merges key, and gguf-py cannot write an empty array: one merge that never applies (0xC0
        # never occurs in UTF-8 text).
        merges.append(f"{b2u[0xC0]} {b2u[0xC0]}")
    return tokens, merges


def tokenizer_vocab(directory: Path, tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """``(tokens, token_types, merges)`` for GGUF: ``vocab_size`` tokens (the model's rows; ids the
    tokenizer does not use become unused ``[PADn]`` tokens), end-of-text and the other special
    tokens (a fine-tune's ``<|im_start|>`` ...) marked as control tokens and the tokenizer.json's
    other added tokens as user-defined, as llama.cpp's convert_hf_to_gguf.py marks them (so that
    llama.cpp reads them in text as single tokens)."""
    import gguf

    user_defined: set[int] = set()
    if isinstance(tokenizer, CharTokenizer):
        tokens, merges = _char_vocab(tokenizer)
        by_id = dict(enumerate(tokens))
    elif isinstance(tokenizer, BPETokenizer):
        spec = tokenizer.hf_json()  # (a folder of vocab.json + merges.txt has no tokenizer.json)
        by_id = {i: t for t, i in spec["model"]["vocab"].items()}
        by_id.update({a["id"]: a["content"] for a in spec.get("added_tokens", [])})
        user_defined = {a["id"] for a in spec.get("added_tokens", []) if not a.get("special")}
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    elif isinstance(tokenizer, GPT2Tokenizer):
        vocab_file, merges_file = tokenizer.files
        by_id = {i: t for t, i in json.loads(vocab_file.read_text(encoding="utf-8")).items()}
        lines = merges_file.read_text(encoding="utf-8").splitlines()
        merges = [ln for ln in lines if ln and not ln.startswith("#version")]
    else:
        raise ValueError(f"cannot export a {type(tokenizer).__name__} tokenizer to GGUF")
    if max(by_id) >= vocab_size:
        raise ValueError(f"the tokenizer has id {max(by_id)} but the model only {vocab_size} rows: the folder "
                         f"mixes files of different models")
    control = {tokenizer.eot, *getattr(tokenizer, "special_tokens", {}).values()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in control else
                         gguf.TokenType.USER_DEFINED if i in user_defined else gguf.TokenType.NORMAL)
    return tokens, types, merges


def export_gguf(model_dir: str | Path, out: str | Path, dtype: str = "f32") -> Path:
    """Write the model folder (ours or HF GPT-2, or a hub name) as one GGUF file ``out``.

    ``dtype``: ``f32``, ``f16`` or ``q8_0`` (see the module docstring). Returns ``out``."""
    import gguf

    from .model import GPT

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}: choose one of {', '.join(GGUF_DTYPES)}")
    directory = resolve_model_dir(model_dir)
    model = GPT.from_pretrained(directory)
    if (directory / SPEC_FILE).is_file() or (directory / "vocab.json").is_file() \
            or (directory / BPETokenizer.FILE).is_file():
        tokenizer = load_tokenizer(directory)
    elif model.config.vocab_size >= 50257:
        tokenizer = load_tokenizer("gpt2")  # a HF GPT-2 folder without tokenizer files
    else:
        raise FileNotFoundError(f"{directory} has no tokenizer files (tokenizer_spec.json, vocab.json + "
                                f"merges.txt or tokenizer.json); GGUF needs the vocabulary")
    cfg = model.config
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    tokens, types, merges = tokenizer_vocab(directory, tokenizer, cfg.vocab_size)

    out = Path(out)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, "gpt2")
        writer.add_name(directory.name)
        writer.add_block_count(cfg.n_layer)
        writer.add_context_length(cfg.context_length)
        writer.add_embedding_length(cfg.d_model)
        writer.add_feed_forward_length(4 * cfg.d_model)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(cfg.layer_norm_eps)
        writer.add_file_type(file_type)
        # GGUF's spec: "must be present" when any tensor is quantized (llama.cpp's converter always writes it)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        # The folder's end-of-sequence id where it names one (a ChatML fine-tune's <|im_end|>, which
        # llama.cpp must stop at), else end-of-text; and its chat template, which llama-server uses
        # for /v1/chat/completions (convert_hf_to_gguf.py writes both).
        eos = list(find_eos_ids(directory, cfg.vocab_size))
        if tokenizer.eot is not None:
            writer.add_bos_token_id(tokenizer.eot)
        if eos or tokenizer.eot is not None:
            writer.add_eos_token_id(eos[0] if eos else tokenizer.eot)
        template = find_chat_template(directory)
        if template is not None:
            writer.add_chat_template(template[0])
        # Our prompts are the user's text as is: llama.cpp must not prepend a BOS token.
        writer.add_add_bos_token(False)
        for name, data in gguf_tensors(model).items():
            qtype = _tensor_type(name, data, dtype)
            if qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(name, data)
            elif qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(name, data.astype(np.float16))
            else:
                writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def _tensor_type(name: str, data: np.ndarray, dtype: str):  # noqa: ANN202 - gguf.GGMLQuantizationType
    """llama.cpp's converter rules: 1-D tensors and the position embedding stay f32."""
    import gguf

    if dtype == "f32" or data.ndim <= 1 or name == "position_embd.weight":
        return gguf.GGMLQuantizationType.F32
    if dtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16
