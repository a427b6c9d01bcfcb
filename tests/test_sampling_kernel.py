"""The compiled sampling kernel (temperature, top-k, top-p, one uniform draw per row) against the sampler's plain
reference: for every draw, the token it picks is one the reference keeps, and the draw u falls in that token's
interval of the reference's cumulative distribution (in token order)."""

import pytest
import torch

from remix.kernels import cpu_ext
from server.engine import sampler
from server.engine.sampler import SamplingParams, sample, sample_reference

ext = cpu_ext.load() if cpu_ext.available() else None
needs_ext = pytest.mark.skipif(ext is None, reason="the compiled CPU kernels are not built here")


def reference_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The reference's kept probabilities (float64; 0 where dropped), as sample_reference draws from."""
    return sampler.reference_probs(row, p).double()


def reference_cdf(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    return torch.cumsum(reference_probs(row, p), 0)


def check(logits: torch.Tensor, params: list[SamplingParams], us: list[float], tol: float = 2e-6,
          allowed: torch.Tensor | None = None) -> None:
    """allowed: [b, V] bool - a grammar's tokens, given to the kernel as a bitmask and to the reference as -inf."""
    rows = list(range(logits.shape[0]))
    bits, nbits = torch.empty(0, dtype=torch.int32), 0
    if allowed is not None:
        V = logits.shape[1]
        padded = torch.zeros(len(rows), (V + 31) // 32 * 32, dtype=torch.int64)
        padded[:, :V] = allowed.long()
        words = (padded.view(len(rows), -1, 32) << torch.arange(32)).sum(-1)
        bits, nbits = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32), V
    got = ext.sample_rows(logits, torch.tensor(rows), torch.tensor([p.temperature for p in params], dtype=torch.float32),
                          torch.tensor([p.top_k for p in params]), torch.tensor([p.top_p for p in params], dtype=torch.float32),
                          torch.tensor(us, dtype=torch.float64), bits, nbits,
                          torch.tensor([p.min_p for p in params], dtype=torch.float32)).tolist()
    check_tokens(logits, params, us, got, tol, allowed)


def check_tokens(logits, params, us, got, tol=2e-6, allowed=None):
    """Each drawn token is one the reference keeps, and its interval of the reference's CDF holds the draw."""
    for r, (t, p, u) in enumerate(zip(got, params, us)):
        row = logits[r].float()
        if allowed is not None:
            row = row.masked_fill(~allowed[r], float("-inf"))
        probs = reference_probs(row, p)
        cdf = torch.cumsum(probs, 0)
        goal, lo, hi = u * float(cdf[-1]), float(cdf[t - 1]) if t > 0 else 0.0, float(cdf[t])
        total = float(cdf[-1])
        assert probs[t] > 0, (r, t, "a token the reference drops")
        assert lo - tol * total <= goal <= hi + tol * total, (r, t, lo, goal, hi)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [5, 17, 1000, 49152])
def test_kernel_draws_from_the_reference_distribution(dtype, V):
    g = torch.Generator().manual_seed(V)
    settings = [SamplingParams(max_tokens=1, temperature=t, top_k=k, top_p=q)
                for t in (0.3, 1.0, 1.7) for k in (0, 1, 3, 50, 2000) for q in (1.0, 0.9, 0.5, 0.05)]
    scales = [0.5, 3.0, 12.0]  # flat to peaked
    logits = torch.stack([torch.randn(V, generator=g) * scales[i % 3] for i in range(len(settings))]).to(dtype)
    for _ in range(6):
        us = torch.rand(len(settings), generator=g, dtype=torch.float64).tolist()
        check(logits, settings, us)
    check(logits, settings, [0.0] * len(settings))  # the ends of the interval
    check(logits, settings, [1.0 - 1e-12] * len(settings))


