"""The training loop: truncated BPTT over lanes of windows, a loss at every position.

Lane b of a batch holds a contiguous run of windows, so the recurrent state
left by one step is the right starting state for the next; it is carried
and detached between steps (as in PyTorch's word_language_model example).
For ``model.cell: transformer`` that state is the keys and values of the last
``model.context - 1`` tokens (:mod:`nextword.transformer`), carried the same way.
After each epoch the model's validation perplexity is scored, and after the
last epoch its top-1 and top-3 too (ranking every word takes as long again as
the perplexity, so the curve's ``val_top3`` has the last epoch's only). The best
epoch's weights are kept, with their full scores (``TrainResult.best_val``, which
the evaluate stage reports instead of scoring validation again; ranked once more
when the best epoch was not the last), and training stops early after ``patience`` epochs without
improvement. The learning rate follows ``schedule``: ``plateau`` cuts it by
``lr_decay`` when validation loss stops improving (``ReduceLROnPlateau``);
``cosine`` warms it up linearly over ``warmup_steps`` optimizer steps, then
decays it along a half cosine to zero at the last step of the last epoch
(``LambdaLR``, stepped after every optimizer step), so ``epochs`` sets the
budget the schedule spends. ``ar`` and ``tar`` add AWD-LSTM's activation
regularisers to the loss that is minimised (:func:`activation_penalty`); the
curve's ``train_loss`` and ``train_perplexity`` are the cross-entropy alone, so
they compare with validation's.

Resuming: a checkpoint is written after every epoch (model, optimizer,
scheduler, history, best weights, and every rank's torch/numpy/python RNG
state, all as tensors and plain values so that it loads with
``weights_only=True``). It exists only to finish an *interrupted* run: its
fingerprint covers the code of this package and of the stage script, every
training param but ``threads``, the seed, the world size and the data, and the
train stage deletes it once the model is written. So a killed run started again
with the same code, params and data resumes from its last finished epoch and
ends with the same weights and metrics as an uninterrupted run, while any
change that makes DVC rerun training (code, params, data, ``dvc repro -f``)
trains from scratch. A damaged checkpoint is reported in one line, set aside
as ``<name>.damaged``, and the run starts over.

Device: ``device: auto`` picks CUDA when present; ``precision: auto`` then
trains under bf16 autocast where the hardware has native bf16 products (fp32
master weights, so no loss scaling): GPUs that support it, and CPUs with AMX;
fp32 elsewhere (:func:`autocast_dtype`). Validation is always scored in fp32.

Scale-out with DistributedDataParallel. Under ``torchrun`` (``WORLD_SIZE`` >
1) each rank trains on its share of the lanes: the global batch of
``batch_size`` lanes is split across ranks, and each rank's loss is scaled so
that DDP's gradient average is the global batch's mean over its target tokens,
the same gradient a single process computes. (A ``DistributedSampler`` would
shuffle windows and break the carried state, so lanes are split instead.)
Gloo is the backend on CPU, NCCL on GPU. Rank 0 alone evaluates, logs,
calls ``on_epoch`` and writes checkpoints; it broadcasts what the others need.

One machine, N processes: ``train.processes: N`` (``dvc exp run -S
train.processes=2``); the train stage relaunches itself under torchrun's
launcher. Processes split the machine's cores: torchrun gives each one
thread unless ``train.threads`` says otherwise (C cores, N processes:
``train.threads: C/N``).

Several machines: give every machine the data stages' outputs at the same
paths (``dvc repro window`` or ``dvc pull`` there), then run the train stage
on each with torchrun's rendezvous settings in ``PET_*`` variables, which the
stage passes to torchrun's launcher (``torchrun`` itself refuses the stage's
``--run`` argument as a prefix of its own ``--run-path``)::

    export PET_NNODES=2 PET_NODE_RANK=K PET_MASTER_ADDR=host0 PET_MASTER_PORT=29500
    dvc repro train                               # on host0 (K=0)
    python src/stages/train.py <its arguments>    # on the others (K=1, ...), as in dvc.yaml

``train.processes`` is the number of processes per machine. This static
rendezvous gives global rank 0 to ``host0``: it alone needs the MLflow store
and writes the model, curves and checkpoint, where a resumed run finds them
again. Every step all-reduces the gradients (about 45 MB
for the chat model with the adaptive softmax, 75 MB with the full softmax),
so across machines the network must keep up with the steps; NCCL is used on
GPUs (``device: auto``), gloo on CPUs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from nextword.config import TrainParams
from nextword.errors import NextwordError, first_line
from nextword.files import atomic_path
from nextword.metrics import evaluate
from nextword.model import LanguageModel, detach_state
from nextword.vocab import PAD_ID, Vocab
from nextword.windows import lanes

log = logging.getLogger(__name__)

# Params that do not change what training computes: a checkpoint made under
# other values of these is still resumed (the world size is fingerprinted itself).
NOT_FINGERPRINTED = {"threads", "processes"}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` on ``device``; None for plain fp32.

    ``auto`` is bf16 where the hardware multiplies bf16 natively: a GPU that supports it, or a CPU with
    AMX (Intel's matrix tiles), where oneDNN's bf16 kernels train the chat model about half as fast
    again (docs/results.md). Elsewhere, CPUs without AMX included, it is fp32. So ``auto`` can differ
    between two machines, as their float kernels already do; ``fp32`` or ``bf16`` pins it.
    """
    if precision == "auto":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and cpu_has_amx()
        return torch.bfloat16 if native else None
    if precision == "bf16" and device.type == "cpu" and not cpu_runs_bf16():
        raise NextwordError(f"train.precision: bf16 needs a CPU with AVX-512, this one has "
                            f"{torch.backends.cpu.get_cpu_capability()} (oneDNN has no bf16 LSTM for it): "
                            "set fp32 or auto")
    return torch.bfloat16 if precision == "bf16" else None


