"""Imports point one way: entry scripts -> training -> meanflow; training -> models, utils; models, utils and
meanflow import nothing above them, and no entry script imports another (docs/design.md, Layout)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {path.stem for path in ROOT.glob("*.py")} - {"meanflow"}
# What each layer may not import.
FORBIDDEN = {
    "models": {"utils", "training", "meanflow", "tools"} | SCRIPTS,
    "meanflow": {"models", "utils", "training", "tools"} | SCRIPTS,
    "utils": {"meanflow", "models", "training", "tools"} | SCRIPTS,
    "training": {"tools"} | SCRIPTS,
    # tools/release.py imports the authors' release, whose packages are also named models and training.
    "tools": SCRIPTS,
}


def imported_packages(path: Path) -> set[str]:
    """The top-level names of every absolute import in a file, wherever in the file it stands."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def layer_of(path: Path) -> str:
    relative = path.relative_to(ROOT)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def test_no_import_runs_up_a_layer_or_from_one_script_into_another():
    files = sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("models/*.py")) + sorted(ROOT.glob("utils/*.py")) \
        + sorted(ROOT.glob("training/*.py")) + sorted(ROOT.glob("tools/*.py"))
    wrong = []
    for path in files:
        layer = layer_of(path)
        forbidden = FORBIDDEN.get(layer, SCRIPTS - {layer})  # an entry script: no other script
        wrong += [f"{path.relative_to(ROOT)} imports {name}" for name in sorted(imported_packages(path) & forbidden)]
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from training.build import load_network\n    import meanflow as m\n")
    assert imported_packages(path) == {"training", "meanflow"}
