import numpy as np
import pytest

from lm.config import TokenizerConfig
from lm.tokenizers import (
    UNK,
    CharTokenizer,
    encode_array,
    load_tokenizer,
    open_tokens,
    tokenize_corpus,
    tokenizer_digest,
    write_tokens,
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
    (tmp_path / "train.txt").write_text(TEXT * 3)
    (tmp_path / "val.txt").write_text("what light?\n")
    first = tokenize_corpus(tmp_path / "train.txt", tmp_path / "val.txt", "d" * 64, TokenizerConfig(), tmp_path / "t")
    again = tokenize_corpus(tmp_path / "train.txt", tmp_path / "val.txt", "d" * 64, TokenizerConfig(), tmp_path / "t")
    assert first == again
    assert first["train_tokens"] == len(TEXT) * 3 and first["val_tokens"] == len("what light?\n")
    tok = load_tokenizer(f"{first['path']}/tokenizer.json")
    val = open_tokens(f"{first['path']}/val.bin", first["dtype"])
    assert tok.decode(val.tolist()) == "what light?\n"
