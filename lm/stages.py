"""The language model's stages as pure functions from configs and typed results (``lm.results``) to typed
results: ingest → ``Corpus``, tokenize → ``TokenShards``, fit → ``Trained``, evaluate → ``Evaluation``.
``lm.tasks.language_model`` calls them; orchestration (Prefect) and tracking (MLflow) wrap that in ``flows/``
and nothing here knows about either. Tasks pass paths and digests, never tensors or models.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from lm import package as packaging
from lm.batches import TokenBatches
from lm.checkpoint import load_checkpoint, load_weights
from lm.config import DataConfig, DataWorkers, EvalConfig, ModelConfig, TokenizerConfig, TrainConfig
from lm.data import build_corpus, summary
from lm.evaluation import PROTOCOL, lm_metrics, mean_loss, score_split
from lm.generation import generate
from lm.models import build_model
from lm.results import Corpus, Evaluation, Init, Package, TokenShards, Trained
from lm.runtime import Runtime, resolve_runtime
from lm.shards import check_vocabulary, open_tokens, tokenize_corpus
from lm.tokenizers import Tokenizer, encode_array, load_tokenizer
from lm.training import fit as fit_model


def ingest(cfg: DataConfig, root: Path, *, base_dir: Path, context_length: int) -> Corpus:
    """Clean and split the corpus into ``root/<digest>`` (or reuse it)."""
    corpus, report = build_corpus(cfg, Path(root), base_dir=Path(base_dir), min_chars=context_length + 1)
    return Corpus.model_validate(summary(corpus, report))


def tokenize(
    corpus: Corpus, cfg: TokenizerConfig | Tokenizer, root: Path, *, context_length: int,
    workers: DataWorkers = DataWorkers(),
) -> TokenShards:  # fmt: skip
    """Train the tokenizer on the training split (or use the given one) and write token files, shard by shard
    as ``workers`` says (or reuse them); the manifest holds a word tokenizer's out-of-vocabulary rate per split."""
    found = tokenize_corpus(
        Path(corpus.path), corpus.digest, cfg, Path(root), min_tokens=context_length + 1, workers=workers
    )
    return TokenShards.model_validate(found)


def _split(tokens: TokenShards, split: str) -> np.memmap:
    return open_tokens(Path(tokens.path) / f"{split}.bin", tokens.dtype)


def fit(
    tokens: TokenShards, model_cfg: ModelConfig, train_cfg: TrainConfig, out_dir: Path, *, init: Init | None = None,
    **hooks,
) -> Trained:  # fmt: skip
    """Build the model (seeded; from ``init``'s weights when given), train it (or resume from a step checkpoint)
    and write ``out_dir/final`` (``hooks``: ``lm.training.fit``'s keyword arguments). A resume whose checkpoint
    was made with another model, tokenizer, corpus or initialising model is refused, naming them."""

    def build() -> torch.nn.Module:
        model = build_model(model_cfg, tokens.vocab_size)
        return load_weights(Path(init.package.weights), model) if init is not None else model

    def data(model) -> tuple[TokenBatches, TokenBatches]:
        train_split, val_split = _split(tokens, "train"), _split(tokens, "val")
        check_vocabulary(
            train_split, tokens.vocab_size, tokenizer_digest=tokens.tokenizer_digest, model_vocab=model.vocab_size
        )
        return TokenBatches(train_split), TokenBatches(val_split)

    state = {
        "model": model_cfg.model_dump(mode="json"),
        "vocab_size": tokens.vocab_size,
        "tokenizer_digest": tokens.tokenizer_digest,
        "data_digest": tokens.data_digest,
    } | ({"init_weights": init.weights_digest} if init is not None else {})
    return fit_model(build, data, train_cfg, Path(out_dir), state, **hooks)


def load_trained(checkpoint: Path, model_cfg: ModelConfig, vocab_size: int) -> torch.nn.Module:
    """Rebuild the architecture and load verified weights from a checkpoint directory."""
    model = build_model(model_cfg, vocab_size)
    load_checkpoint(Path(checkpoint), model)
    return model.eval()


