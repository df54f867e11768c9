"""The training loop: learning, exact resume, crash safety, DDP equivalence, schedule, optimizer groups,
gradient accumulation, the HF-loadable output, config handling and the failure messages.

Every run here is a tiny model on a slice of Tiny Shakespeare, on CPU in float32, with one thread
per process (two threads on two shared cores make each op wait for the busier core)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt2model import GPT, GPTconfig
from gpt2model.cli import build_parser, main
from gpt2model.config import TrainConfig
from gpt2model.data import BatchSampler, open_dataset, prepare_dataset
from gpt2model.device import measure_matmul_peak
from gpt2model.fileio import recover_dir
from gpt2model.runfolder import TRAINING_STATE_FILE, load_training_state, read_metrics
from gpt2model.train import NonFiniteLossError, configure_optimizer, lr_at, train

TINY = dict(n_layer=2, n_head=2, d_model=32, context_length=32, batch_size=8, eval_steps=2, device="cpu",
            dtype="float32")
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, shakespeare_text_module: str) -> Path:
    """A char-level dataset of the first 20k characters of Tiny Shakespeare."""
    root = tmp_path_factory.mktemp("data")
    (root / "small.txt").write_text(shakespeare_text_module[:20_000], encoding="utf-8")
    return prepare_dataset(root / "small.txt", root / "ds", tokenizer="char", progress=False)


@pytest.fixture(scope="module")
def shakespeare_text_module() -> str:
    d = Path(os.environ.get("GPT2MODEL_DATA", ""))
    path = d / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip("data files not found: set GPT2MODEL_DATA to a folder like ../shared/data")
    return path.read_text(encoding="utf-8")


def tiny(dataset: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(data=str(dataset), out=str(out), **{**TINY, **kw})


def losses(out: Path) -> list[float]:
    return [r["train_loss"] for r in read_metrics(out)]


# --- learning -------------------------------------------------------------------------------------
def test_tiny_model_overfits_short_text(tmp_path: Path, shakespeare_text_module: str) -> None:
    (tmp_path / "short.txt").write_text(shakespeare_text_module[:1200], encoding="utf-8")
    ds = prepare_dataset(tmp_path / "short.txt", tmp_path / "ds", tokenizer="char", progress=False)
    result = train(tiny(ds, tmp_path / "out", d_model=64, max_steps=400, lr=5e-3, min_lr=5e-4, warmup_steps=10,
                        eval_interval=400, weight_decay=0.0))
    first, last = result.metrics[0], result.metrics[-1]
    assert first["train_loss"] > 0.9 * math.log(open_dataset(ds).vocab_size)  # starts near uniform
    assert last["train_eval_loss"] < 0.3 * first["train_loss"]  # memorised most of the 1k characters
    record_keys = {"step", "train_loss", "lr", "tokens_per_sec", "mfu", "elapsed_s"}
    assert record_keys <= set(first) and {"val_loss", "train_eval_loss"} <= set(last)
    assert (tmp_path / "out" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_bfloat16_autocast_on_cpu_trains(dataset: Path, tmp_path: Path) -> None:
    result = train(tiny(dataset, tmp_path / "out", max_steps=4, eval_interval=4, dtype="bfloat16"))
    assert all(math.isfinite(r["train_loss"]) for r in result.metrics)
    assert result.model.dtype == torch.float32  # autocast computes in bf16, the weights stay fp32


def test_bf16_residual_option(dataset: Path, tmp_path: Path) -> None:
    result = train(tiny(dataset, tmp_path / "out", max_steps=2, eval_interval=2, dtype="bfloat16", bf16_residual=True))
    assert result.model.bf16_residual and all(math.isfinite(r["train_loss"]) for r in result.metrics)
    with pytest.raises(ValueError, match="bf16_residual .* computes in float32 .* pass --dtype bfloat16"):
        train(tiny(dataset, tmp_path / "fp32", dtype="float32", bf16_residual=True))


def test_bf16_residual_defaults_on_under_bf16_and_a_resumed_run_keeps_its_stream(dataset: Path,
                                                                                  tmp_path: Path) -> None:
    def run(name: str, **kw) -> tuple[bool, object]:
        result = train(tiny(dataset, tmp_path / name, **{"max_steps": 2, "eval_interval": 2, **kw}))
        return result.model.bf16_residual, load_training_state(tmp_path / name)["train_config"]["bf16_residual"]

    # Unset: on under bf16 autocast, off otherwise; the checkpoint stores the resolved value.
    assert run("bf16", dtype="bfloat16") == (True, True)
    assert run("fp32", dtype="float32") == (False, False)
    assert run("off", dtype="bfloat16", bf16_residual=False) == (False, False)
    # A run trained with the fp32 stream (as every run before this default was) resumes with it when
    # the flag is left out, so the resumed run equals an uninterrupted one; so does a bf16-stream run.
    assert run("off", dtype="bfloat16", max_steps=4, resume=True) == (False, False)
    assert run("bf16", dtype="bfloat16", max_steps=4, resume=True) == (True, True)
    assert all(0 < r["mfu"] <= 1 for r in read_metrics(tmp_path / "bf16") if "mfu" in r)


def test_bf16_residual_flag_parses_to_unset_true_or_false() -> None:
    from gpt2model.cli import build_parser

    def parsed(*flags: str) -> bool | None:
        args = build_parser().parse_args(["train", "--data", "d", "--out", "o", *flags])
        return TrainConfig.load(None, **{k: v for k, v in vars(args).items()
                                         if k not in ("func", "command", "config")}).bf16_residual

    assert parsed() is None and parsed("--bf16-residual") is True and parsed("--no-bf16-residual") is False


# --- resume ---------------------------------------------------------------------------------------
def test_resume_is_bit_identical_to_an_uninterrupted_run(dataset: Path, tmp_path: Path) -> None:
    # Dropout on, so the torch RNG state must be restored too; lr_decay_steps fixes the schedule.
    kw = dict(max_steps=12, lr_decay_steps=12, eval_interval=4, dropout=0.1, seed=7)
    straight = train(tiny(dataset, tmp_path / "straight", **kw))
    train(tiny(dataset, tmp_path / "split", **{**kw, "max_steps": 6}))
    # A run killed after step 6's checkpoint may have logged steps past it, one line torn.
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 7, "train_loss": 0.0}) + '\n{"step": 8, "tra')
    resumed = train(tiny(dataset, tmp_path / "split", **kw, resume=True))

    assert losses(tmp_path / "split") == losses(tmp_path / "straight")  # exact, not approximate
    assert [r["step"] for r in read_metrics(tmp_path / "split")] == list(range(1, 13))
    for p, q in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_resume_with_another_batch_size_names_the_runs(dataset: Path, tmp_path: Path) -> None:
    """`train --resume` without the run's --batch-size (the default is 64) said only "saved
    global_batch=8 but this sampler has 64"; it now names the option to pass."""
    train(tiny(dataset, tmp_path / "run", max_steps=2, eval_interval=2))
    with pytest.raises(ValueError, match="trained with --batch-size 8: resume with the command that started it"):
        train(tiny(dataset, tmp_path / "run", max_steps=3, eval_interval=3, resume=True, batch_size=64))


