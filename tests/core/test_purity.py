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


def _modules() -> dict[str, Path]:
    out = {}
    for path in CORE.rglob("*.py"):
        parts = path.relative_to(CORE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _core_imports(path: Path) -> set[str]:
    """The kdnas_core modules ``path`` imports, anywhere in it (without the prefix)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("kdnas_core."):
            out.add(node.module.removeprefix("kdnas_core."))
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("kdnas_core.") for a in node.names if a.name.startswith("kdnas_core.")}
    return out


# What each room may import. The search's algorithm (space, controller, reward, screen, loop, synthetic)
# is tested on synthetic problems without a model, so it never reaches for teachers, students,
# distillation or evaluation; the file helpers sit below everything.
ALLOWED = {
    "files": {"errors", "files"},
    "search.space": {"config", "errors"},
    "search.reward": {"errors"},
    "search.controller": {"config", "errors", "seeding", "search.space"},
    "search.screen": {"search.space", "search.controller"},
    "search.loop": {"config", "errors", "files", "search.space", "search.reward", "search.controller", "search.screen"},
    "search.synthetic": {"search.space", "search.loop"},
}


def test_rooms_import_only_what_they_may():
    offenders = []
    for path in CORE.rglob("*.py"):
        name = ".".join(path.relative_to(CORE).with_suffix("").parts)
        rule = next((ALLOWED[k] for k in ALLOWED if name == k or name.startswith(k + ".")), None)
        if rule is None:
            continue
        bad = {m for m in _core_imports(path) if not any(m == a or m.startswith(a + ".") for a in rule)}
        offenders += [f"{name} imports {m}" for m in sorted(bad)]
    assert not offenders, offenders


def test_every_room_is_a_package_with_a_docstring():
    """A newcomer reads a room's __init__ first: it says what the room holds."""
    rooms = [d for d in CORE.iterdir() if d.is_dir() and d.name != "__pycache__"]
    assert {"search", "distill", "evaluation", "teachers", "files"} <= {d.name for d in rooms}
    for d in rooms:
        init = d / "__init__.py"
        assert init.is_file() and ast.get_docstring(ast.parse(init.read_text())), f"{d.name}/ needs a docstring"


def test_no_import_circle_in_kdnas_core():
    """Imports inside functions count too: a circle hidden in a function is still one module
    needing the other both ways."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in mods:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods}
        # a package's __init__ imports its own submodules; they never import the package back
        graph[name] = {d for d in deps if d != name}
    seen, on_path, circles = set(), [], []

    def visit(node: str) -> None:
        seen.add(node)
        on_path.append(node)
        for dep in sorted(graph[node]):
            if dep in on_path:
                circles.append(on_path[on_path.index(dep):] + [dep])
            elif dep not in seen:
                visit(dep)
        on_path.pop()

    for name in sorted(graph):
        if name not in seen:
            visit(name)
    assert not circles, f"import circles in kdnas_core: {circles}"


def test_modules_stay_small_or_say_why():
    """No kdnas_core module over 500 lines unless its docstring says why ("Over 500 lines")."""
    long = [f"{path.relative_to(CORE.parent)} ({n} lines)" for path in CORE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > 500
            and "Over 500 lines" not in (ast.get_docstring(ast.parse(path.read_text())) or "")]
    assert not long, f"split these, or say in the docstring why not: {long}"


def test_functions_stay_short_or_say_why():
    """No function over 60 lines outside bench/ unless a comment in it says why ("long because")."""
    root = CORE.parent
    long = []
    for folder in ("kdnas_core", "kdnas", "flows", "tasks", "infra"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            lines = text.splitlines()
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                    body = "\n".join(lines[node.lineno - 1:node.end_lineno]).lower()
                    if "long because" not in body:
                        long.append(f"{path.relative_to(root)}:{node.lineno} {node.name}")
    assert not long, f"split these, or say in a comment why not: {long}"
