"""MLflow: every MLflow call of the project lives here.

Tracking defaults to ``sqlite:///<root>/mlflow.db`` with artifacts under
``<root>/mlartifacts``, where ``<root>`` is ``DVC_ROOT`` when DVC sets it (DVC
points it at the main workspace, so ``dvc exp run --temp`` and ``--queue`` land
in the same store as the workspace) and the current folder otherwise.
``MLFLOW_TRACKING_URI`` overrides it.

One run per configuration, and its params and metrics always belong together:

* The train stage opens a run, logs every param and the per-epoch curves while
  it trains, and tags the run with a hash of the params.
* The track stage, the pipeline's last, logs the final metrics, reports, model
  folder and servable model. When the params are still those the training run
  was opened with, it logs into that run. When only later stages reran (an
  ``engine``, ``evaluate`` or ``sample`` param changed), it opens a new run with
  the current params, the training curves copied from ``reports/epochs.csv``,
  and a tag naming the training run: the old run keeps the figures of its own
  params.

Several pipelines may write one SQLite store at once (``dvc queue start -j
2``). MLflow's SQLite store races when two processes create its schema or an
experiment at the same moment, and a writer can meet "database is locked", so
every write to a local SQLite store holds a lock file beside it: the writers
take turns, each for the milliseconds a write takes.

Runs are named after the DVC experiment (``DVC_EXP_NAME``), and otherwise
``<preset>-<date>-<time>``; the name is chosen here, never drawn from a random
generator that the training seed has fixed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator

from filelock import FileLock

from nextword.config import Params, flatten
from nextword.errors import NextwordError
from nextword.files import read_json, write_json

EXPERIMENT = "nextword"
PARAMS_HASH_TAG = "nextword.params_hash"
TRAINING_RUN_TAG = "nextword.training_run"


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def store_lock() -> contextlib.AbstractContextManager:
    """Exclusive access to a local SQLite store for one write (a no-op for a tracking server)."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    return FileLock(uri[len("sqlite:///"):] + ".lock", timeout=600)


def params_hash(params: Params) -> str:
    flat = json.dumps(flatten(params), sort_keys=True, default=str)
    return hashlib.blake2b(flat.encode(), digest_size=12).hexdigest()


def run_name(params: Params) -> str:
    return os.environ.get("DVC_EXP_NAME") or f"{params.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def connect():
    """Point MLflow at the store, create it and the experiment once, and check it answers."""
    # Fail fast instead of MLflow's default minutes of retries against a dead server.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with store_lock():
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


class Run:
    """An open MLflow run; every write holds the store's lock."""

    def __init__(self, mlflow, run_id: str):
        self.mlflow = mlflow
        self.run_id = run_id

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        with store_lock():
            self.mlflow.log_metrics(metrics, step=step)

    def log_epoch(self, row: dict) -> None:
        """One row of the training curves, with ``step`` = epoch."""
        self.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])

    def log_artifact(self, path, folder: str) -> None:
        with store_lock():
            self.mlflow.log_artifact(str(path), folder)

    def log_artifacts(self, path, folder: str) -> None:
        with store_lock():
            self.mlflow.log_artifacts(str(path), folder)


@contextlib.contextmanager
def _run(mlflow, **start) -> Iterator[Run]:
    with store_lock():
        run = mlflow.start_run(**start)
    status = "FAILED"
    try:
        yield Run(mlflow, run.info.run_id)
        status = "FINISHED"
    finally:
        with store_lock():
            mlflow.end_run(status)


@contextlib.contextmanager
def training_run(params: Params) -> Iterator[Run]:
    """A new run for a training: every param, the params' hash; a failure inside marks it FAILED."""
    mlflow = connect()
    with _run(mlflow, run_name=run_name(params), tags={PARAMS_HASH_TAG: params_hash(params)}) as run:
        with store_lock():
            mlflow.log_params(flatten(params))
        yield run


def write_run_file(run_file: str | Path, run_id: str) -> None:
    write_json(run_file, {"run_id": run_id, "tracking_uri": tracking_uri()})


@contextlib.contextmanager
def final_run(params: Params, run_file: str | Path) -> Iterator[tuple[Run, bool]]:
    """The run that the pipeline's final figures belong to, and whether it was opened here.

    That is the training run when its params are the current ones, and otherwise a
    new run with the current params, tagged with the training run's id.
    """
    mlflow = connect()
    training_id = read_json(run_file)["run_id"]
    wanted = params_hash(params)
    try:
        with store_lock():
            tags = mlflow.get_run(training_id).data.tags
    except Exception:  # the training run is not in this store (another machine's store, a deleted run)
        tags = {}
    if tags.get(PARAMS_HASH_TAG) == wanted:
        with _run(mlflow, run_id=training_id) as run:
            yield run, False
        return
    with _run(mlflow, run_name=run_name(params),
              tags={PARAMS_HASH_TAG: wanted, TRAINING_RUN_TAG: training_id}) as run:
        with store_lock():
            mlflow.log_params(flatten(params))
        yield run, True
