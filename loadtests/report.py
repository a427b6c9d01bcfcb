"""Summaries (mean / p50 / p90 / p99), goodput under SLOs, comparisons, and plots of a load-test run."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np


def stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "count": 0}
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "count": int(a.size)}


def summarize(results, elapsed: float, slo: dict[str, float]) -> dict:
    ok = [r for r in results if r.ok]
    itls = [x for r in ok for x in r.itls()]
    tokens = sum(r.completion_tokens for r in ok)
    prompt_tokens = sum(getattr(r, "prompt_tokens", 0) for r in ok)

    def meets(r) -> bool:
        checks = {"ttft": r.ttft, "e2e": r.e2e, "tpot": r.tpot()}
        return all(checks.get(k) is not None and checks[k] <= v for k, v in slo.items() if k in checks) and (
            "itl" not in slo or all(x <= slo["itl"] for x in r.itls()))

    good = [r for r in ok if meets(r)]
    return {
        "requests": len(results), "completed": len(ok), "elapsed_s": elapsed,
        # by HTTP status, or for a stream that failed after its 200 (and a connection error) the error's own code
        "errors": dict(Counter(str(r.status if r.status and r.status != 200 else r.error.split(":")[0] or "error")
                               for r in results if not r.ok)),
        "request_throughput": len(ok) / elapsed if elapsed else 0.0,
        "token_throughput": tokens / elapsed if elapsed else 0.0,
        "goodput": len(good) / elapsed if elapsed else 0.0, "slo": slo, "slo_met": len(good),
        "ttft_s": stats([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": stats(itls),
        "tpot_s": stats([t for r in ok if (t := r.tpot()) is not None]),
        "e2e_s": stats([r.e2e for r in ok if r.e2e is not None]),
        # the share of prompt tokens the server reported as served by its prefix cache (None: it reported no usage)
        "cached_prompt_share": sum(getattr(r, "cached_tokens", 0) for r in ok) / prompt_tokens if prompt_tokens else None,
    }


def table(summary: dict) -> str:
    lines = [f"requests {summary['requests']}  completed {summary['completed']}  errors {summary['errors'] or 0}  "
             f"elapsed {summary['elapsed_s']:.1f}s",
             f"throughput {summary['request_throughput']:.2f} req/s  {summary['token_throughput']:.1f} tok/s  "
             f"goodput {summary['goodput']:.2f} req/s (SLO {summary['slo'] or 'none'})"
             + (f"  prompt tokens from the prefix cache {summary['cached_prompt_share']:.0%}"
                if summary.get("cached_prompt_share") is not None else ""),
             f"{'metric':8s} {'mean':>9s} {'p50':>9s} {'p90':>9s} {'p99':>9s}   (ms)"]
    for key in ("ttft_s", "itl_s", "tpot_s", "e2e_s"):
        s = summary[key]
        fmt = lambda v: f"{1000 * v:9.1f}" if v is not None else f"{'-':>9s}"  # noqa: E731
        lines.append(f"{key[:-2]:8s} {fmt(s['mean'])} {fmt(s['p50'])} {fmt(s['p90'])} {fmt(s['p99'])}")
    return "\n".join(lines)


def compare(a_path: str, b_path: str) -> str:
    a, b = json.loads(Path(a_path).read_text())["summary"], json.loads(Path(b_path).read_text())["summary"]
    lines = [f"{'metric':28s} {'A':>10s} {'B':>10s} {'B/A':>8s}"]

    def row(name, x, y):
        ratio = f"{y / x:8.2f}" if x and y is not None else f"{'-':>8s}"
        lines.append(f"{name:28s} {x if x is not None else float('nan'):10.4g} {y if y is not None else float('nan'):10.4g} {ratio}")

    for key in ("request_throughput", "token_throughput", "goodput"):
        row(key, a[key], b[key])
    for key in ("ttft_s", "itl_s", "tpot_s", "e2e_s"):
        for q in ("p50", "p99"):
            row(f"{key}.{q}", a[key][q], b[key][q])
    return "\n".join(lines)


def plots(results, out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    ok = [r for r in results if r.ok]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in (("TTFT", [r.ttft for r in ok if r.ttft is not None]), ("ITL", [x for r in ok for x in r.itls()]),
                          ("E2E", [r.e2e for r in ok if r.e2e is not None])):
        if values:
            v = np.sort(values)
            ax.plot(v * 1000, np.arange(1, v.size + 1) / v.size, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("CDF")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "latency_cdf.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    times = np.asarray([t for r in ok for t in r.token_times] or [r.end for r in ok if r.end is not None])
    if times.size:
        bins = np.arange(0, times.max() + 1.0, 1.0)
        counts, edges = np.histogram(times, bins=bins)
        ax.plot(edges[:-1], counts, drawstyle="steps-post")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("tokens / s" if any(r.token_times for r in ok) else "completions / s")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
