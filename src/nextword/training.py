"""The training loop: truncated BPTT over lanes of windows, a loss at every position.

Lane b of a batch holds a contiguous run of windows, so the recurrent state
left by one step is the right starting state for the next; it is carried
and detached between steps (as in PyTorch's word_language_model example).
After each epoch the model is scored on validation; the best epoch's weights
are kept. A checkpoint is written after every epoch, so a killed run resumes
from its last finished epoch and ends with the same result.
"""

from __future__ import annotations

import copy
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
from tqdm import tqdm

from nextword.config import TrainParams
from nextword.files import atomic_path
from nextword.metrics import evaluate
from nextword.model import LanguageModel, detach_state
from nextword.vocab import Vocab
from nextword.windows import lanes

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed: int, threads: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_state: dict | None = None


def fingerprint(*parts) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part.tobytes() if isinstance(part, np.ndarray) else repr(part).encode())
    return h.hexdigest()


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
    device = resolve_device(params.device)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr)
    batch_size = max(1, min(params.batch_size, len(train_windows)))
    data = torch.from_numpy(lanes(train_windows, batch_size, pad_tail=False))
    steps = data.shape[0] if not params.max_steps_per_epoch else min(data.shape[0], params.max_steps_per_epoch)
    use_amp = device.type == "cuda"

    key = fingerprint(model.config, params, seed, train_windows)
    result = TrainResult()
    start_epoch = 1
    if checkpoint and Path(checkpoint).exists():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        if saved.get("fingerprint") == key:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            torch.set_rng_state(saved["rng"])
            result = TrainResult(saved["history"], saved["best_epoch"], saved["best_state"])
            start_epoch = saved["epoch"] + 1
            log.info("resuming from %s after epoch %d", checkpoint, saved["epoch"])
            for row in result.history:
                if on_epoch:
                    on_epoch(row)
        else:
            log.info("ignoring %s: it belongs to other params or data", checkpoint)

    for epoch in range(start_epoch, params.epochs + 1):
        model.train()
        state = None
        total_loss = 0.0
        total_tokens = 0
        started = time.perf_counter()
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{params.epochs}", unit="step", file=sys.stderr,
                   mininterval=1 if sys.stderr.isatty() else 30, disable=steps < 2)
        for step in bar:
            batch = data[step].to(device, non_blocking=True).long()
            inp, tgt = batch[:, :-1], batch[:, 1:]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                feats, state = model.features(inp, state)
                loss, count = model.loss(feats, tgt)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), params.clip)
            optimizer.step()
            state = detach_state(state)
            total_loss += loss.item() * count
            total_tokens += count
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        seconds = time.perf_counter() - started
        val = evaluate(model, val_windows, vocab, eval_batch_size, device)
        row = {
            "epoch": epoch,
            "train_loss": total_loss / max(total_tokens, 1),
            "train_perplexity": math.exp(total_loss / max(total_tokens, 1)),
            "val_loss": val["nll"],
            "val_perplexity": val["perplexity"],
            "val_top3": val["top3"],
            "tokens_per_second": total_tokens / max(seconds, 1e-9),
            "seconds": seconds,
        }
        log.info("epoch %d: train loss %.4f, val perplexity %.2f, %.0f tokens/s",
                 epoch, row["train_loss"], row["val_perplexity"], row["tokens_per_second"])
        result.history.append(row)
        if result.best_state is None or val["nll"] < result.history[result.best_epoch - 1]["val_loss"]:
            result.best_epoch = epoch
            result.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        if on_epoch:
            on_epoch(row)
        if checkpoint:
            with atomic_path(checkpoint) as tmp:
                torch.save(
                    {
                        "fingerprint": key,
                        "epoch": epoch,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "rng": torch.get_rng_state(),
                        "history": result.history,
                        "best_epoch": result.best_epoch,
                        "best_state": result.best_state,
                    },
                    tmp,
                )
    model.load_state_dict(result.best_state)
    return result
