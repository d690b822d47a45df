"""The command line's own surface: `-o key=value` overrides validated by path, `--version`, shell completion,
multi-line config errors that keep their caret, and `lmp ui` refusing a busy port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli.commands import app
from flows.config import ConfigError, apply_overrides, load_pipelines, parse_pipelines

ROOT = Path(__file__).resolve().parents[2]
LMP = str(Path(sys.executable).with_name("lmp"))
runner = CliRunner()

FILE = {
    "default": "a",
    "pipelines": {
        "a": {"model": {"num_layers": 1, "embed_dim": 32, "context_length": 16}, "train": {"max_steps": 10}},
        "b": {"train": {"max_steps": 20}},
    },
}


def _write(tmp_path: Path, content: dict | str = FILE) -> Path:
    path = tmp_path / "pipelines.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def _problems(path: Path, overrides: list[str], pipeline: str | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_pipelines(path, overrides=overrides, pipeline=pipeline)
    return caught.value.problems


# ---------------------------------------------------------------- -o key=value


def test_overrides_set_leaves_of_the_chosen_pipeline_and_change_its_digest(tmp_path):
    path = _write(tmp_path)
    plain = load_pipelines(path)
    changed = load_pipelines(
        path, overrides=["train.max_steps=200", "train.seed=7", "model.dropout=0.1", "eval.prompts=[to, be]"]
    )
    a = changed.get("a")
    assert (a.train.max_steps, a.train.seed, a.model.dropout) == (200, 7, 0.1)
    assert a.eval.prompts == ("to", "be") and a.model.embed_dim == 32  # the rest of the block is kept
    assert a.digest() != plain.get("a").digest()  # `lmp plan` and the stage caches see the change
    assert changed.get("b") == plain.get("b")  # only the chosen pipeline's block
    other = load_pipelines(path, overrides=["train.max_steps=5"], pipeline="b")
    assert other.get("b").train.max_steps == 5 and other.get("a") == plain.get("a")


def test_an_anchor_shared_with_another_pipeline_is_not_changed_through_it(tmp_path):
    shared = "default: a\npipelines:\n  a:\n    train: &t {max_steps: 7}\n  b:\n    train: *t\n"
    files = load_pipelines(_write(tmp_path, shared), overrides=["train.max_steps=9"])
    assert (files.get("a").train.max_steps, files.get("b").train.max_steps) == (9, 7)


def test_apply_overrides_parses_values_as_yaml_scalars():
    block = apply_overrides({"train": {"max_steps": 1}}, ["train.max_steps=200", "train.precision=fp32", "x.y=null"])
    assert block == {"train": {"max_steps": 200, "precision": "fp32"}, "x": {"y": None}}


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("train.max_stepz=3", "-o train.max_stepz=3: unknown key train.max_stepz; did you mean max_steps?"),
        ("train.max_steps=abc", "-o train.max_steps=abc: train.max_steps: Input should be a valid integer"),
        ("trian.max_steps=3", "-o trian.max_steps=3: unknown key trian; did you mean train?"),
        ("model.embed_dim=30", "-o model.embed_dim=30: model: Value error, embed_dim (30) must be divisible by"),
        ("train.eval_tokens=8", "-o train.eval_tokens=8: Value error, train.eval_tokens (8) must be at least model."),
        ("train.max_steps", "-o train.max_steps: expected KEY=VALUE"),
        ("=3", "-o =3: expected KEY=VALUE"),
        ("train..seed=3", "-o train..seed=3: 'train..seed' is not a dotted key"),
        ("train={max_steps: 3}", "-o train={max_steps: 3}: a mapping is not a plain value"),
        ("train.max_steps=[1, [2]]", "-o train.max_steps=[1, [2]]: a nested value is not a plain value"),
        ("train.max_steps=[1", "-o train.max_steps=[1: not a valid YAML value"),
        ("train.max_steps.x=1", "-o train.max_steps.x=1: train.max_steps is a value, not a section"),
        ("description.x=1", "-o description.x=1: description: Input should be a valid string"),
    ],
)
def test_override_errors_name_the_option_and_the_path(tmp_path, override, problem):
    problems = _problems(_write(tmp_path), [override])
    assert any(p.startswith(problem) for p in problems), problems
    assert len(problems) == 1, problems


def test_every_bad_override_is_reported_at_once_beside_the_files_own_problems(tmp_path):
    broken = {**FILE, "pipelines": {**FILE["pipelines"], "b": {"model": {"num_layers": 0}}}}
    problems = _problems(_write(tmp_path, broken), ["train.max_stepz=3", "train.seed=x"])
    assert "pipelines.b.model.num_layers: Input should be greater than 0" in problems
    assert any(p.startswith("-o train.max_stepz=3: unknown key") for p in problems)
    assert any(p.startswith("-o train.seed=x: train.seed: Input should be a valid integer") for p in problems)
    assert len(problems) == 3, problems


def test_lmp_plan_takes_overrides_and_refuses_a_bad_one_by_path_with_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _write(tmp_path)
    bad = runner.invoke(app, ["plan", "-o", "train.max_stepz=3"])
    assert bad.exit_code == 2, bad.output
    assert "-o train.max_stepz=3: unknown key train.max_stepz; did you mean max_steps?" in bad.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipelines.yaml"]  # nothing created


# ---------------------------------------------------------------- every problem of a block at once


def test_a_field_error_and_a_cross_field_error_in_one_block_are_reported_together():
    text = "default: a\npipelines:\n  a:\n    model: {num_layers: 0, context_length: 64}\n    train: {eval_tokens: 8}\n"
    with pytest.raises(ConfigError) as caught:
        parse_pipelines(text, "p.yaml")
    problems = caught.value.problems
    assert "pipelines.a.model.num_layers: Input should be greater than 0" in problems
    assert any("train.eval_tokens (8) must be at least model.context_length (64)" in p for p in problems), problems
    assert len(problems) == 2, problems


def test_a_classifier_with_two_mistakes_reports_both():
    block = {"task": "classification", "data": {"source": "shakespeare-genre"}, "init_from": "runs:/x"}
    block["train"] = {"learning_rate": "fast"}
    with pytest.raises(ConfigError) as caught:
        parse_pipelines(yaml.safe_dump({"default": "c", "pipelines": {"c": block}}))
    text = str(caught.value)
    assert "pipelines.c.train.learning_rate: Input should be a valid number" in text
    assert "init_from 'runs:/x' is not `scratch`" in text


def test_a_repaired_default_does_not_invent_a_problem():
    # num_heads is wrong; filling in its default (4) would make "30 not divisible by 4": not reported
    text = "default: a\npipelines:\n  a:\n    model: {embed_dim: 30, num_heads: many}\n"
    with pytest.raises(ConfigError) as caught:
        parse_pipelines(text)
    assert caught.value.problems == [
        "pipelines.a.model.num_heads: Input should be a valid integer, unable to parse string as an integer"
    ]


def test_an_unknown_key_in_the_file_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"pipelines.a.model.embde_dim: Extra inputs are not permitted; did you "
                                          r"mean embed_dim\?"):  # fmt: skip
        parse_pipelines("default: a\npipelines:\n  a:\n    model: {embde_dim: 3}\n")


# ---------------------------------------------------------------- YAML syntax errors keep their caret

SYNTAX = "default: a\npipelines:\n  a:\n    train: {max_steps: 3\n    model: {}\n"


def test_a_yaml_syntax_error_shows_the_line_and_a_caret_under_the_column():
    with pytest.raises(ConfigError) as caught:
        parse_pipelines("default: a\npipelines:\n  a:\n    train: max_steps: 3\n", "p.yaml")
    lines = str(caught.value).splitlines()
    assert lines[1].startswith("  - line 4, column 21: not valid YAML: mapping values are not allowed here")
    source = next(i for i, line in enumerate(lines) if line.strip() == "train: max_steps: 3")
    caret = lines[source + 1]
    assert caret.strip() == "^" and caret.index("^") == lines[source].index("max_steps") + len("max_steps")


def test_lmp_prints_the_caret_under_the_column(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "default: a\npipelines:\n  a:\n    train: [max_steps: 3\n    model: {}\n")
    result = runner.invoke(app, ["list"], terminal_width=60)
    assert result.exit_code == 2
    lines = result.output.splitlines()
    assert any("not valid YAML" in line and "line " in line for line in lines), result.output
    caret = next(i for i, line in enumerate(lines) if line.strip() == "^")
    assert lines[caret - 1].strip() == "model: {}"
    assert lines[caret].index("^") == lines[caret - 1].index("model") + len("model")  # the ':' it stopped at
    assert any("while parsing a flow sequence" in line and "line 4, column 12" in line for line in lines)


# ---------------------------------------------------------------- --version, completion, lmp ui


def test_version_prints_the_package_version():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"lmp {version('lm-pipelines')}"


def test_the_lmp_script_completes_commands_and_options(tmp_path):
    env = os.environ | {"_LMP_COMPLETE": "complete_bash", "COMP_WORDS": "lmp pro", "COMP_CWORD": "1"}
    done = subprocess.run([LMP], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.split() == ["promote"], done.stdout + done.stderr
    env |= {"COMP_WORDS": "lmp run --fr", "COMP_CWORD": "2"}
    done = subprocess.run([LMP], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.stdout.split() == ["--fresh"], done.stdout + done.stderr
    shown = runner.invoke(app, ["--show-completion", "bash"], prog_name="lmp")
    assert shown.exit_code == 0 and "_LMP_COMPLETE=complete_bash" in shown.output


def test_lmp_ui_on_a_busy_port_exits_2_and_starts_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _write(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["ui", "--port", str(port)])
    assert result.exit_code == 2, result.output
    assert f"port {port}" in result.output and "--port" in result.output
    assert "http://" not in result.output  # no address that serves someone else
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipelines.yaml"]  # no store opened


def test_lmp_plan_shows_the_pending_resume_of_an_interrupted_run(tmp_path, monkeypatch):
    import torch
    from mlflow.tracking import MlflowClient

    from flows.resume import process_tags
    from lm.checkpoint import save_checkpoint
    from lm.config import flatten

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "a.txt").write_text("a small corpus to plan from. " * 20)
    _write(tmp_path, {"default": "a", "pipelines": {"a": {"data": {"source": "files", "paths": ["a.txt"]}}}})
    (tmp_path / "mlruns").mkdir()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("a"), tags=process_tags() | {"lmp.pid": "999999999"})
    spec = load_pipelines(tmp_path / "pipelines.yaml", overrides=["train.max_steps=400"]).get("a")
    for key, value in flatten(spec.model_dump(mode="json", exclude={"name"}, exclude_none=True)).items():
        client.log_param(run.info.run_id, key, str(value))
    client.set_terminated(run.info.run_id, "KILLED")
    save_checkpoint(tmp_path / ".lmp" / "runs" / run.info.run_id / "step-00000322", torch.nn.Linear(2, 2), {})

    result = runner.invoke(app, ["plan", "-o", "train.max_steps=400"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"resume from step 322 of run {run.info.run_id[:8]}" in result.output
    refused = runner.invoke(app, ["plan", "-o", "train.seed=5"], terminal_width=200)
    assert "train.seed" in refused.output and "--fresh" in refused.output and "refused" in refused.output
