import itertools

import pytest
import torch
import torch.nn.functional as F

from remix.kernels import lora_gather, lora_gather_grouped, lora_gather_reference, selection_mask

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-9),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def make_stack(ranks, n, d_in, d_out, dtype, seed=0):
    """Pools of several adapters stacked, each padded to the largest rank with zeros (DESIGN §2)."""
    g = torch.Generator().manual_seed(seed)
    r_max = max(ranks)
    A = torch.zeros(len(ranks) * n, r_max, d_in, dtype=dtype)
    B = torch.zeros(len(ranks) * n, d_out, r_max, dtype=dtype)
    for a, r in enumerate(ranks):
        A[a * n : (a + 1) * n, :r] = torch.randn(n, r, d_in, generator=g).to(dtype)
        B[a * n : (a + 1) * n, :, :r] = torch.randn(n, d_out, r, generator=g).to(dtype)
    return A, B


def make_ids(T, k, n, adapters, seed=0, none_rate=0.2):
    """Each token belongs to one adapter and picks k distinct local LoRAs; some slots are -1."""
    g = torch.Generator().manual_seed(seed)
    group = torch.randint(0, adapters, (T,), generator=g)
    local = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(T)])
    idx = local + (group * n)[:, None]
    idx[torch.rand(T, k, generator=g) < none_rate] = -1
    return idx, group


GRID = list(itertools.product([1, 7, 33], [1, 2, 3], [1, 4, 8], [4, 8], [1, 3]))


@pytest.mark.parametrize("T,k,r,n,adapters", GRID)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_matches_reference(T, k, r, n, adapters, dtype):
    d_in, d_out = 24, 40
    ranks = [r] + [max(1, r // 2)] * (adapters - 1)  # later adapters have a smaller, padded rank
    A, B = make_stack(ranks, n, d_in, d_out, dtype)
    idx, group = make_ids(T, k, n, adapters)
    g = torch.Generator().manual_seed(T * 1000 + k * 100 + r * 10 + n)  # inputs do not depend on test order
    x = torch.randn(T, d_in, generator=g).to(dtype)
    omega = torch.rand(T, generator=g) + 0.5  # one ω per token (adapters may differ)
    want = lora_gather_reference(x, A, B, idx, omega)
    # the tolerances are relative to the output's scale (outputs reach ~30 here; float32 keeps ~7 digits of that)
    tol = {"atol": TOL[dtype]["atol"] * max(1.0, float(want.abs().max())), "rtol": TOL[dtype]["rtol"]}
    torch.testing.assert_close(lora_gather(x, A, B, idx, omega), want, **tol)
    ranges = [(a * n, (a + 1) * n) for a in range(adapters)]
    torch.testing.assert_close(lora_gather_grouped(x, A, B, idx, omega, group, ranges), want, **tol)


@pytest.mark.parametrize("weight_kind", ["scalar", "per_token", "per_slot"])
def test_weight_forms(weight_kind):
    T, k, n = 9, 2, 6
    A, B = make_stack([4], n, 16, 12, torch.float32)
    idx, _ = make_ids(T, k, n, 1, none_rate=0.0)
    x = torch.randn(T, 16)
    weight = {"scalar": 0.3, "per_token": torch.rand(T), "per_slot": torch.rand(T, k)}[weight_kind]
    torch.testing.assert_close(lora_gather(x, A, B, idx, weight), lora_gather_reference(x, A, B, idx, weight))


def test_bfloat16_close_to_float32_reference():
    A, B = make_stack([8], 8, 64, 48, torch.float32)
    idx, _ = make_ids(16, 2, 8, 1)
    x = torch.randn(16, 64)
    want = lora_gather_reference(x, A, B, idx, 0.125)
    got = lora_gather(x.bfloat16(), A.bfloat16(), B.bfloat16(), idx, 0.125).float()
    torch.testing.assert_close(got, want, atol=0.15, rtol=0.05)


def test_out_is_added():
    A, B = make_stack([4], 4, 8, 8, torch.float32)
    idx, _ = make_ids(5, 2, 4, 1, none_rate=0.0)
    x, base = torch.randn(5, 8), torch.randn(5, 8)
    torch.testing.assert_close(lora_gather(x, A, B, idx, 1.0, out=base), base + lora_gather_reference(x, A, B, idx, 1.0))


def test_all_none_gives_zero():
    A, B = make_stack([4], 4, 8, 8, torch.float32)
    idx = torch.full((3, 2), -1)
    assert torch.equal(lora_gather(torch.randn(3, 8), A, B, idx, 1.0), torch.zeros(3, 8))


def test_selection_mask_adds_duplicates_and_skips_none():
    idx = torch.tensor([[0, 0], [2, -1]])
    assert selection_mask(idx, 0.5, 3).tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.5]]


def test_token_result_does_not_depend_on_batch_mates(device):
    """A token alone equals the same token inside a batch of mixed adapters (identical selections)."""
    n, k, adapters = 8, 2, 4
    A, B = (t.to(device) for t in make_stack([8, 8, 4, 2], n, 64, 96, torch.float32))
    idx, group = (t.to(device) for t in make_ids(50, k, n, adapters, none_rate=0.1))
    x = torch.randn(50, 64, device=device)
    omega = torch.full((50,), 0.125, device=device)
    ranges = [(a * n, (a + 1) * n) for a in range(adapters)]
    batch = lora_gather_grouped(x, A, B, idx, omega, group, ranges)
    dense = lora_gather(x, A, B, idx, omega)
    for t in range(50):
        s = slice(t, t + 1)
        alone = lora_gather_grouped(x[s], A, B, idx[s], omega[s], group[s], ranges)
        torch.testing.assert_close(batch[s], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dense[s], lora_gather(x[s], A, B, idx[s], omega[s]), atol=1e-5, rtol=1e-5)


