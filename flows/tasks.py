"""Thin Prefect tasks around ``lm.stages``: small values in and out (paths, digests, ids, metrics).

Stage outputs are content-addressed directories under the work directory, so an unchanged stage
reuses what is already on disk. Prefect's own result caching is off: results are small dicts
recomputed cheaply, and nothing is pickled.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from flows import registry, tracking
from flows.config import PipelineSpec
from lm import stages
from lm.config import DataConfig, TokenizerConfig

OPTS = {"cache_policy": NONE, "persist_result": False}


@task(name="ingest", **OPTS)
def ingest(data: DataConfig, workdir: str, context_length: int) -> dict:
    return stages.ingest(data, Path(workdir) / "data", context_length=context_length)


@task(name="tokenize", **OPTS)
def tokenize(corpus: dict, tokenizer: TokenizerConfig, workdir: str) -> dict:
    return stages.tokenize(corpus, tokenizer, Path(workdir) / "tokens")


@task(name="train", **OPTS)
def train(tokens: dict, spec: PipelineSpec, run_id: str, workdir: str) -> dict:
    out = Path(workdir) / "runs" / run_id
    with tracking.MetricSink(run_id) as sink:
        result = stages.fit(
            tokens,
            spec.model,
            spec.train,
            out,
            on_metrics=sink,
            on_start=lambda card: tracking.log_params(run_id, card),
        )
    summary = {"wall_seconds": result["wall_seconds"], "tokens_per_second": result["tokens_per_second"]}
    tracking.log_metrics(run_id, summary, step=result["steps"])
    return result


@task(name="evaluate", **OPTS)
def evaluate(tokens: dict, trained: dict, spec: PipelineSpec, run_id: str) -> dict:
    result = stages.evaluate(tokens, trained["checkpoint"], spec.model, spec.train, spec.eval)
    tracking.log_evaluation(run_id, result, step=trained["steps"])
    return result


@task(name="register", **OPTS)
def register(tokens: dict, trained: dict, evaluated: dict, spec: PipelineSpec, run_id: str, workdir: str) -> dict:
    files = stages.export_model(
        trained["checkpoint"], tokens, spec.model, spec.eval, Path(workdir) / "runs" / run_id / "export"
    )
    tags = {
        "data_digest": tokens["data_digest"],
        "tokenizer_digest": tokens["tokenizer_digest"],
        "config_digest": spec.digest(),
        "git_commit": registry.git_commit(),
        **{k: f"{v:.6g}" for k, v in evaluated["metrics"].items()},
    }
    return registry.log_and_register(run_id, spec.name, files, tags, spec.eval.prompt)