@needs_ext
@pytest.mark.parametrize("V", [23, 49152])
def test_min_p_drops_what_the_reference_drops(V):
    """min_p (vLLM's and HF's: after top-k / top-p, tokens below min_p times the top token's probability dropped)."""
    g = torch.Generator().manual_seed(V + 2)
    settings = [SamplingParams(max_tokens=1, temperature=t, top_k=k, top_p=q, min_p=mp)
                for t in (0.5, 1.2) for k in (0, 10) for q in (1.0, 0.7) for mp in (0.01, 0.2, 0.9)]
    logits = torch.randn(len(settings), V, generator=g) * torch.tensor([0.5, 3.0, 8.0] * 8).view(-1, 1)
    for _ in range(5):
        check(logits, settings, torch.rand(len(settings), generator=g, dtype=torch.float64).tolist())
    # a row with one clear favourite and min_p 0.5: only tokens at least half as likely survive
    row = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = SamplingParams(max_tokens=1, temperature=1.0, min_p=0.5)
    assert [sample_reference(row, p, u) for u in (0.0, 0.6, 0.99)] == [0, 0, 1]  # kept: 0.5 and 0.3 (renormalised)


@needs_ext
@pytest.mark.parametrize("V", [40, 49152])
def test_a_grammar_bitmask_is_applied_inside_the_kernel(V):
    g = torch.Generator().manual_seed(V + 1)
    settings = [SamplingParams(max_tokens=1, temperature=t, top_k=k, top_p=q)
                for t in (0.5, 1.0) for k in (0, 5) for q in (1.0, 0.8)]
    logits = (torch.randn(len(settings), V, generator=g) * 3).to(torch.bfloat16)
    allowed = torch.rand(len(settings), V, generator=g) < torch.tensor([0.5, 0.02, 0.9, 0.3] * 2).view(-1, 1)
    allowed[:, 7] = True  # (never empty)
    for _ in range(5):
        check(logits, settings, torch.rand(len(settings), generator=g, dtype=torch.float64).tolist(), allowed=allowed)


@needs_ext
def test_ties_and_infinities_follow_the_reference():
    """Tied values across the top-k / top-p cut (kept, as the reference keeps ties at the k-th value; top-p's cut in
    token order among equals) and -inf logits (never drawn)."""
    V = 64
    row = torch.zeros(V)
    row[[3, 9, 10, 40]] = 2.0  # four tied maxima
    row[[50, 51]] = float("-inf")
    settings = [SamplingParams(max_tokens=1, temperature=1.0, top_k=k, top_p=q) for k in (0, 2, 4, 5) for q in (1.0, 0.2, 0.3)]
    logits = row.expand(len(settings), V).contiguous()
    for u in (0.0, 0.1, 0.37, 0.5, 0.81, 0.999):
        check(logits, settings, [u] * len(settings))
    # NaN or all -inf: the argmax (as the greedy path)
    bad = torch.stack([torch.tensor([0.0, float("nan"), 1.0]), torch.full((3,), float("-inf"))])
    p = SamplingParams(max_tokens=1, temperature=1.0)
    got = ext.sample_rows(bad, torch.tensor([0, 1]), torch.ones(2), torch.zeros(2, dtype=torch.long),
                          torch.ones(2), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert got.tolist() == [1, 0] and p.top_p == 1.0


@needs_ext
def test_frequencies_match_the_probabilities():
    """20,000 draws of a 6-token row at top_p 0.9: each token's frequency within 0.012 of its renormalised
    probability (binomial standard error at most ~0.0035), the dropped token never."""
    row = torch.log(torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
    p = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9)  # mass before the 5th: 0.9 -> dropped (0.06, 0.04)
    g = torch.Generator().manual_seed(0)
    n = 20_000
    us = torch.rand(n, generator=g, dtype=torch.float64)
    got = ext.sample_rows(row.expand(n, 6).contiguous(), torch.arange(n), torch.ones(n), torch.zeros(n, dtype=torch.long),
                          torch.full((n,), 0.9), us)
    freq = torch.bincount(got, minlength=6).double() / n
    want = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.0, 0.0]) / 0.9
    assert (freq - want).abs().max() < 0.012, freq
    assert sample_reference(row, p, 0.95) == 3  # the reference agrees on the cut


