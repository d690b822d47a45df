"""The temporary Prefect server `lmp run` starts early: configuration detection, start, health, stop."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import pytest

from flows.ops import prefect_server

pytestmark = pytest.mark.slow  # real processes and servers: `pytest -m ""` (CI) runs it, plain `pytest` does not


def test_an_api_url_in_the_environment_profile_or_settings_file_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PREFECT_PROFILES_PATH", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert not prefect_server._configured_in_files()

    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "profiles.toml").write_text(
        'active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://prefect.internal:4200/api"\n'
    )
    assert prefect_server._configured_in_files()
    monkeypatch.setenv("PREFECT_PROFILE", "other")
    assert not prefect_server._configured_in_files()

    (tmp_path / "prefect.toml").write_text('[api]\nurl = "http://127.0.0.1:4200/api"\n')
    assert prefect_server._configured_in_files()

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert prefect_server.api_configured()
    assert prefect_server.start_if_needed(tmp_path / "log") is None


def test_the_server_starts_answers_and_stops_with_its_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))  # its own database
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    server = prefect_server.TemporaryServer(tmp_path / "server.log").start()
    try:
        assert os.environ["PREFECT_API_URL"] == server.api_url
        server.ready()
        with urllib.request.urlopen(f"{server.api_url}/health", timeout=5) as response:
            assert response.status == 200
        # a web page that guessed the port: a foreign Origin or a rebound Host is refused before Prefect sees it
        for header, value in (("Origin", "http://evil.example"), ("Host", f"evil.example:{server.port}")):
            request = urllib.request.Request(f"{server.api_url}/flow_runs/filter", data=b"{}", method="POST")
            request.add_header(header, value)
            request.add_header("Content-Type", "application/json")
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=5)
            assert refused.value.code == 403, header
    finally:
        server.stop()
    assert server.process.poll() is not None
    assert "PREFECT_API_URL" not in os.environ
