"""``make bench``: training speed of the chat model on real chitchat windows, printed as one JSON object.

Two configurations run in one process, each through the real training loop
(:func:`nextword.training.train`), on the train windows and vocabulary the
pipeline wrote (paths from ``dvc.yaml``):

* ``chat``: the model and speed options of ``params.yaml`` (``model.*``,
  ``train.precision``, ``train.threads``, ``train.batch_size``);
* ``reference``: the same sizes with every speed option off: the full
  softmax, untied weights, plain dropout, fp32.

With ``--cell`` (repeatable: ``--cell lstm --cell lnlstm``) the configured
model is measured once per named ``model.cell`` instead, in the same process and
with the same sizes and options, under ``cells``; the reference is not run.

Each runs one warm-up epoch of ``--steps`` steps, then ``--rounds`` timed
epochs of ``--steps`` steps each. After every epoch the rate of a square
(``--matmul-size``, 2048) matrix multiply is measured in the same process, in fp32 (and in bf16 for a
bf16 run), so that a machine busy with other work shows in both numbers.

* ``tokens_per_second``: target tokens trained per second of the step loop
  (forward, loss, backward, clipping, optimizer step), evaluation excluded.
* ``flops_per_token``: :func:`nextword.model.count_flops_per_token`, the
  matrix multiplies only, 6 FLOPs per weight per token (forward and
  backward), and for the adaptive softmax the head only, not the tail
  clusters: a lower bound, so the utilisation is never flattered.
* ``utilisation``: ``tokens_per_second * flops_per_token`` over the median
  matmul rate measured after the timed epochs (each the best of three timings),
  in the precision trained in.
* ``peak_rss_mb``: the process's peak resident memory when the configuration
  finished; the reference runs second, so its figure covers both.

Nothing in ``make test`` depends on these numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from pydantic import ValidationError

from nextword.config import CELLS, ModelConfig, load_params
from nextword.errors import NextwordError, exit_on_error
from nextword.model import LanguageModel, count_flops_per_token
from nextword.training import autocast_dtype, resolve_device, seed_everything, train
from nextword.vocab import Vocab

OPTIONS = ("adaptive_softmax", "cutoffs", "div_value", "tie_weights", "dropout", "embedding_dropout",
           "locked_dropout")


def pipeline_paths(dvc_yaml: str | Path = "dvc.yaml") -> dict:
    """The ``paths`` table of ``dvc.yaml``, the one place where the pipeline's paths are named."""
    try:
        for entry in yaml.safe_load(Path(dvc_yaml).read_text(encoding="utf-8")).get("vars", []):
            if isinstance(entry, dict) and "paths" in entry:
                return entry["paths"]
    except FileNotFoundError:
        raise NextwordError(f"{dvc_yaml}: not found; run the bench from the project root") from None
    raise NextwordError(f"{dvc_yaml}: no vars.paths table")