def test_gradients_match_reference(device):
    A, B = (t.to(device) for t in make_stack([4], 4, 8, 6, torch.float64))
    idx, _ = make_ids(6, 2, 4, 1, none_rate=0.2)
    idx = idx.to(device)
    x = torch.randn(6, 8, dtype=torch.float64, device=device)
    grads = []
    for fn in (lora_gather, lora_gather_reference):
        a, b = A.clone().requires_grad_(), B.clone().requires_grad_()
        (fn(x, a, b, idx, 0.5) ** 2).sum().backward()
        grads.append((a.grad, b.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    A, B = make_stack([8, 4], 8, 64, 96, torch.float32)
    idx, group = make_ids(40, 2, 8, 2)
    x = torch.randn(40, 64)
    want = lora_gather_reference(x, A, B, idx, 0.125)
    got = lora_gather(x.cuda().to(dtype), A.cuda().to(dtype), B.cuda().to(dtype), idx.cuda(), 0.125)
    torch.testing.assert_close(got.float().cpu(), want, **({"atol": 0.15, "rtol": 0.05} if dtype == torch.bfloat16 else TOL[dtype]))


def _compiled():
    from remix.kernels import cpu_ext

    if not cpu_ext.available():
        pytest.skip("the compiled CPU kernels are not built here")
    return cpu_ext.load()


@pytest.mark.parametrize("pools", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,k,r,n,adapters", GRID)
def test_compiled_gather_matches_reference(T, k, r, n, adapters, pools):
    """The C++ gather (blocked by LoRA, SIMD) against the plain loop: -1 ids, padded ranks, per-pair weights.
    bfloat16 pools (a bfloat16 model's) are widened as they are read, every sum in float32: the reference runs in
    float32 on the same bfloat16-rounded A and B, so the tolerance is float32's either way."""
    ext = _compiled()
    d_in, d_out = 40, 72  # not multiples of the 16 SIMD lanes: the tails run too
    ranks = [r] + [max(1, r // 2)] * (adapters - 1)
    A, B = make_stack(ranks, n, d_in, d_out, torch.float32, seed=T * 31 + k)
    A, B = A.to(pools).float(), B.to(pools).float()  # the values the kernel sees
    idx, _ = make_ids(T, k, n, adapters, seed=T + r)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(T, d_in, generator=g)
    w = torch.rand(T, k, generator=g)
    base = torch.randn(T, d_out, generator=g)
    want = base + lora_gather_reference(x, A, B, idx, w)
    got = ext.gather_(x, base.clone(), A.reshape(-1, d_in).to(pools).contiguous(),
                      B.transpose(1, 2).reshape(-1, d_out).to(pools).contiguous(), idx, w, max(ranks))
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize("T,n,k,r", [(1, 8, 2, 8), (33, 8, 2, 8), (300, 6, 3, 4), (5, 1, 1, 2), (7, 64, 4, 1)])
def test_compiled_route_gather_matches_torch_path(T, n, k, r):
    """Routing inside the kernel: float32 logits, top-k with ties to the lower index, constant weight ω."""
    from remix import routing

    ext = _compiled()
    D, O = 48, 80
    g = torch.Generator().manual_seed(T * n)
    P, A, B = torch.randn(n, D, generator=g), torch.randn(n, r, D, generator=g), torch.randn(n, O, r, generator=g)
    x = torch.randn(T, D, generator=g)
    if n > 1:
        P[1] = P[0]  # a tie between LoRAs 0 and 1 for every token: 0 must come first
    y0 = torch.randn(T, O, generator=g)
    tables = (torch.zeros(1, dtype=torch.int64), torch.tensor([n]), torch.tensor([k]), torch.tensor([0.3]))
    counts = torch.zeros(n, dtype=torch.int64)
    y = y0.clone()
    idx = ext.route_gather_(x, y, P, A.reshape(n * r, D), B.transpose(1, 2).reshape(n * r, O).contiguous(),
                            torch.empty(0, dtype=torch.int64), *tables, r, k, counts)
    want_idx = routing.topk_lower_index(routing.router_logits(x, P), k)
    assert torch.equal(idx, want_idx)
    for row in idx.tolist():
        if 1 in row:
            assert 0 in row and row.index(0) < row.index(1)
    assert torch.equal(counts, torch.bincount(idx.flatten(), minlength=n))
    want = y0 + lora_gather_reference(x, A, B, idx, 0.3)
    torch.testing.assert_close(y, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5)


@pytest.mark.parametrize("dtype,pools", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                         (torch.bfloat16, torch.bfloat16)])
def test_compiled_token_result_is_bit_identical_in_any_batch(dtype, pools):
    """The kernel's sums run in the same order for a token whoever shares the call: exact equality, alone, in a small
    batch (threads split the pools' reads), in a large one (threads split the tokens) and on one thread. A token share
    is routed and gathered 64 tokens an adapter at a time (bfloat16 with bfloat16 pools: x read as it is, widened in
    registers, at every size; with float32 pools from a float32 copy of x; below 64 tokens of two or more adapters
    each thread computes the logits of a share of the routers' rows for every token, on or off here): 300 tokens of
    two adapters are tiles of 128 + 22 per thread on two threads and 128 + 128 + 44 on one, and one adapter's 109
    tokens alone tiles of 64 + 45 on one thread (float32; bfloat16 tiles are 256 tokens an adapter: see the test of
    them), so a token off its tile's first row must be read from the right row, and its sums must not depend on its
    tile."""
    ext = _compiled()
    n, r, D, O = 8, 8, 64, 200  # O: two-vector slices, a one-vector slice and a scalar tail
    g = torch.Generator().manual_seed(3)
    P, a, bt = torch.randn(2 * n, D, generator=g), torch.randn(2 * n * r, D, generator=g), torch.randn(2 * n * r, O, generator=g)
    a, bt = a.to(pools), bt.to(pools)
    tables = (torch.tensor([0, n]), torch.tensor([n, n]), torch.tensor([2, 3]), torch.tensor([0.5, 0.25]))
    x = torch.randn(300, D, generator=g).to(dtype)
    slots = torch.randint(-1, 2, (300,), generator=g)
    y0 = torch.randn(300, O, generator=g).to(dtype)
    none = torch.empty(0, dtype=torch.int64)

    def run(rows):
        y = y0[rows].clone()
        return ext.route_gather_(x[rows].clone(), y, P, a, bt, slots[rows].clone(), *tables, r, 3, none), y

    idx, batch = run(slice(0, 300))  # 300 tokens: split by tokens
    one = (slots == 1).nonzero().flatten()  # one adapter's tokens alone (and in the batch above, with the other's)
    assert len(one) >= 64  # split by tokens too
    threads = torch.get_num_threads()
    try:
        for nthreads, units in itertools.product({1, max(2, threads)}, (True, False)):
            torch.set_num_threads(nthreads)
            ext._route_units(units)  # below 64 tokens of two or more adapters: the threads split the routers' rows
            for rows in (slice(0, 1), slice(17, 18), slice(299, 300), slice(10, 40), slice(0, 150), one):  # 30: split by pools
                idx_s, y_s = run(rows)
                assert torch.equal(idx_s, idx[rows]) and torch.equal(y_s, batch[rows])
    finally:
        torch.set_num_threads(threads)
        ext._route_units(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 8, 40, 130])
def test_module_call_with_nothing_to_route_is_its_base_gemm(dtype, T):
    """A module call whose tokens route nowhere (no slot, a slot past the tables, a slot with an empty pool) runs the
    plain GEMM: the same y, bit for bit, as the full call (routing stage and all) and every selection -1; a token of a
    slot with a pool among them takes the full call again."""
    from remix.kernels import cpu_ext

    ext = _compiled()
    n, r, D, O = 4, 4, 64, 96
    g = torch.Generator().manual_seed(T)
    base = torch.nn.Linear(D, O, bias=True).to(dtype)
    router, a, bt = torch.randn(n, D, generator=g), torch.randn(n * r, D, generator=g), torch.randn(n * r, O, generator=g)
    tables = (torch.tensor([0, 0]), torch.tensor([n, 0]), torch.tensor([2, 1]), torch.tensor([0.5, 0.5]))  # slot 1: empty
    call = cpu_ext.bind_module(base, router, a.to(dtype), bt.to(dtype), tables, r, 2)
    x = torch.randn(T, D, generator=g).to(dtype)
    nowhere = torch.tensor([(-1, 1, 5)[t % 3] for t in range(T)])
    none = torch.empty(0, dtype=torch.int64)
    try:
        with torch.inference_mode():
            y, idx = call.routed(x, nowhere, none)
            ext._proj_skip(False)
            y_full, idx_full = call.routed(x, nowhere, none)
            ext._proj_skip(True)
            assert torch.equal(y, y_full) and torch.equal(idx, idx_full) and bool((idx == -1).all())
            assert torch.equal(y, cpu_ext.linear(x, base.weight, base.bias))
            some = nowhere.clone()
            some[-1] = 0  # one token with a pool: routed, its row changes
            y_some, idx_some = call.routed(x, some, none)
            assert (idx_some[-1] >= 0).all() and not torch.equal(y_some[-1], y[-1])
            assert torch.equal(y_some[:-1], y[:-1])
    finally:
        ext._proj_skip(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 8, 40, 130])
def test_one_lora_slot_skips_its_routing_with_the_same_selections(dtype, T):
    """A slot of one LoRA (a plain LoRA, n = k = 1) takes its LoRA for every token without the router's dot product
    (_single_route), and a call below 64 tokens whose routed tokens all sit in such slots has no routing stage
    (_trivial_route): the selections, weights, counts and y are those of the routed call, bit for bit, in every path
    (below 64 tokens split by pools, two slots in use routed by units or by tokens, 130 tokens by token tiles; the
    module call and route_gather_), with two one-LoRA slots and tokens routed nowhere, and beside a slot of eight LoRAs
    (k 2) that routes as before. Slot 0's router row is
    NaN: its top 1 of one is still LoRA 0 (topk_token takes index 0 first), which the routed call computes too."""
    from remix.kernels import cpu_ext

    ext = _compiled()
    r, D, O = 4, 64, 96
    g = torch.Generator().manual_seed(T)
    base = torch.nn.Linear(D, O, bias=True).to(dtype)
    router = torch.randn(1 + 8 + 1, D, generator=g)
    router[0] = float("nan")
    a, bt = torch.randn(10 * r, D, generator=g).to(dtype), torch.randn(10 * r, O, generator=g).to(dtype)
    tables = (torch.tensor([0, 1, 9]), torch.tensor([1, 8, 1]), torch.tensor([1, 2, 1]), torch.tensor([2.0, 0.5, 1.5]))
    call = cpu_ext.bind_module(base, router, a, bt, tables, r, 2)
    x = torch.randn(T, D, generator=g).to(dtype)
    none = torch.empty(0, dtype=torch.int64)
    mixes = [torch.zeros(T, dtype=torch.int64), torch.tensor([(0, 2, -1)[t % 3] for t in range(T)]),
             torch.tensor([(0, 1, 2, -1)[t % 4] for t in range(T)])]
    try:
        for slots, units in itertools.product(mixes, (True, False)):
            ext._route_units(units)
            got = []
            for skip, trivial in ((True, True), (True, False), (False, False)):
                ext._single_route(skip)
                ext._trivial_route(trivial)
                counts = torch.zeros(10, dtype=torch.int64)
                with torch.inference_mode():
                    y, idx = call.routed(x, slots, counts)
                y2 = torch.zeros(T, O, dtype=dtype)
                idx2 = ext.route_gather_(x.clone(), y2, router, a, bt, slots, *tables, r, 2, none)
                got.append((y, idx, counts, y2, idx2))
            for other in got[1:]:
                assert all(torch.equal(u, v) for u, v in zip(got[0], other))
            y, idx = got[0][:2]
            single = (slots == 0) | (slots == 2)
            assert torch.equal(idx[single, 0], torch.where(slots[single] == 0, 0, 9)) and bool((idx[single, 1] == -1).all())
            assert bool((idx[slots == 1] >= 1).all() & (idx[slots == 1] <= 8).all())
            assert bool(torch.isfinite(y.float()).all())
    finally:
        ext._single_route(True)
        ext._trivial_route(True)
        ext._route_units(True)


def test_pool_prefetch_defaults_follow_the_cpu_vendor():
    """The pools' software prefetches - the decode stack's Ahead (from 16 rows), a small call's own B^T rows, float32
    phase B by chunks of 160 outputs (AVX-512 builds) - are on by default where _pool_prefetch_pays() (not an Intel CPU:
    each measured slower on the Intel VMs) and off where not; each switch hands back what it found."""
    from pathlib import Path

    ext = _compiled()
    pays = ext._pool_prefetch_pays()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        assert pays == ("GenuineIntel" not in cpuinfo.read_text())
    ahead, own, chunk = ext._ahead_from(0, 0.0), ext._own_bt(False, 0.75), ext._chunk_b(0, 24)
    try:
        assert ahead == ((16 if pays else 0), 0.0)
        assert own == (pays, 0.75)
        assert chunk == ((160 if pays and ext.AVX512 else 0), 24)  # (no chunks in builds without AVX-512)
    finally:
        ext._ahead_from(*ahead)
        ext._own_bt(*own)
        ext._chunk_b(*chunk)
    assert ext._ahead_from(*ahead) == ahead and ext._own_bt(*own) == own  # (the settings found are back)


def test_module_clock_times_each_stage_only_when_on_and_changes_no_value():
    """cpu_ext.module_clock (scripts/module_stages.py): off, the compiled module calls record nothing; on, each call of a
    routed batch is counted and each thread's stages of run() are timed - below 64 rows the split stages (routing,
    phase A, the fused base GEMM, phase B, the barriers), from 64 the token tiles' - and reading resets; the outputs
    are the same bit for bit either way."""
    from remix.kernels import cpu_ext

    _compiled()
    D, O, n, r = 64, 96, 8, 8
    g = torch.Generator().manual_seed(3)
    base = torch.nn.Linear(D, O, bias=False)
    router = torch.randn(n, D, generator=g)
    a, bt = torch.randn(n * r, D, generator=g) * 0.1, torch.randn(n * r, O, generator=g) * 0.1
    tables = (torch.tensor([0]), torch.tensor([n]), torch.tensor([2]), torch.tensor([0.5]))
    call = cpu_ext.bind_module(base, router, a, bt, tables, r, 2)
    none = torch.empty(0, dtype=torch.int64)
    with torch.inference_mode():
        for T in (8, 100):
            x = torch.randn(T, D, generator=g)
            slots = torch.zeros(T, dtype=torch.int64)
            cpu_ext.module_clock(False)
            y_off = call.routed(x, slots, none)[0].clone()
            assert cpu_ext.module_clock(True) == ([], 0)  # nothing recorded while off
            y_on = call.routed(x, slots, none)[0].clone()
            call.routed(x, slots, none)
            call.routed(x, torch.full((T,), -1, dtype=torch.int64), none)  # no token routed: the base linear alone
            threads, calls = cpu_ext.module_clock(False)
            assert torch.equal(y_on, y_off)
            assert calls == 2 and 1 <= len(threads) <= torch.get_num_threads()
            assert all(set(t) == set(cpu_ext.MODULE_STAGES) and all(v >= 0 for v in t.values()) for t in threads)
            # every thread routed or gathered something; below 64 rows the base GEMM runs in the same region (float32)
            assert all(t["route"] > 0 and t["phase_b"] > 0 for t in threads)
            if T < 64:
                assert all(t["phase_a"] > 0 and t["gemm"] > 0 for t in threads)
            assert cpu_ext.module_clock(False) == ([], 0)  # read and reset


@pytest.mark.parametrize("T", [1, 16, 24, 33, 63])
def test_phase_b_by_chunks_changes_no_value(T):
    """float32 calls of 24-63 rows (AVX-512 builds) take each thread's slice of the outputs in chunks: the chunk's GEMM,
    then its phase B (_chunk_b). y, the selections and the counts are those of the whole slice's GEMM then phase B, bit
    for bit, with chunks of 160 / 128 / 32 outputs (O 200 and 1000: slices of one chunk, of several, a last chunk short), from
    1 row, one adapter or two mixed with tokens routed nowhere, and a bias."""
    from remix.kernels import cpu_ext

    ext = _compiled()
    n, r = 8, 8
    for D, O in ((64, 200), (96, 1000)):
        g = torch.Generator().manual_seed(T * 7 + O)
        base = torch.nn.Linear(D, O, bias=True)
        router = torch.randn(2 * n, D, generator=g)
        a, bt = torch.randn(2 * n * r, D, generator=g), torch.randn(2 * n * r, O, generator=g)
        tables = (torch.tensor([0, n]), torch.tensor([n, n]), torch.tensor([2, 2]), torch.tensor([0.5, 2.0]))
        call = cpu_ext.bind_module(base, router, a, bt, tables, r, 2)
        x = torch.randn(T, D, generator=g)
        for slots in (torch.zeros(T, dtype=torch.int64), torch.tensor([(0, 1, -1)[t % 3] for t in range(T)])):
            got, was = [], ext._chunk_b(0, 24)
            try:
                for cols, start in ((0, 24), (160, 1), (128, 1), (32, 1)):
                    ext._chunk_b(cols, start)
                    counts = torch.zeros(2 * n, dtype=torch.int64)
                    with torch.inference_mode():
                        y, idx = call.routed(x, slots, counts)
                    got.append((y, idx, counts))
            finally:
                ext._chunk_b(*was)
            for other in got[1:]:
                assert all(torch.equal(u, v) for u, v in zip(got[0], other))
            assert not torch.equal(got[0][0], cpu_ext.linear(x, base.weight, base.bias))  # the LoRAs did add


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 8, 40, 130])
def test_module_call_on_raw_pointers_is_the_checked_call(dtype, T):
    """ModuleCall's call on the bound tensors' raw pointers (no tensor header read, no handle copied, no reshape) gives
    what the checked path (linear_route_gather) gives, bit for bit: y, the selections and the counts they add, for
    x [T, D] and [T, 1, D], one slot or mixed slots (none, past the tables, an empty pool, two adapters), with and
    without counts, in batch-invariant mode too (130 rows then take the fused GEMM); and where it does not apply
    (x not contiguous, x of another dtype than the weight, counts of the wrong length) it leaves the call to the
    checked path, which answers or raises as before."""
    from remix.kernels import cpu_ext

    ext = _compiled()
    n, r, D, O = 4, 4, 64, 96
    g = torch.Generator().manual_seed(T)
    base = torch.nn.Linear(D, O, bias=True).to(dtype)
    router = torch.randn(2 * n, D, generator=g)
    a, bt = torch.randn(2 * n * r, D, generator=g).to(dtype), torch.randn(2 * n * r, O, generator=g).to(dtype)
    tables = (torch.tensor([0, n, 0]), torch.tensor([n, n, 0]), torch.tensor([2, 1, 1]), torch.tensor([0.5, 2.0, 1.0]))
    call = cpu_ext.bind_module(base, router, a, bt, tables, r, 2)
    x = torch.randn(T, D, generator=g).to(dtype)
    mixed = torch.tensor([(0, 1, -1, 2, 7, 1, 0)[t % 7] for t in range(T)])
    none = torch.empty(0, dtype=torch.int64)

    def both(xx, slots, with_counts):
        out = []
        for raw in (False, True):
            ext._module_call_raw(raw)
            counts = torch.zeros(2 * n, dtype=torch.int64) if with_counts else none
            y, idx = call.routed(xx, slots, counts)
            out.append((y.clone(), idx.clone(), counts.clone()))
        (y0, i0, c0), (y1, i1, c1) = out
        assert y0.shape == y1.shape == (*xx.shape[:-1], O) and y1.is_contiguous()
        assert torch.equal(y0, y1) and torch.equal(i0, i1) and torch.equal(c0, c1)
        return out[1]

    try:
        with torch.inference_mode():
            for invariant in (False, True):
                ext._batch_invariant(invariant)
                for slots in (none, mixed):
                    for with_counts in (False, True):
                        y, idx, counts = both(x, slots, with_counts)
                        assert (idx >= 0).any() and (not with_counts or int(counts.sum()) == int((idx >= 0).sum()))
                        both(x.view(T, 1, D), slots, with_counts)
            ext._batch_invariant(False)
            both(x.t().contiguous().t(), mixed, True)  # not contiguous: the checked path both times
            other = x.float() if dtype == torch.bfloat16 else x.bfloat16()
            for raw in (False, True):
                ext._module_call_raw(raw)
                with pytest.raises(RuntimeError, match="dtype"):  # x of another dtype than the weight: ATen's linear
                    call.routed(other, none, none)
                with pytest.raises(RuntimeError, match="counts"):
                    call.routed(x, mixed, torch.zeros(2 * n + 1, dtype=torch.int64))
    finally:
        ext._module_call_raw(True)
        ext._batch_invariant(False)


