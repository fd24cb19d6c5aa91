"""The model step exported to ONNX: the same numbers as PyTorch, and the engine on it the same engine."""

from __future__ import annotations

import csv
import json
import re
import shutil

import numpy as np
import pytest
import torch

from conftest import PLAIN, TINY_CONVERSATION, model_config, save_servable, train_tiny_model
from nextword.backends import OnnxStep, TorchStep, input_names, model_state, start_state, target_log_probs
from nextword.cli import build_parser, engine_overrides, main
from nextword.decoding import STRATEGIES
from nextword.engine import Engine
from nextword.errors import NextwordError
from nextword.export import adaptive_log_prob, export_onnx
from nextword.model import LanguageModel
from nextword.modeldir import load_trained, save_trained
from nextword.quantize import embedding_blocks, quantize_int8
from nextword.text import is_word, tokenize
from nextword.vocab import Vocab
from nextword.windows import message_tokens

ONNX = PLAIN.model_copy(update={"backend": "onnx"})


def nextword(capfd, *args) -> tuple[int, str, str]:
    """Run the command line in this process: (exit status, stdout, stderr), as written to the file descriptors."""
    try:
        main([str(a) for a in args])
        status = 0
    except SystemExit as exit:
        status = exit.code
    out, err = capfd.readouterr()
    return status, out, err


def random_model(seed: int = 0, **shape) -> LanguageModel:
    """A small model with random weights, wider than the usual init so that its distributions are not flat."""
    torch.manual_seed(seed)
    model = LanguageModel(model_config(60, **({"embedding": 8, "hidden": 16, "layers": 2} | shape))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5)
    return model


