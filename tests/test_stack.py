"""Serving mode: a stack of adapters routed per token must equal each adapter run alone."""

import contextlib

import pytest
import torch
import torch.nn as nn

from remix.config import MixtureConfig
from remix.layer import ReMixLinear
from remix.stack import RoutingContext, StackedLinear, set_context


def make(adapters=3, d_in=32, d_out=48, device="cpu"):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out).to(device)
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


def test_mixed_batch_equals_each_adapter_alone(device):
    base, singles, stacked = make(device=device)
    T = 40
    x = torch.randn(T, 32, device=device)
    slots = (torch.arange(T) % 4 - 1).to(device)  # -1 (bare base), 0, 1, 2 interleaved
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


def test_selections_match_alone(device):
    base, singles, stacked = make(device=device)
    x = torch.randn(12, 32, device=device)
    ctx = RoutingContext.build(torch.zeros(12, dtype=torch.int64, device=device), trace=True)
    with torch.inference_mode():
        set_context(ctx)
        stacked(x)
        set_context(None)
        singles[0](x)
    assert torch.equal(ctx.trace[0][3], singles[0].last_idx)


def bare(base, x):
    """The bare base layer's output as the serving path computes it: on CPU the compiled kernels' GEMM (a dot-product
    GEMM with its own rounding order: equal to ATen's linear within float32 rounding, checked here too), else ATen's."""
    from remix.kernels import cpu_ext

    out = cpu_ext.linear(x, base.weight, base.bias)
    torch.testing.assert_close(out, base(x), atol=1e-5, rtol=1e-5)
    return out


def test_no_context_or_unknown_slot_is_bare_base(device):
    base, _, stacked = make(device=device)
    x = torch.randn(5, 32, device=device)
    with torch.inference_mode():
        set_context(None)
        assert torch.equal(stacked(x), base(x))  # outside serving: the base module itself
        set_context(RoutingContext.build(torch.full((5,), 7, device=device)))
        assert torch.equal(stacked(x), bare(base, x))
        set_context(None)


def test_removed_slot_stops_applying(device):
    base, singles, stacked = make(device=device)
    stacked.stack.remove(1)
    x = torch.randn(4, 32, device=device)
    with torch.inference_mode():
        set_context(RoutingContext.build(torch.ones(4, dtype=torch.int64, device=device)))
        assert torch.equal(stacked(x), bare(base, x))
        set_context(None)


def test_fused_and_compiled_paths_equal_per_slot_path(device):
    """Every serving path (torch per slot, torch fused over all pools, the compiled CPU kernel) gives each token
    the same selections and outputs, with padded ranks and global ids, counted into the same per-slot counters."""
    import remix.stack as stack_mod
    from remix.kernels import cpu_ext

    base, singles, stacked = make(device=device)
    stacked.stack.ensure_torch()
    assert stacked.stack.fused is not None and stacked.stack.fused.num_loras == 8 + 4 + 6
    # the fused torch path stacks each LoRA at its own rank (8, 4, 2): no padding in its two GEMMs
    f = stacked.stack.fused
    assert f.a.shape[0] == f.bt.shape[0] == f.pa.shape[0] - 18 == 8 * 8 + 4 * 4 + 6 * 2
    assert f.cols.tolist() == [i for i, rk in enumerate([8] * 8 + [4] * 4 + [2] * 6) for _ in range(rk)]
    T = 30
    x = torch.randn(T, 32, device=device)
    slots = (torch.arange(T) % 4 - 1).to(device)
    outs, traces, counts = [], [], []
    modes = [("per-slot", 0, True), ("fused", 10_000, True)] + ([("compiled", 128, False)] if cpu_ext.available() else [])
    for _, limit, torch_path in modes:
        stack_mod.FUSED_MAX_TOKENS = limit
        ctx = RoutingContext.build(slots, trace=True)
        before = [stacked.stack.slots[s].counts.clone() for s in range(3)]
        with torch.inference_mode(), (cpu_ext.disabled() if torch_path else contextlib.nullcontext()):
            set_context(ctx)
            outs.append(stacked(x))
            set_context(None)
        traces.append({(e[1]): e[3] for e in ctx.trace})
        counts.append([stacked.stack.slots[s].counts - before[s] for s in range(3)])
    stack_mod.FUSED_MAX_TOKENS = 128
    if cpu_ext.available():  # ranks 8, 4 and 2 padded to 8: the kernel is given each LoRA's own, and skips the rest
        assert stacked.stack.cpu.ranks.tolist() == [8] * 8 + [4] * 4 + [2] * 6
        assert make(adapters=1)[2].stack.cpu.ranks is None  # one rank: nothing padded
    for i in range(1, len(modes)):
        torch.testing.assert_close(outs[0], outs[i], atol=1e-5, rtol=1e-5)
        for s in (0, 1, 2):
            assert torch.equal(traces[0][s], traces[i][s]), (modes[i][0], s)
            assert torch.equal(counts[0][s], counts[i][s]), (modes[i][0], s)


