"""The ``gpt2`` command: parses arguments and calls the library. No logic of its own.

Verbs: ``prepare`` (text -> token files), ``train``, ``sample``, ``eval``, ``info``, ``serve`` (the
HTTP server, ``server.py``), ``export`` (GGUF for llama.cpp). (Benchmarks
are ``make bench`` / ``bench/run.py``: they need the dev extras, not part of the installed command.)
Each verb has an ``_add_<verb>`` function that declares its arguments and a ``_run_<verb>``
function that calls into the package.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from .fileio import DiskFullError, FolderBusyError


def _non_empty(text: str) -> str:
    """argparse type for text options where an empty string has no meaning (e.g. --stop '')."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


# llama.cpp's string_process_escapes (common.cpp), which its CLI applies to the prompt and the
# reverse prompts (stop strings) unless --no-escape: \n \r \t \' \" \\ and \xHH; any other
# backslash stays as written.
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "'": "'", '"': '"', "\\": "\\"}


def unescape(text: str) -> str:
    """``text`` with llama.cpp's CLI escapes read: ``--stop '\\n'`` is a newline, as in llama-cli
    (a shell passes the two characters; ``\\\\`` is one backslash). ``\\xHH`` is the character U+00HH."""
    out = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt in _ESCAPES:
                out.append(_ESCAPES[nxt])
                i += 2
                continue
            hexdigits = text[i + 2:i + 4]
            if nxt == "x" and len(hexdigits) == 2 and all(h in "0123456789abcdefABCDEF" for h in hexdigits):
                out.append(chr(int(hexdigits, 16)))
                i += 4
                continue
        out.append(c)
        i += 1
    return "".join(out)


