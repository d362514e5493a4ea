"""Draw bench/results.json as bench/results.png: ``plot.py RESULTS_JSON OUT_PNG``.

Runs in the harness's ``ours`` environment (matplotlib); log scales where the
values span decades.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAMES = {
    "ours": "ours",
    "candidate": "ours, patched",
    "encode": "encode/broadcaster",
    "queue": "floor (c) Queue",
    "deque": "floor (d) deque+future",
    "ring": "floor (e) shared ring",
    "sse-starlette": "(b) sse-starlette",
    "fastapi": "(c) FastAPI SSE",
    "raw": "(d) raw floor",
    "raw-watch": "(d') raw + receive()",
}
COLORS = {
    "ours": "tab:blue", "candidate": "tab:cyan", "encode": "tab:red", "queue": "tab:gray", "deque": "black", "ring": "tab:purple",
    "sse-starlette": "tab:orange", "fastapi": "tab:green", "raw": "black", "raw-watch": "dimgray",
}


def bars(ax, labels, series: dict[str, list[float | None]], log: bool, ylabel: str) -> None:
    n = len(series)
    width = 0.8 / max(1, n)
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [v or 0 for v in values], width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel, fontsize=8)
    if n > 1:
        ax.legend(fontsize=6)


def main() -> None:
    results = json.load(open(sys.argv[1]))
    NAMES["candidate"] = results.get("candidate_label") or NAMES["candidate"]
    cases = results["cases"]
    fig, axes = plt.subplots(2, 5, figsize=(25, 9))
    axes = axes.ravel()
    title = "broadcaster.py benchmarks" + (" (--quick)" if results.get("quick") else "")
    fig.suptitle(f"{title}: {results['machine']['cpus']} CPUs, Python {results['machine']['python']}", fontsize=12)

    for ax, mode in zip(axes[:2], ("lockstep", "burst")):
        s = cases.get("fanout")
        if not s:
            ax.axis("off")
            continue
        for impl in s["impls"]:
            ys = [s["points"][str(n)][impl].get(mode, {}).get("ns") for n in s["sizes"]]
            ax.plot(s["sizes"], ys, marker="o", label=NAMES[impl], color=COLORS.get(impl))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("subscribers N", fontsize=8)
        ax.set_ylabel("ns per delivery (lower is better)", fontsize=8)
        ax.set_title(f"1. fan-out, {mode}" + (" (a wake per delivery)" if mode == "lockstep" else " (readers drain bursts)"), fontsize=9)
        ax.legend(fontsize=6)

    ax = axes[2]
    s = cases.get("encode")
    if s:
        impls = list(s["impls"])
        bars(ax, [NAMES[i] for i in impls], {"us per send": [s["impls"][i].get("us_per_send") for i in impls]}, True,
             "us per send (log)")
        ax.set_title(f"2. one 1 KiB event to {s['subscribers']:,} subscribers", fontsize=9)
    else:
        ax.axis("off")

    ax = axes[3]
    s = cases.get("http")
    if s:
        stacks = list(s["stacks"])
        bars(ax, [NAMES[x] for x in stacks],
             {"events/s": [s["stacks"][x].get("throughput", {}).get("events_per_s") for x in stacks]}, True,
             "delivered events/s (log)")
        ax.set_title(f"3. HTTP: {s['conns']} SSE clients, windowed throughput", fontsize=9)
        ax = axes[4]
        bars(ax, [NAMES[x] for x in stacks], {
            "windowed p50": [s["stacks"][x].get("throughput", {}).get("p50_ms") for x in stacks],
            "windowed p99": [s["stacks"][x].get("throughput", {}).get("p99_ms") for x in stacks],
            f"paced {s['paced_rate_msgs_per_s']} msg/s p50": [s["stacks"][x].get("paced", {}).get("p50_ms") for x in stacks],
            f"paced p99": [s["stacks"][x].get("paced", {}).get("p99_ms") for x in stacks],
        }, True, "send-to-receive latency, ms (log)")
        ax.set_title("3. HTTP latency", fontsize=9)
    else:
        axes[3].axis("off")
        axes[4].axis("off")

    ax = axes[5]
    s = cases.get("memory")
    if s:
        impls = list(s["impls"])
        bars(ax, ["bare", "after 1 msg", "with reader task", "per key"],
             {NAMES[i]: [s["impls"][i].get(k) for k in ("bare", "after_msg", "with_reader", "bytes_per_key")] for i in impls},
             False, "bytes")
        ax.axhline(1024, color="red", lw=0.8, ls="--")
        ax.set_title(f"4. memory per idle subscription ({s['subs']:,} on {s['keys']:,} keys); red: 1 KiB", fontsize=9)
    else:
        ax.axis("off")

    ax = axes[6]
    s = cases.get("churn")
    if s:
        shapes = list(s["shapes"])
        impls = list(s["shapes"][shapes[0]])
        bars(ax, shapes, {NAMES[i]: [s["shapes"][sh][i].get("ops_per_s") for sh in shapes] for i in impls}, False,
             "subscribe/close cycles per s")
        ax.set_title(f"5. churn: {s['cycles']:,} cycles", fontsize=9)
    else:
        ax.axis("off")

    ax = axes[7]
    s = cases.get("slow")
    if s:
        for impl, e in s["impls"].items():
            cps = e.get("checkpoints") or []
            ax.plot([c["sends"] for c in cps], [max(c["rss_growth"], 1) / 2**20 for c in cps], marker=".",
                    label=f"{NAMES[impl]} (stuck holds {e.get('stuck_queued', 0):,.0f})", color=COLORS.get(impl))
        ax.set_xlabel("sends", fontsize=8)
        ax.set_ylabel("RSS growth, MiB", fontsize=8)
        ax.set_title(f"6. slow consumer: 1 stuck + {s['subscribers'] - 1} readers", fontsize=9)
        ax.legend(fontsize=6)
    else:
        ax.axis("off")

    s = cases.get("connections")
    if s:
        sizes = s["sizes"]
        ax = axes[8]
        for stack in s["stacks"]:
            ys = [s["points"][str(n)][stack].get("kib_per_conn") for n in sizes]
            ax.plot(sizes, [float("nan") if y is None else y for y in ys], marker="o", label=NAMES[stack],
                    color=COLORS.get(stack))
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
        ax.set_xticks([], minor=True)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("open SSE connections N", fontsize=8)
        ax.set_ylabel("server RSS per connection, KiB (lower is better)", fontsize=8)
        ax.set_title("7. connections: RSS per open connection (one uvicorn worker)", fontsize=9)
        ax.legend(fontsize=6)
        ax = axes[9]
        for stack in s["stacks"]:
            med = [s["points"][str(n)][stack].get("lat_median_ms") for n in sizes]
            top = [s["points"][str(n)][stack].get("lat_max_ms") for n in sizes]
            ax.plot(sizes, [float("nan") if y is None else y for y in med], marker="o", label=f"{NAMES[stack]} median",
                    color=COLORS.get(stack))
            ax.plot(sizes, [float("nan") if y is None else y for y in top], marker="x", ls=":", lw=0.8,
                    color=COLORS.get(stack))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
        ax.set_xticks([], minor=True)
        ax.set_xlabel("open SSE connections N", fontsize=8)
        ax.set_ylabel("publish to last connection's receipt, ms (dotted: max)", fontsize=8)
        ax.set_title(f"7. connections: one message to all N ({s['messages']} msgs per run)", fontsize=9)
        ax.legend(fontsize=6)
    else:
        axes[8].axis("off")
        axes[9].axis("off")

    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(sys.argv[2], dpi=90)


if __name__ == "__main__":
    main()
