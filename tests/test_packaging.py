"""What a fresh machine needs is declared: every package the code and the tests import is in
pyproject.toml, and CI runs the README's own commands (in a new virtual environment: .ci/run)."""
from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Our own modules: the packages, and the scripts of the repo's folders that import each other.
OURS = {"kandinsky", "weights_convert", "tests", "benchmarks", "refs", "helpers", "conftest"} | {
    p.stem for folder in ("benchmarks", "docs", "tests") for p in (ROOT / folder).glob("*.py")}
# Installed by the README's install line outside the extras (open_clip is installed with --no-deps).
README_EXTRAS = {"open-clip-torch"}


def _requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[;\s]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"]) + [s for group in project["optional-dependencies"].values() for s in group]
    return {_requirement_name(s) for s in specs} | README_EXTRAS


def _top_level_imports(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    return names - OURS - set(sys.stdlib_module_names) - {"__future__"}


@functools.cache
def _installed() -> dict[str, list[str]]:
    return metadata.packages_distributions()  # module -> distributions (reads every installed package once)


def _distributions(module: str) -> set[str]:
    return {d.lower().replace("_", "-") for d in _installed().get(module, [])}


def test_every_imported_package_is_declared():
    declared = _declared()
    missing = {}
    for folder in ("kandinsky", "weights_convert", "tests", "benchmarks", "docs"):
        for module in _top_level_imports(ROOT / folder):
            dists = _distributions(module)
            if not dists & declared:
                missing.setdefault(module, set()).add(folder)
    # gradio etc. may be imported lazily by optional parts; they must still be declared in an extra.
    assert not missing, f"imported but declared nowhere in pyproject.toml (or the README's install line): {missing}"


def test_ci_runs_the_readmes_commands_in_a_new_venv():
    script = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv" in script and "source \"$venv/bin/activate\"" in script
    out = subprocess.run(
        ["awk", '/^```bash$/ {inside = 1; next} inside && /^```$/ {exit} inside && !/^[[:space:]]*#/ && NF',
         str(ROOT / "README.md")], capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 2, out  # the install line and the test command, nothing else
    install, test = out
    assert install.startswith("pip install torch==2.13.0 ") and 'pip install -e ".[test]"' in install
    assert test.startswith("python -m pytest")
    # the awk program .ci/run uses is the one tested here
    assert "awk '/^```bash$/ {inside = 1; next} inside && /^```$/ {exit} inside && !/^[[:space:]]*#/ && NF'" in script