def test_compiled_bfloat16_tiles_of_256_tokens_give_each_token_its_own_result():
    """bfloat16 gathers a token share 256 tokens an adapter at a time: 600 tokens of one adapter on one thread are tiles
    of 256 + 256 + 88 (300 a thread on two: 256 + 44), and every token's idx and y row equal those of the token alone."""
    ext = _compiled()
    n, r, D, O = 8, 8, 64, 200
    g = torch.Generator().manual_seed(5)
    P = torch.randn(n, D, generator=g)
    a, bt = torch.randn(n * r, D, generator=g).bfloat16(), torch.randn(n * r, O, generator=g).bfloat16()
    tables = (torch.tensor([0]), torch.tensor([n]), torch.tensor([2]), torch.tensor([0.5]))
    x = torch.randn(600, D, generator=g).bfloat16()
    y0 = torch.randn(600, O, generator=g).bfloat16()
    slots = torch.zeros(600, dtype=torch.int64)
    none = torch.empty(0, dtype=torch.int64)

    def run(rows):
        y = y0[rows].clone()
        return ext.route_gather_(x[rows].clone(), y, P, a, bt, slots[rows].clone(), *tables, r, 2, none), y

    threads = torch.get_num_threads()
    try:
        for nthreads in {1, max(2, threads)}:
            torch.set_num_threads(nthreads)
            idx, batch = run(slice(0, 600))
            for t in (0, 1, 255, 256, 257, 299, 300, 511, 512, 599):
                idx_t, y_t = run(slice(t, t + 1))
                assert torch.equal(idx_t, idx[t : t + 1]) and torch.equal(y_t, batch[t : t + 1]), t
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("T", [5, 70])  # threads split the pools below 64 tokens, the tokens from 64
def test_compiled_bfloat16_leaves_rows_without_a_selection_untouched(T):
    """A token with no slot gets no float32 round trip of its bfloat16 y row: every bit stays, even a signalling NaN's
    pattern (0x7F81), which widen-then-narrow would return quieted (0x7FC1); routed tokens' rows still change."""
    ext = _compiled()
    n, r, D, O = 4, 4, 32, 48
    g = torch.Generator().manual_seed(9)
    P, a, bt = torch.randn(n, D, generator=g), torch.randn(n * r, D, generator=g).bfloat16(), torch.randn(n * r, O, generator=g).bfloat16()
    tables = (torch.tensor([0]), torch.tensor([n]), torch.tensor([2]), torch.tensor([0.5]))
    x = torch.randn(T, D, generator=g).bfloat16()
    slots = torch.where(torch.arange(T) % 2 == 0, 0, -1)
    y0 = torch.randn(T, O, generator=g).bfloat16()
    y0.view(torch.int16)[1, :4] = 0x7F81  # row 1 has no slot
    y = y0.clone()
    ext.route_gather_(x, y, P, a, bt, slots, *tables, r, 2, torch.empty(0, dtype=torch.int64))
    bare = slots < 0
    assert torch.equal(y.view(torch.int16)[bare], y0.view(torch.int16)[bare])
    assert not torch.equal(y[~bare], y0[~bare])


@pytest.mark.parametrize("T", [32, 1024])  # threads split the pools below 64 tokens, the tokens from 64
def test_compiled_bfloat16_round_trip_keeps_every_value(T):
    """A routed token's bfloat16 y row goes to float32 and back around the update (phase_b_bf16's widen and narrow, 16
    values a step with AVX-512): with B = 0 the update adds zeros, so every one of the 65,536 bfloat16 bit patterns must
    come back as itself (-0 as a zero) - denormals included (AVX512-BF16's vcvtneps2bf16 would flush them to zero) -
    except NaNs, which come back as NaNs with the quiet bit set (0x7F81 -> 0x7FC1: the FMA quiets a signalling NaN,
    narrow keeps the payload). Rows of 48 values: three 16-value steps of the vector loop each."""
    ext = _compiled()
    n, r, D, O = 2, 2, 32, 48
    patterns = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    rows = -(-patterns.numel() // (T * O)) * T  # whole batches of T rows
    y0 = torch.zeros(rows * O, dtype=torch.int16)
    y0[: patterns.numel()] = patterns
    y0 = y0.view(torch.bfloat16).view(rows, O)
    g = torch.Generator().manual_seed(3)
    P, a = torch.randn(n, D, generator=g), torch.randn(n * r, D, generator=g).bfloat16()
    bt = torch.zeros(n * r, O).bfloat16()
    tables = (torch.tensor([0]), torch.tensor([n]), torch.tensor([1]), torch.tensor([1.0]))
    got = []
    for t0 in range(0, rows, T):
        y = y0[t0 : t0 + T].clone()
        x = torch.randn(T, D, generator=g).bfloat16()
        ext.route_gather_(x, y, P, a, bt, torch.zeros(T, dtype=torch.int64), *tables, r, 1, torch.empty(0, dtype=torch.int64))
        got.append(y)
    got = torch.cat(got).reshape(-1)[: patterns.numel()]
    want = y0.reshape(-1)[: patterns.numel()]
    nan, negzero = want.isnan(), want.view(torch.int16) == -32768
    assert torch.equal(got.view(torch.int16)[~nan & ~negzero], want.view(torch.int16)[~nan & ~negzero])
    assert bool((got[negzero] == 0).all())  # -0 + (+0 products) is +0 in IEEE arithmetic: a zero either way
    assert bool(got[nan].isnan().all())
    assert torch.equal(got.view(torch.int16)[nan] | 0x40, got.view(torch.int16)[nan])  # quiet bit set
    assert torch.equal(got.view(torch.int16)[nan] & ~0x40, want.view(torch.int16)[nan] & ~0x40)  # payload kept


def test_compiled_gather_adds_a_lora_listed_twice():
    ext = _compiled()
    A, B = make_stack([4], 3, 20, 36, torch.float32)
    x = torch.randn(6, 20)
    idx = torch.tensor([[1, 1]] * 6)
    w = torch.full((6, 2), 0.5)
    want = lora_gather_reference(x, A, B, idx, w)
    got = ext.gather_(x, torch.zeros(6, 36), A.reshape(-1, 20).contiguous(), B.transpose(1, 2).reshape(-1, 36).contiguous(), idx, w, 4)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_compiled_kernels_reject_bad_input():
    ext = _compiled()
    none = torch.empty(0, dtype=torch.int64)
    tables = (torch.zeros(1, dtype=torch.int64), torch.tensor([2]), torch.tensor([1]), torch.tensor([1.0]))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ext.route_gather_(torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64),
                          torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 3), none, *tables, 1, 1, none)
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):  # one pool in each dtype
        ext.gather_(torch.zeros(2, 4), torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3, dtype=torch.bfloat16),
                    torch.tensor([[0], [1]]), torch.ones(2, 1), 1)
    with pytest.raises(RuntimeError, match="idx out of range"):
        ext.gather_(torch.zeros(2, 4), torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3),
                    torch.tensor([[0], [5]]), torch.ones(2, 1), 1)
    y = torch.ones(2, 3)
    with pytest.raises(RuntimeError, match="counts must be"):  # checked before y is touched
        ext.route_gather_(torch.ones(2, 4), y, torch.ones(2, 4), torch.ones(2, 4), torch.ones(2, 3), none, *tables, 1, 1,
                          torch.zeros(5, dtype=torch.int64))
    assert torch.equal(y, torch.ones(2, 3))
    with pytest.raises(RuntimeError, match="bad offset"):
        bad = (torch.tensor([1]), torch.tensor([2]), torch.tensor([1]), torch.tensor([1.0]))  # LoRAs 1..2 of a pool of 2
        ext.route_gather_(torch.zeros(2, 4), torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 3),
                          none, *bad, 1, 1, none)


def test_compiled_kernels_build_where_a_compiler_exists():
    """A silent fallback would hide a broken build: where c++ exists (and the kernels are not disabled) they must load."""
    import os
    import shutil

    from remix.kernels import cpu_ext

    if shutil.which("c++") is None or os.environ.get("REMIX_DISABLE_EXT", "") not in ("", "0"):
        pytest.skip("no C++ compiler here, or the kernels are disabled")
    assert cpu_ext.load() is not None


@pytest.mark.parametrize("T", [1, 9, 33, 64, 70, 300])  # below 64 rows the threads split the pools, from 64 the tokens
@pytest.mark.parametrize("D", [64, 40, 17])  # whole steps of 32 inputs, and a masked tail
def test_compiled_bfloat16_phase_a_paths_match_float64(T, D):
    """bfloat16 x and pools: phase A on vdpbf16ps (the default with AVX512-BF16: pairs of exact products into float32
    lanes, U float32) and on the widening path (16-lane FMAs) both give y = round(y0 + delta) with delta from a
    float64 reference of the same bfloat16 values, to one bfloat16 rounding; and each row alone gets the bits it gets
    in the batch."""
    ext = _compiled()
    g = torch.Generator().manual_seed(T * 31 + D)
    N, r, O, k = 6, 8, 48, 2
    a = (torch.randn(N * r, D, generator=g) * 0.3).bfloat16()
    bt = (torch.randn(N * r, O, generator=g) * 0.3).bfloat16()
    x = torch.randn(T, D, generator=g).bfloat16()
    y0 = torch.randn(T, O, generator=g).bfloat16()
    idx = torch.randint(0, N, (T, k), generator=g)
    w = torch.rand(T, k, generator=g)
    u = torch.einsum("tkrd,td->tkr", a.double().view(N, r, D)[idx], x.double()) * w.double()[..., None]
    want = y0.double() + torch.einsum("tkr,tkro->to", u, bt.double().view(N, r, O)[idx])
    try:
        for dot in (True, False):
            ext._phase_a_bf16_dot(dot)
            out = ext.gather_(x, y0.clone(), a, bt, idx, w, r)
            torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=2.0**-8)  # half an ulp is 2^-9 relative
            for t in {0, T // 2, T - 1}:
                alone = ext.gather_(x[t : t + 1].contiguous(), y0[t : t + 1].clone(), a, bt, idx[t : t + 1].contiguous(),
                                    w[t : t + 1].contiguous(), r)
                assert torch.equal(alone, out[t : t + 1])
            ext._phase_a_prefetch(False)  # the vdpbf16ps path's prefetch of the next rows of A changes no value
            assert torch.equal(ext.gather_(x, y0.clone(), a, bt, idx, w, r), out)
            ext._phase_a_prefetch(True)
    finally:
        ext._phase_a_bf16_dot(True)
        ext._phase_a_prefetch(True)


def test_compiled_bfloat16_output_rounds_like_torch():
    """bfloat16 y: widened, the float32 delta added, one round-to-nearest-even back (ties, inf and NaN included)."""
    ext = _compiled()
    g = torch.Generator().manual_seed(11)
    T, D, O = 64, 16, 48
    x = torch.zeros(T, D)
    x[:, 0] = 1.0
    a = torch.zeros(1, D)
    a[0, 0] = 1.0  # u = x[:, 0] = 1
    delta = torch.randint(-4096, 4096, (O,), generator=g).float() / 4096  # exact in float32
    bt = delta[None, :].clone()
    y = torch.randn(T, O, generator=g).to(torch.bfloat16)
    y[0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    want = (y.float() + delta).to(torch.bfloat16)
    got = ext.gather_(x.to(torch.bfloat16), y.clone(), a, bt, torch.zeros(T, 1, dtype=torch.int64), torch.ones(T, 1), 1)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~want.isnan()], want[~want.isnan()])


def test_compiled_float32_to_bfloat16_rounding_is_torchs():
    """The kernels' float32 -> bfloat16 rounding (narrow: vcvtneps2bf16 for vectors of normal floats, the integer code
    for any vector with a denormal, an infinity or a NaN) gives torch's bits for every value but a NaN's payload: 2^22
    random bit patterns (about 1 in 256 exponents is 0 or 255), denormals, signed zeros, infinities, values that round
    up to infinity, ties (1 + 2^-8 rounds down to even, 1 + 3 * 2^-8 up), mixed in vectors with normal values; and the
    two codes agree with each other bit for bit, NaNs included."""
    ext = _compiled()
    g = torch.Generator().manual_seed(5)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 22,), generator=g, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-40, 1.1754944e-38,
                            3.3961e38, 3.4028235e38, -3.3961e38, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8)])
    x = torch.cat([bits.view(torch.float32), special, torch.randn(997, generator=g), special.flip(0),
                   torch.randn(1000, generator=g) * 1e-39])
    try:
        out = {}
        for cvt in (True, False):
            ext._narrow_cvt(cvt)
            out[cvt] = ext._to_bf16(x)
            want = x.to(torch.bfloat16)
            nan = x.isnan()
            assert torch.equal(out[cvt].isnan(), nan)
            assert torch.equal(out[cvt][~nan].view(torch.int16), want[~nan].view(torch.int16))
        assert torch.equal(out[True].view(torch.int16), out[False].view(torch.int16))
    finally:
        ext._narrow_cvt(True)


@pytest.mark.parametrize("T", [0, 1, 5, 33, 64, 70, 300])
@pytest.mark.parametrize("d_in,d_out,bias", [(40, 72, True), (64, 33, False), (17, 200, True)])
def test_compiled_linear_matches_f_linear(T, d_in, d_out, bias):
    """The compiled base GEMM (each thread its own slice of the outputs, the slices multiples of 32 columns with a
    ragged last one; the dot-product kernel with AVX-512, else MKL) against F.linear: same values to float32 rounding, any batch shape, with and without bias."""
    from remix.kernels import cpu_ext

    _compiled()
    g = torch.Generator().manual_seed(T * 7 + d_out)
    lin = torch.nn.Linear(d_in, d_out, bias=bias)
    x = torch.randn(2, T, d_in, generator=g)
    with torch.no_grad():
        got, want = cpu_ext.linear(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias)
    assert got.shape == want.shape == (2, T, d_out)
    torch.testing.assert_close(got, want, atol=1e-6 * max(1.0, float(want.abs().amax())) if T else 0.0, rtol=1e-5)


