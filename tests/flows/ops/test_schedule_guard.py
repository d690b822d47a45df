"""What a scheduled run may be asked to do (the pipeline's name and allow-listed overrides, never a spec), and the
guard in front of `lmp up`'s Prefect server (loopback Host and the server's own Origin only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project whose `smoke` pipeline is scheduled, with its own overrides (one of them a data key)."""
    config = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    config["pipelines"]["smoke"]["schedule"] = {
        "interval": 3600,
        "parameters": {"train.learning_rate": 0.002, "data.max_chars": 100000},
    }
    path = tmp_path / "p"
    path.mkdir()
    (path / "pipelines.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "outside.txt").write_text("a file outside the project\n" * 100)
    monkeypatch.chdir(path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    from flows.ops import schedule

    for key, value in schedule.run_context_env(path / "pipelines.yaml", path / ".lmp", path).items():
        monkeypatch.setenv(key, value)  # what `lmp schedule` sets for the runs it serves
    return path


@pytest.fixture
def executed(monkeypatch) -> list:
    """The specs scheduled_pipeline handed to the pipeline (which is not run here)."""
    from flows.ops import schedule

    calls: list = []
    monkeypatch.setattr(schedule, "_run_pipeline", lambda spec, workdir, base_dir: calls.append(spec) or {"ok": 1})
    return calls


def test_the_allow_list_is_the_schedules_own_keys_and_max_steps_never_data(project):
    from flows.config import load_pipelines
    from flows.ops import schedule

    spec = load_pipelines(project / "pipelines.yaml").get("smoke")
    allowed = schedule.allowed_overrides(spec)
    assert allowed == ("train.learning_rate", "train.max_steps")  # data.max_chars is the file's, not a caller's
    for key in ("data.allow_outside", "data.paths", "data.source", "promote.min_improvement", "name",
                "train.distributed.master_addr", "schedule.interval", "sweep.trials"):  # fmt: skip
        with pytest.raises(schedule.Refused, match=rf"^override '{key}' is not allowed for scheduled runs; allowed: "):
            schedule.resolve("smoke", {key: 1}, project / "pipelines.yaml")


def test_allowed_overrides_are_validated_and_applied_over_the_schedules_own(project):
    from flows.ops import schedule

    spec = schedule.resolve("smoke", {"train.max_steps": 7}, project / "pipelines.yaml")
    assert (spec.train.max_steps, spec.train.learning_rate, spec.data.max_chars) == (7, 0.002, 100000)
    with pytest.raises(schedule.Refused, match=r"^override values make an invalid pipeline: train.max_steps: "):
        schedule.resolve("smoke", {"train.max_steps": -1}, project / "pipelines.yaml")
    with pytest.raises(schedule.Refused, match=r"^override 'train.max_steps' must be a number, string or boolean"):
        schedule.resolve("smoke", {"train.max_steps": [1, 2]}, project / "pipelines.yaml")
    with pytest.raises(schedule.Refused, match=r"^no pipeline named 'nope'"):
        schedule.resolve("nope", {}, project / "pipelines.yaml")


def test_a_deployment_carries_the_pipeline_name_only_and_enforces_its_schema(project):
    from prefect.utilities.schema_tools import ValidationError, validate

    from flows.config import load_pipelines
    from flows.ops import schedule

    (deployment,) = schedule.deployments([load_pipelines(project / "pipelines.yaml").get("smoke")])
    assert deployment.parameters == {"pipeline": "smoke"}
    assert deployment.enforce_parameter_schema is True
    schema = deployment._parameter_openapi_schema.model_dump()
    assert set(schema["properties"]) == {"pipeline", "overrides"}
    validate({"pipeline": "smoke", "overrides": {"train.max_steps": 5}}, schema, raise_on_error=True)
    for bad in (
        {"pipeline": "smoke", "spec": {"name": "smoke"}},  # Prefect's own schemas allow unknown parameters
        {"pipeline": "other"},
        {"pipeline": "smoke", "overrides": {"data.paths": ["/etc/passwd"]}},
    ):
        with pytest.raises(ValidationError):
            validate(bad, schema, raise_on_error=True)


def test_a_run_with_an_override_outside_the_allow_list_fails_and_runs_nothing(
    prefect_harness, project, executed, caplog
):
    from flows.ops.schedule import scheduled_pipeline

    state = scheduled_pipeline("smoke", {"data.allow_outside": True}, return_state=True)
    assert state.is_failed()
    assert state.message.startswith(
        "refused: override 'data.allow_outside' is not allowed for scheduled runs; allowed: train.learning_rate, "
    )
    assert "refused: override 'data.allow_outside'" in caplog.text  # the one-line reason is logged
    assert executed == []
    assert not (project / ".lmp").exists() and not (project / "mlruns").exists()

    assert scheduled_pipeline("smoke", {"train.max_steps": 3}) == {"ok": 1}  # an allowed one runs
    assert [s.train.max_steps for s in executed] == [3]


def test_a_deployment_runs_its_own_pipeline_only(project):
    from flows.ops import schedule

    with pytest.raises(schedule.Refused, match=r"^deployment 'other' runs pipeline 'other' only, not 'smoke'"):
        schedule.resolve("smoke", {}, project / "pipelines.yaml", deployment="other")


def _asgi_call(app, headers: dict[str, str], kind: str = "http") -> tuple[int | None, list]:
    """Send one request (or websocket handshake) straight to an ASGI app; the status it answered and what it sent."""
    import asyncio

    sent: list = []
    scope = {
        "type": kind,
        "method": "POST",
        "path": "/api/deployments/x/create_flow_run",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    return (start["status"] if start else None), sent


def test_the_guard_refuses_a_foreign_host_or_origin_and_lets_loopback_through():
    from flows.ops.guard import LoopbackGuard

    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = LoopbackGuard(inner, 4321)
    for host in ("127.0.0.1:4321", "localhost:4321", "[::1]:4321", "127.0.0.1", "LOCALHOST:4321"):
        assert _asgi_call(guard, {"Host": host})[0] == 200
    assert _asgi_call(guard, {"Host": "127.0.0.1:4321", "Origin": "http://localhost:4321"})[0] == 200
    for headers in (
        {"Host": "evil.example:4321"},
        {"Host": "127.0.0.1.evil.example"},
        {"Host": "127.0.0.1:9999"},
        {},
        {"Host": "127.0.0.1:4321", "Origin": "http://evil.example"},
        {"Host": "127.0.0.1:4321", "Origin": "null"},
        {"Host": "127.0.0.1:4321", "Origin": "http://127.0.0.1:9999"},
    ):
        status, sent = _asgi_call(guard, headers)
        assert status == 403 and sent[-1]["body"].startswith(b"refused: "), headers
    status, sent = _asgi_call(guard, {"Host": "evil.example:4321"}, kind="websocket")
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "host 'evil.example:4321' is not one of "
                     "this server's names"}]  # fmt: skip
