"""Pickle-free MLflow pyfunc ("models from code"): text in; generated text, features or a label out.

MLflow copies this file into the logged model and runs it at load time; ``set_model`` at the bottom
names the model object. Weights come from ``model.safetensors``, the architecture from
``config.json`` and the vocabulary from ``tokenizer.json`` — no pickle anywhere.

Every request is bounded (``lm.generation_params``): prompts are strings only, each param within its range,
unknown params refused, each violation an HTTP 400 whose message is one line. The bounds are read from the
environment of the process that loads the model (`mlflow models serve`, `lmp generate`):

- ``LMP_MAX_NEW_TOKENS_CAP`` (4096): the largest ``max_new_tokens`` a request may ask for;
- ``LMP_GENERATION_SECONDS`` (30): the time budget of one request, all its prompts together — generation
  stops there and answers with what it has. Under MLflow's scoring server it is cut to 90 % of
  ``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`` (60 s), after which the client would get a 504 while the work
  went on;
- ``LMP_MAX_PROMPT_CHARS`` (16384) and ``LMP_MAX_PROMPTS`` (64): the longest prompt and the most prompts per
  request.

SIGTERM to the server stops generation after the current token (the requests in flight are answered with what
they have), so the server shuts down at once instead of finishing or orphaning them.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd  # MLflow resolves ``predict``'s type hints at run time
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

if TYPE_CHECKING:
    from lm.generation_params import GenerationLimits, GenerationParams

logger = logging.getLogger(__name__)

LIMIT_VARIABLES = {
    "LMP_MAX_NEW_TOKENS_CAP": ("max_new_tokens", int),
    "LMP_GENERATION_SECONDS": ("max_seconds", float),
    "LMP_MAX_PROMPT_CHARS": ("max_prompt_chars", int),
    "LMP_MAX_PROMPTS": ("max_prompts", int),
}
"""Environment variable → (field of ``GenerationLimits``, its type)."""


class RequestError(MlflowException):
    """A bad request: HTTP 400 whose message is exactly the one line it was raised with. MLflow's scoring
    server rewrites the message of an exception from ``predict`` into "Failed to predict data '<the whole
    input>'. \\nError: …" (several lines, echoing the request); this exception keeps its own message."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):  # set once, by MlflowException.__init__
            self._message = value


def limits_from_env(environ: Mapping[str, str] = os.environ) -> GenerationLimits:
    """The generation limits the ``LMP_*`` variables set (defaults for those unset)."""
    from lm.generation_params import GenerationLimits

    values = {}
    for variable, (field, kind) in LIMIT_VARIABLES.items():
        if environ.get(variable, "").strip():
            try:
                values[field] = kind(environ[variable])
            except ValueError:
                what = "an integer" if kind is int else "a number"
                raise ValueError(f"{variable} must be {what}, got {environ[variable]!r}") from None
    try:
        return GenerationLimits(**values)
    except ValueError as e:  # "limit max_seconds must be …": name the variable instead
        message = str(e)
        for variable, (field, _) in LIMIT_VARIABLES.items():
            message = message.replace(f"limit {field} ", f"{variable} ")
        raise ValueError(message) from None


def _within_request_timeout(limits: GenerationLimits, environ: Mapping[str, str]) -> GenerationLimits:
    """``limits`` with the time budget cut to 90 % of MLflow's scoring-server request timeout (set in the
    server's environment): past it the client gets a 504 and nobody would read the answer."""
    from dataclasses import replace

    try:
        timeout = float(environ.get("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", ""))
    except ValueError:
        return limits
    if math.isfinite(timeout) and 0 < 0.9 * timeout < limits.max_seconds:
        logger.warning("generation budget cut to %.3g s: the request timeout is %g s", 0.9 * timeout, timeout)
        return replace(limits, max_seconds=0.9 * timeout)
    return limits


