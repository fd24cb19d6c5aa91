"""End to end: the real `dvc` in a temporary git repository, the real MLflow store it writes.

Copies the project into a fresh git repository with the toy preset and runs the
pipeline as a user would: `dvc repro`, `dvc exp run -S ...`, param changes, a
code change and a colleague's `dvc pull` (queued experiments: test_queue_e2e.py). Each test checks what DVC reports against what the outputs, the MLflow
store and every serving surface (CLI, web API, MLflow model) hold.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dvc_project import all_runs, make_project, mlflow_client
from nextword.modeldir import load_trained

DATA_STAGES = {"ingest", "tokenize", "vocab", "window", "baseline"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("e2e") / "project")


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


def set_params(repo: Path, **changes) -> None:
    """Change ``section.key`` values of params.yaml, as a user editing it would."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def samples_top(repo: Path, prompt_number: int) -> list[tuple[str, str]]:
    """The next-word list the sample stage wrote for one prompt: (word, probability to 3 decimals)."""
    text = (repo / "reports/samples.md").read_text()
    block = text.split(f"## {prompt_number}. ")[1].split("Completions:")[0]
    return re.findall(r"^- (\S+) \((\d\.\d{3})\)$", block, flags=re.M)


def test_repro_then_experiments_then_param_changes(project):
    repo, dvc = project.path, project.dvc
    first = dvc("repro")
    assert DATA_STAGES | {"train", "bundle", "evaluate", "sample", "track"} <= set(stages_run(first.stdout))
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    for split in ("val", "test"):
        assert metrics[split]["tokens"] > 0 and 1 < metrics[split]["perplexity"] < 10_000
        assert 0 <= metrics[split]["top1"] <= metrics[split]["top3"] <= 1
    assert metrics["keystrokes"]["words"] > 0 and 0 <= metrics["keystrokes"]["ksr"] < 1
    folder = sum(f.stat().st_size for f in (repo / "models/model").rglob("*") if f.is_file())
    assert metrics["size"]["folder_bytes"] == folder and metrics["size"]["parameters"] == sum(
        p.numel() for p in load_trained(repo / "models/model")[0].parameters())
    assert json.loads((repo / "reports/latency.json").read_text())["latency_p99_ms"] > 0
    curves = (repo / "reports/epochs.csv").read_text().splitlines()
    assert curves[0].startswith("epoch,") and len(curves) == 31  # header + 30 epochs of the toy preset
    assert "## 1." in (repo / "reports/samples.md").read_text()
    assert {"ngram.npz", "engine.json", "banned_words.txt"} <= {p.name for p in (repo / "models/model").iterdir()}
    assert not (repo / "models/checkpoint.pt").exists()  # only an interrupted run leaves one
    assert dvc("status").stdout.strip().endswith("up to date.")
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "toy results")
    nextword = lambda *args, **kw: project.run(sys.executable, "-m", "nextword.cli", *args, **kw)  # noqa: E731
    assert nextword("promote").stdout.startswith("nextword version 1 is now @champion (there was none)")

    # an experiment with two layers: data stages are cached, the model and what follows rerun
    exp = dvc("exp", "run", "-n", "two-layers", "-S", "corpus=toy", "-S", "model.layers=2")
    ran = set(stages_run(exp.stdout))
    assert {"train", "bundle", "evaluate", "sample", "track"} <= ran and not ran & DATA_STAGES
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

    nextword("promote", check=False)  # promoted or not, as its KSR says; the next one is decided below

    # only sample.temperature changes: only `sample` reruns, then the run is logged
    set_params(repo, **{"sample.temperature": 0.5})
    assert stages_run(dvc("repro").stdout) == ["sample", "track"]
    # the same model and engine as version 2, so the same KSR: never a promotion, and the champion stays
    champion = mlflow_client(repo).get_model_version_by_alias("nextword", "champion").version
    refused = nextword("promote", check=False)
    assert refused.returncode == 2 and refused.stderr.startswith("error: not promoted: version 3 (@challenger)")
    assert mlflow_client(repo).get_model_version_by_alias("nextword", "champion").version == champion
    # an engine setting reruns what serves (bundle, evaluate, sample), not the training
    set_params(repo, **{"engine.cache_weight": 0.0})
    assert sorted(stages_run(dvc("repro").stdout)) == ["bundle", "evaluate", "sample", "track"]

    # Every configuration is its own MLflow run, whose params and metrics belong together.
    runs = all_runs(repo)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.info.run_name for r in runs}) == 4  # a plain `dvc repro` gets a name of its own too
    client = mlflow_client(repo)
    experiment = client.get_experiment_by_name("nextword")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the runs
    for run in runs:
        assert run.data.params["preset"] == "toy" and run.data.params["window.length"] == "5"
        assert re.fullmatch(r"[0-9a-f]{40}", run.data.tags["git_commit"])
        # what it trained on, as dataset inputs named by path, with DVC's hashes as digests
        inputs = {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}
        assert {"data/processed/vocab.json", "data/processed/windows", "data/interim/messages.parquet"} <= set(inputs)
        assert all(re.fullmatch(r"[0-9a-f]{32}(\.dir)?", digest) for digest in inputs.values()), inputs
        history = client.get_metric_history(run.info.run_id, "val_perplexity")
        assert [m.step for m in history] == list(range(1, 31))
        # validation's top-3 is ranked after the last epoch only (nextword.training)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_top3")] == [30]
        assert {"lstm_test_perplexity", "lstm_test_top3", "baseline_val_perplexity", "baseline_test_perplexity",
                "baseline_test_top3", "lstm_keystrokes_ksr"} <= set(run.data.metrics)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
        assert {"model/weights.pt", "model/engine.json", "model/ngram.npz"} <= artifacts
        assert "reports/samples.md" in {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    by_name = {r.info.run_name: r for r in runs}
    assert by_name["two-layers"].data.metrics["lstm_test_perplexity"] == pytest.approx(layers[2])
    plain_repro = [r for r in runs if r.info.run_name.startswith("toy-")]
    assert len(plain_repro) == 3  # the first repro and the two param changes after the experiment
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    latest_inputs = {i.dataset.name: i.dataset.digest for i in client.get_run(
        json.loads((repo / "reports/mlflow.json").read_text())["run_id"]).inputs.dataset_inputs}
    for dep in lock["train"]["deps"]:
        if not dep["path"].startswith("src/"):
            assert latest_inputs[dep["path"]] == dep["md5"], dep
    # the run of the last change holds its params and the KSR measured with them; the others keep theirs
    last = json.loads((repo / "reports/mlflow.json").read_text())
    latest = client.get_run(last["run_id"])
    assert latest.data.params["engine.cache_weight"] == "0.0" and latest.data.params["sample.temperature"] == "0.5"
    assert latest.data.metrics["lstm_keystrokes_ksr"] == pytest.approx(
        json.loads((repo / "reports/metrics.json").read_text())["keystrokes"]["ksr"])
    assert latest.data.tags["nextword.training_run"] == by_name["two-layers"].info.run_id
    assert by_name["two-layers"].data.params["engine.cache_weight"] == "0.05"
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "cache off")