def evaluate(
    tokens: TokenShards, checkpoint: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, eval_cfg: EvalConfig
) -> Evaluation:
    """Loss, perplexity, bits per char and next-token accuracy over the whole validation split (and the
    test split when the corpus has one), the summary sample and one sample per prompt of ``eval_cfg``."""
    runtime = resolve_runtime(train_cfg)
    device, amp_dtype = runtime.device, runtime.amp_dtype
    model = load_trained(checkpoint, model_cfg, tokens.vocab_size).to(device)
    tok = load_tokenizer(tokens.tokenizer_file)
    metrics: dict[str, float] = {}
    for split in [s for s in ("val", "test") if s in tokens.tokens]:
        score = score_split(
            model,
            _split(tokens, split),
            context_length=model.context_length,
            batch_size=train_cfg.batch_size,
            device=device,
            autocast_dtype=amp_dtype,
        )
        if model.objective == "mlm":  # masked-token loss is not a text likelihood: no bits per character
            metrics |= {
                f"{split}_mlm_loss": score.loss,
                f"{split}_mlm_perplexity": math.exp(min(score.loss, 50.0)),
                f"{split}_mlm_targets": float(score.count),
            }
            continue
        # Characters covered by the predicted tokens (all but the first), for bits per character.
        chars = tokens.chars[split] * score.count / tokens.tokens[split]
        metrics |= lm_metrics(score.loss, score.count, chars, prefix=split)
        metrics |= {f"{split}_accuracy": score.accuracy, f"{split}_tokens": float(score.count)}
        if split in tokens.oov_rate:  # the mass `<unk>` predictions take from bits per character
            metrics[f"{split}_oov_rate"] = tokens.oov_rate[split]
    if model.objective == "mlm":
        sample = fill_in_sample(model, tok, _split(tokens, "val"), device=device)
        return Evaluation(metrics=metrics, summary=sample, protocol=PROTOCOL + "; masked positions seeded")
    samples = []
    for prompt in dict.fromkeys((eval_cfg.prompt, *eval_cfg.prompts)):  # the summary prompt first, no repeats
        new = generate(
            model,
            tok.encode(prompt) or [0],
            max_new_tokens=eval_cfg.max_new_tokens,
            temperature=eval_cfg.temperature,
            top_k=eval_cfg.top_k,
            seed=eval_cfg.seed,
            device=device,
        )
        samples.append({"prompt": prompt, "output": prompt + tok.decode(new)})
    return Evaluation(metrics=metrics, summary=samples[0]["output"], samples=samples, protocol=PROTOCOL)


@torch.no_grad()
def fill_in_sample(model: torch.nn.Module, tok, tokens: np.ndarray, *, device, every: int = 6) -> str:
    """An encoder's demo: mask every ``every``-th token of the first validation window and fill it in."""
    ids = torch.from_numpy(np.asarray(tokens[: model.context_length]).astype(np.int64))[None].to(device)
    masked = ids.clone()
    masked[0, ::every] = model.mask_id
    filled = torch.where(masked == model.mask_id, model(masked).logits.argmax(-1), ids)
    shown = "".join("_" if i % every == 0 else tok.decode([int(t)]) for i, t in enumerate(ids[0]))
    return (
        f"masked:\n{shown}\n\nfilled in:\n{tok.decode(filled[0].tolist())}\n\noriginal:\n{tok.decode(ids[0].tolist())}"
    )


def evaluate_package(
    package: Package, corpus_path: Path, runtime: Runtime, *, split: str = "val", batch_size: int = 32
) -> dict[str, float]:
    """Metrics of a packaged model on a corpus split, the text tokenized with the package's own tokenizer — so
    models with different tokenizers, trained on other data, are compared on the same text (in bits per
    character)."""
    loaded = packaging.load(package)
    text = (Path(corpus_path) / f"{split}.txt").read_text(encoding="utf-8")
    ids = encode_array(loaded.tokenizer, text)
    model = loaded.model
    loss, count = mean_loss(
        model.to(runtime.device),
        ids,
        context_length=model.context_length,
        batch_size=batch_size,
        device=runtime.device,
        autocast_dtype=runtime.amp_dtype,
    )
    if model.objective == "mlm":
        return {f"{split}_mlm_loss": loss, f"{split}_mlm_perplexity": math.exp(min(loss, 50.0))}
    return lm_metrics(loss, count, len(text) * count / len(ids), prefix=split)