def cpu_runs_bf16() -> bool:
    """Whether PyTorch's CPU kernels train in bf16 here: AVX-512 and up. Below it oneDNN cannot build a bf16
    LSTM (on an AVX2-only AMD EPYC the first bf16 step failed), so ``bf16`` is refused there in one line."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX bf16 tiles (the ``amx_bf16`` flag of Linux's /proc/cpuinfo; False elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in info)
    except OSError:
        return False


def seed_everything(seed: int, threads: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> int:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1); return this process's rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        on_gpu = resolve_device(device, local_rank).type == "cuda"
        if on_gpu:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if on_gpu else "gloo")
    return rank_and_world()[0]


def finish_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_state: dict | None = None
    best_val: dict | None = None  # nextword.metrics.evaluate of the best epoch's weights on validation


def fingerprint(*parts) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part.tobytes() if isinstance(part, np.ndarray) else repr(part).encode())
    return h.hexdigest()


def code_fingerprint() -> str:
    """A hash of the code that trains: every module of this package, and the script that was run."""
    files = sorted(Path(__file__).parent.rglob("*.py"))
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if main and Path(main).is_file():
        files.append(Path(main))
    return fingerprint(*(p.read_bytes() for p in files))


def rng_state() -> dict:
    """This process's RNG states as tensors and plain values (a checkpoint loads with ``weights_only``)."""
    numpy_state = np.random.get_state(legacy=False)
    version, python_state, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                  "gauss": float(numpy_state["gauss"])},
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_checkpoint(path: Path, key: str) -> dict | None:
    """The checkpoint at ``path`` if it belongs to this run (fingerprint ``key``); None otherwise.

    A file that cannot be read is moved aside, so the run starts over and the file can still be looked at.
    """
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        found = saved["fingerprint"]
    except Exception as err:  # a truncated or foreign file fails in many ways, all of which mean "damaged"
        aside = path.with_name(path.name + ".damaged")
        os.replace(path, aside)
        log.warning("%s: damaged checkpoint (%s); moved to %s, training starts over", path, first_line(err), aside)
        return None
    if found != key:
        log.info("ignoring %s: it belongs to other code, params or data", path)
        return None
    return saved


