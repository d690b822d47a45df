import pytest

from lm.config import DataConfig
from lm.corpora.shakespeare import GENRES, load_plays, markdown_to_text
from lm.data import DataError, build_corpus, corpus_digest, split_tail

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


def test_unknown_play_names_the_available_ones():
    with pytest.raises(ValueError, match="unknown play.*no-such-play.*macbeth"):
        load_plays(plays=("macbeth", "no-such-play"))


def test_tail_split_cuts_at_a_line_boundary():
    text = "".join(f"line {i}\n" for i in range(100))
    train, val = split_tail(text, 0.1)
    assert train + val == text and train.endswith("\n")
    assert 0.05 < len(val) / len(text) < 0.15


def test_corpus_is_deterministic_and_reused(tmp_path):
    cfg = DataConfig(plays=("macbeth",), max_chars=20000)
    a = build_corpus(cfg, tmp_path)
    mtime = (a.path / "train.txt").stat().st_mtime_ns
    b = build_corpus(cfg, tmp_path)
    assert a == b and (b.path / "train.txt").stat().st_mtime_ns == mtime
    assert a.digest == corpus_digest(a.train_path.read_text(), a.val_path.read_text())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_changed_split_changes_the_digest(tmp_path):
    a = build_corpus(DataConfig(plays=("macbeth",), val_fraction=0.1), tmp_path)
    b = build_corpus(DataConfig(plays=("macbeth",), val_fraction=0.2), tmp_path)
    assert a.digest != b.digest


def test_validation_split_shorter_than_context_is_refused_before_writing(tmp_path):
    with pytest.raises(DataError, match="validation split of .* fewer than the 5000 needed"):
        build_corpus(DataConfig(plays=("macbeth",), max_chars=10000), tmp_path / "out", min_val_chars=5000)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
