"""The registry workflow from the command line, and the registered model served by `mlflow models serve`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.flows.helpers import free_port

ROOT = Path(__file__).resolve().parents[3]
runner = CliRunner()


def test_compare_lines_up_runs_of_different_pipelines(store):
    from flows.cli.commands import app

    result = runner.invoke(app, ["compare", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {"smoke", "smoke-lstm", "smoke-genre"} <= {r["pipeline"] for r in rows}  # the store is shared
    assert {r["architecture"] for r in rows if r["pipeline"] in ("smoke", "smoke-lstm")} == {"gpt", "lstm"}
    for row in [r for r in rows if r["pipeline"] in ("smoke", "smoke-lstm")]:
        for column in ("run", "parameters", "val_bpc", "tokens_per_s", "wall_s", "version"):
            assert row[column] not in (None, ""), (column, row)
    table = runner.invoke(app, ["compare", "smoke-lstm"])
    assert table.exit_code == 0 and "smoke-lstm" in table.output and "lstm" in table.output
    assert runner.invoke(app, ["compare", "nope"]).exit_code == 2


def test_models_promote_rollback_and_generate_from_the_cli(store):
    from flows.cli.commands import app

    listing = runner.invoke(app, ["models"])
    assert listing.exit_code == 0 and "smoke-lstm" in listing.output and "@champion → v1" in listing.output
    again = runner.invoke(app, ["promote", "smoke", "--version", "1"])
    assert again.exit_code == 1 and re.search(r"already (the |@)champion", again.output), again.output
    assert runner.invoke(app, ["rollback", "smoke"]).exit_code == 2  # nothing to roll back to
    out = runner.invoke(app, ["generate", "models:/smoke@champion", "ROMEO:\n", "--max-new-tokens", "12"])
    assert out.exit_code == 0 and out.output.startswith("ROMEO:\n") and len(out.output.rstrip("\n")) >= 12
    missing = runner.invoke(app, ["generate", "models:/smoke@nope", "x"])
    assert missing.exit_code == 2 and "cannot load" in missing.output
    genre = runner.invoke(app, ["generate", "models:/smoke-genre@champion", "To be, or not to be"])  # no params
    answer = json.loads(genre.output)
    assert genre.exit_code == 0 and answer["label"] in answer["probabilities"]


@contextmanager
def serving(store: Path, model_uri: str, tmp_path: Path) -> Iterator[Callable[[dict], list]]:
    """`mlflow models serve` on a free port, pickle deserialisation off; yields ``post(body) → predictions``."""
    port, bin_dir = free_port(), str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    env |= {
        "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlruns' / 'mlflow.db'}",
        "PATH": bin_dir + os.pathsep + env.get("PATH", ""),  # uvicorn must come from this environment
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
        "TMPDIR": str(tmp_path),
    }
    command = [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", model_uri,
               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def post(body: dict) -> list:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["predictions"]

    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)  # bounded readiness poll of a real server
        assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        yield post
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_mlflow_models_serve_answers_with_generated_text(store, tmp_path):
    with serving(store, "models:/smoke@champion", tmp_path) as post:
        body = {"inputs": ["ROMEO:\n", "JULIET:\n"], "params": {"max_new_tokens": 10, "temperature": 0, "seed": 0}}
        predictions = post(body)
    assert [p[: len(q)] for p, q in zip(predictions, body["inputs"], strict=True)] == body["inputs"]
    assert all(len(p) == len(q) + 10 for p, q in zip(predictions, body["inputs"], strict=True))


def test_mlflow_models_serve_answers_a_classifier_with_labels_and_probabilities(store, tmp_path):
    texts = ["KING HENRY:\nOnce more unto the breach, dear friends.", "Good morrow, sweet lady.", ""]
    with serving(store, "models:/smoke-genre@champion", tmp_path) as post:
        predictions = post({"inputs": texts})
    assert len(predictions) == 3
    for p in predictions:
        assert set(p["probabilities"]) == {"comedies", "histories", "tragedies"}
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)


def test_promotion_history_with_reasons_from_the_cli(mlflow_store):
    """`--reason` on promote/rollback lands in the append-only history; `lmp models --history` shows it per
    version, oldest first, a forced promotion included after later gates."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from flows.cli.commands import app
    from flows.registry import promotion

    client = MlflowClient()
    for bpc in (2.5, 2.7):  # tiny versions: a text artifact each
        with mlflow.start_run() as run:
            mlflow.log_text("weights", "model.txt")
        uri = f"runs:/{run.info.run_id}/model.txt"
        tags = {"val_bpc": str(bpc), "data_digest": "d"}
        promotion.register_version(client, "m", run.info.run_id, tags, f"w{bpc}", lambda uri=uri: uri)

    assert runner.invoke(app, ["promote", "m", "--version", "1", "--reason", "first model"]).exit_code == 0
    assert runner.invoke(app, ["promote", "m", "--version", "2"]).exit_code == 1  # worse: the gate refuses
    forced = runner.invoke(app, ["promote", "m", "--version", "2", "--force", "--reason", "hotfix"])
    assert forced.exit_code == 0, forced.output
    assert runner.invoke(app, ["promote", "m", "--version", "2"]).exit_code == 1  # already the champion
    rolled = runner.invoke(app, ["rollback", "m", "--reason", "bad samples"])
    assert rolled.exit_code == 0, rolled.output

    listing = runner.invoke(app, ["models", "--history", "m", "--format", "json"])
    assert listing.exit_code == 0, listing.output
    rows = json.loads(listing.output)
    assert [(r["version"], r["event"], r["reason"]) for r in rows] == [
        (1, "promoted", "first model"),
        (1, "replaced", "hotfix"),
        (1, "restored", "bad samples"),
        (2, "rejected", ""),
        (2, "forced", "hotfix"),
        (2, "rejected", ""),
        (2, "rolled back", "bad samples"),
    ]
    forced_row = rows[4]
    assert forced_row["forced"] and forced_row["champion_version"] == 1 and forced_row["champion"] == 2.5
    assert "@" in forced_row["who"] and forced_row["when"].endswith("Z")
    table = runner.invoke(app, ["models", "--history"])
    assert table.exit_code == 0 and "hotfix" in table.output and "rolled back" in table.output
    unknown = runner.invoke(app, ["models", "--history", "nope"])
    assert unknown.exit_code == 2 and "no registered model 'nope'" in unknown.output


def test_models_shows_the_metric_the_champions_gate_compared(mlflow_store):
    """A summarizer's champion shows its ROUGE-L (the gate's metric), not a language model's bits per char."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from flows.cli.commands import app
    from flows.registry import promotion

    client = MlflowClient()
    with mlflow.start_run() as run:
        mlflow.log_text("weights", "model.txt")
    tags = {"val_rougeL": "17.5", "val_target_loss": "1.2", "lmp.gate.metric": "val_rougeL", "data_digest": "d"}
    promotion.register_version(client, "summ", run.info.run_id, tags, "w", lambda: f"runs:/{run.info.run_id}/model.txt")
    client.set_registered_model_alias("summ", "champion", "1")
    [row] = json.loads(runner.invoke(app, ["models", "summ", "--format", "json"]).output)
    assert row["champion_metric"] == "val_rougeL 17.5"