class _WithLoss(nn.Module):
    """The model and its loss in one ``forward``, the unit that DistributedDataParallel wraps.

    The loss must be inside ``forward`` so that DDP sees which parameters a
    step used: with the adaptive softmax a tail cluster without targets on a
    rank gets no gradient there.
    """

    def __init__(self, model: LanguageModel, ar: float = 0.0, tar: float = 0.0):
        super().__init__()
        self.model = model
        self.ar, self.tar = ar, tar

    def forward(self, inp, tgt, state):
        """(the mean cross-entropy, the activation penalty, the number of targets, the state after)."""
        raw, dropped, state = self.model.activations(inp, state)
        loss, count = self.model.loss(self.model.project(dropped), tgt)
        return loss, activation_penalty(raw, dropped, tgt != PAD_ID, self.ar, self.tar), count, state


def activation_penalty(raw: torch.Tensor, dropped: torch.Tensor, keep: torch.Tensor, ar: float,
                       tar: float) -> torch.Tensor:
    """AWD-LSTM's activation regularisers (Merity et al. 2017) over the ``[batch, time]`` positions ``keep``
    marks (those with a target), in float32: ``ar`` times the mean square of the dropped-out output
    ``dropped`` (AR, which keeps the activations small), plus ``tar`` times the mean square of the raw
    output's change from one kept position to the next (TAR, which keeps them from jumping).

    Both sums are divided by the number of kept positions, as the loss is; so under DDP, where each
    rank's loss is weighted by its share of the targets, the ranks' penalties add up to that of the
    whole batch. For full windows TAR is AWD-LSTM's times (length - 1) / length. Zero (and no work)
    when both weights are 0.
    """
    if not (ar or tar):
        return torch.zeros((), device=raw.device)
    kept = keep.float()
    count = kept.sum().clamp(min=1)
    penalty = ar * (dropped.float().square().mean(-1) * kept).sum() / count
    steps = kept[:, 1:] * kept[:, :-1]
    return penalty + tar * ((raw[:, 1:] - raw[:, :-1]).float().square().mean(-1) * steps).sum() / count


