"""The CLI's contract for bad input: exit 2, say what is wrong, touch no store."""

from pathlib import Path

from typer.testing import CliRunner

from flows.cli.commands import app

ROOT = Path(__file__).resolve().parents[3]
runner = CliRunner()

BROKEN = """
default: shakespeare
pipelines:
  shakespeare:
    model: {num_layers: -1, context_length: many}
    train: {precision: fp8}
"""


def test_broken_config_lists_all_three_paths_and_exits_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.yaml").write_text(BROKEN)
    result = runner.invoke(app, ["run", "--config", "broken.yaml"])
    assert result.exit_code == 2
    out = result.output
    for path in (
        "pipelines.shakespeare.model.num_layers",
        "pipelines.shakespeare.model.context_length",
        "pipelines.shakespeare.train.precision",
    ):
        assert path in out
    assert list(tmp_path.iterdir()) == [tmp_path / "broken.yaml"]  # no mlruns/, no .lmp/


def test_unknown_pipeline_names_the_available_ones_and_exits_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["run", "no-such-pipeline", "--config", str(ROOT / "pipelines.yaml")])
    assert result.exit_code == 2
    assert "no-such-pipeline" in result.output
    assert "shakespeare-char-gpt" in result.output and "smoke" in result.output
    assert list(tmp_path.iterdir()) == []


def test_list_shows_every_pipeline_with_its_description():
    result = runner.invoke(app, ["list", "--config", str(ROOT / "pipelines.yaml")], terminal_width=200)
    assert result.exit_code == 0
    assert "shakespeare-char-gpt" in result.output and "(default)" in result.output
    assert "smoke" in result.output
    assert "Tiny GPT" in result.output
