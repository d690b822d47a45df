"""The word tokenizer: vocabulary limits, `<unk>`, lowercasing, saving, the out-of-vocabulary rate, loading
any WordLevel tokenizer.json (the char tokenizer exported as one), and its config."""

import pytest
from pydantic import TypeAdapter, ValidationError

from lm.config import TokenizerConfig, WordTokenizerConfig
from lm.tokenizers import (
    UNK,
    WORD_UNK,
    CharTokenizer,
    WordTokenizer,
    encode_array,
    load_tokenizer,
    oov_rates,
    tokenizer_digest,
    train_tokenizer,
)

# "the" ×6, "cat" ×3, "sat" ×3, "." ×3, "a" ×2, "mat" ×2, "dog" ×1, "," ×1, "!" ×1 (lowercased)
TEXT = "The cat sat on the mat.\nThe cat sat, the dog sat!\nThe cat. A mat, a\nthe the.\n"


def word(**options) -> WordTokenizerConfig:
    return WordTokenizerConfig(kind="word", **options)


def test_the_most_frequent_words_fill_the_vocabulary_after_unk():
    tok = train_tokenizer(word(vocab_size=5), TEXT)
    assert isinstance(tok, WordTokenizer) and tok.vocab_size == 5
    assert tok.hf.id_to_token(0) == WORD_UNK and tok.unk_id == 0
    assert set(tok.hf.get_vocab()) == {WORD_UNK, "the", "cat", "sat", "."}


def test_min_frequency_drops_rare_words():
    every = train_tokenizer(word(vocab_size=100), TEXT)
    assert {"dog", "on", "!"} <= set(every.hf.get_vocab())
    frequent = train_tokenizer(word(vocab_size=100, min_frequency=2), TEXT)
    assert set(frequent.hf.get_vocab()) == {WORD_UNK, "the", "cat", "sat", ".", ",", "a", "mat"}


def test_unknown_words_map_to_unk_and_decode_joins_with_single_spaces():
    tok = train_tokenizer(word(vocab_size=100), TEXT)
    ids = tok.encode("The zebra sat.\n  On   the mat")
    assert ids[1] == 0 and ids.count(0) == 1
    assert tok.decode(ids) == f"the {WORD_UNK} sat . on the mat"  # lossy: case and whitespace are not kept
    assert encode_array(tok, TEXT).tolist() == tok.encode(TEXT)


def test_lowercase_is_an_option():
    lower = train_tokenizer(word(vocab_size=100), TEXT)
    kept = train_tokenizer(word(vocab_size=100, lowercase=False), TEXT)
    assert "The" not in lower.hf.get_vocab() and {"The", "the", "A", "a"} <= set(kept.hf.get_vocab())
    assert lower.encode("THE Cat") == lower.encode("the cat") and 0 not in lower.encode("THE Cat")
    assert kept.encode("THE") == [0]


def test_save_and_load_give_the_same_ids(tmp_path):
    tok = train_tokenizer(word(vocab_size=8), TEXT)
    tok.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(loaded, WordTokenizer)
    probe = "The dog and the cat sat on a mat, zebra!"
    ids = tok.encode(probe)
    assert loaded.encode(probe) == ids and loaded.decode(ids) == tok.decode(ids)
    assert tokenizer_digest(loaded) == tokenizer_digest(tok)


def test_the_oov_rate_is_the_fraction_of_unk_tokens():
    tok = train_tokenizer(word(vocab_size=100), TEXT)
    assert tok.oov_rate("the zebra sat on a unicorn") == pytest.approx(2 / 6)
    assert tok.oov_rate(TEXT) == 0.0 and tok.oov_rate("") == 0.0
    ids = {"train": encode_array(tok, TEXT), "val": encode_array(tok, "the zebra .")}
    assert oov_rates(tok, ids) == {"train": 0.0, "val": pytest.approx(1 / 3)}
    assert oov_rates(CharTokenizer.train(TEXT), ids) == {}  # other tokenizers have no word vocabulary


def test_a_char_tokenizer_written_as_wordlevel_loads_and_reads_like_the_char_tokenizer(tmp_path):
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HF

    char = CharTokenizer.train(TEXT)
    hf = HF(models.WordLevel({c: i for i, c in enumerate(char.chars)}, unk_token=UNK))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    (tmp_path / "tokenizer.json").write_text(hf.to_str(), encoding="utf-8")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(loaded, WordTokenizer) and loaded.vocab_size == char.vocab_size and loaded.unk_id == 0
    probe = TEXT + "Zé —\n\n  x\t!"  # unseen characters, runs of whitespace, newlines
    ids = char.encode(probe)
    assert loaded.encode(probe) == ids and encode_array(loaded, probe).tolist() == ids
    assert loaded.decode(ids) == char.decode(ids)
    assert loaded.decode(char.encode(TEXT)) == TEXT


@pytest.mark.parametrize("vocab_size", [1, 0, -5])
def test_a_vocabulary_without_room_for_a_word_is_refused(vocab_size):
    with pytest.raises(ValidationError, match="vocab_size must be at least 2: id 0 is `<unk>`") as caught:
        TypeAdapter(TokenizerConfig).validate_python({"kind": "word", "vocab_size": vocab_size})
    assert caught.value.errors()[0]["loc"][-1] == "vocab_size"


def test_the_config_defaults_and_refuses_unknown_keys():
    cfg = TypeAdapter(TokenizerConfig).validate_python({"kind": "word"})
    assert cfg == WordTokenizerConfig(kind="word", vocab_size=10000, lowercase=True, min_frequency=1)
    with pytest.raises(ValidationError, match="min_frequency"):
        word(min_frequency=0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        TypeAdapter(TokenizerConfig).validate_python({"kind": "word", "lower": False})
