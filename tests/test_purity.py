"""lm/ is the pure library: it never imports prefect, mlflow or flows."""

import ast
from pathlib import Path

import pytest

LM = Path(__file__).resolve().parents[1] / "lm"
FORBIDDEN = {"prefect", "mlflow", "flows"}


def forbidden_imports(source: str) -> list[str]:
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            hits += [a.name for a in node.names if a.name.split(".")[0] in FORBIDDEN]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in FORBIDDEN:
                hits.append(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and str(arg.value).split(".")[0] in FORBIDDEN:
                hits.append(str(arg.value))
    return hits


def test_lm_files_import_no_orchestration_or_tracking():
    files = sorted(LM.rglob("*.py"))
    assert len(files) > 5
    offenders = {str(f.relative_to(LM)): forbidden_imports(f.read_text()) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize(
    "line",
    [
        "import mlflow",
        "from prefect import flow",
        "import flows.tasks",
        "from mlflow.tracking import MlflowClient",
        "__import__('prefect')",
    ],
)
def test_the_check_catches_each_form(line):
    assert forbidden_imports(f"x = 1\n{line}\n")
