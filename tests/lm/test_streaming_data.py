"""Streaming data stages: corpora bigger than a shard (or than memory) give the digests and tokens that
in-memory processing gives; a hit is checked by size and re-hashed on demand; shards spread over processes and
Dask workers encode to the same ids."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lm import data, shards, stages
from lm.batches import TokenBatches
from lm.config import (
    BatchSettings,
    BPETokenizerConfig,
    BuiltinData,
    CharTokenizerConfig,
    DataWorkers,
    FilesData,
    SplitConfig,
    WordTokenizerConfig,
)
from lm.plan import plan, record_success
from lm.sources import load
from lm.textstream import text_chunks
from lm.tokenizers import line_chunks, train_tokenizer

PLAYS = BuiltinData(plays=("macbeth", "hamlet", "the-tempest", "twelfth-night"))  # ≈ 0.5 MB
TOKENIZERS = {
    "char": CharTokenizerConfig(),
    "bpe": BPETokenizerConfig(kind="bpe", vocab_size=400),
    "word": WordTokenizerConfig(kind="word", vocab_size=2000),
}


def _bins(manifest: dict) -> dict[str, bytes]:
    return {s: Path(manifest["path"], f"{s}.bin").read_bytes() for s in manifest["tokens"]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return stages.ingest(PLAYS, root / "data", base_dir=root, context_length=8), root


def test_streamed_corpus_has_the_digest_and_text_of_in_memory_splitting(tmp_path):
    """The reference is the plain in-memory computation: documents joined, cut by ``split_tail``."""
    for split_cfg, max_chars in [(SplitConfig(val_fraction=0.1, test_fraction=0.05), None),
                                 (SplitConfig(val_fraction=0.2), 300_001),
                                 (SplitConfig(kind="documents", val_fraction=0.3, seed=2), 2_000_000)]:  # fmt: skip
        plays = PLAYS if split_cfg.kind == "tail" else BuiltinData()  # the document split needs documents
        cfg = plays.model_copy(update={"split": split_cfg, "max_chars": max_chars})
        corpus, _ = data.build_corpus(cfg, tmp_path / "data", base_dir=tmp_path)
        docs, _ = data.clean(load(cfg, tmp_path, tmp_path / "cache")[0], cfg.clean)
        if split_cfg.kind == "tail":
            text = (data.DOC_SEPARATOR.join(d.text for d in docs) + "\n")[:max_chars]
            rest, test = data.split_tail(text, split_cfg.test_fraction)
            train, val = data.split_tail(rest, split_cfg.val_fraction / (1 - split_cfg.test_fraction))
            expected = {"train": train, "val": val, "test": test}
        else:  # whole documents by their seeded hash, until max_chars characters of documents were taken
            parts, total = {s: [] for s in data.SPLITS}, 0
            for d in docs:
                if total >= max_chars:
                    break
                parts[data.document_split(d, split_cfg)].append(d.text)
                total += len(d.text)
            expected = {s: data.DOC_SEPARATOR.join(p) + "\n" if p else "" for s, p in parts.items()}
        on_disk = {s: corpus.split_path(s).read_text() if s in corpus.chars else "" for s in data.SPLITS}
        assert on_disk == expected
        assert corpus.digest == data.corpus_digest(expected)
        manifest = json.loads((corpus.path / "manifest.json").read_text())
        assert manifest["chars"] == {s: len(t) for s, t in expected.items() if t}


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_a_corpus_of_many_shards_encodes_to_the_ids_of_the_whole_text(corpus, kind):
    corpus, root = corpus
    cfg = TOKENIZERS[kind]
    whole = stages.tokenize(corpus, cfg, root / f"whole-{kind}", context_length=8)
    sharded = stages.tokenize(corpus, cfg, root / f"sharded-{kind}", context_length=8,
                              workers=DataWorkers(shard_mb=0.05, processes=2))  # fmt: skip
    assert len(sharded.shards["train"]) > 5 and len(whole.shards["train"]) == 1
    assert _bins(sharded.model_dump()) == _bins(whole.model_dump())
    assert sharded.tokenizer_digest == whole.tokenizer_digest and sharded.oov_rate == whole.oov_rate
    assert sharded.chars == whole.chars == corpus.chars
    # the reference: the split's text in memory, encoded at once by a tokenizer trained on it in memory
    text = Path(corpus.path, "train.txt").read_text()
    tok = train_tokenizer(cfg, text)
    assert np.array_equal(tok.encode_array(text), np.fromfile(Path(whole.path, "train.bin"), dtype=whole.dtype))
    # one shard: the batches drawn are the ones the same ids always gave
    a = TokenBatches(np.fromfile(Path(whole.path, "train.bin"), dtype=whole.dtype))
    b = TokenBatches(shards.open_tokens(Path(sharded.path, "train.bin"), sharded.dtype))
    settings = BatchSettings(max_steps=5, batch_size=4, grad_accumulation=1, batching="random")
    sa, sb = (t.sampler(settings, seed=3, context_length=16) for t in (a, b))
    assert all(np.array_equal(sa.next()[0], sb.next()[0]) for _ in range(5))


def test_line_chunks_of_a_file_and_of_its_text_agree(tmp_path):
    text = "".join(f"line {i} {'x' * (i % 7)}\n" for i in range(1000)) + "no end"
    path = tmp_path / "t.txt"
    path.write_text(text)
    assert list(text_chunks(path)) == line_chunks(text) and "".join(line_chunks(text)) == text
    ranges = shards.shard_ranges(path, 3000)
    assert len(ranges) > 2 and ranges[0][0] == 0 and ranges[-1][1] == len(text)
    assert [c for a, b in ranges for c in text_chunks(path, a, b)] == line_chunks(text)


def test_a_large_training_split_trains_the_tokenizer_on_a_recorded_sample(corpus):
    corpus, root = corpus
    tokens = stages.tokenize(corpus, BPETokenizerConfig(kind="bpe", vocab_size=400, train_sample_mb=1),
                             root / "sampled", context_length=8)  # fmt: skip
    assert tokens.train_sample == {"bytes": tokens.bytes["train"], "of_bytes": tokens.bytes["train"], "windows": 1}
    big = root / "big"
    big.mkdir()
    (big / "train.txt").write_text(Path(corpus.path, "train.txt").read_text() * 3)  # ≈ 1.3 MB > 1 MB
    (big / "val.txt").write_text(Path(corpus.path, "val.txt").read_text())
    found = shards.tokenize_corpus(big, "d" * 64, BPETokenizerConfig(kind="bpe", vocab_size=400, train_sample_mb=1),
                                   root / "sampled-big")  # fmt: skip
    sample = found["train_sample"]
    assert sample["windows"] == shards.SAMPLE_WINDOWS and sample["of_bytes"] == (big / "train.txt").stat().st_size
    assert 0.8 * (1 << 20) < sample["bytes"] <= 1 << 20 and len(sample["sha256"]) == 64
    assert found["chars"]["train"] == len((big / "train.txt").read_text())  # encoding covers the whole split


def test_a_hit_is_checked_by_size_and_plan_verify_finds_and_sets_aside_a_tampered_shard(tmp_path):
    (tmp_path / "corpus").mkdir()
    for i in range(3):
        (tmp_path / "corpus" / f"f{i}.txt").write_text(f"file {i}\n" + "the quick brown fox jumps over it.\n" * 3000)
    cfg = FilesData(source="files", paths=("corpus",))
    work, workers, tok = tmp_path / "w", DataWorkers(shard_mb=0.05, processes=1), CharTokenizerConfig()
    corpus = stages.ingest(cfg, work / "data", base_dir=tmp_path, context_length=8)
    tokens = stages.tokenize(corpus, tok, work / "tokens", context_length=8, workers=workers)
    record_success(work, "p", corpus.inputs, tokens.inputs)
    assert len(tokens.shards["train"]) >= 3

    def statuses(verify: bool) -> dict:
        return {s.stage: (s.status, s.reason) for s in plan("p", cfg, tok, workdir=work, base_dir=tmp_path,
                                                            verify=verify)}  # fmt: skip

    assert statuses(True)["tokenize"][0] == "cached" and "re-hashed: intact" in statuses(True)["tokenize"][1]
    train = Path(tokens.path, "train.bin")
    original = train.read_bytes()
    shard1 = tokens.shards["train"][0]["tokens"] * 2 + 10  # a byte inside the second shard (uint16 ids)
    train.write_bytes(original[:shard1] + bytes([original[shard1] ^ 1]) + original[shard1 + 1 :])
    assert statuses(False)["tokenize"][0] == "cached"  # same size: a plain hit trusts it
    status, reason = statuses(True)["tokenize"]
    assert status == "run" and "train.bin shard 1" in reason and "set aside" in reason
    assert statuses(False)["tokenize"][0] == "run"  # set aside: the next run misses ...
    again = stages.tokenize(corpus, tok, work / "tokens", context_length=8, workers=workers)
    assert not again.cached and Path(again.path, "train.bin").read_bytes() == original  # ... and rebuilds it

    text = Path(corpus.path, "val.txt").read_text()
    Path(corpus.path, "val.txt").write_text(text.replace("fox", "cat", 1))  # same size, other content
    status, reason = statuses(True)["ingest"]
    assert status == "run" and "val.txt: sha256" in reason
    rebuilt = stages.ingest(cfg, work / "data", base_dir=tmp_path, context_length=8)
    assert not rebuilt.cached and rebuilt.digest == corpus.digest and Path(corpus.path, "val.txt").read_text() == text


def test_dask_workers_encode_the_shards_to_the_local_result(corpus):
    from distributed import LocalCluster

    corpus, root = corpus
    local = stages.tokenize(corpus, TOKENIZERS["bpe"], root / "local", context_length=8)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = stages.tokenize(corpus, TOKENIZERS["bpe"], root / "dask", context_length=8,
                                 workers=DataWorkers(shard_mb=0.05,
                                                     scheduler_address=cluster.scheduler_address))  # fmt: skip
    assert len(remote.shards["train"]) > 5
    assert _bins(remote.model_dump()) == _bins(local.model_dump()) and remote.shards != local.shards


MEMORY_CHILD = """
import resource, sys, json
from pathlib import Path
limit = int(sys.argv[2]) << 20
from lm import stages
from lm.config import CharTokenizerConfig, FilesData, DataWorkers
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
root = Path(sys.argv[1])
cfg = FilesData(source="files", paths=("big.txt",), separator="\\n=====\\n")
corpus = stages.ingest(cfg, root / "data", base_dir=root, context_length=64)
tokens = stages.tokenize(corpus, CharTokenizerConfig(), root / "tokens", context_length=64,
                         workers=DataWorkers(processes=1))
