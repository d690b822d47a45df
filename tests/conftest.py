"""Shared fixtures: tiny seeded configs and a small cleaned corpus."""

from __future__ import annotations

import os

import pytest

# Tests never phone home and never touch the developer's own stores.
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# No network here: hub look-ups fail at once instead of retrying (local dataset folders still load).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm.config import GPTConfig, TrainConfig  # noqa: E402


@pytest.fixture(params=["learned", "rotary"])
def tiny_gpt(request) -> GPTConfig:
    """A tiny GPT, once with learned and once with rotary positions."""
    return GPTConfig(num_layers=2, num_heads=2, embed_dim=16, context_length=16, positions=request.param)


@pytest.fixture
def tiny_train() -> TrainConfig:
    return TrainConfig(
        max_steps=6,
        batch_size=4,
        learning_rate=3e-3,
        warmup_steps=2,
        eval_interval=3,
        eval_tokens=64,
        log_interval=2,
        precision="fp32",
        device="cpu",
        seed=0,
    )
