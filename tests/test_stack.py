"""Serving mode: a stack of adapters routed per token must equal each adapter run alone."""

import torch
import torch.nn as nn

from remix.config import MixtureConfig
from remix.layer import ReMixLinear
from remix.stack import RoutingContext, StackedLinear, set_context


def make(adapters=3, d_in=32, d_out=48):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    configs = [MixtureConfig(n=8, k=2, r=8), MixtureConfig(n=4, k=1, r=4), MixtureConfig(n=6, k=3, r=2, omega="rslora")]
    singles = []
    stacked = StackedLinear(base, name="m")
    for slot, cfg in enumerate(configs[:adapters]):
        layer = ReMixLinear(base, cfg).eval()
        nn.init.normal_(layer.lora_B)
        layer.requires_grad_(False)
        singles.append(layer)
        stacked.stack.add(slot, layer.lora_A, layer.lora_B, layer.router, layer.k, layer.omega)
    return base, singles, stacked


def test_mixed_batch_equals_each_adapter_alone():
    base, singles, stacked = make()
    T = 40
    x = torch.randn(T, 32)
    slots = torch.arange(T) % 4 - 1  # -1 (bare base), 0, 1, 2 interleaved
    ctx = RoutingContext.build(slots, trace=True)
    with torch.inference_mode():
        set_context(ctx)
        y = stacked(x)
        set_context(None)
        for t in range(T):
            s = int(slots[t])
            want = base(x[t : t + 1]) if s < 0 else singles[s](x[t : t + 1])
            torch.testing.assert_close(y[t : t + 1], want, atol=1e-5, rtol=1e-5)
    # every token of an adapter was counted k times, in that adapter's own counters
    for s, layer in enumerate(singles):
        assert int(stacked.stack.slots[s].counts.sum()) == int((slots == s).sum()) * layer.k
    assert {entry[1] for entry in ctx.trace} == {0, 1, 2}


def test_selections_match_alone():
    base, singles, stacked = make()
    x = torch.randn(12, 32)
    ctx = RoutingContext.build(torch.zeros(12, dtype=torch.int64), trace=True)
    with torch.inference_mode():
        set_context(ctx)
        stacked(x)
        set_context(None)
        singles[0](x)
    assert torch.equal(ctx.trace[0][3], singles[0].last_idx)


def test_no_context_or_unknown_slot_is_bare_base():
    base, _, stacked = make()
    x = torch.randn(5, 32)
    with torch.inference_mode():
        set_context(None)
        assert torch.equal(stacked(x), base(x))
        set_context(RoutingContext.build(torch.full((5,), 7)))
        assert torch.equal(stacked(x), base(x))
        set_context(None)


def test_removed_slot_stops_applying():
    base, singles, stacked = make()
    stacked.stack.remove(1)
    x = torch.randn(4, 32)
    with torch.inference_mode():
        set_context(RoutingContext.build(torch.ones(4, dtype=torch.int64)))
        assert torch.equal(stacked(x), base(x))
        set_context(None)


def test_fused_mixed_path_equals_per_slot_path():
    """Small mixed batches take one pass over all pools (padded ranks, global ids); it must match the per-adapter path."""
    import remix.stack as stack_mod
    from remix.kernels import topk_masked_u_multi

    base, singles, stacked = make()
    assert stacked.stack.fused is not None and stacked.stack.fused.num_loras == 8 + 4 + 6
    T = 30
    x = torch.randn(T, 32)
    slots = torch.arange(T) % 4 - 1
    outs, traces = [], []
    for limit in (0, 10_000):  # 0: always per slot; large: fused
        stack_mod.FUSED_MAX_TOKENS = limit
        ctx = RoutingContext.build(slots, trace=True)
        with torch.inference_mode():
            set_context(ctx)
            outs.append(stacked(x))
            set_context(None)
        traces.append({(e[1]): e[3] for e in ctx.trace})
    stack_mod.FUSED_MAX_TOKENS = 128
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for s in (0, 1, 2):
        assert torch.equal(traces[0][s], traces[1][s])
    f = stacked.stack.fused
    pu = torch.randn(T, f.num_loras * 9)[:, : f.num_loras + f.num_loras * 8]
    from remix.kernels import cpu_ext

    if cpu_ext.available():  # the compiled op against the torch loop
        import remix.kernels.torch_ops as ops

        got_um, got_idx = topk_masked_u_multi(pu.contiguous(), f.num_loras, slots, f.slot_off, f.slot_n, f.slot_k,
                                              f.slot_omega, f.kmax)
        saved = ops._CPU_OP_MULTI[:]
        ops._CPU_OP_MULTI[:] = [None]
        try:
            ref_um, ref_idx = topk_masked_u_multi(pu.contiguous(), f.num_loras, slots, f.slot_off, f.slot_n, f.slot_k,
                                                  f.slot_omega, f.kmax)
        finally:
            ops._CPU_OP_MULTI[:] = saved
        assert torch.equal(got_idx, ref_idx)
        torch.testing.assert_close(got_um, ref_um, atol=0, rtol=0)
