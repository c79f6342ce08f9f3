from __future__ import annotations

import csv
import io
import json

import pytest

import dtune
from dtune.cli import main
from tests.tune import _trainables as T


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "exp"
    dtune.run(
        T.quadratic, param_space={"x": dtune.uniform(0, 1)}, metric="loss", mode="min",
        num_samples=5, storage=path, verbose=0, seed=1,
    )  # fmt: skip
    return path


def test_status_prints_a_table_best_first(experiment, capsys):
    assert main(["status", str(experiment)]) == 0
    out = capsys.readouterr().out
    assert "5 trials (terminated 5)" in out and "loss (min)" in out
    rows = [line for line in out.splitlines() if "TERMINATED" in line]
    losses = [float(line.split("│")[5]) for line in rows]
    assert losses == sorted(losses)


def test_export_csv_has_a_row_per_trial(experiment, tmp_path):
    target = tmp_path / "out.csv"
    assert main(["export", str(experiment), "--format", "csv", "-o", str(target)]) == 0
    rows = list(csv.DictReader(io.StringIO(target.read_text())))
    assert len(rows) == 5 and {"trial_id", "status", "config/x", "loss"} <= set(rows[0])


def test_export_json_with_history(experiment, capsys):
    assert main(["export", str(experiment), "--format", "json", "--history"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["metric"] == "loss" and len(data["trials"]) == 5
    assert [r["training_iteration"] for r in data["trials"][0]["history"]] == [1, 2, 3]


def test_resume_of_a_finished_experiment_reruns_nothing(experiment, capsys):
    assert main(["resume", str(experiment), "--verbose", "0"]) == 0
    assert "best trial" in capsys.readouterr().out


def test_directory_without_experiment_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="No dtune experiment"):
        main(["status", str(tmp_path)])
