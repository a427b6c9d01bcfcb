"""Score a served model on the built-in "tools" task's held-out split through the API, with tool_choice "auto":
each question asks /v1/chat/completions (greedy, the task's three tools offered) and counts as right when the
response calls the expected function with exactly the expected arguments (as parsed into message.tool_calls), or, for
a sum, answers the right number in text without calling.

    python scripts/check_tools.py --url http://127.0.0.1:8000 --model tools --size 48
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from training.tasks import build_task, exact_match  # noqa: E402


def verdict(row: dict, message: dict) -> bool:
    want = row["messages"][-1]
    calls = message.get("tool_calls") or []
    if not want.get("tool_calls"):
        return not calls and exact_match(message.get("content") or "", want["content"])
    expected = [(c["function"]["name"], c["function"]["arguments"]) for c in want["tool_calls"]]
    try:
        got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    except ValueError:
        return False
    return got == expected


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the served model (an adapter's name or the base's)")
    p.add_argument("--size", type=int, default=48, help="held-out questions")
    p.add_argument("--seed", type=int, default=1, help="the task seed (training.fit evaluates seed + 1)")
    p.add_argument("--api-key", default="")
    args = p.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    right, total, made = Counter(), Counter(), Counter()
    for row in build_task("tools", "test", args.size, args.seed):
        want = row["messages"][-1]
        kind = want["tool_calls"][0]["function"]["name"] if want.get("tool_calls") else "text"
        r = httpx.post(args.url + "/v1/chat/completions", headers=headers, timeout=300, json={
            "model": args.model, "messages": row["messages"][:-1], "tools": row["tools"], "tool_choice": "auto",
            "temperature": 0, "max_tokens": 60})
        r.raise_for_status()
        message = r.json()["choices"][0]["message"]
        total[kind] += 1
        right[kind] += verdict(row, message)
        made[kind] += bool(message.get("tool_calls"))
    for kind in sorted(total):
        print(f"{kind:>16}: {right[kind]}/{total[kind]} right, {made[kind]} with a tool call")
    print(f"{'all':>16}: {sum(right.values())}/{sum(total.values())} right "
          f"({sum(right.values()) / max(1, sum(total.values())):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
