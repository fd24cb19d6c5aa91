"""Params: validated once, refused before any work with the key named."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pydantic import ValidationError

from nextword.config import ModelConfig, flatten, load_params, parse_params
from nextword.errors import NextwordError

ROOT = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_value(key: str, value):
    raw = copy.deepcopy(RAW)
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[last] = value
    return raw


def test_committed_params_are_valid_and_the_chat_preset():
    params = load_params(ROOT / "params.yaml")
    assert params.preset == "chat" and params.window.length == 15 and params.model.layers == 1
    assert params.model.embedding == 256 and params.model.hidden == 512 and params.train.batch_size == 64
    assert params.seed == 7 and params.window.speaker_tags


def test_committed_params_match_conf(tmp_path):
    """params.yaml is conf/ composed with the chat preset, so `dvc exp run -S` and `dvc repro` agree."""
    out = tmp_path / "params.yaml"
    subprocess.run([sys.executable, "-m", "nextword.cli", "params", "chat", "--conf", str(ROOT / "conf"),
                    "--out", str(out)], check=True, capture_output=True)
    assert yaml.safe_load(out.read_text()) == RAW


def test_toy_preset(tmp_path):
    out = tmp_path / "params.yaml"
    subprocess.run([sys.executable, "-m", "nextword.cli", "params", "toy", "model.layers=2", "--conf",
                    str(ROOT / "conf"), "--out", str(out)], check=True, capture_output=True)
    toy = load_params(out)
    assert (toy.preset, toy.seed, toy.window.length, toy.window.speaker_tags) == ("toy", 42, 5, False)
    assert (toy.model.embedding, toy.model.hidden, toy.model.layers, toy.model.dropout) == (128, 256, 2, 0.2)
    assert (toy.train.batch_size, toy.train.epochs, toy.train.lr, toy.train.clip) == (16, 30, 0.001, 1.0)


@pytest.mark.parametrize(
    "key, value",
    [
        ("model.layers", 0),
        ("model.dropout", 1.0),
        ("model.dropout", -0.1),
        ("window.length", 0),
        ("sample.temperature", 0),
        ("sample.top_p", 0),
        ("sample.top_p", 1.5),
        ("preset", "huge"),
        ("train.lr", "fast"),
        ("train.ar", -1.0),
        ("train.tar", "strong"),
        ("tokenizer.kind", "bytes"),
        ("tokenizer.vocab_size", 7),
        ("tokenizer.model_type", "wordpiece"),
    ],
)
def test_invalid_values_name_the_key(key, value):
    with pytest.raises(NextwordError, match=rf"^params.yaml: {key}: "):
        parse_params(with_value(key, value))


def test_every_cell_is_accepted_and_the_transformer_needs_an_even_width_per_head():
    for cell in ("lstm", "gru", "transformer"):
        assert parse_params(with_value("model.cell", cell)).model.cell == cell
    lnlstm = with_value("model.cell", "lnlstm")  # which has no ONNX step: on the PyTorch backend
    lnlstm["engine"]["backend"] = "torch"
    assert parse_params(lnlstm).model.cell == "lnlstm"
    raw = with_value("model.cell", "transformer")
    raw["model"]["hidden"] = 512  # whatever the preset's width
    raw["model"]["heads"] = 5  # 512 / 5
    with pytest.raises(NextwordError, match=r"^params.yaml: model: .*hidden \(512\) split by heads \(5\)"):
        parse_params(raw)
    raw["model"]["heads"] = 512  # one wide: rotary positions rotate pairs
    with pytest.raises(NextwordError, match=r"^params.yaml: model: .*even width per head"):
        parse_params(raw)
    raw["model"]["cell"] = "lstm"  # which the LSTM does not read
    assert parse_params(raw).model.heads == 512
    with pytest.raises(NextwordError, match=r"^params.yaml: model.cell: "):
        parse_params(with_value("model.cell", "rnn"))


def test_a_model_folder_saved_before_heads_and_context_still_loads_its_lstm():
    saved = RAW["model"] | {"vocab_size": 50}
    del saved["heads"], saved["context"]
    assert ModelConfig.model_validate(saved).heads is None
    with pytest.raises(ValidationError, match="the transformer needs heads and context"):
        ModelConfig.model_validate(saved | {"cell": "transformer"})


def test_the_onnx_backend_is_refused_for_a_cell_it_cannot_export():
    raw = with_value("model.cell", "lnlstm")
    raw["engine"]["backend"] = "onnx"
    with pytest.raises(NextwordError, match="engine.backend onnx exports model.cell lstm, gru, transformer only, "
                                            "not lnlstm"):
        parse_params(raw)
    raw["model"]["cell"] = "transformer"
    assert parse_params(raw).engine.backend == "onnx"


def test_unknown_key_is_refused():
    raw = with_value("model.layer", 2)
    with pytest.raises(NextwordError, match="model.layer: unknown key"):
        parse_params(raw)


def test_unknown_preset_on_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nextword.cli", "params", "huge", "--conf", str(ROOT / "conf"),
                           "--out", str(tmp_path / "p.yaml")], capture_output=True, text=True)
    assert proc.returncode == 2 and "corpus/huge" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "p.yaml").exists()


def test_a_stage_refuses_bad_params_before_any_work(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(with_value("sample.top_p", 2)))
    out = tmp_path / "raw.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "src/stages/fetch_chitchat.py"), "--params", str(bad),
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}: sample.top_p: Input should be less than or equal to 1 (got 2)"
    assert not out.exists()


def test_flatten_gives_dotted_keys():
    flat = flatten(load_params(ROOT / "params.yaml"))
    assert flat["model.layers"] == 1 and flat["data.split.val"] == 0.1
