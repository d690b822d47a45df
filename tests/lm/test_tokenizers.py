import numpy as np
import pytest

from lm.config import CharTokenizerConfig
from lm.shards import open_tokens, tokenize_corpus, write_tokens
from lm.tokenizers import (
    UNK,
    CharTokenizer,
    encode_array,
    load_tokenizer,
    tokenizer_digest,
)

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"


def test_round_trip_and_vocabulary():
    tok = CharTokenizer.train(TEXT)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.vocab_size == len(set(TEXT)) + 1  # plus the unknown character
    assert tok.chars[0] == UNK


def test_unseen_characters_map_to_unknown():
    tok = CharTokenizer.train("abc")
    assert tok.encode("abz") == [tok.encode("a")[0], tok.encode("b")[0], 0]
    assert tok.decode([0]) == UNK


def test_vectorised_encode_matches_encode():
    tok = CharTokenizer.train(TEXT)
    probe = TEXT + "Zé—\x00"
    arr = encode_array(tok, probe)
    assert arr.dtype == np.uint16
    assert arr.tolist() == tok.encode(probe)


def test_save_load_round_trip(tmp_path):
    tok = CharTokenizer.train(TEXT)
    tok.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.encode(TEXT) == tok.encode(TEXT)
    assert tokenizer_digest(loaded) == tokenizer_digest(tok)


def test_unknown_kind_is_refused(tmp_path):
    (tmp_path / "t.json").write_text('{"kind": "sentencepiece"}')
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        load_tokenizer(tmp_path / "t.json")


def test_token_files_are_memmaps(tmp_path):
    ids = np.arange(1000, dtype=np.uint16)
    write_tokens(tmp_path / "x.bin", ids)
    mm = open_tokens(tmp_path / "x.bin", "uint16")
    assert isinstance(mm, np.memmap) and mm.tolist() == ids.tolist()


def test_tokenize_corpus_writes_and_reuses(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train.txt").write_text(TEXT * 3)
    (tmp_path / "c" / "val.txt").write_text("what light?\n")
    first = tokenize_corpus(tmp_path / "c", "d" * 64, CharTokenizerConfig(), tmp_path / "t")
    again = tokenize_corpus(tmp_path / "c", "d" * 64, CharTokenizerConfig(), tmp_path / "t")
    assert not first["cached"] and again["cached"]
    assert {k: v for k, v in first.items() if k != "cached"} == {k: v for k, v in again.items() if k != "cached"}
    assert first["tokens"] == {"train": len(TEXT) * 3, "val": len("what light?\n")}
    tok = load_tokenizer(f"{first['path']}/tokenizer.json")
    val = open_tokens(f"{first['path']}/val.bin", first["dtype"])
    assert tok.decode(val.tolist()) == "what light?\n"


def test_bpe_round_trips_any_text_and_learns_merges():
    from lm.config import BPETokenizerConfig
    from lm.tokenizers import BPETokenizer

    text = "ROMEO:\nBut soft, what light through yonder window breaks?\n" * 50
    tok = BPETokenizer.train(text, BPETokenizerConfig(kind="bpe", vocab_size=300))
    assert 257 < tok.vocab_size <= 300
    probe = "JULIET:\nO Romeo, Romeo! wherefore art thou — ünïcödé 🙂\n"
    assert tok.decode(tok.encode(probe)) == probe  # byte-level: lossless on unseen characters
    assert len(tok.encode(text[:58])) < 58  # merges make it shorter than bytes
    arr = encode_array(tok, text + probe)
    assert arr.dtype == np.uint16 and arr.tolist() == tok.encode(text + probe)


def test_bpe_saves_as_hf_tokenizer_json(tmp_path):
    from lm.config import BPETokenizerConfig
    from lm.tokenizers import BPETokenizer

    tok = BPETokenizer.train("abc abd abe " * 100, BPETokenizerConfig(kind="bpe", vocab_size=270))
    tok.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(loaded, BPETokenizer) and loaded.encode("abc abd") == tok.encode("abc abd")
    assert tokenizer_digest(loaded) == tokenizer_digest(tok)


def test_large_vocabularies_use_uint32():
    from lm.tokenizers import token_dtype

    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_vocabulary_mismatch_names_both_sizes():
    from lm.errors import DataError
    from lm.shards import check_vocabulary

    with pytest.raises(DataError, match="has 1024 ids .*largest id in the data: 900.*the model has 512"):
        check_vocabulary(np.array([1, 900], dtype=np.uint16), 1024, tokenizer_digest="ab" * 32, model_vocab=512)
