"""A copy of this project in a fresh git repository, with the toy preset, for the end-to-end tests."""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


def make_project(repo: Path) -> SimpleNamespace:
    """A copy of the project in a new git repository, with the toy preset committed."""
    for name in project_files():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env["DVC_NO_ANALYTICS"] = "1"

    def run(*args, check=True, cwd=repo, timeout=900):
        proc = subprocess.run(list(map(str, args)), cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def dvc(*args, **kwargs):
        return run(sys.executable, "-m", "dvc", *args, **kwargs)

    run("git", "init", "-q")
    run("git", "config", "user.email", "test@example.com")
    run("git", "config", "user.name", "test")
    run(sys.executable, "-m", "nextword.cli", "params", "toy")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "toy preset")
    return SimpleNamespace(path=repo, run=run, dvc=dvc, env=env)


def mlflow_client(repo: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def all_runs(repo: Path) -> list:
    client = mlflow_client(repo)
    experiment = client.get_experiment_by_name("nextword")
    return client.search_runs([experiment.experiment_id]) if experiment else []
