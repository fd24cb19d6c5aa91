"""The training loop: resuming a killed run, two processes under torchrun, the LR schedule, early stopping.

The resume and torchrun tests run real processes on a tiny corpus: a driver
script (``train_driver.py``) calls :func:`nextword.training.train` and saves
the final weights and history.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_CONVERSATION
from conftest import model_config, train_params
from nextword.errors import NextwordError
from nextword.metrics import evaluate
from nextword.model import LanguageModel
from nextword.text import tokenize
from nextword.training import activation_penalty, cpu_runs_bf16, train
from nextword.vocab import Vocab
from nextword.windows import cut_windows, split_stream

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"seconds", "tokens_per_second"}

DRIVER = Path(__file__).with_name("train_driver.py")


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: tiny matrices gain nothing from more, and a busy machine makes them wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tokenized = [(speaker, tokenize(text)) for speaker, text in TINY_CONVERSATION]
    vocab = Vocab.build([toks for _, toks in tokenized])
    vocab.save(folder / "vocab.json")
    rng = np.random.default_rng(0)
    for split, repeats in (("train", 24), ("val", 4)):
        messages = [tokenized[i] for i in rng.integers(0, len(tokenized), repeats * len(tokenized))]
        np.save(folder / f"{split}.npy", cut_windows(split_stream(messages, vocab, speaker_tags=True), 8))
    return folder


def spec(**train_overrides) -> dict:
    # AWD-LSTM's activation regularisers on, as in the chat preset: a resumed run and two processes must
    # reproduce them too.
    return {
        "model": {"embedding": 16, "hidden": 24, "layers": 2, "dropout": 0.3, "embedding_dropout": 0.1,
                  "locked_dropout": True},
        "train": {"batch_size": 8, "epochs": 3, "lr": 0.01, "clip": 1.0, "device": "cpu", "threads": 1,
                  "lr_decay": 0.5, "ar": 2.0, "tar": 1.0, **train_overrides},
    }


def env() -> dict:
    paths = [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def start(data: Path, out: Path, run_spec: dict, torchrun: int = 0) -> subprocess.Popen:
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    return subprocess.Popen([*launcher, str(DRIVER), str(data), str(out), json.dumps(run_spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())


def finish(proc: subprocess.Popen, out: Path) -> dict:
    """Wait for a driver started by :func:`start`: what it saved, and its log."""
    try:
        log, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-4000:]
    return torch.load(out, weights_only=True) | {"log": log}


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


@pytest.mark.parametrize("schedule", [{"schedule": "plateau"}, {"schedule": "cosine", "warmup_steps": 3}])
def test_a_killed_run_resumes_to_the_same_weights_and_metrics(tiny_data, tmp_path, schedule):
    # The uninterrupted run and the run to be killed go side by side; with the cosine schedule the kill
    # falls in the middle of it.
    full = start(tiny_data, tmp_path / "full.pt", spec(**schedule) | {"checkpoint": str(tmp_path / "full.ckpt")})
    checkpoint = tmp_path / "killed.ckpt"
    killed = start(tiny_data, tmp_path / "never.pt",
                   spec(**schedule) | {"checkpoint": str(checkpoint), "hang_after": 1})
    try:
        for line in killed.stdout:
            if line.startswith("finished epoch"):
                break
        assert line.strip() == "finished epoch 1"
    finally:
        killed.kill()
        killed.wait()
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1  # tensors and plain values only
    assert not (tmp_path / "never.pt").exists()

    resumed = finish(start(tiny_data, tmp_path / "resumed.pt", spec(**schedule) | {"checkpoint": str(checkpoint)}),
                     tmp_path / "resumed.pt")
    uninterrupted = finish(full, tmp_path / "full.pt")
    assert "resuming from" in resumed["log"]
    assert without_timing(resumed["history"]) == without_timing(uninterrupted["history"])
    assert resumed["best_epoch"] == uninterrupted["best_epoch"]
    assert resumed["best_val"] == uninterrupted["best_val"]
    assert resumed["weights"].keys() == uninterrupted["weights"].keys()
    for name, value in uninterrupted["weights"].items():
        assert torch.equal(resumed["weights"][name], value), name


def test_two_processes_follow_the_single_process_loss_curve(tiny_data, tmp_path):
    # No dropout, so that the ranks' other random masks do not matter; the adaptive
    # softmax, so that a tail cluster without targets on a rank is exercised.
    # Lanes split 4 + 3: the loss weighting matters. In fp32 whatever the CPU: under bf16 the split batches
    # round differently, far beyond the tolerance.
    run_spec = spec(epochs=4, batch_size=7, precision="fp32")
    run_spec["model"] = {"embedding": 16, "hidden": 32, "layers": 2, "dropout": 0.0,
                         "adaptive_softmax": True, "cutoffs": [8, 16]}
    double = start(tiny_data, tmp_path / "double.pt", run_spec, torchrun=2)
    single = finish(start(tiny_data, tmp_path / "single.pt", run_spec), tmp_path / "single.pt")
    double = finish(double, tmp_path / "double.pt")
    curve = lambda result, key: [row[key] for row in result["history"]]  # noqa: E731
    for key in ("train_loss", "val_loss"):
        assert curve(double, key) == pytest.approx(curve(single, key), rel=1e-4), key
    assert curve(single, "train_loss")[-1] < curve(single, "train_loss")[0] - 0.5  # it did learn


def small_model(vocab_size: int) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(model_config(vocab_size, embedding=8, hidden=16, layers=1))


def load(folder: Path):
    return Vocab.load(folder / "vocab.json"), np.load(folder / "train.npy"), np.load(folder / "val.npy")


def test_lr_is_cut_on_a_plateau_and_training_stops_early(tiny_data, monkeypatch):
    vocab, train_windows, val_windows = load(tiny_data)
    val_losses = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])

    def scripted_evaluate(*args, **kwargs):
        nll = next(val_losses)
        return {"nll": nll, "perplexity": np.exp(nll), "top3": 0.0}

    monkeypatch.setattr("nextword.training.evaluate", scripted_evaluate)
    model = small_model(len(vocab))
    snapshots = []
    params = train_params(batch_size=8, epochs=6, lr=0.01, clip=1.0, device="cpu", lr_decay=0.5, patience=2)
    result = train(model, train_windows, val_windows, vocab, params, 8, seed=0,
                   on_epoch=lambda row: snapshots.append({k: v.clone() for k, v in model.state_dict().items()}))
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]  # two epochs without improvement
    assert [row["lr"] for row in result.history] == [0.01, 0.01, 0.01, 0.005]
    assert result.best_epoch == 2 and result.best_val["nll"] == 2.0  # its scores are kept with them
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshots[1][name]), name  # the best epoch's weights are kept


@pytest.mark.parametrize("amx", [True, False])
def test_auto_precision_is_bf16_where_the_hardware_multiplies_bf16_and_pinned_otherwise(monkeypatch, amx):
    from nextword import training

    monkeypatch.setattr(training, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(training, "cpu_runs_bf16", lambda: True)
    cpu = torch.device("cpu")
    assert training.autocast_dtype("auto", cpu) == (torch.bfloat16 if amx else None)
    assert training.autocast_dtype("fp32", cpu) is None
    assert training.autocast_dtype("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr(training, "cpu_runs_bf16", lambda: False)  # an AVX2-only CPU
    with pytest.raises(NextwordError, match=r"^train.precision: bf16 needs a CPU with AVX-512"):
        training.autocast_dtype("bf16", cpu)
    assert training.autocast_dtype("auto", cpu) == (torch.bfloat16 if amx else None)


def test_amx_is_read_from_the_cpu_flags():
    from nextword.training import cpu_has_amx

    try:
        flags = {f for line in open("/proc/cpuinfo") if line.startswith("flags") for f in line.split()}
    except OSError:
        flags = set()
    assert cpu_has_amx() == ("amx_bf16" in flags)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_lowers_the_loss_on_cpu(tiny_data, precision):
    vocab, train_windows, val_windows = load(tiny_data)
    params = train_params(batch_size=8, epochs=3, lr=0.01, clip=1.0, device="auto", precision=precision)
    if precision == "bf16" and not cpu_runs_bf16():  # this CPU refuses it, in one line
        with pytest.raises(NextwordError, match=r"^train.precision: bf16 needs a CPU with AVX-512"):
            train(small_model(len(vocab)), train_windows, val_windows, vocab, params, 8, seed=0)
        return
    result = train(small_model(len(vocab)), train_windows, val_windows, vocab, params, 8, seed=0)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0] and result.history[-1]["val_loss"] < result.history[0]["val_loss"]


def test_the_kept_weights_score_on_validation_as_training_reported(tiny_data):
    # The evaluate stage reports best_val as the validation scores instead of scoring the weights again.
    vocab, train_windows, val_windows = load(tiny_data)
    model = small_model(len(vocab))
    params = train_params(batch_size=8, epochs=2, lr=0.01, clip=1.0, device="cpu")
    result = train(model, train_windows, val_windows, vocab, params, 8, seed=0)
    assert result.best_val == evaluate(model, val_windows, vocab, 8)
    assert result.best_val["nll"] == result.history[result.best_epoch - 1]["val_loss"]
    # Only the last epoch ranks the words; the epochs before it score the perplexity alone.
    assert result.history[0]["val_top3"] is None and result.history[-1]["val_top3"] == result.best_val["top3"] > 0


def test_a_kept_epoch_before_the_last_is_ranked_once_training_ends(tiny_data, monkeypatch):
    from nextword import training

    vocab, train_windows, val_windows = load(tiny_data)
    calls = []

    def worse_after_the_first_epoch(*args, **kwargs):
        scores = evaluate(*args, **kwargs)
        calls.append(kwargs.get("accuracy", True))
        if len(calls) == 2:  # the second epoch's score: worse, so the first epoch's weights are kept
            scores["nll"] += 10.0
        return scores

    monkeypatch.setattr(training, "evaluate", worse_after_the_first_epoch)
    model = small_model(len(vocab))
    snapshots = []
    params = train_params(batch_size=8, epochs=2, lr=0.01, clip=1.0, device="cpu")
    result = train(model, train_windows, val_windows, vocab, params, 8, seed=0,
                   on_epoch=lambda row: snapshots.append({k: v.clone() for k, v in model.state_dict().items()}))
    assert calls == [False, True, True] and result.best_epoch == 1
    assert result.history[0]["val_top3"] is None
    monkeypatch.undo()
    assert all(torch.equal(value, snapshots[0][name]) for name, value in model.state_dict().items())
    assert result.best_val == evaluate(model, val_windows, vocab, 8) and result.best_val["top3"] > 0
    assert result.best_val["nll"] == result.history[0]["val_loss"]


def trained(tiny_data, params, checkpoint=None) -> tuple:
    """(history without timings, weights) of a run of ``small_model`` with ``params``."""
    vocab, train_windows, val_windows = load(tiny_data)
    model = small_model(len(vocab))
    result = train(model, train_windows, val_windows, vocab, params, 8, seed=0, checkpoint=checkpoint)
    return without_timing(result.history), model.state_dict()


def same_run(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize("change", ["epochs", "lr", "code"])
def test_a_checkpoint_of_other_code_or_params_is_not_resumed(tiny_data, tmp_path, monkeypatch, caplog, change):
    checkpoint = tmp_path / "checkpoint.pt"
    params = train_params(batch_size=8, epochs=1, lr=0.01, clip=1.0, device="cpu", lr_decay=0.5)
    trained(tiny_data, params, checkpoint)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1
    other = params
    if change == "code":
        monkeypatch.setattr("nextword.training.code_fingerprint", lambda: "other code")
    else:
        other = params.model_copy(update={change: {"epochs": 2, "lr": 0.02}[change]})
    with caplog.at_level("INFO", logger="nextword.training"):
        again = trained(tiny_data, other, checkpoint)
    assert "ignoring" in caplog.text and "resuming" not in caplog.text
    assert same_run(again, trained(tiny_data, other))  # what a run from scratch gives


def test_a_damaged_checkpoint_is_set_aside_and_the_run_starts_over(tiny_data, tmp_path, caplog):
    checkpoint = tmp_path / "checkpoint.pt"
    params = train_params(batch_size=8, epochs=2, lr=0.01, clip=1.0, device="cpu", lr_decay=0.5)
    trained(tiny_data, params, checkpoint)
    whole = checkpoint.read_bytes()
    checkpoint.write_bytes(whole[: len(whole) // 2])  # a write cut short by a full disk or a crash
    with caplog.at_level("INFO", logger="nextword.training"):
        again = trained(tiny_data, params, checkpoint)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "damaged checkpoint" in warnings[0] and "\n" not in warnings[0]
    assert (tmp_path / "checkpoint.pt.damaged").read_bytes() == whole[: len(whole) // 2]
    assert same_run(again, trained(tiny_data, params))


def test_bench_prints_one_json_object(tiny_data, tmp_path, capsys):
    """``make bench`` drives this training loop; here on tiny data, its speed not judged."""
    from nextword.bench import main
    from nextword.cli import main as cli

    cli(["params", "toy", "model.embedding=16", "model.hidden=16", "train.batch_size=4", "--out",
         str(tmp_path / "params.yaml")])
    capsys.readouterr()
    main(["--params", str(tmp_path / "params.yaml"), "--windows", str(tiny_data), "--vocab",
          str(tiny_data / "vocab.json"), "--steps", "2", "--rounds", "2", "--matmul-size", "256"])
    report = json.loads(capsys.readouterr().out)
    for name in ("chat", "reference"):
        figures = report[name]
        assert figures["tokens_per_second"] > 0 and len(figures["tokens_per_second_by_round"]) == 2
        assert figures["utilisation"] == pytest.approx(
            figures["tokens_per_second"] * figures["flops_per_token"] / 1e9 / figures["matmul_gflops"], abs=1e-3)
    assert report["reference"]["options"]["adaptive_softmax"] is False
    assert report["timed_steps"] == 4


def test_bench_measures_each_cell_named(tiny_data, tmp_path, capsys):
    from nextword.bench import main
    from nextword.cli import main as cli

    cli(["params", "toy", "model.embedding=16", "model.hidden=16", "train.batch_size=4", "--out",
         str(tmp_path / "params.yaml")])
    capsys.readouterr()
    main(["--params", str(tmp_path / "params.yaml"), "--windows", str(tiny_data), "--vocab",
          str(tiny_data / "vocab.json"), "--steps", "2", "--rounds", "1", "--matmul-size", "64",
          "--cell", "lnlstm", "--cell", "transformer"])
    report = json.loads(capsys.readouterr().out)
    assert list(report["cells"]) == ["lnlstm", "transformer"] and "reference" not in report
    assert all(figures["tokens_per_second"] > 0 for figures in report["cells"].values())


def test_bench_says_in_one_line_when_the_data_is_missing(tmp_path, capsys):
    from nextword.bench import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--windows", str(tmp_path), "--vocab", str(tmp_path / "vocab.json")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / 'train.npy'}: not found; build the chat data first (make repro, or dvc repro window)")


def test_same_params_and_seed_give_the_same_metrics_and_weights(tiny_data):
    from nextword.training import seed_everything

    vocab, train_windows, val_windows = load(tiny_data)
    params = train_params(batch_size=8, epochs=2, lr=0.01, clip=1.0, device="cpu")
    runs = []
    for _ in range(2):
        seed_everything(5)
        model = LanguageModel(model_config(len(vocab), embedding=16, hidden=24, layers=2, dropout=0.3))
        result = train(model, train_windows, val_windows, vocab, params, 8, seed=5)
        runs.append(([{k: v for k, v in row.items() if k not in TIMING} for row in result.history],
                     model.state_dict()))
    (history_a, weights_a), (history_b, weights_b) = runs
    assert history_a == history_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_the_cosine_schedule_warms_up_then_decays_to_zero_over_the_budget():
    from nextword.training import schedules

    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.003)
    params = train_params(schedule="cosine", warmup_steps=4, epochs=3, lr=0.003)
    plateau, per_step = schedules(optimizer, params, steps_per_epoch=10)
    assert plateau is None
    lrs = []
    for _ in range(30):  # the budget: 3 epochs of 10 steps
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        per_step.step()
    assert lrs[:4] == pytest.approx([0.003 * s / 4 for s in (1, 2, 3, 4)])  # linear warmup to the peak
    assert lrs[4] == pytest.approx(0.003)  # the peak, then a half cosine
    assert lrs[4 + 13] == pytest.approx(0.0015, rel=1e-3)  # half way through the decay
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.003 * 0.01
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)  # zero after the last step
    assert schedules(optimizer, train_params(schedule="plateau", lr_decay=0.5), 10)[1] is None


def test_the_activation_penalty_is_awd_lstms_over_the_positions_with_a_target():
    torch.manual_seed(0)
    raw = torch.randn(2, 4, 3)
    dropped = raw * (torch.rand(2, 1, 3) > 0.5) * 2  # a locked mask, as the model draws it
    keep = torch.tensor([[True, True, True, True], [True, True, False, False]])  # the tail of row 1 is PAD
    kept = [(b, t) for b in range(2) for t in range(4) if keep[b, t]]
    ar = sum(float((dropped[b, t] ** 2).mean()) for b, t in kept) / len(kept)
    tar = sum(float(((raw[b, t] - raw[b, t - 1]) ** 2).mean()) for b, t in kept if t and keep[b, t - 1]) / len(kept)
    assert activation_penalty(raw, dropped, keep, 2.0, 0.0).item() == pytest.approx(2 * ar)
    assert activation_penalty(raw, dropped, keep, 0.0, 1.0).item() == pytest.approx(tar)
    assert activation_penalty(raw, dropped, keep, 2.0, 1.0).item() == pytest.approx(2 * ar + tar)
    assert activation_penalty(raw, dropped, keep, 0.0, 0.0).item() == 0.0
    # PAD positions count for nothing, whatever the model output there.
    noisy = raw.clone()
    noisy[1, 2:] = 100.0
    assert activation_penalty(noisy, noisy, keep, 2.0, 1.0).item() == pytest.approx(
        activation_penalty(raw, raw, keep, 2.0, 1.0).item())


def test_the_activation_regularisers_keep_the_outputs_small_and_smooth(tiny_data):
    vocab, train_windows, val_windows = load(tiny_data)
    inputs = torch.from_numpy(val_windows[:, :-1]).long()
    measured = {}
    for weights in ((0.0, 0.0), (4.0, 4.0)):
        model = small_model(len(vocab))
        params = train_params(batch_size=8, epochs=3, lr=0.01, device="cpu", ar=weights[0], tar=weights[1])
        result = train(model, train_windows, val_windows, vocab, params, 8, seed=0)
        with torch.no_grad():
            raw, _, _ = model.eval().activations(inputs)
        measured[weights] = (raw.square().mean().item(), (raw[:, 1:] - raw[:, :-1]).square().mean().item(),
                             result.history[-1]["val_loss"])
    (size, jumps, val_loss), (reg_size, reg_jumps, reg_val_loss) = measured[(0.0, 0.0)], measured[(4.0, 4.0)]
    assert reg_size < 0.8 * size and reg_jumps < 0.8 * jumps
    assert reg_val_loss < val_loss + 1.0  # still a language model
