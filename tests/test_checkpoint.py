"""Training checkpoints (runfolder.py's training state): the state file round-trips through
``torch.load(weights_only=True)``, RNG streams continue exactly, the best/ folder swap survives a
kill between its renames, and damaged files give clear errors."""

from __future__ import annotations

import random
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch

from gpt2model import GPT, GPTconfig
from gpt2model.checkpoint import CheckpointError
from gpt2model.fileio import recover_dir, replace_dir
from gpt2model.runfolder import (
    TRAINING_STATE_FILE,
    load_training_state,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTconfig(n_layer=1, n_head=2, d_model=16, context_length=8, vocab_size=13))


def draws() -> tuple[float, float, list[float], list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist(), torch.randn(2).tolist()


def test_rng_state_restores_every_stream() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draws()  # move the streams away from their seeds
    saved = rng_state()
    expected = draws()
    draws()
    set_rng_state(saved)
    assert draws() == expected


def test_training_checkpoint_round_trip_with_weights_only(tmp_path: Path) -> None:
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.loss(torch.randint(0, 13, (2, 8)), torch.randint(0, 13, (2, 8))).backward()
    opt.step()
    state = {"step": 7, "optimizer": opt.state_dict(), "rng": [rng_state()], "best_val_loss": float("inf"),
             "sampler": {"seed": 1, "step": 7}, "train_config": {"lr": 1e-3}}
    save_training_checkpoint(tmp_path, model, state)

    loaded = load_training_state(tmp_path)  # torch.load(weights_only=True) inside
    assert loaded["step"] == 7 and loaded["best_val_loss"] == float("inf")
    assert loaded["sampler"] == {"seed": 1, "step": 7}
    for name, tensor in model.state_dict().items():  # the state carries its own copy of the weights
        assert torch.equal(loaded["model"][name], tensor)
    opt2 = torch.optim.AdamW(tiny_model().parameters(), lr=1e-3)
    opt2.load_state_dict(loaded["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # ... and the folder is a model folder too (the export).
    again = GPT.from_pretrained(tmp_path)
    assert torch.equal(again.transformer.wte.weight, model.transformer.wte.weight)
    # No temp files left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", TRAINING_STATE_FILE]


def test_compiled_or_wrapped_model_saves_without_prefixes(tmp_path: Path) -> None:
    model = tiny_model()

    class Wrapper(torch.nn.Module):  # what torch.compile returns: the module under _orig_mod
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    save_training_checkpoint(tmp_path, Wrapper(model), {"step": 1})
    assert set(load_training_state(tmp_path)["model"]) == set(model.state_dict())


def test_any_nesting_of_compile_and_ddp_saves_plain_weights(tmp_path: Path) -> None:
    """DDP(compile(model)) and compile(DDP(model)): unwrapped in whatever order they were applied."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gpt2model.checkpoint import save_model, unwrap_model

    model = tiny_model()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for name, wrapped in {"ddp_of_compiled": DDP(torch.compile(model)),
                              "compiled_ddp": torch.compile(DDP(model))}.items():
            assert unwrap_model(wrapped) is model
            save_model(wrapped, tmp_path / name)
            save_training_checkpoint(tmp_path / name, wrapped, {"step": 1})
            assert set(load_training_state(tmp_path / name)["model"]) == set(model.state_dict())
            again = GPT.from_pretrained(tmp_path / name)
            assert torch.equal(again.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].mlp.c_fc.weight)
    finally:
        dist.destroy_process_group()
    with pytest.raises(TypeError, match="expected a GPT"):
        unwrap_model(torch.nn.Linear(2, 2))


def test_load_training_state_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no resumable run"):
        load_training_state(tmp_path)
    (tmp_path / TRAINING_STATE_FILE).write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_training_state(tmp_path)
    torch.save({"step": 1}, tmp_path / TRAINING_STATE_FILE)  # no version tag: not ours
    with pytest.raises(CheckpointError, match="version"):
        load_training_state(tmp_path)


def test_training_state_refuses_pickled_code(tmp_path: Path) -> None:
    # Any pickled object other than tensors and plain data (here a Path) could run code on load.
    torch.save({"version": 1, "path": PurePosixPath("x")}, tmp_path / TRAINING_STATE_FILE)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_training_state(tmp_path)


def test_replace_dir_swaps_whole_folders(tmp_path: Path) -> None:
    dst = tmp_path / "best"
    for version in ("one", "two"):
        src = tmp_path / f".best-tmp-{version}"
        src.mkdir()
        (src / "a.txt").write_text(version)
        (src / "b.txt").write_text(version)
        replace_dir(src, dst)
        assert {p.read_text() for p in dst.iterdir()} == {version}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_recover_dir_after_a_kill_between_the_two_renames(tmp_path: Path) -> None:
    dst, old = tmp_path / "best", tmp_path / ".best.old"
    old.mkdir()  # state after rename 1 (best -> .best.old), before rename 2
    (old / "a.txt").write_text("previous")
    recover_dir(dst)
    assert (dst / "a.txt").read_text() == "previous" and not old.exists()
    # A kill after rename 2 but before the old copy was deleted: keep the new folder.
    old.mkdir()
    (old / "a.txt").write_text("stale")
    recover_dir(dst)
    assert (dst / "a.txt").read_text() == "previous" and not old.exists()


def test_saving_the_same_weights_writes_the_same_bytes(tmp_path: Path) -> None:
    """safetensors keeps header metadata in a hash map; save_tensors sorts it, so a save is
    byte-for-byte reproducible (checksums, rsync, dedup and 'did the model change?' work)."""
    model = GPT(GPTconfig(vocab_size=50, context_length=16, n_layer=1, n_head=2, d_model=16))
    blobs = set()
    for i in range(6):
        model.save_pretrained(tmp_path / str(i))
        blobs.add((tmp_path / str(i) / "model.safetensors").read_bytes())
    assert len(blobs) == 1


def test_sharded_hf_folders_load(tmp_path: Path) -> None:
    """HF's save_pretrained(max_shard_size=...) writes shards and an index (transformers 4's 5 GB
    default shards gpt2-xl in fp32): it was 'has no model.safetensors: not a complete model folder'."""
    import json

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = GPT(GPTconfig(n_layer=2, n_head=2, d_model=32, context_length=16, vocab_size=50)).eval()
    ours.save_pretrained(tmp_path / "plain")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "plain")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    # transformers 4's pytorch_model.bin shards (transformers 5 writes safetensors only): written here
    old = tmp_path / "bin"
    old.mkdir()
    (old / "config.json").write_bytes((tmp_path / "plain" / "config.json").read_bytes())
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: state[k] for k in part}, old / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (old / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        want = ours(ids)
        for folder in (tmp_path / "sharded", old):
            assert torch.equal(GPT.from_pretrained(folder)(ids), want)
    next((tmp_path / "sharded").glob("model-00001-of-*")).unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        GPT.from_pretrained(tmp_path / "sharded")


@pytest.mark.parametrize("cfg", [dict(vocab_size=7, context_length=1, n_layer=1, n_head=1, d_model=8),
                                 dict(vocab_size=3, context_length=5, n_layer=3, n_head=4, d_model=12)])
def test_extreme_shapes_round_trip_through_transformers(tmp_path: Path, cfg: dict) -> None:
    """Context 1 and a 3-token vocabulary with 3-wide heads: our folder loads in transformers'
    GPT2LMHeadModel with fp32 logits within 1e-5, greedy tokens equal, and loads back with identical weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = GPT(GPTconfig(**cfg)).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, cfg["vocab_size"], (2, cfg["context_length"]))
    with torch.no_grad():
        want = ours(ids)
        assert (hf(ids).logits - want).abs().max() <= 1e-5
        back = GPT.from_pretrained(tmp_path)
        assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values(),
                                                      strict=True))
    if cfg["context_length"] > 1:
        new = cfg["context_length"] - 1
        assert torch.equal(ours.generate(ids[:, :1], new, temperature=0),
                           hf.generate(ids[:, :1], max_new_tokens=new, do_sample=False, pad_token_id=0))


def test_hf_config_json_missing_keys_or_not_an_object(tmp_path: Path) -> None:
    """A HF config.json without n_positions was a KeyError traceback; transformers reads GPT2Config's
    default (1024) for it, and so do we. A config.json that is not an object was an AttributeError."""
    import json

    torch.manual_seed(0)
    GPT(GPTconfig(context_length=1024, vocab_size=11, n_layer=1, n_head=1, d_model=8)).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for key in ("gpt2model", "n_positions", "n_ctx"):
        raw.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert GPT.from_pretrained(tmp_path).config.context_length == 1024
    transformers = pytest.importorskip("transformers")
    assert transformers.GPT2Config.from_pretrained(tmp_path).n_positions == 1024
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="holds a JSON list, not a GPT-2 config object"):
        GPT.from_pretrained(tmp_path)
