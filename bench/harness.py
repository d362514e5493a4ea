"""What the case modules share on the orchestrator side: repetition, interleaving,
medians and paired ratios."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from envs import Envs


class Context:
    def __init__(
        self, envs: Envs, quick: bool, reps_scale: float = 1.0, candidate: bool = False, skip: Sequence[str] = ()
    ) -> None:
        self.skip = set(skip)
        self.envs = envs
        self.quick = quick
        self.reps_scale = reps_scale
        self.candidate = candidate
        self.started = time.monotonic()

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", file=sys.stderr, flush=True)

    def reps(self, quick: int, full: int) -> int:
        return max(1, round((quick if self.quick else full) * self.reps_scale))

    def with_candidate(self, impls: Sequence[str]) -> list[str]:
        """``impls`` plus the patched copy of ours right after ours, when given,
        minus those skipped (``--skip``)."""
        out = [impl for impl in impls if impl not in self.skip]
        if self.candidate and "ours" in out:
            out.insert(out.index("ours") + 1, "candidate")
        return out

    def interleave(
        self,
        case: str,
        points: Sequence[tuple[str, dict]],
        impls: Sequence[str],
        reps: int,
        timeout: float = 600,
        point_reps: dict[str, int] | None = None,
    ) -> dict[str, dict[str, list[dict]]]:
        """Run every (point, impl) ``reps`` times (``point_reps[label]`` for the
        points named there), one fresh worker each. A repetition runs every
        point, and at each point every implementation back to back, in an order
        rotated by one per repetition, so slow phases of a shared machine hit
        all of them alike. ``raw[point][impl][rep]``."""
        raw: dict[str, dict[str, list[dict]]] = {label: {impl: [] for impl in impls} for label, _ in points}
        point_reps = point_reps or {}
        for rep in range(max([reps, *point_reps.values()])):
            for label, params in points:
                if rep >= point_reps.get(label, reps):
                    continue
                order = list(impls[rep % len(impls):]) + list(impls[: rep % len(impls)])
                for impl in order:
                    result = self.envs.worker(case, impl, params, timeout=timeout)
                    raw[label][impl].append(result)
                    brief = result.get("error") or ", ".join(
                        f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)
                    )
                    self.log(f"{case} rep {rep + 1}/{point_reps.get(label, reps)} {label} {impl}: {brief}")
        return raw

    @staticmethod
    def median(values: Sequence[float]) -> float:
        return float(statistics.median(values))

    @staticmethod
    def paired_ratios(a_runs: Sequence[dict], b_runs: Sequence[dict], key: str) -> list[float]:
        """a/b of ``key`` within each repetition where both succeeded."""
        out = []
        for a, b in zip(a_runs, b_runs):
            va, vb = a.get(key), b.get(key)
            if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and vb:
                out.append(va / vb)
        return out


def fmt(value: Any, digits: int = 3) -> str:
    """A compact human number: 1.23k, 45.6M, 0.0123."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    v = float(value)
    if v == 0:
        return "0"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.{digits}g}{unit}"
    return f"{v:.{digits}g}"
