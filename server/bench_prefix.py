"""Prefix caching (``--prefix-caching``, on by default) against the same engine without it and HF generate, in one run.

    python -m server.bench_prefix --json out.json [--system-tokens 512] [--question-tokens 32] [--new-tokens 32]
                                  [--concurrency 8] [--turns 4] [--repeats 3] [--dtype auto|bfloat16|float32]
                                  [--batch-invariant]

On the default base with one ReMix adapter (n=8, k=2, r=8 on every FFN projection), two engines that differ only in
``prefix_caching`` serve the same greedy requests at the same time, stepped in turn (so a slow spell of the machine
lands on both); each engine's times are the sums of its own steps. Two workloads:

  app   ``--concurrency`` requests at once, each a shared system prompt (``--system-tokens``) and its own question
        (``--question-tokens``), ``--new-tokens`` new tokens. ``--repeats`` rounds after an uncounted first one (the
        cache's cold start, and every engine's first use): per round the mean time to first token (submission to the
        step that emits it) and new tokens per second of the round. HF generate (the base alone, a static batch of
        the same prompts, no cache between calls) is the peer: the time of ``max_new_tokens=1`` (its first token)
        and of the whole generation.
  chat  ``--concurrency`` conversations of ``--turns`` turns: each turn sends the conversation so far (the system
        prompt, every question and reply) plus a new question, and waits for the reply; the conversations advance
        together. Per turn the mean time to first token; in all, new tokens per second.

It prints and writes the ratios (prefix cache over no cache; over HF generate for the app) and checks that the
engines' greedy replies agree (the share of requests whose replies are identical: bit-identical in float32, within
the rounding of another kernel choice in bfloat16, see the README) and the share of new tokens before the first
difference.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

import remix
from remix.kernels import cpu_ext, tune_cpu_allocator
from remix.settings import HelpFormatter
from server.bench import (TEXT, add_output_args, best_of_rounds, common_prefix, hf_first_and_all, make_adapter,
                          serve_in_turn, write_outputs)
from server.cli import DTYPES, resolve_dtype
from server.engine import Engine, EngineConfig, SamplingParams

NAMES = ("cache", "no_cache")


def same(got: dict) -> list[float]:
    """Per request: the share of the cache engine's reply before its first difference from the other's (1: identical)."""
    return [common_prefix(a, b) / len(a) for a, b in zip(got["cache"]["tokens"], got["no_cache"]["tokens"])]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m server.bench_prefix", description=__doc__, formatter_class=HelpFormatter)
    add_output_args(ap)
    ap.add_argument("--system-tokens", type=int, default=512, help="the shared system prompt's tokens")
    ap.add_argument("--question-tokens", type=int, default=32, help="each request's own question's tokens")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated for every request")
    ap.add_argument("--concurrency", type=int, default=8, help="app requests at once; chat conversations")
    ap.add_argument("--turns", type=int, default=4, help="turns of each chat conversation")
    ap.add_argument("--repeats", type=int, default=3, help="counted rounds of the app workload (after one uncounted)")
    ap.add_argument("--dtype", default="auto", choices=DTYPES, help="the model's dtype (auto: as the server picks it)")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="both engines in batch-invariant mode (--batch-invariant on): the replies then agree bit for bit")
    args = ap.parse_args(argv)
    for name in ("system_tokens", "question_tokens", "new_tokens", "concurrency", "turns", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    tune_cpu_allocator()
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    cpu_ext.load()
    model, tok = remix.load_base(args.base)
    adapter = make_adapter(model, Path(tempfile.mkdtemp(prefix="remix-bench-prefix-")) / "a0", seed=0)
    model.to(dtype=dtype)  # the HF peer: the base alone
    C, S, Q, N = args.concurrency, args.system_tokens, args.question_tokens, args.new_tokens
    greedy = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True)
    max_len = S + args.turns * (Q + N) + 8
    engines = {}
    for name in NAMES:
        copy, _ = remix.load_base(args.base, dtype=dtype)
        engines[name] = Engine(copy, tok, EngineConfig(
            max_model_len=max_len, max_num_seqs=C, max_queue=1024, max_batched_tokens=512,
            kv_budget_bytes=16 << 30, prefix_caching=name == "cache", batch_invariant=args.batch_invariant))
        engines[name].load_adapter("a0", str(adapter))
    ids = tok(TEXT * (S // 20 + 2)).input_ids
    system = ids[:S]
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size

    def question() -> list[int]:  # distinct tokens, so no two questions share a block
        return torch.randint(vocab, (Q,), generator=g).tolist()

    # app: the system prompt and a new question per request, rounds after a cold one
    rounds, agree = [], []
    for r in range(args.repeats + 1):
        prompts = [system + question() for _ in range(C)]
        got = serve_in_turn(engines, {name: prompts for name in NAMES}, greedy)
        agree += same(got)
        if r:
            rounds.append({name: {"ttft_s": got[name]["ttft_s"], "tokens_per_s": C * N / got[name]["wall_s"]}
                           for name in NAMES})
        print(f"app round {r}{'' if r else ' (cold, not counted)'}: " + "  ".join(
            f"{name} ttft {1000 * got[name]['ttft_s']:.0f} ms, {C * N / got[name]['wall_s']:.1f} tok/s" for name in NAMES),
            flush=True)
    hf_first, hf_all = hf_first_and_all(model, prompts, N)
    print(f"app HF generate: first token {1000 * hf_first:.0f} ms, {C * N / hf_all:.1f} tok/s", flush=True)
    app = best_of_rounds(rounds, NAMES)
    app["hf_generate"] = {"ttft_s": hf_first, "tokens_per_s": C * N / hf_all}
    med = lambda f: statistics.median(f(x) for x in rounds)  # noqa: E731 - ratios within rounds, median over rounds
    app["cache_over_no_cache_ttft"] = med(lambda x: x["cache"]["ttft_s"] / x["no_cache"]["ttft_s"])
    app["cache_over_no_cache_tokens_per_s"] = med(lambda x: x["cache"]["tokens_per_s"] / x["no_cache"]["tokens_per_s"])
    app["cache_over_hf_generate_tokens_per_s"] = app["cache"]["tokens_per_s"] / app["hf_generate"]["tokens_per_s"]
    app["cache_over_hf_generate_ttft"] = app["cache"]["ttft_s"] / hf_first

    # chat: every turn resends the conversation with a new question; each engine continues its own replies
    convs = {name: [list(system) for _ in range(C)] for name in NAMES}
    turns, walls = [], {name: 0.0 for name in NAMES}
    for t in range(args.turns):
        for i in range(C):
            q = question()
            for name in NAMES:
                convs[name][i] += q
        got = serve_in_turn(engines, convs, greedy)
        for name in NAMES:
            walls[name] += got[name]["wall_s"]
            for i, reply in enumerate(got[name]["tokens"]):
                convs[name][i] += reply
        agree += same(got)
        turns.append({name: got[name]["ttft_s"] for name in NAMES})
        print(f"chat turn {t + 1}: prompts of {len(convs['cache'][0]) - N} tokens, ttft " + "  ".join(
            f"{name} {1000 * got[name]['ttft_s']:.0f} ms" for name in NAMES), flush=True)
    chat = {"turns_ttft_s": turns,
            **{name: {"tokens_per_s": C * N * args.turns / walls[name]} for name in NAMES},
            "cache_over_no_cache_ttft_last_turn": turns[-1]["cache"] / turns[-1]["no_cache"],
            "cache_over_no_cache_tokens_per_s": walls["no_cache"] / walls["cache"]}
    out = {"cpu": cpu_ext.cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__, "base": args.base,
           "dtype": str(dtype).removeprefix("torch."), "system_tokens": S, "question_tokens": Q, "new_tokens": N,
           "concurrency": C, "turns": args.turns, "batch_invariant": args.batch_invariant, "repeats": args.repeats, "app": app, "chat": chat,
           "identical_replies": sum(a == 1 for a in agree) / len(agree),
           "common_prefix_share": sum(agree) / len(agree),
           "prefix_cache": {k: v for k, v in engines["cache"].stats().items() if k.startswith("prefix_cache_")}}
    for key in ("cache_over_no_cache_ttft", "cache_over_no_cache_tokens_per_s", "cache_over_hf_generate_ttft",
                "cache_over_hf_generate_tokens_per_s"):
        print(f"app  {key:40s} {app[key]:.2f}")
    for key in ("cache_over_no_cache_ttft_last_turn", "cache_over_no_cache_tokens_per_s"):
        print(f"chat {key:40s} {chat[key]:.2f}")
    print(f"greedy replies, prefix cache vs none: identical {out['identical_replies']:.2f}, new tokens before the first "
          f"difference {out['common_prefix_share']:.2f}")
    write_outputs(args, out, markdown)
    return out


def markdown(out: dict) -> str:
    app, chat = out["app"], out["chat"]
    ms = lambda s: f"{1000 * s:.0f} ms"  # noqa: E731
    rows = [
        "| workload | measure | HF generate (base) | engine, no prefix cache | engine, prefix cache | cache / no cache |",
        "|---|---|---|---|---|---|",
        f"| app ({out['concurrency']} requests, {out['system_tokens']}-token system prompt + {out['question_tokens']}) "
        f"| time to first token | {ms(app['hf_generate']['ttft_s'])} | {ms(app['no_cache']['ttft_s'])} | "
        f"{ms(app['cache']['ttft_s'])} | {app['cache_over_no_cache_ttft']:.2f} |",
        f"| | new tokens/s | {app['hf_generate']['tokens_per_s']:.1f} | {app['no_cache']['tokens_per_s']:.1f} | "
        f"{app['cache']['tokens_per_s']:.1f} | {app['cache_over_no_cache_tokens_per_s']:.2f} |",
    ]
    for t, turn in enumerate(chat["turns_ttft_s"]):
        rows.append(f"| chat ({out['concurrency']} conversations), turn {t + 1} | time to first token | | "
                    f"{ms(turn['no_cache'])} | {ms(turn['cache'])} | {turn['cache'] / turn['no_cache']:.2f} |")
    rows.append(f"| chat, all turns | new tokens/s | | {chat['no_cache']['tokens_per_s']:.1f} | "
                f"{chat['cache']['tokens_per_s']:.1f} | {chat['cache_over_no_cache_tokens_per_s']:.2f} |")
    rows.append("")
    rows.append(f"Greedy replies with and without the prefix cache ({out['dtype']}): {out['identical_replies']:.0%} "
                f"identical, {out['common_prefix_share']:.0%} of new tokens before the first difference. Over HF "
                f"generate (app): time to first token "
                f"{app['cache_over_hf_generate_ttft']:.2f}x, tokens/s {app['cache_over_hf_generate_tokens_per_s']:.2f}x.")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