def matmul_gflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 3) -> float:
    """The rate of a square matrix multiply, in GFLOP/s (best of three timings of ``repeats`` products)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        sync(device)
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - started)
    return repeats * 2 * size**3 / best / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(config: ModelConfig, train_params, windows, val_windows, vocab, seed, rounds, matmul_size) -> dict:
    device = resolve_device(train_params.device)
    dtypes = {"fp32": torch.float32}
    if autocast_dtype(train_params.precision, device) == torch.bfloat16:
        dtypes["bf16"] = torch.bfloat16
    rates = {name: [] for name in dtypes}

    def probe(row):
        for name, dtype in dtypes.items():
            rates[name].append(matmul_gflops(device, dtype, matmul_size))

    seed_everything(seed, train_params.threads)
    model = LanguageModel(config)
    params = train_params.model_copy(update={"epochs": rounds + 1, "lr_decay": 1.0, "patience": 0})
    result = train(model, windows, val_windows, vocab, params, 64, seed, on_epoch=probe)
    timed = result.history[1:]  # the first epoch warms up
    tokens_per_second = sum(r["tokens_per_second"] * r["seconds"] for r in timed) / sum(r["seconds"] for r in timed)
    flops = count_flops_per_token(config)
    precision = "bf16" if "bf16" in dtypes else "fp32"
    matmul = {name: statistics.median(values[1:]) for name, values in rates.items()}
    achieved = tokens_per_second * flops / 1e9
    out = {
        "options": {k: v for k, v in config.model_dump().items() if k in OPTIONS} | {"precision": precision},
        "tokens_per_second": round(tokens_per_second, 1),
        "tokens_per_second_by_round": [round(r["tokens_per_second"], 1) for r in timed],
        "flops_per_token": flops,
        "model_gflops": round(achieved, 2),
        "matmul_gflops": round(matmul[precision], 2),
        "utilisation": round(achieved / matmul[precision], 3),
    }
    if precision != "fp32":
        out["matmul_gflops_fp32"] = round(matmul["fp32"], 2)
        out["utilisation_vs_fp32"] = round(achieved / matmul["fp32"], 3)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if device.type == "cuda":
        out["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nextword.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--windows", help="folder of train.npy and val.npy (default: paths.windows in dvc.yaml)")
    parser.add_argument("--vocab", help="vocab.json (default: paths.vocab in dvc.yaml)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per epoch (warm-up and timed)")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs")
    parser.add_argument("--matmul-size", type=int, default=2048, help="of the square matrices timed")
    parser.add_argument("--skip-reference", action="store_true", help="measure the configured model only")
    parser.add_argument("--cell", action="append", choices=CELLS,
                        help="measure the configured model with this model.cell instead (repeatable); no reference")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    params = load_params(args.params)
    paths = pipeline_paths() if not (args.windows and args.vocab) else {}
    windows_dir = Path(args.windows or paths["windows"])
    vocab_path = Path(args.vocab or paths["vocab"])
    train_file = windows_dir / "train.npy"
    if not train_file.exists() or not vocab_path.exists():
        raise NextwordError(f"{train_file if not train_file.exists() else vocab_path}: not found; "
                            "build the chat data first (make repro, or dvc repro window)")
    windows = np.load(train_file)
    vocab = Vocab.load(vocab_path)
    batch_size = params.train.batch_size
    if len(windows) < batch_size * args.steps:
        raise NextwordError(f"{train_file}: {len(windows)} windows, the bench needs {batch_size * args.steps}; "
                            "build the chat data first (make repro)")
    if windows.max() >= len(vocab):
        raise NextwordError(f"{train_file}: ids beyond the {len(vocab)} words of {vocab_path}; rebuild the data")
    val_file = windows_dir / "val.npy"
    val_windows = np.load(val_file)[: 4 * batch_size] if val_file.exists() else windows[: 4 * batch_size]

    config = ModelConfig(vocab_size=len(vocab), **params.model.model_dump())
    train_params = params.train.model_copy(update={"max_steps_per_epoch": args.steps, "processes": 1})
    device = resolve_device(train_params.device)
    report = {
        "preset": params.preset,
        "device": str(device),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads() if not train_params.threads else train_params.threads,
        "model": {"vocab_size": len(vocab), "embedding": config.embedding, "hidden": config.hidden,
                  "layers": config.layers, "cell": config.cell},
        "batch_size": batch_size,
        "window_length": int(windows.shape[1] - 1),
        "warmup_steps": args.steps,
        "timed_steps": args.steps * args.rounds,
        "matmul_size": args.matmul_size,
    }
    if args.cell:
        report["model"].pop("cell")
        report["cells"] = {}
        for cell in args.cell:
            try:
                variant = ModelConfig.model_validate(config.model_dump() | {"cell": cell})
            except ValidationError as err:
                raise NextwordError(f"--cell {cell}: {err.errors()[0]['msg']}") from None
            report["cells"][cell] = measure(variant, train_params, windows, val_windows, vocab, params.seed,
                                            args.rounds, args.matmul_size)
        json.dump(report, sys.stdout, indent=2)
        print()
        return
    report["chat"] = measure(config, train_params, windows, val_windows, vocab, params.seed, args.rounds,
                             args.matmul_size)
    if not args.skip_reference:
        reference = config.model_copy(update={"adaptive_softmax": False, "tie_weights": False,
                                              "locked_dropout": False, "embedding_dropout": 0.0})
        report["reference"] = measure(reference, train_params.model_copy(update={"precision": "fp32"}), windows,
                                      val_windows, vocab, params.seed, args.rounds, args.matmul_size)
        report["speedup"] = round(report["chat"]["tokens_per_second"] / report["reference"]["tokens_per_second"], 2)
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