@pytest.mark.parametrize("d_in,d_out", [(40, 72), (576, 1536), (17, 200), (1536, 49)])
def test_compiled_linear_row_is_the_same_in_any_batch(d_in, d_out):
    """The dot-product GEMM sums every output in one order (16 lanes over d_in, the lanes pairwise, then the tail), so a
    row's outputs are bit-identical alone, in any batch size (each size takes other tiles: 6x3 below 16 rows, 5x5 from
    16, ragged tails) and at any position of the batch; against float64 they are within float32 rounding."""
    from remix.kernels import cpu_ext

    _compiled()
    if not cpu_ext.dot_gemm():
        pytest.skip("no AVX-512: the float32 base GEMM is MKL's, whose order depends on the batch")
    g = torch.Generator().manual_seed(d_in + d_out)
    x, w, b = torch.randn(41, d_in, generator=g), torch.randn(d_out, d_in, generator=g), torch.randn(d_out, generator=g)
    full = cpu_ext.linear(x, w, b)
    ref = (x.double() @ w.double().T + b.double()).float()
    torch.testing.assert_close(full, ref, atol=2e-6 * d_in ** 0.5 * 4, rtol=1e-5)
    for T in (1, 2, 3, 4, 5, 6, 7, 15, 16, 17, 26, 33):
        assert torch.equal(cpu_ext.linear(x[:T], w, b), full[:T]), T
        assert torch.equal(cpu_ext.linear(x[-T:], w, b), full[-T:]), T
    for i in (0, 7, 40):
        assert torch.equal(cpu_ext.linear(x[i : i + 1], w, b), full[i : i + 1])


@pytest.mark.parametrize("d_in,d_out,bias", [(40, 72, True), (576, 1536, False), (17, 200, True), (1536, 49, True)])
def test_compiled_bf16_linear_below_its_row_limit(d_in, d_out, bias):
    """bfloat16 below DOT_BF16_BELOW rows (AVX512-BF16): the dot-product kernel sums float32 products of bfloat16 pairs
    in one order per output and rounds once, as oneDNN does in its own order: against float64 its error is within one
    rounding to bfloat16 (half a bfloat16 ulp, 2^-8 relative, plus the float32 sums), and a row's outputs are the same
    whatever the row count below the limit. From the limit on ATen's GEMM runs (bit-identical to F.linear) - or, on
    AMX and a shape of whole tiles, the AMX kernel by token shares, whose rows are its rows below the limit."""
    from remix.kernels import cpu_ext

    _compiled()
    if not cpu_ext.dot_gemm(torch.bfloat16):
        pytest.skip("no AVX512-BF16: bfloat16 takes ATen's GEMM at every size")
    lim = cpu_ext.load().DOT_BF16_BELOW
    g = torch.Generator().manual_seed(d_in * 3 + d_out)
    x = torch.randn(lim, d_in, generator=g).bfloat16()
    w = torch.randn(d_out, d_in, generator=g).bfloat16()
    b = torch.randn(d_out, generator=g).bfloat16() if bias else None
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    bound = exact.abs() * 2.0 ** -8 + 1e-6 * d_in
    n = lim - 1
    got = cpu_ext.linear(x[:n], w, b)
    assert got.dtype == torch.bfloat16
    assert bool(((got.double() - exact[:n]).abs() <= bound[:n]).all())
    for T in (1, 2, 3, 4, 5, 6, 7, n - 1):
        assert torch.equal(cpu_ext.linear(x[:T], w, b), got[:T]), T
        assert torch.equal(cpu_ext.linear(x[n - T : n], w, b), got[n - T :]), T
    if cpu_ext.amx_bf16() and d_in % 32 == 0 and d_out % 16 == 0:  # at the limit: AMX tiles by token shares
        assert torch.equal(cpu_ext.linear(x, w, b)[:n], cpu_ext.linear(x[:n], w, b))
    else:
        assert torch.equal(cpu_ext.linear(x, w, b), F.linear(x, w, b))  # at the limit: oneDNN


@pytest.mark.parametrize("d_in,d_out,bias", [(64, 16, False), (64, 48, True), (576, 960, True), (1536, 576, False)])
def test_compiled_bf16_linear_on_amx_tiles(d_in, d_out, bias):
    """bfloat16 weights of whole tiles (inputs a multiple of 32, outputs of 16) on a CPU with AMX-BF16: the tile kernel
    (Y^T = W X^T, 16 x 16 float32 tiles, one 32-input block after another) is within one bfloat16 rounding of float64
    (half an ulp, 2^-8 relative, plus the float32 sums), and a row's outputs are bit-identical whatever the row count -
    across the 16-token tile and 32-token block edges, a lone 16-output tile (48 = 32 + 16), either thread split, and
    from DOT_BF16_BELOW rows, where the threads split the tokens (in tiles of 256) instead of oneDNN's GEMM."""
    from remix.kernels import cpu_ext

    _compiled()
    if not cpu_ext.amx_bf16():
        pytest.skip("no AMX-BF16 here (or the OS refused the tile state): the dot-product kernel covers bfloat16")
    lim = cpu_ext.load().DOT_BF16_BELOW
    g = torch.Generator().manual_seed(d_in + 7 * d_out)
    x = torch.randn(lim - 1, d_in, generator=g).bfloat16()
    w = torch.randn(d_out, d_in, generator=g).bfloat16()
    b = torch.randn(d_out, generator=g).bfloat16() if bias else None
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    full = cpu_ext.linear(x, w, b)
    assert bool(((full.double() - exact).abs() <= exact.abs() * 2.0 ** -8 + 1e-6 * d_in).all())
    for T in (1, 2, 15, 16, 17, 31, 32, 33, 47, 48, 49, 64, 100):
        assert torch.equal(cpu_ext.linear(x[:T], w, b), full[:T]), T
        assert torch.equal(cpu_ext.linear(x[-T:], w, b), full[-T:]), T
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread over every output block: the same sums
    try:
        assert torch.equal(cpu_ext.linear(x[:40], w, b), full[:40])
    finally:
        torch.set_num_threads(before)
    big = torch.cat([x, torch.randn(600 - len(x), d_in, generator=g).bfloat16()])  # (tiles of 256 on each thread)
    many = cpu_ext.linear(big, w, b)
    assert torch.equal(many[: lim - 1], full)
    for t0, t1 in ((lim - 1, lim + 40), (250, 270), (590, 600)):
        assert torch.equal(cpu_ext.linear(big[t0:t1].contiguous(), w, b), many[t0:t1]), (t0, t1)
    nan = x[:3].clone()
    nan[1, 5] = float("nan")  # a NaN input spoils its own row only
    got = cpu_ext.linear(nan, w, b)
    assert bool(got[1].isnan().all()) and torch.equal(got[0::2], full[0:3:2])


def test_amx_can_be_turned_off_for_comparisons():
    """REMIX_DISABLE_AMX=1 (read once per process) leaves bfloat16 on the AVX512-BF16 dot kernel: a fresh process with
    it set reports AMX off and still computes the same linear within one bfloat16 rounding."""
    import os
    import subprocess
    import sys

    from remix.kernels import cpu_ext

    _compiled()
    if not cpu_ext.amx_bf16():
        pytest.skip("no AMX-BF16 here: nothing to turn off")
    code = ("import torch; from remix.kernels import cpu_ext; torch.manual_seed(0); "
            "x = torch.randn(8, 64).bfloat16(); w = torch.randn(32, 64).bfloat16(); "
            "e = (x.double() @ w.double().T); y = cpu_ext.linear(x, w).double(); "
            "print(cpu_ext.amx_bf16(), bool(((y - e).abs() <= e.abs() * 2.0 ** -8 + 1e-4).all()))")
    env = {**os.environ, "REMIX_DISABLE_AMX": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"]


def test_compiled_linear_from_its_onednn_limit_is_onednns_or_mkls():
    """float32 calls of ONEDNN_F32_FROM rows or more (prefill steps) leave the dot-product kernel for a library GEMM
    that is faster there: oneDNN's linear on the plain weight (F32_LARGE_GEMM "onednn": AMD and other CPUs), or ATen's
    linear, MKL's sgemm, on Intel CPUs ("aten"): bit-identical to calling that op, within float32 rounding of the other,
    with and without bias; below the limit the dot-product kernel runs."""
    from remix.kernels import cpu_ext

    _compiled()
    ext = cpu_ext.load()
    lim = ext.ONEDNN_F32_FROM
    if lim < 0:
        pytest.skip("neither oneDNN's linear nor MKL here: the dot-product kernel at every size")
    intel = "GenuineIntel" in open("/proc/cpuinfo").read()
    assert ext.F32_LARGE_GEMM == ("aten" if intel else "onednn")
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(lim, 64, generator=g), torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    with torch.inference_mode():
        for bias in (None, b):
            got = cpu_ext.linear(x, w, bias)
            onednn = torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
            assert torch.equal(got, F.linear(x, w, bias) if intel else onednn)
            torch.testing.assert_close(got, onednn, atol=1e-5, rtol=1e-5)
        if cpu_ext.dot_gemm():  # one row fewer: the dot-product kernel, each row as it is alone
            assert torch.equal(cpu_ext.linear(x[: lim - 1], w, b)[3], cpu_ext.linear(x[3:4], w, b)[0])


def test_compiled_linear_leaves_what_it_does_not_cover_to_f_linear():
    from remix.kernels import cpu_ext

    _compiled()
    lin = torch.nn.Linear(24, 40)
    x = torch.randn(3, 24)
    y = cpu_ext.linear(x, lin.weight, lin.bias)  # grad mode on and the weight requires grad: autograd must see it
    assert y.requires_grad and y.grad_fn is not None
    xb, wb = torch.randn(cpu_ext.load().DOT_BF16_BELOW, 24).bfloat16(), lin.weight.detach().bfloat16()
    assert torch.equal(cpu_ext.linear(xb, wb), F.linear(xb, wb))  # bfloat16 from its row limit: ATen's (oneDNN) GEMM
    with pytest.raises(RuntimeError):  # mixed dtypes: left to ATen, which refuses them as F.linear does
        cpu_ext.linear(xb, wb.float())
    wt = lin.weight.detach().t().contiguous().t()  # a non-contiguous weight
    with torch.no_grad():
        assert torch.equal(cpu_ext.linear(x, wt), F.linear(x, wt))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q", [1, 5])
def test_compiled_kv_write_matches_index_put(dtype, q):
    """kv_write_ puts each row's new keys at its own positions, exactly where index_put_ on the [b, P, H, Dh] view does
    (a strided input, as the lean forward hands it: a transposed slice of the fused q/k/v output)."""
    ext = _compiled()
    S, H, P, Dh, b, row0 = 6, 3, 20, 8, 3, 2
    cache = torch.randn(S, H, P, Dh).to(dtype)
    fresh = torch.randn(b, q, 2 * H, Dh).to(dtype)[:, :, H:].transpose(1, 2)  # [b, H, q, Dh], not contiguous
    pos = torch.stack([torch.randperm(P)[:q] for _ in range(b)])
    want = cache.clone()
    rows = torch.arange(b)[:, None].expand(b, q)
    want[row0 : row0 + b].transpose(1, 2).index_put_((rows, pos), fresh.transpose(1, 2))
    ext.kv_write_(cache, fresh, row0, pos)
    assert torch.equal(cache, want)
    with pytest.raises(RuntimeError, match="out of"):
        ext.kv_write_(cache, fresh, row0, pos + P)
    with pytest.raises(RuntimeError, match="rows out of the cache"):
        ext.kv_write_(cache, fresh, S - 1, pos)
    with pytest.raises(RuntimeError, match="dtype"):
        ext.kv_write_(cache, fresh.double(), row0, pos)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Dh,Hkv,nrep", [(64, 3, 3), (64, 2, 1), (128, 1, 8), (64, 4, 2), (16, 2, 2), (32, 1, 3)])
def test_compiled_decode_attention_matches_sdpa(dtype, Dh, Hkv, nrep):
    """One query token per row over its own slot of the cache (rows row0.., lengths from 1 to P, not multiples of 16)
    against SDPA with the boolean mask the engine builds; q taken from a fused [q; k; v]-like layout."""
    ext = _compiled()
    torch.manual_seed(Dh + Hkv + nrep)
    S, P, b, row0, Hq = 7, 70, 5, 2, Hkv * nrep
    K, V = torch.randn(S, Hkv, P, Dh).to(dtype), torch.randn(S, Hkv, P, Dh).to(dtype)
    qk = (torch.randn(b, Hq + 2 * Hkv, Dh) * 2).to(dtype)  # scores of a few units: a peaked softmax is covered too
    lens = torch.tensor([1, 70, 17, 33, 16])
    got = ext.decode_attention(qk, K, V, row0, lens, Hq, Dh**-0.5)
    span = int(lens.max())
    mask = (torch.arange(span)[None, :] < lens[:, None])[:, None, None, :]
    q = qk[:, :Hq].reshape(b, Hkv, nrep, Dh)
    want = F.scaled_dot_product_attention(q.float(), K[row0 : row0 + b, :, :span].float(), V[row0 : row0 + b, :, :span].float(),
                                          attn_mask=mask, scale=Dh**-0.5)
    assert got.shape == (b, Hkv, nrep, Dh) and got.dtype == dtype
    # float32: the same maths in another order; bfloat16: inputs exact, one rounding of the output (half an ulp)
    tol = {"atol": 2e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 4e-3, "rtol": 4e-3}
    torch.testing.assert_close(got.float(), want, **tol)
    assert torch.equal(got[0, 0, 0], V[row0, 0, 0])  # one position: its value, exactly


@pytest.mark.parametrize("Dh,Hkv,nrep", [(64, 3, 3), (128, 1, 8), (32, 2, 1)])
def test_compiled_bfloat16_decode_attention_paths_and_batch_independence(Dh, Hkv, nrep):
    """bfloat16 decode attention on vdpbf16ps (the default where the CPU has AVX512-BF16; the softmax weights rounded to
    bfloat16 as SDPA rounds them) and on the widening path (weights kept in float32): both within bfloat16 error of
    float32 SDPA (weights of ~2^-9 relative error each, then one rounding of the output), within that of each other, and
    each row's output bit-identical alone (one row, its own row0) and in the batch; odd and even lengths, one position."""
    ext = _compiled()
    torch.manual_seed(Dh * nrep)
    S, P, b, Hq = 6, 90, 6, Hkv * nrep
    K, V = torch.randn(S, Hkv, P, Dh).bfloat16(), torch.randn(S, Hkv, P, Dh).bfloat16()
    qk = (torch.randn(b, Hq + Hkv, Dh) * 2).bfloat16()
    lens = torch.tensor([1, 90, 17, 2, 33, 64])
    mask = (torch.arange(90)[None, :] < lens[:, None])[:, None, None, :]
    want = F.scaled_dot_product_attention(qk[:, :Hq].reshape(b, Hkv, nrep, Dh).float(), K[:b].float(), V[:b].float(),
                                          attn_mask=mask, scale=Dh**-0.5)
    got = {}
    try:
        for dot in (True, False):
            ext._attention_bf16_dot(dot)
            out = ext.decode_attention(qk, K, V, 0, lens, Hq, Dh**-0.5)
            torch.testing.assert_close(out.float(), want, atol=6e-3, rtol=6e-3)
            for i in range(b):  # alone: the same bits
                alone = ext.decode_attention(qk[i : i + 1].contiguous(), K, V, i, lens[i : i + 1], Hq, Dh**-0.5)
                assert torch.equal(alone[0], out[i])
            assert torch.equal(out[0, 0, 0], V[0, 0, 0])  # one position: its value, exactly
            got[dot] = out
    finally:
        ext._attention_bf16_dot(True)
    torch.testing.assert_close(got[True].float(), got[False].float(), atol=6e-3, rtol=6e-3)
    assert torch.equal(got[True], got[False]) != ext.dot_gemm(True)  # with AVX512-BF16 the two paths differ (it ran)


@pytest.mark.parametrize("Dh", [32, 64, 128])
def test_compiled_bfloat16_attention_v_pass_on_fmas_is_the_vdpbf16ps_pass_bit_for_bit(Dh):
    """The vdpbf16ps attention's V pass run on float32 FMAs (the default on Intel, where vdpbf16ps issues at a quarter
    of the FMAs' rate): each pair of positions' products added odd first, as vdpbf16ps adds them, under FTZ and DAZ -
    the same bits as the vdpbf16ps form for every group size (1-8, the FMA form's register blocks 1-4 and beyond), odd
    and even lengths, one position, zeros, denormal values of V, and a peaked softmax."""
    ext = _compiled()
    if not ext.dot_gemm(True):
        pytest.skip("no AVX512-BF16 here: no vdpbf16ps form to compare with")
    g = torch.Generator().manual_seed(Dh)
    was = ext._attention_v_fma(True)
    try:
        for Hkv, nrep in [(1, 1), (2, 2), (3, 3), (1, 4), (1, 5), (2, 7), (1, 8)]:
            S, P, b, Hq = 5, 150, 5, Hkv * nrep
            K = torch.randn(S, Hkv, P, Dh, generator=g)
            V = torch.randn(S, Hkv, P, Dh, generator=g)
            V = V * torch.where(torch.rand(V.shape, generator=g) < 0.2, 1e-39, 1.0)  # denormal in float32 and bfloat16
            V[:, :, 3:7] = 0
            K, V = K.bfloat16(), V.bfloat16()
            qk = (torch.randn(b, Hq + Hkv, Dh, generator=g) * (1 + 4 * (Hkv % 2))).bfloat16()
            lens = torch.tensor([1, 150, 17, 2, 64])
            outs = []
            for fma in (False, True):
                ext._attention_v_fma(fma)
                outs.append(ext.decode_attention(qk, K, V, 0, lens, Hq, Dh**-0.5))
            assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16)), (Hkv, nrep)
    finally:
        ext._attention_v_fma(was)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_slot_attention_is_decode_attention_per_token_and_causal_sdpa(dtype):
    """slot_attention: query row i reads cache row slots[i]'s first lens[i] positions. A prefill chunk's tokens (several
    to a slot, each seeing its own position and those before) give what SDPA gives with the causal mask over the same
    slot, and each token's output is bit-identical to decode_attention of that token alone (the same kernel and order:
    a prompt token and a generated token at one position are computed alike)."""
    ext = _compiled()
    torch.manual_seed(7)
    S, P, Hkv, nrep, Dh = 5, 40, 3, 3, 64
    Hq = Hkv * nrep
    K, V = torch.randn(S, Hkv, P, Dh).to(dtype), torch.randn(S, Hkv, P, Dh).to(dtype)
    # two chunks: slot 3 positions 0-9 (a prompt from its start), slot 1 positions 20-25 (a later chunk)
    slots = torch.tensor([3] * 10 + [1] * 6)
    pos = torch.cat([torch.arange(10), torch.arange(20, 26)])
    qk = (torch.randn(16, Hq + 2 * Hkv, Dh) * 2).to(dtype)
    got = ext.slot_attention(qk, K, V, slots, pos + 1, Hq, Dh**-0.5)
    assert got.shape == (16, Hkv, nrep, Dh) and got.dtype == dtype
    for t in range(16):
        alone = ext.decode_attention(qk[t : t + 1].contiguous(), K, V, int(slots[t]), pos[t : t + 1] + 1, Hq, Dh**-0.5)
        assert torch.equal(alone[0], got[t])
    for sel, slot, start in ((slice(0, 10), 3, 0), (slice(10, 16), 1, 20)):
        n = sel.stop - sel.start
        q = qk[sel, :Hq].reshape(n, Hkv, nrep, Dh).permute(1, 2, 0, 3).float()  # [Hkv, nrep, n, Dh]
        mask = torch.arange(start + n)[None, :] <= (start + torch.arange(n))[:, None]
        k, v = K[slot, :, None, : start + n].float(), V[slot, :, None, : start + n].float()
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=Dh**-0.5)
        tol = {"atol": 2e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 6e-3, "rtol": 6e-3}
        torch.testing.assert_close(got[sel].float(), want.permute(2, 0, 1, 3), **tol)
    with pytest.raises(RuntimeError, match="slots"):
        ext.slot_attention(qk, K, V, slots + 2, pos + 1, Hq, Dh**-0.5)
    with pytest.raises(RuntimeError, match="slots"):
        ext.slot_attention(qk, K, V, slots[:3], pos + 1, Hq, Dh**-0.5)


