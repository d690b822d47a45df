"""Seq2seq stages as pure functions from configs and typed results (``lm.results``) to typed results.

prepare (source → target pairs) → encode (with the initialising model's tokenizer, or one trained on the training
pairs; cut to the model's lengths) → fit (the one training loop; the loss on target tokens) → evaluate (loss on
targets, decoded outputs scored with the application's metrics beside its baseline) → export.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from lm import package as packaging
from lm.cache import Entry, StageCache
from lm.checkpoint import load_checkpoint, sha256_file
from lm.config import TokenizerConfig, TrainConfig
from lm.errors import DataError
from lm.results import EncodedPairs, Evaluation, PairDataset, Trained
from lm.runtime import Runtime, resolve_runtime
from lm.seq2seq import metrics as scoring
from lm.seq2seq.config import DecodeConfig
from lm.seq2seq.data import build_pairs, read_pairs
from lm.seq2seq.decoding import decode
from lm.seq2seq.model import Seq2Seq
from lm.seq2seq.pairs import PairBatches, Pairs, encode_pairs, target_loss
from lm.tokenizers import CharTokenizer, load_tokenizer, tokenizer_digest, train_tokenizer
from lm.training import fit as fit_model
from lm.versions import code_digest

SPLITS = ("train", "val", "test")
MAX_UNKNOWN = 0.05
"""The largest fraction of training-target characters a tokenizer may be unable to write."""


def prepare(cfg, root: Path, *, base_dir: Path) -> PairDataset:
    """Pairs split into ``root/<digest>`` (or reused)."""
    return PairDataset.model_validate(build_pairs(cfg, Path(root), base_dir=Path(base_dir)))


def _unknown(tok, texts: list[str]) -> tuple[float, list[str]]:
    """The fraction of characters of ``texts`` a char tokenizer maps to its unknown id, and a few of them."""
    if not isinstance(tok, CharTokenizer) or not texts:
        return 0.0, []
    known = set(tok.chars)
    missing = [c for text in texts for c in text if c not in known]
    return len(missing) / max(1, sum(map(len, texts))), sorted(set(missing))[:8]


def encode(dataset: PairDataset, tokenizer: TokenizerConfig | Path, root: Path, *, lengths: dict,
           target_lang: str | None = None) -> EncodedPairs:  # fmt: skip
    """Tokenize every split with ``tokenizer`` — a tokenizer.json (the initialising model's, so ids mean what they
    meant in pretraining) or a config to train one on the training pairs — cut to ``lengths`` (``max_source``,
    ``max_target``, ``total``) into ``root/<key>``. A tokenizer that cannot write the targets is refused.
    ``target_lang`` (when the source names one) chooses BLEU's tokenizer later (``zh``)."""
    root, train_rows = Path(root), read_pairs(Path(dataset.path), "train")
    if isinstance(tokenizer, Path | str):
        tok, source = load_tokenizer(Path(tokenizer)), "init model"
    else:
        text = "\n".join(r["source"] + "\n" + r["target"] for r in train_rows)
        tok, source = train_tokenizer(tokenizer, text), tokenizer.kind
    unknown, examples = _unknown(tok, [r["target"] for r in train_rows])
    if unknown > MAX_UNKNOWN:
        raise DataError(
            f"the tokenizer ({source}) cannot write {unknown:.1%} of the training targets' characters "
            f"(e.g. {' '.join(examples)}): initialise from a model with a byte-level BPE tokenizer, or train from "
            "scratch with a tokenizer learnt on these pairs"
        )
    digest = tokenizer_digest(tok)
    inputs = {
        "data_digest": dataset.digest,
        "tokenizer_digest": digest,
        "lengths": lengths,
        "code": code_digest("lm.seq2seq.pairs", "lm.tokenizers"),
    }

    def intact(entry: Entry) -> bool:
        files = entry.manifest["files"]
        return all(sha256_file(entry.path / f) == h for f, h in files.items())

    def build(tmp: Path) -> dict:
        tok.save(tmp / "tokenizer.json")
        counts, truncated, unknowns = {}, {}, {}
        for split in SPLITS:
            rows = read_pairs(Path(dataset.path), split)
            if rows:
                pairs, cut = encode_pairs(tok, rows, max_source=lengths["max_source"],
                                          max_target=lengths["max_target"], total=lengths["total"])  # fmt: skip
                pairs.save(tmp / f"{split}.safetensors")
                counts[split], truncated[split] = len(rows), {"source": cut.source, "target": cut.target}
                unknowns[split] = round(_unknown(tok, [r["target"] for r in rows])[0], 6)
        files = {f.name: sha256_file(f) for f in tmp.iterdir()}
        return {"files": files, "pairs": counts, "truncated": truncated, "unknown": unknowns, **inputs}

    entry = StageCache(root, intact).get_or_build(inputs, build)
    return EncodedPairs(
        path=str(entry.path),
        key=entry.key,
        cached=entry.cached,
        inputs=inputs,
        data_digest=dataset.digest,
        tokenizer_digest=digest,
        vocab_size=tok.vocab_size,
        dataset_path=dataset.path,
        tokenizer_source=source,
        application=dataset.application,
        pairs=entry.manifest["pairs"],
        truncated=entry.manifest["truncated"],
        unknown=entry.manifest["unknown"],
        lengths=lengths,
        target_lang=target_lang,
    )