def test_counts_survive_loading_and_unloading_other_adapters(device):
    base, singles, stacked = make(device=device)
    x = torch.randn(6, 32, device=device)
    with torch.inference_mode():
        set_context(RoutingContext.build(torch.zeros(6, dtype=torch.int64, device=device)))
        stacked(x)
        set_context(None)
    assert int(stacked.stack.slots[0].counts.sum()) == 6 * singles[0].k
    stacked.stack.remove(1)
    stacked.stack.add(5, singles[1].lora_A, singles[1].lora_B, singles[1].router, singles[1].k, singles[1].omega)
    assert int(stacked.stack.slots[0].counts.sum()) == 6 * singles[0].k
    assert int(stacked.stack.slots[5].counts.sum()) == 0


def test_bfloat16_activations_close_to_float32():
    """A bfloat16 base: routing still on float32 logits (same selections), the delta added with one rounding."""
    from remix.kernels import cpu_ext

    if not cpu_ext.available():
        pytest.skip("the compiled CPU kernel is not built here (the torch path stores pools in the model's dtype)")
    base, singles, stacked = make(adapters=2)
    x = torch.randn(16, 32)
    slots = torch.arange(16) % 2
    with torch.inference_mode():
        set_context(RoutingContext.build(slots, trace=True))
        want = stacked(x)
        stacked.base.to(torch.bfloat16)
        ctx = RoutingContext.build(slots, trace=True)
        set_context(ctx)
        got = stacked(x.to(torch.bfloat16))
        set_context(None)
        stacked.base.float()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.03)


def test_fused_path_in_bfloat16_routes_on_float32_logits(device):
    """A bfloat16 model: the fused torch path over a mixed batch (CUDA's, and what a CUDA graph captures: ungrouped
    context) gives each token the selections its adapter's own per-slot path gives it alone, both routing on float32
    logits, and outputs within bfloat16 rounding."""
    from remix.kernels import cpu_ext

    torch.manual_seed(0)
    base = nn.Linear(32, 48).to(device=device, dtype=torch.bfloat16)
    stacked = StackedLinear(base, name="m")
    for slot, (n, k, r) in enumerate([(8, 2, 8), (4, 1, 4), (6, 3, 2)]):
        A, B, router = torch.randn(n, r, 32) * 0.3, torch.randn(n, 48, r), torch.randn(n, 32)
        stacked.stack.add(slot, A.to(device), B.to(device), router.to(device), k, 0.5, dtype=torch.bfloat16)
    x = torch.randn(30, 32, device=device).to(torch.bfloat16)
    slots = (torch.arange(30) % 4 - 1).to(device)
    with torch.inference_mode(), cpu_ext.disabled():
        set_context(RoutingContext.ungrouped(slots))
        mixed = stacked(x)
        mixed_counts = stacked.stack.counts.clone()
        alone = stacked.base(x)
        for s in (0, 1, 2):  # one adapter's tokens alone: not mixed, so its own per-slot path
            rows = (slots == s).nonzero().squeeze(1)
            set_context(RoutingContext.build(torch.full((rows.numel(),), s, device=device)))
            alone[rows] = stacked(x[rows])
        set_context(None)
    assert stacked.stack.fused.router32 is not None and stacked.stack.fused.router32.dtype == torch.float32
    per_lora = stacked.stack.counts[:-1] - mixed_counts[:-1]
    assert torch.equal(mixed_counts[:-1], per_lora)  # the same selections, counted per LoRA
    # the spare counter took the unused ranks (kmax = 3): 8 bare tokens x 3, then 8 x (3-2), 7 x (3-1), 7 x (3-3)
    assert int(mixed_counts[-1]) == 8 * 3 + 8 * 1 + 7 * 2 + 7 * 0
    torch.testing.assert_close(mixed.float(), alone.float(), atol=0.06, rtol=0.02)


