"""Our tokenizers in Hugging Face's own files: ``tokenizer.json`` (loadable by ``tokenizers.Tokenizer`` and,
with ``tokenizer_config.json``, by ``transformers.AutoTokenizer``).

A BPE or word-level tokenizer already *is* an HF tokenizer and is written as it is. The char tokenizer
becomes a WordLevel model over single characters — every character its own pre-token, id 0 (U+FFFD) the
unknown token, decoded by fusing the pieces — which encodes and decodes every text exactly as ours does.
"""

from __future__ import annotations

import json

from lm.errors import DataError
from lm.tokenizers import UNK, CharTokenizer, Tokenizer, tokenizer_from_json


def char_tokenizer_json(tok: CharTokenizer) -> str:
    """``tok`` as an HF ``tokenizer.json`` with the same ids."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.WordLevel({c: i for i, c in enumerate(tok.chars)}, unk_token=UNK))
    # Every character alone, newlines included ("." would skip them): `[\s\S]` isolated.
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    return hf.to_str()


def hf_tokenizer_json(tok: Tokenizer) -> str:
    """The HF ``tokenizer.json`` text of any of our tokenizers."""
    if isinstance(tok, CharTokenizer):
        return char_tokenizer_json(tok)
    return tok.to_json()  # BPE and word-level tokenizers are HF tokenizers already


def tokenizer_config(tok: Tokenizer, *, model_max_length: int, special: dict[str, str] | None = None) -> str:
    """``tokenizer_config.json`` for ``AutoTokenizer``: a fast tokenizer over ``tokenizer.json``, no
    special tokens added around a text (our models were trained on raw text), ``special`` naming the
    roles (``unk_token``, ``eos_token`` …) the vocabulary has."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        **(special or {}),
    }
    return json.dumps(config, indent=2, ensure_ascii=False)


def from_hf_tokenizer_json(text: str) -> Tokenizer:
    """One of our tokenizers for an HF ``tokenizer.json``: our own char export becomes the CharTokenizer it
    came from (same ids, same digest); a BPE or WordLevel model is used as it is."""
    data = json.loads(text)
    model = data.get("model") or {}
    if model.get("type") == "WordLevel" and _is_char_export(data):
        chars = sorted(model["vocab"], key=model["vocab"].get)
        return CharTokenizer(chars[1:])
    try:
        return tokenizer_from_json(text)
    except ValueError as e:
        raise DataError(f"{e}; supported are BPE and WordLevel tokenizer models") from None


def _is_char_export(data: dict) -> bool:
    """Whether ``data`` is ``char_tokenizer_json``'s shape: single characters, U+FFFD at id 0, split per
    character, fused on decoding."""
    vocab, pre = data["model"]["vocab"], data.get("pre_tokenizer") or {}
    return (
        vocab.get(UNK) == 0
        and all(len(c) == 1 for c in vocab)
        and sorted(vocab.values()) == list(range(len(vocab)))
        and pre.get("type") == "Split"
        and (data.get("decoder") or {}).get("type") == "Fuse"
        and not data.get("normalizer")
    )
