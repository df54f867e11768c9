"""The one place that knows HF transformers' GPT-2 format: config.json keys, parameter names and
the transposed ``Conv1D`` weights.

HF's ``Conv1D`` stores its weight as ``(in_features, out_features)``; ``nn.Linear`` stores
``(out_features, in_features)``. The four Conv1D weights per block are transposed by *name*, never
by shape (``attn.c_proj`` is square, so its shape cannot tell).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import GPTconfig

# Weights that are Conv1D in HF (transposed relative to our nn.Linear).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers some old checkpoints carry (the causal mask); they hold no learned values.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
OPENAI_NAMES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
                "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl",
                # the hub's other legacy bare name of a GPT-2 (6 layers, distilled from gpt2)
                "distilgpt2": "distilbert/distilgpt2"}


def config_to_hf(config: GPTconfig, eot_id: int | None = None,
                 dtype: torch.dtype = torch.float32, eos_id: int | None = None) -> dict[str, Any]:
    """A ``config.json`` dict that ``transformers.GPT2Config`` reads, with our config kept under
    ``"gpt2model"`` so a round trip loses nothing (e.g. ``bias=False``). ``dtype``: that of the
    saved tensors (HF's ``dtype``, formerly ``torch_dtype``). ``eos_id``: the end-of-sequence id where it is not
    ``eot_id`` (a chat fine-tune's ``<|im_end|>``). ``n_ctx`` repeats ``n_positions`` as OpenAI's
    GPT-2 configs do: llama.cpp's ``convert_hf_to_gguf.py`` reads it."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_ctx": config.context_length,
        "n_embd": config.d_model,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        # HF insists these lie inside the vocabulary; a char model has no end-of-text token.
        "bos_token_id": eot_id,
        "eos_token_id": eot_id if eos_id is None else eos_id,  # a chat fine-tune's own (<|im_end|>)
        # (transformers >= 4.56 names it "dtype" and warns "`torch_dtype` is deprecated!" on the old key;
        # older versions without the key take the weights' own dtype for torch_dtype="auto")
        "dtype": str(dtype).removeprefix("torch."),
        "gpt2model": config.to_dict(),
    }


# HF's config.json keys for the fields of ours that HF's GPT2Config holds too.
HF_CONFIG_KEYS = {"vocab_size": "vocab_size", "n_positions": "context_length", "n_embd": "d_model",
                  "n_layer": "n_layer", "n_head": "n_head", "layer_norm_epsilon": "layer_norm_eps",
                  "resid_pdrop": "dropout"}


def config_from_hf(d: dict[str, Any]) -> GPTconfig:
    """Our config from a HF GPT-2 ``config.json`` dict.

    Ours carry our config under ``"gpt2model"`` (for what HF cannot say, e.g. ``bias=False``), but
    HF's own keys win where both are present: transformers keeps that block verbatim while its
    tools change its own keys (``resize_token_embeddings`` after adding a chat fine-tune's
    tokens, then ``save_pretrained``), and the weights follow HF's keys."""
    if d.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"config.json describes a {d.get('model_type')!r} model; only GPT-2 ('gpt2') is supported")
    unsupported = []
    if d.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        unsupported.append(f"activation_function={d['activation_function']!r}")
    if d.get("n_inner") not in (None, 4 * d["n_embd"]):
        unsupported.append(f"n_inner={d['n_inner']}")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if d.get(flag):
            unsupported.append(f"{flag}=True")
    if d.get("scale_attn_weights") is False:
        unsupported.append("scale_attn_weights=False")
    if unsupported:
        raise ValueError(f"this GPT-2 variant is not supported: {', '.join(unsupported)}")
    if "gpt2model" in d:
        ours = dict(d["gpt2model"])
        ours.update({key: d[hf_key] for hf_key, key in HF_CONFIG_KEYS.items() if d.get(hf_key) is not None})
        return GPTconfig.from_dict(ours)
    return GPTconfig(
        context_length=d["n_positions"], vocab_size=d["vocab_size"], n_layer=d["n_layer"],
        n_head=d["n_head"], d_model=d["n_embd"], dropout=float(d.get("resid_pdrop", 0.0)),
        bias=True, layer_norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
    )


