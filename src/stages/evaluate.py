"""Stage 6: perplexity and next-word accuracy on validation and test, as DVC metrics and in MLflow.

The n-gram baseline's figures (from the baseline stage) go into the same MLflow
run with a ``baseline_`` prefix, so the two models sit side by side.
"""

import numpy as np

from nextword import stage, tracking
from nextword.files import read_json, write_json
from nextword.metrics import evaluate
from nextword.model import load_model_dir


def flat_metrics(metrics: dict, prefix: str = "") -> dict:
    """``{"val": {"perplexity": ...}}`` -> ``{"<prefix>val_perplexity": ...}``, as MLflow keys."""
    return {f"{prefix}{split}_{k}": v for split, m in metrics.items() for k, v in m.items()}


def main(args, params):
    tracking.connect()
    baseline = read_json(args.baseline)
    model, vocab, _ = load_model_dir(args.model)
    metrics = {}
    for split in ("val", "test"):
        windows = np.load(f"{args.windows}/{split}.npy")
        metrics[split] = evaluate(model, windows, vocab, params.evaluate.batch_size)
    write_json(args.metrics, metrics)
    with tracking.resume_run(args.run) as mlflow:
        mlflow.log_metrics(flat_metrics(metrics, "lstm_"))  # not val_perplexity: that is the per-epoch curve
        mlflow.log_metrics(flat_metrics(baseline, "baseline_"))
        mlflow.log_artifact(args.metrics, "reports")
        mlflow.log_artifact(args.baseline, "reports")
    for name, figures in (("lstm", metrics), ("baseline", baseline)):
        for split, m in figures.items():
            print(f"{name} {split}: perplexity {m['perplexity']:.2f}, top-1 {m['top1']:.3f}, top-3 {m['top3']:.3f}")


if __name__ == "__main__":
    stage.run(main, "model", "windows", "run", "baseline", "metrics", description=__doc__)
