"""Stage 6: perplexity, next-word accuracy and keystroke savings, as DVC metrics and in MLflow.

``reports/metrics.json`` holds what is reproducible: perplexity and top-1/top-3
on validation and test, and the keystroke savings rate (KSR) with
``evaluate.suggestions`` suggestions on the first ``evaluate.ksr_conversations``
test conversations. Keystroke latency depends on the machine, so it goes to
``reports/latency.json`` and MLflow, not into the metrics that `dvc exp show`
compares. The n-gram baseline's figures (from the baseline stage) go into the
same MLflow run with a ``baseline_`` prefix, so the two models sit side by side.
"""

import numpy as np
import pandas as pd

from nextword import stage, tracking
from nextword.engine import Engine
from nextword.files import read_json, write_json
from nextword.keystrokes import simulate
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

    e = params.evaluate
    messages = pd.read_parquet(args.messages)
    test = messages[messages["split"] == "test"]
    engine = Engine.load(args.model, options=params.engine)
    report = simulate(engine, test, k=e.suggestions, max_conversations=e.ksr_conversations or None)
    metrics["keystrokes"] = {
        "conversations": report.conversations,
        "words": report.words,
        "ksr": report.ksr,
        "top1": report.top1,
        "top3": report.top3,
    }
    latency = {k: getattr(report, k) for k in ("latency_p50_ms", "latency_p99_ms", "cpu_p50_ms", "cpu_p99_ms",
                                                "latency_keystrokes")}
    write_json(args.metrics, metrics)
    write_json(args.latency, latency)
    with tracking.resume_run(args.run) as mlflow:
        mlflow.log_metrics(flat_metrics(metrics, "lstm_"))  # not val_perplexity: that is the per-epoch curve
        mlflow.log_metrics(flat_metrics(baseline, "baseline_"))
        mlflow.log_metrics({f"keystroke_{k}": v for k, v in latency.items()})
        for path in (args.metrics, args.baseline, args.latency):
            mlflow.log_artifact(path, "reports")
    for name, figures in (("lstm", metrics), ("baseline", baseline)):
        for split in ("val", "test"):
            m = figures[split]
            print(f"{name} {split}: perplexity {m['perplexity']:.2f}, top-1 {m['top1']:.3f}, top-3 {m['top3']:.3f}")
    k = metrics["keystrokes"]
    print(f"keystrokes: KSR {k['ksr']:.3f} over {k['words']} words of {k['conversations']} test conversations, "
          f"latency p50 {latency['latency_p50_ms']:.2f} ms, p99 {latency['latency_p99_ms']:.2f} ms")


if __name__ == "__main__":
    stage.run(main, "model", "windows", "messages", "run", "baseline", "metrics", "latency", description=__doc__)
