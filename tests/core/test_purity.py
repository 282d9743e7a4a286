"""kdnas_core stays free of orchestration, tracking and storage code."""

import ast
from pathlib import Path

FORBIDDEN = {"prefect", "mlflow", "boto3", "botocore", "flows", "tasks", "infra"}
CORE = Path(__file__).resolve().parents[2] / "kdnas_core"


def test_core_imports_no_orchestration_or_tracking():
    offenders = []
    files = sorted(CORE.rglob("*.py"))
    assert files, "kdnas_core has no python files?"
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, f"forbidden imports in kdnas_core: {offenders}"
