"""The generation card at the gate: a smoke challenger meets the champion in a store of its own (the session store's
smoke keeps its champion for the other tests), the card lands on the challenger's run, a repetition rule refuses a
degenerate challenger, and `lmp compare --samples` shows the same view."""

from __future__ import annotations

import html
import json
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.flows.helpers import build_store, use_store

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_dir(prefect_harness, tmp_path_factory):
    """A store holding smoke v1 (@champion)."""
    from flows.config import load_pipelines

    smoke = load_pipelines(ROOT / "pipelines.yaml").get("smoke")
    return build_store(tmp_path_factory.mktemp("card-store"), [smoke])


@pytest.fixture
def smoke(smoke_dir, monkeypatch):
    use_store(smoke_dir, monkeypatch)
    from flows.config import load_pipelines

    return load_pipelines(ROOT / "pipelines.yaml").get("smoke")


def _run(spec, where: Path) -> dict:
    from flows.pipeline import lm_pipeline

    return lm_pipeline(spec, workdir=str(where / ".lmp"), base_dir=str(where))


def _card(run_id: str, tmp_path: Path) -> tuple[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    local = Path(client.download_artifacts(run_id, "gate", str(tmp_path)))
    return (local / "generation_card.md").read_text(), (local / "generation_card.html").read_text()


def _outputs(markdown: str) -> list[str]:
    """The fenced outputs of the markdown card (prompt, champion, challenger for each prompt)."""
    return re.findall(r"```text\n(.*?)\n```", markdown, flags=re.S)


def test_a_challenger_meeting_the_champion_gets_a_card_on_its_run(smoke, smoke_dir, tmp_path):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client

    result = _run(smoke.overridden({"train.seed": 1}), smoke_dir)
    registered = result["registered"]
    assert registered["version"] == 2 and registered["card"] == "gate/generation_card.html"
    markdown, page = _card(result["run_id"], tmp_path)
    prompts = list(dict.fromkeys((smoke.eval.prompt, *smoke.eval.prompts)))
    fenced = _outputs(markdown)
    assert fenced[0::3] == prompts  # each prompt, then the champion's and the challenger's output
    champion, challenger = fenced[1::3], fenced[2::3]
    assert len(champion) == len(challenger) == len(prompts) and champion != challenger
    assert "smoke v1 (@champion)" in markdown and "smoke v2 (challenger)" in markdown
    import html

    for text in champion + challenger:
        assert text and html.escape(text) in page
    version = MlflowClient().get_model_version("smoke", "2")
    assert "generation card" in version.description and "gate/generation_card.html" in version.description
    with get_client(sync_client=True) as prefect_client:
        assert "generation-card-smoke" in {a.key for a in prefect_client.read_artifacts()}

    # the same view in the terminal, computed on the fly from the two packages with the pipeline's prompts
    from flows.cli.commands import app

    shown = runner.invoke(app, ["compare", "--samples", "models:/smoke/1", "models:/smoke/2"])
    assert shown.exit_code == 0, shown.output
    flat = re.sub(r"[│\s]+", "", shown.output)
    for text in champion + challenger:
        assert re.sub(r"\s+", "", text)[:12] in flat
    assert "repetition" in shown.output and "Δ (B − A)" in shown.output
    unknown = runner.invoke(app, ["compare", "--samples", "models:/smoke/1", "models:/smoke/9"])
    assert unknown.exit_code == 2 and "no version 9" in unknown.output


def test_a_repeating_challenger_is_refused_by_the_repetition_rule(smoke, smoke_dir, tmp_path, monkeypatch):
    """The challenger trains longer (its val_bpc passes the metric) but says one character over and over: the
    rule refuses it with both rates, in the gate's tags and the promotion history."""
    from mlflow.tracking import MlflowClient

    from flows.cli.commands import app
    from flows.registry.promotion import verdict
    from lm import package as packaging

    load = packaging.load

    def degenerate(package):  # the challenger's package (not a downloaded smoke-vN) favours the letter "e"
        loaded = load(package)
        if "smoke-v" not in str(package.weights):
            favoured = loaded.tokenizer.encode("e")[0]
            loaded.model.lm_head.register_forward_hook(
                lambda module, args, out: out + 100.0 * (torch.arange(out.shape[-1]) == favoured)
            )
        return loaded

    monkeypatch.setattr(packaging, "load", degenerate)
    client = MlflowClient()
    champion = client.get_model_version_by_alias("smoke", "champion").version
    spec = smoke.overridden({"train.max_steps": 60, "promote.max_repetition_increase": 0.0})
    result = _run(spec, smoke_dir)
    version = result["registered"]["version"]
    markdown, _ = _card(result["run_id"], tmp_path)
    assert all(text == "e" * 64 for text in _outputs(markdown)[2::3])
    tags = client.get_model_version("smoke", str(version)).tags
    assert tags["lmp.gate.promoted"] == "False" and tags["lmp.gate.refused_by"] == "max_repetition_increase"
    assert re.search(r"repetition rate 0\.98\d vs 0\.\d+ of v\d \(@champion\)", tags["lmp.gate.reason"])
    assert client.get_model_version_by_alias("smoke", "champion").version == champion
    said = verdict(result["registered"]["decision"], version)
    assert said.startswith("stays @challenger because repetition rate") and f"(v{champion} stays" in said
    listing = runner.invoke(app, ["models", "smoke", "--history", "--format", "json"])
    rows = [r for r in json.loads(listing.output) if r["version"] == version]
    assert rows[-1]["event"] == "rejected" and "max_repetition_increase" in json.dumps(rows[-1])


def test_the_mlflow_ui_shows_the_card_among_the_challengers_artifacts(smoke, smoke_dir, tmp_path):
    """A real `lmp ui` (an `mlflow server`) in headless Chromium: the challenger run's artifacts list the card, its
    markdown renders with both models' outputs, and the HTML card is embedded in the page."""
    from mlflow.tracking import MlflowClient

    from flows import tracking
    from tests.flows.test_mlflow_ui_browser import CHROMIUM, Browser, running_ui

    if CHROMIUM is None and not os.environ.get("CI"):
        pytest.skip("no Chromium here (apt-get install -y chromium); CI installs it and runs this test")
    client = MlflowClient()
    carded = [v for v in client.search_model_versions("name = 'smoke'") if "generation card" in (v.description or "")]
    run_id = carded[0].run_id if carded else _run(smoke.overridden({"train.seed": 1}), smoke_dir)["run_id"]
    markdown, _ = _card(run_id, tmp_path)
    challenger_text = _outputs(markdown)[2]
    run = client.get_run(run_id)
    page = f"experiments/{run.info.experiment_id}/runs/{run_id}/artifacts"
    browser = Browser(Path(tempfile.mkdtemp(dir=tmp_path)))
    try:
        with running_ui(smoke_dir, tracking.default_tracking_uri(smoke_dir)) as base:
            browser.open(tracking.ui_url(base, page), "gate", "model_card.md", name="artifacts")
            for entry in ("gate", "generation_card.md"):  # open the folder, then the file, as a user clicks
                assert _until_value(lambda e=entry: browser.evaluate(CLICK % json.dumps(e))), f"no {entry} to click"
            seen = "document.body.innerText"
            expected = ("Generation card", "repetition", challenger_text.split("\n")[0][:20])
            text = lambda: " ".join((browser.evaluate(seen) or "").split())  # noqa: E731
            assert _until_value(lambda: all(e in text() for e in expected)), f"card not shown: {text()[:2000]}"
            assert _until_value(lambda: browser.evaluate(CLICK % json.dumps("generation_card.html")))

            # MLflow renders an HTML artifact in a sandboxed frame of its own process (not in this page's DOM): read
            # what the UI serves that frame, from the page, as it does
            fetch = f"fetch('get-artifact?path=gate/generation_card.html&run_uuid={run_id}').then(r => r.text())"
            served = browser.call("Runtime.evaluate", expression=fetch, awaitPromise=True, returnByValue=True)
            html_card = served["result"].get("value") or ""
            assert "Generation card" in html_card and html.escape(challenger_text.split("\n")[0]) in html_card
    finally:
        browser.close()


CLICK = """(() => {
  const el = [...document.querySelectorAll('body *')].filter(e => e.textContent.trim() === %s).pop();
  if (!el) return false;
  el.click();
  return true;
})()"""
"""Click the innermost element whose whole text is the given JSON string (a file or folder in MLflow's artifact
tree)."""


def _until_value(check, deadline_s: float = 60) -> bool:
    import time

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.25)  # bounded poll of the rendering page
    return False
