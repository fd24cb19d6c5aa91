"""Queued experiments run by two DVC workers at once, into a fresh MLflow store (the real `dvc queue`).

Two experiments for the two workers: they start together, so both open the store that neither has
created yet, the race this test is for. Its own file, so that `make test`'s second worker runs it beside
the other end-to-end tests.
"""

import re
import time

from dvc_project import all_runs, make_project


def test_queued_experiments_with_two_workers_all_land_in_a_fresh_store(tmp_path):
    project = make_project(tmp_path / "queue")
    # The data stages touch no MLflow store: run once here, each experiment takes them from DVC's run cache.
    project.dvc("repro", "fetch_chitchat", "window")
    assert not (project.path / "mlflow.db").exists()
    seeds = (1, 2)
    for seed in seeds:
        project.dvc("exp", "run", "--queue", "-S", "corpus=toy", "-S", f"seed={seed}")
    project.dvc("queue", "start", "-j", "2")
    deadline = time.monotonic() + 600
    while True:
        status = project.dvc("queue", "status").stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        assert time.monotonic() < deadline, status
        time.sleep(3)
    project.dvc("queue", "stop", check=False)
    assert status.count("Success") == len(seeds) and "Failed" not in status, status
    runs = all_runs(project.path)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(int(r.data.params["seed"]) for r in finished) == list(seeds), [
        (r.info.run_name, r.info.status) for r in runs]
    assert all("lstm_keystrokes_ksr" in r.data.metrics for r in finished)
