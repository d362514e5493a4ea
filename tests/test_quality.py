"""The project's static promises, checked by the test suite itself so that the
README's one test command covers them: mypy --strict is clean,
test_broadcaster.py alone covers 100% of broadcaster.py's lines and branches,
and every test SECURITY.md cites for a guarantee exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )


def test_mypy_strict_is_clean() -> None:
    """mypy --strict passes on the module, its unit tests, the examples and these tests."""
    targets = ["broadcaster.py", "test_broadcaster.py", "tests"]
    if (ROOT / "examples").is_dir():
        targets.append("examples")
    result = run("-m", "mypy", "--strict", "--no-incremental", *targets)
    assert result.returncode == 0, f"mypy --strict failed:\n{result.stdout}{result.stderr}"
    assert result.stdout.startswith("Success: no issues found"), result.stdout


def test_unit_tests_alone_cover_every_line_and_branch(tmp_path: Path) -> None:
    """coverage.py in branch mode, running test_broadcaster.py only, reports 100%
    of broadcaster.py."""
    env = {**os.environ, "COVERAGE_FILE": str(tmp_path / "coverage.data")}
    ran = run(
        "-m", "coverage", "run", "--branch", "--include=broadcaster.py",
        "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_broadcaster.py",
        env=env,
    )  # fmt: skip
    assert ran.returncode == 0, f"test_broadcaster.py failed under coverage:\n{ran.stdout[-5000:]}{ran.stderr[-5000:]}"
    report = run("-m", "coverage", "report", "--show-missing", "--fail-under=100", env=env)
    assert report.returncode == 0, f"coverage of broadcaster.py is below 100%:\n{report.stdout}{report.stderr}"
    assert "broadcaster.py" in report.stdout and "100%" in report.stdout, report.stdout


def test_pyright_strict_is_clean() -> None:
    """pyright (strict, as broadcaster.py declares) finds nothing in the module."""
    result = run("-m", "pyright", "broadcaster.py")
    assert result.returncode == 0, f"pyright failed:\n{result.stdout}{result.stderr}"
    assert "0 errors, 0 warnings, 0 informations" in result.stdout, result.stdout


def test_ruff_check_and_format_are_clean() -> None:
    """ruff check (the rule set in pyproject.toml) and ruff format --check pass
    on the module and its unit tests."""
    files = ["broadcaster.py", "test_broadcaster.py"]
    check = run("-m", "ruff", "check", "--no-cache", *files)
    assert check.returncode == 0, f"ruff check failed:\n{check.stdout}{check.stderr}"
    form = run("-m", "ruff", "format", "--check", "--no-cache", *files)
    assert form.returncode == 0, f"ruff format --check failed:\n{form.stdout}{form.stderr}"


def test_security_md_names_only_tests_that_exist() -> None:
    """Each guarantee of SECURITY.md names the test that checks it: every
    ``test_...`` it names (``path::test_...`` for a file of tests/, else one
    of test_broadcaster.py) is defined there."""
    text = (ROOT / "SECURITY.md").read_text(encoding="utf-8")
    cited = re.findall(r"`(?:(tests/[a-z_]+\.py)::)?(test_[a-z0-9_]+)`", text)
    assert len(cited) >= 30, cited
    missing = []
    for path, name in cited:
        source = (ROOT / (path or "test_broadcaster.py")).read_text(encoding="utf-8")
        if not re.search(rf"^(?:async )?def {name}\(", source, re.MULTILINE):
            missing.append(f"{path or 'test_broadcaster.py'}::{name}")
    assert not missing, f"SECURITY.md names tests that do not exist: {missing}"
