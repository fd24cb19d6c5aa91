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
generator that the training seed has fixed. Every final run records the git
commit and, as MLflow dataset inputs, the data files the model trained and was
evaluated on with their DVC hashes from ``dvc.lock``.

The model registry: the track stage registers the servable model as a new
version of the registered model ``nextword`` (linked to its run), points the
alias ``@challenger`` at it and tags it with its test KSR, perplexity, commit
and test data. ``nextword promote`` (:func:`promote`) moves ``@champion`` to the
challenger only when the challenger's KSR beats the champion's on the same test
data. Every command that takes ``--model`` also takes ``models:/nextword@champion``
(:func:`resolve_model`).
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
from nextword.errors import NextwordError, first_line
from nextword.files import read_json, write_json

EXPERIMENT = "nextword"
REGISTERED_MODEL = "nextword"
CHALLENGER, CHAMPION = "challenger", "champion"
PARAMS_HASH_TAG = "nextword.params_hash"
TRAINING_RUN_TAG = "nextword.training_run"
# The experiment page opens on its training runs, not on the GenAI traces view.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


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
                mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts, tags=EXPERIMENT_TAGS)
            mlflow.set_experiment(EXPERIMENT)
    except Exception as err:  # MLflow raises many types for an unreachable store
        raise NextwordError(f"MLflow tracking store {uri} is not reachable: {first_line(err)}") from None
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
        """One row of the training curves, with ``step`` = epoch; a value not measured (None) is left out."""
        self.log_metrics({k: v for k, v in row.items() if k != "epoch" and v is not None}, step=row["epoch"])

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


def git_commit(root: Path | None = None) -> str:
    """The commit of the checkout a stage runs in ("unknown" outside git)."""
    import subprocess

    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root or Path.cwd(), capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def lock_hashes(stage: str, lock_file: str | Path = "dvc.lock") -> dict[str, str]:
    """``{path: md5}`` of the data files a stage read, from DVC's lock file (code files left out)."""
    import yaml

    stages = yaml.safe_load(Path(lock_file).read_text(encoding="utf-8")).get("stages", {})
    return {dep["path"]: dep.get("md5", "") for dep in stages.get(stage, {}).get("deps", [])
            if not dep["path"].startswith("src/")}


def log_data_inputs(run: Run, inputs: dict[str, dict[str, str]]) -> None:
    """Each data file as an MLflow dataset input, its DVC hash as the digest; ``inputs``: context -> files."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    with store_lock():
        for context, files in inputs.items():
            for path, md5 in files.items():
                dataset = MetaDataset(LocalArtifactDatasetSource(path), name=path, digest=md5[:36] or None)
                run.mlflow.log_input(dataset, context=context)


def register(run: Run, model_uri: str, tags: dict) -> str:
    """Register ``model_uri`` as a new version of ``nextword`` from ``run``, make it ``@challenger``; its version."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri())
    with store_lock():
        version = run.mlflow.register_model(model_uri, REGISTERED_MODEL, tags={k: str(v) for k, v in tags.items()})
        client.set_registered_model_alias(REGISTERED_MODEL, CHALLENGER, version.version)
    return str(version.version)


def resolve_model(model: str) -> Path:
    """A model folder, or a registered model URI (``models:/nextword@champion``, ``runs:/<id>/suggester``).

    A URI is downloaded from the tracking store; the servable folder is the pyfunc model's
    ``model`` artifact.
    """
    if not model.startswith(("models:/", "runs:/")):
        return Path(model)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
    except Exception as err:  # MLflow raises its own and the store's exceptions for an unknown name or alias
        raise NextwordError(f"{model}: cannot be loaded from {tracking_uri()}: {first_line(err)}") from None
    folder = local / "artifacts" / "model"
    if not folder.is_dir():
        raise NextwordError(f"{model}: not a nextword model (no artifacts/model in it)")
    return folder


def promote(force: bool = False) -> str:
    """Move ``@champion`` to ``@challenger`` if its test KSR is higher on the same test data; say what happened.

    Raises NextwordError, changing nothing, when the challenger does not beat the
    champion or the two were measured on different test data (``force`` overrides both).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    connect()
    client = MlflowClient(tracking_uri())
    name = REGISTERED_MODEL

    def by_alias(alias: str):
        try:
            return client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None

    challenger, champion = by_alias(CHALLENGER), by_alias(CHAMPION)
    if challenger is None:
        raise NextwordError(f"no {name}@{CHALLENGER} in {tracking_uri()}; run the pipeline first")
    new = challenger.tags
    if champion is not None and champion.version == challenger.version:
        return f"{name} version {challenger.version} is already @{CHAMPION}"
    if champion is not None and not force:
        old = champion.tags
        if (old.get("test_data"), old.get("ksr_words")) != (new.get("test_data"), new.get("ksr_words")):
            raise NextwordError(
                f"not promoted: version {champion.version} (@{CHAMPION}) and version {challenger.version} "
                f"(@{CHALLENGER}) were measured on different test data; evaluate both on the same split, "
                "or use --force")
        if float(new["ksr"]) <= float(old["ksr"]):
            raise NextwordError(
                f"not promoted: version {challenger.version} (@{CHALLENGER}) has test KSR {float(new['ksr']):.4f}, "
                f"not above version {champion.version} (@{CHAMPION}) at {float(old['ksr']):.4f}; use --force to "
                "promote it anyway")
    with store_lock():
        client.set_registered_model_alias(name, CHAMPION, challenger.version)
    before = f"from version {champion.version}" if champion is not None else "(there was none)"
    return (f"{name} version {challenger.version} is now @{CHAMPION} {before}: test KSR {float(new['ksr']):.4f}"
            + (" (forced)" if force else ""))
