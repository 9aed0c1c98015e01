"""The layout is part of the product: one concern per file, imports one way, the transformer alone in model.py."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted(p.stem for p in ROOT.glob("*.py"))


def project_imports(name: str) -> set[str]:
    """Project files that `name`.py imports, at the top or inside a function."""
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return (found & set(FILES)) - {name}


def test_model_py_is_the_transformer_alone():
    assert project_imports("model") == set()
    # A sitting's read. Raised from 350 when attention gained flash's variable-length path for GPUs.
    assert len((ROOT / "model.py").read_text().splitlines()) <= 380


def test_no_import_cycle():
    graph = {f: project_imports(f) for f in FILES}
    done, path = set(), []

    def visit(f):
        assert f not in path, f"import cycle: {' -> '.join(path[path.index(f):] + [f])}"
        if f not in done:
            path.append(f)
            for g in sorted(graph[f]):
                visit(g)
            path.pop()
            done.add(f)
    for f in FILES:
        visit(f)


def test_readme_file_table_is_in_dependency_order():
    """The README lists the files so that each imports only files above it, and lists them all."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## The files"):]
    order = [m for m in re.findall(r"^\| `(\w+)\.py` \|", table, re.M)]
    assert sorted(order) == FILES, f"README's file table lists {order}, the project has {FILES}"
    for i, f in enumerate(order):
        later = project_imports(f) & set(order[i:])
        assert not later, f"{f}.py imports {sorted(later)}, listed below it in the README"
