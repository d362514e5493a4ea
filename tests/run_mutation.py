"""Mutation testing of broadcaster.py against test_broadcaster.py.

Usage (from the repository root, with mutmut 3.x installed next to pytest):

    python tests/run_mutation.py [--jobs N] [--keep DIR] [--survivors] [MUTANT ...]

It copies broadcaster.py and test_broadcaster.py into a fresh temporary
directory (mutmut rewrites the source and writes a ``mutants/`` folder, so it
never runs in the checkout), writes a ``[tool.mutmut]`` configuration there,
runs ``mutmut run``, and prints the score: killed (including timeouts) over
all mutants. ``--survivors`` also prints the diff of every surviving mutant.
``--keep DIR`` runs in DIR instead (created if missing; an existing mutmut
state there is reused, so an interrupted run resumes where it stopped).
Mutant names (as ``mutmut results`` prints them) restrict the run to those
mutants. Exit status 0 if the score is at least ``--min`` percent (default 95).

Deselected: ``test_module_imports_only_the_standard_library`` parses the
module's source for imports, and mutmut's instrumented copy imports ``mutmut``
itself (a check of the file, not of behaviour); and the ``test_leak_*`` tests
(100,000 cycles and thousands of responses, counted with gc and tracemalloc),
which exceed their own time limits under mutmut's instrumentation and check
memory, not behaviour.

Not part of ``.ci/run``: a full run takes longer than 15 minutes on a
two-core machine (see MUTATION.md for the measured time).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ("broadcaster.py", "test_broadcaster.py")
CONFIG = """\
[tool.pytest.ini_options]
testpaths = ["test_broadcaster.py"]

[tool.mutmut]
source_paths = ["broadcaster.py"]
pytest_add_cli_args_test_selection = ["test_broadcaster.py"]
pytest_add_cli_args = [
    "-p", "no:cacheprovider",
    "--deselect", "test_broadcaster.py::test_module_imports_only_the_standard_library",
    "-k", "not test_leak_",
]
also_copy = ["test_broadcaster.py"]
"""


def _mutmut(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mutmut", *args], cwd=workdir, text=True, capture_output=True, check=False
    )


def run(workdir: Path, jobs: int, show_survivors: bool, minimum: float, names: list[str]) -> int:
    for name in FILES:
        shutil.copy2(ROOT / name, workdir / name)
    (workdir / "pyproject.toml").write_text(CONFIG, encoding="utf-8")
    started = time.monotonic()
    # mutmut draws a progress line on stderr; let it through to the terminal.
    proc = subprocess.run(
        [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *names], cwd=workdir, check=False
    )
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        print(f"mutmut run failed with exit status {proc.returncode}", file=sys.stderr)
        return proc.returncode
    _mutmut(workdir, "export-cicd-stats")
    stats = json.loads((workdir / "mutants" / "mutmut-cicd-stats.json").read_text(encoding="utf-8"))
    total = int(stats["total"])
    killed = int(stats["killed"]) + int(stats.get("timeout", 0))
    score = 100.0 * killed / total if total else 0.0
    print(f"\nmutmut statistics: {json.dumps(stats, sort_keys=True)}")
    print(f"elapsed: {elapsed:.0f} s with {jobs} worker(s)")
    checked = sum(
        int(stats.get(key, 0)) for key in ("killed", "timeout", "survived", "suspicious", "no_tests", "segfault")
    )
    if checked < total:
        print(f"not run yet: {total - checked} mutant(s); run again with --keep to resume")
    print(f"mutation score: {killed} / {total} killed = {score:.2f} %")
    results = _mutmut(workdir, "results").stdout
    survivors = [line.split(":")[0].strip() for line in results.splitlines() if line.rstrip().endswith(": survived")]
    print(f"surviving mutants ({len(survivors)}):")
    for name in survivors:
        print(f"  {name}")
        if show_survivors:
            diff = _mutmut(workdir, "show", name).stdout
            changed = [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
            print("\n".join("    " + line for line in changed))
    return 0 if score >= minimum else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1, help="mutmut worker processes (default 1)")
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it (resumes a previous run)")
    parser.add_argument("--survivors", action="store_true", help="print the diff of every surviving mutant")
    parser.add_argument("--min", type=float, default=95.0, help="fail below this score in percent (default 95)")
    parser.add_argument("names", nargs="*", metavar="MUTANT", help="run only these mutants")
    args = parser.parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        return run(args.keep.resolve(), args.jobs, args.survivors, args.min, args.names)
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        return run(Path(tmp), args.jobs, args.survivors, args.min, args.names)


if __name__ == "__main__":
    sys.exit(main())