def test_sigkill_during_checkpoints_leaves_a_loadable_resumable_run(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [sys.executable, "-m", "gpt2model", "train", "--data", str(dataset), "--out", str(out),
            "--n-layer", "2", "--n-head", "2", "--d-model", "64", "--context-length", "32", "--batch-size", "8",
            "--max-steps", "400", "--eval-interval", "1", "--eval-steps", "1", "--checkpoint-interval", "1",
            "--device", "cpu", "--dtype", "float32"]
    rng = random.Random(0)
    for attempt in range(3):
        resume = ["--resume"] if (out / TRAINING_STATE_FILE).exists() else []
        proc = subprocess.Popen(args + resume, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        state_file = out / TRAINING_STATE_FILE
        before = state_file.stat().st_mtime_ns if state_file.exists() else 0
        deadline = time.time() + 60
        while time.time() < deadline and (not state_file.exists() or state_file.stat().st_mtime_ns == before):
            time.sleep(0.02)  # wait until this process is writing checkpoints (one per step)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Whatever instant the kill hit, the folder loads and the state is self-consistent.
        state = load_training_state(out)
        model = GPT.from_pretrained(out)
        assert state["step"] >= 1 and model.config.d_model == 64
        recover_dir(out / "best")  # what the next start does if the kill hit between best/'s two renames
        GPT.from_pretrained(out / "best")
        steps = [r["step"] for r in read_metrics(out)]
        assert steps[: state["step"]] == list(range(1, state["step"] + 1)), f"attempt {attempt}"

    # Finish the run (fewer steps so the test stays short): metrics run 1..N exactly once.
    killed_at = load_training_state(out)["step"]
    finish = subprocess.run(args[:args.index("--max-steps") + 1] + [str(killed_at + 3)] +
                            args[args.index("--max-steps") + 2:] + ["--resume"],
                            env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert finish.returncode == 0, finish.stderr[-2000:]
    assert [r["step"] for r in read_metrics(out)] == list(range(1, killed_at + 4))
    assert load_training_state(out)["step"] == killed_at + 3
    assert not list(out.glob(".*tmp*")) and not list(out.glob(".*.old"))  # no debris of the killed writes


# --- distributed ----------------------------------------------------------------------------------
def test_torchrun_two_processes_match_one_process(dataset: Path, tmp_path: Path) -> None:
    """2 ranks x batch 2 x grad_accum 2 (gloo, DDP no_sync) == 1 rank x batch 4 x grad_accum 2."""
    common = ["--data", str(dataset), "--n-layer", "2", "--n-head", "2", "--d-model", "32",
              "--context-length", "32", "--grad-accum", "2", "--max-steps", "5", "--eval-interval", "5",
              "--eval-steps", "3", "--dropout", "0.0", "--device", "cpu", "--dtype", "float32"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "gpt2model", "train", "--out", str(tmp_path / "ddp"), "--batch-size", "2", *common],
                         env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert main(["train", "--out", str(tmp_path / "one"), "--batch-size", "4", *common]) == 0
    ddp, one = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "one")
    assert len(ddp) == len(one) == 5
    for a, b in zip(ddp, one, strict=True):
        for key in ("train_loss", "val_loss", "train_eval_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=0), (a["step"], key)
    # Only rank 0 wrote: one metrics line per step, one model.
    assert GPT.from_pretrained(tmp_path / "ddp").config.d_model == 32


# --- schedule, optimizer, accumulation ------------------------------------------------------------
def test_lr_schedule_values() -> None:
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=200, lr_decay_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4)  # (0+1)/10 of the peak
    assert lr_at(4, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)  # warmup ends at the peak
    assert lr_at(10, cfg) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)  # half way: the mean of lr and min_lr
    assert lr_at(35, cfg) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4)
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(199, cfg) == pytest.approx(1e-4)  # flat after the decay
    assert TrainConfig(max_steps=50).decay_steps == 50  # default: decay over the whole run


