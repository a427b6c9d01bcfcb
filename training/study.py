"""python -m training.study: the experiments of docs/experiments.md, run and reported.

    python -m training.study --out runs/study                 # ~1 hour on 2 CPU cores
    python -m training.study --out runs/study --scale gpu      # longer runs, bigger batches, on CUDA

Runs every configuration with 3 seeds on the built-in task mixture and the default base (skipping runs whose
summary.json exists, so it can be interrupted and continued), then writes tables and plots to --report:
  (a) ESS of the routing weights over training: softmax-top-k with and without the balance loss, dense, ReMix;
  (b) held-out exact match of ReMix (n=8, k=2, r=8) vs LoRA r=8, LoRA r=16, softmax-top-k and dense;
  (c) ReMix at k in {1, 2, 4} and at M in {2, 4, 8}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from remix.models import DTYPES
from remix.settings import HelpFormatter

SCALES = {  # steps, batch size, eval size, device; long_steps: the long runs (softmax-top-k for (a), and ReMix)
    "cpu": {"steps": 60, "batch_size": 4, "eval_size": 48, "device": "cpu", "train_size": 1000, "long_steps": 300},
    "gpu": {"steps": 600, "batch_size": 16, "eval_size": 300, "device": "cuda", "train_size": 10000, "long_steps": 3000},
}
CONFIGS = {  # name -> (group, flags). Active parameters per token and module: ReMix k*r*(d_in+d_out)
    "remix": ("ab", ["--router", "remix", "--n", "8", "--k", "2", "--r", "8", "--samples", "4"]),
    "lora_r8": ("ab", ["--router", "lora", "--r", "8"]),
    "lora_r16": ("ab", ["--router", "lora", "--r", "16"]),
    "softmax_topk": ("ab", ["--router", "softmax-topk", "--n", "8", "--k", "2", "--r", "8"]),
    "softmax_topk_lb": ("ab", ["--router", "softmax-topk", "--n", "8", "--k", "2", "--r", "8", "--load-balance-coef", "0.01"]),
    "dense": ("ab", ["--router", "dense", "--n", "8", "--r", "8"]),
    "remix_k1": ("c", ["--router", "remix", "--n", "8", "--k", "1", "--r", "8", "--samples", "4"]),
    "remix_k4": ("c", ["--router", "remix", "--n", "8", "--k", "4", "--r", "8", "--samples", "4"]),
    "remix_m2": ("c", ["--router", "remix", "--n", "8", "--k", "2", "--r", "8", "--samples", "2"]),
    "remix_m8": ("c", ["--router", "remix", "--n", "8", "--k", "2", "--r", "8", "--samples", "8"]),
}
K_OF = {"remix_k1": 1, "remix_k4": 4}  # ReMix's ESS is k by construction
LONG = {  # seed 0 only, long_steps each: the ESS curve of (a) and a head-to-head past the undertrained regime
    "softmax_topk_long": ["--router", "softmax-topk", "--n", "8", "--k", "2", "--r", "8"],
    "remix_long": CONFIGS["remix"][1],
}
ACTIVE_RANK = {"softmax_topk_long": 16, "remix_long": 16, "remix": 16, "lora_r8": 8, "lora_r16": 16, "softmax_topk": 16, "softmax_topk_lb": 16, "dense": 64,
               "remix_k1": 8, "remix_k4": 32, "remix_m2": 16, "remix_m8": 16}


def run_all(out: Path, scale: dict, seeds: list[int], only: list[str], dtype: str = "float32") -> None:
    jobs = [(seed, name, flags) for seed in seeds for name, (_, flags) in CONFIGS.items()]
    jobs += [(seeds[0], name, flags + ["--steps", str(scale["long_steps"])]) for name, flags in LONG.items()]
    for seed, name, flags in jobs:  # every configuration once before any is repeated, so a cut-short study still covers all
        if only and name not in only:
            continue
        run_dir = out / name / f"seed{seed}"
        if (run_dir / "summary.json").is_file():
            continue
        cmd = [sys.executable, "-m", "training.fit", "--seed", str(seed), "--output", str(run_dir),
               "--steps", str(scale["steps"]), "--batch-size", str(scale["batch_size"]), "--eval-size",
               str(scale["eval_size"]), "--train-size", str(scale["train_size"]), "--device", scale["device"],
               "--eval-every", "0", "--eval-base", "false", "--save-every", "0", "--progress", "false",
               "--dtype", dtype, *flags]  # flags last: they win
        start = time.time()
        print(f"[study] {name} seed {seed}: {' '.join(cmd[2:])}", flush=True)
        subprocess.run(cmd, check=True)
        (run_dir / "wall_seconds.txt").write_text(f"{time.time() - start:.1f}\n")


def load(out: Path, name: str) -> list[dict]:
    runs = []
    for run_dir in sorted((out / name).glob("seed*")):
        summary_path = run_dir / "summary.json"
        if not summary_path.is_file():
            continue
        summary = json.loads(summary_path.read_text())
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        summary["curve"] = [(r["step"], r.get("train_ess"), r["loss"]) for r in rows if "loss" in r]
        wall = run_dir / "wall_seconds.txt"
        summary["wall"] = float(wall.read_text()) if wall.is_file() else None
        runs.append(summary)
    return runs


def ms(values: list[float], pct: bool = False) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    f = 100.0 if pct else 1.0
    mean = statistics.mean(values) * f
    if len(values) == 1:
        return f"{mean:.1f}" if pct else f"{mean:.3f}"
    sd = statistics.stdev(values) * f
    return f"{mean:.1f} ± {sd:.1f}" if pct else f"{mean:.3f} ± {sd:.3f}"


def table(out: Path, names: list[str]) -> list[str]:
    lines = ["| config | active rank | seeds | exact match % | facts % | arithmetic % | strings % | held-out loss | "
             "effective LoRAs | final train ESS | wall s/run |", "|" + "---|" * 11]
    for name in names:
        runs = load(out, name)
        if not runs:
            continue
        tasks = lambda t: [r["tasks"][t]["exact_match"] for r in runs]  # noqa: E731
        eff = [statistics.mean(v["effective_loras_mean"] for v in r["tasks"].values()) for r in runs]
        ess = [r["curve"][-1][1] for r in runs if r["curve"] and r["curve"][-1][1] is not None]
        lines.append(f"| {name} | {ACTIVE_RANK[name]} | {len(runs)} | {ms([r['eval_exact_match'] for r in runs], True)} | "
                     f"{ms(tasks('facts'), True)} | {ms(tasks('arithmetic'), True)} | {ms(tasks('strings'), True)} | "
                     f"{ms([r['eval_loss'] for r in runs])} | {ms(eff)} | "
                     f"{ms(ess) if ess else (f'{K_OF.get(name, 2)} (= k)' if name.startswith('remix') else '-')} | "
                     f"{ms([r['wall'] for r in runs])} |")
    return lines


def ess_plot(out: Path, report: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, label in (("softmax_topk", "softmax-top-k (MixLoRA)"), ("softmax_topk_lb", "softmax-top-k + balance loss"),
                        ("dense", "dense softmax (n = 8)")):
        for i, run in enumerate(load(out, name)):
            steps = [s for s, e, _ in run["curve"] if e is not None]
            values = [e for _, e, _ in run["curve"] if e is not None]
            ax.plot(steps, values, color={"softmax_topk": "C0", "softmax_topk_lb": "C1", "dense": "C2"}[name],
                    alpha=0.8, label=label if i == 0 else None)
    for run in load(out, "softmax_topk_long"):
        steps = [s for s, e, _ in run["curve"] if e is not None]
        ax.plot(steps, [e for _, e, _ in run["curve"] if e is not None], color="C0", linestyle="--", alpha=0.8,
                label=f"softmax-top-k, {len(steps)} steps")
    runs = load(out, "remix")
    if runs:
        ax.axhline(2.0, color="C3", label="ReMix (k = 2, constant weights)")
    ax.set_xlabel("training step")
    ax.set_ylabel("ESS of routing weights (mean over tokens and modules)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = report / "ess_over_training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def em_plot(out: Path, report: Path, names: list[str], filename: str, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for i, name in enumerate(names):
        values = [100 * r["eval_exact_match"] for r in load(out, name)]
        if values:
            ax.bar(i, statistics.mean(values), color="C3" if name == "remix" else "C0", alpha=0.8)
            ax.scatter([i] * len(values), values, color="k", s=10, zorder=3)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, fontsize=8)
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = report / filename
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.study", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--out", default="runs/study", help="where the runs go")
    ap.add_argument("--report", default="docs/study", help="where tables and plots go")
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu",
                    help="run sizes: cpu (60 steps of batch 4, 300 for the long runs) or gpu (600 / 3000 of batch 16, on cuda)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run of each configuration each")
    ap.add_argument("--only", default="", help="comma-separated configuration names (empty: all)")
    ap.add_argument("--report-only", action="store_true", help="do not train; summarise what exists")
    ap.add_argument("--dtype", choices=DTYPES, default="float32",
                    help="the base's dtype in every run (float32: as docs/experiments.md's runs were trained; auto "
                         "trains ~2x faster on bfloat16 hardware)")
    args = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds: comma-separated whole numbers, got {args.seeds!r}")
    only = [s for s in args.only.split(",") if s]
    unknown = [name for name in only if name not in CONFIGS and name not in LONG]
    if unknown:
        ap.error(f"--only: no configuration named {', '.join(unknown)} (there are {', '.join([*CONFIGS, *LONG])})")
    out, report = Path(args.out), Path(args.report)
    report.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        run_all(out, SCALES[args.scale], seeds, only, args.dtype)
    ab = [n for n, (g, _) in CONFIGS.items() if g == "ab"] + list(LONG)
    c = ["remix_k1", "remix", "remix_k4", "remix_m2", "remix_m8"]
    lines = ["## (b) ReMix against the baselines", "", *table(out, ab), "", "## (c) ReMix: k and M", "", *table(out, c), ""]
    (report / "tables.md").write_text("\n".join(lines))
    ess_plot(out, report)
    em_plot(out, report, ab[: -len(LONG)], "exact_match_baselines.png", "held-out exact match, 3 seeds (dots)")
    em_plot(out, report, c, "exact_match_k_and_m.png", "ReMix: k in {1,2,4} (M = 4), M in {2,4,8} (k = 2)")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