def test_compiled_decode_attention_rejects_bad_input():
    ext = _compiled()
    K = torch.randn(4, 2, 10, 64)
    qk = torch.randn(2, 6, 64)
    with pytest.raises(RuntimeError, match="out of"):
        ext.decode_attention(qk, K, K, 0, torch.tensor([3, 11]), 4, 0.125)
    with pytest.raises(RuntimeError, match="rows out of the cache"):
        ext.decode_attention(qk, K, K, 3, torch.tensor([3, 3]), 4, 0.125)
    with pytest.raises(RuntimeError, match="head dim"):
        ext.decode_attention(torch.randn(2, 6, 48), torch.randn(4, 2, 10, 48), torch.randn(4, 2, 10, 48), 0, torch.tensor([3, 3]), 4, 0.1)
    with pytest.raises(RuntimeError, match="share"):
        ext.decode_attention(qk.bfloat16(), K, K, 0, torch.tensor([3, 3]), 4, 0.125)


def _bf16_close(got, want):
    """Within one bfloat16 ulp (2^-7 relative) of the torch formula, which rounds at the same points."""
    torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=2**-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_layer_ops_match_hf_formulas(dtype):
    """The lean forward's fused ops against the ops Hugging Face's Llama modules run: residual add + RMSNorm,
    rotary in place (both halves of each pair read before either is written)."""
    ext = _compiled()
    torch.manual_seed(0)
    close = (lambda g, w: torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)) if dtype == torch.float32 else _bf16_close
    h, delta, w = (torch.randn(3, 2, 96) * 3).to(dtype), torch.randn(3, 2, 96).to(dtype), torch.randn(96).to(dtype)
    summed = h + delta

    def hf_rms(x):
        v = x.float().pow(2).mean(-1, keepdim=True)
        return w * (x.float() * torch.rsqrt(v + 1e-5)).to(dtype)

    out = ext.add_rms_norm_(h, delta, w, 1e-5)
    assert torch.equal(h, summed)  # the residual add, in place, rounded as h + delta
    close(out, hf_rms(summed))
    close(ext.add_rms_norm_(h.clone(), torch.empty(0, dtype=dtype), w, 1e-5), hf_rms(summed))  # no residual
    x = torch.randn(4, 5, 16).to(dtype)
    ang = torch.rand(4, 8) * 6
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).to(dtype), torch.cat([ang.sin(), ang.sin()], -1).to(dtype)
    rot_half = torch.cat([-x[..., 8:], x[..., :8]], -1)
    want = x * cos[:, None] + rot_half * sin[:, None]  # HF's apply_rotary_pos_emb
    fused = torch.cat([x, torch.randn(4, 2, 16).to(dtype)], 1)  # rows 7 heads apart, as q/k inside a q/k/v output
    ext.rotary_(fused[:, :5], cos, torch.cat([-sin[:, :8], sin[:, 8:]], -1))
    close(fused[:, :5], want)
    with pytest.raises(RuntimeError, match="weight"):
        ext.add_rms_norm_(h, delta, w[:10], 1e-5)
    with pytest.raises(RuntimeError, match="Dh even"):
        ext.rotary_(torch.randn(2, 2, 5), torch.randn(2, 5), torch.randn(2, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_norm_and_rotary_vector_loops_give_the_scalar_loops_bits(dtype):
    """add_rms_norm_'s and rotary_'s vector loops (the default) against their scalar loops (_norm_vec / _rotary_vec
    off): every bit the same - widths with and without a tail of fewer than 16, 1 to 33 rows (one thread and both),
    denormal and huge values (whose squares overflow the sum), the residual add and the norm alone. float32 rotary
    has only its scalar loop (see rotary_rows), so there only the norm is compared."""
    ext = _compiled()
    g = torch.Generator().manual_seed(0)
    # the switches are state the kernels read: on by default, and each call returns the setting before it
    assert ext._norm_vec(False) is True and ext._norm_vec(True) is False
    assert ext._rotary_vec(False) is True and ext._rotary_vec(True) is False

    def both(fn):
        out = []
        for on in (False, True):
            was_n, was_r = ext._norm_vec(on), ext._rotary_vec(on)
            try:
                out.append(fn())
            finally:
                ext._norm_vec(was_n), ext._rotary_vec(was_r)
        return out

    for D, rows in itertools.product((7, 16, 33, 576, 577), (1, 5, 17, 33)):
        h = torch.randn(rows, 1, D, generator=g) * 3
        h.view(-1)[::13] = 1e-39
        h.view(-1)[::29] = 3e38
        h, delta, w = h.to(dtype), torch.randn(rows, 1, D, generator=g).to(dtype), torch.randn(D, generator=g).to(dtype)

        def norms():
            hh = h.clone()
            return hh, ext.add_rms_norm_(hh, delta, w, 1e-5), ext.add_rms_norm_(h.clone(), torch.empty(0, dtype=dtype), w, 1e-6)

        for a, b in zip(*both(norms)):
            assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), (D, rows)
    if dtype == torch.float32:
        return
    for Dh, rows in itertools.product((2, 32, 64, 96, 128), (1, 9, 33)):
        x = (torch.randn(rows, 6, Dh, generator=g) * 5).to(dtype)
        x.view(-1)[::31] = 1e-39
        half = torch.rand(rows, Dh // 2, generator=g) * 20
        cos = torch.cat([half.cos(), half.cos()], -1).to(dtype)
        sin = torch.cat([-half.sin(), half.sin()], -1).to(dtype)

        def rotary():
            xx = x.clone()
            ext.rotary_(xx[:, :4], cos, sin)
            return xx

        a, b = both(rotary)
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), (Dh, rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_silu_mul_matches_hf_and_ignores_batch_mates(dtype):
    """silu(gate) * up in place (LlamaMLP's act_fn(gate_proj(x)) * up_proj(x), silu rounded to the dtype before the
    product): within float32 ulps of ATen's two ops (another ~1-ulp exp), bfloat16 equal but where a float32 silu lies
    within an ulp of a rounding boundary; a row's result the same alone or among any number of rows (vectors of 16
    lanes, the tail padded: 1536 x rows elements split among threads anywhere), NaN and infinities kept."""
    import torch.nn.functional as F

    ext = _compiled()
    torch.manual_seed(0)
    g, u = (torch.randn(300, 1536) * 4).to(dtype), torch.randn(300, 1536).to(dtype)
    got = ext.silu_mul_(g.clone(), u)
    want = F.silu(g) * u
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=2e-6)
    else:
        _bf16_close(got, want)
        assert (got != want).float().mean() < 1e-3  # (0 of 460,800 here when written)
        # bit for bit: the kernel's own float32 silu (times exact ones), rounded to bfloat16, times u (exact in
        # float32: two 8-bit significands), rounded once more - both roundings to nearest even
        silu32 = ext.silu_mul_(g.float(), torch.ones(g.shape))
        assert torch.equal(got, (silu32.bfloat16().float() * u.float()).bfloat16())
    alone = torch.cat([ext.silu_mul_(g[i : i + 1].clone(), u[i : i + 1].contiguous()) for i in range(300)])
    assert torch.equal(alone, got)
    odd = ext.silu_mul_(g.flatten()[7:7 + 999].clone(), u.flatten()[7:7 + 999].clone())  # a tail of 7 past 62 vectors
    assert torch.equal(odd, got.flatten()[7:7 + 999])
    x = torch.tensor([float("nan"), float("inf"), 0.0, -0.0, 3.0, -3.0, -50.0], dtype=dtype)
    out = ext.silu_mul_(x.clone(), torch.ones_like(x))
    assert out[0].isnan() and out[1] == float("inf") and out[2] == 0 and out[3] == 0
    torch.testing.assert_close(out[4:].float(), F.silu(x[4:]).float(), atol=0, rtol=2**-7)
    y = torch.randn(4, 8).to(dtype)
    want_y = F.silu(y) * y
    out = ext.silu_mul_(y, y.clone())  # in place: returns y itself
    assert out.data_ptr() == y.data_ptr() and torch.allclose(y.float(), want_y.float(), rtol=2**-7, atol=1e-6)
    with pytest.raises(RuntimeError, match="one shape and dtype"):
        ext.silu_mul_(torch.randn(4, 8).to(dtype), torch.randn(4, 9).to(dtype))


def test_multi_adapter_routing_matches_its_loop_semantics(device):
    """topk_masked_u_multi (vectorised, no host reads: what the fused path and CUDA graphs run) against the loop in
    its docstring: each token routes within its own slot's range, ties go to the lower id, tokens of slot -1, of a
    slot past the tables or of a slot with n = 0 get nothing."""
    from remix.kernels import topk_masked_u_multi
    from remix.routing import topk_lower_index

    g = torch.Generator().manual_seed(3)
    r, size = 3, 5
    n = torch.tensor([4, 0, 6, 3, 8])  # slot 1 is empty
    k = torch.tensor([2, 0, 3, 1, 2])
    off = torch.cumsum(n, 0) - n
    omega = torch.tensor([0.5, 0.0, 0.25, 2.0, 0.125])
    N, kmax, T = int(n.sum()), int(k.max()), 60
    pu = torch.randn(T, N + N * r, generator=g)
    pu[:, :N] = torch.round(pu[:, :N] * 2) / 2  # many exact ties among the logits
    slots = torch.randint(-1, size + 2, (T,), generator=g)  # -1, every slot, and ids past the tables
    um, idx = topk_masked_u_multi(pu.to(device), N, slots.to(device), off.to(device), n.to(device),
                                  k.to(device), omega.to(device), kmax)
    want_um, want_idx = torch.zeros(T, N * r), torch.full((T, kmax), -1)
    for t in range(T):
        s = int(slots[t])
        if s < 0 or s >= size or n[s] == 0:
            continue
        o, ns, ks = int(off[s]), int(n[s]), int(k[s])
        J = topk_lower_index(pu[t, o : o + ns][None], ks)[0] + o
        want_idx[t, :ks] = J
        for i in J.tolist():
            want_um[t, i * r : (i + 1) * r] = omega[s] * pu[t, N + i * r : N + (i + 1) * r]
    assert torch.equal(idx.cpu(), want_idx)
    torch.testing.assert_close(um.cpu(), want_um)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1, 5, 16, 17, 33, 49152, 49157])