def load_split(encoded: EncodedPairs, split: str) -> Pairs:
    return Pairs.load(Path(encoded.path) / f"{split}.safetensors")


def fit(encoded: EncodedPairs, build, train_cfg: TrainConfig, out_dir: Path, state: dict, **hooks) -> Trained:
    """Build the model (``build``: seeded by ``lm.training.fit``, warm-started by the task), train it on the pairs
    and write ``out_dir/final`` (``hooks``: ``lm.training.fit``'s keyword arguments)."""

    def data(model: Seq2Seq) -> tuple[PairBatches, PairBatches]:
        train_pairs, val_pairs = load_split(encoded, "train"), load_split(encoded, "val")
        for split, pairs in (("train", train_pairs), ("val", val_pairs)):
            top = max(int(pairs.source.max(initial=0)), int(pairs.target.max(initial=0)))
            if top >= model.base_vocab:
                raise DataError(f"{split} token ids reach {top} but the model has {model.base_vocab}: the tokenizer "
                                "does not belong to the initialising model")  # fmt: skip
        return PairBatches(train_pairs), PairBatches(val_pairs)

    def card(model: Seq2Seq) -> dict:
        return {"architecture": model.architecture, "trainable_parameters": model.num_parameters()}

    state = state | {"tokenizer_digest": encoded.tokenizer_digest, "data_digest": encoded.data_digest,
                     "lengths": encoded.lengths}  # fmt: skip
    return fit_model(build, data, train_cfg, Path(out_dir), state, card=card, **hooks)


def load_model(checkpoint: Path, model: Seq2Seq) -> Seq2Seq:
    load_checkpoint(Path(checkpoint), model)
    return model.eval()


