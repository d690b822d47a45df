"""Every source kind on real files the tests create: text, markdown, gzip, CSV, JSONL, Parquet, binary,
non-UTF-8; and `hub` through the real `datasets.load_dataset` on a dataset folder saved locally."""

from __future__ import annotations

import gzip
import json

import pandas as pd
import pytest

from lm.config import FilesData, HubData
from lm.sources import SourceError, fingerprint, load
from lm.textstream import decode

LINE = "To be, or not to be, that is the question:\n"


def files(tmp_path, *paths, **options):
    return FilesData(source="files", paths=tuple(paths), **options)


def texts(docs):
    return [d.text for d in docs]


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(LINE * 3)
    (root / "sub" / "b.md").write_text("Whether 'tis nobler in the mind to suffer\n")
    (root / "c.txt.gz").write_bytes(gzip.compress(b"The slings and arrows\n"))
    (root / "notes.bin").write_bytes(b"\x00\x01\x02binary\x00" * 50)
    return root


def test_a_folder_reads_every_text_file_and_skips_binaries_with_a_warning(tmp_path, folder):
    docs, report = load(files(tmp_path, "corpus"), tmp_path, tmp_path / "cache")
    assert texts(docs) == [LINE * 3, "The slings and arrows\n", "Whether 'tis nobler in the mind to suffer\n"]
    assert [d.title for d in docs] == ["a.txt", "c.txt.gz", "b.md"]
    assert len(report.skipped) == 1 and "notes.bin" in report.skipped[0] and "binary" in report.skipped[0]


def test_gzip_is_detected_by_content_not_name(tmp_path):
    (tmp_path / "plain.txt").write_bytes(gzip.compress(LINE.encode()))
    docs, _ = load(files(tmp_path, "plain.txt"), tmp_path, tmp_path / "cache")
    assert texts(docs) == [LINE]


def test_globs_and_separators(tmp_path, folder):
    (tmp_path / "scenes.txt").write_text("one\n===\ntwo\n===\nthree\n")
    docs, _ = load(files(tmp_path, "scenes.txt", separator="===\n"), tmp_path, tmp_path / "cache")
    assert texts(docs) == ["one\n", "two\n", "three\n"]
    docs, _ = load(files(tmp_path, "corpus/**/*.md"), tmp_path, tmp_path / "cache")
    assert [d.title for d in docs] == ["b.md"]


