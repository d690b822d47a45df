"""The generation card at the gate: when a language-model or seq2seq challenger meets a champion, both generate from
the pipeline's fixed prompts (``eval.prompt`` and ``eval.prompts``; for seq2seq the first ``decode.samples``
validation pairs of this run's data) with the same seed and settings, side by side (``lm.samples``).

The card is logged on the challenger's run (``gate/generation_card.html``, ``gate/generation_card.md``), published
as a Prefect markdown artifact (``generation-card-<pipeline>``) and named in the version's model card; with
``promote.max_repetition_increase`` it can refuse the promotion. Nothing is generated when there is no champion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from flows.config import PipelineSpec, Seq2SeqSpec
from lm import package as packaging
from lm.results import Package
from lm.samples import MAX_NEW_TOKENS, Prompt, SampleCard, Settings, side_by_side

ARTIFACTS = {"html": "gate/generation_card.html", "md": "gate/generation_card.md"}
RULE = "max_repetition_increase"
log = logging.getLogger(__name__)


def generates(spec) -> bool:
    """Whether the pipeline's models generate text (a causal language model or a seq2seq model)."""
    if isinstance(spec, PipelineSpec) and spec.model is None:  # initialised: an encoder gets no card (side_by_side)
        return True
    return isinstance(spec, Seq2SeqSpec) or (isinstance(spec, PipelineSpec) and spec.model.kind != "encoder")


def prompts(spec, data_path: Path | None) -> list[Prompt]:
    """The pipeline's fixed inputs: its evaluation prompts, or (seq2seq) the first validation pairs of the data at
    ``data_path`` with their references."""
    if isinstance(spec, Seq2SeqSpec):
        from lm.seq2seq.data import read_pairs

        rows = read_pairs(Path(data_path), "val")[: spec.decode.samples] if data_path is not None else []
        return [Prompt(row["source"], reference=row["target"]) for row in rows]
    return [Prompt(text) for text in dict.fromkeys((spec.eval.prompt, *spec.eval.prompts))]


def settings(spec) -> Settings:
    """The spec's sampling settings with its fixed seed (seq2seq: each package decodes as it was evaluated), at
    most ``MAX_NEW_TOKENS`` new tokens."""
    if isinstance(spec, Seq2SeqSpec):
        return Settings(max_new_tokens=min(spec.decode.max_new_tokens, MAX_NEW_TOKENS))
    cap = min(spec.eval.max_new_tokens, MAX_NEW_TOKENS) or MAX_NEW_TOKENS
    return Settings(max_new_tokens=cap, temperature=spec.eval.temperature, top_k=spec.eval.top_k, seed=spec.eval.seed)


def version_package(version: ModelVersion, scratch: Path) -> Package:
    """A registered version's package under ``scratch`` (``flows.registry.register.version_package``)."""
    from flows.registry import register

    return register.version_package(version, scratch)


def build(spec, data_path: Path | None, champion: Package, challenger: Package,
          names: tuple[str, str]) -> SampleCard | None:  # fmt: skip
    """Both packages side by side on the pipeline's inputs (None when they generate no text)."""
    card = side_by_side(packaging.load(champion), packaging.load(challenger), prompts(spec, data_path),
                        settings(spec), names=names)  # fmt: skip
    return None if card is None else replace(card, title=f"Generation card — {spec.name}")


