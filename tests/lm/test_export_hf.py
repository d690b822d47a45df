"""Export to and import from Hugging Face Transformers folders: exact logits, tokens, greedy generation, refusals."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import transformers

from lm.config import EncoderConfig, GPTConfig, LSTMConfig
from lm.errors import DataError
from lm.export.hf import Unsupported, export_hf, import_hf
from lm.generation import generate
from lm.models import build_model
from lm.package import Loaded
from lm.tokenizers import BPETokenizer, CharTokenizer

TEXT = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer\n" * 4


def loaded(cfg, tok=None, *, random_biases: bool = False) -> Loaded:
    tok = tok or CharTokenizer.train(TEXT)
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size).eval()
    if random_biases:  # zero biases would hide a misplaced one
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
    config = {"model": cfg.model_dump(mode="json"), "vocab_size": tok.vocab_size,
              "generation": {"temperature": 0.8, "top_k": 40, "max_new_tokens": 64}}  # fmt: skip
    return Loaded(model, tok, config)


def gpt(**options) -> GPTConfig:
    return GPTConfig(num_layers=2, num_heads=2, embed_dim=16, context_length=96, **options)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
@pytest.mark.parametrize("bias", [False, True])
def test_an_exported_gpt_loads_in_transformers_with_our_logits_tokens_and_greedy_text(tmp_path, positions, bias):
    ours = loaded(gpt(positions=positions, bias=bias), random_biases=bias)
    done = export_hf(ours, tmp_path / "hf")
    assert done.architecture == ("GPT2LMHeadModel" if positions == "learned" else "GPTNeoXForCausalLM")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, ours.config["vocab_size"], (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids).logits - ours.model(ids).logits).abs().max() <= 1e-4
    prompt = "To be, or not"
    assert tok(prompt)["input_ids"] == ours.tokenizer.encode(prompt)
    greedy = model.generate(**tok(prompt, return_tensors="pt"), do_sample=False, max_new_tokens=64, min_new_tokens=64)
    mine = generate(ours.model, ours.tokenizer.encode(prompt), max_new_tokens=64, temperature=0.0)
    assert greedy[0, len(prompt) :].tolist() == mine  # token for token
    assert tok.decode(greedy[0]) == prompt + ours.tokenizer.decode(mine)


def test_a_bpe_tokenizer_and_the_tanh_gelu_export_exactly_too(tmp_path):
    from lm.config import BPETokenizerConfig

    tok = BPETokenizer.train(TEXT, BPETokenizerConfig(kind="bpe", vocab_size=300, min_frequency=1))
    ours = loaded(gpt(activation="gelu_tanh"), tok)
    export_hf(ours, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["activation_function"] == "gelu_pytorch_tanh" and config["tie_word_embeddings"] is True
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok(TEXT)["input_ids"] == tok.encode(TEXT) and hf_tok.eos_token == "<|endoftext|>"


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_export_then_import_gives_back_the_same_weights_tokenizer_and_config(tmp_path, positions):
    from safetensors.torch import load_file

    from lm.tokenizers import load_tokenizer, tokenizer_digest

    ours = loaded(gpt(positions=positions))
    export_hf(ours, tmp_path / "hf")
    imported = import_hf(str(tmp_path / "hf"), tmp_path / "package")
    assert imported.config == {"model": ours.config["model"], "vocab_size": ours.config["vocab_size"]}
    weights = load_file(str(tmp_path / "package" / "model.safetensors"))
    state = ours.model.state_dict()
    assert weights.keys() <= state.keys() and all(torch.equal(weights[k], state[k]) for k in weights)
    back = load_tokenizer(tmp_path / "package" / "tokenizer.json")
    assert isinstance(back, CharTokenizer) and tokenizer_digest(back) == tokenizer_digest(ours.tokenizer)


def test_a_gpt2_checkpoint_as_transformers_writes_it_imports_with_equal_logits(tmp_path):
    """What a user brings: GPT-2's own defaults (tanh GELU, biases everywhere) and its byte-level BPE."""
    from tokenizers import Tokenizer

    from lm.config import BPETokenizerConfig

    tok = BPETokenizer.train(TEXT, BPETokenizerConfig(kind="bpe", vocab_size=280, min_frequency=1))
    config = transformers.GPT2Config(vocab_size=tok.vocab_size, n_embd=24, n_layer=2, n_head=3, n_positions=64)
    torch.manual_seed(0)
    theirs = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    theirs.save_pretrained(tmp_path / "gpt2")
    transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.to_json())).save_pretrained(
        tmp_path / "gpt2"
    )
    imported = import_hf(str(tmp_path / "gpt2"), tmp_path / "package")
    assert imported.config["model"]["activation"] == "gelu_tanh" and imported.config["model"]["bias"] is True
    from lm import package as packaging
    from lm.results import Package

    files = {k: str(tmp_path / "package" / v) for k, v in packaging.FILES.items()}
    ours = packaging.load(Package(**files))
    ids = torch.randint(0, tok.vocab_size, (2, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (theirs(ids).logits - ours.model(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize(
    ("cfg", "named"),
    [
        (LSTMConfig(kind="lstm", num_layers=1, embed_dim=8, hidden_dim=16), "no LSTM language model"),
        (EncoderConfig(kind="encoder", num_layers=1, num_heads=2, embed_dim=16), "RobertaPreLayerNormForMaskedLM"),
        (gpt(positions="rotary", activation="gelu_tanh"), "gelu_tanh with rotary"),
    ],
)
def test_what_has_no_exact_transformers_architecture_is_refused_by_name(tmp_path, cfg, named):
    with pytest.raises(Unsupported, match=named):
        export_hf(loaded(cfg), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_classifier_package_is_refused_with_the_onnx_alternative(tmp_path):
    ours = loaded(gpt())
    with pytest.raises(Unsupported, match="classification model.*--format onnx"):
        export_hf(Loaded(ours.model, ours.tokenizer, ours.config | {"task": "classification"}), tmp_path / "hf")


def test_a_failed_check_leaves_nothing_behind(tmp_path, monkeypatch):
    import lm.export.hf as hf

    monkeypatch.setattr(hf, "TOLERANCE", -1.0)  # no difference is small enough
    with pytest.raises(RuntimeError, match="logits differ"):
        export_hf(loaded(gpt()), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_missing_transformers_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(DataError, match=r'pip install -e "\.\[hf\]"'):
        export_hf(loaded(gpt()), tmp_path / "hf")


def test_imports_refuse_what_they_cannot_read_exactly(tmp_path):
    with pytest.raises(DataError, match="never downloads from the Hub"):
        import_hf("openai-community/gpt2", tmp_path / "p")
    export_hf(loaded(gpt()), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for change, named in [({"model_type": "llama"}, "model_type 'llama'"),
                          ({"n_inner": 99}, "n_inner 99"), ({"layer_norm_epsilon": 1e-6}, "epsilon")]:  # fmt: skip
        (tmp_path / "hf" / "config.json").write_text(json.dumps(config | change))
        with pytest.raises(Unsupported, match=named):
            import_hf(str(tmp_path / "hf"), tmp_path / "p")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(DataError, match="pytorch_model.bin: pickle files"):
        import_hf(str(tmp_path / "hf"), tmp_path / "p")
    (tmp_path / "hf" / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="missing tokenizer.json"):
        import_hf(str(tmp_path / "hf"), tmp_path / "p")
    assert not (tmp_path / "p").exists()
