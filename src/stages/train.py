"""Stage 5: train the language model; log params and per-epoch metrics to a new MLflow run."""

import csv
import io

import numpy as np

from nextword import stage, tracking
from nextword.config import flatten
from nextword.errors import NextwordError
from nextword.files import write_text
from nextword.model import LanguageModel, ModelConfig, save_model_dir
from nextword.training import seed_everything, train
from nextword.vocab import Vocab


def main(args, params):
    tracking.connect()  # an unreachable store fails here, not after training
    seed_everything(params.seed, params.train.threads)
    vocab = Vocab.load(args.vocab)
    windows = {s: np.load(f"{args.windows}/{s}.npy") for s in ("train", "val")}
    for split, key in (("train", "data.split"), ("val", "data.split.val")):
        if len(windows[split]) == 0:
            raise NextwordError(f"the {split} split has no windows; check {key} and the data")
    m = params.model
    config = ModelConfig(vocab_size=len(vocab), embedding=m.embedding, hidden=m.hidden, layers=m.layers,
                         dropout=m.dropout, cell=m.cell, tie_weights=m.tie_weights,
                         adaptive_softmax=m.adaptive_softmax, cutoffs=tuple(m.cutoffs))
    model = LanguageModel(config)
    with tracking.new_run(flatten(params)) as (mlflow, run_id):
        def log_epoch(row):
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])

        result = train(model, windows["train"], windows["val"], vocab, params.train, params.evaluate.batch_size,
                       params.seed, checkpoint=args.checkpoint, on_epoch=log_epoch)
        model.cpu()
        save_model_dir(args.model, model, vocab, {
            "speaker_tags": params.window.speaker_tags,
            "window_length": params.window.length,
            "best_epoch": result.best_epoch,
        })
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(result.history[0]))
        writer.writeheader()
        writer.writerows(result.history)
        write_text(args.curves, out.getvalue())
        mlflow.log_metric("best_epoch", result.best_epoch)
        mlflow.log_artifacts(args.model, "model")
        mlflow.log_artifact(args.curves, "plots")
        tracking.write_run_file(args.run, run_id)
    print(f"{args.model}: best epoch {result.best_epoch} of {len(result.history)}")


if __name__ == "__main__":
    stage.run(main, "vocab", "windows", "model", "checkpoint", "curves", "run", description=__doc__)
