"""Damaged weights and bad command-line input (issue 14): each gives one clear error naming the
problem (and the file), never a traceback or a silently wrong result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gpt2model import GPT, GPTconfig
from gpt2model.checkpoint import CheckpointError
from gpt2model.cli import main
from gpt2model.config import TrainConfig
from gpt2model.tokenizer import CharTokenizer

TEXT = "To be, or not to be, that is the question.\n" * 4


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    tok = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    GPT(GPTconfig(n_layer=1, n_head=2, d_model=16, context_length=32, vocab_size=tok.vocab_size)).save_pretrained(
        tmp_path / "m", tokenizer=tok)
    return tmp_path / "m"


def _data_region(path: Path) -> tuple[int, dict]:
    """Offset of the tensor data in a safetensors file, and its header."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return 8 + n, json.loads(raw[8:8 + n])


def test_nan_weights_are_refused_naming_file_and_tensor(model_dir: Path, capsys) -> None:
    weights = model_dir / "model.safetensors"
    start, header = _data_region(weights)
    begin, _ = header["transformer.h.0.mlp.c_fc.weight"]["data_offsets"]
    raw = bytearray(weights.read_bytes())
    raw[start + begin:start + begin + 4] = b"\x00\x00\xc0\x7f"  # one float32 NaN
    weights.write_bytes(bytes(raw))
    with safe_open(str(weights), "pt") as f:  # the hash would catch this too; test the finite check alone
        metadata = {k: v for k, v in (f.metadata() or {}).items() if "xxh3" not in k}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    from safetensors.torch import save_file

    save_file(tensors, str(weights), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor transformer.h.0.mlp.c_fc.weight holds 1 "):
        GPT.from_pretrained(model_dir)
    assert main(["sample", "--model", str(model_dir), "--device", "cpu", "--max-new-tokens", "3"]) == 2
    assert main(["eval", "--model", str(model_dir), "--text", str(model_dir / "vocab.json"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("holds 1 NaN/inf value") == 2 and "Traceback" not in err


def test_a_zero_filled_torn_copy_fails_the_content_hash(model_dir: Path) -> None:
    weights = model_dir / "model.safetensors"
    start, _ = _data_region(weights)
    raw = bytearray(weights.read_bytes())
    raw[start + len(raw[start:]) // 2:] = bytes(len(raw) - start - len(raw[start:]) // 2)  # the second half zeroed
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="do not match the content hash"):
        GPT.from_pretrained(model_dir)


def test_eval_json_folder_fails_before_evaluating(model_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import gpt2model.evaluate as evaluate

    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking --json"))
    (tmp_path / "t.txt").write_text(TEXT)
    assert main(["eval", "--model", str(model_dir), "--text", str(tmp_path / "t.txt"), "--json", str(tmp_path),
                 "--device", "cpu"]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err


def test_binary_prompt_file_error_names_the_file(model_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "p.bin").write_bytes(b"ROMEO\xff\xfe\x00")
    assert main(["sample", "--model", str(model_dir), "--prompt-file", str(tmp_path / "p.bin"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"--prompt-file {tmp_path / 'p.bin'} is not UTF-8 text: byte offset 5" in err


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_empty_stop_string_is_refused_with_and_without_stream(model_dir: Path, stream: list[str], capsys) -> None:
    with pytest.raises(SystemExit):
        main(["sample", "--model", str(model_dir), "--device", "cpu", "--stop", "", *stream])
    assert "argument --stop: must not be empty" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--temperature", "--top-p"])
def test_sampling_options_refuse_nan(model_dir: Path, option: str, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["sample", "--model", str(model_dir), option, "nan"])
    assert "is not a finite number" in capsys.readouterr().err


def test_serve_refuses_a_bad_or_busy_port_before_loading_the_model(model_dir: Path, monkeypatch, capsys) -> None:
    """--port 99999 aborted the process inside asyncio (a C++ 'terminate called' and exit 134); a
    port in use failed only after the model had loaded, in uvicorn's words."""
    import socket

    import gpt2model.cli as cli

    pytest.importorskip("uvicorn")
    with pytest.raises(SystemExit):
        main(["serve", "--model", str(model_dir), "--port", "99999"])
    assert "port must be in [1, 65535], got 99999" in capsys.readouterr().err
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("loaded the model before checking the port"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(model_dir), "--port", str(port), "--device", "cpu"]) == 2
    assert f"port {port} on 127.0.0.1 is already in use" in capsys.readouterr().err
    assert main(["serve", "--model", str(model_dir), "--host", "no-such-host.invalid", "--device", "cpu"]) == 2
    assert "--host no-such-host.invalid: cannot resolve it" in capsys.readouterr().err
    # TEST-NET-1 is no machine's address: asyncio skips such addresses (EADDRNOTAVAIL), so "localhost"
    # without IPv6 is fine, but a host with no address here is not
    assert main(["serve", "--model", str(model_dir), "--host", "192.0.2.1", "--device", "cpu"]) == 2
    assert "cannot listen on 192.0.2.1:8000: no address of it is on this machine" in capsys.readouterr().err
    cli._check_listen("localhost", 0)


def test_export_to_a_folder_and_eval_of_an_empty_text_are_clear_errors(model_dir: Path, tmp_path: Path,
                                                                        capsys) -> None:
    # Was an IsADirectoryError traceback (from the final rename, after the whole export).
    assert main(["export", str(model_dir), "--gguf", str(tmp_path)]) == 2
    assert f"--gguf {tmp_path} is a folder; give a file name" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    # Was "ids has no tokens (empty prompt): give at least one (e.g. the tokenizer's end-of-text id)".
    assert main(["eval", "--model", str(model_dir), "--text", str(tmp_path / "empty.txt"), "--device", "cpu"]) == 2
    assert f"--text {tmp_path / 'empty.txt'} is empty: there is nothing to score" in capsys.readouterr().err


def test_eval_refuses_a_dataset_tokenized_for_another_model(model_dir: Path, tmp_path: Path, capsys) -> None:
    """A dataset prepared with another tokenizer was scored silently, its ids read as the model's
    tokens (a GPT-2 model on a char dataset gave a 'perplexity'); and --batch-size 0 meant the default."""
    (tmp_path / "other.txt").write_text("zyxw vutsr " * 50)
    assert main(["prepare", str(tmp_path / "other.txt"), "--out", str(tmp_path / "other"), "--tokenizer", "char",
                 "--quiet"]) == 0
    (tmp_path / "same.txt").write_text(TEXT * 5)
    assert main(["prepare", str(tmp_path / "same.txt"), "--out", str(tmp_path / "same"), "--tokenizer",
                 str(model_dir), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir), "--data", str(tmp_path / "other"), "--device", "cpu",
                 "--no-progress"]) == 2
    assert "was tokenized with CharTokenizer(vocab_size=10), not with the model's tokenizer" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--data", str(tmp_path / "same"), "--device", "cpu",
                 "--no-progress"]) == 0
    assert main(["eval", "--model", str(model_dir), "--data", str(tmp_path / "same"), "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err


def test_same_ids_compares_what_each_id_means(data_dir: Path, tmp_path: Path) -> None:
    from gpt2model.tokenizer import GPT2Tokenizer, load_tokenizer, same_ids

    gpt2 = GPT2Tokenizer()
    gpt2.save(tmp_path / "copy")
    assert same_ids(gpt2, load_tokenizer(tmp_path / "copy"))  # other files, same vocabulary
    transformers = pytest.importorskip("transformers")
    transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "copy").backend_tokenizer.save(str(tmp_path / "t.json"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "t.json").rename(tmp_path / "hf" / "tokenizer.json")
    from_json = load_tokenizer(tmp_path / "hf")  # GPT-2's vocabulary as a tokenizer.json: a BPETokenizer
    assert type(from_json).__name__ == "BPETokenizer" and same_ids(gpt2, from_json)
    assert not same_ids(gpt2, CharTokenizer.from_text(TEXT))
    assert same_ids(CharTokenizer("abc"), CharTokenizer("cba")) and not same_ids(CharTokenizer("abc"),
                                                                                 CharTokenizer("abd"))


def test_paths_the_os_refuses_are_one_line_errors(model_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """A file where a folder must be (or a path without permission) was a FileExistsError /
    NotADirectoryError / PermissionError traceback; --json under a file failed after the evaluation."""
    import gpt2model.fileio as fileio

    text = tmp_path / "t.txt"
    text.write_text(TEXT * 5)
    assert main(["prepare", str(text), "--out", str(text / "sub"), "--tokenizer", "char", "--quiet"]) == 2
    assert main(["sample", "--model", str(model_dir), "--prompt-file", str(text / "p.txt"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("(a file stands where a folder is needed)") == 2 and "Traceback" not in err
    assert main(["eval", "--model", str(model_dir), "--text", str(text), "--json", str(text / "x" / "r.json"),
                 "--device", "cpu"]) == 2
    assert f"{text} is a file, so the file cannot be written there" in capsys.readouterr().err

    def denied(path, what="file"):  # as for a user without read permission (the tests may run as root)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(fileio, "read_text_file", denied)
    assert main(["sample", "--model", str(model_dir), "--prompt-file", str(text), "--device", "cpu"]) == 2
    assert f"Permission denied: {text} (no permission: pick a path you may use" in capsys.readouterr().err


def test_an_unwritable_output_folder_fails_before_the_work_naming_the_users_path(model_dir: Path, tmp_path: Path,
                                                                                  monkeypatch, capsys) -> None:
    """eval --json into a read-only folder failed after the (possibly hours-long) evaluation, and that error
    and export's named the temp file (".r.json.tmp-25360-aa9a2f59") instead of the path given."""
    import errno
    import os

    from gpt2model.fileio import atomic_path

    def refuse(self, missing_ok=False) -> None:  # a read-only file system refuses even unlinking a missing file
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    # a write refused inside atomic_path names the path asked for (the cleanup's own EROFS replaced it)
    with monkeypatch.context() as m:
        m.setattr(Path, "unlink", refuse)
        with pytest.raises(OSError) as info, atomic_path(tmp_path / "out.gguf") as tmp:
            raise OSError(errno.EROFS, "Read-only file system", str(tmp))
    assert info.value.filename == str(tmp_path / "out.gguf")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    real_access = os.access
    # (a read-only file system or a folder without write permission, as seen by access(2); tests may run as root)
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != readonly and real_access(p, mode))
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 5)
    loads = []
    monkeypatch.setattr("gpt2model.cli._load", lambda args: loads.append(args) or (_ for _ in ()).throw(AssertionError))
    assert main(["eval", "--model", str(model_dir), "--text", str(text), "--json", str(readonly / "r.json")]) == 2
    assert main(["export", str(model_dir), "--gguf", str(readonly / "sub" / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert f"--json {readonly / 'r.json'}: {readonly} is not writable" in err
    assert f"--gguf {readonly / 'sub' / 'm.gguf'}: {readonly} is not writable" in err and not loads


def test_sample_piped_into_head_stops_quietly(model_dir: Path) -> None:
    """`gpt2 sample ... | head -c 1` was a BrokenPipeError traceback once head had left."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "gpt2model", "sample", "--model", str(model_dir), "--device",
                             "cpu", "--num-samples", "200", "--max-new-tokens", "30", "--stream"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.read(1)
    proc.stdout.close()  # as head does
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_fine_tuning_refuses_a_dataset_tokenized_for_another_model(model_dir: Path, tmp_path: Path, monkeypatch,
                                                                    capsys) -> None:
    """`train --init-from M --data D` trained silently when D's ids came from another tokenizer (a
    char dataset for a GPT-2 model: every id is in range, each means another token)."""
    import types

    import gpt2model.train as train_mod

    (tmp_path / "other.txt").write_text("zyxw vutsr " * 50)
    (tmp_path / "same.txt").write_text(TEXT * 5)
    assert main(["prepare", str(tmp_path / "other.txt"), "--out", str(tmp_path / "other"), "--tokenizer", "char",
                 "--quiet"]) == 0
    assert main(["prepare", str(tmp_path / "same.txt"), "--out", str(tmp_path / "same"), "--tokenizer",
                 str(model_dir), "--quiet"]) == 0
    ran = []
    # The check is train()'s (the Python API too), before any training: stub out only the loop.
    monkeypatch.setattr(train_mod, "_train", lambda cfg, *a: ran.append(cfg) or types.SimpleNamespace(
        step=0, best_val_loss=0.0))
    capsys.readouterr()
    assert main(["train", "--data", str(tmp_path / "other"), "--out", str(tmp_path / "run"), "--init-from",
                 str(model_dir)]) == 2
    assert "was tokenized with CharTokenizer(vocab_size=10), not with the tokenizer of --init-from" in \
        capsys.readouterr().err and not ran
    with pytest.raises(ValueError, match="not with the tokenizer of --init-from"):
        train_mod.train(TrainConfig(data=str(tmp_path / "other"), out=str(tmp_path / "run2"), init_from=str(model_dir)))
    assert main(["train", "--data", str(tmp_path / "same"), "--out", str(tmp_path / "run"), "--init-from",
                 str(model_dir)]) == 0 and len(ran) == 1


def test_sample_refuses_a_repetition_penalty_outside_float32(model_dir: Path, capsys) -> None:
    """--repetition-penalty 1e300 was a RuntimeError traceback (the fp32 factor buffer overflowed)."""
    assert main(["sample", "--model", str(model_dir), "--device", "cpu", "--max-new-tokens", "2",
                 "--repetition-penalty", "1e300"]) == 2
    assert "repetition_penalty must be in [1.175e-38, 3.403e+38]" in capsys.readouterr().err


def test_text_files_with_a_byte_order_mark_read_as_their_text(model_dir: Path, tmp_path: Path, capsys) -> None:
    """`gpt2 eval --text` / `sample --prompt-file` on a file saved with a UTF-8 BOM: the BOM was
    scored (eval) or sampled from as part of the prompt; now the text is the file without it."""
    plain, marked = tmp_path / "plain.txt", tmp_path / "bom.txt"
    plain.write_text(TEXT)
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    outs = []
    for f in (plain, marked):
        assert main(["eval", "--model", str(model_dir), "--text", str(f), "--device", "cpu",
                     "--json", str(tmp_path / "r.json")]) == 0
        outs.append(json.loads((tmp_path / "r.json").read_text()))
        capsys.readouterr()
        assert main(["sample", "--model", str(model_dir), "--prompt-file", str(f), "--max-new-tokens", "3",
                     "--seed", "1", "--device", "cpu"]) == 0
        outs.append(capsys.readouterr().out)
    assert {k: v for k, v in outs[0].items() if k != "source"} == {k: v for k, v in outs[2].items() if k != "source"}
    assert outs[1] == outs[3] and "\ufeff" not in outs[3]


def test_sample_reads_endoftext_in_the_prompt_as_the_special_token() -> None:
    """As nanoGPT's sample.py (allowed_special={"<|endoftext|>"}) and HF's tokenizer read a prompt."""
    from gpt2model.generate import prompt_ids_for
    from gpt2model.tokenizer import GPT2_VOCAB_SIZE, load_tokenizer

    try:
        tok = load_tokenizer("gpt2")
    except Exception as e:  # noqa: BLE001 - the GPT-2 files come from GPT2MODEL_DATA
        pytest.skip(f"GPT-2 tokenizer files not available: {e}")
    assert tok.vocab_size == GPT2_VOCAB_SIZE
    text, ids = prompt_ids_for(tok, "a<|endoftext|>b")
    assert text == "a<|endoftext|>b" and ids == tok.encode("a") + [tok.eot] + tok.encode("b")


def test_serve_allowed_origins_and_the_folders_chat_template_reach_the_server(model_dir: Path, monkeypatch) -> None:
    """--allowed-origins: comma-separated CORS origins (default '*', as vLLM); '' sends none. A model
    folder's chat_template.jinja (or tokenizer_config.json's) is used unless --chat-template is given."""
    pytest.importorskip("uvicorn")
    import gpt2model.cli as cli
    import gpt2model.server as server

    seen = []
    monkeypatch.setattr(cli, "_check_listen", lambda host, port: None)
    monkeypatch.setattr(server, "serve", lambda *a, **kw: seen.append(kw) or 0)
    for flag, want in (([], ["*"]), (["--allowed-origins", "http://a:1, http://b"], ["http://a:1", "http://b"]),
                       (["--allowed-origins", ""], [])):
        assert main(["serve", "--model", str(model_dir), "--device", "cpu", *flag]) == 0
        assert seen[-1]["allowed_origins"] == want and seen[-1]["chat_template_text"] is None
    # As vLLM: the model folder's own chat template unless --chat-template names one
    (model_dir / "chat_template.jinja").write_text("{{ messages[0].content }}")
    assert main(["serve", "--model", str(model_dir), "--device", "cpu"]) == 0
    assert seen[-1]["chat_template_text"] == "{{ messages[0].content }}" and seen[-1]["chat_template"] is None
    assert seen[-1]["eos_token_ids"] == ()  # our config.json of a char model: eos_token_id null
    (model_dir / "generation_config.json").write_text('{"eos_token_id": 3}')
    assert main(["serve", "--model", str(model_dir), "--device", "cpu"]) == 0
    assert seen[-1]["eos_token_ids"] == (3,)
    (model_dir.parent / "t.jinja").write_text("x")
    assert main(["serve", "--model", str(model_dir), "--device", "cpu", "--chat-template",
                 str(model_dir.parent / "t.jinja")]) == 0
    assert seen[-1]["chat_template_text"] is None and seen[-1]["chat_template"] == str(model_dir.parent / "t.jinja")


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_sample_stops_at_the_model_folders_eos_ids(model_dir: Path, stream: list[str], capsys) -> None:
    """As HF's generate and vLLM: a folder's generation_config.json eos_token_id (an id or a list; a
    ChatML fine-tune's <|im_end|>) ends a sample, as end-of-text does (before: only end-of-text, so
    a chat fine-tune's reply ran on into a made-up next turn). Ids outside the vocabulary are
    ignored (the server's rule)."""
    from gpt2model.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    command = ["sample", "--model", str(model_dir), "--device", "cpu", "--prompt", "To be", "--temperature", "0",
               "--max-new-tokens", "20", *stream]
    assert main(command) == 0
    cont = capsys.readouterr().out.rstrip("\n")[len("To be"):]
    assert len(cont) == 20
    stop = next((c for c in cont if c != cont[0]), cont[0])
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [10**6, *tok.encode(stop)]}))
    assert main(command) == 0
    assert capsys.readouterr().out.rstrip("\n") == "To be" + cont[:cont.index(stop)]


def test_resuming_refuses_a_dataset_tokenized_for_another_model(tmp_path: Path, monkeypatch, capsys) -> None:
    """`train --resume --data D2` with D2 prepared by another tokenizer of the same size (two char
    datasets of 4 different characters) trained on silently, each id now another character, and
    replaced the run folder's tokenizer with D2's: the saved model then decoded as neither. Resuming
    on another dataset of the SAME tokenizer stays allowed."""
    for name, text in (("a", "abcd " * 200), ("b", "wxyz " * 200), ("a2", "dcba " * 200)):
        (tmp_path / f"{name}.txt").write_text(text)
        assert main(["prepare", str(tmp_path / f"{name}.txt"), "--out", str(tmp_path / name), "--tokenizer",
                     "char", "--quiet"]) == 0
    run = ["train", "--out", str(tmp_path / "run"), "--n-layer", "1", "--n-head", "1", "--d-model", "8",
           "--context-length", "8", "--batch-size", "2", "--eval-interval", "2", "--eval-steps", "1",
           "--warmup-steps", "1", "--device", "cpu"]
    assert main([*run, "--data", str(tmp_path / "a"), "--max-steps", "2"]) == 0
    spec = (tmp_path / "run" / "tokenizer_spec.json").read_text()
    capsys.readouterr()
    assert main([*run, "--data", str(tmp_path / "b"), "--max-steps", "4", "--resume"]) == 2
    assert "not with the tokenizer of the run being resumed" in capsys.readouterr().err
    assert (tmp_path / "run" / "tokenizer_spec.json").read_text() == spec
    import types

    import gpt2model.train as train_mod

    ran = []  # the check is train()'s, before the loop: stub out only the loop
    monkeypatch.setattr(train_mod, "_train", lambda cfg, *a: ran.append(cfg) or types.SimpleNamespace(
        step=4, best_val_loss=0.0))
    assert main([*run, "--data", str(tmp_path / "a2"), "--max-steps", "4", "--resume"]) == 0 and len(ran) == 1


def test_eval_refuses_options_of_the_other_mode(model_dir: Path, tmp_path: Path, capsys) -> None:
    """`eval --task T --max-tokens N` scored every item of T, `eval --text F --limit N` every token of
    F, and --mc-file without the multiple_choice task was read by nothing: silently not what was
    asked. Each is now one error naming the option, before the model loads."""
    (tmp_path / "t.txt").write_text(TEXT)
    (tmp_path / "mc.jsonl").write_text('{"context": "To be", "choices": [", or", "that"], "label": 0}\n')
    model = ["eval", "--model", str(model_dir), "--device", "cpu", "--no-progress"]
    for extra, message in (
            (["--task", "lambada", "--max-tokens", "9"], "--max-tokens applies to --text/--data only; drop it, "
                                                         "or use --limit N"),
            (["--task", "lambada", "--split", "train", "--stride", "2"], "--split, --stride apply to --text/--data"),
            (["--text", str(tmp_path / "t.txt"), "--limit", "3"], "--limit applies to --task only; drop it, or use "
                                                                   "--max-tokens N"),
            (["--data", str(tmp_path), "--mc-file", str(tmp_path / "mc.jsonl")], "--mc-file applies to --task"),
            (["--task", "hellaswag", "--mc-file", str(tmp_path / "mc.jsonl")], "--mc-file is the data of --task "
                                                                                "multiple_choice")):
        assert main([*model, *extra]) == 2
        assert message in capsys.readouterr().err
    assert main([*model, "--task", "multiple_choice", "--mc-file", str(tmp_path / "mc.jsonl"), "--limit", "1"]) == 0
    assert main([*model, "--text", str(tmp_path / "t.txt"), "--max-tokens", "20", "--split", "val"]) == 0


def test_a_dataset_folder_given_as_a_model_and_the_other_way_round_is_named(model_dir: Path, tmp_path: Path,
                                                                          capsys) -> None:
    """`sample --model DATASET` said "DATASET/config.json is missing" and `eval --data MODEL` / `train
    --data MODEL` "not a complete dataset: meta.json is missing (an interrupted 'gpt2 prepare'?)",
    sending the user to re-run prepare over their model folder. Each now names the mix-up."""
    (tmp_path / "t.txt").write_text(TEXT)
    assert main(["prepare", str(tmp_path / "t.txt"), "--out", str(tmp_path / "ds"), "--tokenizer", str(model_dir),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["sample", "--model", str(tmp_path / "ds"), "--device", "cpu"]) == 2
    assert "is a dataset folder (written by 'gpt2 prepare'), not a model" in capsys.readouterr().err
    for command in (["eval", "--model", str(model_dir), "--device", "cpu"], ["train", "--out", str(tmp_path / "r")]):
        assert main([*command, "--data", str(model_dir)]) == 2
        assert f"{model_dir} is a model folder (config.json), not a dataset" in capsys.readouterr().err


@pytest.mark.parametrize("written, read", [
    ("\\n\\n", "\n\n"), ("a\\tb\\r\\n", "a\tb\r\n"), ("\\\\n", "\\n"), ("\\'\\\"", "'\""), ("\\x41\\x0a", "A\n"),
    ("\\q \\x4 \\xZZ", "\\q \\x4 \\xZZ"), ("end\\", "end\\"), ("C:\\\\new", "C:\\new"), ("plain", "plain"),
])
def test_unescape_reads_llama_cpps_escapes(written: str, read: str) -> None:
    from gpt2model.cli import unescape

    assert unescape(written) == read


def test_sample_reads_escapes_in_prompt_and_stop_as_llama_cli(model_dir: Path, monkeypatch, capsys) -> None:
    """`gpt2 sample --stop '\\n'` got the two characters backslash + n from the shell, a stop string
    that never occurs, so samples ran past the line end; llama-cli reads escapes in its prompt and
    reverse prompts (unless --no-escape), and so do we now."""
    from gpt2model import generate
    from gpt2model.tokenizer import load_tokenizer

    seen: dict = {}
    real = generate.sample_texts

    def spy(model, tokenizer, prompt_ids, *args, stop_strings=(), **kwargs):
        seen["ids"], seen["stops"] = list(prompt_ids), list(stop_strings)
        return real(model, tokenizer, prompt_ids, *args, stop_strings=stop_strings, **kwargs)

    monkeypatch.setattr(generate, "sample_texts", spy)
    base = ["sample", "--model", str(model_dir), "--device", "cpu", "--temperature", "0", "--max-new-tokens", "5"]
    assert main([*base, "--prompt", "To be,\\nor", "--stop", "\\n\\n", "--stop", "a\\\\b"]) == 0
    assert capsys.readouterr().out.startswith("To be,\nor")
    assert seen == {"ids": load_tokenizer(model_dir).encode("To be,\nor"), "stops": ["\n\n", "a\\b"]}
    assert main([*base, "--prompt", "To be", "--stop", "\\n", "--no-escape"]) == 0
    assert seen["stops"] == ["\\n"]


def test_library_warnings_print_as_one_line_naming_the_command(model_dir: Path, capsys) -> None:
    """A warning (here: the prompt is longer than the context) reads "gpt2 sample: warning: ...", not
    Python's "FILE:LINE: UserWarning: ..." plus the source line of torch's no_grad wrapper."""
    import sys
    import warnings

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # Python's default, to stderr
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    default_format = warnings.formatwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show  # (pytest records warnings instead of printing them)
        assert main(["sample", "--model", str(model_dir), "--device", "cpu", "--prompt", "To be, " * 8,
                     "--max-new-tokens", "2", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert err == "gpt2 sample: warning: the prompt has 56 tokens, more than context_length 32: using its last 32\n"
    assert warnings.formatwarning is default_format  # only while the command runs