def test_logged_lr_follows_the_schedule(dataset: Path, tmp_path: Path) -> None:
    cfg = tiny(dataset, tmp_path / "out", max_steps=6, warmup_steps=3, eval_interval=6)
    result = train(cfg)
    assert [r["lr"] for r in result.metrics] == [lr_at(s, cfg) for s in range(6)]


def test_weight_decay_applies_to_exactly_the_2d_weights() -> None:
    model = GPT(GPTconfig(n_layer=2, n_head=2, d_model=16, context_length=8, vocab_size=11))
    cfg = TrainConfig(lr=0.1, weight_decay=0.5)
    opt = configure_optimizer(model, cfg, "cpu")
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    expected = {"transformer.wte.weight", "transformer.wpe.weight"} | {
        f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                     "mlp.c_proj")}
    assert names == expected
    # Behaviour, not just grouping: with zero gradients AdamW's only effect is the decay p *= 1 - lr*wd.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if n in expected else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor, rtol=0, atol=1e-7)


def test_grad_accumulation_equals_one_batch_k_times_larger(dataset: Path, tmp_path: Path) -> None:
    cfg = tiny(dataset, tmp_path / "out", batch_size=4, grad_accum=3, max_steps=1, eval_interval=1,
               grad_clip=0.0, seed=5)
    result = train(cfg)  # leaves the last step's gradients in .grad
    # Independent reference: the same initial weights and the same 12 windows in one batch.
    torch.manual_seed(cfg.seed)
    ref = GPT(result.model.config)
    sampler = BatchSampler(open_dataset(dataset).split("train"), 4, 32, seed=cfg.seed)
    xs, ys = zip(*(sampler.next_batch() for _ in range(3)), strict=True)
    ref.loss(torch.cat(xs), torch.cat(ys)).backward()
    got = dict(result.model.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name].grad, p.grad, rtol=0, atol=1e-6, msg=name)


