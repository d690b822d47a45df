"""The pipeline's stages as pure functions from paths and configs to paths and small dicts.

Orchestration (Prefect) and tracking (MLflow) wrap these in ``flows/``; nothing here knows about
either. Each stage returns JSON-serialisable values only, so tasks pass paths and digests, never
tensors or models.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lm.checkpoint import load_checkpoint, verify_checkpoint
from lm.config import DataConfig, EvalConfig, ModelConfig, TokenizerConfig, TrainConfig
from lm.data import build_corpus, summary
from lm.errors import DataError
from lm.evaluation import PROTOCOL, lm_metrics, mean_loss
from lm.generation import generate
from lm.models import build_model
from lm.shards import check_vocabulary, open_tokens, tokenize_corpus
from lm.tokenizers import load_tokenizer
from lm.training import MetricSink, resolve_device, resolve_precision, train


def ingest(cfg: DataConfig, root: Path, *, base_dir: Path, context_length: int) -> dict:
    """Clean and split the corpus into ``root/<digest>`` (or reuse it); returns path, digest, counts."""
    corpus, report = build_corpus(cfg, Path(root), base_dir=Path(base_dir), min_chars=context_length + 1)
    return summary(corpus, report)


def tokenize(corpus: dict, cfg: TokenizerConfig, root: Path, *, context_length: int) -> dict:
    """Train the tokenizer on the training split and write token files (or reuse them); the manifest."""
    return tokenize_corpus(Path(corpus["path"]), corpus["digest"], cfg, Path(root), min_tokens=context_length + 1)


def _split(tokens: dict, split: str) -> np.memmap:
    return open_tokens(Path(tokens["path"]) / f"{split}.bin", tokens["dtype"])


def model_card(model: torch.nn.Module) -> dict:
    """Sizes every run reports: parameters (tied output counted once) and training FLOPs per token,
    plus the training objective and the width of ``encode()`` features."""
    with torch.no_grad():
        feature_dim = model.encode(torch.zeros(1, 1, dtype=torch.long)).shape[-1]
    return {
        "objective": model.objective,
        "feature_dim": int(feature_dim),
        "num_parameters": model.num_parameters(),
        "num_parameters_non_embedding": model.num_parameters(non_embedding=True),
        "flops_per_token": model.flops_per_token(),
    }


def fit(
    tokens: dict,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out_dir: Path,
    *,
    on_metrics: MetricSink,
    on_start: Callable[[dict], None] | None = None,
    resume_from: Path | None = None,
    before_checkpoint: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    peak_flops: float | None = None,
) -> dict:
    """Build the model (seeded), train it (or resume from a step checkpoint) and write ``out_dir/final``.

    A resume whose checkpoint was made with another model, tokenizer or corpus is refused, naming them.
    """
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg, tokens["vocab_size"])
    card = model_card(model)
    if on_start is not None:
        on_start(card)
    train_split, val_split = _split(tokens, "train"), _split(tokens, "val")
    check_vocabulary(
        train_split, tokens["vocab_size"], tokenizer_digest=tokens["tokenizer_digest"], model_vocab=model.vocab_size
    )
    state = {
        "model": model_cfg.model_dump(mode="json"),
        "vocab_size": tokens["vocab_size"],
        "tokenizer_digest": tokens["tokenizer_digest"],
        "data_digest": tokens["data_digest"],
    }
    if resume_from is not None:
        saved = verify_checkpoint(resume_from)
        differing = sorted(k for k, v in state.items() if saved.get(k) != v)
        if differing:
            raise DataError(
                f"cannot resume from {resume_from}: its {', '.join(differing)} differ from this run's; "
                "pass --fresh to start over"
            )
    result = train(
        model,
        train_split,
        val_split,
        train_cfg,
        on_metrics=on_metrics,
        checkpoint_dir=Path(out_dir),
        checkpoint_state=state,
        resume_from=resume_from,
        before_checkpoint=before_checkpoint,
        should_stop=should_stop,
        peak_flops=peak_flops,
    )
    return card | {
        "checkpoint": str(result.checkpoint),
        "steps": result.steps,
        "train_loss": result.train_loss,
        "wall_seconds": result.wall_seconds,
        "tokens_per_second": result.tokens_per_second,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
    }


def load_trained(checkpoint: Path, model_cfg: ModelConfig, vocab_size: int) -> torch.nn.Module:
    """Rebuild the architecture and load verified weights from a checkpoint directory."""
    model = build_model(model_cfg, vocab_size)
    load_checkpoint(Path(checkpoint), model)
    return model.eval()


def evaluate(
    tokens: dict, checkpoint: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, eval_cfg: EvalConfig
) -> dict:
    """Validation loss / perplexity / bits per char over the whole split, and a generated sample."""
    device = resolve_device(train_cfg.device)
    amp_dtype = resolve_precision(train_cfg.precision, device)
    model = load_trained(checkpoint, model_cfg, tokens["vocab_size"]).to(device)
    val_split = _split(tokens, "val")
    loss, count = mean_loss(
        model,
        val_split,
        context_length=model.context_length,
        batch_size=train_cfg.batch_size,
        device=device,
        autocast_dtype=amp_dtype,
    )
    tok = load_tokenizer(Path(tokens["path"]) / "tokenizer.json")
    if model.objective == "mlm":  # masked-token loss is not a text likelihood: no bits per character
        metrics = {"val_mlm_loss": loss, "val_mlm_perplexity": math.exp(min(loss, 50.0)), "val_mlm_targets": count}
        sample = fill_in_sample(model, tok, val_split, device=device)
        return {"metrics": metrics, "protocol": PROTOCOL + "; masked positions seeded", "sample": sample}
    # Characters covered by the predicted tokens (all but the first), for bits per character.
    chars = tokens["chars"]["val"] * count / tokens["tokens"]["val"]
    new = generate(
        model,
        tok.encode(eval_cfg.prompt),
        max_new_tokens=eval_cfg.max_new_tokens,
        temperature=eval_cfg.temperature,
        top_k=eval_cfg.top_k,
        seed=eval_cfg.seed,
        device=device,
    )
    return {
        "metrics": lm_metrics(loss, count, chars, prefix="val") | {"val_tokens": float(count)},
        "protocol": PROTOCOL,
        "sample": eval_cfg.prompt + tok.decode(new),
    }


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


def export_model(
    checkpoint: Path, tokens: dict, model_cfg: ModelConfig, eval_cfg: EvalConfig, out_dir: Path
) -> dict[str, str]:
    """Files a served model needs: weights, config.json, tokenizer.json. Returns name → path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "model": model_cfg.model_dump(mode="json"),
        "vocab_size": tokens["vocab_size"],
        "generation": eval_cfg.model_dump(mode="json"),
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return {
        "weights": str(Path(checkpoint) / "model.safetensors"),
        "config": str(out_dir / "config.json"),
        "tokenizer": str(Path(tokens["path"]) / "tokenizer.json"),
    }
