"""TrainConfig's views by concern are read-only and change nothing users write or digests see."""

import dataclasses

import pytest

from lm.config import DistributedConfig, TrainConfig

VIEWS = ("optimizer", "batches", "runtime", "cadence")


def test_views_cover_every_field_and_mirror_it():
    cfg = TrainConfig(max_steps=7, learning_rate=0.5, device="cpu", eval_interval=3, distributed=DistributedConfig())
    covered = set()
    for view in VIEWS:
        settings = getattr(cfg, view)
        for field in dataclasses.fields(settings):
            assert getattr(settings, field.name) == getattr(cfg, field.name)
            covered.add(field.name)
    assert covered == set(TrainConfig.model_fields)
    assert cfg.optimizer.learning_rate == 0.5 and cfg.batches.max_steps == 7 and cfg.cadence.eval_interval == 3
    assert cfg.runtime.distributed == DistributedConfig()


def test_views_are_not_fields_keys_or_schema():
    cfg = TrainConfig()
    dumped = cfg.model_dump()
    assert not set(VIEWS) & set(dumped)
    assert not set(VIEWS) & set(TrainConfig.model_json_schema()["properties"])
    assert TrainConfig.model_validate(dumped) == cfg
    with pytest.raises(ValueError):
        TrainConfig.model_validate({"optimizer": {"learning_rate": 1.0}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optimizer.learning_rate = 1.0


def test_digest_is_unchanged_by_the_views():
    # The digest of the default config as it was before the views existed (cache keys and tags must not move).
    assert TrainConfig().digest() == DIGEST


DIGEST = "6922dec4d1a7bc01f2f6c15228fe9b2c1972f0a4f4da844eea72f4f0f774ac21"
