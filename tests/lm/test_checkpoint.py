import pytest
import torch

from lm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lm.models import build_model


def test_round_trip_keeps_weights_and_state(tiny_gpt, tmp_path):
    torch.manual_seed(0)
    a = build_model(tiny_gpt, vocab_size=11)
    save_checkpoint(tmp_path / "ck", a, {"step": 7})
    torch.manual_seed(1)
    b = build_model(tiny_gpt, vocab_size=11)
    state = load_checkpoint(tmp_path / "ck", b)
    assert state == {"step": 7}
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    assert b.lm_head.weight.data_ptr() == b.token_embedding.weight.data_ptr()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["MANIFEST.json", "model.safetensors", "state.json"]


def test_a_flipped_byte_is_detected(tiny_gpt, tmp_path):
    model = build_model(tiny_gpt, vocab_size=11)
    save_checkpoint(tmp_path / "ck", model, {"step": 1})
    weights = tmp_path / "ck" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors does not match its sha256"):
        load_checkpoint(tmp_path / "ck", model)


def test_missing_manifest_is_detected(tiny_gpt, tmp_path):
    model = build_model(tiny_gpt, vocab_size=11)
    save_checkpoint(tmp_path / "ck", model, {})
    (tmp_path / "ck" / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match="no readable MANIFEST.json"):
        load_checkpoint(tmp_path / "ck", model)


def test_a_failed_save_leaves_the_previous_checkpoint(tiny_gpt, tmp_path):
    model = build_model(tiny_gpt, vocab_size=11)
    save_checkpoint(tmp_path / "ck", model, {"step": 1})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "ck", model, {"step": object()})  # not JSON: fails mid-save
    assert load_checkpoint(tmp_path / "ck", model) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
