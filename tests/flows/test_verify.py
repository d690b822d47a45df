"""`lmp verify`: a registered version replayed from what its run recorded — data, tokenizer, loss history,
weights — on the session's store (GPT, classifier) and on a files-source project whose data then changes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.flows.helpers import build_store, use_store

pytestmark = pytest.mark.slow  # whole pipelines through the flow: `pytest -m ""` (CI) runs it, plain `pytest` does not

runner = CliRunner()


def _verify(*args: str):
    from flows.cli.commands import app

    return runner.invoke(app, ["verify", *args])


def _version_tags(name: str, alias: str = "champion") -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_model_version_by_alias(name, alias).tags


def test_a_fresh_smoke_version_replays_identically_and_lmp_models_says_so(store):
    from flows.cli.commands import app

    result = _verify("models:/smoke@champion", "--steps", "40")
    assert result.exit_code == 0, result.output
    assert "40 of 40 training steps replayed" in result.output
    tags = _version_tags("smoke")
    assert tags["lmp.verify.data"] == tags["lmp.verify.tokenizer"] == tags["lmp.verify.weights"] == "identical"
    assert tags["lmp.verify.loss"] == "identical"  # bit-equal floats at every logged step (every 5 of 40)
    assert tags["lmp.verify.steps"] == "40/40" and tags["lmp.verify.environment"] == "same"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", tags["lmp.verify.at"])
    assert f"identical: sha256 {tags['weights_digest'][:12]}" in result.output
    assert "the 8 logged steps up to step 40" in " ".join(result.output.split())
    listing = runner.invoke(app, ["models", "--format", "json"])
    row = next(r for r in json.loads(listing.output) if r["model"] == "smoke")
    assert "identical 40/40 steps" in row["verified"].values()
    assert "identical 40/40 steps" in runner.invoke(app, ["models", "smoke"]).output


def test_a_forced_thread_count_and_precision_are_named_in_the_verdict(store):
    import torch

    before = torch.get_num_threads()  # what the session's runs recorded
    threads = 1 if before != 1 else 2
    result = _verify("models:/smoke@champion", "--steps", "5", "--threads", str(threads), "--precision", "bf16")
    assert result.exit_code in (0, 1), result.output  # bf16 may or may not move the loss past the tolerance
    said = " ".join(result.output.split())
    assert f"threads {before} → {threads}" in said and "precision fp32 → bf16" in said
    assert torch.get_num_threads() == before  # forced for the replay only
    tags = _version_tags("smoke")
    assert f"threads {before} → {threads}" in tags["lmp.verify.environment"]
    assert tags["lmp.verify.steps"] == "5/40" and tags["lmp.verify.weights"] == "not compared (replayed 5 of 40 steps)"
    if result.exit_code == 1:
        assert "usual reasons a replay differs" in said


def test_a_classifier_verifies_through_its_own_data_and_fit(store):
    result = _verify("models:/smoke-genre@champion")  # default: all 20 steps (no checkpoint interval)
    assert result.exit_code == 0, result.output
    tags = _version_tags("smoke-genre")
    assert [tags[f"lmp.verify.{k}"] for k in ("data", "tokenizer", "loss", "weights")] == ["identical"] * 4
    assert tags["lmp.verify.steps"] == "20/20"
    assert "shakespeare-genre" in " ".join(result.output.split())  # the source, as the task describes it


def _project(root: Path) -> dict:
    words = "to be or not that is the question whether tis nobler in the mind to suffer".split()
    for i, name in enumerate(("a.txt", "b.txt")):
        lines = [" ".join(words[(i + j + k) % len(words)] for k in range(10)) for j in range(200)]
        (root / name).write_text("\n".join(lines) + "\n")
    spec = {
        "data": {"source": "files", "paths": ["a.txt", "b.txt"]},
        "model": {"num_layers": 1, "num_heads": 1, "embed_dim": 16, "context_length": 16},
        "train": {"max_steps": 12, "batch_size": 4, "eval_interval": 6, "eval_tokens": 128, "precision": "fp32",
                  "log_interval": 3, "checkpoint_interval": 6},
        "eval": {"max_new_tokens": 4},
    }  # fmt: skip
    (root / "pipelines.yaml").write_text(yaml.safe_dump({"default": "tiny", "pipelines": {"tiny": spec}}))
    return spec


def test_an_edited_source_file_is_reported_as_changed_data_with_both_digests(prefect_harness, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows.config import load_pipelines, validate_spec

    _project(tmp_path)
    spec = load_pipelines(tmp_path / "pipelines.yaml").get("tiny")
    use_store(build_store(tmp_path, [spec]), monkeypatch)
    client = MlflowClient()
    version = client.get_model_version("tiny", "1")
    recorded = Path(client.download_artifacts(version.run_id, "lmp/pipeline.json", str(tmp_path / "got")))
    assert validate_spec(json.loads(recorded.read_text())) == spec  # exactly what validate_spec accepts back

    first = _verify("models:/tiny/1")  # default: the first checkpoint interval, 6 of 12 steps
    assert first.exit_code == 0, first.output
    assert "6 of 12 training steps replayed" in first.output and "from cache" in first.output
    assert _version_tags("tiny")["lmp.verify.weights"] == "not compared (replayed 6 of 12 steps)"

    with open(tmp_path / "b.txt", "a") as f:
        f.write("a line the run never saw\n")
    changed = _verify("models:/tiny/1")
    assert changed.exit_code == 1, changed.output
    tag = _version_tags("tiny")["lmp.verify.data"]
    match = re.fullmatch(r"changed: recorded ([0-9a-f]{12}) → now ([0-9a-f]{12})", tag)
    assert match and match[1] == version.tags["data_digest"][:12] and match[2] != match[1], tag
    said = " ".join(changed.output.split())
    assert match[1] in said and match[2] in said and "re-ingested" in said and "a.txt" in said
    assert _version_tags("tiny")["lmp.verify.loss"] == "not compared"

    # A version whose run holds no recording (registered before lmp wrote it): refused, exit 2, nothing replayed.
    artifacts = Path(client.get_run(version.run_id).info.artifact_uri.removeprefix("file://")) / "lmp"
    for file in artifacts.iterdir():
        file.unlink()
    old = _verify("models:/tiny/1")
    assert old.exit_code == 2
    assert "version 1 of tiny was registered before lmp recorded what verify replays" in " ".join(old.output.split())
    assert _verify("models:/nope/1").exit_code == 2


def test_the_loss_history_is_compared_bit_for_bit_then_within_tolerance_then_from_the_first_differing_step():
    from flows.registry.verify import compare_history

    recorded = {5: 3.0, 10: 2.5, 15: 2.0, 20: 1.5}
    assert compare_history(recorded, dict(recorded), 20, 5).outcome == "identical"
    close = compare_history(recorded, recorded | {10: 2.5 * (1 + 3e-5)}, 20, 5)
    assert close.outcome == "within tolerance" and "3e-05" in close.tag and "every 5 steps" in close.detail
    far = compare_history(recorded, recorded | {15: 2.01, 20: 1.6}, 20, 5)
    assert far.outcome == "different" and far.tag == "different from step 15 (recorded 2.0, replay 2.01)"
    assert compare_history(recorded, {5: 3.0}, 10, 5).tag.startswith("different from step 10")  # replay stopped
    assert compare_history(recorded, {5: 3.0}, 5, 5).outcome == "identical"  # only steps ≤ the replayed ones
