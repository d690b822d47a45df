"""Device and precision are resolved once, into a frozen Runtime."""

import dataclasses

import pytest
import torch

from lm.config import TrainConfig
from lm.runtime import Runtime, TrainingError, resolve_runtime


def test_cpu_fp32_runtime_has_no_autocast():
    runtime = resolve_runtime(TrainConfig(device="cpu", precision="fp32"))
    assert runtime == Runtime(torch.device("cpu"), None)
    with runtime.autocast():
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        runtime.device = torch.device("cuda")


def test_bf16_is_autocast_on_the_device():
    runtime = resolve_runtime(TrainConfig(device="cpu", precision="bf16"))
    assert runtime.amp_dtype is torch.bfloat16
    with runtime.autocast():
        assert torch.is_autocast_enabled("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_one_is_a_training_error():
    with pytest.raises(TrainingError, match="no CUDA device"):
        resolve_runtime(TrainConfig(device="cuda"))
    assert resolve_runtime(TrainConfig(device="auto"), local_rank=1).device == torch.device("cpu")
