"""The promotion gate, alias moves and their atomicity, on a real (SQLite) MLflow registry."""

from __future__ import annotations

import json
import math
import time

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_model

from flows.config import PromoteConfig
from flows.registry import promotion
from flows.registry import register as registry
from lm.config import GPTConfig
from lm.models import build_model
from lm.results import Package, Served
from lm.tokenizers import CharTokenizer

SERVED = Served(example_input="ROMEO:\n", example_output=["ROMEO:\n..."])
GATE = PromoteConfig(metric="val_bpc", mode="min", min_improvement=0.005)


def test_the_gate_as_a_pure_function():
    assert promotion.gate(GATE, 2.4, None) == (True, "no champion yet")
    assert promotion.gate(GATE, 2.40, 2.50)[0]
    assert not promotion.gate(GATE, 2.498, 2.50)[0]  # better, but by less than min_improvement
    assert not promotion.gate(GATE, 2.6, 2.5)[0]
    assert not promotion.gate(GATE, math.nan, None)[0]  # NaN never promotes, even with no champion
    assert not promotion.gate(GATE, math.inf, 2.5)[0]
    assert promotion.gate(PromoteConfig(metric="val_bpc", mode="max"), 0.9, 0.8)[0]


def _version(client, name, bpc, data="d1"):
    """A registered version carrying metric tags, its artifact a small text file (fast)."""
    with mlflow.start_run() as run:
        mlflow.log_text("weights", "model.txt")
    tags = {"val_bpc": f"{bpc:.6g}", "data_digest": data}
    uri = f"runs:/{run.info.run_id}/model.txt"
    version, created = promotion.register_version(client, name, run.info.run_id, tags, f"w{bpc}{data}", lambda: uri)
    assert created
    return version


def _aliases(client, name):
    return {alias: int(v) for alias, v in client.get_registered_model(name).aliases.items()}


def _gate(client, name, version, evaluate_champion=None, force=False):
    decision = promotion.decide(client, name, version, GATE, evaluate_champion, force=force)
    promotion.apply(client, name, version, decision)
    return decision


def test_worse_and_nan_challengers_never_promote_a_better_one_does_and_rollback_restores(mlflow_store):
    client = MlflowClient()
    v1 = _version(client, "m", 2.50)
    assert _gate(client, "m", v1).promoted and _aliases(client, "m") == {"champion": 1}

    worse = _gate(client, "m", _version(client, "m", 2.60))
    assert not worse.promoted and _aliases(client, "m") == {"champion": 1}
    tags = client.get_model_version("m", "2").tags
    assert tags["lmp.gate.promoted"] == "False" and tags["lmp.gate.champion"] == "2.5"
    assert tags["lmp.gate.challenger"] == "2.6" and "improvement" in tags["lmp.gate.reason"]

    assert not _gate(client, "m", _version(client, "m", math.nan)).promoted
    assert _aliases(client, "m") == {"champion": 1}

    better = _gate(client, "m", _version(client, "m", 2.40))
    assert better.promoted and _aliases(client, "m") == {"champion": 4, "previous": 1}

    assert promotion.rollback(client, "m") == (1, 4)
    assert _aliases(client, "m") == {"champion": 1}
    assert "restored" in client.get_model_version("m", "1").tags["lmp.rollback"]
    assert "demoted" in client.get_model_version("m", "4").tags["lmp.rollback"]
    with pytest.raises(LookupError, match="no @previous"):
        promotion.rollback(client, "m")


def test_forced_promotion_records_who_forced_it(mlflow_store):
    client = MlflowClient()
    _gate(client, "m", _version(client, "m", 2.5))
    forced = _gate(client, "m", _version(client, "m", 2.7), force=True)
    assert forced.promoted and forced.forced_by and _aliases(client, "m") == {"champion": 2, "previous": 1}
    assert client.get_model_version("m", "2").tags["lmp.gate.forced_by"] == forced.forced_by