def test_every_surface_serves_the_settings_the_pipeline_evaluated(project):
    """The issue's reproduction: an experiment without the n-gram, then the CLI, the web API and the MLflow model."""
    repo = project.path
    # model.layers=2 as committed, so only what serves reruns
    exp = project.dvc("exp", "run", "-S", "corpus=toy", "-S", "model.layers=2", "-S", "engine.ngram_weight=0")
    assert "train" not in stages_run(exp.stdout) and "bundle" in stages_run(exp.stdout)
    assert json.loads((repo / "models/model/engine.json").read_text())["ngram_weight"] == 0.0
    expected = samples_top(repo, 1)  # "the quick brown ", top 5 of the LSTM alone
    assert len(expected) == 5

    cli = project.run(sys.executable, "-m", "nextword.cli", "suggest", "-k", "5", "the quick brown ")
    assert [(w, f"{float(p):.3f}") for w, p in (line.split("\t") for line in cli.stdout.splitlines())] == expected
    mixed = project.run(sys.executable, "-m", "nextword.cli", "suggest", "-k", "5", "--ngram-weight", "0.4",
                        "the quick brown ")
    assert mixed.stdout != cli.stdout  # a flag still overrides the folder's setting

    from servers import background_server

    from nextword.server import create_app

    import urllib.request

    with background_server(create_app(repo / "models/model", log_path=repo / "keystrokes.jsonl")) as url:
        body = json.dumps({"speaker": "user", "text": "the quick brown ", "k": 5}).encode()
        request = urllib.request.Request(f"{url}/api/suggest", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            web = json.load(response)["suggestions"]
    assert [(s["word"], f"{s['probability']:.3f}") for s in web] == expected

    import mlflow.pyfunc
    import pandas as pd

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    run_id = json.loads((repo / "reports/mlflow.json").read_text())["run_id"]
    assert mlflow_client(repo).get_run(run_id).data.params["engine.ngram_weight"] == "0.0"
    suggester = mlflow.pyfunc.load_model(f"runs:/{run_id}/suggester")
    out = suggester.predict(pd.DataFrame({"text": ["the quick brown "], "speaker": ["user"], "k": [5]}))
    assert [(w, f"{p:.3f}") for w, p in zip(out["suggestions"][0], out["probabilities"][0])] == expected


def curves(repo: Path) -> list[dict]:
    """The training curves without the timing columns, which differ between any two runs."""
    import csv

    with open(repo / "reports/epochs.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in ("seconds", "tokens_per_second")}
                for row in csv.DictReader(f)]


def back_to_commit(project) -> None:
    """The committed pipeline in the workspace: its files and lock from git, its outputs from DVC's cache."""
    project.run("git", "checkout", "-q", "--", ".")
    project.dvc("checkout", "-q", check=False)


def test_a_code_change_retrains_from_scratch(project):
    repo = project.path
    back_to_commit(project)
    before = curves(repo)
    model_py = repo / "src/nextword/model.py"
    source = model_py.read_text()
    assert "nn.init.uniform_(self.embed.weight, -0.1, 0.1)" in source
    model_py.write_text(source.replace("nn.init.uniform_(self.embed.weight, -0.1, 0.1)",
                                       "nn.init.uniform_(self.embed.weight, -0.05, 0.05)"))
    try:
        out = project.dvc("repro")
        assert "train" in stages_run(out.stdout)
        assert "resuming" not in out.stdout + out.stderr
        after = curves(repo)
        assert len(after) == len(before) and after[0] != before[0]  # the first epoch itself was trained anew
        forced = project.dvc("repro", "-f", "-s", "train")
        assert "resuming" not in forced.stdout + forced.stderr
        assert curves(repo) == after  # from scratch again, and the same code, params and seed give the same
    finally:
        model_py.write_text(source)
    assert not (repo / "models/checkpoint.pt").exists()
    back_to_commit(project)  # not trained again
    assert project.dvc("status").stdout.strip().endswith("up to date.")


def test_a_pulled_pipeline_is_up_to_date_and_serves_without_training(project, tmp_path):
    repo = project.path
    assert stages_run(project.dvc("repro").stdout) == []  # the committed pipeline, as the test before left it
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "results", check=False)
    remote = tmp_path / "remote"
    project.dvc("remote", "add", "-f", "-d", "store", remote)
    project.run("git", "commit", "-qam", "remote")
    project.dvc("push")
    clone = tmp_path / "clone"
    project.run("git", "clone", "-q", repo, clone)
    project.dvc("pull", cwd=clone)
    status = project.dvc("status", cwd=clone)
    assert status.stdout.strip().endswith("up to date."), status.stdout
    suggest = project.run(sys.executable, "-m", "nextword.cli", "suggest", "the quick brown ", cwd=clone)
    assert len(suggest.stdout.splitlines()) == 3


def test_unreachable_tracking_server_fails_the_stage_at_once(project):
    env = dict(project.env, MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    proc = subprocess.run(
        [sys.executable, "src/stages/train.py", "--vocab", "data/processed/vocab.json", "--tokenizer",
         "data/processed/tokenizer", "--windows", "data/processed/windows", "--model", "/tmp/never", "--checkpoint", "/tmp/never.pt", "--curves",
         "/tmp/never.csv", "--run", "/tmp/never.json"],
        cwd=project.path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: MLflow tracking store http://127.0.0.1:9 is not reachable")
    assert "Traceback" not in proc.stderr
    assert not Path("/tmp/never").exists()
