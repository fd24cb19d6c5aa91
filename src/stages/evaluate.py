"""Stage 6: perplexity and next-word accuracy on validation and test, as DVC metrics and in MLflow."""

import numpy as np

from nextword import stage, tracking
from nextword.files import write_json
from nextword.metrics import evaluate
from nextword.model import load_model_dir


def main(args, params):
    tracking.connect()
    model, vocab, _ = load_model_dir(args.model)
    metrics = {}
    for split in ("val", "test"):
        windows = np.load(f"{args.windows}/{split}.npy")
        metrics[split] = evaluate(model, windows, vocab, params.evaluate.batch_size)
    write_json(args.metrics, metrics)
    with tracking.resume_run(args.run) as mlflow:
        mlflow.log_metrics({f"{split}_{k}": v for split, m in metrics.items() for k, v in m.items()})
        mlflow.log_artifact(args.metrics, "reports")
    for split, m in metrics.items():
        print(f"{split}: perplexity {m['perplexity']:.2f}, top-1 {m['top1']:.3f}, top-3 {m['top3']:.3f}")


if __name__ == "__main__":
    stage.run(main, "model", "windows", "run", "metrics", description=__doc__)
