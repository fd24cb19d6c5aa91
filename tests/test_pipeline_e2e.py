"""End to end: the real `dvc` in a temporary git repository, the real MLflow store it writes.

Copies the project, composes the toy preset, runs `dvc repro`, then
`dvc exp run -S corpus=toy -S model.layers=2`, and checks `dvc exp show
--json`, the MLflow runs (params, per-epoch metrics, artifacts) and that a
change of `sample.temperature` reruns only the `sample` stage.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    repo = tmp_path_factory.mktemp("e2e") / "project"
    for name in project_files():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env["DVC_NO_ANALYTICS"] = "1"

    def run(*args, check=True):
        proc = subprocess.run(list(args), cwd=repo, env=env, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    run("git", "init", "-q")
    run("git", "config", "user.email", "test@example.com")
    run("git", "config", "user.name", "test")
    run(sys.executable, "-m", "nextword.cli", "params", "toy")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "toy preset")
    return SimpleNamespace(path=repo, run=run)


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


def walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def test_repro_then_experiment_then_temperature(project):
    repo = project.path
    dvc = lambda *args: project.run(sys.executable, "-m", "dvc", *args)  # noqa: E731
    first = dvc("repro")
    assert {"ingest", "tokenize", "vocab", "window", "baseline", "train", "evaluate", "sample"} <= set(
        stages_run(first.stdout))
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    for split in ("val", "test"):
        assert metrics[split]["tokens"] > 0 and 1 < metrics[split]["perplexity"] < 10_000
        assert 0 <= metrics[split]["top1"] <= metrics[split]["top3"] <= 1
    assert metrics["keystrokes"]["words"] > 0 and 0 <= metrics["keystrokes"]["ksr"] < 1
    assert json.loads((repo / "reports/latency.json").read_text())["latency_p99_ms"] > 0
    curves = (repo / "reports/epochs.csv").read_text().splitlines()
    assert curves[0].startswith("epoch,") and len(curves) == 31  # header + 30 epochs of the toy preset
    assert "## 1." in (repo / "reports/samples.md").read_text()
    assert (repo / "models/model/ngram.npz").is_file()  # the engine's n-gram, fitted by the train stage
    assert dvc("status").stdout.strip().endswith("up to date.")
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "toy baseline results")

    # an experiment with two layers: data stages are cached, train/evaluate/sample rerun
    exp = dvc("exp", "run", "-n", "two-layers", "-S", "corpus=toy", "-S", "model.layers=2")
    ran = set(stages_run(exp.stdout))
    assert {"train", "evaluate", "sample"} <= ran and not ran & {"ingest", "tokenize", "vocab", "window", "baseline"}
    shown = json.loads(dvc("exp", "show", "--json").stdout)
    layers = {}
    for node in walk(shown):
        data = node.get("data") if isinstance(node.get("data"), dict) else None
        if data and "params" in data and data.get("metrics"):
            p = data["params"]["params.yaml"]["data"]
            m = data["metrics"].get("reports/metrics.json", {}).get("data")
            if m:
                layers[p["model"]["layers"]] = m["test"]["perplexity"]
    assert set(layers) == {1, 2}, shown

    # only sample.temperature changes: only `sample` reruns
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["sample"]["temperature"] = 0.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(dvc("repro").stdout) == ["sample"]
    # an engine setting reruns what suggests (evaluate, sample), not the training
    params["engine"]["cache_weight"] = 0.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert sorted(stages_run(dvc("repro").stdout)) == ["evaluate", "sample"]

    # the MLflow store under the repository root holds every run, with the experiment's name
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("nextword")
    assert experiment.artifact_location.startswith((repo / "mlartifacts").as_uri())
    runs = client.search_runs([experiment.experiment_id])
    # one run per training; the sample-only rerun logs into the run of the model it sampled from
    assert len(runs) == 2
    by_name = {r.info.run_name: r for r in runs}
    assert "two-layers" in by_name
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["preset"] == "toy" and run.data.params["window.length"] == "5"
        history = client.get_metric_history(run.info.run_id, "val_perplexity")
        assert [m.step for m in history] == list(range(1, 31))
        assert {"lstm_test_perplexity", "lstm_test_top3", "baseline_test_perplexity"} <= set(run.data.metrics)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
        assert {"model/weights.pt", "model/vocab.json", "model/config.json", "model/ngram.npz"} <= artifacts
        assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/epochs.csv"]
        assert "reports/samples.md" in {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert by_name["two-layers"].data.params["model.layers"] == "2"
    # the train stage logged a servable model into its run
    import mlflow.pyfunc

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    suggester = mlflow.pyfunc.load_model(f"runs:/{by_name['two-layers'].info.run_id}/suggester")
    import pandas as pd

    out = suggester.predict(pd.DataFrame({"text": ["the quick "], "speaker": ["user"], "k": [3]}))
    assert len(out["suggestions"][0]) == 3
    assert by_name["two-layers"].data.metrics["lstm_test_perplexity"] == pytest.approx(layers[2])


def test_unreachable_tracking_server_fails_the_stage_at_once(project):
    env = dict(os.environ, MLFLOW_TRACKING_URI="http://127.0.0.1:9", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(
        [sys.executable, "src/stages/train.py", "--vocab", "data/processed/vocab.json", "--windows",
         "data/processed/windows", "--banned", "data/banned_words.txt", "--model", "/tmp/never", "--checkpoint", "/tmp/never.pt", "--curves",
         "/tmp/never.csv", "--run", "/tmp/never.json"],
        cwd=project.path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: MLflow tracking store http://127.0.0.1:9 is not reachable")
    assert "Traceback" not in proc.stderr
    assert not Path("/tmp/never").exists()
