"""The MLflow pyfunc model: logged into a real sqlite store, registered, promoted, loaded back, served over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

mlflow = pytest.importorskip("mlflow")

from conftest import ENGINE, save_servable  # noqa: E402
from nextword.modeldir import load_trained  # noqa: E402
from nextword.errors import NextwordError  # noqa: E402
from nextword.pyfunc import log_model  # noqa: E402
from nextword.tracking import Run, promote, register, resolve_model  # noqa: E402


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, tiny_model_dir):
    """(tracking URI, run id) of a run holding the tiny model as ``suggester``, with "are" banned.

    The model is registered as version 1 of ``nextword``, the ``@champion``, as the pipeline's track
    stage and ``nextword promote`` leave it.
    """
    from mlflow.tracking._tracking_service import utils

    store = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{store}/mlflow.db"
    previous_uri, previous_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # what nextword.tracking reads
    try:
        experiment = mlflow.create_experiment("suggester", artifact_location=(store / "artifacts").as_uri())
        banned = store / "banned.txt"
        banned.write_text("are\n", encoding="utf-8")
        model, vocab, config = load_trained(tiny_model_dir)
        folder = store / "model"
        save_servable(folder, model, vocab, config, options=ENGINE.model_copy(update={"banned_words": str(banned)}))
        with mlflow.start_run(experiment_id=experiment) as run:
            info = log_model(folder)
            register(Run(mlflow, run.info.run_id), info.model_uri, {"ksr": 0.5, "ksr_words": 100, "test_data": "a"})
        assert promote() == "nextword version 1 is now @champion (there was none): test KSR 0.5000"
        yield uri, run.info.run_id
    finally:
        mlflow.set_tracking_uri(previous_uri)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


QUERY = pd.DataFrame({
    "text": ["good morning , how are ", "i am f", "what do you like to do for f"],
    "speaker": ["user", "agent", None],
    "k": [3, 1, 2],
})


def check_predictions(rows: list[dict]) -> None:
    assert rows[0]["suggestions"][0] == "you" and len(rows[0]["suggestions"]) == 3
    assert "are" not in rows[0]["suggestions"]  # the banned list travels with the model
    assert rows[1]["suggestions"] == ["fine"]
    assert rows[2]["suggestions"][0] == "fun" and len(rows[2]["suggestions"]) == 2
    assert all(0 <= p <= 1 for row in rows for p in row["probabilities"])


def test_logged_model_loads_and_predicts_without_pickles(logged_run):
    _, run_id = logged_run
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/suggester")
    check_predictions(model.predict(QUERY).to_dict("records"))
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/suggester"))
    files = [p.name for p in local.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert "weights.pt" in files and not [f for f in files if f.endswith((".pkl", ".pickle"))]


def test_the_logged_model_pins_what_its_folder_needs(logged_run):
    import onnxruntime
    import torch

    _, run_id = logged_run
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/suggester"))
    pinned = (local / "requirements.txt").read_text(encoding="utf-8").split()
    # The folder's step runs on ONNX Runtime (the default backend); its tokenizer is words, not pieces.
    assert ENGINE.backend == "onnx" and f"onnxruntime=={onnxruntime.__version__}" in pinned
    assert f"torch=={torch.__version__.split('+')[0]}" in pinned and f"mlflow=={mlflow.__version__}" in pinned
    assert not [r for r in pinned if r.startswith("sentencepiece")]


def test_the_logged_model_takes_the_text_after_the_cursor(logged_run):
    from nextword.engine import Engine

    _, run_id = logged_run
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/suggester")
    query = pd.DataFrame({"text": ["i am ", "what do you like to "], "right": [" , thank you", None]})
    rows = model.predict(query).to_dict("records")
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/suggester"))
    engine = Engine.load(next(local.rglob("engine.json")).parent)
    for row, (text, right) in zip(rows, [("i am ", " , thank you"), ("what do you like to ", "")]):
        session = engine.session()
        session.type_text("user", text)
        expected = session.suggest("", 3, right=right)
        assert row["suggestions"] == [s.word for s in expected]
        assert row["probabilities"] == pytest.approx([s.probability for s in expected])
    assert rows[0]["suggestions"][0] == "fine"


def test_mlflow_models_serve_answers_over_http(logged_run, tmp_path):
    uri, run_id = logged_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # `--env-manager local` runs uvicorn from this environment: put its scripts on PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/nextword@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow models serve did not come up: {(tmp_path / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.5)
        body = {"dataframe_split": json.loads(QUERY.to_json(orient="split", index=False))}
        request = urllib.request.Request(f"{base}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            check_predictions(json.loads(response.read())["predictions"])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the uvicorn it started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_promotion_needs_a_better_ksr_on_the_same_test_data(logged_run):
    from mlflow import MlflowClient

    uri, run_id = logged_run
    client = MlflowClient(uri)
    model_uri = client.get_model_version("nextword", "1").source

    def challenger(**tags):
        return register(Run(mlflow, run_id), model_uri, {"ksr": 0.5, "ksr_words": 100, "test_data": "a"} | tags)

    def champion() -> str:
        return str(client.get_model_version_by_alias("nextword", "champion").version)

    worse = challenger(ksr=0.4)
    with pytest.raises(NextwordError, match=f"not promoted: version {worse} .* KSR 0.4000, not above version 1"):
        promote()
    assert champion() == "1"
    elsewhere = challenger(ksr=0.9, test_data="b")
    with pytest.raises(NextwordError, match="measured on different test data"):
        promote()
    assert champion() == "1"
    better = challenger(ksr=0.6)
    assert promote().startswith(f"nextword version {better} is now @champion from version 1")
    assert promote(force=True) == f"nextword version {better} is already @champion"
    challenger(ksr=0.1)
    assert promote(force=True).endswith("(forced)") and champion() != better
    # the registry's champion is a model folder for every command
    assert (resolve_model("models:/nextword@champion") / "engine.json").is_file()
    with pytest.raises(NextwordError, match="models:/nextword@nobody: cannot be loaded"):
        resolve_model("models:/nextword@nobody")
    assert elsewhere != better
