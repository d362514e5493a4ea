"""The harness's virtual environments, and running one measurement in one of them.

Two environments, created on first use under ``bench/.venvs/`` (or ``$BENCH_VENVS``)
with the interpreter that runs ``run.py`` (or ``--python``):

- ``ours``: uvicorn + httptools + matplotlib. Workers of our implementation get
  the repository root (or a candidate folder, ``--candidate``) put first on
  ``sys.path`` by ``worker.py``; the floors run here too, without it.
- ``peers``: encode/broadcaster 0.3.x, sse-starlette, FastAPI, uvicorn,
  httptools. encode/broadcaster also imports as ``broadcaster``, so this
  environment never has our module on its path (``worker.py`` checks).

Each measurement is one fresh subprocess (``worker.py``) with its own
``sys.path``; nothing is shared between the two libraries called
``broadcaster``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENVS = Path(os.environ.get("BENCH_VENVS", BENCH / ".venvs"))

REQUIREMENTS = {
    "ours": BENCH / "requirements-ours.txt",
    "peers": BENCH / "requirements-peers.txt",
}

# Which environment runs which implementation, and whether it imports our module.
IMPLS: dict[str, tuple[str, bool]] = {
    "ours": ("ours", True),
    "candidate": ("ours", True),  # a patched copy of broadcaster.py (--candidate DIR)
    "queue": ("ours", False),  # floor (c): asyncio.Queue per subscriber
    "deque": ("ours", False),  # floor (d): collections.deque + one waiter future
    "ring": ("ours", False),  # floor (e): one shared ring per key, a cursor per subscriber
    "raw": ("ours", False),  # HTTP floor (d): raw ASGI app, per-connection deque
    "raw-watch": ("ours", False),  # floor (d) + a pending receive() per connection
    "client": ("ours", False),  # the HTTP load client
    "plot": ("ours", False),
    "encode": ("peers", False),  # encode/broadcaster memory://
    "sse-starlette": ("peers", False),
    "fastapi": ("peers", False),
    "starlette": ("peers", False),
}


class Envs:
    """Creates the environments once and runs workers in them."""

    def __init__(self, base_python: str, candidate: Path | None, log=print) -> None:
        self.base_python = base_python
        self.candidate = candidate
        self.log = log
        self.pythons: dict[str, str] = {}

    # -- creation -------------------------------------------------------------

    def ensure(self, name: str) -> str:
        """The interpreter of environment ``name``, creating it if needed."""
        if name in self.pythons:
            return self.pythons[name]
        req = REQUIREMENTS[name]
        target = VENVS / name
        python = target / "bin" / "python"
        version = subprocess.run(
            [self.base_python, "-c", "import sys; print(sys.version)"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        stamp = hashlib.sha256((req.read_text() + version).encode()).hexdigest()
        stamp_file = target / ".bench-stamp"
        if not (python.exists() and stamp_file.exists() and stamp_file.read_text() == stamp):
            self.log(f"[setup] creating {target} with {self.base_python} ({version.split()[0]})")
            shutil.rmtree(target, ignore_errors=True)
            subprocess.run([self.base_python, "-m", "venv", str(target)], check=True)
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", str(req)],
                check=True,
            )
            stamp_file.write_text(stamp)
        self.pythons[name] = str(python)
        return str(python)

    def versions(self) -> dict[str, dict[str, str]]:
        """Installed distributions of each created environment."""
        out = {}
        for name, python in self.pythons.items():
            listing = subprocess.run(
                [python, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                capture_output=True, text=True,
            ).stdout
            try:
                out[name] = {d["name"]: d["version"] for d in json.loads(listing)}
            except ValueError:
                out[name] = {}
        return out

    # -- running ----------------------------------------------------------------

    def env_for(self, impl: str) -> dict[str, str]:
        """A clean process environment for ``impl``: no PYTHONPATH, our module's
        folder in BENCH_OURS_DIR only for implementations that use it."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env["PYTHONHASHSEED"] = "0"
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env_name, uses_ours = IMPLS[impl]
        if uses_ours:
            env["BENCH_OURS_DIR"] = str(self.candidate if impl == "candidate" else ROOT)
        env["BENCH_IMPL_ENV"] = env_name
        return env

    def command(self, impl: str, script: str, *args: str) -> tuple[list[str], dict[str, str]]:
        """argv and environment to run ``bench/<script>`` for ``impl``."""
        python = self.ensure(IMPLS[impl][0])
        return [python, str(BENCH / script), *args], self.env_for(impl)

    def worker(self, case: str, impl: str, params: dict, timeout: float = 600) -> dict:
        """Run ``<case>.measure(impl, **params)`` in a fresh subprocess; its result."""
        argv, env = self.command(impl, "worker.py", case, impl, json.dumps(params))
        try:
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=BENCH)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
            return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
        return json.loads(lines[-1])


def default_python() -> str:
    return sys.executable
