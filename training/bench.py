"""Training step benchmark on the default base: what the RLOO estimator costs.

    python -m training.bench --json out.json

Times, on the same batch (8 examples of the built-in mixture, n=8, k=2, r=8 on every FFN projection):
  remix_m4         one ReMix step with M = 4 selections (the batch replicated 4-fold in one forward + RLOO surrogate)
  plain_selection  one step with a single sampled selection and the plain SFT loss (no RLOO), x 4
  softmax_topk     one MixLoRA-style step at the same k
and reports rloo_overhead = remix_m4 / (4 x plain_selection) (goal <= 1.15) and remix_over_softmax_topk.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import remix
from remix.kernels import tune_cpu_allocator
from remix.settings import HelpFormatter
from training import rloo
from training.data import collate, load_examples


def time_steps(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--base", default=remix.DEFAULT_BASE)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    tune_cpu_allocator()
    torch.manual_seed(0)
    model, tok = remix.load_base(args.base)
    examples = load_examples("mixture", "train", tok, 128, args.batch_size, 0)
    batch = collate(examples[: args.batch_size], tok.pad_token_id)
    results = {}

    def setup(router: str):
        remix.unwrap(model)
        layers = remix.inject(model, remix.MixtureConfig(router=router, n=8, k=2, r=8))
        with torch.no_grad():
            for layer in layers.values():
                layer.lora_B.normal_(std=0.01)
        model.train()
        params = [p for layer in layers.values() for p in layer.parameters() if p.requires_grad]
        return list(layers.values()), torch.optim.AdamW(params, lr=1e-4)

    layers, opt = setup("remix")

    def remix_step():
        M, B = args.samples, args.batch_size
        big = rloo.replicate(batch, M)
        losses, _ = rloo.completion_losses(model, big)
        losses = losses.view(M, B)
        log_q = rloo.sequence_log_q(layers, big["attention_mask"]).view(M, B)
        (losses.mean() + rloo.rloo_surrogate(losses, log_q)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def plain_step():
        losses, _ = rloo.completion_losses(model, batch)
        losses.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    results["remix_m4_s"] = time_steps(remix_step, args.repeats)
    results["plain_selection_s"] = time_steps(plain_step, args.repeats)
    print(f"remix M={args.samples}: {results['remix_m4_s']:.2f} s/step   one plain selection: {results['plain_selection_s']:.2f} s/step", flush=True)
    layers, opt = setup("softmax-topk")
    results["softmax_topk_s"] = time_steps(plain_step, args.repeats)
    print(f"softmax-top-k: {results['softmax_topk_s']:.2f} s/step", flush=True)
    results["rloo_overhead"] = results["remix_m4_s"] / (args.samples * results["plain_selection_s"])
    results["remix_over_softmax_topk"] = results["remix_m4_s"] / results["softmax_topk_s"]
    results["goals"] = {"rloo_overhead": {"value": round(results["rloo_overhead"], 3), "goal": "<= 1.15",
                                          "met": results["rloo_overhead"] <= 1.15}}
    print(f"rloo_overhead {results['rloo_overhead']:.3f} (goal <= 1.15)   remix_over_softmax_topk "
          f"{results['remix_over_softmax_topk']:.2f} (M = {args.samples} forward/backward passes per example)")
    results["config"] = {"base": args.base, "batch_size": args.batch_size, "samples": args.samples,
                         "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
