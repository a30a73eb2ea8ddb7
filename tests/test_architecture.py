"""The code's shape, checked: the layers and the absence of import cycles (import-linter contracts in
pyproject.toml, which `make test` also runs as `lint-imports`), and no module reaching for another
module's private names."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("farm", "trainers", "actors")


def test_import_contracts_are_kept():
    exe = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(exe)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def private_imports(root: Path) -> list[str]:
    """`from X import _name` anywhere under root: reaching into another module's private parts."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(REPO)}:{node.lineno} imports {alias.name} "
                                     f"from {'.' * node.level}{node.module or ''}")
    return found


def test_no_module_imports_another_modules_private_names():
    found = [f for pkg in PACKAGES for f in private_imports(REPO / pkg)]
    assert not found, "make these public (no leading underscore) or keep them in their module:\n" + "\n".join(found)


def test_the_private_import_check_finds_one(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("from .b import _hidden\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert private_imports(pkg) == ["pkg/a.py:1 imports _hidden from .b"]