def state_dict_to_hf(state_dict: dict[str, torch.Tensor], config: GPTconfig) -> dict[str, torch.Tensor]:
    """Our state dict -> HF ``GPT2LMHeadModel`` names and layout (contiguous, no shared storage).

    ``lm_head.weight`` is left out: it is tied to ``transformer.wte.weight`` and HF re-ties it.
    A model without biases gets zero biases, which compute the same function.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if name == "lm_head.weight":
            continue
        t = t.detach()
        if name.endswith(CONV1D_SUFFIXES):
            t = t.t()
        out[name] = t.contiguous().clone()
    if not config.bias:
        d = config.d_model
        zeros = {"ln_1.bias": d, "ln_2.bias": d, "attn.c_attn.bias": 3 * d, "attn.c_proj.bias": d,
                 "mlp.c_fc.bias": 4 * d, "mlp.c_proj.bias": d}
        dtype = state_dict["transformer.wte.weight"].dtype
        for i in range(config.n_layer):
            for suffix, n in zeros.items():
                out[f"transformer.h.{i}.{suffix}"] = torch.zeros(n, dtype=dtype)
        out["transformer.ln_f.bias"] = torch.zeros(d, dtype=dtype)
    return out


def state_dict_from_hf(hf: dict[str, torch.Tensor], config: GPTconfig) -> dict[str, torch.Tensor]:
    """HF GPT-2 weights -> our state dict for ``config``.

    Accepts hub files whose keys lack the ``transformer.`` prefix (``h.0.attn...``, as in OpenAI's
    original upload), with or without ``lm_head.weight``, and crops position embeddings to a
    shorter ``config.context_length``.
    """
    sd: dict[str, torch.Tensor] = {}
    for name, t in hf.items():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        if name.endswith(CONV1D_SUFFIXES):
            t = t.t()
        if name == "transformer.wpe.weight" and t.shape[0] > config.context_length:
            t = t[: config.context_length]
        if not config.bias and name.endswith(".bias"):
            if torch.count_nonzero(t):
                raise ValueError(f"{name} has non-zero values but the config says bias=False")
            continue
        sd[name] = t.contiguous()
    if "lm_head.weight" in sd:
        if not torch.equal(sd["lm_head.weight"], sd.get("transformer.wte.weight", sd["lm_head.weight"])):
            raise ValueError("lm_head.weight differs from transformer.wte.weight; GPT-2 ties them and "
                             "untied heads are not supported")
        del sd["lm_head.weight"]
    return sd


# --- what a HF folder says beyond the weights (serving, GGUF export) --------------------------------
def find_eos_ids(model_dir: str | Path, vocab_size: int | None = None) -> tuple[int, ...]:
    """The end-of-sequence ids a HF model folder declares (``generation_config.json``'s
    ``eos_token_id``, else ``config.json``'s: an id or a list), which vLLM stops at; with
    ``vocab_size``, only those below it (a model's ids). ``()`` for anything that is not such a
    folder (a hub name, a folder without them)."""
    folder = Path(model_dir).expanduser()
    for name in ("generation_config.json", "config.json"):
        try:
            eos = json.loads((folder / name).read_text(encoding="utf-8-sig")).get("eos_token_id")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue  # absent or unreadable: config.json's problems are the model loader's to report
        eos = [eos] if isinstance(eos, int) else eos
        if isinstance(eos, list) and eos and all(isinstance(t, int) and not isinstance(t, bool) for t in eos):
            return tuple(t for t in dict.fromkeys(eos) if vocab_size is None or 0 <= t < vocab_size)
    return ()


def find_chat_template(model_dir: str | Path) -> tuple[str, Path] | None:
    """The chat template a HF model folder carries, as vLLM (through transformers) finds it:
    ``chat_template.jinja`` (transformers >= 4.43 saves it there), else ``tokenizer_config.json``'s
    ``chat_template`` (a string, or a list of named ones: the "default"); ``(text, file)`` or None."""
    folder = Path(model_dir).expanduser()
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8-sig"), folder / "chat_template.jinja"
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8-sig")).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{config} is not a JSON object ({e}); fix the file or pass --chat-template FILE") from None
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return (template, config) if isinstance(template, str) and template else None
