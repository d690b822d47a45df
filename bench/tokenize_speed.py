"""Tokenizer training + encoding time on the full built-in corpus (the tokenize stage, uncached).

python bench/tokenize_speed.py --vocab-size 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from lm.config import BPETokenizerConfig, BuiltinData, CharTokenizerConfig
from lm.data import build_corpus
from lm.shards import tokenize_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        corpus, _ = build_corpus(BuiltinData(), Path(tmp) / "data", base_dir=Path(tmp))
        ingest = time.perf_counter() - t
        rows = [("ingest (38 plays, uncached)", ingest, corpus.chars)]
        for name, cfg in (
            ("char", CharTokenizerConfig()),
            ("bpe", BPETokenizerConfig(kind="bpe", vocab_size=args.vocab_size)),
        ):
            times, manifest = [], None
            for i in range(args.repeats):
                t = time.perf_counter()
                manifest = tokenize_corpus(corpus.path, corpus.digest, cfg, Path(tmp) / f"tok-{name}-{i}")
                times.append(time.perf_counter() - t)
            rows.append(
                (
                    f"tokenize {name} (train + encode, vocab {manifest['vocab_size']})",
                    statistics.median(times),
                    manifest["tokens"],
                )
            )
        t = time.perf_counter()
        build_corpus(BuiltinData(), Path(tmp) / "data", base_dir=Path(tmp))
        tokenize_corpus(corpus.path, corpus.digest, CharTokenizerConfig(), Path(tmp) / "tok-char-0")
        rows.append(("ingest + tokenize, both cached", time.perf_counter() - t, ""))
    print(f"\n{'stage':<52}{'seconds':>9}  sizes")
    for name, seconds, sizes in rows:
        print(f"{name:<52}{seconds:>9.2f}  {sizes}")


if __name__ == "__main__":
    main()