def test_non_utf8_strict_names_file_and_offset(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(SourceError, match=r"latin1.txt: invalid UTF-8 at byte offset 3 .*encoding_errors: replace"):
        load(files(tmp_path, "latin1.txt"), tmp_path, tmp_path / "cache")


def test_non_utf8_replace_counts_replacements(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    docs, report = load(files(tmp_path, "latin1.txt", encoding_errors="replace"), tmp_path, tmp_path / "cache")
    assert texts(docs) == ["caf\ufffd cr\ufffdme"] and report.replaced_chars == 2


def test_bom_is_dropped_and_offsets_count_it():
    assert decode(b"\xef\xbb\xbfhello", "x", "strict") == ("hello", 0)
    with pytest.raises(SourceError, match="byte offset 5"):
        decode(b"\xef\xbb\xbfhi\xff", "x", "strict")


def test_jsonl_csv_parquet_through_datasets_loaders(tmp_path):
    rows = [{"text": "first line", "play": "a"}, {"text": "second line", "play": "b"}, {"text": "third", "play": "a"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "z.jsonl.gz").write_bytes(gzip.compress((tmp_path / "d.jsonl").read_bytes()))
    for name in ("d.jsonl", "d.csv", "d.parquet", "z.jsonl.gz"):
        docs, _ = load(files(tmp_path, name), tmp_path, tmp_path / "cache")
        assert texts(docs) == ["first line\nsecond line\nthird"], name
        grouped, _ = load(files(tmp_path, name, document_column="play"), tmp_path, tmp_path / "cache")
        assert {d.title: d.text for d in grouped} == {"a": "first line\nthird", "b": "second line"}, name


def test_missing_text_column_names_the_columns_that_exist(tmp_path):
    (tmp_path / "d.csv").write_text("body,label\nhello,1\n")
    with pytest.raises(SourceError, match=r"d.csv: no column 'text'; the columns are \['body', 'label'\]"):
        load(files(tmp_path, "d.csv"), tmp_path, tmp_path / "cache")


@pytest.mark.parametrize(
    "paths, message",
    [
        (("missing.txt",), "'missing.txt' does not exist"),
        (("empty",), "the folder 'empty' is empty"),
        (("*.nothing",), r"the pattern '\*.nothing' matches no file"),
    ],
)
def test_missing_inputs_are_named(tmp_path, paths, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=message):
        load(files(tmp_path, *paths), tmp_path, tmp_path / "cache")


def test_urls_are_refused_in_config():
    with pytest.raises(ValueError, match="only local paths"):
        FilesData(source="files", paths=("https://example.com/x.txt",))


def test_fingerprint_changes_when_a_file_is_edited(tmp_path, folder):
    cfg = files(tmp_path, "corpus")
    before = fingerprint(cfg, tmp_path)
    assert fingerprint(cfg, tmp_path) == before
    (folder / "a.txt").write_text(LINE * 4)
    after = fingerprint(cfg, tmp_path)
    assert after != before and set(after["files"]) == set(before["files"])


def test_hub_source_loads_a_local_dataset_with_the_real_loader(tmp_path):
    repo = tmp_path / "my-dataset" / "data"
    repo.mkdir(parents=True)
    pd.DataFrame({"content": ["alpha beta", "gamma delta"]}).to_parquet(repo / "train-00000.parquet")
    cfg = HubData(source="hub", dataset=str(tmp_path / "my-dataset"), text_column="content")
    docs, _ = load(cfg, tmp_path, tmp_path / "cache")
    assert texts(docs) == ["alpha beta", "gamma delta"]
    with pytest.raises(SourceError, match=r"no column 'text'; the columns are \['content'\]"):
        load(cfg.model_copy(update={"text_column": "text"}), tmp_path, tmp_path / "cache")


def test_hub_source_saved_with_save_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["one", "two"]}).save_to_disk(str(tmp_path / "saved"))
    docs, _ = load(HubData(source="hub", dataset=str(tmp_path / "saved")), tmp_path, tmp_path / "cache")
    assert texts(docs) == ["one", "two"]


def test_hub_offline_names_the_dataset_and_suggests_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = HubData(source="hub", dataset="someone/not-downloaded-corpus")
    with pytest.raises(SourceError, match=r"'someone/not-downloaded-corpus' .* could not be loaded.*source: files"):
        load(cfg, tmp_path, tmp_path / "cache")


@pytest.mark.parametrize("path", ["../secrets.txt", "/etc/passwd", "data/../../x.txt", "~/notes.txt"])
def test_paths_outside_the_project_are_refused_before_any_io(path):
    with pytest.raises(ValueError, match="lead outside the project directory"):
        FilesData(source="files", paths=(path,))
    assert FilesData(source="files", paths=(path,), allow_outside=True).allow_outside


def test_symlinks_out_of_the_project_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.txt").write_text("private")
    project = tmp_path / "project"
    project.mkdir()
    (project / "link.txt").symlink_to(outside / "x.txt")
    with pytest.raises(SourceError, match="resolve outside"):
        load(files(project, "link.txt"), project, project / "cache")
    docs, _ = load(files(project, "link.txt", allow_outside=True), project, project / "cache")
    assert texts(docs) == ["private"]


# ---------------------------------------------------------------- issue 13, item 10


def _saved_dataset(path):
    import datasets

    datasets.Dataset.from_dict({"text": ["private one", "private two"]}).save_to_disk(str(path))
    return path


@pytest.fixture
def outside_dataset(tmp_path):
    """A project folder, and a saved dataset next to it (outside the project)."""
    (tmp_path / "project").mkdir()
    return tmp_path / "project", _saved_dataset(tmp_path / "elsewhere" / "saved")


@pytest.mark.parametrize("how", ["absolute", "relative", "symlink"])
def test_a_hub_folder_outside_the_project_is_refused_before_reading(outside_dataset, how):
    project, saved = outside_dataset
    if how == "symlink":
        (project / "link").symlink_to(saved)
    dataset = {"absolute": str(saved), "relative": "../elsewhere/saved", "symlink": "link"}[how]
    cfg = HubData(source="hub", dataset=dataset)
    for read in (lambda: fingerprint(cfg, project), lambda: load(cfg, project, project / "cache")):
        with pytest.raises(SourceError, match=r"data.dataset .* resolves outside .*project.*set allow_outside: true"):
            read()
    docs, _ = load(HubData(source="hub", dataset=dataset, allow_outside=True), project, project / "cache")
    assert texts(docs) == ["private one", "private two"]


def test_a_hub_folder_inside_the_project_is_read_relative_to_it_and_fingerprinted(tmp_path):
    _saved_dataset(tmp_path / "data" / "saved")
    cfg = HubData(source="hub", dataset="data/saved")
    docs, _ = load(cfg, tmp_path, tmp_path / "cache")
    assert texts(docs) == ["private one", "private two"]
    before = fingerprint(cfg, tmp_path)
    import datasets

    datasets.Dataset.from_dict({"text": ["edited"]}).save_to_disk(str(tmp_path / "data" / "saved2"))
    import shutil

    shutil.rmtree(tmp_path / "data" / "saved")
    (tmp_path / "data" / "saved2").rename(tmp_path / "data" / "saved")
    assert fingerprint(cfg, tmp_path) != before  # an edited local dataset is ingested again


def test_a_labelled_hub_folder_outside_the_project_is_refused(outside_dataset):
    from lm.classification.config import LabelledHub
    from lm.classification.data import build_dataset
    from lm.errors import DataError

    project, saved = outside_dataset
    with pytest.raises(DataError, match=r"data.dataset .* resolves outside .*set allow_outside: true"):
        build_dataset(LabelledHub(source="hub", dataset=str(saved)), project / "out", base_dir=project)
    assert not (project / "out" / "index").exists()


LONG = LINE * 300  # > 8 KiB: past the binary sniff window


def test_a_nul_byte_past_the_first_8_kib_is_an_error_with_its_offset(tmp_path):
    (tmp_path / "late.txt").write_bytes(LONG.encode() + b"\x00tail\n")
    assert len(LONG.encode()) > 8192
    with pytest.raises(SourceError, match=rf"late.txt: NUL byte at byte offset {len(LONG.encode())}"):
        load(files(tmp_path, "late.txt"), tmp_path, tmp_path / "cache")
    docs, report = load(files(tmp_path, "late.txt", encoding_errors="replace"), tmp_path, tmp_path / "cache")
    assert texts(docs) == [LONG + "\ufffdtail\n"] and report.replaced_chars == 1


def test_no_nul_byte_reaches_train_txt(tmp_path):
    from lm.config import SplitConfig
    from lm.data import build_corpus

    (tmp_path / "late.txt").write_bytes(LONG.encode() + b"\x00tail\n" + LONG.encode())
    cfg = files(tmp_path, "late.txt", encoding_errors="replace", split=SplitConfig(kind="tail", val_fraction=0.1))
    corpus, _ = build_corpus(cfg, tmp_path / "out", base_dir=tmp_path)
    assert "\x00" not in corpus.split_path("train").read_text() + corpus.split_path("val").read_text()


def test_a_nul_byte_late_in_a_csv_is_an_error_or_replaced(tmp_path):
    body = "text\n" + "".join(f"row {i} to be or not to be\n" for i in range(400))
    (tmp_path / "t.csv").write_bytes(body.encode() + b"bad\x00row\n")
    with pytest.raises(SourceError, match=rf"t.csv: NUL byte at byte offset {len(body.encode()) + 3}"):
        load(files(tmp_path, "t.csv"), tmp_path, tmp_path / "cache")
    docs, report = load(files(tmp_path, "t.csv", encoding_errors="replace"), tmp_path, tmp_path / "cache")
    assert "\x00" not in docs[0].text and "bad\ufffdrow" in docs[0].text and report.replaced_chars == 1


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32", "utf-32-be"])
def test_utf16_and_utf32_files_with_a_bom_are_decoded_not_skipped(tmp_path, encoding):
    text = "To be, or not to be — café, naïve, 日本\n" * 3
    bom = {"utf-16-be": "\ufeff", "utf-32-be": "\ufeff"}.get(encoding, "")  # the -be codecs write no BOM
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "wide.txt").write_bytes((bom + text).encode(encoding))
    docs, report = load(files(tmp_path, "corpus"), tmp_path, tmp_path / "cache")
    assert texts(docs) == [text] and not report.skipped


def test_invalid_utf16_names_the_encoding_and_offset():
    with pytest.raises(SourceError, match=r"x: invalid UTF-16-LE at byte offset 4"):
        decode(b"\xff\xfeh\x00\x00\xdc", "x", "strict")  # a lone low surrogate after "h"
