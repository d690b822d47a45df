"""pipelines.yaml: every shipped pipeline validates and builds; bad files list every problem by path."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from flows.config import ClassifierSpec, ConfigError, PipelineSpec, Seq2SeqSpec, load_pipelines, parse_pipelines
from lm.models import build_model

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = load_pipelines(ROOT / "pipelines.yaml")


@pytest.mark.parametrize("name", sorted(SHIPPED.pipelines))
def test_every_shipped_pipeline_validates_and_builds_its_model(name):
    spec = SHIPPED.get(name)
    assert isinstance(spec, PipelineSpec | ClassifierSpec | Seq2SeqSpec) and spec.name == name
    assert spec.description
    if spec.model is None:  # initialised from a registered model: its architecture comes from there
        assert spec.task in ("classification", "seq2seq") and spec.init_from.startswith("models:/")
        return
    model = build_model(spec.model, vocab_size=80)
    assert model.context_length == spec.model.context_length


CLASSIFIER = {"task": "classification", "data": {"source": "shakespeare-genre"}}


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"init_from": "models:/x@champion", "model": {"num_layers": 1}}, "architecture and tokenizer come from"),
        ({"init_from": "runs:/abc/model"}, "is not `scratch`, `models:/NAME@ALIAS`"),
        ({}, "init_from: scratch needs a `model:` section"),
        ({"model": {"kind": "gpt"}, "head": {"pooling": "cls"}}, "head.pooling 'cls' needs a bidirectional encoder"),
        ({"init_from": "models:/x/3", "promote": {"metric": "val_bpc"}}, "promote.metric 'val_bpc' is not reported"),
        ({"init_from": "models:/x/3", "data": {"source": "files", "paths": ["../x.csv"]}}, "lead outside"),
    ],
)
def test_classifier_specs_are_checked_once(extra, problem):
    with pytest.raises(ConfigError, match=problem) as caught:
        parse_pipelines(yaml.safe_dump({"default": "c", "pipelines": {"c": CLASSIFIER | extra}}))
    assert all(p.startswith("pipelines.c") for p in caught.value.problems)


def test_a_classifier_defaults_to_a_macro_f1_gate_and_a_char_tokenizer():
    spec = parse_pipelines(
        yaml.safe_dump({"default": "c", "pipelines": {"c": CLASSIFIER | {"model": {"num_layers": 1}}}})
    ).get("c")
    assert (spec.promote.metric, spec.promote.mode) == ("val_macro_f1", "max")
    assert spec.tokenizer.kind == "char" and spec.model.kind == "gpt" and spec.scratch


def test_default_pipeline_is_the_shakespeare_gpt():
    assert SHIPPED.default == "shakespeare-char-gpt"
    assert SHIPPED.get(None).name == "shakespeare-char-gpt"


def test_specs_are_frozen():
    with pytest.raises(ValidationError, match="frozen"):
        SHIPPED.get("smoke").train.max_steps = 1


BROKEN = """
default: a
pipelines:
  a:
    model:
      num_layers: 0
      embde_dim: 64
    train:
      learning_rate: fast
"""


def test_every_problem_is_listed_by_yaml_path():
    with pytest.raises(ConfigError) as info:
        parse_pipelines(BROKEN, "broken.yaml")
    problems = info.value.problems
    assert len(problems) == 3, problems
    text = str(info.value)
    assert "pipelines.a.model.num_layers: Input should be greater than 0" in text
    assert "pipelines.a.model.embde_dim: Extra inputs are not permitted" in text
    assert "pipelines.a.train.learning_rate: Input should be a valid number" in text
    assert text.startswith("broken.yaml: 3 problem(s)")


def test_python_tags_are_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    text = f"default: a\npipelines:\n  a: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_pipelines(text)
    assert not marker.exists()


def test_unknown_pipeline_names_the_available_ones():
    names = ", ".join(sorted(SHIPPED.pipelines))
    assert "shakespeare-bpe-gpt, shakespeare-char-gpt" in names and "smoke" in names
    with pytest.raises(KeyError, match=f"no pipeline named 'nope'; available: {names}"):
        SHIPPED.get("nope")


@pytest.mark.parametrize(
    "text, message",
    [
        ("default: b\npipelines:\n  a: {}\n", "default: Value error, 'b' is not one of the pipelines"),
        ("default: A\npipelines:\n  A: {}\n", "are not valid"),
        ("pipelines: {}\n", "default: Field required"),
        ("- just a list\n", "expected a mapping"),
        ("default: a\npipelines:\n  a: {model: {embed_dim: 30, num_heads: 4}}\n", "divisible by num_heads"),
        (
            "default: a\npipelines:\n  a: {model: {kind: rnn}}\n",
            "pipelines.a.model: Input tag 'rnn' found using 'kind'",
        ),
    ],
)
def test_structural_mistakes(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_pipelines(text)


def test_anchors_and_merge_keys_share_settings():
    text = """