def evenly(n: int, k: int | None) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``k`` is None or at least ``n``)."""
    if k is None or k >= n:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, k)})


def outputs(model: Seq2Seq, tok, pairs: Pairs, index: list[int], decoding: DecodeConfig, runtime: Runtime,
            seed: int = 0) -> list[str]:  # fmt: skip
    """The decoded text of pairs ``index`` (their sources as encoded, i.e. cut to the model's lengths)."""
    model = model.to(runtime.device)
    texts = []
    with runtime.autocast():
        for i in index:
            ids = decode(
                model, pairs.row(i)[0], max_new_tokens=decoding.max_new_tokens, num_beams=decoding.num_beams,
                length_penalty=decoding.length_penalty, temperature=decoding.temperature, seed=seed,
            )  # fmt: skip
            texts.append(tok.decode([t for t in ids if t < model.base_vocab]))
    return texts


def split_metrics(model: Seq2Seq, tok, encoded: EncodedPairs, split: str, decoding: DecodeConfig,
                  runtime: Runtime, train_targets: list[str]) -> tuple[dict, dict, list[dict]]:  # fmt: skip
    """A split's loss on targets, its decoded outputs' metrics and baseline, the signatures, and its rows."""
    pairs = load_split(encoded, split)
    loss, count = target_loss(model.to(runtime.device), pairs, device=runtime.device,
                              autocast_dtype=runtime.amp_dtype)  # fmt: skip
    metrics = {f"{split}_target_loss": loss, f"{split}_target_perplexity": math.exp(min(loss, 50.0)),
               f"{split}_target_tokens": float(count)}  # fmt: skip
    rows = read_pairs(Path(encoded.dataset_path), split)
    index = evenly(len(rows), decoding.eval_pairs)
    hyps = outputs(model, tok, pairs, index, decoding, runtime)
    refs, sources = [rows[i]["target"] for i in index], [rows[i]["source"] for i in index]
    scored, signatures = scoring.score(encoded.application, hyps, refs, prefix=split, target_lang=encoded.target_lang)
    metrics |= scored | scoring.baseline(encoded.application, sources, refs, train_targets, prefix=split,
                                         target_lang=encoded.target_lang)  # fmt: skip
    shown = [{"source": s, "reference": r, "output": h} for s, r, h in zip(sources, refs, hyps, strict=True)]
    return metrics, signatures, shown


def evaluate(encoded: EncodedPairs, checkpoint: Path, model: Seq2Seq, decoding: DecodeConfig,
             train_cfg: TrainConfig) -> Evaluation:  # fmt: skip
    """Validation (and test) loss on targets, metrics of the decoded outputs beside the baseline, and samples."""
    runtime = resolve_runtime(train_cfg)
    model = load_model(checkpoint, model)
    tok = load_tokenizer(encoded.tokenizer_file)
    train_targets = [r["target"] for r in read_pairs(Path(encoded.dataset_path), "train")]
    metrics, signatures, shown = {}, {}, {}
    for split in [s for s in ("val", "test") if s in encoded.pairs]:
        m, signatures, shown[split] = split_metrics(model, tok, encoded, split, decoding, runtime, train_targets)
        metrics |= m
    samples = shown["val"][:: max(1, len(shown["val"]) // decoding.samples)][: decoding.samples]
    how = "greedy" if decoding.num_beams == 1 and decoding.temperature == 0 else (
        f"beam search ({decoding.num_beams} beams, length penalty {decoding.length_penalty:g})"
        if decoding.num_beams > 1 else f"sampling at temperature {decoding.temperature:g}")  # fmt: skip
    protocol = (
        f"{encoded.application}: {len(shown['val'])} of {encoded.pairs['val']} validation pairs decoded ({how}); "
        "signatures: " + "; ".join(f"{k}: {v}" for k, v in signatures.items())
    )
    tables = {f"evaluation/outputs_{split}.json": rows for split, rows in shown.items()}
    tables["evaluation/signatures.json"] = [{"metric": k, "signature": v} for k, v in signatures.items()]
    return Evaluation(metrics=metrics, summary=samples_text(samples), samples=samples, protocol=protocol,
                      tables=tables)  # fmt: skip


def samples_text(samples: list[dict]) -> str:
    """Example outputs, one per line, for the terminal."""
    lines = []
    for s in samples:
        mark = "✓" if s["output"].strip() == s["reference"].strip() else "·"
        source = " / ".join(s["source"].strip().splitlines())
        lines.append(f"{mark} {source[:60]} → {s['output'][:60]!r} (reference {s['reference'][:40]!r})")
    return "\n".join(lines)


def source_ids(tok, text: str, config: dict, max_new_tokens: int) -> list[int]:
    """A request's source as a served model reads it: cut like the training sources (for a decoder, to what its
    context leaves after ``max_new_tokens`` of output)."""
    lengths = config["lengths"]
    room = lengths["max_source"]
    if lengths.get("total") is not None:
        room = max(1, min(room, lengths["total"] - 2 - max_new_tokens))
    return (tok.encode(text) or [0])[:room]


def evaluate_package(package, dataset_path: Path, runtime: Runtime) -> dict[str, float]:
    """A packaged seq2seq model's validation metrics on another run's pairs, read with its own tokenizer and
    lengths and decoded as it was evaluated. NaN when the application differs (nothing to compare)."""
    loaded = packaging.load(package)
    config = loaded.config
    manifest = json.loads((Path(dataset_path) / "manifest.json").read_text())
    if manifest.get("application") != config["application"]:
        return {f"val_{scoring.HEADLINE[config['application']]}": math.nan}
    rows = read_pairs(Path(dataset_path), "val")
    decoding = DecodeConfig.model_validate(config["decode"])
    pairs, _ = encode_pairs(loaded.tokenizer, rows, max_source=config["lengths"]["max_source"],
                            max_target=config["lengths"]["max_target"], total=config["lengths"]["total"])  # fmt: skip
    index = evenly(len(rows), decoding.eval_pairs)
    hyps = outputs(loaded.model, loaded.tokenizer, pairs, index, decoding, runtime)
    loss, _ = target_loss(loaded.model.to(runtime.device), pairs, device=runtime.device,
                          autocast_dtype=runtime.amp_dtype)  # fmt: skip
    scored, _ = scoring.score(config["application"], hyps, [rows[i]["target"] for i in index], prefix="val",
                              target_lang=config.get("target_lang"))  # fmt: skip
    return scored | {"val_target_loss": loss, "val_target_perplexity": math.exp(min(loss, 50.0))}
