"""Stage caching and `plan`: unchanged → cached; vocab_size → tokenize only; an edited file → both."""

from __future__ import annotations

import time
from pathlib import Path

from lm import stages
from lm.config import BPETokenizerConfig, CharTokenizerConfig, FilesData
from lm.plan import plan, record_success

CONTEXT = 8


def run_stages(cfg, tok, tmp_path):
    corpus = stages.ingest(cfg, tmp_path / "w" / "data", base_dir=tmp_path, context_length=CONTEXT)
    tokens = stages.tokenize(corpus, tok, tmp_path / "w" / "tokens", context_length=CONTEXT)
    record_success(tmp_path / "w", "p", corpus.inputs, tokens.inputs)
    return corpus, tokens


def statuses(cfg, tok, tmp_path):
    return {s.stage: (s.status, s.reason) for s in plan("p", cfg, tok, workdir=tmp_path / "w", base_dir=tmp_path)}


def test_cache_hits_misses_and_plan_predictions(tmp_path):
    (tmp_path / "data").mkdir()
    for i in range(4):
        (tmp_path / "data" / f"f{i}.txt").write_text(f"file {i}: " + "the quick brown fox jumps. " * 200)
    cfg = FilesData(source="files", paths=("data",))
    char = CharTokenizerConfig()

    first = statuses(cfg, char, tmp_path)
    assert first["ingest"] == ("run", "no earlier successful run of this pipeline")
    assert first["tokenize"][0] == "run" and first["train"][0] == "run"
    corpus, tokens = run_stages(cfg, char, tmp_path)
    assert not corpus.cached and not tokens.cached

    # Unchanged: both cached, and plan says so.
    assert statuses(cfg, char, tmp_path)["ingest"][0] == "cached"
    assert statuses(cfg, char, tmp_path)["tokenize"][0] == "cached"
    t = time.perf_counter()
    corpus2, tokens2 = run_stages(cfg, char, tmp_path)
    assert corpus2.cached and tokens2.cached and time.perf_counter() - t < 2.0
    assert tokens2.path == tokens.path

    # A different tokenizer: tokenize runs, ingest does not.
    bpe = BPETokenizerConfig(kind="bpe", vocab_size=300)
    predicted = statuses(cfg, bpe, tmp_path)
    assert predicted["ingest"][0] == "cached"
    assert predicted["tokenize"][0] == "run" and "tokenizer.kind: 'char' → 'bpe'" in predicted["tokenize"][1]
    corpus3, tokens3 = run_stages(cfg, bpe, tmp_path)
    assert corpus3.cached and not tokens3.cached
    bigger = BPETokenizerConfig(kind="bpe", vocab_size=320)
    assert "tokenizer.vocab_size: 300 → 320" in statuses(cfg, bigger, tmp_path)["tokenize"][1]

    # Editing one source file: both run, and plan names the file.
    (tmp_path / "data" / "f2.txt").write_text("an edited file " * 100)
    predicted = statuses(cfg, bpe, tmp_path)
    assert predicted["ingest"] == ("run", "file data/f2.txt changed")
    assert predicted["tokenize"][0] == "run"
    corpus4, tokens4 = run_stages(cfg, bpe, tmp_path)
    assert not corpus4.cached and not tokens4.cached and corpus4.digest != corpus3.digest


def test_deleted_cache_outputs_are_rebuilt(tmp_path):
    (tmp_path / "a.txt").write_text("some text to learn from. " * 100)
    cfg = FilesData(source="files", paths=("a.txt",))
    _, tokens = run_stages(cfg, CharTokenizerConfig(), tmp_path)
    (tmp_path / "w" / "tokens" / tokens.key[:16] / "val.bin").unlink()
    assert statuses(cfg, CharTokenizerConfig(), tmp_path)["tokenize"] == (
        "run",
        "cached tokens missing or altered on disk",
    )
    _, again = run_stages(cfg, CharTokenizerConfig(), tmp_path)
    assert not again.cached and (tmp_path / "w" / "tokens" / tokens.key[:16] / "val.bin").is_file()


def test_a_run_from_a_given_tokenizer_caches_by_its_digest_and_plans_the_init_model_first(tmp_path):
    """Further pretraining: the initialising model's tokenizer is used as it is (never retrained), its token
    files are cached under its digest, and `plan` says the init model is resolved before tokenizing."""
    from lm.tokenizers import CharTokenizer, load_tokenizer

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("the quick brown fox jumps. " * 300)
    cfg = FilesData(source="files", paths=("data",))
    given = CharTokenizer.train("the quick brown fox")  # lacks "j", "m", "p", "s" and "."
    corpus, tokens = run_stages(cfg, given, tmp_path)
    assert tokens.tokenizer == "char" and tokens.vocab_size == given.vocab_size
    assert load_tokenizer(Path(tokens.path) / "tokenizer.json").chars == given.chars
    again = stages.tokenize(corpus, CharTokenizer(given.chars[1:]), tmp_path / "w" / "tokens", context_length=CONTEXT)
    assert again.cached and again.key == tokens.key
    other = stages.tokenize(corpus, CharTokenizer.train("xyz"), tmp_path / "w" / "tokens", context_length=CONTEXT)
    assert not other.cached and other.key != tokens.key
    steps = plan("p", cfg, None, workdir=tmp_path / "w", base_dir=tmp_path, init_from="hf:/models/gpt2")
    assert [s.stage for s in steps][:3] == ["init-model", "ingest", "tokenize"]
    assert "hf:/models/gpt2 (imported from the folder)" in steps[0].reason and steps[1].status == "cached"
