"""The README's testing example is real: its code blocks that start with a
file name (``# app.py``, ``# test_app.py``, ...) are written out beside a copy
of broadcaster.py, type-checked with ``mypy --strict``, and their tests run
with pytest in a process of their own, as a user would run them.

They need fastapi (``pip install --group test``); without it they are skipped
with the reason, except under ``CI=true``, where a skip fails.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import _support
import pytest

ROOT = Path(__file__).resolve().parent.parent
# A fenced Python block whose first line names its file.
FILE_BLOCK = re.compile(r"^```python\n# ([a-z_]+\.py)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the README's files and broadcaster.py."""
    _support.require_modules(("fastapi", "mypy"), "the README's example needs {}: pip install --group test")
    where = tmp_path_factory.mktemp("readme")
    files = FILE_BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    assert [name for name, _ in files] == ["app.py", "test_app.py", "test_resume.py"]
    for name, code in files:
        (where / name).write_text(f"# {name}\n{code}", encoding="utf-8")
    shutil.copy(ROOT / "broadcaster.py", where)
    # A user's project would configure pytest so; warnings are errors here too.
    (where / "pytest.ini").write_text(
        "[pytest]\nfilterwarnings = error\nasyncio_default_fixture_loop_scope = function\n", encoding="utf-8"
    )
    return where


def run(where: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=where, capture_output=True, text=True, timeout=300, check=False
    )


def test_readme_example_passes_mypy_strict(project: Path) -> None:
    checked = run(project, "-m", "mypy", "--strict", "--no-incremental", "app.py", "test_app.py", "test_resume.py")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_readme_example_tests_pass(project: Path) -> None:
    ran = run(project, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_app.py", "test_resume.py")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert re.search(r"^3 passed in ", ran.stdout, re.MULTILINE), ran.stdout
