"""What a server's "401/403" means to the user: which server refused which credentials, and what to set.

The Prefect client raises ``PrefectHTTPStatusError`` (an ``httpx.HTTPStatusError``) and MLflow's REST client an
``MlflowException`` whose text carries the status; `lmp` turns either, wherever it ends a command, into one line
naming the server (see ``flows.cli.commands._report_error``).
"""

from __future__ import annotations

import os
import re

_MLFLOW_STATUS = re.compile(r"failed with error code (401|403)\b")
_SERVERS_ENV = "for servers `lmp up --backend postgresql` started, `. .lmp/servers.env` in its project has them"


def refusal(error: BaseException | None) -> str | None:
    """The message for a refused login found along ``error``'s chain, or None when there is none."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        response = getattr(error, "response", None)
        status = getattr(response, "status_code", None)
        if status in (401, 403) and type(error).__module__.startswith(("prefect", "httpx")):
            server = os.environ.get("PREFECT_API_URL", "PREFECT_API_URL")
            given = "the auth string given"
            if not os.environ.get("PREFECT_API_AUTH_STRING"):
                given = "a request without an auth string"
            return (f"the Prefect server at {server} refused {given} (HTTP {status}): set PREFECT_API_AUTH_STRING "
                    f"to its user:password ({_SERVERS_ENV})")  # fmt: skip
        if type(error).__name__ == "MlflowException" and (found := _MLFLOW_STATUS.search(str(error))):
            server = os.environ.get("MLFLOW_TRACKING_URI", "the tracking server")
            user = os.environ.get("MLFLOW_TRACKING_USERNAME")
            given = f"the account {user!r}" if user else "a request without credentials"
            return (f"the MLflow server at {server} refused {given} (HTTP {found.group(1)}): set "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account on it "
                    f"({_SERVERS_ENV})")  # fmt: skip
        error = error.__cause__ or error.__context__
    return None
