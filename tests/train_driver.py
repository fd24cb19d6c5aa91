"""A training run in its own process, for the resume and torchrun tests of test_training.py.

Usage: ``python train_driver.py DATA OUT SPEC``: trains on DATA/{train,val}.npy with
the JSON SPEC (``model`` and ``train`` settings, optional ``checkpoint`` and
``hang_after``) and saves the final weights and history to OUT.
"""

import json
import logging
import sys
import time

import numpy as np
import torch

from conftest import model_config, train_params
from nextword.model import LanguageModel
from nextword.training import finish_distributed, init_distributed, seed_everything, train
from nextword.vocab import Vocab

logging.basicConfig(level=logging.INFO, format="%(message)s")
data, out, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
rank = init_distributed("cpu")
seed_everything(3, threads=1)
vocab = Vocab.load(f"{data}/vocab.json")
windows = {s: np.load(f"{data}/{s}.npy") for s in ("train", "val")}
model = LanguageModel(model_config(len(vocab), **spec["model"]))


def on_epoch(row):
    print("finished epoch", row["epoch"], flush=True)
    if row["epoch"] == spec.get("hang_after"):
        time.sleep(600)  # killed here by the test


result = train(model, windows["train"], windows["val"], vocab, train_params(**spec["train"]), 8, seed=3,
               checkpoint=spec.get("checkpoint"), on_epoch=on_epoch)
finish_distributed()
if rank == 0:
    torch.save({"weights": model.state_dict(), "history": result.history, "best_epoch": result.best_epoch,
                "best_val": result.best_val}, out)
