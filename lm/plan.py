"""Explainable caching: which stages a run would skip, which it would run, and why.

After each successful run the inputs of its cached stages are recorded in
``<workdir>/last/<pipeline>.json``. ``plan`` recomputes the inputs now (hashing source files, running
nothing), looks them up in the stage caches, and explains every miss by the keys that changed since
that record.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lm import data, shards
from lm.atomic import atomic_write_bytes
from lm.cache import inputs_key
from lm.config import DataConfig, TokenizerConfig, flatten

UNCACHED = ("train", "evaluate", "register")


@dataclass(frozen=True)
class StagePlan:
    stage: str
    status: str  # "cached" | "run" | "resume" | "refused"
    reason: str


@dataclass(frozen=True)
class PendingResume:
    """An interrupted run the next run would continue (the caller finds it; this library reads no store)."""

    run_id: str
    step: int | None
    finished: bool = False
    """Its training finished: the next run goes straight to evaluation."""
    refused: str | None = None
    """Why the next run would refuse to resume it (changed settings), instead."""


def record_success(workdir: Path, pipeline: str, ingest_inputs: dict, tokenize_inputs: dict) -> None:
    """Remember what the cached stages of a successful run were built from."""
    record = {"ingest": ingest_inputs, "tokenize": tokenize_inputs}
    atomic_write_bytes(Path(workdir) / "last" / f"{pipeline}.json", json.dumps(record, indent=1).encode())


def last_success(workdir: Path, pipeline: str) -> dict | None:
    try:
        return json.loads((Path(workdir) / "last" / f"{pipeline}.json").read_text())
    except (OSError, ValueError):
        return None


def changes(before: dict | None, now: dict) -> list[str]:
    """Human-readable differences between two input records, e.g. ``tokenizer.vocab_size: 512 → 1024``."""
    if before is None:
        return ["no earlier successful run of this pipeline"]
    old, new = flatten(before), flatten(now)
    out = []
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) == new.get(key):
            continue
        if key.startswith("source_files."):
            name = key.removeprefix("source_files.files.")
            what = "added" if key not in old else "removed" if key not in new else "changed"
            out.append(f"file {name} {what}")
        elif key == "code":
            out.append("the stage's code changed")
        elif key == "data_digest":
            out.append("its input corpus changed")
        else:
            out.append(f"{key}: {old.get(key)!r} → {new.get(key)!r}")
    return out


def plan(
    pipeline: str,
    data_cfg: DataConfig,
    tokenizer_cfg: TokenizerConfig | None,
    *,
    workdir: Path,
    base_dir: Path,
    resume: PendingResume | None = None,
    init_from: str | None = None,
    verify: bool = False,
) -> list[StagePlan]:
    """Predict, without running anything, which stages the next run skips and why the others run;
    ``resume``: the interrupted run the next run would continue, when there is one; ``init_from``: the model
    the run starts from (whose tokenizer only the run resolves); ``verify``: re-hash the cached corpus and token
    shards (a hit is otherwise checked by file sizes) — damaged ones are set aside for the next run to rebuild."""
    if init_from is not None:

        def cached(key: str) -> dict | None:
            corpus = data.cached_corpus(Path(workdir) / "data", key)
            return (
                None if corpus is None else {"digest": corpus.digest, "corpus": f"{sum(corpus.chars.values()):,} chars"}
            )

        return plan_examples(pipeline, lambda: data.ingest_inputs(data_cfg, Path(base_dir)), cached, what="corpus",
                             init_from=[init_from], workdir=workdir, resume=resume)  # fmt: skip
    workdir, last = Path(workdir), last_success(Path(workdir), pipeline) or {}
    try:
        ingest_now = data.ingest_inputs(data_cfg, Path(base_dir), root=None if verify else workdir / "data")
    except (OSError, ValueError) as e:
        return [StagePlan("ingest", "run", f"will fail: {e}")] + _rest("tokenize", "depends on ingest", resume)
    if verify and (damage := data.verify_corpus(workdir / "data", inputs_key(ingest_now))):
        return [StagePlan("ingest", "run", _damaged(damage))] + _rest(
            "tokenize", "depends on ingest, which runs (reused if the corpus comes out identical)", resume
        )
    corpus = data.cached_corpus(workdir / "data", inputs_key(ingest_now))
    if corpus is None:
        why = changes(last.get("ingest"), ingest_now) or ["cached corpus missing or altered on disk"]
        return [StagePlan("ingest", "run", "; ".join(why))] + _rest(
            "tokenize", "depends on ingest, which runs (reused if the corpus comes out identical)", resume
        )
    checked = " (re-hashed: intact)" if verify else ""
    stages = [StagePlan("ingest", "cached", f"digest {corpus.digest[:12]}…{checked}")]
    tokenize_now = shards.tokenize_inputs(corpus.digest, tokenizer_cfg)
    key = inputs_key(tokenize_now)
    if verify and (damage := shards.verify_tokens(workdir / "tokens", key)):
        stages.append(StagePlan("tokenize", "run", _damaged(damage)))
    elif (hit := shards.cached_tokens(workdir / "tokens", key)) is not None:
        count, splits = sum(map(len, hit.get("shards", {}).values())) or len(hit["tokens"]), len(hit["tokens"])
        stages.append(StagePlan("tokenize", "cached", f"{sum(hit['tokens'].values()):,} tokens ({splits} splits, "
                                f"{count} shards), key {hit['key'][:12]}…{checked}"))  # fmt: skip
    else:
        why = changes(last.get("tokenize"), tokenize_now) or ["cached tokens missing or altered on disk"]
        stages.append(StagePlan("tokenize", "run", "; ".join(why)))
    return stages + _rest(None, None, resume)


def _damaged(problems: list[str]) -> str:
    return f"damaged on disk: {'; '.join(problems)} — set aside, the next run rebuilds it"


def plan_examples(
    pipeline: str, data: Callable[[], dict], cached: Callable[[str], dict | None], *, what: str, init_from: list[str],
    workdir: Path, resume: PendingResume | None = None,
) -> list[StagePlan]:  # fmt: skip
    """``plan`` for a pipeline of examples (a classifier's labelled texts, a seq2seq task's pairs): the data is
    explained like a corpus (``data()``: its inputs now; ``cached(key)``: the manifest cached under that key); the
    tokenize stage depends on the initialising models (``init_from``), which only a run resolves."""
    last = last_success(Path(workdir), pipeline) or {}
    where = [f"{uri} ({'imported from the folder' if uri.startswith('hf:') else 'looked up in the registry'})"
             for uri in init_from]  # fmt: skip
    init = [StagePlan("init-model", "run", f"resolves {', '.join(where)}")] if init_from else []
    try:
        now = data()
    except (OSError, ValueError) as e:
        return init + [StagePlan("ingest", "run", f"will fail: {e}")] + _rest("tokenize", "depends on ingest", resume)
    hit = cached(inputs_key(now))
    if hit is None:
        why = changes(last.get("ingest"), now) or [f"cached {what} missing or altered on disk"]
        return init + [StagePlan("ingest", "run", "; ".join(why))] + _rest("tokenize", "depends on ingest", resume)
    tokenize = f"reused when the {what} and the tokenizer (the init model's, or one trained here) are unchanged"
    return (
        init
        + [StagePlan("ingest", "cached", f"digest {hit['digest'][:12]}…, {what} {hit[what]}")]
        + _rest("tokenize", tokenize, resume)
    )


def _rest(stage: str | None, reason: str | None, resume: PendingResume | None = None) -> list[StagePlan]:
    head = [StagePlan(stage, "run", reason)] if stage else []
    never = "never cached: every run trains, evaluates and registers"
    return head + [_train(resume)] + [StagePlan(s, "run", never) for s in UNCACHED if s != "train"]


def _train(resume: PendingResume | None) -> StagePlan:
    """The train row: a fresh run, the resume of an interrupted one, or a resume that will be refused."""
    if resume is None:
        return StagePlan("train", "run", "never cached: every run trains, evaluates and registers")
    if resume.refused is not None:
        return StagePlan("train", "refused", resume.refused)
    if resume.finished:
        return StagePlan(
            "train", "resume", f"done at step {resume.step} in run {resume.run_id[:8]}; goes on to evaluate"
        )
    return StagePlan("train", "resume", f"resume from step {resume.step} of run {resume.run_id[:8]}")
