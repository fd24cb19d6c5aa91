"""Stage 9: log the pipeline's results to MLflow, in the run their params belong to.

It depends on every param and on every report, so it reruns whenever anything
upstream changed. See ``nextword.tracking`` for which run that is.
"""

import csv

from nextword import stage, tracking
from nextword.files import read_json, write_json
from nextword.pyfunc import log_model


def flat_metrics(metrics: dict, prefix: str = "") -> dict:
    """``{"val": {"perplexity": ...}}`` -> ``{"<prefix>val_perplexity": ...}``, as MLflow keys."""
    return {f"{prefix}{split}_{k}": v for split, m in metrics.items() for k, v in m.items()}


def main(args, params):
    with tracking.final_run(params, args.run) as (run, opened_here):
        if opened_here:  # the training curves belong to this configuration too
            with open(args.curves, encoding="utf-8", newline="") as f:
                for row in csv.DictReader(f):
                    run.log_epoch({k: float(v) for k, v in row.items()} | {"epoch": int(row["epoch"])})
        run.log_metrics(flat_metrics(read_json(args.metrics), "lstm_"))  # not val_perplexity: the curve's name
        run.log_metrics(flat_metrics(read_json(args.baseline), "baseline_"))
        run.log_metrics({f"keystroke_{k}": v for k, v in read_json(args.latency).items()})
        for path in (args.metrics, args.baseline, args.latency, args.samples):
            run.log_artifact(path, "reports")
        run.log_artifact(args.curves, "plots")
        run.log_artifacts(args.model, "model")
        with tracking.store_lock():
            log_model(args.model)
        result = {"run_id": run.run_id, "tracking_uri": tracking.tracking_uri(),
                  "training_run_id": read_json(args.run)["run_id"]}
    write_json(args.out, result)
    print(f"MLflow run {result['run_id']} ({'new' if opened_here else 'the training run'})")


if __name__ == "__main__":
    stage.run(main, "model", "run", "curves", "metrics", "baseline", "latency", "samples", "out",
              description=__doc__)
