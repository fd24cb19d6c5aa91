"""Stage 5: train the language model into the trained model folder; log params and curves to a new MLflow run.

The checkpoint serves only to finish an interrupted run (see ``nextword.training``):
it is deleted once the model is written, so whenever DVC reruns this stage it
trains from scratch.

With ``train.processes`` > 1, or ``PET_NNODES`` set for several machines, the
stage relaunches itself under torchrun's launcher (see ``nextword.training``);
every rank trains, and rank 0 alone logs and writes the outputs.
"""

import csv
import io
import os
import sys
from pathlib import Path

import numpy as np

from nextword import stage, tracking
from nextword.config import ModelConfig
from nextword.errors import NextwordError
from nextword.files import write_text
from nextword.model import LanguageModel
from nextword.modeldir import save_trained
from nextword.tokenizer import Tokenizer
from nextword.training import (autocast_dtype, finish_distributed, init_distributed, resolve_device, seed_everything,
                               train)
from nextword.vocab import Vocab


def several_machines() -> bool:
    return os.environ.get("PET_NNODES", "1") not in ("1", "1:1")


def relaunch_under_torchrun(processes: int) -> None:
    """Run this script again as ``processes`` workers on this machine, as torchrun does.

    torchrun's launcher is called in-process rather than as a command because
    its command line refuses this stage's ``--run`` (a prefix of its ``--run-path``).
    Its other settings come from ``PET_*`` variables (``PET_NNODES``, ``PET_NODE_RANK``,
    ``PET_RDZV_ENDPOINT``, ...), as for torchrun itself.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    launch = get_args_parser().parse_args([f"--nproc-per-node={processes}", __file__])
    launch.training_script_args = sys.argv[1:]
    try:
        run(launch)
    except ChildFailedError as err:
        raise NextwordError(f"a training process failed: {err.get_first_failure()[1].message}") from None


def main(args, params):
    launched = "LOCAL_RANK" in os.environ
    if (params.train.processes > 1 or several_machines()) and not launched:
        tracking.connect()  # an unreachable store fails here, before any process starts
        relaunch_under_torchrun(params.train.processes)
        return
    rank = init_distributed(params.train.device)
    # A precision this machine cannot train in is refused here, before the MLflow run is opened.
    autocast_dtype(params.train.precision, resolve_device(params.train.device, int(os.environ.get("LOCAL_RANK", "0"))))
    if rank == 0:
        tracking.connect()  # an unreachable store fails here, not after training
    seed_everything(params.seed, params.train.threads)
    vocab = Vocab.load(args.vocab)
    tokenizer = Tokenizer.load(args.tokenizer)  # copied into the model folder
    windows = {s: np.load(f"{args.windows}/{s}.npy") for s in ("train", "val")}
    for split, key in (("train", "data.split"), ("val", "data.split.val")):
        if len(windows[split]) == 0:
            raise NextwordError(f"the {split} split has no windows; check {key} and the data")
    model = LanguageModel(ModelConfig(vocab_size=len(vocab), **params.model.model_dump()))
    if rank:
        train(model, windows["train"], windows["val"], vocab, params.train, params.evaluate.batch_size, params.seed)
        finish_distributed()
        return
    with tracking.training_run(params) as run:
        result = train(model, windows["train"], windows["val"], vocab, params.train, params.evaluate.batch_size,
                       params.seed, checkpoint=args.checkpoint, on_epoch=run.log_epoch)
        finish_distributed()
        save_trained(args.model, model.cpu(), vocab, {
            "speaker_tags": params.window.speaker_tags,
            "window_length": params.window.length,
            "best_epoch": result.best_epoch,
            "validation": result.best_val,  # its scores, which the evaluate stage reports
        }, tokenizer)
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(result.history[0]))
        writer.writeheader()
        writer.writerows(result.history)
        write_text(args.curves, out.getvalue())
        run.log_metrics({"best_epoch": result.best_epoch})
        tracking.write_run_file(args.run, run.run_id)
    Path(args.checkpoint).unlink(missing_ok=True)  # finished: a rerun of this stage trains from scratch
    print(f"{args.model}: best epoch {result.best_epoch} of {len(result.history)}")


if __name__ == "__main__":
    stage.run(main, "vocab", "tokenizer", "windows", "model", "checkpoint", "curves", "run", description=__doc__)
