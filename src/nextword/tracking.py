"""MLflow: every MLflow call of the project lives here.

Tracking defaults to ``sqlite:///<root>/mlflow.db`` with artifacts under
``<root>/mlartifacts``, where ``<root>`` is ``DVC_ROOT`` when DVC sets it (so
``dvc exp run --temp`` and ``--queue`` land in the same store as the
workspace) and the current folder otherwise. ``MLFLOW_TRACKING_URI``
overrides it. The train stage opens one run per pipeline execution, named
after ``DVC_EXP_NAME`` when DVC sets it, and writes its id to a DVC output;
evaluate and sample log into the same run.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from nextword.errors import NextwordError
from nextword.files import read_json, write_json

EXPERIMENT = "nextword"


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def connect():
    """Point MLflow at the store and make sure it answers, before any work is done."""
    # Fail fast instead of MLflow's default minutes of retries against a dead server.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        if mlflow.get_experiment_by_name(EXPERIMENT) is None:
            artifacts = None
            if uri.startswith("sqlite:"):
                artifacts = (project_root() / "mlartifacts").as_uri()
            mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts)
        mlflow.set_experiment(EXPERIMENT)
    except Exception as err:  # MLflow raises many types for an unreachable store
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NextwordError(f"MLflow tracking store {uri} is not reachable: {first[:200]}") from None
    return mlflow


@contextlib.contextmanager
def new_run(params: dict):
    """Open a new run for this pipeline execution; a failure inside marks it FAILED."""
    mlflow = connect()
    with mlflow.start_run(run_name=os.environ.get("DVC_EXP_NAME") or None) as run:
        mlflow.log_params(params)
        yield mlflow, run.info.run_id


def write_run_file(run_file: str | Path, run_id: str) -> None:
    write_json(run_file, {"run_id": run_id, "tracking_uri": tracking_uri()})


@contextlib.contextmanager
def resume_run(run_file: str | Path):
    """Log into the run that the train stage opened."""
    mlflow = connect()
    run_id = read_json(run_file)["run_id"]
    with mlflow.start_run(run_id=run_id):
        yield mlflow