def test_compiled_call_follows_the_base_and_its_hooks():
    """The serving layer's bound C++ call sees an in-place change or a replacement of the base weight and steps aside
    for a base hook."""
    from remix.kernels import cpu_ext

    base, singles, stacked = make(adapters=2)
    x = torch.randn(6, 32)
    ctx = RoutingContext.build(torch.tensor([0, 1, -1, 0, 1, 0]))

    def run(module, disabled=False):
        set_context(ctx)
        try:
            with torch.no_grad(), (cpu_ext.disabled() if disabled else contextlib.nullcontext()):
                return module(x)
        finally:
            set_context(None)

    torch.testing.assert_close(run(stacked), run(stacked, disabled=True), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        base.weight.add_(1.0)
    torch.testing.assert_close(run(stacked), run(stacked, disabled=True), atol=1e-5, rtol=1e-5)
    base.weight = nn.Parameter(base.weight.detach() * 2, requires_grad=False)  # a new tensor the old call cannot see
    torch.testing.assert_close(run(stacked), run(stacked, disabled=True), atol=1e-5, rtol=1e-5)
    seen = []
    handle = base.register_forward_hook(lambda module, inputs, output: seen.append(1))
    torch.testing.assert_close(run(stacked), run(stacked, disabled=True), atol=1e-5, rtol=1e-5)
    handle.remove()
    assert len(seen) == 2


@pytest.mark.parametrize("T", [1, 9, 40, 70])  # below 64 rows the threads split the pools, from 64 the tokens
def test_bfloat16_base_rows_of_a_mixed_batch_are_the_plain_gemm(T):
    """On the compiled CPU path in bfloat16, a bare-base token (slot -1) of a mixed batch, or a batch of nothing but
    such tokens, gets exactly the base GEMM's output (the kernel leaves its row alone: no float32 round trip, no
    routing), and an adapter token still gets what it gets alone."""
    from remix.kernels import cpu_ext

    if cpu_ext.load() is None:
        pytest.skip("no compiled CPU kernels here")
    torch.manual_seed(1)
    base = nn.Linear(64, 96, bias=True).to(torch.bfloat16)
    stacked = StackedLinear(base, name="m")
    for slot in range(2):
        layer = ReMixLinear(nn.Linear(64, 96), MixtureConfig(n=8, k=2, r=8)).eval()
        nn.init.normal_(layer.lora_B)
        stacked.stack.add(slot, layer.lora_A.detach().bfloat16(), layer.lora_B.detach().bfloat16(), layer.router.detach(),
                          layer.k, layer.omega, dtype=torch.bfloat16)
    x = torch.randn(T, 64).bfloat16()
    with torch.inference_mode():
        # in inference mode, as the stacked call: with grad enabled and a weight that requires it, cpu_ext.linear is
        # F.linear (oneDNN), whose bfloat16 sums on an AVX512-BF16 CPU without AMX (Zen 5) round differently by an ulp
        plain = cpu_ext.linear(x, base.weight, base.bias)
        for slots in (torch.full((T,), -1), torch.arange(T) % 3 - 1):
            try:
                set_context(RoutingContext.build(slots))
                y = stacked(x)
                alone = []
                for t in range(T):
                    set_context(RoutingContext.build(slots[t : t + 1]))
                    alone.append(stacked(x[t : t + 1]) if int(slots[t]) >= 0 else None)
            finally:
                set_context(None)
            bare = slots < 0
            assert torch.equal(y[bare], plain[bare])
            for t in range(T):
                if alone[t] is not None:
                    assert torch.equal(y[t : t + 1], alone[t])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_load_or_unload_moves_at_most_one_pool_and_equals_a_fresh_stack(dtype):
    """The compiled path's stack after adds and removes is the stack built afresh from the same slots in the same order,
    bit for bit, and the kernel gives every token the same output from both. A load converts and writes only its own
    pool, into room the slab keeps; an unload moves the last pool into the gap where it has as many LoRAs, else closes
    up the pools after it; a new adapter of a larger rank (more padding for all) converts every pool again, as does
    the unload of the only one of the largest rank. Room runs out -> twice as much; 3/4 of it unused -> half."""
    from remix.kernels import cpu_ext
    from remix.stack import PoolStack

    if cpu_ext.load() is None:
        pytest.skip("the compiled CPU kernels are not built here")
    g = torch.Generator().manual_seed(0)
    d, o = 24, 16

    def pool(n, r):
        return (torch.randn(n, r, d, generator=g), torch.randn(n, o, r, generator=g), torch.randn(n, d, generator=g))

    pools = {0: (pool(4, 4), 2), 1: (pool(6, 2), 3), 2: (pool(4, 4), 1), 3: (pool(3, 4), 2), 4: (pool(2, 8), 1),
             5: (pool(4, 2), 2)}

    def fresh(order):
        stack = PoolStack()
        for s in order:
            (A, B, router), k = pools[s]
            stack.add(s, A, B, router, k, 0.5, dtype=dtype)
        return stack

    def same(a, b):
        assert a.r == b.r and a.kmax == b.kmax and a.offsets == b.offsets and a.layout == b.layout
        for x, y in [(a.router, b.router), (a.a, b.a), (a.bt, b.bt), *zip(a.tables, b.tables)]:
            assert x.dtype == y.dtype and torch.equal(x, y)
        assert (a.ranks is None) == (b.ranks is None) and (a.ranks is None or torch.equal(a.ranks, b.ranks))

    def run(stack, x, slots):
        y = torch.zeros(x.shape[0], o, dtype=x.dtype)
        c = stack.cpu
        cpu_ext.load().route_gather_(x, y, c.router, c.a, c.bt, slots, *c.tables, c.r, c.kmax, cpu_ext.NONE,
                                     cpu_ext.NONE if c.ranks is None else c.ranks)
        return y

    import remix.stack as stack_module

    converted, moved = [], []
    real_flatten, real_put = stack_module.flatten_a, PoolStack._put
    stack_module.flatten_a = lambda A: converted.append(A.shape[0]) or real_flatten(A)
    PoolStack._put = staticmethod(lambda slab, off, router, a, bt: moved.append(router.shape[0])
                                  or real_put(slab, off, router, a, bt))
    x = torch.randn(40, d, generator=g).to(dtype)
    try:
        stack = PoolStack()
        steps = [  # (kind, slot, pools converted, LoRAs written, order after, room after)
            ("add", 0, 1, 4, [0], 4),
            ("add", 1, 1, 10, [0, 1], 10),  # room for 4 runs out: room for 10, slot 0 copied
            ("add", 2, 1, 14, [0, 1, 2], 20),  # twice the room
            ("remove", 0, 0, 4, [2, 1], 20),  # slot 2 (4 LoRAs, as slot 0) moves into slot 0's place
            ("add", 3, 1, 3, [2, 1, 3], 20),  # only its own pool written
            ("remove", 1, 0, 3, [2, 3], 20),  # no pool of 6 last: slot 3 closes up
            ("remove", 2, 0, 3, [3], 6),  # 3 LoRAs in room for 20: room for twice that, slot 3 copied
            ("add", 4, 2, 5, [3, 4], 5),  # rank 8: a new slab, every pool converted
            ("add", 5, 1, 9, [3, 4, 5], 10),
            ("remove", 4, 2, 7, [3, 5], 7),  # the only rank-8 pool: rank 4 again, every pool converted
            ("remove", 3, 1, 4, [5], 4),  # slot 5's rank 2 the largest left: converted again, unpadded
        ]
        for kind, s, conversions, written, order, room in steps:
            converted.clear()
            moved.clear()
            if kind == "add":
                (A, B, router), k = pools[s]
                stack.add(s, A, B, router, k, 0.5, dtype=dtype)
            else:
                stack.remove(s)
            step = (kind, s)
            assert len(converted) == conversions and sum(moved) == written, (step, converted, moved)
            assert stack.order == order and stack._slab.capacity == room, (step, stack.order, stack._slab.capacity)
            want = fresh(order)
            same(stack.cpu, want.cpu)
            slots = torch.tensor([order[t % len(order)] for t in range(x.shape[0])])
            assert torch.equal(run(stack, x, slots), run(want, x, slots)), step
        stack.remove(5)
        assert stack.cpu is None and stack._slab is None and stack.order == []
    finally:
        stack_module.flatten_a = real_flatten
        PoolStack._put = staticmethod(real_put)


def test_a_reserve_makes_room_for_that_many_loras_at_once():
    from remix.kernels import cpu_ext
    from remix.stack import PoolStack

    if cpu_ext.load() is None:
        pytest.skip("the compiled CPU kernels are not built here")
    stack = PoolStack()
    for slot in range(5):
        stack.add(slot, torch.randn(4, 2, 8), torch.randn(4, 6, 2), torch.randn(4, 8), 2, 1.0, reserve=4 * 5)
        assert stack._slab.capacity == 20  # the first load made room for all five: no slab after it was replaced
    ptr = stack._slab.a.data_ptr()
    for slot in range(4):
        stack.remove(slot)
    assert stack._slab.a.data_ptr() == ptr and stack.cpu.num_loras == 4  # never below the reserve
    stack.make_room(10)  # less than it has: nothing changes
    assert stack._slab.a.data_ptr() == ptr
    before = stack.cpu
    stack.make_room(40)
    assert stack._slab.capacity == 40 and torch.equal(stack.cpu.a, before.a) and torch.equal(stack.cpu.bt, before.bt)
    ptr = stack._slab.a.data_ptr()
    for slot in range(9):
        stack.add(10 + slot, torch.randn(4, 2, 8), torch.randn(4, 6, 2), torch.randn(4, 8), 2, 1.0)
    assert stack._slab.a.data_ptr() == ptr and stack.cpu.num_loras == 40