print(json.dumps({"documents": corpus.documents, "chars": corpus.chars, "tokens": tokens.tokens}))
"""


@pytest.mark.slow
def test_ingest_and_tokenize_of_a_corpus_far_larger_than_the_memory_limit(tmp_path):
    """120 MB of text under a 100 MB data-segment limit above what the imports take: the stages hold a block
    and a document at a time (reading the corpus whole, as the stages once did, needs several times the corpus)."""
    line = "And what is this? A line of generated verse, number {}, in a generated play.\n"
    with open(tmp_path / "big.txt", "w") as f:
        for doc in range(6000):  # ≈ 20 KB documents, each different
            f.write(f"PLAY {doc}\n" + "".join(line.format(doc * 1000 + i) for i in range(250)) + "=====\n")
    size = (tmp_path / "big.txt").stat().st_size
    assert size > 110 << 20
    baseline = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        from lm import stages, config
        print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmData')][0])
    """)], capture_output=True, text=True, check=True)  # fmt: skip
    limit_mb = int(baseline.stdout) // 1024 + 100
    done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(tmp_path), str(limit_mb)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["documents"] == 6000 and sum(result["tokens"].values()) == sum(result["chars"].values())


def test_source_digests_are_remembered_by_stat_signature_and_a_changed_file_is_read_again(tmp_path, monkeypatch):
    """A cached run re-hashes no unchanged source file (a 1 GB corpus would cost seconds), yet an edit — even one
    keeping the size — is seen; a file written a moment ago is not remembered (its clock tick may not be over)."""
    from lm import sources

    (tmp_path / "a.txt").write_text("to be or not to be\n" * 100)
    cfg, memo, reads = FilesData(source="files", paths=("a.txt",)), tmp_path / "memo.json", []
    real = sources.sha256_file
    monkeypatch.setattr(sources, "sha256_file", lambda path: reads.append(path) or real(path))
    first = sources.fingerprint(cfg, tmp_path, memo=memo)
    assert not memo.exists()  # just written: racy, not remembered
    sources.fingerprint(cfg, tmp_path, memo=memo)
    assert len(reads) == 2
    monkeypatch.setattr(sources, "RACY_NS", -(10**15))  # as if the file had settled long ago
    assert sources.fingerprint(cfg, tmp_path, memo=memo) == first and len(reads) == 3
    assert sources.fingerprint(cfg, tmp_path, memo=memo) == first and len(reads) == 3  # remembered: not read
    (tmp_path / "a.txt").write_text("to be or not to bE\n" * 100)  # same size, new content
    assert sources.fingerprint(cfg, tmp_path, memo=memo) != first and len(reads) == 4
