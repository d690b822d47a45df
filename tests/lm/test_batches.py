"""The loop's batch sources: token arrays (lm.batches) and labelled examples (lm.classification.batches)."""

import subprocess
import sys

import numpy as np
import torch

from lm.batches import BatchSampler, StreamSampler, TokenBatches
from lm.classification.batches import ExampleBatches
from lm.classification.examples import Examples, ExampleSampler
from lm.config import GPTConfig, TrainConfig
from lm.evaluation import mean_loss
from lm.models import build_model
from lm.runtime import resolve_runtime
from lm.training import task_data


def test_token_batches_pick_the_sampler_and_count_tokens():
    tokens = (np.arange(500) % 7).astype(np.uint16)
    random = TokenBatches(tokens).sampler(TrainConfig(batch_size=3).batches, seed=1, context_length=8)
    streams = TokenBatches(tokens).sampler(
        TrainConfig(batch_size=3, batching="streams").batches, seed=1, context_length=8
    )
    assert type(random) is BatchSampler and type(streams) is StreamSampler
    assert random.tokens_per_batch == streams.tokens_per_batch == 24
    assert torch.equal(random.next()[0], BatchSampler(tokens, context_length=8, batch_size=3, seed=1).next()[0])
    assert isinstance(task_data(tokens), TokenBatches) and task_data(TokenBatches(tokens)).tokens is tokens


def test_token_estimate_is_the_mean_loss_of_the_prefix():
    torch.manual_seed(0)
    model = build_model(GPTConfig(num_layers=1, num_heads=2, embed_dim=8, context_length=8), 7)
    tokens = (np.arange(500) % 7).astype(np.uint16)
    runtime = resolve_runtime(TrainConfig(device="cpu", precision="fp32"))
    expected, _ = mean_loss(model, tokens, context_length=8, batch_size=4, device="cpu", max_tokens=64)
    assert TokenBatches(tokens).estimate(model, batch_size=4, max_tokens=64, runtime=runtime) == expected


def test_example_batches_sample_whole_examples():
    examples = Examples(np.ones((10, 4), np.int32), np.full(10, 4, np.int64), np.arange(10) % 2)
    sampler = ExampleBatches(examples).sampler(TrainConfig(batch_size=4).batches, seed=3, context_length=99)
    assert isinstance(sampler, ExampleSampler) and sampler.batch_size == 4 and sampler.tokens_per_batch == 16


def test_the_training_loop_does_not_import_any_task():
    code = "import sys, lm.training; print(sorted(m for m in sys.modules if m.startswith('lm.classification')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