def test_matmul_peak_probe_is_positive_and_cached() -> None:
    peak = measure_matmul_peak(torch.float32, "cpu")
    assert math.isfinite(peak) and peak > 1e8
    assert measure_matmul_peak(torch.float32, "cpu") == peak
    # A bf16 run's peak is never below fp32's: a CPU without bf16 matmul units computes bf16 in fp32
    # arithmetic, and its bf16 probe alone (~1 GFLOP/s on an AVX2 EPYC) made a training log say 160% MFU.
    assert measure_matmul_peak(torch.bfloat16, "cpu") >= peak


# --- outputs --------------------------------------------------------------------------------------
def test_run_folder_loads_in_transformers_with_identical_logits(dataset: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "out"
    result = train(tiny(dataset, out, max_steps=3, eval_interval=3))
    hf = transformers.GPT2LMHeadModel.from_pretrained(out, attn_implementation="eager").eval()
    ours = GPT.from_pretrained(out)
    ids = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(ids), result.model.eval()(ids), rtol=0, atol=0)
    from gpt2model.tokenizer import load_tokenizer

    assert load_tokenizer(out).encode("ROMEO:") == open_dataset(dataset).tokenizer().encode("ROMEO:")
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["val_loss"] == pytest.approx(load_training_state(out)["best_val_loss"])