@needs_ext
def test_sampler_uses_the_kernel_and_stays_seeded_per_row():
    """sample(): plain sampled rows go through the kernel together, adjusted ones one by one; a seeded row draws
    the same token whatever shares the batch."""
    V = 300
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, V, generator=g) * 2
    params = [SamplingParams(max_tokens=1, temperature=0.8, top_p=0.9, seed=1),
              SamplingParams(max_tokens=1, temperature=0.0),
              SamplingParams(max_tokens=1, temperature=1.2, top_k=20, seed=2),
              SamplingParams(max_tokens=1, temperature=0.8, top_p=0.9, seed=1)]
    gens = [torch.Generator().manual_seed(9), None, torch.Generator().manual_seed(3), torch.Generator().manual_seed(9)]
    batch = sample(logits, params, gens).tolist()
    alone = sample(logits[:1], params[:1], [torch.Generator().manual_seed(9)]).tolist()
    assert batch[0] == alone[0] and batch[1] == int(logits[1].argmax())
    for i, seed in ((0, 9), (2, 3), (3, 9)):  # each row's token: the kernel's for the first draw of its own generator
        u = torch.rand((), generator=torch.Generator().manual_seed(seed)).item()
        check(logits[i:i + 1], [params[i]], [u])
        want = ext.sample_rows(logits, torch.tensor([i]), torch.tensor([params[i].temperature]),
                               torch.tensor([params[i].top_k]), torch.tensor([params[i].top_p]),
                               torch.tensor([u], dtype=torch.float64))
        assert batch[i] == int(want[0])
    # a row that adjusts its logits (a presence penalty on its output tokens) is drawn on its own, by the same kernel
    from server.engine.sampler import TokenHistory

    pen = SamplingParams(max_tokens=1, temperature=0.8, top_p=0.9, presence_penalty=1.0)
    got = sample(logits[:1], [pen], [torch.Generator().manual_seed(4)], [TokenHistory([1, 2]).update([7, 7, 9])])
    adjusted = logits[0].clone()
    adjusted[[7, 9]] -= 1.0
    u = torch.rand((), generator=torch.Generator().manual_seed(4)).item()
    check(adjusted.view(1, -1), [pen], [u])
    want = ext.sample_rows(adjusted.view(1, -1), torch.tensor([0]), torch.tensor([0.8]), torch.tensor([0]),
                           torch.tensor([0.9]), torch.tensor([u], dtype=torch.float64))
    assert int(got[0]) == int(want[0])


def test_batched_torch_path_draws_from_the_reference_distribution(monkeypatch):
    """Without the compiled kernel (CUDA, or no compiler) sampled rows are drawn together in batched torch ops
    (sample_torch), from the reference's distribution; sample() takes that path then, penalised rows included."""
    from server.engine.sampler import TokenHistory, sample_torch

    g = torch.Generator().manual_seed(11)
    V = 3000
    settings = [SamplingParams(max_tokens=1, temperature=t, top_k=k, top_p=q, min_p=mp)
                for t in (0.5, 1.3) for k in (0, 20) for q in (1.0, 0.8) for mp in (0.0, 0.1)]
    logits = torch.randn(len(settings), V, generator=g) * torch.tensor([0.5, 3.0, 8.0, 2.0] * 4).view(-1, 1)
    for _ in range(4):
        us = torch.rand(len(settings), generator=g, dtype=torch.float64).tolist()
        check_tokens(logits, settings, us, sample_torch(logits, settings, us).tolist())
    monkeypatch.setattr(sampler.cpu_ext, "for_input", lambda x: None)
    params = [settings[3], SamplingParams(max_tokens=1, temperature=0.9, top_p=0.9, presence_penalty=1.0, seed=4)]
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    got = sample(logits[:2], params, gens, [TokenHistory([1]), TokenHistory([1]).update([5, 6])]).tolist()
    adjusted = logits[1].clone()
    adjusted[[5, 6]] -= 1.0
    us = [torch.rand((), generator=torch.Generator().manual_seed(s)).item() for s in (1, 2)]
    check_tokens(torch.stack([logits[0], adjusted]), params, us, got)
