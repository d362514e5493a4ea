"""Run one measurement in a fresh process: ``worker.py CASE IMPL PARAMS_JSON``.

Started by ``envs.Envs.worker`` with the interpreter of the implementation's
environment. ``$BENCH_OURS_DIR`` (set only for our implementation) is put first
on ``sys.path``; nothing else of the repository is. Prints the result of
``CASE.measure(IMPL, **PARAMS)`` as one JSON line, with which ``broadcaster``
module (if any) was imported, so a mix-up of the two libraries cannot go
unnoticed.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    case, impl, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    # Nothing named broadcaster may ever sit next to the harness: this folder is
    # on sys.path of every worker, the peers' workers included.
    if os.path.exists(os.path.join(BENCH, "broadcaster.py")):
        raise SystemExit("bench/broadcaster.py must not exist: it would shadow both libraries")
    ours_dir = os.environ.get("BENCH_OURS_DIR")
    if ours_dir:
        sys.path.insert(0, ours_dir)
    module = importlib.import_module(case)
    result = module.measure(impl, **params)
    imported = sys.modules.get("broadcaster")
    if imported is not None:
        path = os.path.realpath(imported.__file__ or "")
        result["_broadcaster"] = path
        expect_ours = bool(ours_dir)
        is_ours = ours_dir is not None and path == os.path.realpath(os.path.join(ours_dir, "broadcaster.py"))
        if expect_ours != is_ours:
            raise SystemExit(f"{impl}: imported the wrong broadcaster module: {path}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
