"""Data stages at scale: ingest and tokenize (char and BPE) of generated plain-text corpora, cold and cached.

    python bench/data_scale.py --sizes 10,100,1000 --work /tmp/data-scale
    python bench/data_scale.py --sizes 10,100 --stages bpe

Each corpus is the built-in plays repeated (every copy headed by its own line, so deduplication keeps it) in
files of ≤ 64 MB, documents separated by a ``=====`` line, read as ``source: files`` with that separator.
Every measurement runs in a fresh process: wall seconds, MB/s of source text, and peak RSS — the stage's own
process and its largest worker process (the tokenize workers run two at a time on two cores). A cached run
is the same call again: it re-hashes the source files (the ingest key) and checks the cached files' sizes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SEPARATOR = "\n=====\n"
FILE_BYTES = 64 << 20

CHILD = """
import json, resource, sys, time
from pathlib import Path
from lm import stages
from lm.config import BPETokenizerConfig, CharTokenizerConfig, FilesData

work, stage = Path(sys.argv[1]), sys.argv[2]
cfg = FilesData(source="files", paths=("src",), separator=SEPARATOR)
t = time.perf_counter()
corpus = stages.ingest(cfg, work / "data", base_dir=work, context_length=64)
ingest = time.perf_counter() - t
out = {"ingest_s": ingest, "ingest_cached": corpus.cached}
if stage != "ingest":
    tok = CharTokenizerConfig() if stage == "char" else BPETokenizerConfig(kind="bpe", vocab_size=1024)
    t = time.perf_counter()
    tokens = stages.tokenize(corpus, tok, work / f"tokens-{stage}", context_length=64)
    out |= {"tokenize_s": time.perf_counter() - t, "tokenize_cached": tokens.cached,
            "tokens": sum(tokens.tokens.values()), "shards": sum(map(len, tokens.shards.values())),
            "sample": tokens.train_sample}
kb = 1024
out |= {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kb,
        "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kb}
print(json.dumps(out))
""".replace("SEPARATOR", repr(SEPARATOR))


def generate(target: Path, megabytes: int) -> int:
    """Write ``megabytes`` MB of plays into ``target``; the bytes written."""
    from lm.config import BuiltinData
    from lm.data import clean
    from lm.sources import load

    with tempfile.TemporaryDirectory() as tmp:
        docs, _ = clean(load(BuiltinData(), Path(tmp), Path(tmp))[0], BuiltinData().clean)
    target.mkdir(parents=True)
    written, part, copy = 0, 0, 0
    out = open(target / "part-00000.txt", "w", encoding="utf-8")  # noqa: SIM115 - rotated below
    while written < megabytes << 20:
        for doc in docs:
            text = f"COPY {copy} OF {doc.title.upper()}\n{doc.text}{SEPARATOR}"
            out.write(text)
            written += len(text.encode())
            copy += 1
            if out.tell() >= FILE_BYTES:
                out.close()
                part += 1
                out = open(target / f"part-{part:05d}.txt", "w", encoding="utf-8")  # noqa: SIM115
            if written >= megabytes << 20:
                break
    out.close()
    return written


def measure(work: Path, stage: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(work), stage], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{stage} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,1000", help="corpus sizes in MB, comma-separated")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lmp-data-scale")
    parser.add_argument("--stages", default="ingest,char,bpe", help="which of ingest, char, bpe to measure")
    parser.add_argument("--keep", action="store_true", help="keep the generated corpora and caches")
    args = parser.parse_args()
    rows = []
    for mb in (int(s) for s in args.sizes.split(",")):
        work = args.work / f"{mb}MB"
        shutil.rmtree(work, ignore_errors=True)
        size = generate(work / "src", mb) / 1e6
        for stage in args.stages.split(","):
            cold, cached = measure(work, stage), measure(work, stage)
            key = "ingest_s" if stage == "ingest" else "tokenize_s"
            assert cached["ingest_cached"] and (stage == "ingest" or cached["tokenize_cached"])
            row = {"MB": round(size), "stage": stage, "cold_s": round(cold[key], 2),
                   "MB_per_s": round(size / cold[key], 1), "rss_mb": round(cold["rss_mb"]),
                   "worker_rss_mb": round(cold["worker_rss_mb"]), "cached_s": round(cached[key], 2),
                   "shards": cold.get("shards"), "sample": cold.get("sample")}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(work)
    print("\n| corpus | stage | cold s | MB/s | peak RSS (stage / largest worker) | cached s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['MB']} MB | {r['stage']} | {r['cold_s']} | {r['MB_per_s']} | {r['rss_mb']} / "
              f"{r['worker_rss_mb']} MB | {r['cached_s']} |")  # fmt: skip


if __name__ == "__main__":
    main()