def _values(model_input: Any) -> list:
    """The prompts as sent: a list, a single string, or a DataFrame (first column) / Series as MLflow passes
    them. Nothing is converted to text: a number or a null stays one, for the check to refuse."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "iloc"):  # pandas DataFrame / Series
        column = model_input.iloc[:, 0] if getattr(model_input, "ndim", 1) == 2 else model_input
        return column.astype(object).where(column.notna(), None).tolist()  # a null became NaN in pandas: undo
    if hasattr(model_input, "tolist"):  # numpy array
        return model_input.tolist()
    return list(model_input)


def _pass_params_through() -> None:
    """Let ``predict`` see the params the caller sent. MLflow's ``_enforce_params_schema`` drops params the
    signature does not name (with a log line) and fills in defaults, so a misspelt param would be ignored
    silently; for a signature whose params are exactly the generation params (this package's), the caller's
    params go to ``predict`` as sent and ``GenerationParams.parse`` checks them (unknown ones refused, each
    type and range with a one-line message). Other models in the process keep MLflow's behaviour."""
    import mlflow.pyfunc as pyfunc

    from lm.generation import GENERATION_DEFAULTS

    original = getattr(pyfunc, "_enforce_params_schema", None)
    if original is None:
        logger.warning("this MLflow has no _enforce_params_schema: unknown params are ignored, not refused")
        return
    if getattr(original, "lmp_passthrough", False):
        return  # an earlier load in this process installed it

    def enforce(params, schema):
        names = {p.name for p in schema.params} if schema is not None else set()
        if names and names <= set(GENERATION_DEFAULTS):  # this package's (older ones lack the newer params)
            return params
        return original(params, schema)

    enforce.lmp_passthrough = True
    pyfunc._enforce_params_schema = enforce


def _shutting_down() -> bool:
    """Whether the server running this model is shutting down (SIGTERM or SIGINT received). uvicorn, which
    `mlflow models serve` runs, answers those signals with a method of its ``Server`` that sets
    ``should_exit``, then waits for the requests in flight — and a thread running ``predict`` cannot be
    interrupted, so a long generation kept the server alive (orphaned once `mlflow models serve` had exited).
    The model cannot chain a handler of its own: uvicorn loads the app before installing its handlers, and
    only the main thread may install one; so generation asks uvicorn's handler whether it is time to stop."""
    handler = signal.getsignal(signal.SIGTERM)
    return getattr(getattr(handler, "__self__", None), "should_exit", False) is True


class LanguageModelPackage(PythonModel):
    """Loads once in ``load_context``. ``predict``: for a generative (causal) model, each prompt plus a
    sampled continuation; for an encoder, each text's mean-pooled features (a list of floats); for a
    classifier, each text's ``{"label": …, "probabilities": {label: p, …}}`` (summing to 1)."""

    def load_context(self, context) -> None:
        from lm import package
        from lm.results import Package

        self.limits = _within_request_timeout(limits_from_env(), os.environ)
        _pass_params_through()
        loaded = package.load(Package(**context.artifacts))
        self.model, self.tokenizer, self.config = loaded.model, loaded.tokenizer, loaded.config

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list:
        """``model_input``: what MLflow passes under this package's signature (a one-column DataFrame of
        prompts); a list, a string, a Series or an array work too. The type hint is one MLflow infers no schema
        from, so it validates nothing of its own (``check_prompts`` does, with one-line messages) and stops
        warning "Add type hints to the `predict` method" at every load."""
        from lm.generation_params import GenerationParams, check_prompts

        try:
            prompts = check_prompts(_values(model_input), self.limits)
            p = GenerationParams.parse(params, self.limits, self.config.get("served_params"))
            if p.num_beams > 1 and self.model.objective != "seq2seq":
                raise ValueError("param num_beams: beam search is for seq2seq models; this one samples (num_beams 1)")
            if p.num_beams > 1 and p.temperature > 0:
                raise ValueError("param num_beams: beam search is deterministic; send temperature 0 or num_beams 1")
        except ValueError as e:
            raise RequestError(str(e)) from None
        if self.model.objective == "classification":
            return self._classify(prompts)
        if self.model.objective == "mlm":
            return [self._features(text) for text in prompts]
        if self.model.objective == "seq2seq":
            return self._transduce(prompts, p)
        return self._generate(prompts, p)

    def _transduce(self, sources: list[str], p: GenerationParams) -> list[str]:
        """Each source's generated target (translation, summary, answer), all within one time budget."""
        from lm.seq2seq.decoding import decode
        from lm.seq2seq.stages import source_ids

        start, budget, outputs = time.monotonic(), self.limits.max_seconds, []
        for text in sources:
            left = 0.0 if _shutting_down() else budget - (time.monotonic() - start)
            ids = decode(
                self.model, source_ids(self.tokenizer, text, self.config, p.max_new_tokens),
                max_new_tokens=p.max_new_tokens, num_beams=p.num_beams, length_penalty=p.length_penalty,
                temperature=p.temperature, top_k=p.top_k or None, top_p=p.top_p, seed=p.seed, max_seconds=left,
            )  # fmt: skip
            outputs.append(self.tokenizer.decode([t for t in ids if t < self.model.base_vocab]))
        return outputs

    def _generate(self, prompts: list[str], p: GenerationParams) -> list[str]:
        """Each prompt plus its continuation, all within one time budget: a prompt reached after the budget
        is spent (or after SIGTERM) comes back without a continuation."""
        from lm.generation import generate

        start, budget = time.monotonic(), self.limits.max_seconds
        stop, outputs, cut = p.stop, [], 0
        for prompt in prompts:
            left = 0.0 if _shutting_down() else budget - (time.monotonic() - start)
            ids = generate(
                self.model,
                self.tokenizer.encode(prompt) or [0],
                max_new_tokens=p.max_new_tokens,
                temperature=p.temperature,
                top_k=p.top_k or None,
                top_p=p.top_p,
                seed=p.seed,
                stop=lambda new: _shutting_down() or bool(stop and stop in self.tokenizer.decode(new)),
                max_seconds=left,
            )
            text = self.tokenizer.decode(ids)
            if stop and stop in text:
                text = text[: text.index(stop) + len(stop)]
            elif len(ids) < p.max_new_tokens:
                cut += 1
            outputs.append(prompt + text)
        if cut:
            reason = "the server is shutting down" if _shutting_down() else f"{budget:g} s (LMP_GENERATION_SECONDS)"
            logger.warning(
                "%d of %d continuations stopped short of %d tokens: %s", cut, len(prompts), p.max_new_tokens, reason
            )
        return outputs

    def _classify(self, texts: list[str]) -> list[dict]:
        from lm.classification.examples import encode_examples
        from lm.classification.metrics import predict

        examples = encode_examples(self.tokenizer, [{"text": t, "label": 0} for t in texts], self.config["max_tokens"])
        probs, _ = predict(self.model, examples)
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