def test_init_from_a_model_folder_fine_tunes_with_cropped_context(dataset: Path, tmp_path: Path) -> None:
    first = train(tiny(dataset, tmp_path / "a", max_steps=40, lr=3e-3, eval_interval=40))
    tuned = train(tiny(dataset, tmp_path / "b", init_from=str(tmp_path / "a"), context_length=16, max_steps=2,
                       eval_interval=2, n_layer=None, n_head=None, d_model=None))
    assert tuned.model.config.context_length == 16 and tuned.model.config.d_model == 32
    assert tuned.metrics[0]["train_loss"] < first.metrics[0]["train_loss"] - 0.3  # starts trained


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_fine_tuning_on_data_with_added_tokens_grows_the_embedding(tmp_path: Path, capsys) -> None:
    """HF's ChatML fine-tune recipe: the tokenizer gets <|im_start|>/<|im_end|>
    (add_special_tokens) and the model rows for them (resize_token_embeddings). `train --init-from
    GPT2 --data DS` with DS prepared by such a tokenizer was refused ("prepare the text with the
    model's tokenizer", which cannot write the new tokens). Now the embedding grows, new rows at the
    mean of the others (transformers' mean_resizing), every old id's logit unchanged; a tokenizer
    that is not the model's plus added tokens is still refused."""
    transformers = pytest.importorskip("transformers")
    data = Path(os.environ.get("GPT2MODEL_DATA", ""))
    if not (data / "gpt2" / "vocab.bpe").is_file():
        pytest.skip("data files not found: set GPT2MODEL_DATA")
    from gpt2model.tokenizer import GPT2Tokenizer, load_tokenizer
    from gpt2model.train import _grow_vocab

    torch.manual_seed(0)
    base = GPT(GPTconfig(n_layer=1, n_head=2, d_model=16, context_length=32, vocab_size=50257))
    base.save_pretrained(tmp_path / "base", tokenizer=GPT2Tokenizer())
    hf = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path / "base"))
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    hf.eos_token = "<|im_end|>"  # as TRL's setup_chat_format leaves it, with a ChatML template
    hf.chat_template = CHATML
    hf.save_pretrained(str(tmp_path / "chatml"))
    chat = "".join(f"<|im_start|>user\nHi {i}<|im_end|>\n<|im_start|>assistant\nHello {i}!<|im_end|>\n"
                   for i in range(60))
    (tmp_path / "chat.txt").write_text(chat)
    ds = prepare_dataset(tmp_path / "chat.txt", tmp_path / "ds", tokenizer=str(tmp_path / "chatml"), progress=False,
                         special_tokens=True)
    grown = _grow_vocab(base, 50259)
    x = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        assert torch.equal(grown(x)[..., :50257], base(x))
    assert torch.equal(grown.transformer.wte.weight[50257:], base.transformer.wte.weight.mean(0).expand(2, -1))
    assert grown.lm_head.weight is grown.transformer.wte.weight  # still tied
    run = tmp_path / "run"
    assert main(["train", "--data", str(ds), "--out", str(run), "--init-from", str(tmp_path / "base"), "--max-steps",
                 "2", "--eval-interval", "2", "--eval-steps", "1", "--batch-size", "2", "--device", "cpu"]) == 0
    assert "adds 2 token(s)" in capsys.readouterr().out
    tuned = GPT.from_pretrained(run)
    assert tuned.config.vocab_size == 50259
    # The run folder's export (not only best/) records end-of-text as eos_token_id: it was null, so
    # HF's generate on the run folder never stopped at <|endoftext|>
    for folder in (run, run / "best"):
        assert json.loads((folder / "config.json").read_text())["bos_token_id"] == 50256
    # The tokenizer folder's eos (<|im_end|>) and chat template reach the run folder through the dataset, so
    # sample/serve/export stop at <|im_end|> and serve uses the template (were: end-of-text, built-in transcript);
    # transformers reads them there too
    from gpt2model.hf import find_chat_template, find_eos_ids

    for folder in (ds, run, run / "best"):
        assert find_chat_template(folder)[0] == CHATML
    for folder in (run, run / "best"):
        assert find_eos_ids(folder) == (50258,)
    reread = transformers.AutoTokenizer.from_pretrained(str(run))
    assert reread.eos_token == "<|im_end|>" and reread.chat_template == CHATML
    assert transformers.GPT2LMHeadModel.from_pretrained(str(run)).generation_config.eos_token_id == 50258
    assert load_tokenizer(run).encode("<|im_end|>", allowed_special="all") == [50258]
    # A char dataset is not GPT-2 plus added tokens: still refused
    (tmp_path / "c.txt").write_text("hello world, " * 300)
    char = prepare_dataset(tmp_path / "c.txt", tmp_path / "cds", tokenizer="char", progress=False)
    assert main(["train", "--data", str(char), "--out", str(tmp_path / "r2"), "--init-from", str(tmp_path / "base"),
                 "--max-steps", "1", "--device", "cpu"]) == 2
    assert "not with the tokenizer of --init-from" in capsys.readouterr().err


# --- config and CLI -------------------------------------------------------------------------------
def capture_config(monkeypatch: pytest.MonkeyPatch) -> list[TrainConfig]:
    seen: list[TrainConfig] = []

    class Result:
        step, best_val_loss = 0, float("nan")

    monkeypatch.setattr("gpt2model.train.train", lambda cfg: seen.append(cfg) or Result())
    return seen


def test_toml_and_command_line_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = capture_config(monkeypatch)
    recipe = tmp_path / "r.toml"
    recipe.write_text('data = "d"\nout = "o"\nlr = 0.01\nbatch_size = 4\ncompile = true\nn_layer = 3\n')
    assert main(["train", "--config", str(recipe), "--lr", "0.02", "--no-compile", "--max-steps", "9"]) == 0
    cfg = seen[-1]
    assert (cfg.lr, cfg.batch_size, cfg.compile, cfg.max_steps, cfg.n_layer) == (0.02, 4, False, 9, 3)
    assert (cfg.min_lr, cfg.data, cfg.out) == (TrainConfig().min_lr, "d", "o")  # untouched: defaults / file


