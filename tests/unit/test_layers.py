"""The package's layers depend one way: library <- pipeline <- command line.

Every import of every module is read from its source (function-level imports
too), so a lazy import that would close a cycle at run time is caught here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "conmh"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of the conmh modules that ``path`` imports, anywhere in it."""
    name, found = _module(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{alias.name}" for alias in node.names} | {base}
    return {m for m in found if m == "conmh" or m.startswith("conmh.")}


def _layer(module: str) -> str:
    if module == "conmh.cli" or module == "conmh.__main__":
        return "cli"
    return "pipeline" if module.startswith("conmh.pipeline") else "library"


# what each layer may import
ALLOWED = {"library": {"library"}, "pipeline": {"library", "pipeline"}, "cli": {"library", "pipeline", "cli"}}


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: _module(p))
def test_a_module_imports_only_from_its_own_layer_or_below(path):
    layer = _layer(_module(path))
    wrong = sorted(m for m in imports_of(path) if _layer(m) not in ALLOWED[layer])
    assert not wrong, f"{_module(path)} ({layer}) imports {wrong}"


def test_the_reader_of_imports_sees_lazy_and_relative_imports(tmp_path):
    steps = PACKAGE / "pipeline" / "steps.py"
    assert "conmh.pipeline.launch" in imports_of(steps) and "conmh.atomic" in imports_of(steps)
    assert "conmh.codes" in imports_of(steps)  # imported inside a function
    assert "conmh.pipeline.cli" in imports_of(PACKAGE / "cli.py")  # `conmh pipeline` hands over to it


def test_the_snakefile_reads_the_package_without_pandas_seaborn_or_torch():
    """Snakemake parses the Snakefile for every job (and every dry run): it must stay light."""
    import re

    snakefile = (PACKAGE.parent / "Snakefile").read_text(encoding="utf-8")
    modules = re.findall(r"^from (conmh[\w.]*) import", snakefile, re.MULTILINE)
    assert "conmh.pipeline.paper" in modules  # the report's figures
    heavy = ("pandas", "seaborn", "matplotlib", "torch")
    code = f"import sys, {', '.join(modules)}; print([m for m in {heavy!r} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_the_reports_provenance_names_the_machine_without_importing_torch():
    """The report job reads results only: importing torch would only slow every pipeline run's last job
    (benchmarks/README.md, "The test suite and CI")."""
    code = (
        "import sys; from conmh.pipeline.provenance import software_table; t = software_table(); "
        "print(t.set_index('component').loc['cpu', 'version'] != '', 'torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["True", "False"]


def test_every_folder_of_tests_is_collected():
    """pyproject.toml lists the test folders (their order is the order pytest-xdist hands their files out):
    a new folder missing from that list would never run."""
    import tomllib

    listed = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    tests = PACKAGE.parent / "tests"
    with_tests = {p.parent.relative_to(PACKAGE.parent).as_posix() for p in tests.rglob("test_*.py")}
    assert with_tests == set(listed["testpaths"])
