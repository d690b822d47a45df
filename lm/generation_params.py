"""Validated generation requests: the params a caller may set, the bounds a server enforces, the prompts.

Shared by the served model (``flows/registry/serving.py``, which reads the bounds from the environment) and, through
it, `lmp generate`. Every violation is a ``ValueError`` whose message is one line naming the param, the
allowed range and what was given; the served model answers it with HTTP 400.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real

MAX_SEED = 2**64 - 1
"""torch's generators take seeds up to 2**64 - 1."""
MAX_STOP_CHARS = 256
MAX_BEAMS = 16


@dataclass(frozen=True)
class GenerationLimits:
    """What one request may ask of a server. ``max_seconds`` is the time budget of a whole request (all its
    prompts): generation stops there and returns what it has."""

    max_new_tokens: int = 4096
    max_prompt_chars: int = 16_384
    max_prompts: int = 64
    max_seconds: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "max_prompt_chars", "max_prompts"):
            _integer(name, getattr(self, name), 1, None, what="limit")
        _real("max_seconds", self.max_seconds, 0.0, None, what="limit", open_low=True)


@dataclass(frozen=True)
class GenerationParams:
    """One request's sampling params. ``top_k`` 0 means no top-k filtering, ``top_p`` 1.0 no nucleus cut,
    ``stop`` "" no stop string (otherwise generation ends at, and includes, its first occurrence)."""

    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 1.0
    seed: int = 0
    stop: str = ""
    num_beams: int = 1
    """Beam search width (seq2seq models; 1: greedy or sampling)."""
    length_penalty: float = 1.0
    """Beam search ranks finished outputs by log-probability / length ** length_penalty."""

    @classmethod
    def parse(cls, raw: Mapping[str, object] | None, limits: GenerationLimits | None = None,
              defaults: Mapping[str, object] | None = None) -> GenerationParams:  # fmt: skip
        """Check a caller's params (missing ones take ``defaults``, else the class's) against ``limits``; raises
        ``ValueError`` with a one-line message at the first violation."""
        limits = limits or GenerationLimits()
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ValueError(f"params must be an object of name → value, got {type(raw).__name__}")
        allowed = [f.name for f in fields(cls)]
        for key in raw:
            if key not in allowed:
                raise ValueError(f"unknown param {_shown(key)}: the params are {', '.join(allowed)}")
        defaults = asdict(cls()) | dict(defaults or {})
        defaults["max_new_tokens"] = min(defaults["max_new_tokens"], limits.max_new_tokens)  # under a low cap
        p = defaults | dict(raw)
        return cls(
            max_new_tokens=_integer("max_new_tokens", p["max_new_tokens"], 1, limits.max_new_tokens),
            temperature=_real("temperature", p["temperature"], 0.0, None),
            top_k=_integer("top_k", p["top_k"], 0, None),
            top_p=_real("top_p", p["top_p"], 0.0, 1.0, open_low=True),
            seed=_integer("seed", p["seed"], 0, MAX_SEED),
            stop=_string("stop", p["stop"], MAX_STOP_CHARS),
            num_beams=_integer("num_beams", p["num_beams"], 1, MAX_BEAMS),
            length_penalty=_real("length_penalty", p["length_penalty"], 0.0, 4.0),
        )

    def as_dict(self) -> dict[str, int | float | str]:
        return asdict(self)


def check_prompts(values: Sequence[object], limits: GenerationLimits | None = None) -> list[str]:
    """The prompts of one request: strings only (no coercion of numbers or nulls), at most ``max_prompts`` of
    them, each at most ``max_prompt_chars`` long."""
    limits = limits or GenerationLimits()
    values = list(values)
    if len(values) > limits.max_prompts:
        raise ValueError(f"inputs hold {len(values)} prompts; at most {limits.max_prompts} are allowed per request")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            got = "null" if value is None else f"{_shown(value)} ({type(value).__name__})"
            raise ValueError(f"inputs must be strings, got {got} at index {i}")
        if len(value) > limits.max_prompt_chars:
            raise ValueError(
                f"input {i} is {len(value)} characters long; at most {limits.max_prompt_chars} are allowed"
            )
    return [str(v) for v in values]


def _integer(name: str, value: object, low: int, high: int | None, *, what: str = "param") -> int:
    """An integer (not a bool, not a float) in ``low..high``."""
    ok = isinstance(value, Integral) and not isinstance(value, bool) and low <= int(value)
    if not ok or (high is not None and int(value) > high):
        bound = f"from {low} to {high}" if high is not None else f"≥ {low}"
        raise ValueError(f"{what} {name} must be an integer {bound}, got {_shown(value)}")
    return int(value)


def _real(
    name: str, value: object, low: float, high: float | None, *, what: str = "param", open_low: bool = False
) -> float:
    """A finite number (not a bool) above ``low`` (or at it unless ``open_low``) and at most ``high``."""
    number = float(value) if isinstance(value, Real) and not isinstance(value, bool) else math.nan
    above = number > low if open_low else number >= low
    if not (math.isfinite(number) and above and number <= (high if high is not None else math.inf)):
        left = "(" if open_low else "["
        bound = f"in {left}{low:g}, {high:g}]" if high is not None else f"{'>' if open_low else '≥'} {low:g}"
        raise ValueError(f"{what} {name} must be a finite number {bound}, got {_shown(value)}")
    return number


def _string(name: str, value: object, max_chars: int) -> str:
    if not isinstance(value, str) or len(value) > max_chars:
        raise ValueError(f"param {name} must be a string of at most {max_chars} characters, got {_shown(value)}")
    return str(value)


def _shown(value: object, width: int = 40) -> str:
    """``repr`` on one line, cut to ``width`` characters: messages echo what was sent without echoing a
    whole request back."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"