def _finite_float(text: str) -> float:
    """argparse type for every float option: NaN and infinities are refused (NaN fails every
    comparison, so it would slip through range checks)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


# --- prepare --------------------------------------------------------------------------------------
def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize text into a dataset folder (train.bin, val.bin, meta.json)",
                       description="Tokenize text files, folders or a named dataset (shakespeare_char, "
                       "shakespeare) into train.bin / val.bin / meta.json + the tokenizer's files. Files are "
                       "documents, separated by <|endoftext|> where the tokenizer has one; the first "
                       "(1 - val_fraction) of the tokens are train, the rest val.")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="text files, folders (searched recursively for --glob), shakespeare_char / shakespeare, "
                   "or - for standard input")
    p.add_argument("--input", action="append", default=[], metavar="PATH",
                   help="the same as a positional INPUT (repeatable)")
    p.add_argument("--tokenizer", default=None,
                   help="char, gpt2, bpe (train a new one; needs --vocab-size), or a folder with a saved "
                   "tokenizer (e.g. a model's, for fine-tuning). Default: the named dataset's, else gpt2")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary size for --tokenizer bpe")
    p.add_argument("--out", default=None, help="output folder (default: data/<name>)")
    p.add_argument("--val-fraction", type=_finite_float, default=0.1,
                   help="fraction of tokens for val, in (0, 1) (default: 0.1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    p.add_argument("--glob", default="*.txt", help="file pattern for folder inputs (default: *.txt)")
    p.add_argument("--errors", choices=("strict", "replace"), default="strict",
                   help="non-UTF-8 bytes: strict = error naming file and offset (default); replace = U+FFFD")
    p.add_argument("--unknown-char", default=None,
                   help="with a reused char tokenizer: replace characters outside its vocabulary by this one")
    p.add_argument("--special-tokens", action="store_true",
                   help="read the tokenizer's special-token strings in the text (<|endoftext|>; a ChatML "
                   "fine-tune's <|im_start|>, <|im_end|>) as those tokens, as HF's tokenizer does (TRL / run_clm "
                   "datasets). Default: they are ordinary text (prepare warns when it finds them)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from .data import open_dataset, prepare_dataset

    inputs = [*args.inputs, *args.input]
    if not inputs:
        raise ValueError("no input: name text files, folders or a dataset (shakespeare_char, shakespeare), "
                         "e.g. 'gpt2 prepare shakespeare_char' or 'gpt2 prepare --input my_texts/'")
    out = prepare_dataset(inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                          val_fraction=args.val_fraction, glob=args.glob, errors=args.errors, overwrite=args.overwrite,
                          unknown_char=args.unknown_char, progress=not args.quiet, special_tokens=args.special_tokens)
    ds = open_dataset(out)
    t = ds.meta["tokens"]
    print(f"wrote {out}: {ds.meta['tokenizer']['type']} tokenizer, vocab {ds.vocab_size:,}, "
          f"train {t['train']:,} tokens, val {t['val']:,} tokens ({ds.dtype.name})")
    return 0


# --- info -----------------------------------------------------------------------------------------
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a model's or preset's configuration and parameter count")
    p.add_argument("model", help="a model folder, a hub name, or a preset (gpt2, shakespeare-char, ...)")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from .checkpoint import load_config
    from .config import PRESETS, GPTconfig
    from .model import GPT

    # A folder of that name wins, as everywhere a model is named (a run's --out called shakespeare-char)
    if args.model in PRESETS and not Path(args.model).expanduser().is_dir():
        config = GPTconfig.preset(args.model)
    else:
        config = load_config(args.model)  # the config only: no weights read
    with torch.device("meta"):  # shapes without memory: gpt2-xl took 37 s and 6 GB to count its parameters
        model = GPT(config)
    print(model.config.to_json(), end="")
    print(f"parameters: {model.num_params():,}")
    return 0


# --- train ----------------------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    from dataclasses import fields

    from .config import TrainConfig
    from .train import train  # noqa: F401 - fail here, not mid-run, if training can't import

    p = sub.add_parser("train", help="train a GPT on a prepared dataset (or fine-tune one, or resume a run)",
                       description="Train a GPT. Every option can also be set in a TOML file (--config); the "
                       "command line overrides the file. Resume a run with the same command plus --resume. "
                       "Multi-GPU/CPU: torchrun --nproc_per_node N -m gpt2model train ...")
    p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                   help="TOML file of options (flat 'key = value', keys as below with underscores)")
    defaults = TrainConfig()
    metavars = {"data": "DIR", "out": "DIR", "init_from": "SOURCE", "device": "DEVICE", "dtype": "DTYPE",
                int: "N", float: "X"}
    for f in fields(TrainConfig):
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        # None / "" defaults are explained by the help text itself.
        shown = "" if default is None or default == "" else f" (default: {default})"
        # SUPPRESS: only options actually given reach the config, so they can override the file.
        kwargs = dict(default=argparse.SUPPRESS, help=f.metadata["help"] + shown)
        if TrainConfig.field_type(f.name) is bool:  # bool, or bool | None (unset: decided by other options)
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            kind = TrainConfig.field_type(f.name)
            p.add_argument(flag, type=_finite_float if kind is float else kind,
                           metavar=metavars.get(f.name, metavars.get(kind)), **kwargs)
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .train import NonFiniteLossError, train

    options = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
    cfg = TrainConfig.load(getattr(args, "config", None), **options)
    try:
        result = train(cfg)
    except NonFiniteLossError as e:
        print(f"gpt2 train: {e}", file=sys.stderr)
        return 1
    except DiskFullError as e:
        from pathlib import Path

        from .runfolder import TRAINING_STATE_FILE, load_training_state

        state = Path(cfg.out) / TRAINING_STATE_FILE
        kept = (f"the previous checkpoint at {cfg.out} (step {load_training_state(cfg.out)['step']}) is intact; free "
                f"space and rerun with --resume" if state.is_file() else "no checkpoint had been written yet")
        print(f"gpt2 train: error: {e.strerror}; {kept}", file=sys.stderr)
        return 1
    print(f"trained to step {result.step}; best val loss {result.best_val_loss:.4f}; model in {cfg.out}")
    return 0


# --- sample ---------------------------------------------------------------------------------------
def _add_device_options(p: argparse.ArgumentParser) -> None:
    """--device and --dtype of the commands that run a saved model (sample, eval, serve)."""
    from .quantize import WEIGHT_DTYPES

    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default="float32",
                   help="weights dtype (default: float32); int8: weight-only int8 linears quantized at load "
                        "(float32 everywhere else), the fastest one-row decode on CPU; f16: float16 weights, "
                        "float32 math (CPU, FBGEMM), the fastest batched decode and serving on CPU; "
                        "int8-dynamic: int8 weights and per-row int8 activations (CPU, FBGEMM): faster "
                        "batched int8 decode and prefill, less accurate than int8")


def _load(args: argparse.Namespace):  # noqa: ANN202 - (GPT, tokenizer)
    """The model of --model on --device in --dtype, and its tokenizer."""
    from .checkpoint import load_model_and_tokenizer
    from .device import resolve_device
    from .quantize import weights_dtype

    dtype, quantization = weights_dtype(args.dtype)
    model, tokenizer = load_model_and_tokenizer(args.model, device=resolve_device(args.device), dtype=dtype)
    if quantization:
        model.quantize(quantization)
    return model, tokenizer


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate text from a model (ours or HF GPT-2)",
                       description="Sample continuations of a prompt with a KV-cached decoder. Stops at the "
                       "tokenizer's end-of-text token and at a model folder's end-of-sequence ids "
                       "(generation_config.json's eos_token_id, else config.json's; e.g. a ChatML fine-tune's "
                       "<|im_end|>), as HF's generate and vLLM do. Temperature 0 is greedy decoding.")
    p.add_argument("--model", required=True, help="a model folder (ours or HF GPT-2) or a hub name (gpt2, ...)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None,
                     help="prompt text; escapes \\n \\t \\r \\\\ \\\" \\' \\xHH are read as in llama.cpp's CLI "
                     "(see --no-escape) (default: the end-of-text token if the tokenizer has one, else a newline)")
    src.add_argument("--prompt-file", default=None, help="read the prompt from this UTF-8 file (exactly: no escapes)")
    p.add_argument("--num-samples", type=int, default=1, help="number of samples (default: 1)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per sample (default: 200)")
    p.add_argument("--temperature", type=_finite_float, default=0.8,
                   help="0 = greedy; higher = more random (default: 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=_finite_float, default=None, help="nucleus sampling: smallest set with this total "
                   "probability, in [0, 1] (0: only the most likely token)")
    p.add_argument("--repetition-penalty", type=_finite_float, default=1.0,
                   help="divide positive (multiply negative) logits of tokens already in the prompt or the sample by "
                   "this, > 0; 1 = off (default), 1.1-1.3 typical (HF/vLLM/llama.cpp's repetition penalty)")
    p.add_argument("--min-p", type=_finite_float, default=None,
                   help="keep only tokens at least this fraction as likely as the most likely one, in [0, 1]")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", type=_non_empty,
                   help="stop a sample when its text contains TEXT (not printed; escapes as in --prompt, "
                   "e.g. '\\n\\n'); repeatable")
    p.add_argument("--no-escape", action="store_true",
                   help="take --prompt and --stop as written: no escape sequences (llama.cpp's --no-escape)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    _add_device_options(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow start)")
    p.set_defaults(func=_run_sample)


def _run_sample(args: argparse.Namespace) -> int:

    from .fileio import read_text_file
    from .generate import check_sampling_args, prompt_ids_for, sample_texts, stream_text
    from .hf import find_eos_ids

    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    check_sampling_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                        repetition_penalty=args.repetition_penalty, min_p=args.min_p)
    if not args.no_escape:  # as llama-cli: "--stop '\n'" was the two characters, never found in the text
        args.prompt = None if args.prompt is None else unescape(args.prompt)
        args.stop = [unescape(s) for s in args.stop]
    model, tokenizer = _load(args)
    text = read_text_file(args.prompt_file, "--prompt-file") if args.prompt_file is not None else args.prompt
    prompt, prompt_ids = prompt_ids_for(tokenizer, text)
    # End-of-text and the folder's eos ids (those of this vocabulary: the server's rule)
    eos = (() if tokenizer.eot is None else (tokenizer.eot,)) + find_eos_ids(args.model, model.config.vocab_size)
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, min_p=args.min_p, eot_id=eos or None,
                   compile=args.compile, stop_strings=args.stop)
    separator = "---------------"
    if args.stream:
        for i in range(args.num_samples):  # sample i uses seed S + i, as in the batch
            seed = None if args.seed is None else args.seed + i
            print(prompt, end="", flush=True)
            for piece in stream_text(model, tokenizer, prompt_ids, args.max_new_tokens, seed=seed, **options):
                print(piece, end="", flush=True)
            print()
            if args.num_samples > 1:
                print(separator)
        return 0
    for text in sample_texts(model, tokenizer, prompt_ids, args.num_samples, args.max_new_tokens, seed=args.seed,
                             **options):
        print(prompt + text)
        if args.num_samples > 1:
            print(separator)
    return 0


# --- eval -----------------------------------------------------------------------------------------
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity of a text or dataset split, or zero-shot tasks (hellaswag, ...)",
                       description="Either score a whole text with sliding windows of the model's context (every "
                       "window starts --stride tokens after the previous one and only its new tokens count: HF's "
                       "perplexity-guide method), or run zero-shot tasks scored as lm-evaluation-harness scores "
                       "them (--task; data files under $GPT2MODEL_DATA/<task>/, see the README).")
    p.add_argument("--model", required=True, help="a model folder (ours or HF GPT-2) or a hub name")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="a UTF-8 text file, encoded with the model's tokenizer")
    src.add_argument("--data", help="a dataset folder written by 'gpt2 prepare'")
    src.add_argument("--task", action="append", metavar="TASK[,TASK...]",
                     help="zero-shot task(s), comma-separated or repeated: hellaswag, lambada, wikitext2, enwik8, "
                     "text8, multiple_choice (needs --mc-file)")
    p.add_argument("--split", choices=("train", "val"), default="val", help="split of --data (default: val)")
    p.add_argument("--stride", type=int, default=None, help="window stride for --text/--data "
                   "(default: context_length // 2)")
    p.add_argument("--batch-size", type=int, default=None, help="windows (--text/--data, default 1) or packed rows "
                   "(--task, default 8) per forward")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of --text/--data")
    p.add_argument("--limit", type=int, default=None, help="--task: only the first N items of each task "
                   "(enwik8/text8: N windows)")
    p.add_argument("--mc-file", default=None, metavar="FILE",
                   help='--task multiple_choice: JSONL of {"context": str, "choices": [str, ...], "label": int}')
    _add_device_options(p)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_eval)


def _check_writable(flag: str, path: str) -> None:
    """Fail before the work (an evaluation may take hours) if ``path`` could not be written: the
    folder it would go in (or the nearest existing one above it) is a file, read-only or not ours."""
    import os
    from pathlib import Path

    parent = Path(path).expanduser().absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is a file, so the file cannot be written there")
    if not os.access(parent, os.W_OK | os.X_OK):  # (access() says EROFS for a read-only file system, root too)
        raise ValueError(f"{flag} {path}: {parent} is not writable (read-only file system or no permission); "
                         f"give a path in a folder you can write to")


def _run_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .evaluate import evaluate
    from .fileio import atomic_write_json, read_text_file

    if args.json is not None and Path(args.json).is_dir():  # fail now, not after a long evaluation
        raise ValueError(f"--json {args.json} is a folder; give a file name, e.g. {Path(args.json) / 'eval.json'}")
    if args.json is not None:
        _check_writable("--json", args.json)
    for name in ("batch_size", "stride"):
        if getattr(args, name) is not None and getattr(args, name) < 1:  # 0 would silently mean the default
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    # Options of the other mode did nothing, silently (--max-tokens with --task scored every item)
    other = ((("--split", args.split != "val"), ("--stride", args.stride is not None),
              ("--max-tokens", args.max_tokens is not None)) if args.task else
             (("--limit", args.limit is not None), ("--mc-file", args.mc_file is not None)))
    ignored = [flag for flag, given in other if given]
    if ignored:
        hint = {"--max-tokens": ", or use --limit N (the first N items of each task)",
                "--limit": ", or use --max-tokens N (the first N tokens)"}.get(ignored[0], "")
        raise ValueError(f"{', '.join(ignored)} {'apply' if len(ignored) > 1 else 'applies'} to "
                         f"{'--text/--data' if args.task else '--task'} only; drop "
                         f"{'them' if len(ignored) > 1 else 'it'}{hint}")
    if args.task:
        return _run_eval_tasks(args)
    model, tokenizer = _load(args)
    if args.text is not None:
        ids = tokenizer.encode(read_text_file(args.text, "--text"))
        source = args.text
        if not ids:
            raise ValueError(f"--text {args.text} is empty: there is nothing to score")
    else:
        from .data import open_dataset
        from .tokenizer import same_ids

        dataset = open_dataset(args.data)
        if not same_ids(dataset.tokenizer(), tokenizer):
            raise ValueError(f"--data {args.data} was tokenized with {dataset.tokenizer()!r}, not with the model's "
                             f"tokenizer ({tokenizer!r}): its ids would be read as other tokens. Prepare the text "
                             f"with 'gpt2 prepare ... --tokenizer {args.model}', or score the raw text with --text")
        tokenizer = dataset.tokenizer()
        ids = dataset.split(args.split)
        source = f"{args.data} ({args.split})"
    if args.max_tokens is not None:
        if args.max_tokens < 2:
            raise ValueError(f"--max-tokens must be >= 2, got {args.max_tokens}")
        ids = ids[:args.max_tokens]
    r = evaluate(model, ids, stride=args.stride, batch_size=args.batch_size or 1, tokenizer=tokenizer,
                 progress=not args.no_progress)
    bpb = f"{r.bits_per_byte:.4f}" if r.bits_per_byte is not None else "-"
    print(f"{source}: loss {r.loss:.4f}  perplexity {r.perplexity:.3f}  bits/byte {bpb}  "
          f"({r.num_tokens:,} tokens, {r.num_bytes or 0:,} bytes; context {r.context_length}, stride {r.stride})")
    if args.json is not None:
        atomic_write_json(args.json, {"model": str(args.model), "source": source, **r.to_dict()})
    return 0


def _run_eval_tasks(args: argparse.Namespace) -> int:
    from .fileio import atomic_write_json
    from .tasks import format_table, run_tasks

    names = [t.strip() for arg in args.task for t in arg.split(",") if t.strip()]
    if not names:
        raise ValueError("--task names no task; e.g. --task hellaswag,lambada")
    if args.mc_file is not None and "multiple_choice" not in names:
        raise ValueError("--mc-file is the data of --task multiple_choice, which is not among the tasks; add it "
                         "(--task multiple_choice) or drop --mc-file")
    model, tokenizer = _load(args)
    results = run_tasks(model, tokenizer, names, limit=args.limit, batch_size=args.batch_size or 8,
                        progress=not args.no_progress, mc_file=args.mc_file)
    print(format_table(results))
    if args.json is not None:
        atomic_write_json(args.json, {"model": str(args.model), "tasks": [r.to_dict() for r in results]})
    return 0


# --- serve ----------------------------------------------------------------------------------------
def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (needs gpt2model[serve])",
                       description="An OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, "
                       "/health, /metrics, /tokenize, /detokenize) with continuous batching, streaming and "
                       "cancellation. Talk to it with openai.OpenAI(base_url='http://127.0.0.1:8000/v1', "
                       "api_key=...). SIGTERM finishes running requests (up to --request-timeout), then exits 0.")
    p.add_argument("--model", required=True, help="a model folder (ours or HF GPT-2) or a hub name (gpt2, ...)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                   "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=_port, default=8000, help="port (default: 8000)")
    _add_device_options(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow start)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV-cache slots; default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; more get HTTP 429 (default 64)")
    p.add_argument("--max-prefill-tokens", type=int, default=None,
                   help="prompt tokens one prefill forward takes at most (waiting prompts x longest, padded); "
                   "longer prompts are prefilled in chunks between decode steps (default: 2048 on CUDA, 64 on "
                   "CPU)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the OpenAI API (/v1/...; "
                   "/health, /metrics and /tokenize stay open, as in vLLM) (default: $GPT2MODEL_API_KEY; "
                   "none if unset)")
    p.add_argument("--model-name", default=None, help="the model id clients send and /v1/models lists "
                   "(default: the folder's name)")
    p.add_argument("--request-timeout", type=float, default=30.0,
                   help="on SIGTERM, how long running requests may take to finish before they are cancelled "
                   "(seconds, default 30)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja2 chat template (gets messages, add_generation_prompt) instead of the model "
                   "folder's own (chat_template.jinja or tokenizer_config.json's, as vLLM) or, without one, the "
                   "built-in 'User: ... / Assistant:' transcript")
    p.add_argument("--allowed-origins", default="*", metavar="ORIGINS",
                   help="CORS: comma-separated origins whose web pages may call the server, e.g. "
                   "'http://localhost:3000' (default: '*', any, as vLLM; '' sends no CORS headers)")
    p.set_defaults(func=_run_serve)


def _port(text: str) -> int:
    """argparse type for --port: a TCP port number."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in [1, 65535], got {port}")
    return port