def test_a_champion_trained_on_other_data_is_re_evaluated_on_the_challengers(mlflow_store):
    client = MlflowClient()
    _gate(client, "m", _version(client, "m", 2.0, data="old"))  # its 2.0 was measured on other data
    seen = []

    def evaluate_champion(version):
        seen.append(version.version)
        return 2.9  # on the challenger's data the champion is much worse

    decision = _gate(client, "m", _version(client, "m", 2.5, data="new"), evaluate_champion)
    assert [int(v) for v in seen] == [1]
    assert decision.promoted and decision.champion == 2.9


def test_alias_moves_are_all_or_nothing(mlflow_store, monkeypatch):
    client = MlflowClient()
    _gate(client, "m", _version(client, "m", 2.5))
    v2 = _version(client, "m", 2.4)
    real, calls = MlflowClient.set_registered_model_alias, []

    def flaky(self, name, alias, version):
        calls.append(alias)
        if len(calls) == 2:
            raise RuntimeError("registry went away")
        return real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", flaky)
    with pytest.raises(RuntimeError):
        promotion.move_aliases(client, "m", {"challenger": int(v2.version), "previous": 1, "champion": 2})
    monkeypatch.undo()
    assert _aliases(client, "m") == {"champion": 1}  # the challenger move was undone too


def _package(tmp_path, seed: int) -> dict[str, str]:
    torch.manual_seed(seed)
    cfg = GPTConfig(num_layers=1, num_heads=1, embed_dim=8, context_length=8)
    tok = CharTokenizer(sorted(set("ROMEO:\n abcdefgh")))
    model = build_model(cfg, tok.vocab_size)
    out = tmp_path / f"pkg{seed}"
    out.mkdir()
    save_model(model, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"model": cfg.model_dump(mode="json"), "vocab_size": tok.vocab_size}))
    (out / "tokenizer.json").write_text(tok.to_json())
    return {"weights": str(out / "model.safetensors"), "config": str(out / "config.json"),
            "tokenizer": str(out / "tokenizer.json")}  # fmt: skip


def test_a_failure_between_version_creation_and_alias_move_changes_no_alias_and_a_rerun_adds_no_version(
    mlflow_store, tmp_path, monkeypatch
):
    client = MlflowClient()

    def register(files, bpc):
        with mlflow.start_run() as run:
            pass
        tags = {"val_bpc": str(bpc), "data_digest": "d"}
        return registry.log_and_register(run.info.run_id, "lm", Package(**files), tags, SERVED, promote=GATE)

    first = register(_package(tmp_path, 1), 2.5)
    assert first.created and _aliases(client, "lm") == {"challenger": 1, "champion": 1}

    second_files = _package(tmp_path, 2)
    real_move = promotion.move_aliases
    monkeypatch.setattr(promotion, "move_aliases", lambda *a, **k: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError):
        register(second_files, 2.4)
    assert _aliases(client, "lm") == {"challenger": 1, "champion": 1}  # aliases as they were
    assert len(client.search_model_versions("name = 'lm'")) == 2

    monkeypatch.setattr(promotion, "move_aliases", real_move)
    again = register(second_files, 2.4)  # the same weights: the existing version is reused
    assert not again.created and again.version == 2
    assert len(client.search_model_versions("name = 'lm'")) == 2
    assert _aliases(client, "lm") == {"challenger": 2, "champion": 2, "previous": 1}


def test_the_flow_re_evaluates_a_champion_trained_on_other_data(prefect_harness, mlflow_store, tmp_path):
    from pathlib import Path

    from flows.config import load_pipelines
    from flows.pipeline import lm_pipeline

    smoke = load_pipelines(Path(__file__).resolve().parents[3] / "pipelines.yaml").get("smoke")
    first = lm_pipeline(smoke, workdir=str(tmp_path / ".lmp"))
    other_data = smoke.overridden({"data.max_chars": 150000})
    second = lm_pipeline(other_data, workdir=str(tmp_path / ".lmp"))
    assert first["data_digest"] != second["data_digest"]

    client = MlflowClient()
    champion_tags = client.get_model_version("smoke", str(first["registered"]["version"])).tags
    tags = client.get_model_version("smoke", str(second["registered"]["version"])).tags
    on_new_data = float(tags["lmp.gate.champion"])  # the old champion, evaluated on the second run's split
    assert math.isfinite(on_new_data) and f"{on_new_data:.6g}" != champion_tags["val_bpc"]
    assert float(tags["lmp.gate.challenger"]) == pytest.approx(second["metrics"]["val_bpc"], rel=1e-5)
    promoted = tags["lmp.gate.promoted"] == "True"
    assert promoted == (on_new_data - second["metrics"]["val_bpc"] >= smoke.promote.min_improvement)
    assert _aliases(client, "smoke")["champion"] == (second["registered"]["version"] if promoted else 1)