default: a
pipelines:
  a:
    train: &t {max_steps: 7, batch_size: 3}
  b:
    train:
      <<: *t
      max_steps: 9
"""
    f = parse_pipelines(text)
    assert f.get("b").train.batch_size == 3 and f.get("b").train.max_steps == 9


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_pipelines(tmp_path / "none.yaml")


def _one(pipeline: dict) -> str:
    import yaml

    try:
        parse_pipelines(yaml.safe_dump({"default": "a", "pipelines": {"a": pipeline}}), "p.yaml")
    except ConfigError as e:
        return str(e)
    return ""


def test_schedules_are_validated_like_the_rest_of_the_file():
    assert _one({"schedule": {"cron": "0 3 * * *", "timezone": "Europe/Paris"}}) == ""
    assert "exactly one of `cron` or `interval`" in _one({"schedule": {"cron": "0 3 * * *", "interval": 60}})
    assert "five-field cron" in _one({"schedule": {"cron": "every night"}})
    assert "IANA time zone" in _one({"schedule": {"interval": 60, "timezone": "Mars/Olympus"}})
    bad = _one({"schedule": {"interval": 60, "parameters": {"train.max_steps": 0}}})
    assert "schedule.parameters make an invalid pipeline: train.max_steps" in bad
    spec = parse_pipelines(
        "default: a\npipelines:\n  a:\n    schedule: {interval: 60, parameters: {train.max_steps: 7}}\n", "p.yaml"
    ).get("a")
    assert spec.train.max_steps == 2000 and spec.scheduled().train.max_steps == 7


def test_the_promotion_metric_must_be_one_the_model_reports():
    assert "promote.metric 'val_bpc' is not reported for encoder models" in _one(
        {"model": {"kind": "encoder"}, "promote": {"metric": "val_bpc"}}
    )
    assert _one({"model": {"kind": "encoder"}}) == ""  # defaults to val_mlm_loss


# ---------------------------------------------------------------- bounded YAML (issue 13, item 2)

# 593 bytes: ten anchor levels, each nine aliases of the one before: 9**10 ≈ 3.5e9 values once expanded.
BOMB = """default: ab
pipelines:
  ab:
    schedule:
      interval: 3600
      parameters:
        p0: &a [x, x, x, x, x, x, x, x, x]
        p1: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
        p2: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
        p3: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
        p4: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
        p5: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
        p6: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
        p7: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
        p8: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
        p9: &j [*i, *i, *i, *i, *i, *i, *i, *i, *i]
"""
BOMBS = {
    "schedule.parameters": BOMB,
    "sweep.parameters": BOMB.replace("    schedule:\n      interval: 3600\n", "    sweep:\n"),
    "a typed key (eval.prompts)": BOMB.replace(
        "    schedule:\n      interval: 3600\n      parameters:", "    eval:\n      prompts:"
    ),
}
AS_LIMIT = 512 << 20
# The child times the load itself: interpreter start-up is not what the limit is about.
TIMED_LOAD = """
import sys, time
from flows.config import ConfigError, load_pipelines
start = time.perf_counter()
try:
    load_pipelines(sys.argv[1])
except ConfigError as e:
    print(f"elapsed {time.perf_counter() - start:.3f}")
    print(e)
    sys.exit(2)
