"""GPTconfig: the seed's defaults, validation messages, JSON round trip, presets."""

from __future__ import annotations

import pytest

from gpt2model import GPTconfig
from gpt2model.config import PRESETS


def test_seed_defaults() -> None:
    c = GPTconfig()
    assert (c.context_length, c.vocab_size, c.n_layer, c.n_head, c.d_model) == (256, 65, 6, 6, 384)
    assert c.bias is True and c.dropout == 0.0


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(d_model=100, n_head=6), "d_model (100) must be divisible by n_head (6)"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(vocab_size=-3), "vocab_size must be a positive integer"),
        (dict(context_length=2.5), "context_length must be an int"),
        (dict(n_head=True), "n_head must be an int"),
        (dict(dropout=1.0), "dropout must be in [0, 1)"),
        (dict(dropout=-0.1), "dropout must be in [0, 1)"),
        (dict(bias="yes"), "bias must be True or False"),
        (dict(layer_norm_eps=0), "layer_norm_eps must be a positive float"),
    ],
)
def test_validation_names_the_field(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as e:
        GPTconfig(**kwargs)
    assert fragment in str(e.value)


def test_json_round_trip(tmp_path) -> None:
    c = GPTconfig(context_length=64, vocab_size=100, n_layer=2, n_head=2, d_model=32, dropout=0.1, bias=False)
    assert GPTconfig.from_json(c.to_json()) == c
    path = tmp_path / "c.json"
    c.to_json(path)
    assert GPTconfig.from_json(path) == c
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # saved by an editor that writes a byte-order mark
    assert GPTconfig.from_json(path) == c


def test_train_config_file_with_a_bom_or_not_utf8(tmp_path) -> None:
    from gpt2model.config import TrainConfig

    path = tmp_path / "r.toml"
    path.write_bytes(b"\xef\xbb\xbfmax_steps = 7\nlr = 2e-3\n")
    cfg = TrainConfig.load(path, data="d", out="o")
    assert (cfg.max_steps, cfg.lr) == (7, 2e-3)
    path.write_bytes(b"max_steps = 7\n# caf\xe9\n")  # Latin-1
    with pytest.raises(ValueError, match="is not UTF-8 text .* save it as UTF-8"):
        TrainConfig.load(path)


def test_unknown_field_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown GPTconfig field.*n_embd"):
        GPTconfig.from_dict({"n_embd": 768})


def test_presets() -> None:
    assert set(PRESETS) == {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "shakespeare-char"}
    g = GPTconfig.preset("gpt2")
    assert (g.context_length, g.vocab_size, g.n_layer, g.n_head, g.d_model) == (1024, 50257, 12, 12, 768)
    assert GPTconfig.preset("gpt2-xl").n_head == 25
    s = GPTconfig.preset("shakespeare-char")
    assert (s.context_length, s.vocab_size, s.d_model, s.dropout) == (256, 65, 384, 0.2)
    assert GPTconfig.preset("gpt2", context_length=256).context_length == 256
    with pytest.raises(ValueError, match="unknown preset 'gpt3'"):
        GPTconfig.preset("gpt3")
