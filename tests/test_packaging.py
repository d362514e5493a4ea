"""Packaging: the wheel installs a *typed* ``broadcaster`` package.

The repository keeps one vendorable file, ``broadcaster.py``. A bare top-level
module cannot carry PEP 561's ``py.typed``, so ``pyproject.toml`` makes hatchling
install that same file as ``broadcaster/__init__.py`` next to
``broadcaster/py.typed``. These tests build the wheel from the checkout, install
it into a fresh virtual environment (no system site-packages) and type-check
small user files with ``mypy --strict`` against the *installed* package.

Tools: pip and hatchling build the wheel offline (``--no-build-isolation``,
``--no-index``); the running interpreter's mypy checks the venv through
``--python-executable``; starlette is needed for the ASGI check. When one is
missing the tests skip with the reason, or fail when ``CI=true``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import broadcaster  # noqa: E402  (the checkout's, beside the one installed from the wheel)

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "broadcaster.py"
DIST_NAME = "sse-broadcaster"
# Generous: the slowest step is a cold mypy run over typeshed (a few seconds).
TIMEOUT = 300.0

# The checkout's public API (test_broadcaster.py pins it): the wheel must ship the same.
PUBLIC_API = list(broadcaster.__all__)


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def _require(ok: bool, reason: str) -> None:
    """Skip with ``reason`` when a tool is missing; on CI that is a failure."""
    if ok:
        return
    if _on_ci():
        pytest.fail(f"{reason} (CI=true: a missing tool is a failure, not a skip)")
    pytest.skip(reason)


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _version(dist: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", importlib.metadata.version(dist))[:2]
    return tuple(int(p) for p in parts)


def _clean_env() -> dict[str, str]:
    """The environment minus what would leak the checkout or local config in."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIP_", "PYTHON", "MYPY", "VIRTUAL_ENV"))
    }
    env["PIP_CONFIG_FILE"] = os.devnull  # ignore machine-wide pip config
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(args: list[str], *, cwd: Path, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=cwd,
        env=dict(env) if env is not None else _clean_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def _check(proc: subprocess.CompletedProcess[str], what: str) -> str:
    assert proc.returncode == 0, (
        f"{what} failed (exit {proc.returncode}): {proc.args}\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )
    return proc.stdout


@dataclasses.dataclass(frozen=True)
class Installed:
    wheel: Path
    python: Path  # the temporary venv's interpreter
    site_packages: Path
    mypy_cache: Path
    work: Path  # scratch space that contains no broadcaster.py


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Build the wheel from the checkout and install it into a fresh venv."""
    _require(_has_module("pip"), "pip is not installed in the test interpreter")
    _require(_version("pip") >= (22, 3), "pip >= 22.3 is needed (for `pip --python`)")
    _require(_has_module("hatchling"), "hatchling is not installed (pip install --group test)")
    _require(_has_module("mypy"), "mypy is not installed (pip install --group test)")
    assert (ROOT / "README.md").is_file(), "pyproject.toml's readme, README.md, is missing"

    base = tmp_path_factory.mktemp("packaging")
    dist = base / "dist"
    # Offline and fast: hatchling from this interpreter, no index, no isolation.
    _check(
        _run(
            [
                sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index",
                "--no-build-isolation", "--wheel-dir", str(dist), str(ROOT),
            ],
            cwd=base,
        ),
        "building the wheel",
    )
    wheels = sorted(dist.glob("*.whl"))
    assert len(wheels) == 1, wheels
    wheel = wheels[0]

    venv = base / "venv"
    # No --system-site-packages: only what we install is visible. --without-pip
    # saves ensurepip's few seconds; the running pip installs into it instead.
    _check(_run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=base), "creating the venv")
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    _check(
        _run(
            [
                sys.executable, "-m", "pip", "--python", str(python), "install",
                "--no-deps", "--no-index", str(wheel),
            ],
            cwd=base,
        ),
        "installing the wheel into the venv",
    )
    site = _check(
        _run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=base),
        "locating the venv's site-packages",
    ).strip()

    work = base / "work"
    work.mkdir()
    return Installed(wheel, python, Path(site), base / "mypy-cache", work)


# ---------------------------------------------------------------------------
# The wheel's contents
# ---------------------------------------------------------------------------


def test_wheel_ships_one_typed_package_and_nothing_else(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as whl:
        names = whl.namelist()
        init = whl.read("broadcaster/__init__.py")
        marker = whl.read("broadcaster/py.typed")
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = whl.read(metadata_name).decode()

    payload = sorted(n for n in names if ".dist-info/" not in n)
    assert payload == ["broadcaster/__init__.py", "broadcaster/py.typed"]
    # The very file users vendor, byte for byte.
    assert init == MODULE.read_bytes()
    assert marker == b""
    assert "broadcaster.py" not in names
    assert not any(re.search(r"(^|/)(tests?|examples)(/|$)|test_", n) for n in names)

    headers = metadata.split("\n\n", 1)[0].splitlines()
    assert f"Name: {DIST_NAME}" in headers
    # The version is read from the module, its one place.
    version = re.search(r'^__version__ = "([^"]+)"$', MODULE.read_text(encoding="utf-8"), re.MULTILINE)
    assert version is not None, "broadcaster.py has no __version__"
    assert f"Version: {version[1]}" in headers
    assert "Requires-Python: >=3.10" in headers
    assert "Classifier: Typing :: Typed" in headers
    assert "Classifier: Framework :: AsyncIO" in headers
    # No runtime dependency: every Requires-Dist belongs to an extra.
    requires = [h for h in headers if h.startswith("Requires-Dist:")]
    assert requires and all("extra ==" in r for r in requires), requires


def test_installed_package_imports_from_the_venv(installed: Installed) -> None:
    # -I: no cwd/script dir on sys.path, no PYTHON* variables, no user site.
    out = _check(
        _run(
            [
                str(installed.python), "-I", "-c",
                "import broadcaster, sys; print(broadcaster.__file__); print(sorted(broadcaster.__all__))",
            ],
            cwd=installed.work,
        ),
        "importing broadcaster in the venv",
    )
    file_line, all_line = out.splitlines()
    where = Path(file_line).resolve()
    assert where == (installed.site_packages / "broadcaster" / "__init__.py").resolve()
    assert (where.parent / "py.typed").is_file()
    assert all_line == repr(sorted(PUBLIC_API))


# ---------------------------------------------------------------------------
# Type checking a user's code against the installed package
# ---------------------------------------------------------------------------

# Expected mypy output is written next to the line it belongs to, as
# ``# N: <note>`` or ``# E: <error>  [code]`` (mypy's own test-data style).
USER_INFER = '''\
from broadcaster import AsgiClient, Broadcaster, BroadcastStream, Event, LagPolicy, merge, replay


async def main() -> None:
    b: Broadcaster[str, int] = Broadcaster()
    reveal_type(Broadcaster[str, int]().subscribe("k"))  # N: Revealed type is "broadcaster.BroadcastStream[builtins.int]"
    stream = b.subscribe("k")
    reveal_type(stream)  # N: Revealed type is "broadcaster.BroadcastStream[builtins.int]"
    async for x in stream:
        reveal_type(x)  # N: Revealed type is "builtins.int"
    reveal_type(stream.on_lag(LagPolicy.SKIP))  # N: Revealed type is "broadcaster.BroadcastStream[builtins.int]"
    async with b.subscribe("k") as ctx:
        reveal_type(ctx)  # N: Revealed type is "broadcaster.BroadcastStream[builtins.int]"
    async for y in replay([1, 2], stream):
        reveal_type(y)  # N: Revealed type is "builtins.int"
    reveal_type(Event.json({"a": [1, 2]}, event="e", id="1"))  # N: Revealed type is "broadcaster.Event"
    reveal_type(b.send("k", 1))  # N: Revealed type is "builtins.int"
    b.send("k", "x")  # E: Argument 2 to "send" of "Broadcaster" has incompatible type "str"; expected "int"  [arg-type]
    b.send(1, 2)  # E: Argument 1 to "send" of "Broadcaster" has incompatible type "int"; expected "str"  [arg-type]
    ints: BroadcastStream[int] = b.subscribe("k")
    strs: BroadcastStream[str] = b.subscribe("k")  # E: Incompatible types in assignment (expression has type "BroadcastStream[int]", variable has type "BroadcastStream[str]")  [assignment]
    many = b.subscribe_many(["a", "b"])
    reveal_type(many)  # N: Revealed type is "broadcaster.KeyedStream[builtins.str, builtins.int]"
    async for key, value in many:
        reveal_type(key)  # N: Revealed type is "builtins.str"
        reveal_type(value)  # N: Revealed type is "builtins.int"
    presence = Broadcaster[str, bytes]()
    both = merge(b.subscribe_many(["a"]), presence.subscribe_many(["a"]))
    reveal_type(both)  # N: Revealed type is "broadcaster.KeyedStream[builtins.str, builtins.int | builtins.bytes]"
    reveal_type(many.gaps)  # N: Revealed type is "builtins.tuple[builtins.str, ...]"
    b.subscribe_many([1])  # E: List item 0 has incompatible type "int"; expected "str"  [list-item]
    events = Broadcaster[str, Event]()
    async with AsgiClient(events.response(events.subscribe("k"))) as client, client.stream("GET", "/") as response:
        reveal_type(response)  # N: Revealed type is "broadcaster.AsgiResponse"
        reveal_type(await response.event())  # N: Revealed type is "broadcaster.SseEvent"
        async for event in response:
            reveal_type(event.data)  # N: Revealed type is "builtins.str"
    reveal_type(await client.request("GET", "/", json={"n": 1}))  # N: Revealed type is "broadcaster.AsgiResponse"
    client.stream("GET", "/", headers={"a": 1})  # E: Argument "headers" to "stream" of "AsgiClient" has incompatible type "dict[str, int]"; expected "Mapping[str, str] | Iterable[tuple[str, str]]"  [arg-type]
'''

# Output lines that are not about a line of the checked file (e.g. "Success").
_MYPY_LINE = re.compile(r"^(?P<file>[^:\n]+):(?P<line>\d+): (?P<kind>error|note): (?P<msg>.*)$")
_MARKER = re.compile(r"#\s*(?P<kind>[EN]): (?P<msg>.*)$")


def _normalise(message: str) -> str:
    # mypy 2 reveals builtins by their short name ("int"), mypy 1 qualified
    # ("builtins.int"); compare in the short form.
    return re.sub(r"\bbuiltins\.", "", message.strip())


def _expected(source: str, file: str) -> set[tuple[str, int, str, str]]:
    out = set()
    for number, text in enumerate(source.splitlines(), start=1):
        m = _MARKER.search(text)
        if m:
            kind = "error" if m["kind"] == "E" else "note"
            out.add((file, number, kind, _normalise(m["msg"])))
    return out


def _mypy(args: list[str], *, cwd: Path, cache: Path) -> tuple[set[tuple[str, int, str, str]], str]:
    """Run the test interpreter's mypy --strict; returns parsed lines and raw output."""
    config = cwd / "mypy.ini"
    config.write_text("[mypy]\nstrict = True\n")  # hermetic: no config lookup
    proc = _run(
        [
            sys.executable, "-m", "mypy", "--config-file", str(config), "--strict",
            "--cache-dir", str(cache), "--no-color-output", "--no-error-summary",
            "--show-error-codes", "--hide-error-context", "--no-pretty", *args,
        ],
        cwd=cwd,
    )
    raw = proc.stdout + proc.stderr
    assert proc.returncode in (0, 1), f"mypy crashed (exit {proc.returncode}):\n{raw}"
    found = set()
    for line in proc.stdout.splitlines():
        m = _MYPY_LINE.match(line)
        assert m, f"unexpected mypy output line: {line!r}\n{raw}"
        found.add((Path(m["file"]).as_posix(), int(m["line"]), m["kind"], _normalise(m["msg"])))
    return found, raw


def test_user_code_infers_through_the_installed_wheel(installed: Installed) -> None:
    work = installed.work / "infer"
    work.mkdir()
    assert not (work / "broadcaster.py").exists() and not (work / "broadcaster").exists()
    (work / "user.py").write_text(USER_INFER)

    found, raw = _mypy(
        ["--python-executable", str(installed.python), "user.py"],
        cwd=work,
        cache=installed.mypy_cache,
    )
    # An untyped or missing package would show up here as import-untyped /
    # import-not-found and as "Any" in every revealed type.
    assert found == _expected(USER_INFER, "user.py"), raw


# starlette is imported only by mypy here, never at run time.
USER_ASGI = """\
from collections.abc import AsyncIterator

from starlette.types import ASGIApp

from broadcaster import Broadcaster, Event, Sender


async def events() -> AsyncIterator[Event]:
    yield Event("hello")


async def fn(tx: Sender) -> None:
    await tx.send(Event.json({"n": 1}))


b: Broadcaster[str, Event] = Broadcaster()
app: ASGIApp = b.response(events())
app2: ASGIApp = b.channel(fn)
app3: ASGIApp = b.response(b.subscribe("room"))
not_an_app: ASGIApp = Event("x")  # control: the only error
"""


def test_apps_are_assignable_to_starlette_asgiapp(installed: Installed) -> None:
    # starlette must be visible to mypy next to broadcaster. It is a test
    # requirement of the *running* interpreter, but installing it into the
    # temporary venv would need the network (or a wheel cache) and its own
    # dependencies; so mypy uses the running interpreter's site-packages and the
    # user file sits next to a copy of the built wheel's broadcaster/ package
    # (the byte-identical file the wheel installs, py.typed included).
    _require(_has_module("starlette"), "starlette is not installed (pip install --group test)")
    work = installed.work / "asgi"
    pkg = work / "broadcaster"
    pkg.mkdir(parents=True)
    with zipfile.ZipFile(installed.wheel) as whl:
        for name in ("__init__.py", "py.typed"):
            (pkg / name).write_bytes(whl.read(f"broadcaster/{name}"))
    (work / "user.py").write_text(USER_ASGI)

    found, raw = _mypy(
        ["--python-executable", sys.executable, "user.py"],
        cwd=work,
        cache=installed.mypy_cache,
    )
    # The control line proves ASGIApp really is starlette's callable type (not
    # Any from an unresolved import): it, and only it, is an error.
    (bad_line,) = [n for n, t in enumerate(USER_ASGI.splitlines(), 1) if "# control" in t]
    assert {(f, n, k) for f, n, k, _ in found} == {("user.py", bad_line, "error")}, raw
    ((*_, message),) = found
    assert message.startswith(
        'Incompatible types in assignment (expression has type "Event", variable has type "Callable['
    ), raw
    assert message.endswith("[assignment]"), raw
