"""What task heads need from a backbone: its parameters by depth, its input limit, unused parameters."""

import pytest

from lm.classification.config import HeadConfig
from lm.classification.model import Classifier
from lm.config import EncoderConfig, GPTConfig, LSTMConfig
from lm.models import build_model

CONFIGS = {
    "gpt": GPTConfig(num_layers=3, num_heads=2, embed_dim=16, context_length=8),
    "rotary": GPTConfig(num_layers=3, num_heads=2, embed_dim=16, context_length=8, positions="rotary"),
    "encoder": EncoderConfig(kind="encoder", num_layers=3, num_heads=2, embed_dim=16, context_length=8),
    "lstm": LSTMConfig(kind="lstm", num_layers=3, embed_dim=8, hidden_dim=12, context_length=8),
}


@pytest.mark.parametrize("kind", CONFIGS)
def test_layers_are_embeddings_then_one_group_per_layer_without_overlap(kind):
    model = build_model(CONFIGS[kind], vocab_size=11)
    layers = model.layers()
    assert len(layers) == 4 and all(layers)
    ids = [id(p) for group in layers for p in group]
    assert len(ids) == len(set(ids)) and set(ids) <= {id(p) for p in model.parameters()}
    assert model.unused_parameters is False
    assert model.max_length == (None if kind == "lstm" else 8)


def test_a_classifier_says_ddp_must_look_for_unused_parameters():
    model = Classifier(build_model(CONFIGS["gpt"], 11), HeadConfig(), 2)
    assert model.unused_parameters is True
    assert model.backbone_layers() == model.backbone.layers()