def _from_rank0(obj, world: int):
    """Rank 0's ``obj`` on every rank (a no-op in a single process)."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def schedules(optimizer, params: TrainParams, steps_per_epoch: int):
    """(the plateau scheduler, stepped per epoch; the per-step scheduler), either None, as ``schedule`` says."""
    if params.schedule == "plateau":
        if params.lr_decay == 1:
            return None, None
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=params.lr_decay, patience=params.lr_patience), None
    total, warmup = steps_per_epoch * params.epochs, params.warmup_steps

    def factor(step: int) -> float:  # step: optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return None, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _stopped(result: TrainResult, patience: int) -> bool:
    return bool(patience) and len(result.history) - result.best_epoch >= patience


def train(
    model: LanguageModel,
    train_windows: np.ndarray,
    val_windows: np.ndarray,
    vocab: Vocab,
    params: TrainParams,
    eval_batch_size: int,
    seed: int,
    checkpoint: str | Path | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place (ending with the best epoch's weights) and return its history.

    Under torchrun every rank calls this with the same arguments; ``on_epoch``
    and the checkpoint are used on rank 0 only.
    """
    rank, world = rank_and_world()
    device = resolve_device(params.device, int(os.environ.get("LOCAL_RANK", "0")))
    model.to(device)
    if rank:
        torch.manual_seed(seed + rank)  # other dropout masks than rank 0's
    amp_dtype = autocast_dtype(params.precision, device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    if rank == 0:
        log.info("training on %s in %s (train.precision %s)", device, "bf16" if amp_dtype else "fp32",
                 params.precision)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr, fused=device.type in ("cpu", "cuda"))
    runner = _WithLoss(model, params.ar, params.tar)
    if world > 1:
        runner = nn.parallel.DistributedDataParallel(
            runner, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=model.config.adaptive_softmax)

    batch_size = max(1, min(params.batch_size, len(train_windows)))
    if batch_size < world:
        raise NextwordError(f"train.batch_size: {batch_size} lanes cannot be split across {world} processes")
    all_lanes = lanes(train_windows, batch_size, pad_tail=False)
    steps = all_lanes.shape[0]
    if params.max_steps_per_epoch:
        steps = min(steps, params.max_steps_per_epoch)
    # Every window has at least one target, so no rank ever sees a step without any.
    global_targets = (all_lanes[:steps, :, 1:] != PAD_ID).sum(axis=(1, 2))
    my_lanes = np.array_split(np.arange(batch_size), world)[rank]
    data = torch.from_numpy(np.ascontiguousarray(all_lanes[:steps, my_lanes])).to(device)
    plateau, per_step = schedules(optimizer, params, steps)

    settings = params.model_dump(exclude=NOT_FINGERPRINTED)
    # The precision ``auto`` resolved to here: a run interrupted on another machine resumes only in the same one.
    key = fingerprint(code_fingerprint(), model.config, settings, str(amp_dtype), seed, world, train_windows,
                      val_windows)
    result = TrainResult()
    start_epoch = 1
    saved = read_checkpoint(Path(checkpoint), key) if rank == 0 and checkpoint else None
    saved = _from_rank0(saved, world)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        for scheduler in (plateau, per_step):
            if scheduler is not None:
                scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"][rank])
        result = TrainResult(saved["history"], saved["best_epoch"], saved["best_state"], saved["best_val"])
        start_epoch = saved["epoch"] + 1
        if rank == 0:
            log.info("resuming from %s after epoch %d", checkpoint, saved["epoch"])
            for row in result.history:
                if on_epoch:
                    on_epoch(row)
        del saved

    for epoch in range(start_epoch, params.epochs + 1):
        if _stopped(result, params.patience):
            if rank == 0:
                log.info("early stop: no improvement for %d epochs", params.patience)
            break
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        state = None
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, targets
        started = time.perf_counter()
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{params.epochs}", unit="step", file=sys.stderr,
                   mininterval=1 if sys.stderr.isatty() else 30, disable=steps < 2 or rank > 0)
        for step in bar:
            batch = data[step].long()
            with autocast:
                mean, penalty, count, state = runner(batch[:, :-1], batch[:, 1:], state)
            # DDP averages gradients over ranks: scaled so, the average is the global batch's mean.
            loss = (mean + penalty) * (count * world / float(global_targets[step]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), params.clip)
            optimizer.step()
            if per_step is not None:
                per_step.step()
            state = detach_state(state)
            totals[0] += mean.detach().double() * count
            totals[1] += count
            if step % 50 == 0 and rank == 0:
                bar.set_postfix(loss=f"{mean.item():.3f}")
        if world > 1:
            dist.all_reduce(totals)
        seconds = time.perf_counter() - started
        train_loss = (totals[0] / totals[1].clamp(min=1)).item()
        last = epoch == params.epochs
        val = evaluate(model, val_windows, vocab, eval_batch_size, device, accuracy=last) if rank == 0 else None
        val = _from_rank0(val, world)
        if plateau is not None:
            plateau.step(val["nll"])
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_perplexity": math.exp(train_loss),
            "val_loss": val["nll"],
            "val_perplexity": val["perplexity"],
            "val_top3": val.get("top3"),  # None before the last epoch
            "lr": lr,
            "tokens_per_second": totals[1].item() / max(seconds, 1e-9),
            "seconds": seconds,
        }
        result.history.append(row)
        if result.best_state is None or val["nll"] < result.history[result.best_epoch - 1]["val_loss"]:
            result.best_epoch, result.best_val = epoch, val
            result.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        rngs = [rng_state()]
        if world > 1:
            rngs = [None] * world if rank == 0 else None
            dist.gather_object(rng_state(), rngs, dst=0)
        if rank == 0:
            log.info("epoch %d: train loss %.4f, val perplexity %.2f, %.0f tokens/s",
                     epoch, row["train_loss"], row["val_perplexity"], row["tokens_per_second"])
            # The checkpoint first: once an epoch is announced, it is durable.
            if checkpoint:
                with atomic_path(checkpoint) as tmp:
                    torch.save(
                        {
                            "fingerprint": key,
                            "epoch": epoch,
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": (plateau or per_step).state_dict() if plateau or per_step else None,
                            "rng": rngs,
                            "history": result.history,
                            "best_epoch": result.best_epoch,
                            "best_state": result.best_state,
                            "best_val": result.best_val,
                        },
                        tmp,
                    )
            if on_epoch:
                on_epoch(row)
    model.load_state_dict(result.best_state)
    if rank == 0 and "top3" not in result.best_val:  # an epoch before the last, or an early stop, was kept
        result.best_val = evaluate(model, val_windows, vocab, eval_batch_size, device)
    return result
