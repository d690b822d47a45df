"""The ``Task`` seam: what a pipeline's task contributes to the one flow. The flow calls these in the same
order for every task — init model (when ``init_from``) → prepare → encode → fit → evaluate → export →
register (``version_tags``, ``served``) → report (``card``) — and the sweep, the torchrun worker, the champion
gate, ``lmp plan`` and the served model use the same object. A task is built from its pipeline spec (the
spec's sections it reads are its own business); its stage results are the typed models of ``lm.results``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Protocol

from torch import nn

from lm.plan import PendingResume, StagePlan
from lm.report import Card, DatasetRecord
from lm.results import Encoded, Evaluation, Init, Package, Prepared, Served, Trained
from lm.runtime import Runtime


def init_tags(init: Init | None) -> dict[str, str]:
    """Tags naming the registered models a pipeline started from: ``lmp.init_*`` (``init_from``) and
    ``lmp.<role>_*`` for each of its parts (an encoder–decoder's ``encoder``); ``scratch`` without one."""
    if init is None:
        return {"lmp.init_from": "scratch"}
    tags = {"lmp.init_from": init.requested, "lmp.init_model": init.uri, "lmp.init_run_id": init.run_id or "",
            "lmp.init_weights_digest": init.weights_digest}  # fmt: skip
    for role, part in init.parts.items():
        tags |= {f"lmp.{role}_from": part.requested, f"lmp.{role}_model": part.uri,
                 f"lmp.{role}_weights_digest": part.weights_digest}  # fmt: skip
    return tags


class Task(Protocol):
    name: ClassVar[str]
    data_root: ClassVar[str]
    """Folder of the work directory for prepared data (the gate's champion re-evaluation reads it too)."""
    tokens_root: ClassVar[str]
    encoded_type: ClassVar[type[Encoded]]
    summary_metrics: ClassVar[tuple[str, ...]]
    """The metrics `lmp run`'s summary shows when the run logged them (each named in ``lm.metrics``)."""

    def init_from(self) -> str | None:
        """The registered model this pipeline starts from (``models:/NAME@ALIAS``), None from scratch."""

    def init_parts(self) -> dict[str, str]:
        """Further registered models the task starts from, by role (an encoder–decoder's ``encoder``); each is
        resolved into ``Init.parts`` beside ``init_from``'s."""

    def check_init(self, init: Init) -> None:
        """Refuse (DataError) initialising packages (``init`` and its ``parts``) this task cannot start from."""

    def prepare(self, root: Path, *, base_dir: Path) -> Prepared:
        """Ingest: read, clean, split (cached by content under ``root``)."""

    def encode(self, prepared: Prepared, init: Init | None, root: Path) -> Encoded:
        """Tokenize: the data as ids (cached by key under ``root``)."""

    def ingest_key(self, base_dir: Path) -> str:
        """The cache key ``prepare`` would look up now (its inputs hashed; nothing is built)."""

    def tokens_key(self, data_digest: str) -> str | None:
        """The cache key ``encode`` would look up for prepared data ``data_digest`` (None: known only in a run)."""

    def describe(self) -> str:
        """One line naming the data source."""

    def dataset(self, prepared: Prepared) -> DatasetRecord:
        """The run's dataset input for tracking."""

    def params(self, encoded: Encoded, init: Init | None) -> dict:
        """Parameters a run logs besides its spec (e.g. the architecture an initialised model brings)."""

    def lineage_tags(self, init: Init | None) -> dict[str, str]:
        """Tags naming what the model started from."""

    def fit(self, encoded: Encoded, init: Init | None, out: Path, *, on_start: Callable | None = None,
            **hooks) -> Trained:  # fmt: skip
        """Build the model (seeded), train it with ``lm.training.train`` and write ``out/final``."""

    def evaluate(self, encoded: Encoded, trained: Trained, init: Init | None) -> Evaluation:
        """Metrics on the held-out splits, the summary text and the samples."""

    def export(self, encoded: Encoded, trained: Trained, init: Init | None, out_dir: Path) -> Package:
        """The package a served model needs (``lm.package``)."""

    def served(self, evaluation: Evaluation, trained: Trained, encoded: Encoded) -> Served:
        """The registered model's example input/output and parameters."""

    def version_tags(self, evaluation: Evaluation) -> dict[str, str]:
        """Tags of the registered version besides provenance (metrics, labels …)."""

    def card(self, encoded: Encoded, trained: Trained, evaluation: Evaluation, init: Init | None) -> Card:
        """The task's part of the model card."""

    def evaluate_package(self, package: Package, data_path: Path, runtime: Runtime) -> dict[str, float]:
        """A packaged model (the champion) scored on this run's validation data at ``data_path``."""

    def plan(
        self, workdir: Path, base_dir: Path, resume: PendingResume | None, *, verify: bool = False
    ) -> list[StagePlan]:
        """What the next run reuses from cache and why the other stages run (`lmp plan`); ``verify``: re-hash
        what a hit is otherwise trusted by size (a language model's corpus and token shards; examples and pairs
        are re-hashed on every hit)."""

    @staticmethod
    def build_packaged(config: dict) -> nn.Module:
        """The untrained model a package's config.json describes (its weights are loaded by ``lm.package``)."""