def _history(client, name, version) -> list[dict]:
    """The version's promotion history as stored: ``lmp.history.*`` tags (JSON), oldest first."""
    tags = client.get_model_version(name, str(version)).tags
    return [json.loads(tags[k]) for k in sorted(tags) if k.startswith("lmp.history.")]


def test_two_gates_interleaved_leave_the_better_model_champion_and_both_decisions_in_the_history(mlflow_store):
    """decide B, decide A, apply B, apply A (what two processes on a tracking server can do): the second apply
    sees that @champion moved since its decision and aborts instead of putting the worse model back."""
    client = MlflowClient()
    _gate(client, "m", _version(client, "m", 2.50))
    a, b = _version(client, "m", 2.45), _version(client, "m", 2.30)  # both beat v1; b beats a
    decided_b = promotion.decide(client, "m", b, GATE)
    decided_a = promotion.decide(client, "m", a, GATE)
    assert decided_a.promoted and decided_b.promoted  # each against v1
    promotion.apply(client, "m", b, decided_b)
    with pytest.raises(RuntimeError, match=r"@champion of 'm' moved from v1 to v3"):
        promotion.apply(client, "m", a, decided_a)
    assert _aliases(client, "m") == {"champion": 3, "previous": 1}
    assert [e["event"] for e in _history(client, "m", 3)] == ["promoted"]
    (aborted,) = _history(client, "m", 2)
    assert aborted["event"] == "aborted" and aborted["champion_version"] == 1 and aborted["challenger"] == 2.45
    assert "@" in aborted["who"] and aborted["when"].endswith("Z")


def test_two_pipeline_gates_racing_are_serialised_by_the_promotion_lock(mlflow_store, tmp_path, monkeypatch):
    """Two registrations in two threads, B (better) deciding first; A's gate is attempted while B holds the
    decision. With the per-model lock A decides only after B's aliases moved, so A is compared with B."""
    import logging
    import threading
    from types import SimpleNamespace

    client = MlflowClient()
    _gate(client, "lm", _version(client, "lm", 2.50))

    def fake_log_model(run_id, package, *args, **kwargs):  # a tiny artifact instead of a whole pyfunc (fast)
        client.log_text(run_id, "weights", "model.txt")
        return SimpleNamespace(model_uri=f"runs:/{run_id}/model.txt")

    monkeypatch.setattr(registry, "log_model", fake_log_model)
    events = {k: threading.Event() for k in ("b_decided", "a_decided", "a_waits", "b_done")}
    real_decide = promotion.decide

    def decide(client, name, version, *args, **kwargs):
        decision = real_decide(client, name, version, *args, **kwargs)
        me = "b" if version.tags["val_bpc"] == "2.3" else "a"
        events[f"{me}_decided"].set()
        if me == "b":  # hold on until A has decided too (no lock) or is waiting for the lock
            deadline = time.monotonic() + 30
            while not (events["a_decided"].is_set() or events["a_waits"].is_set()) and time.monotonic() < deadline:
                events["a_waits"].wait(0.01)
        else:  # apply only after B applied: the order that put the worse model back
            events["b_done"].wait(30)
        return decision

    monkeypatch.setattr(promotion, "decide", decide)

    class Waiting(logging.Handler):
        def emit(self, record):
            if "waiting" in record.getMessage():
                events["a_waits"].set()

    handler = Waiting()
    logging.getLogger("flows.registry.promotion").addHandler(handler)
    errors = []

    def register(bpc, tag):
        try:
            run_id = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
            weights = tmp_path / f"w{tag}.bin"
            weights.write_text(tag)
            tags = {"val_bpc": str(bpc), "data_digest": "d1"}
            package = Package(weights=str(weights), config="", tokenizer="")
            registry.log_and_register(run_id, "lm", package, tags, SERVED, promote=GATE)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            if tag == "b":
                events["b_done"].set()

    try:
        thread_b = threading.Thread(target=register, args=(2.3, "b"))
        thread_b.start()
        assert events["b_decided"].wait(30)
        thread_a = threading.Thread(target=register, args=(2.45, "a"))
        thread_a.start()
        thread_a.join(60)
        thread_b.join(60)
    finally:
        logging.getLogger("flows.registry.promotion").removeHandler(handler)
    assert not errors, errors
    b, a = 2, 3  # B registered first
    assert _aliases(client, "lm") == {"champion": b, "previous": 1, "challenger": a}
    assert [e["event"] for e in _history(client, "lm", b)] == ["promoted"]
    (decided,) = _history(client, "lm", a)  # compared with B, not with the old champion; never aborted
    assert decided["event"] == "rejected" and decided["champion_version"] == b and decided["champion"] == 2.3


