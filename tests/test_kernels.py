import itertools

import pytest
import torch

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


def test_token_result_does_not_depend_on_batch_mates():
    """A token alone equals the same token inside a batch of mixed adapters (identical selections)."""
    n, k, adapters = 8, 2, 4
    A, B = make_stack([8, 8, 4, 2], n, 64, 96, torch.float32)
    idx, group = make_ids(50, k, n, adapters, none_rate=0.1)
    x = torch.randn(50, 64)
    omega = torch.full((50,), 0.125)
    ranges = [(a * n, (a + 1) * n) for a in range(adapters)]
    batch = lora_gather_grouped(x, A, B, idx, omega, group, ranges)
    dense = lora_gather(x, A, B, idx, omega)
    for t in range(50):
        s = slice(t, t + 1)
        alone = lora_gather_grouped(x[s], A, B, idx[s], omega[s], group[s], ranges)
        torch.testing.assert_close(batch[s], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dense[s], lora_gather(x[s], A, B, idx[s], omega[s]), atol=1e-5, rtol=1e-5)


def test_gradients_match_reference():
    A, B = make_stack([4], 4, 8, 6, torch.float64)
    idx, _ = make_ids(6, 2, 4, 1, none_rate=0.2)
    x = torch.randn(6, 8, dtype=torch.float64)
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


@pytest.mark.parametrize("T,n,k,r", [(1, 8, 2, 8), (33, 8, 2, 8), (300, 6, 3, 4), (5, 1, 1, 2), (7, 64, 4, 1)])
def test_routing_op_matches_torch_ops(T, n, k, r):
    from remix.kernels import cpu_ext, topk_masked_u, topk_masked_u_torch

    pu = torch.randn(T, n + n * r)
    pu[0, :n] = 1.0  # a row of ties: the lower indices must win
    want_um, want_idx = topk_masked_u_torch(pu, n, k, 0.3)
    assert want_idx[0].tolist() == list(range(k))
    got_um, got_idx = topk_masked_u(pu, n, k, 0.3)
    assert torch.equal(got_idx, want_idx)
    torch.testing.assert_close(got_um, want_um, atol=0, rtol=0)
    if cpu_ext.available():  # also on a strided view (rows of a wider tensor), as the fused path passes it
        wide = torch.randn(T, 5 + n + n * r)
        view = wide[:, 5:]
        um, idx = cpu_ext.load().topk_masked_u(view, n, k, 0.3)
        want_um, want_idx = topk_masked_u_torch(view.contiguous(), n, k, 0.3)
        assert torch.equal(idx, want_idx) and torch.equal(um, want_um)


def test_routing_op_rejects_bad_input():
    from remix.kernels import cpu_ext

    if not cpu_ext.available():
        pytest.skip("C++ routing op not built here")
    with pytest.raises(RuntimeError, match="float32"):
        cpu_ext.load().topk_masked_u(torch.zeros(2, 24, dtype=torch.float64), 8, 2, 1.0)