def publish(run_id: str, card: SampleCard, pipeline: str, version: int) -> None:
    """The card on the challenger's run (HTML + markdown) and as the flow run's Prefect markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    client = MlflowClient()
    client.log_text(run_id, card.to_html(), ARTIFACTS["html"])
    text = card.to_markdown()
    client.log_text(run_id, text, ARTIFACTS["md"])
    key = pipeline.replace(".", "-").replace("_", "-").lower()
    try:
        create_markdown_artifact(text, key=f"generation-card-{key}", description=f"{pipeline} v{version} vs @champion")
    except Exception as e:  # outside a flow run (no Prefect context): the MLflow artifacts stand alone
        log.warning("generation card: no Prefect artifact (%s)", e)


def repetition_refusal(card: SampleCard, limit: float | None, champion_version: int | str) -> tuple[str, str] | None:
    """(rule, why) when the challenger's mean repetition rate exceeds the champion's by more than ``limit``."""
    if limit is None or not card.rows:
        return None
    ours, theirs = card.mean("challenger", "repetition"), card.mean("champion", "repetition")
    if ours - theirs <= limit:
        return None
    return RULE, (
        f"repetition rate {ours:.3f} vs {theirs:.3f} of v{champion_version} (@champion) on the generation card: "
        f"an increase of {ours - theirs:.3f} > {RULE} {limit:g}"
    )


@dataclass
class GateCard:
    """The gate rule (``promotion.Rule``) that builds and publishes the card when the challenger meets a champion,
    and refuses a too repetitive challenger when ``promote.max_repetition_increase`` is set."""

    spec: object
    data_path: Path | None
    scratch: Path
    run_id: str
    challenger: Package
    version: int
    card: SampleCard | None = field(default=None, init=False)

    def __call__(self, champion: ModelVersion) -> tuple[str, str] | None:
        if not generates(self.spec):
            return None
        names = (f"{self.spec.name} v{champion.version} (@champion)", f"{self.spec.name} v{self.version} (challenger)")
        try:
            package = version_package(champion, self.scratch)
            self.card = build(self.spec, self.data_path, package, self.challenger, names)
        except Exception as e:  # a card that cannot be made never blocks the metric's decision
            log.warning("generation card: not made (%s: %s)", type(e).__name__, e)
            return None
        if self.card is None:
            return None
        publish(self.run_id, self.card, self.spec.name, self.version)
        return repetition_refusal(self.card, self.spec.promote.max_repetition_increase, champion.version)


def recorded_spec(client: MlflowClient, version: ModelVersion):
    """The spec the version's run recorded (``lmp/pipeline.json``, see ``flows.registry.verify``), None when the run
    recorded none or it no longer validates."""
    import json
    import tempfile

    from flows.config import validate_spec
    from flows.registry.verify import RECORD_DIR, SPEC_FILE

    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(client.download_artifacts(version.run_id, f"{RECORD_DIR}/{SPEC_FILE}", tmp))
            return validate_spec(json.loads(local.read_text()))
    except (MlflowException, OSError, ValueError) as e:  # ValueError: also a spec that no longer validates
        log.info("no recorded pipeline for %s v%s: %s", version.name, version.version, e)
        return None


def compare_versions(first: str, second: str, workdir: Path) -> SampleCard | None:
    """``lmp compare --samples A B``: the two registered versions (``models:/NAME@ALIAS`` or ``models:/NAME/N``) side
    by side on B's pipeline's prompts (its recorded spec; else the default evaluation prompt), A in the champion's
    column. Raises DataError for an unknown model or version."""
    from flows.registry.register import resolve_init
    from lm import tasks
    from lm.config import EvalConfig

    client = MlflowClient()
    a, b = (resolve_init(uri, client, what="--samples") for uri in (first, second))
    spec = recorded_spec(client, b)
    packages = [version_package(v, Path(workdir) / "samples") for v in (a, b)]
    names = (f"{first} (v{a.version})", f"{second} (v{b.version})")
    if spec is None:
        eval_cfg = EvalConfig()
        default = Settings(MAX_NEW_TOKENS, eval_cfg.temperature, eval_cfg.top_k, eval_cfg.seed)
        card = side_by_side(packaging.load(packages[0]), packaging.load(packages[1]), [Prompt(eval_cfg.prompt)],
                            default, names=names)  # fmt: skip
        return None if card is None else replace(card, notes=("no recorded pipeline: the default evaluation prompt",))
    data = Path(workdir) / tasks.get(spec.task).data_root / b.tags.get("data_digest", "")[:16]
    return build(spec, data if data.is_dir() else None, packages[0], packages[1], names)
