"""Pickle-free MLflow pyfunc ("models from code"): text in; generated text, features or a label out.

MLflow copies this file into the logged model and runs it at load time; ``set_model`` at the bottom
names the model object. Weights come from ``model.safetensors``, the architecture from
``config.json`` and the vocabulary from ``tokenizer.json`` — no pickle anywhere.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


def _prompts(model_input: Any) -> list[str]:
    """Accept a list of strings, a single string, or a DataFrame (first column) as MLflow passes it."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "iloc"):  # pandas DataFrame / Series
        column = model_input.iloc[:, 0] if getattr(model_input, "ndim", 1) == 2 else model_input
        return [str(x) for x in column.tolist()]
    return [str(x) for x in model_input]


class LanguageModelPackage(PythonModel):
    """Loads once in ``load_context``. ``predict``: for a generative (causal) model, each prompt plus a
    sampled continuation; for an encoder, each text's mean-pooled features (a list of floats); for a
    classifier, each text's ``{"label": …, "probabilities": {label: p, …}}`` (summing to 1)."""

    classifier = None

    def load_context(self, context) -> None:
        from pydantic import TypeAdapter

        from lm.checkpoint import load_weights
        from lm.config import ModelConfig
        from lm.models import build_model
        from lm.tokenizers import load_tokenizer

        with open(context.artifacts["config"], encoding="utf-8") as f:
            config = json.load(f)
        if config.get("task") == "classification":
            from lm.classification.stages import load_package

            self.classifier, self.tokenizer, self.config = load_package(context.artifacts)
            return
        model = build_model(TypeAdapter(ModelConfig).validate_python(config["model"]), config["vocab_size"])
        self.model = load_weights(context.artifacts["weights"], model).eval()
        self.tokenizer = load_tokenizer(context.artifacts["tokenizer"])
        if self.tokenizer.vocab_size != config["vocab_size"]:
            raise ValueError(
                f"tokenizer.json has {self.tokenizer.vocab_size} ids but the model was built for "
                f"{config['vocab_size']}: the package mixes files from different runs"
            )

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list:
        if self.classifier is not None:
            return self._classify(_prompts(model_input))
        if self.model.objective == "mlm":
            return [self._features(text) for text in _prompts(model_input)]
        from lm.generation import GENERATION_DEFAULTS, generate

        p = GENERATION_DEFAULTS | (params or {})
        stop = str(p.get("stop") or "")
        outputs = []
        for prompt in _prompts(model_input):
            ids = generate(
                self.model,
                self.tokenizer.encode(prompt) or [0],
                max_new_tokens=int(p["max_new_tokens"]),
                temperature=float(p["temperature"]),
                top_k=int(p["top_k"]) or None,
                top_p=float(p["top_p"]),
                seed=int(p["seed"]),
                stop=(lambda new: stop in self.tokenizer.decode(new)) if stop else None,
            )
            text = self.tokenizer.decode(ids)
            outputs.append(prompt + (text[: text.index(stop) + len(stop)] if stop and stop in text else text))
        return outputs

    def _classify(self, texts: list[str]) -> list[dict]:
        from lm.classification.examples import encode_examples
        from lm.classification.metrics import predict

        examples = encode_examples(self.tokenizer, [{"text": t, "label": 0} for t in texts], self.config["max_tokens"])
        probs, _ = predict(self.classifier, examples)
        labels = self.config["labels"]
        return [
            {"label": labels[int(row.argmax())], "probabilities": dict(zip(labels, map(float, row), strict=True))}
            for row in probs
        ]

    def _features(self, text: str) -> list[float]:
        import torch

        ids = (self.tokenizer.encode(text) or [0])[: self.model.context_length]
        with torch.no_grad():
            hidden = self.model.encode(torch.tensor([ids]))  # (1, T, C)
        return hidden.mean(dim=1)[0].tolist()


mlflow.models.set_model(LanguageModelPackage())
