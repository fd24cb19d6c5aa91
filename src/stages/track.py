"""Stage 9: log the pipeline's results to MLflow, in the run their params belong to, and register the model.

It depends on every param and on every report, so it reruns whenever anything
upstream changed. See ``nextword.tracking`` for which run that is, and for the
registry: each execution registers the servable model as a new version of
``nextword`` and points ``@challenger`` at it.
"""

import csv

from nextword import stage, tracking
from nextword.files import read_json, write_json
from nextword.pyfunc import log_model


def flat_metrics(metrics: dict, prefix: str = "") -> dict:
    """``{"val": {"perplexity": ...}}`` -> ``{"<prefix>val_perplexity": ...}``, as MLflow keys."""
    return {f"{prefix}{split}_{k}": v for split, m in metrics.items() for k, v in m.items()}


def main(args, params):
    metrics = read_json(args.metrics)
    commit = tracking.git_commit()
    with tracking.final_run(params, args.run) as (run, opened_here):
        if opened_here:  # the training curves belong to this configuration too
            with open(args.curves, encoding="utf-8", newline="") as f:
                for row in csv.DictReader(f):
                    # An empty cell is a figure that epoch did not measure (val_top3 before the last).
                    run.log_epoch({k: float(v) if v else None for k, v in row.items()} | {"epoch": int(row["epoch"])})
        run.log_metrics(flat_metrics(metrics, "lstm_"))  # not val_perplexity: the per-epoch curve's name
        run.log_metrics(flat_metrics(read_json(args.baseline), "baseline_"))
        run.log_metrics({f"keystroke_{k}": v for k, v in read_json(args.latency).items()})
        for path in (args.metrics, args.baseline, args.latency, args.samples):
            run.log_artifact(path, "reports")
        run.log_artifact(args.curves, "plots")
        run.log_artifact(args.parts, "plots")
        run.log_artifacts(args.model, "model")
        evaluated = tracking.lock_hashes("evaluate")
        tracking.log_data_inputs(run, {"training": tracking.lock_hashes("train"), "evaluation": evaluated})
        with tracking.store_lock():
            run.mlflow.set_tag("git_commit", commit)
            info = log_model(args.model)
        keystrokes = metrics["keystrokes"]
        version = tracking.register(run, info.model_uri, {
            "ksr": keystrokes["ksr"], "ksr_words": keystrokes["words"], "test_perplexity": metrics["test"]["perplexity"],
            "git_commit": commit, "test_data": evaluated.get("data/interim/messages.parquet", "unknown"),
        })
        result = {"run_id": run.run_id, "tracking_uri": tracking.tracking_uri(),
                  "training_run_id": read_json(args.run)["run_id"],
                  "registered_model": tracking.REGISTERED_MODEL, "version": version}
    write_json(args.out, result)
    print(f"MLflow run {result['run_id']} ({'new' if opened_here else 'the training run'}); "
          f"{tracking.REGISTERED_MODEL} version {version} is @{tracking.CHALLENGER}")


if __name__ == "__main__":
    stage.run(main, "model", "run", "curves", "metrics", "baseline", "latency", "samples", "parts", "out",
              description=__doc__)