def onnx_lookup(path, model: LanguageModel, ids: torch.Tensor) -> np.ndarray:
    """The embedding rows the exported step at ``path`` looks up for ``ids``: its lookup's output, run."""
    import onnx
    import onnxruntime

    graph = onnx.load(path)
    rows = next(n for n in graph.graph.node if n.name == "/embed/rows").output[0]
    graph.graph.output.append(onnx.helper.make_tensor_value_info(rows, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = dict(zip(input_names(model.config), [ids.numpy(), *(t.numpy() for t in start_state(model))]))
    return session.run(None, feeds)[-1]


def test_the_adaptive_softmax_written_for_export_equals_pytorchs():
    head = random_model(adaptive_softmax=True, cutoffs=[10, 30]).head
    features = torch.randn(5, 16)
    with torch.no_grad():
        expected = head.log_prob(features)
        ours = adaptive_log_prob(head, features)
    assert ours.shape == (5, 60)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.exp().sum(-1), torch.ones(5))


SHAPES = [
    {"adaptive_softmax": True, "cutoffs": [10, 30]},  # the chat preset's output layer, two tail clusters
    {},  # the full softmax
    {"tie_weights": True},  # the decoder shares the embedding, through a projection
    {"cell": "gru", "layers": 1},  # only h for a state
    # The KV cache for a state: 5 tokens of it, so the steps below slide it; 8 ids at once fill it and more.
    {"cell": "transformer", "adaptive_softmax": True, "cutoffs": [10, 30]},
]
SHAPE_IDS = ["lstm-adaptive", "lstm-softmax", "tied", "gru", "transformer"]
STEP_IDS = ([4, 7, 9, 2], [11], [5, 5], [1, 2, 3, 4, 5, 6, 7, 8], [9])  # several ids, one, the state carried


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_the_exported_step_gives_pytorchs_log_probs_and_state(tmp_path, shape):
    model = random_model(**shape)
    export_onnx(model, tmp_path / "step.onnx")
    exported, reference = OnnxStep(tmp_path / "step.onnx", model), TorchStep(model)
    onnx_state = torch_state = None
    for ids in STEP_IDS:
        onnx_lp, onnx_state = exported.run(ids, onnx_state)
        torch_lp, torch_state = reference.run(ids, torch_state)
        assert onnx_lp.shape == (60,) and onnx_lp.dtype == np.float32
        np.testing.assert_allclose(onnx_lp, torch_lp, rtol=0, atol=1e-5)
        torch_states = torch_state if isinstance(torch_state, tuple) else (torch_state,)
        assert len(onnx_state) == len(torch_states)
        for ours, theirs in zip(onnx_state, torch_states):
            np.testing.assert_allclose(ours, theirs.numpy(), rtol=0, atol=1e-5)


def stream_ids(vocab) -> list[int]:
    return vocab.encode([t for speaker, text in TINY_CONVERSATION
                         for t in message_tokens(speaker, tokenize(text), True)])


@pytest.fixture(scope="module")
def tiny_transformer():
    """The tiny conversation learnt by a Transformer, as ``tiny_model_dir`` has it learnt by an LSTM: (model, vocab)."""
    return train_tiny_model(cell="transformer")


@pytest.mark.parametrize("cell", ["lstm", "transformer"])
def test_int8_is_smaller_and_picks_the_same_next_token_as_float32(cell, tiny_model_dir, tiny_transformer, tmp_path):
    model, vocab = load_trained(tiny_model_dir)[:2] if cell == "lstm" else tiny_transformer
    fp32 = export_onnx(model, tmp_path / "model.onnx")
    int8 = export_onnx(model, tmp_path / "model.int8.onnx", int8=True)
    assert int8 < fp32 / 2 and (tmp_path / "model.int8.onnx").stat().st_size == int8
    exported, reference = OnnxStep(tmp_path / "model.int8.onnx", model), TorchStep(model)
    onnx_state = torch_state = None
    ids = stream_ids(vocab)
    decided = 0
    for token in ids:
        onnx_lp, onnx_state = exported.run([token], onnx_state)
        torch_lp, torch_state = reference.run([token], torch_state)
        second, first = np.sort(torch_lp)[-2:]
        if first - second > 0.05:  # not a tie (after <EOS>, the two speakers are even): int8 keeps the top
            decided += 1
            assert onnx_lp.argmax() == torch_lp.argmax()
        np.testing.assert_allclose(np.exp(onnx_lp), np.exp(torch_lp), atol=0.05)
    assert decided > len(ids) * 3 / 4


def test_fp16_is_smaller_and_closer_to_float32_than_int8(tiny_model_dir, tmp_path):
    model, vocab = load_trained(tiny_model_dir)[:2]
    sizes = {kind: export_onnx(model, tmp_path / f"{kind}.onnx", int8=kind == "int8", fp16=kind == "fp16")
             for kind in ("fp32", "fp16", "int8")}
    assert sizes["fp16"] < sizes["fp32"] * 0.6
    steps = {kind: OnnxStep(tmp_path / f"{kind}.onnx", model) for kind in ("fp16", "int8")}
    reference, states, torch_state, error = TorchStep(model), {"fp16": None, "int8": None}, None, {}
    for token in stream_ids(vocab):
        torch_lp, torch_state = reference.run([token], torch_state)
        for kind, step in steps.items():
            lp, states[kind] = step.run([token], states[kind])
            error[kind] = max(error.get(kind, 0.0), float(np.abs(np.exp(lp) - np.exp(torch_lp)).max()))
    assert error["fp16"] < 0.01 and error["fp16"] < error["int8"] / 2
    with pytest.raises(ValueError):
        export_onnx(model, tmp_path / "both.onnx", int8=True, fp16=True)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_the_int8_graph_computes_the_int8_kernel_that_the_evaluation_scores(tmp_path, shape):
    import onnx

    model = random_model(**shape)
    export_onnx(model, tmp_path / "step.onnx", int8=True)
    graph = onnx.load(tmp_path / "step.onnx").graph
    # every product by a weight is of 8-bit integers (a Transformer's attention multiplies activations);
    # the recurrent layers are a loop of their steps
    weights = {i.name for i in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm", "LSTM", "GRU") and weights & set(n.input)]
    assert "MatMulInteger" in {n.op_type for n in graph.node}
    assert all(i.data_type != onnx.TensorProto.FLOAT or len(i.dims) <= 1 or i.name == "embed_blocks_scale"
               for i in graph.initializer)  # float32: scales, biases and shapes only
    exported, reference = OnnxStep(tmp_path / "step.onnx", model), TorchStep(quantize_int8(model))
    # it steps eagerly, so it starts from the graph's start: a Transformer's full cache of padding
    onnx_state, torch_state = None, model_state(start_state(model))
    for ids in STEP_IDS:
        onnx_lp, onnx_state = exported.run(ids, onnx_state)
        torch_lp, torch_state = reference.run(ids, torch_state)
        # the same integers and the same order of float operations: only exp, tanh and the like differ
        np.testing.assert_allclose(onnx_lp, torch_lp, rtol=0, atol=2e-6)
        torch_states = torch_state if isinstance(torch_state, tuple) else (torch_state,)
        for ours, theirs in zip(onnx_state, torch_states, strict=True):
            np.testing.assert_allclose(ours, theirs.numpy(), rtol=0, atol=2e-6)


@pytest.mark.parametrize("kind", ["int8", "fp16"])
@pytest.mark.parametrize("width, blocks", [(64, 2), (8, 1)])  # a width that 32 does not divide is one block
def test_the_embedding_takes_8_bits_and_a_scale_per_block_of_a_row(tmp_path, kind, width, blocks):
    import onnx
    from onnx import numpy_helper

    model = random_model(embedding=width)
    with torch.no_grad():  # blocks of a row far apart in size, so that one scale per row would not do
        model.embed.weight[:, :32] *= 0.01
    export_onnx(model, tmp_path / "step.onnx", int8=kind == "int8", fp16=kind == "fp16")
    initializers = {i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "step.onnx").graph.initializer}
    assert "model.embed.weight" not in initializers
    rows, scale = initializers["embed_rows_int8"], initializers["embed_blocks_scale"]
    weights = model.embed.weight.detach().numpy()
    assert rows.dtype == np.int8 and rows.shape == weights.shape and scale.shape == (len(weights), blocks, 1)
    # each weight within half a step of its 8-bit value, the step that of its block
    step = np.repeat(scale[:, :, 0], width // blocks, axis=1)
    assert np.all(np.abs(weights - rows * step) <= step / 2 + 1e-7)
    # the blocks PyTorch's int8 kernels round the table to, and the lookup gives their table to the bit
    torch_rows, torch_scale = embedding_blocks(model.embed.weight)
    assert np.array_equal(rows, torch_rows.numpy()) and np.array_equal(scale, torch_scale.numpy())
    ids = torch.tensor([[3, 7, 3]])
    looked_up = onnx_lookup(tmp_path / "step.onnx", model, ids)
    assert np.array_equal(looked_up, quantize_int8(model).embed(ids).detach().numpy())


@pytest.fixture(scope="module", params=["lstm", "transformer"])
def exported_dir(request, tiny_model_dir, tiny_transformer, tmp_path_factory):
    """A tiny model folder (the LSTM's, or a Transformer trained alike) with its float32 step exported where
    engine.backend onnx reads it."""
    folder = tmp_path_factory.mktemp("exported") / "model"
    if request.param == "lstm":
        shutil.copytree(tiny_model_dir, folder)
    else:
        model, vocab = tiny_transformer
        save_servable(folder, model, vocab, {"speaker_tags": True, "window_length": 8})
    export_onnx(load_trained(folder)[0], folder / "model.onnx")
    return folder


def test_the_engine_on_onnx_suggests_and_completes_as_on_pytorch(exported_dir):
    on_torch = Engine.load(exported_dir, options=PLAIN)
    on_onnx = Engine.load(exported_dir, options=ONNX)
    assert isinstance(on_onnx.backend, OnnxStep) and isinstance(on_torch.backend, TorchStep)
    cases = [("user", "good morning , how are "), ("agent", "i like to read b"), ("user", "what do you "),
             ("agent", "i am fine , thank you ")]
    for speaker, text in cases:
        a, b = on_torch.session(), on_onnx.session()
        a.add_message(*TINY_CONVERSATION[0])
        b.add_message(*TINY_CONVERSATION[0])
        partial = a.type_text(speaker, text)
        assert b.type_text(speaker, text) == partial
        # to a few float32 steps: a log-prob of -41 is held to 4e-6, and the two runtimes sum in different orders
        np.testing.assert_allclose(b.log_probs, a.log_probs, rtol=1e-6, atol=1e-5)
        assert [s.word for s in b.suggest(partial, 3)] == [s.word for s in a.suggest(partial, 3)]
        # Fill-in-the-middle rescores in PyTorch from the ONNX step's state.
        fim_a, fim_b = a.suggest(partial, 3, right=" today ?"), b.suggest(partial, 3, right=" today ?")
        assert [s.word for s in fim_b] == [s.word for s in fim_a]
        assert [s.probability for s in fim_b] == pytest.approx([s.probability for s in fim_a], abs=1e-4)
        for strategy in STRATEGIES:
            expected = a.complete(strategy, max_words=8, seed=1, prefix=partial)
            assert b.complete(strategy, max_words=8, seed=1, prefix=partial) == expected, (strategy, text)
    # Without a partial word too; the tiny models learned "how are you" (what follows differs between the
    # models that CPUs of different makes train from the same seed).
    completions = []
    for engine in (on_torch, on_onnx):
        session = engine.session()
        session.type_text("user", "good morning , how are ")
        completions.append(session.complete("greedy"))
    assert completions[1] == completions[0] and completions[0][0] == "you"


def test_the_onnx_backend_without_an_export_is_a_one_line_error(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.int8.onnx").unlink()
    with pytest.raises(NextwordError, match=r"model\.int8\.onnx: no such file; .*nextword export") as err:
        Engine.load(folder, options=ONNX.model_copy(update={"int8": True}))
    assert "\n" not in str(err.value)
    (tmp_path / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(NextwordError, match="model.onnx: damaged"):
        Engine.load(tiny_model_dir, options=ONNX, onnx=tmp_path / "model.onnx")
    other = random_model()  # another model's step: its vocabulary has another size
    export_onnx(other, tmp_path / "other.onnx")
    with pytest.raises(NextwordError, match="not a step of this model"):
        Engine.load(tiny_model_dir, options=ONNX, onnx=tmp_path / "other.onnx")
    config = load_trained(tiny_model_dir)[0].config  # the same vocabulary, a state twice as wide
    export_onnx(LanguageModel(config.model_copy(update={"hidden": 2 * config.hidden})), tmp_path / "wide.onnx")
    with pytest.raises(NextwordError, match=r"wide\.onnx: not a step of this model \(inputs .*'h', \[1, 1, 128\]"):
        Engine.load(tiny_model_dir, options=ONNX, onnx=tmp_path / "wide.onnx")


def test_a_cell_without_an_onnx_step_is_refused_in_one_line(tmp_path, capfd):
    cell = "lnlstm"
    model = random_model(cell=cell)
    expected = f"model.cell {cell} has no ONNX export (only lstm, gru, transformer); use engine.backend torch"
    with pytest.raises(NextwordError) as err:
        export_onnx(model, tmp_path / "step.onnx")
    assert str(err.value) == expected
    assert not (tmp_path / "step.onnx").exists()
    with pytest.raises(NextwordError, match=f"^{re.escape(expected)}$"):
        OnnxStep(tmp_path / "step.onnx", model)
    folder = tmp_path / "model"
    save_trained(folder, model, Vocab(["w"] * 60, [0] * 60), {"speaker_tags": True, "window_length": 8})
    status, stdout, stderr = nextword(capfd, "export", "--model", folder, "--out", tmp_path / "x.onnx")
    assert (status, stdout, stderr) == (2, "", f"error: {expected}\n")


def test_the_backend_flag_reaches_the_engine():
    args = build_parser().parse_args(["suggest", "--backend", "onnx", "hi"])
    assert engine_overrides(args) == {"backend": "onnx"}
    assert "backend" not in engine_overrides(build_parser().parse_args(["suggest", "hi"]))


def test_export_prints_one_json_object_with_the_check(tiny_model_dir, tmp_path, capfd):
    chat_csv = tmp_path / "chat.csv"
    with open(chat_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["conversation_id", "speaker", "text"])
        writer.writerows([c, speaker, text] for c in ("c0", "c1") for speaker, text in TINY_CONVERSATION)
    out = tmp_path / "step.int8.onnx"
    bundled = (tiny_model_dir / "model.int8.onnx").stat().st_mtime_ns
    status, stdout, stderr = nextword(capfd, "export", "--format", "onnx", "--model", tiny_model_dir, "--out", out,
                                      "--int8", "--check-csv", chat_csv)
    assert status == 0, stderr
    report = json.loads(stdout)  # the whole output is one object
    assert report["out"] == str(out) and report["int8"] is True
    assert report["bytes"] == out.stat().st_size and report["megabytes"] == round(out.stat().st_size / 1e6, 2)
    assert (tiny_model_dir / "model.int8.onnx").stat().st_mtime_ns == bundled  # --out, not the folder's
    check = report["check"]
    assert (check["conversations"], check["messages"], check["words"]) == (2, 8, 58)
    words = [w for _, text in TINY_CONVERSATION for w in tokenize(text) if is_word(w)] * 2
    assert check["agreement_keystrokes"] == sum(len(w) for w in words)
    assert check["top1_agreement"] == 1.0 and check["ksr"]["onnx"] == check["ksr"]["torch"] > 0.5
    # the graph computes the evaluated int8 kernel: a hair from it, further from float32
    assert check["ksr_difference_points"] == 0 and 0 <= check["max_prob_difference"] < 1e-4
    assert 0.9 < check["top1_agreement_float32"] <= 1 and 0 < check["max_prob_difference_float32"] < 0.05
    assert check["max_prob_difference"] < check["max_prob_difference_float32"]
    for backend in ("torch", "onnx", "torch_served"):
        assert 0 < check["latency_ms"][backend]["p50"] <= check["latency_ms"][backend]["p99"]


def test_the_export_of_a_missing_model_folder_is_a_one_line_error(tmp_path, capfd):
    status, stdout, stderr = nextword(capfd, "export", "--model", tmp_path / "nothing", "--out", tmp_path / "x.onnx")
    assert status == 2 and stdout == ""
    assert stderr == f"error: {tmp_path / 'nothing'}: no such model folder; run the pipeline or pass --model\n"
    assert not (tmp_path / "x.onnx").exists()


def test_suggest_on_the_onnx_backend(exported_dir, capfd):
    words = {}
    for backend in ("torch", "onnx"):
        status, stdout, stderr = nextword(capfd, "suggest", "--model", exported_dir, "--fp32", "--backend", backend,
                                          "--speaker", "agent", "i am fine , ")
        assert status == 0, stderr
        words[backend] = [line.split("\t")[0] for line in stdout.splitlines()]
    assert words["onnx"][0] == "thank" and words["onnx"] == words["torch"]


def test_the_bundle_stage_exports_the_step_when_the_backend_is_onnx(tiny_model_dir, tmp_path):
    import argparse
    import importlib.util

    from conftest import DEFAULTS, ENGINE, ROOT

    spec = importlib.util.spec_from_file_location("bundle", ROOT / "src/stages/bundle.py")
    bundle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bundle)
    engine = ENGINE.model_copy(update={"backend": "onnx", "int8": True, "ngram_order": 0})
    args = argparse.Namespace(trained=tiny_model_dir.with_name("model.trained"), vocab=None, windows=None,
                              out=tmp_path / "model")
    bundle.main(args, DEFAULTS.model_copy(update={"engine": engine}))
    assert (args.out / "model.int8.onnx").is_file() and not (args.out / "model.onnx").exists()
    served = Engine.load(args.out)  # with the settings the folder holds: onnx, int8
    assert isinstance(served.backend, OnnxStep)
    session = served.session()
    session.type_text("user", "good morning , how are ")
    assert session.suggest("")[0].word == "you"


@pytest.mark.parametrize("adaptive", [False, True])
def test_target_log_probs_are_the_targets_entries_of_the_distribution(adaptive):
    torch.manual_seed(0)
    model = LanguageModel(model_config(40, embedding=8, hidden=16, layers=2, adaptive_softmax=adaptive,
                                       cutoffs=[10, 20])).eval()
    features, _ = model.features(torch.randint(1, 40, (3, 5)))
    targets = torch.tensor([[1, 15, 35, 2, 39]] * 3)  # the head and both tail clusters
    expected = model.log_probs(features).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(target_log_probs(model, features, targets), expected)