print(f"elapsed {time.perf_counter() - start:.3f}")
"""


def _under_512mb(args: list[str], cwd: Path):
    import resource
    import subprocess

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))

    return subprocess.run(args, cwd=cwd, preexec_fn=limit, capture_output=True, text=True, timeout=60)


def test_the_593_byte_alias_bomb_is_593_bytes():
    assert len(BOMB.encode()) == 593


@pytest.mark.parametrize("where", sorted(BOMBS))
def test_an_alias_bomb_is_refused_in_under_a_second_within_512mb(tmp_path, where):
    import sys

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMBS[where])
    done = _under_512mb([sys.executable, "-c", TIMED_LOAD, str(bomb)], ROOT)
    assert done.returncode == 2, done.stdout + done.stderr
    elapsed = float(done.stdout.split()[1])
    assert elapsed < 1.0, done.stdout
    assert "aliases expand to more than 100000 values" in done.stdout
    assert "pipelines.ab." in done.stdout and "(line " in done.stdout


def test_lmp_list_refuses_the_bomb_with_exit_2_within_512mb(tmp_path):
    import shutil

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    done = _under_512mb([shutil.which("lmp"), "list", "--config", str(bomb)], tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "aliases expand to more than 100000 values" in done.stderr and "Traceback" not in done.stderr


def test_too_many_aliases_and_too_deep_nesting_are_refused_by_line():
    many = (
        "default: a\npipelines:\n  a:\n    description: &d x\n    eval:\n      prompts: ["
        + ", ".join(["*d"] * 1001)
        + "]\n"
    )
    with pytest.raises(ConfigError, match=r"line 6: more than 1000 YAML aliases"):
        parse_pipelines(many)
    deep = "default: a\npipelines:\n  a:\n    eval:\n      prompts: " + "[" * 60 + "]" * 60 + "\n"
    with pytest.raises(ConfigError, match=r"line 5: YAML nested deeper than 50 levels"):
        parse_pipelines(deep)


def test_a_recursive_anchor_is_refused():
    with pytest.raises(ConfigError, match="nested deeper than 50 levels"):
        parse_pipelines("default: a\npipelines:\n  a:\n    eval: &e {prompts: *e}\n")


@pytest.mark.parametrize(
    ("section", "value", "problem"),
    [
        ("schedule", {"interval": 60, "parameters": {"train.max_steps": {"a": 1}}}, "'train.max_steps': a mapping"),
        ("schedule", {"interval": 60, "parameters": {"eval.prompts": [["a"]]}}, "'eval.prompts': a nested list"),
        ("sweep", {"parameters": {"train.learning_rate": [[0.1]]}}, "'train.learning_rate[0]': a nested list"),
        ("sweep", {"parameters": {"train.learning_rate": [{"a": 1}]}}, "'train.learning_rate[0]': a mapping"),
    ],
)
def test_override_values_are_plain_values_not_nested_structures(section, value, problem):
    message = _one({section: value})
    assert f"pipelines.a.{section}.parameters: Value error" in message, message
    assert f"{section}.parameters {problem} is not a plain value" in message, message


def test_a_list_override_and_scalar_types_survive():
    spec = parse_pipelines(
        yaml.safe_dump(
            {
                "default": "a",
                "pipelines": {
                    "a": {"schedule": {"interval": 60, "parameters": {"eval.prompts": ["x", "y"], "train.seed": 3}}}
                },
            }
        )
    ).get("a")
    assert spec.scheduled().eval.prompts == ("x", "y") and spec.scheduled().train.seed == 3
    assert spec.schedule.parameters["train.seed"] == 3 and type(spec.schedule.parameters["train.seed"]) is int


def test_overridden_validates_and_leaves_the_spec_unchanged():
    smoke, genre = SHIPPED.get("smoke"), SHIPPED.get("smoke-genre")
    before, genre_before = smoke.model_dump(), genre.model_dump()
    with pytest.raises(ValidationError, match=r"train\.max_steps"):
        smoke.overridden({"train.max_steps": 0})
    changed = smoke.overridden({"retries": 2, "name": "smoke-x", "train.max_steps": 30, "data.max_chars": 30})
    assert (changed.retries, changed.name, changed.train.max_steps, changed.data.max_chars) == (2, "smoke-x", 30, 30)
    assert changed.train.batch_size == smoke.train.batch_size  # a dotted key changes that leaf only
    head = genre.overridden({"head": {"pooling": "last", "dropout": 0.0}, "init_from": "models:/x@champion"})
    assert (head.head.pooling, head.head.dropout, head.init_from) == ("last", 0.0, "models:/x@champion")
    assert head.overridden({"head.pooling": "mean"}).head.dropout == 0.0  # a dotted key: that leaf only
    assert head.overridden({"head": {"pooling": "mean"}}).head.dropout == 0.1  # a whole section: the rest defaults
    ddp = smoke.overridden({"train.distributed.nproc_per_node": 2})  # into a section that is unset (None)
    assert smoke.train.distributed is None and ddp.train.distributed.nproc_per_node == 2
    assert smoke.model_dump() == before and genre.model_dump() == genre_before