def test_unknown_keys_and_bad_values_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('data = "d"\nout = "o"\nlearning_rat = 0.1\n')
    assert main(["train", "--config", str(recipe)]) == 2
    assert "learning_rat" in capsys.readouterr().err
    with pytest.raises(ValueError, match="did you mean 'batch_size'"):
        TrainConfig.from_dict({"batch_sise": 3})
    with pytest.raises(ValueError, match="warmup_steps must be int"):
        TrainConfig(warmup_steps=1.5)
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(dtype="fp8")
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--lerning-rate", "1"])
    recipe.write_text('data = "d"\n[model]\nn_layer = 2\n')
    with pytest.raises(ValueError, match="tables"):
        TrainConfig.load(recipe)


def test_help_lists_every_option_with_its_default(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, value in TrainConfig().to_dict().items():
        assert "--" + name.replace("_", "-") in text
        if value not in (None, ""):  # those are described in words ("scratch default 6", "required")
            assert f"(default: {value})" in text, name
    assert "--compile, --no-compile" in text and "--lr X" in text and "--max-steps N" in text


def test_recipes_are_valid_configs() -> None:
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    names = sorted(p.name for p in recipes.glob("*.toml"))
    assert {"shakespeare_char_cpu.toml", "shakespeare_char_cpu_quick.toml", "nanogpt_cpu.toml",
            "shakespeare_char_gpu.toml"} <= set(names)
    for path in recipes.glob("*.toml"):
        TrainConfig.load(path, data="d", out="o")
    nano = TrainConfig.load(recipes / "nanogpt_cpu.toml", data="d", out="o")
    assert (nano.context_length, nano.batch_size, nano.n_layer, nano.n_head, nano.d_model, nano.max_steps,
            nano.dropout, nano.lr) == (64, 12, 4, 4, 128, 2000, 0.0, 1e-3)
    # nanoGPT's config/train_shakespeare_char.py, value for value.
    gpu = TrainConfig.load(recipes / "shakespeare_char_gpu.toml", data="d", out="o")
    assert (gpu.n_layer, gpu.n_head, gpu.d_model, gpu.context_length, gpu.batch_size, gpu.dropout, gpu.lr,
            gpu.min_lr, gpu.max_steps, gpu.decay_steps, gpu.warmup_steps, gpu.beta2, gpu.eval_interval,
            gpu.eval_steps, gpu.log_interval) == (6, 6, 384, 256, 64, 0.2, 1e-3, 1e-4, 5000, 5000, 100, 0.99, 250,
                                                  200, 10)


# --- failures -------------------------------------------------------------------------------------
def test_clear_errors_before_training(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(tiny(tmp_path / "nope", tmp_path / "o1"))
    with pytest.raises(ValueError, match="no data folder"):
        train(TrainConfig(out=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="fewer than one training window"):
        train(tiny(dataset, tmp_path / "o2", context_length=100_000))
    small_vocab = tmp_path / "small_vocab"
    GPT(GPTconfig(n_layer=1, n_head=1, d_model=8, context_length=32, vocab_size=10)).save_pretrained(small_vocab)
    with pytest.raises(ValueError, match="vocab_size is 10"):
        train(tiny(dataset, tmp_path / "o3", init_from=str(small_vocab), n_layer=None, n_head=None, d_model=None))
    with pytest.raises(ValueError, match="differs from"):
        train(tiny(dataset, tmp_path / "o4", init_from=str(small_vocab), n_layer=3))
    with pytest.raises(ValueError, match="no resumable run|missing"):
        train(tiny(dataset, tmp_path / "o5", resume=True))
    assert not (tmp_path / "o3" / "metrics.jsonl").exists()  # nothing written by a refused run


def test_inconsistent_dataset_is_refused(dataset: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    with open(broken / "val.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="val.bin"):
        train(tiny(broken, tmp_path / "o"))


def test_out_holding_another_run_needs_resume_or_overwrite(dataset: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    train(tiny(dataset, out, max_steps=2, eval_interval=2))
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny(dataset, out, max_steps=2, eval_interval=2))
    assert main(["train", "--data", str(dataset), "--out", str(out), "--max-steps", "2", "--n-layer", "1",
                 "--device", "cpu"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    result = train(tiny(dataset, out, max_steps=3, eval_interval=3, overwrite=True))
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3] and result.step == 3
    with pytest.raises(ValueError, match="n_layer=3 differs"):
        train(tiny(dataset, out, max_steps=4, eval_interval=4, resume=True, n_layer=3))


def test_overwriting_a_model_folder_leaves_none_of_its_files_to_be_read_with_the_new_model(dataset: Path,
                                                                                         tmp_path: Path) -> None:
    """`train --out F --overwrite` over a HF model folder (or a run of another tokenizer) kept its
    generation_config.json, vocab.json + merges.txt, chat_template.jinja, shards: served and loaded
    with the new weights (stale eos ids, HF reading GPT-2's vocabulary for a char model, the old
    chat template). They are the previous model's and go; other files stay."""
    from gpt2model.hf import find_chat_template, find_eos_ids
    from gpt2model.tokenizer import CharTokenizer, load_tokenizer

    out = tmp_path / "hf_model"
    GPT(GPTconfig(n_layer=1, n_head=2, d_model=16, context_length=32, vocab_size=64)).save_pretrained(out)
    stale = {"vocab.json": "{}", "merges.txt": "#version: 0.2\n", "generation_config.json": '{"eos_token_id": 3}',
             "chat_template.jinja": "{{ messages }}", "tokenizer_config.json": '{"eos_token": "x"}',
             "model-00001-of-00002.safetensors": "", "model.safetensors.index.json": "{}"}
    for name, text in {**stale, "NOTES.txt": "mine"}.items():
        (out / name).write_text(text)
    train(tiny(dataset, out, max_steps=1, eval_interval=1, overwrite=True))
    # (the char tokenizer writes its own tokenizer_config.json for transformers: the new one, not the stale)
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"tokenizer_class": "PreTrainedTokenizerFast"}
    assert not [name for name in stale if (out / name).exists() and name != "tokenizer_config.json"]
    assert (out / "NOTES.txt").read_text() == "mine"
    assert find_eos_ids(out) == () and find_chat_template(out) is None
    assert isinstance(load_tokenizer(out), CharTokenizer)


def test_log_interval_reads_the_loss_back_only_every_n_steps(dataset: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Between logging steps the loop never waits for the device; what it logs is unchanged."""
    import gpt2model.train as train_module

    every = train(tiny(dataset, tmp_path / "every", max_steps=10, eval_interval=10))
    real, calls = train_module._read_back, []
    monkeypatch.setattr(train_module, "_read_back", lambda *a: calls.append(1) or real(*a))
    sparse = train(tiny(dataset, tmp_path / "sparse", max_steps=10, eval_interval=10, log_interval=3))
    assert [r["step"] for r in sparse.metrics] == [3, 6, 9, 10] and len(calls) == 4  # 10: eval + checkpoint
    by_step = {r["step"]: r["train_loss"] for r in every.metrics}
    assert all(r["train_loss"] == by_step[r["step"]] and r["tokens_per_sec"] > 0 for r in sparse.metrics)
    assert sparse.metrics[-1]["val_loss"] == every.metrics[-1]["val_loss"]


def test_non_finite_loss_stops_with_step_and_checkpoint(dataset: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    import gpt2model.model as model_module

    real = model_module.linear_cross_entropy
    calls = {"n": 0}

    def poisoned(x, weight, targets):
        calls["n"] += 1
        loss = real(x, weight, targets)
        return loss * float("nan") if calls["n"] == 5 else loss  # the 5th training forward

    monkeypatch.setattr(model_module, "linear_cross_entropy", poisoned)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteLossError, match=r"nan at step 5.*step 4"):
        train(tiny(dataset, out, max_steps=10, eval_interval=100, checkpoint_interval=2, eval_steps=1))
    assert load_training_state(out)["step"] == 4  # the last good checkpoint is intact
    calls["n"] = 0
    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "cli"), "--max-steps", "10",
                 "--n-layer", "1", "--n-head", "1", "--d-model", "16", "--context-length", "16",
                 "--batch-size", "4", "--eval-interval", "100", "--device", "cpu"]) == 1
    assert "at step 5" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_training_saves_plain_weights(dataset: Path, tmp_path: Path) -> None:
    """torch.compile (about 40 s to compile on CPU) trains and saves without ``_orig_mod.`` prefixes."""
    out = tmp_path / "out"
    train(tiny(dataset, out, max_steps=3, eval_interval=3, compile=True))
    assert not any("_orig_mod" in k for k in load_training_state(out)["model"])
    assert GPT.from_pretrained(out).config.d_model == 32


def test_resume_ignores_options_a_newer_version_dropped(dataset: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    """A training state written by a version whose TrainConfig had a field this one lacks resumes
    (with a note naming the field), instead of failing with a KeyError."""
    out = tmp_path / "out"
    train(tiny(dataset, out, max_steps=2, eval_interval=2))
    state = load_training_state(out)
    state["train_config"]["retired_option"] = 3
    torch.save(state, out / TRAINING_STATE_FILE)
    capsys.readouterr()
    result = train(tiny(dataset, out, max_steps=3, eval_interval=3, resume=True, lr=2e-3))
    printed = capsys.readouterr().out
    assert result.step == 3 and "retired_option" in printed and "lr 0.001 -> 0.002" in printed


def test_compile_mode_auto_uses_cuda_graphs_only_where_they_are_safe() -> None:
    """CUDA graphs ('reduce-overhead') on one CUDA process without accumulation; 'default'
    elsewhere; asking for them with accumulation or DDP is an error, not a wrong gradient."""
    from gpt2model.train import resolve_compile_mode

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_compile_mode("auto", cuda) == "reduce-overhead"
    assert resolve_compile_mode("auto", cuda, grad_accum=4) == "default"
    assert resolve_compile_mode("auto", cuda, world_size=2) == "default"
    assert resolve_compile_mode("auto", cpu) == "default"
    assert resolve_compile_mode("max-autotune-no-cudagraphs", cuda, grad_accum=4) == "max-autotune-no-cudagraphs"
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ValueError, match="wrong gradients with gradient accumulation"):
            resolve_compile_mode(mode, cuda, grad_accum=2)
        with pytest.raises(ValueError, match="--compile-mode default"):
            resolve_compile_mode(mode, cuda, world_size=2)
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        TrainConfig(compile_mode="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA-graph training)")
def test_cuda_graph_training_follows_the_default_compiled_run(dataset: Path, tmp_path: Path) -> None:
    """compile_mode auto on one CUDA process replays the step as CUDA graphs; the losses, the
    evaluations and the saved weights must follow the plain compiled run (same seed, no dropout)."""
    runs = {}
    for mode in ("default", "auto"):
        out = tmp_path / mode
        result = train(tiny(dataset, out, device="cuda", compile=True, compile_mode=mode, dropout=0.0,
                            max_steps=8, eval_interval=4, lr=3e-3))
        runs[mode] = (losses(out), [r["val_loss"] for r in result.metrics if "val_loss" in r],
                      {k: v.detach().cpu() for k, v in result.model.state_dict().items()})
    (plain, plain_val, plain_sd), (graphs, graphs_val, graphs_sd) = runs["default"], runs["auto"]
    assert len(plain) == len(graphs) == 8 and len(plain_val) == len(graphs_val) == 2
    assert graphs[-1] < graphs[0]  # it learns
    assert max(abs(a - b) for a, b in zip(plain, graphs, strict=True)) < 1e-3, (plain, graphs)
    assert max(abs(a - b) for a, b in zip(plain_val, graphs_val, strict=True)) < 1e-3
    assert max((plain_sd[k].float() - graphs_sd[k].float()).abs().max().item() for k in plain_sd) < 1e-3
