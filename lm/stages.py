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

from lm.batches import TokenBatches
from lm.checkpoint import load_checkpoint, verify_checkpoint
from lm.config import DataConfig, EvalConfig, ModelConfig, TokenizerConfig, TrainConfig
from lm.data import build_corpus, summary
from lm.errors import DataError
from lm.evaluation import PROTOCOL, lm_metrics, mean_loss, score_split
from lm.generation import generate
from lm.models import build_model
from lm.runtime import resolve_runtime
from lm.shards import check_vocabulary, open_tokens, tokenize_corpus
from lm.tokenizers import load_tokenizer
from lm.training import train


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
    on_start: Callable[[dict], None] | None = None,
    **hooks,
) -> dict:
    """Build the model (seeded), train it (or resume from a step checkpoint) and write ``out_dir/final``.

    ``on_start(card)`` sees the model's sizes before training; ``hooks`` are ``train``'s keyword arguments
    (``on_metrics``, ``resume_from``, ``should_stop``, ``peak_flops``, ``dist`` …). A resume whose checkpoint
    was made with another model, tokenizer or corpus is refused, naming them.
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
    return card | run_training(
        model,
        TokenBatches(train_split),
        TokenBatches(val_split),
        train_cfg,
        Path(out_dir),
        state,
        **hooks,
    )


def run_training(model, train_data, val_data, train_cfg: TrainConfig, out_dir: Path, state: dict, *,
                 resume_from: Path | None = None, **hooks) -> dict:  # fmt: skip
    """``train`` with ``state`` saved in every checkpoint; a resume from a checkpoint whose state differs
    (another model, tokenizer, corpus, labels …) is refused, naming the keys. The result as a dict."""
    if resume_from is not None:
        saved = verify_checkpoint(resume_from)
        differing = sorted(k for k, v in state.items() if saved.get(k) != v)
        if differing:
            raise DataError(
                f"cannot resume from {resume_from}: its {', '.join(differing)} differ from this run's; "
                "pass --fresh to start over"
            )
    result = train(
        model, train_data, val_data, train_cfg, checkpoint_dir=Path(out_dir), checkpoint_state=state,
        resume_from=resume_from, **hooks,
    )  # fmt: skip
    return {
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
    """Loss, perplexity, bits per char and next-token accuracy over the whole validation split (and the
    test split when the corpus has one), the summary sample and one sample per prompt of ``eval_cfg``."""
    runtime = resolve_runtime(train_cfg)
    device, amp_dtype = runtime.device, runtime.amp_dtype
    model = load_trained(checkpoint, model_cfg, tokens["vocab_size"]).to(device)
    tok = load_tokenizer(Path(tokens["path"]) / "tokenizer.json")
    metrics: dict[str, float] = {}
    for split in [s for s in ("val", "test") if s in tokens["tokens"]]:
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
        chars = tokens["chars"][split] * score.count / tokens["tokens"][split]
        metrics |= lm_metrics(score.loss, score.count, chars, prefix=split)
        metrics |= {f"{split}_accuracy": score.accuracy, f"{split}_tokens": float(score.count)}
    if model.objective == "mlm":
        sample = fill_in_sample(model, tok, _split(tokens, "val"), device=device)
        return {"metrics": metrics, "protocol": PROTOCOL + "; masked positions seeded", "sample": sample, "samples": []}
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
    return {"metrics": metrics, "protocol": PROTOCOL, "sample": samples[0]["output"], "samples": samples}


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


def evaluate_files(
    files: dict[str, str | Path],
    corpus_path: Path,
    *,
    split: str = "val",
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Metrics of a packaged model (``weights``, ``config``, ``tokenizer`` files) on a corpus split, the text
    tokenized with the package's own tokenizer — so models with different tokenizers, trained on other
    data, are compared on the same text (in bits per character)."""
    from pydantic import TypeAdapter

    from lm.checkpoint import load_weights
    from lm.config import ModelConfig
    from lm.tokenizers import encode_array

    config = json.loads(Path(files["config"]).read_text(encoding="utf-8"))
    model_cfg = TypeAdapter(ModelConfig).validate_python(config["model"])
    model = load_weights(Path(files["weights"]), build_model(model_cfg, config["vocab_size"])).eval()
    tok = load_tokenizer(Path(files["tokenizer"]))
    text = (Path(corpus_path) / f"{split}.txt").read_text(encoding="utf-8")
    ids = encode_array(tok, text)
    loss, count = mean_loss(
        model.to(device),
        ids,
        context_length=model.context_length,
        batch_size=batch_size,
        device=device,
        autocast_dtype=autocast_dtype,
    )
    if model.objective == "mlm":
        return {f"{split}_mlm_loss": loss, f"{split}_mlm_perplexity": math.exp(min(loss, 50.0))}
    return lm_metrics(loss, count, len(text) * count / len(ids), prefix=split)