def test_compiled_argmax_picks_what_torch_max_picks(dtype, V):
    """The greedy sampler's argmax: the first index of the maximum (a tie goes to the lower id, across lanes and into
    the tail past the last full vector), a NaN counts as the largest (the first NaN, as torch.max(dim)), every value
    -inf gives index 0; V not a multiple of the 16 lanes runs the scalar tail."""
    ext = _compiled()
    g = torch.Generator().manual_seed(V)
    x = torch.randn(9, V, generator=g)
    x[1] = 0.5  # all tied: 0
    x[2] = float("-inf")
    if V > 3:
        x[3, V - 1] = 100.0  # the maximum in the tail (or the last lane)
        x[4, 2], x[4, V - 2] = 50.0, 50.0  # tied maxima far apart: the first
        x[5, 3], x[5, V - 1] = float("nan"), float("nan")  # the first NaN
        x[6, V - 1] = float("nan")
        x[7, 1], x[7, 17 % V] = 60.0, 60.0  # a tie between two lanes of one vector (or the same index)
    x = x.to(dtype)
    got = ext.argmax_rows(x)
    assert got.dtype == torch.int64 and torch.equal(got, x.max(-1).indices)
    assert torch.equal(ext.argmax_rows(x[:0]), torch.empty(0, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V,nbits", [(1, 1), (17, 17), (33, 33), (100, 90), (49152, 49152), (49157, 49152)])
def test_compiled_masked_argmax_is_the_argmax_of_the_masked_row(dtype, V, nbits):
    """Structured output's greedy rows: masked_argmax_rows (one pass, nothing written) gives what masking a copy to
    -inf where the grammar's bitmask has no bit (and from nbits on: padded vocabulary) and then torch.max(dim) give -
    dense and sparse masks, ties, NaNs allowed and not, a row whose allowed tokens are all -inf, rows out of order."""
    ext = _compiled()
    g = torch.Generator().manual_seed(V)
    x = torch.randn(8, V, generator=g)
    allowed = torch.rand(8, V, generator=g) < 0.5
    allowed[1] = torch.rand(V, generator=g) < 0.001  # sparse (as a regex's next characters)
    allowed[1, V // 2] = True
    allowed[2] = True
    x[2] = float("-inf")  # every token -inf: index 0
    if V > 3:
        x[3, 1], x[3, 2] = float("nan"), float("nan")
        allowed[3, 1], allowed[3, 2] = False, True  # the first allowed NaN, not the first NaN
        x[4, :] = 0.25  # ties everywhere: the first allowed
        allowed[5] = False
        allowed[5, min(nbits, V) - 1] = True  # one token, in the tail
    allowed[:, nbits:] = False
    words = (allowed.shape[1] + 31) // 32
    bits = torch.zeros(8, words * 32, dtype=torch.int64)
    bits[:, :V] = allowed.long()
    mask = (bits.view(8, words, 32) << torch.arange(32)).sum(-1)  # bit j of word w: token 32 w + j
    mask = torch.where(mask >= 2**31, mask - 2**32, mask).to(torch.int32)[:, : (nbits + 31) // 32]
    x = x.to(dtype)
    rows = torch.tensor([5, 0, 7, 1, 2, 3, 4, 6])
    got = ext.masked_argmax_rows(x, rows, mask[rows], nbits)
    want = x[rows].float().masked_fill(~allowed[rows], float("-inf")).max(-1).indices
    assert got.dtype == torch.int64 and torch.equal(got, want)



def test_a_stale_build_lock_is_removed_and_a_live_builder_waited_for(tmp_path):
    """A build killed midway leaves torch's ``lock`` file behind, on which every later build (every server start)
    would wait forever: under the build's own flock - which the kernel releases when its holder dies - such a file is
    stale and goes. While another process holds the flock (a live build), the next one waits for it."""
    import subprocess
    import sys
    import time

    from remix.kernels.cpu_ext import _build_lock

    (tmp_path / "lock").write_text("")
    with _build_lock(str(tmp_path)):
        assert not (tmp_path / "lock").exists()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"fh = open({str(tmp_path / 'remix.flock')!r}, 'w'); fcntl.flock(fh, fcntl.LOCK_EX)\n"
        "print('held', flush=True); time.sleep(1.5)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    (tmp_path / "lock").write_text("")  # the live builder's own baton
    start = time.monotonic()
    with _build_lock(str(tmp_path)):
        waited = time.monotonic() - start
    holder.wait(10)
    assert waited > 0.5  # it waited for the live builder before touching anything


def test_a_first_build_says_so_and_goes_where_torch_extensions_dir_says(tmp_path, monkeypatch, caplog):
    """The first build in an environment takes a minute or two (a server's first start): load() says so before it
    starts and how long it took; a build found in place is loaded without a word. The build goes under
    $TORCH_EXTENSIONS_DIR where it is set (the Dockerfile's cache volume; it had been ignored). (torch's builder
    stubbed: it writes the module file, returns a stand-in.)"""
    import logging

    import torch.utils.cpp_extension as cpp

    from remix.kernels import cpu_ext

    built = []

    def fake_load(name, build_directory, **kw):
        built.append(name)
        open(f"{build_directory}/{name}.so", "w").close()
        return object()

    monkeypatch.setattr(cpp, "get_default_build_root", lambda: str(tmp_path / "not-here"))
    monkeypatch.setattr(cpp, "load", fake_load)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # (the container's cache volume: it wins)
    monkeypatch.delenv("REMIX_DISABLE_EXT", raising=False)
    monkeypatch.setattr(cpu_ext, "_state", {})
    with caplog.at_level(logging.INFO, logger="remix.kernels.cpu_ext"):
        assert cpu_ext.load() is not None
    said = [r.getMessage() for r in caplog.records]
    assert len(built) == 1 and said[0].startswith(f"building the C++ kernels for this CPU in {tmp_path}/{built[0]}")
    assert said[1].startswith("built the C++ kernels in ")
    caplog.clear()
    monkeypatch.setattr(cpu_ext, "_state", {})
    with caplog.at_level(logging.INFO, logger="remix.kernels.cpu_ext"):
        assert cpu_ext.load() is not None
    assert len(built) == 2 and not caplog.records  # (torch's loader checks it is current; nothing said)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")  # torch's user cache otherwise
    assert cpu_ext.build_root(cpp.get_default_build_root) == str(tmp_path / "not-here")


@pytest.mark.parametrize("dtype,pools", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("T", [1, 5, 40, 130])
def test_compiled_gather_skips_a_padded_ranks_zeros_and_gives_the_same_result(dtype, pools, T):
    """Adapters of ranks 3, 8 and 16 in one stack, padded to 16 (a rank-16 peft LoRA beside rank-8 ReMix adapters):
    with each LoRA's own rank (ranks [N]) the kernel reads and multiplies only its rows, and gives what the padded
    stack gives - the padding's products are exact zeros - through route_gather_ and a bound module call (routed
    and, past the fused GEMM's rows, the checked path), in both of the kernel's splits; a rank above r is refused."""
    ext = _compiled()
    from remix.kernels import cpu_ext

    n, D, O, ranks = 4, 48, 72, [3, 8, 16]
    r = max(ranks)
    g = torch.Generator().manual_seed(T)
    A, B = make_stack(ranks, n, D, O, torch.float32, seed=T)  # [3n, r, D], [3n, O, r], zero past each rank
    P = torch.randn(3 * n, D, generator=g)
    a, bt = A.reshape(-1, D).to(pools).contiguous(), B.transpose(1, 2).reshape(-1, O).to(pools).contiguous()
    per_lora = torch.tensor([rk for rk in ranks for _ in range(n)])
    tables = (torch.tensor([0, n, 2 * n]), torch.tensor([n, n, n]), torch.tensor([2, 3, 2]), torch.tensor([0.5, 0.25, 1.0]))
    x = torch.randn(T, D, generator=g).to(dtype)
    slots = torch.randint(-1, 3, (T,), generator=g)
    y0 = torch.randn(T, O, generator=g).to(dtype)
    none = torch.empty(0, dtype=torch.int64)
    base = torch.nn.Linear(D, O, bias=True).to(dtype)
    for units in (True, False):
        ext._route_units(units)
        try:
            y_pad, y_own = y0.clone(), y0.clone()
            idx_pad = ext.route_gather_(x, y_pad, P, a, bt, slots, *tables, r, 3, none)
            idx_own = ext.route_gather_(x, y_own, P, a, bt, slots, *tables, r, 3, none, per_lora)
            assert torch.equal(idx_pad, idx_own) and torch.equal(y_pad, y_own)
            padded = cpu_ext.bind_module(base, P, a, bt, tables, r, 3)
            own = cpu_ext.bind_module(base, P, a, bt, tables, r, 3, ranks=per_lora)
            c_pad, c_own = torch.zeros(3 * n, dtype=torch.int64), torch.zeros(3 * n, dtype=torch.int64)
            with torch.inference_mode():
                (yp, ip), (yo, io) = padded.routed(x, slots, c_pad), own.routed(x, slots, c_own)
            assert torch.equal(yp, yo) and torch.equal(ip, io) and torch.equal(c_pad, c_own)
            if (idx_own >= n).any():  # a token selected a LoRA of rank 8 or 16: its rows past the first count, so
                # ranks cut to 1 must change y - the ranks given are the ranks used, by both entries
                y_one = y0.clone()
                ext.route_gather_(x, y_one, P, a, bt, slots, *tables, r, 3, none, per_lora.clamp(max=1))
                assert not torch.equal(y_one, y_own)
                one = cpu_ext.bind_module(base, P, a, bt, tables, r, 3, ranks=per_lora.clamp(max=1))
                with torch.inference_mode():
                    assert not torch.equal(one.routed(x, slots, none)[0], yo)
        finally:
            ext._route_units(True)
    with pytest.raises(RuntimeError, match="not in \\[0, r\\]"):
        ext.route_gather_(x, y0.clone(), P, a, bt, slots, *tables, r, 3, none, per_lora + 1)


@pytest.mark.parametrize("T", [1, 7, 17, 32, 63, 64, 100, 300])  # the split path (threads share the tiles), the token path
@pytest.mark.parametrize("D", [64, 96])
@pytest.mark.parametrize("top", [24, 32])  # the largest rank: tiles of 16 and 8 rows, or two of 16 (taken together)
def test_compiled_bfloat16_phase_a_on_amx_tiles(T, D, top):
    """bfloat16 x and pools on a CPU with AMX-BF16: phase A on tiles (U^T = A X^T over the selected LoRAs' rows, tiles
    of up to 16 rows: two rank-8 LoRAs side by side, a rank-3 LoRA alone, a rank-24 LoRA in tiles of 16 and 8 or a
    rank-32 one in two of 16) gives y
    = round(y0 + delta) with delta from a float64 reference of the same bfloat16 values and selections, to one
    bfloat16 rounding; the same selections as the vdpbf16ps path (routing is not on tiles); each row alone gets the
    bits it gets in the batch; a stack padded to r = 24 with each LoRA's own rank gives the padded stack's bits;
    LoRAs of rank 0 add nothing; and row tiles taken two of a height at a time give the bits of one at a time."""
    ext = _compiled()
    try:
        if not ext._amx_phase_a(True):
            pytest.skip("no AMX-BF16 here (or turned off): phase A runs on vdpbf16ps")
        n, O, ranks = 4, 48, [3, 8, top]
        r = max(ranks)
        g = torch.Generator().manual_seed(T * 7 + D + top)
        A, B = make_stack(ranks, n, D, O, torch.float32, seed=T + D)  # [3n, r, D], [3n, O, r], zero past each rank
        a = (A.reshape(-1, D) * 3).bfloat16().contiguous()
        bt = B.transpose(1, 2).reshape(-1, O).bfloat16().contiguous()
        P = torch.randn(3 * n, D, generator=g)
        per_lora = torch.tensor([rk for rk in ranks for _ in range(n)])
        omega = torch.tensor([0.5, 0.25, 1.0])
        tables = (torch.tensor([0, n, 2 * n]), torch.tensor([n, n, n]), torch.tensor([2, 3, 2]), omega)
        x = torch.randn(T, D, generator=g).bfloat16()
        slots = torch.randint(-1, 3, (T,), generator=g)
        y0 = torch.randn(T, O, generator=g).bfloat16()
        none = torch.empty(0, dtype=torch.int64)
        y = y0.clone()
        idx = ext.route_gather_(x, y, P, a, bt, slots, *tables, r, 3, none, per_lora)
        # float64 reference of the same selections (a -1 id and the weight of a token's slot)
        w = torch.where(idx >= 0, omega[slots.clamp(min=0)][:, None].expand_as(idx), torch.zeros(()))
        ii = idx.clamp(min=0)
        u = torch.einsum("tkrd,td->tkr", a.double().view(3 * n, r, D)[ii], x.double()) * w.double()[..., None]
        want = y0.double() + torch.einsum("tkr,tkro->to", u, bt.double().view(3 * n, r, O)[ii])
        torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=2.0**-8)  # half an ulp is 2^-9 relative
        for t in {0, T // 2, T - 1}:
            alone = y0[t : t + 1].clone()
            ext.route_gather_(x[t : t + 1].contiguous(), alone, P, a, bt, slots[t : t + 1].contiguous(), *tables, r, 3,
                              none, per_lora)
            assert torch.equal(alone, y[t : t + 1])
        y_pad = y0.clone()
        assert torch.equal(ext.route_gather_(x, y_pad, P, a, bt, slots, *tables, r, 3, none), idx)
        assert torch.equal(y_pad, y)
        # the first adapter's LoRAs at rank 0: no delta from them (no tile of zero rows)
        zero = per_lora.clone()
        zero[:n] = 0
        y_zero = y0.clone()
        assert torch.equal(ext.route_gather_(x, y_zero, P, a, bt, slots, *tables, r, 3, none, zero), idx)
        a0 = a.double().view(3 * n, r, D).clone()
        a0[:n] = 0
        u0 = torch.einsum("tkrd,td->tkr", a0[ii], x.double()) * w.double()[..., None]
        want0 = y0.double() + torch.einsum("tkr,tkro->to", u0, bt.double().view(3 * n, r, O)[ii])
        torch.testing.assert_close(y_zero.double(), want0, atol=1e-5, rtol=2.0**-8)
        # two row tiles of one height at a time (four sums in flight) or one: the same bits
        ext._phase_a_pair(False)
        y_one = y0.clone()
        assert torch.equal(ext.route_gather_(x, y_one, P, a, bt, slots, *tables, r, 3, none, per_lora), idx)
        assert torch.equal(y_one, y)
        ext._phase_a_pair(True)
        ext._amx_phase_a(False)
        y_dot = y0.clone()
        assert torch.equal(ext.route_gather_(x, y_dot, P, a, bt, slots, *tables, r, 3, none, per_lora), idx)
        torch.testing.assert_close(y_dot.double(), want, atol=1e-5, rtol=2.0**-8)
    finally:
        ext._amx_phase_a(True)
        if hasattr(ext, "_phase_a_pair"):  # (AMX builds only)
            ext._phase_a_pair(True)


def _fused_calls_or_skip(why: str):
    """The compiled module where bfloat16 calls of 128 rows or more run fused (AMX-BF16, phase A on tiles), else skip."""
    from remix.kernels import cpu_ext

    ext = _compiled()
    if not cpu_ext.amx_bf16() or not ext._amx_phase_a(True):
        pytest.skip(f"no AMX-BF16 here: {why}")
    return ext


def test_fused_calls_route_each_slot_on_its_own_tiles():
    """A fused call of several adapters routes on the tiles too: for each pair of token blocks, each slot among their
    tokens gets its own routers' logits (3 n rows from 3 off of the split routers) for the blocks holding its tokens.
    Three adapters of n 8, 6 and 10 (k 2, 3, 2) and tokens of none, in runs (prefill) and mixed at random: the
    selections are route_rows' (no near-tie in random logits), a float64 top k's where the margin is clear, and the
    same taken lane by lane or token by token; a slot of 11 LoRAs sends the call back to route_rows."""
    from remix.kernels import cpu_ext

    ext = _fused_calls_or_skip("no fused calls")
    D, O, r = 64, 48, 8
    g = torch.Generator().manual_seed(9)
    base = torch.nn.Linear(D, O, bias=False).bfloat16()
    none = torch.empty(0, dtype=torch.int64)
    for ns in ([8, 6, 10], [8, 11]):
        N = sum(ns)
        router = torch.randn(N, D, generator=g)
        a = (torch.randn(N * r, D, generator=g) * 0.1).bfloat16()
        bt = (torch.randn(N * r, O, generator=g) * 0.1).bfloat16()
        off = torch.tensor([sum(ns[:i]) for i in range(len(ns))])
        ks = torch.tensor([2, 3, 2][: len(ns)])
        tables = (off, torch.tensor(ns), ks, torch.full((len(ns),), 0.5))
        call = cpu_ext.bind_module(base, router, a, bt, tables, r, 3)
        x = torch.randn(400, D, generator=g).bfloat16()
        runs = torch.arange(400) * len(ns) // 400
        runs[100:110] = -1
        for slots in (runs, torch.randint(-1, len(ns), (400,), generator=g)):
            got = {}
            try:
                with torch.inference_mode():
                    for name, tiles, lanes in (("rows", False, True), ("scalar", True, False), ("lanes", True, True)):
                        ext._fuse_route(tiles)
                        ext._route_lanes(lanes)
                        ext._route_tiles_calls()
                        got[name] = tuple(t.clone() for t in call.routed(x, slots, none))
                        assert (ext._route_tiles_calls() > 0) == (tiles and max(ns) <= 10), name  # (on the tiles?)
            finally:
                ext._fuse_route(True)
                ext._route_lanes(True)
            for name in ("scalar", "lanes"):
                assert torch.equal(got[name][1], got["rows"][1]) and torch.equal(got[name][0], got["rows"][0]), name
            idx = got["lanes"][1]
            for s, (o, n, k) in enumerate(zip(off.tolist(), ns, ks.tolist())):
                mine = slots == s
                logits = x[mine].double() @ router[o : o + n].double().t()
                top = logits.topk(k + 1, dim=1)
                clear = top.values[:, k - 1] - top.values[:, k] > 1e-4 * top.values.abs().max()
                assert clear.sum() > 10 and torch.equal(idx[mine][clear, :k], top.indices[clear, :k] + o)
            assert (idx[slots == -1] == -1).all()


@pytest.mark.parametrize("T", [128, 200, 513])
@pytest.mark.parametrize("D,O", [(64, 48), (96, 80)])
def test_bfloat16_delta_fused_into_amx_gemm(T, D, O):
    """From 128 rows, outside batch-invariant mode, a bfloat16 module call on a CPU with AMX-BF16 runs the ReMix delta
    inside the base GEMM's tiles (run_fused): y = round(x W^T + U B^T + bias), U rounded to bfloat16, one rounding.
    With a stack of three adapters of ranks 3, 8 and 24 (tokens of each, and tokens of none): the selections are the
    unfused path's; y is within two bfloat16 roundings (U's, y's) of the size of its terms from a float64 reference of
    those selections, as the unfused path is (which rounds x W^T, then the sum); every row is the same in another
    call of other rows (the batch reversed, with new rows between); a row with no selection gets the plain AMX
    GEMM's bits; the checked path (linear_route_gather) gives the raw path's bits; batch-invariant mode keeps the
    unfused path."""
    from remix.kernels import cpu_ext

    ext = _fused_calls_or_skip("bfloat16 calls keep phase B")
    n, ranks = 4, [3, 8, 24]
    r = max(ranks)
    g = torch.Generator().manual_seed(T + D)
    A, B = make_stack(ranks, n, D, O, torch.float32, seed=T + O)  # [3n, r, D], [3n, O, r], zero past each rank
    a = A.reshape(-1, D).bfloat16().contiguous()
    bt = (B.transpose(1, 2).reshape(-1, O) * 0.1).bfloat16().contiguous()  # a delta of about a tenth of x W^T
    router = torch.randn(3 * n, D, generator=g)
    per_lora = torch.tensor([rk for rk in ranks for _ in range(n)])
    omega = torch.tensor([0.5, 0.25, 1.0])
    tables = (torch.tensor([0, n, 2 * n]), torch.tensor([n, n, n]), torch.tensor([2, 3, 2]), omega)
    base = torch.nn.Linear(D, O, bias=True).bfloat16()
    call = cpu_ext.bind_module(base, router, a, bt, tables, r, 3, ranks=per_lora)
    x = torch.randn(T, D, generator=g).bfloat16()
    slots = torch.randint(-1, 3, (T,), generator=g)
    none = torch.empty(0, dtype=torch.int64)
    try:
        with torch.inference_mode():
            ext._fuse_from(0)
            y_old, i_old = (t.clone() for t in call.routed(x, slots, none))
            ext._fuse_from(128)
            y, idx = (t.clone() for t in call.routed(x, slots, none))
            ext._module_call_raw(False)
            y_checked, i_checked = (t.clone() for t in call.routed(x, slots, none))
            ext._module_call_raw(True)
            assert torch.equal(idx, i_old) and torch.equal(i_checked, idx) and torch.equal(y_checked, y)
            assert not torch.equal(y, y_old)  # (the two paths round differently)
            # float64 reference of the same selections
            w = torch.where(idx >= 0, omega[slots.clamp(min=0)][:, None].expand_as(idx), torch.zeros(()))
            ii = idx.clamp(min=0)
            u = torch.einsum("tkrd,td->tkr", a.double().view(3 * n, r, D)[ii], x.double()) * w.double()[..., None]
            bo = bt.double().view(3 * n, r, O)[ii]
            want = x.double() @ base.weight.double().t() + base.bias.double() + torch.einsum("tkr,tkro->to", u, bo)
            # the size of what is summed (a sum that cancels is only as exact as its terms): x W^T's terms, U B^T's
            size = (x.double().abs() @ base.weight.double().abs().t() + base.bias.double().abs()
                    + torch.einsum("tkr,tkro->to", u.abs(), bo.abs()))
            # bfloat16's unit roundoff is 2^-8: U's rounding costs at most 2^-8 of U B^T's terms, y's of |y|
            assert ((y.double() - want).abs() <= size * 2.0**-7).all()
            assert ((y_old.double() - want).abs() <= size * 2.0**-7).all()  # (the unfused path: the same bound)
            # each row the same in another call: the batch reversed, a new row after every third
            other = torch.randn(T, D, generator=g).bfloat16()
            order = list(range(T - 1, -1, -1))
            rows, where = [], {}
            for j, t in enumerate(order):
                where[t] = len(rows)
                rows.append(x[t])
                if j % 3 == 2:
                    rows.append(other[j])
            x2 = torch.stack(rows).contiguous()
            s2 = torch.full((x2.shape[0],), 1)
            for t, p in where.items():
                s2[p] = slots[t]
            y2, i2 = call.routed(x2, s2, none)
            pos = torch.tensor([where[t] for t in range(T)])
            assert torch.equal(y2[pos], y) and torch.equal(i2[pos], idx)
            # rows with no selection: the plain AMX GEMM's bits (batch-invariant mode: amx_gemm at every size)
            bare = (idx < 0).all(1)
            assert bare.any()
            was = ext._batch_invariant(True)
            try:
                assert torch.equal(cpu_ext.linear(x, base.weight, base.bias)[bare], y[bare])
                y_inv, i_inv = call.routed(x, slots, none)  # batch-invariant: phase B, as the small calls
                assert torch.equal(y_inv, y_old) and torch.equal(i_inv, idx)
            finally:
                ext._batch_invariant(was)
    finally:
        ext._fuse_from(128)
        ext._module_call_raw(True)


def test_fused_calls_route_on_tiles():
    """A fused call (bfloat16 on AMX, 128 rows or more) routes on the tiles: each float32 router split into three
    bfloat16 rows that sum to it, its slot's routers' logits of every routed token from the tiles, then each token's
    top k within its slot. With a ReMix adapter (n 8, k 2) and a plain LoRA (n 1: no routing) beside tokens of neither, the
    call runs fused (its y is not the unfused path's); the selections are a float64 top k's wherever the logits leave
    a margin (a router not split exactly would miss some), and route_rows' (no near-tie in these random logits), and so
    is y, bit for bit. The top k of a token block whose tokens share a slot, taken for its 16 tokens at once, is the
    token-by-token loop's: with equal routers (ties) and a NaN row too."""
    from remix.kernels import cpu_ext

    ext = _fused_calls_or_skip("no fused calls")
    D, O, r = 64, 48, 8
    g = torch.Generator().manual_seed(5)
    base = torch.nn.Linear(D, O, bias=False).bfloat16()
    router = torch.randn(9, D, generator=g)
    a = (torch.randn(9 * r, D, generator=g) * 0.1).bfloat16()
    bt = (torch.randn(9 * r, O, generator=g) * 0.1).bfloat16()
    tables = (torch.tensor([0, 8]), torch.tensor([8, 1]), torch.tensor([2, 1]), torch.tensor([0.5, 2.0]))
    call = cpu_ext.bind_module(base, router, a, bt, tables, r, 2)
    x = torch.randn(300, D, generator=g).bfloat16()
    slots = torch.randint(-1, 2, (300,), generator=g)
    none = torch.empty(0, dtype=torch.int64)
    try:
        with torch.inference_mode():
            got = {}
            for tiles in (False, True):
                ext._fuse_route(tiles)
                ext._route_tiles_calls()
                got[tiles] = tuple(t.clone() for t in call.routed(x, slots, none))
                assert (ext._route_tiles_calls() > 0) == tiles
            ext._fuse_from(0)
            y_unfused = call.routed(x, slots, none)[0].clone()
            ext._fuse_from(128)
            # a block of one slot's tokens takes its top k lane by lane, a mixed one token by token: the same picks
            # (ties to the lower index - LoRAs 2 and 3 of a second call have equal routers -, a NaN row's too)
            tie = router.clone()
            tie[3] = tie[2]
            call_tie = cpu_ext.bind_module(base, tie, a, bt, tables, r, 2)
            xn = x.clone()
            xn[7] = float("nan")
            runs = torch.where(torch.arange(300) < 200, 0, 1)
            runs[250:260] = -1
            for c, xx in ((call, x), (call_tie, xn)):
                for sl in (slots, runs):
                    lanes = {}
                    for on in (False, True):
                        ext._route_lanes(on)
                        lanes[on] = tuple(t.clone() for t in c.routed(xx, sl, none))
                    assert torch.equal(lanes[False][1], lanes[True][1])
                    assert torch.equal(lanes[False][0].nan_to_num(7.0), lanes[True][0].nan_to_num(7.0))
            picks = call_tie.routed(x, runs, none)[1][:200]
            first = (picks[:, 0] == 2) | (picks[:, 0] == 3)  # LoRAs 2 and 3 tie: where one is first, both are picked,
            assert first.sum() > 10 and (picks[first, 0] == 2).all() and (picks[first, 1] == 3).all()  # lower first
    finally:
        ext._fuse_route(True)
        ext._fuse_from(128)
        ext._route_lanes(True)
    (y0, i0), (y1, i1) = got[False], got[True]
    assert not torch.equal(y1, y_unfused)  # (the call did run fused)
    logits = x.double() @ router[:8].double().t()
    top = logits.topk(3, dim=1)
    clear = (slots == 0) & (top.values[:, 1] - top.values[:, 2] > 1e-4 * top.values.abs().max())
    assert clear.sum() > 50 and torch.equal(i1[clear, :2], top.indices[clear, :2])
    assert torch.equal(i0, i1) and torch.equal(y0, y1)
    assert (i1[slots == 1, 0] == 8).all() and (i1[slots == -1] == -1).all() and (i1[slots == 0] >= 0).all()


def _bound_ffn_calls(dtype, adapters, g):
    """A layer's three FFN module calls of the default base's shapes, each with its own pools of `adapters` ReMix
    adapters (n 8, k 2, r 8), as scripts/ab_modules.py binds them: [(call, d_in)]."""
    from remix.kernels import cpu_ext

    calls = []
    for D, O in [(576, 1536), (576, 1536), (1536, 576)]:
        base = torch.nn.Linear(D, O, bias=False).to(dtype)
        with torch.no_grad():
            base.weight.copy_((torch.randn(O, D, generator=g) * D**-0.5).to(dtype))
        N = 8 * adapters
        router = torch.randn(N, D, generator=g) * 0.05
        a = (torch.randn(N * 8, D, generator=g) * 0.05).to(cpu_ext.pool_dtype(dtype))
        bt = (torch.randn(N * 8, O, generator=g) * 0.05).to(cpu_ext.pool_dtype(dtype))
        tables = (torch.arange(adapters) * 8, torch.full((adapters,), 8), torch.full((adapters,), 2),
                  torch.full((adapters,), 0.5))
        calls.append((cpu_ext.bind_module(base, router, a, bt, tables, 8, 2), D))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uneven_output_splits_give_every_output_the_even_splits_bits(dtype):
    """The splits weighted by the threads' speeds (_split_fixed sets the shares): a routed module call (its base GEMM
    and phase B by output slices, routing by tokens or router units, phase A by LoRA blocks or AMX row tiles, all at
    the shares) and the plain linear give the same bits under shares of 0.3 / 0.7, 0.95 / 0.05 and all to one thread
    as under the even split, at 1 to 200 rows (the small-batch split, the token shares from 64 rows), one and four
    adapters. Each output is summed in one order whatever its slice; only which thread computes it moves. (And the
    shares are in effect: with all on one thread, the module clock has the other's GEMM slices empty.)"""
    from remix.kernels import cpu_ext

    ext = _compiled()
    if dtype == torch.bfloat16 and not ext.dot_gemm(True):
        pytest.skip("no AVX512-BF16 here: bfloat16 calls take ATen's GEMM")
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: nothing to split")
    g = torch.Generator().manual_seed(11)
    none = torch.empty(0, dtype=torch.int64)
    try:
        with torch.inference_mode():
            for adapters in (1, 4):
                calls = _bound_ffn_calls(dtype, adapters, g)
                weights = {(D, O): (torch.randn(O, D, generator=g) * D**-0.5).to(dtype) for D, O in [(576, 1536), (1536, 576), (576, 3072)]}
                for T in (1, 3, 8, 16, 32, 64, 100, 200):
                    xs = {D: torch.randn(T, D, generator=g).to(dtype) for D in (576, 1536)}
                    slots = torch.arange(T) % adapters

                    def outputs():
                        out = [y.clone() for call, D in calls for y in call.routed(xs[D], slots, none)]
                        return out + [cpu_ext.linear(xs[D], w) for (D, O), w in weights.items()]

                    ext._split_adapt(False)
                    even = outputs()
                    ext._split_adapt(True)
                    for shares in ([0.3, 0.7], [0.95, 0.05], [1.0, 0.0], [0.0, 1.0]):
                        ext._split_fixed(shares)
                        assert ext._split_state() == pytest.approx(shares, abs=1e-3)
                        cpu_ext.module_clock(True)
                        for i, (a, b) in enumerate(zip(even, outputs())):
                            assert torch.equal(a, b), (adapters, T, shares, i)
                        gemm = [t["gemm"] for t in cpu_ext.module_clock(False)[0]] + [0.0, 0.0]
                        if T == 32 and 0.0 in shares:  # the shares took effect: the idle thread's GEMM slices empty
                            busy, idle = shares.index(1.0), shares.index(0.0)
                            assert gemm[idle] < gemm[busy] / 10, (adapters, shares, gemm)
                        ext._split_fixed([])
    finally:
        cpu_ext.module_clock(False)
        ext._split_fixed([])
        ext._split_adapt(True)


def test_uneven_output_splits_leave_the_engines_outputs_unchanged():
    """The engine end to end (tests/kernel_outputs.py's engine_outputs: two ReMix adapters and the bare base served
    together on the tiny model, greedy and seeded-sampled, so the decode stack's layers, the gate / up pair and the
    LM head all run split) gives the same tokens and log-probabilities with one thread's share at 0.2 as with even
    splits."""
    ext = _compiled()
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: nothing to split")
    from tests.kernel_outputs import engine_outputs

    was = ext._batch_invariant(False)
    try:
        ext._split_adapt(False)
        even = engine_outputs()
        ext._split_adapt(True)
        ext._split_fixed([0.2, 0.8])
        skewed = engine_outputs()
    finally:
        ext._split_fixed([])
        ext._split_adapt(True)
        ext._batch_invariant(was)
    assert even.keys() == skewed.keys()
    for name in even:
        assert torch.equal(even[name], skewed[name]), name


def test_output_split_weights_follow_the_threads_measured_speeds():
    """The split's controller (_split_feed: the threads' GEMM ticks and multiply-adds for one window, as the meters add
    them, then an update). A window moves the weights only where the window before agrees: one window of a skewed
    thread moves nothing. Speeds within 8 % of each other (shares within 0.02 of even) keep even splits; a thread at
    half the other's speed for two windows moves the shares half way to the speeds' shares (2/3 : 1/3 -> 0.583, then
    0.625); the other way round, the first window holds and the second moves from the two windows' mean (0.5 : 0.5 ->
    0.5625); a thread ten times slower is held at half an even share; two windows of equal speeds bring even back; a
    thread with nothing timed leaves everything as it was; three threads keep shares that sum to one."""
    ext = _compiled()
    one = [1e6, 1e6]
    try:
        ext._split_fixed([])
        assert ext._split_feed([1000, 2000], one) and ext._split_state() == []  # one window: held
        assert ext._split_feed([1000, 1070], one) and ext._split_state() == []  # disagrees: held
        assert ext._split_feed([1000, 1070], one) and ext._split_state() == []  # two within 8 %: even
        assert ext._split_feed([1000, 1100], one) and ext._split_state() == []  # 10 %: one window, held
        assert ext._split_feed([1000, 1100], one) and ext._split_state()[0] > 0.5  # two: off even
        ext._split_fixed([])
        ext._split_feed([1000, 2000], one)
        assert ext._split_feed([1000, 2000], one)
        assert ext._split_state() == pytest.approx([7 / 12, 5 / 12], abs=1e-3)
        assert ext._split_feed([1000, 2000], one)
        assert ext._split_state() == pytest.approx([0.625, 0.375], abs=1e-3)
        assert ext._split_feed([2000, 1000], one)  # the other way: from the mean of this window and the last
        assert ext._split_state() == pytest.approx([0.5625, 0.4375], abs=1e-3)
        assert not ext._split_feed([1000, 0], [1e6, 0])  # thread 1 untimed: nothing read
        assert ext._split_state() == pytest.approx([0.5625, 0.4375], abs=1e-3)
        ext._split_fixed([])
        for _ in range(8):
            ext._split_feed([1000, 10000], one)
        assert ext._split_state() == pytest.approx([0.75, 0.25], abs=1e-3)
        assert ext._split_feed([1000, 1000], one) and ext._split_state() == pytest.approx([0.75, 0.25], abs=1e-3)
        assert ext._split_feed([1000, 1000], one) and ext._split_state() == []
        ext._split_feed([1000, 1000, 3000], [1e6] * 3)
        assert ext._split_feed([1000, 1000, 3000], [1e6] * 3)  # three threads: each within [1/6, 1/2]
        state = ext._split_state()
        assert len(state) == 3 and sum(state) == pytest.approx(1.0) and state[2] < state[0] == pytest.approx(state[1], abs=1e-3)
    finally:
        ext._split_fixed([])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_items_by_length_and_speed_give_the_same_bits(dtype):
    """The decode attention's items (a row's key/value head) go to the threads by length (each item its row's length
    plus a fixed cost) at the output splits' speed weights: rows of very different lengths, under even weights and
    under shares of 0.2 / 0.8, 0.9 / 0.1 and all to one thread, give the bits of each row computed alone - float32,
    bfloat16 and the 8-bit cache."""
    from server.engine.cache import quantize_kv, to_key_blocks

    ext = _compiled()
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: nothing to split")
    g = torch.Generator().manual_seed(5)
    S, P, Hkv, nrep, Dh = 9, 320, 3, 3, 64
    Hq = Hkv * nrep
    K, V = torch.randn(S, Hkv, P, Dh, generator=g).to(dtype), torch.randn(S, Hkv, P, Dh, generator=g).to(dtype)
    K8, Ks = quantize_kv(torch.randn(S, Hkv, P, Dh, generator=g))
    K8 = to_key_blocks(K8)
    V8, Vs = quantize_kv(torch.randn(S, Hkv, P, Dh, generator=g))
    qk = torch.randn(S, Hq + 2 * Hkv, Dh, generator=g).to(dtype)
    lens = torch.tensor([300, 3, 7, 1, 290, 16, 2, 311, 5])
    calls = {"cache": lambda q, row0, ln: ext.decode_attention(q, K, V, row0, ln, Hq, Dh**-0.5),
             "8-bit": lambda q, row0, ln: ext.decode_attention_q8(q, K8, V8, Ks, Vs, row0, ln, Hq, Dh**-0.5)}
    try:
        for name, call in calls.items():
            alone = [call(qk[i : i + 1].contiguous(), i, lens[i : i + 1])[0] for i in range(S)]
            for shares in (None, [0.2, 0.8], [0.9, 0.1], [1.0, 0.0]):
                ext._split_fixed(shares or [])
                out = call(qk, 0, lens)
                for i in range(S):
                    assert torch.equal(out[i], alone[i]), (name, shares, i)
    finally:
        ext._split_fixed([])


def test_split_adapt_env_off_keeps_even_splits():
    """REMIX_SPLIT_ADAPT=0 in the environment: the kernels load with the speed-weighted split off (every split even);
    unset, it is on."""
    import os
    import subprocess
    import sys

    _compiled()
    code = "from remix.kernels import cpu_ext; print(cpu_ext.load()._split_adapt(True))"
    env = {k: v for k, v in os.environ.items() if k != "REMIX_SPLIT_ADAPT"}
    off = subprocess.run([sys.executable, "-c", code], env={**env, "REMIX_SPLIT_ADAPT": "0"}, capture_output=True,
                         text=True, check=True, timeout=300)
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=300)
    assert off.stdout.strip() == "False" and on.stdout.strip() == "True"