def test_a_forced_promotion_stays_on_record_after_a_later_gate_on_the_same_version(mlflow_store):
    client = MlflowClient()
    _gate(client, "m", _version(client, "m", 2.5))
    v2 = _version(client, "m", 2.7)
    forced = promotion.decide(client, "m", v2, GATE, force=True)
    promotion.apply(client, "m", v2, forced, reason="hotfix for the tokenizer bug")
    assert _aliases(client, "m") == {"champion": 2, "previous": 1}
    _gate(client, "m", client.get_model_version("m", "2"))  # a later gate on v2: "already @champion"
    reason = client.get_model_version("m", "2").tags["lmp.gate.reason"]
    assert reason == "version 2 is already @champion; nothing to promote"
    first, later = _history(client, "m", 2)
    assert first["event"] == "forced" and first["forced"] and first["reason"] == "hotfix for the tokenizer bug"
    assert first["who"] == forced.forced_by and first["challenger"] == 2.7 and first["champion"] == 2.5
    assert later["event"] == "rejected" and not later["forced"] and "already @champion" in later["detail"]
    assert [e["event"] for e in _history(client, "m", 1)] == ["promoted", "replaced"]


def test_the_promotion_lock_lives_beside_a_local_store_and_a_tracking_server_relies_on_compare_and_set(tmp_path):
    store = tmp_path / "mlruns" / "mlflow.db"
    locks = tmp_path / "mlruns" / "locks"
    assert promotion.lock_path("my model/x", f"sqlite:///{store}") == locks / "my%20model%2Fx.lock"
    assert promotion.lock_path("m", "http://127.0.0.1:5000") is None
    with promotion.model_lock("m", f"sqlite:///{store}"):
        assert (locks / "m.lock").is_file()
    with promotion.model_lock("m", "http://127.0.0.1:5000"):  # nothing to lock: the apply re-reads @champion
        pass


class _RacingClient:
    """A registry whose first ``errors`` alias writes fail as MLflow's SQL store does when another client inserted
    the same new alias in between (PostgreSQL's primary-key violation)."""

    def __init__(self, errors: list[str]):
        self.errors, self.calls = list(errors), []

    def set_registered_model_alias(self, name, alias, version):
        self.calls.append((name, alias, version))
        if self.errors:
            from mlflow.exceptions import MlflowException

            raise MlflowException(self.errors.pop(0))


def test_an_alias_set_by_another_client_at_the_same_moment_is_set_again():
    from flows.registry.promotion import set_alias

    race = ('BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint '
            '"registered_model_alias_pk"')  # fmt: skip
    client = _RacingClient([race])
    set_alias(client, "m", "challenger", 3)
    assert client.calls == [("m", "challenger", "3")] * 2


def test_any_other_alias_error_is_not_retried():
    from mlflow.exceptions import MlflowException

    from flows.registry.promotion import set_alias

    client = _RacingClient(["RESOURCE_DOES_NOT_EXIST: Model Version (name=m, version=9) not found"])
    with pytest.raises(MlflowException, match="not found"):
        set_alias(client, "m", "champion", 9)
    assert len(client.calls) == 1