def _check_listen(host: str, port: int) -> None:
    """Fail before loading the model (seconds to minutes) if the server could not listen on
    ``host:port``: the port is taken, or the host is not an address of this machine."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve it ({e.strerror}); give an address such as 127.0.0.1 or "
                         f"0.0.0.0") from None
    # As asyncio's create_server (what uvicorn runs) binds them: every address of the host, skipping
    # those of a family the machine does not have (EADDRNOTAVAIL, e.g. "localhost" -> ::1 without IPv6).
    error: OSError | None = None
    bound = 0
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a TIME_WAIT port is free
            try:
                sock.bind(address)
                bound += 1
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise ValueError(f"port {port} on {host} is already in use (another server?): stop it or pass "
                                     f"another --port") from None
                if e.errno != errno.EADDRNOTAVAIL:
                    error = error or e
    if error is not None or not bound:
        why = error.strerror if error is not None else "no address of it is on this machine"
        raise ValueError(f"cannot listen on {host}:{port}: {why}; check --host and --port")


def _run_serve(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    try:
        from .server import serve
    except ImportError as e:
        raise ValueError(f"gpt2 serve needs the web stack: pip install 'gpt2model[serve]' ({e})") from None
    for name in ("max_batch", "max_queue", "max_prefill_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.request_timeout < 0:
        raise ValueError(f"--request-timeout must be >= 0 seconds, got {args.request_timeout}")
    if args.chat_template is not None and not Path(args.chat_template).is_file():
        raise FileNotFoundError(f"--chat-template {args.chat_template}: no such file")
    _check_listen(args.host, args.port)
    from .hf import find_chat_template, find_eos_ids

    # As vLLM: a HF folder's own chat template (a fine-tune's ChatML ...) unless --chat-template
    found = find_chat_template(args.model) if args.chat_template is None and Path(args.model).is_dir() else None
    model, tokenizer = _load(args)
    name = args.model_name or Path(args.model).expanduser().name or str(args.model)
    if found is not None:
        print(f"gpt2 serve: chat template from {found[1]}", flush=True)
    api_key = args.api_key if args.api_key is not None else os.environ.get("GPT2MODEL_API_KEY") or None
    return serve(model, tokenizer, host=args.host, port=args.port, model_name=name, api_key=api_key,
                 chat_template=args.chat_template, chat_template_text=found[0] if found else None,
                 eos_token_ids=find_eos_ids(args.model),
                 max_batch=args.max_batch, max_queue=args.max_queue,
                 compile=args.compile, request_timeout=args.request_timeout,
                 max_prefill_tokens=args.max_prefill_tokens,
                 allowed_origins=[o.strip() for o in args.allowed_origins.split(",") if o.strip()],
                 ready=lambda url: print(f"gpt2 serve: {name!r} on {url} (OpenAI API at {url}/v1; "
                                         f"SIGTERM or Ctrl-C stops it)", flush=True))


# --- export ---------------------------------------------------------------------------------------
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a model as one GGUF file (llama.cpp, ollama, LM Studio)",
                       description="Export a model folder (ours or HF GPT-2) or a hub name to GGUF, architecture "
                       "gpt2, with its tokenizer. f32 is exact; f16 and q8_0 are llama.cpp's usual smaller files.")
    p.add_argument("model", help="a model folder (ours or HF GPT-2) or a hub name")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    p.add_argument("--dtype", choices=("f32", "f16", "q8_0"), default="f32",
                   help="tensor precision: f32 (exact, default), f16, or q8_0 (8-bit blocks)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .export import export_gguf

    if Path(args.gguf).is_dir():
        raise ValueError(f"--gguf {args.gguf} is a folder; give a file name, e.g. {Path(args.gguf) / 'model.gguf'}")
    _check_writable("--gguf", args.gguf)
    out = export_gguf(args.model, args.gguf, args.dtype)
    print(f"wrote {out} ({args.dtype}, {Path(out).stat().st_size / 2**20:.1f} MiB)")
    return 0


# --- main -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2", description="GPT-2 from scratch: prepare data, train, sample "
                                     "and evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_prepare(sub)
    _add_info(sub)
    _add_train(sub)
    _add_sample(sub)
    _add_eval(sub)
    _add_serve(sub)
    _add_export(sub)
    return parser


def _warning_line(command: str):  # noqa: ANN202 - a warnings.formatwarning
    """``warnings.formatwarning`` for the command line: "gpt2 sample: warning: ..." on one line. The
    default printed the library's file:line and the source line of whatever called it (for the
    prompt-too-long warning of ``gpt2 sample``: torch's ``return func(*args, **kwargs)``)."""

    def format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                       line: str | None = None) -> str:
        where = "" if issubclass(category, UserWarning) else f" ({category.__name__}, {filename}:{lineno})"
        return f"gpt2 {command}: warning: {message}{where}\n"

    return format_warning


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    default_format, warnings.formatwarning = warnings.formatwarning, _warning_line(args.command)
    try:
        return _main(args)
    finally:
        warnings.formatwarning = default_format


def _main(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except (FolderBusyError, DiskFullError) as e:
        # Not the input's fault: the folder is in use, or the disk is full (what was there is intact).
        why = f"{e.strerror}; what was there before is intact" if isinstance(e, DiskFullError) else e
        print(f"gpt2 {args.command}: error: {why}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        # Errors of the user's input: one clear line, no traceback.
        print(f"gpt2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader left (`gpt2 sample ... | head`): stop quietly, as Unix tools do. stdout goes to
        # /dev/null so that Python's flush at exit does not fail on the closed pipe again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the broken pipe
    except OSError as e:
        if e.filename is None:
            raise
        # A path the OS refused (no permission, a file where a folder must be, ...): one line naming it.
        where = str(e.filename) + (f" -> {e.filename2}" if e.filename2 is not None else "")
        hints = {FileExistsError: "a file stands where a folder is needed",
                 NotADirectoryError: "a file stands where a folder is needed",
                 IsADirectoryError: "a folder stands where a file is needed",
                 PermissionError: "no permission: pick a path you may use, or fix its permissions"}
        hint = hints.get(type(e), "check the path")
        print(f"gpt2 {args.command}: error: {e.strerror or e}: {where} ({hint})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gpt2 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
