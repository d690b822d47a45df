import pytest

from lm.config import BuiltinData, CleanConfig, SplitConfig
from lm.corpora.shakespeare import GENRES, Document, load_plays, markdown_to_text
from lm.data import DataError, build_corpus, clean, corpus_digest, split, split_tail

MD = """# Macbeth

## ACT I

### SCENE I. A desert place.

_Thunder and lightning. Enter three
Witches_

**First Witch**  
When shall we _three_ meet again  
In thunder, lightning, or in rain?

**MACBETH**  
_\\[Aside]_  
Two truths are told--

*Exeunt*
"""


def test_markdown_becomes_speaker_lines_and_speech():
    text = markdown_to_text(MD)
    assert text == (
        "Thunder and lightning. Enter three\nWitches\n\n"
        "First Witch:\nWhen shall we three meet again\nIn thunder, lightning, or in rain?\n\n"
        "MACBETH:\n[Aside]\nTwo truths are told--\n\nExeunt\n"
    )


def test_stage_directions_can_be_dropped():
    text = markdown_to_text(MD, stage_directions=False)
    assert "Thunder" not in text and "Exeunt" not in text and "[Aside]" not in text
    assert "First Witch:\nWhen shall we three meet again" in text


def test_builtin_corpus_has_all_38_plays_in_genre_folders():
    docs = load_plays()
    assert len(docs) == 38
    assert {d.genre for d in docs} == set(GENRES)
    joined = "".join(d.text for d in docs)
    assert "**" not in joined and "\\[" not in joined and "\n#" not in joined
    assert "MACBETH:\n" in joined
    assert {d.title for d in load_plays(genres=("roman",))} == {
        "Antony and Cleopatra",
        "Coriolanus",
        "Julius Caesar",
        "Titus Andronicus",
    }


def test_unknown_play_names_the_available_ones():
    with pytest.raises(DataError, match="unknown play.*no-such-play.*macbeth"):
        load_plays(plays=("macbeth", "no-such-play"))


def test_tail_split_cuts_at_a_line_boundary():
    text = "".join(f"line {i}\n" for i in range(100))
    train, val = split_tail(text, 0.1)
    assert train + val == text and train.endswith("\n")
    assert 0.05 < len(val) / len(text) < 0.15


def test_tail_split_with_test_fraction_keeps_order():
    docs = [Document(f"d{i}", "", f"document {i} " * 20) for i in range(20)]
    parts = split(docs, SplitConfig(val_fraction=0.1, test_fraction=0.1), None)
    assert parts["train"] + parts["val"] + parts["test"] == "\n\n".join(d.text for d in docs) + "\n"
    assert parts["test"].rstrip().endswith("document 19") and parts["val"] and parts["train"]


def test_document_split_never_cuts_a_document_and_is_seeded():
    docs = [Document(f"d{i}", "", f"document number {i}") for i in range(200)]
    cfg = SplitConfig(kind="documents", val_fraction=0.2, test_fraction=0.1, seed=3)
    parts = split(docs, cfg, None)
    where = {d.text: [s for s, t in parts.items() if d.text + "\n" in t + "\n"] for d in docs}
    assert all(len(v) == 1 for v in where.values())  # each document in exactly one split
    counts = {s: sum(1 for v in where.values() if v == [s]) for s in parts}
    assert 20 <= counts["val"] <= 60 and 5 <= counts["test"] <= 35
    assert split(docs, cfg, None) == parts
    assert split(docs, cfg.model_copy(update={"seed": 4}), None) != parts


def test_cleaning_counts_each_step():
    docs = [
        Document("a", "", "caf\u0065\u0301\r\nline"),
        Document("b", "", "x"),
        Document("c", "", "   "),
        Document("d", "", "caf\u00e9\nline"),
    ]
    out, counts = clean(docs, CleanConfig(unicode="NFC", min_chars=3, dedupe=True))
    assert [d.text for d in out] == ["caf\u00e9\nline"]  # NFC makes a and d identical; dedupe keeps the first
    assert counts == {"documents_loaded": 4, "after_dropping_empty": 3, "after_min_chars": 2, "after_dedupe": 1}


def test_corpus_is_deterministic_cached_and_verified(tmp_path):
    cfg = BuiltinData(plays=("macbeth",), max_chars=20000)
    a, report = build_corpus(cfg, tmp_path, base_dir=tmp_path)
    assert not report["cached"]
    b, report = build_corpus(cfg, tmp_path, base_dir=tmp_path)
    assert report["cached"] and b.digest == a.digest
    texts = {s: a.split_path(s).read_text() for s in ("train", "val")}
    assert a.digest == corpus_digest(texts)
    a.split_path("val").write_text("tampered")  # a cached output altered on disk is rebuilt, not trusted
    c, report = build_corpus(cfg, tmp_path, base_dir=tmp_path)
    assert not report["cached"] and c.digest == a.digest and a.split_path("val").read_text() == texts["val"]
    # no temp dirs left (.locks holds the per-key build locks, which are never removed)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != ".locks"]


def test_changed_split_changes_the_digest(tmp_path):
    a, _ = build_corpus(BuiltinData(plays=("macbeth",)), tmp_path, base_dir=tmp_path)
    b, _ = build_corpus(
        BuiltinData(plays=("macbeth",), split=SplitConfig(val_fraction=0.2)), tmp_path, base_dir=tmp_path
    )
    assert a.digest != b.digest


def test_validation_split_shorter_than_context_is_refused_before_writing(tmp_path):
    with pytest.raises(DataError, match=r"split too short \(val: \d+ characters\), each needs more than 4999"):
        build_corpus(
            BuiltinData(plays=("macbeth",), max_chars=10000), tmp_path / "out", base_dir=tmp_path, min_chars=5000
        )
    assert not (tmp_path / "out").exists() or not [p for p in (tmp_path / "out").rglob("*.txt")]


def test_a_test_split_shorter_than_context_is_refused(tmp_path):
    cfg = BuiltinData(plays=("macbeth",), max_chars=50000, split=SplitConfig(val_fraction=0.2, test_fraction=0.01))
    with pytest.raises(DataError, match=r"test: \d+ characters"):
        build_corpus(cfg, tmp_path, base_dir=tmp_path, min_chars=1000)
