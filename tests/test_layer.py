import pytest
import torch
import torch.nn as nn

from remix import routing
from remix.config import MixtureConfig
from remix.kernels import lora_gather_reference
from remix.layer import make_layer


def layer_with_weights(router="remix", n=6, k=2, r=4, d_in=16, d_out=12, seed=0, device="cpu", **kw):
    torch.manual_seed(seed)
    layer = make_layer(nn.Linear(d_in, d_out), MixtureConfig(router=router, n=n, k=k, r=r, **kw))
    with torch.no_grad():
        layer.lora_B.normal_()  # a trained adapter: B != 0
    return layer.to(device)


def test_fresh_adapter_is_exact_noop(device):
    base = nn.Linear(16, 12)
    layer = make_layer(base, MixtureConfig(n=4, k=2, r=4)).to(device)
    x = torch.randn(3, 5, 16, device=device)
    for mode in (layer.train, layer.eval):
        mode()
        assert torch.equal(layer(x), base(x))


def test_base_is_frozen_and_pools_have_the_contract_shapes():
    layer = layer_with_weights()
    assert not any(p.requires_grad for p in layer.base.parameters())
    assert layer.lora_A.shape == (6, 4, 16) and layer.lora_B.shape == (6, 12, 4) and layer.router.shape == (6, 16)


@pytest.mark.parametrize("mode,alpha,k,r,want", [("lora", 2.0, 2, 8, 2 / 16), ("rslora", 2.0, 2, 8, 2 / 4), (0.3, 2.0, 2, 8, 0.3)])
def test_omega(mode, alpha, k, r, want):
    assert MixtureConfig(n=8, k=k, r=r, omega=mode, alpha=alpha).omega_value() == pytest.approx(want)


def test_eval_is_topk_with_constant_weight(device):
    layer = layer_with_weights(device=device).eval()
    x = torch.randn(10, 16, device=device)
    with torch.no_grad():
        y = layer(x)
    idx = routing.topk_lower_index(x @ layer.router.T, 2)
    want = layer.base(x) + lora_gather_reference(x, layer.lora_A, layer.lora_B, idx, layer.omega)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.last_idx, idx)
    assert layer.last_log_q is None


def test_inference_fast_path_equals_generic_path_and_follows_updates(device):
    layer = layer_with_weights(device=device).eval()
    x = torch.randn(2, 7, 16, device=device)
    with torch.no_grad():
        fast = layer(x)
    generic = layer(x)  # grad enabled: the generic (autograd) path
    torch.testing.assert_close(fast, generic.detach(), atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        layer.lora_B.mul_(2.0)  # an in-place update must invalidate the cached [P; A] / B_flat
        torch.testing.assert_close(layer(x), layer.base(x) + 2 * (fast - layer.base(x)), atol=1e-5, rtol=1e-5)


def test_every_inference_path_agrees(device):
    """The compiled kernel, the torch-ops path and the autograd path give the same outputs and selections,
    also for a bfloat16 model (where the kernel keeps routing and the delta in float32)."""
    from remix.kernels import cpu_ext

    layer = layer_with_weights(n=8, k=3, r=4, d_in=40, d_out=36, device=device).eval()
    x = torch.randn(5, 9, 40, device=device)
    with torch.no_grad():
        fast = layer(x)
        fast_idx = layer.last_idx
        with cpu_ext.disabled():
            torch_path = layer(x)
        assert torch.equal(layer.last_idx, fast_idx)
    generic = layer(x)
    torch.testing.assert_close(fast, torch_path, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, generic.detach(), atol=1e-5, rtol=1e-5)
    if cpu_ext.available() or device.type == "cuda":
        layer.to(torch.bfloat16)
        with torch.no_grad():
            low = layer(x.to(torch.bfloat16))
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), fast, atol=0.15, rtol=0.05)


def test_training_samples_per_token_and_keeps_log_q(device):
    layer = layer_with_weights(device=device).train()
    x = torch.randn(4, 9, 16, device=device)
    torch.manual_seed(1)
    y = layer(x)
    assert y.shape == (4, 9, 12)
    assert layer.last_log_q.shape == (4, 9)
    idx = layer.last_idx
    assert idx.shape == (36, 2) and (idx[:, 0] != idx[:, 1]).all()
    # log Q is the Plackett–Luce log-probability of what was drawn, from q = softmax(P x)
    lp = torch.log_softmax(x.reshape(-1, 16) @ layer.router.T, -1)
    torch.testing.assert_close(layer.last_log_q.reshape(-1), routing.plackett_luce_log_prob(lp, idx))
    # and the output uses exactly those selections with weight ω
    want = layer.base(x.reshape(-1, 16)) + lora_gather_reference(x.reshape(-1, 16), layer.lora_A, layer.lora_B, idx, layer.omega)
    torch.testing.assert_close(y.reshape(-1, 12), want, atol=1e-5, rtol=1e-5)
    # different tokens draw different selections (not one selection per batch)
    assert len({tuple(s) for s in idx.tolist()}) > 5


@pytest.mark.parametrize("router", ["remix", "softmax-topk", "lora"])
def test_float32_pools_around_a_bfloat16_base(router):
    """training.fit --dtype bfloat16: the base in bfloat16, the pools and router float32 master weights
    (``pools_to``). Training (autograd on) casts the pools to bfloat16 for the step, as autocast casts weights, and
    their gradients come back float32 (log Q's to the router too); evaluating (no autograd) computes the delta in
    float32 from the bfloat16 input, adds the base's output and rounds the sum once, as the server does."""
    from remix.kernels.torch_ops import lora_gather

    layer = layer_with_weights(router=router, **({"n": 1, "k": 1} if router == "lora" else {}))
    layer.base.to(torch.bfloat16)
    for name in ("lora_A", "lora_B", "router"):  # (what inject makes around a bfloat16 base)
        if getattr(layer, name) is not None:
            getattr(layer, name).data = getattr(layer, name).data.bfloat16()
    layer.pools_to(torch.float32)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in (layer.lora_A, layer.lora_B))
    x = torch.randn(3, 5, 16).bfloat16().requires_grad_(True)
    x2 = x.detach().reshape(-1, 16)

    def reference() -> torch.Tensor:  # float32 delta on this call's selections, plus the base, one rounding
        w = layer.last_weights if layer.last_weights is not None else layer.omega
        delta = lora_gather_reference(x2.float(), layer.lora_A.detach(), layer.lora_B.detach(), layer.last_idx, w)
        return (layer.base(x2).float() + delta).bfloat16()

    for mode in ("train", "eval"):
        getattr(layer, mode)()
        with torch.no_grad():
            y = layer(x)
        assert y.dtype == torch.bfloat16 and y.shape == (3, 5, 12)
        assert torch.equal(y.reshape(-1, 12), reference()), mode
    layer.train()
    y = layer(x)
    w = layer.last_weights if layer.last_weights is not None else layer.omega
    with torch.no_grad():
        want = lora_gather(x2, layer.lora_A.bfloat16(), layer.lora_B.bfloat16(), layer.last_idx, w, out=layer.base(x2))
        assert torch.equal(y.detach().reshape(-1, 12), want)
        torch.testing.assert_close(y.detach().reshape(-1, 12).float(), reference().float(), atol=0.05, rtol=0.02)
    (y.float().sum() + (layer.last_log_q.sum() if router == "remix" else 0)).backward()
    assert layer.lora_B.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_A.grad.abs().sum() > 0  # (B is random here)
    assert x.grad is not None and x.grad.dtype == torch.bfloat16  # the frozen base still passes the gradient on
    if router == "remix":
        assert layer.router.grad.dtype == torch.float32 and layer.router.grad.abs().sum() > 0


def test_log_q_surrogate_reaches_only_the_router():
    layer = layer_with_weights().train()
    x = torch.randn(3, 4, 16, requires_grad=True)
    layer(x)
    layer.last_log_q.sum().backward()
    assert layer.router.grad is not None and layer.router.grad.abs().sum() > 0
    assert layer.lora_A.grad is None and layer.lora_B.grad is None
    assert x.grad is None  # stopgrad(x): nothing flows to earlier layers


def test_loss_gradient_reaches_selected_loras_only(device):
    layer = layer_with_weights(n=6, device=device).train()
    x = torch.randn(1, 1, 16, device=device)
    layer(x).sum().backward()
    chosen = set(layer.last_idx.flatten().tolist())
    for i in range(6):
        nonzero = bool(layer.lora_A.grad[i].abs().sum() > 0)
        assert nonzero == (i in chosen)
    assert layer.router.grad is None  # the constant weights give the router no loss gradient


def test_sample_override():
    layer = layer_with_weights().eval()
    layer.sample = True
    torch.manual_seed(0)
    layer(torch.randn(5, 16))
    assert layer.last_log_q is not None


def test_softmax_topk_weights_renormalised_and_load_balance_loss():
    layer = layer_with_weights("softmax-topk", load_balance_coef=0.01).train()
    x = torch.randn(20, 16)
    y = layer(x)
    w = layer.last_weights
    torch.testing.assert_close(w.sum(-1), torch.full((20,), layer.omega))
    probs = torch.softmax(x @ layer.router.T, -1)
    top = torch.sort(probs, dim=-1, descending=True, stable=True)
    assert torch.equal(layer.last_idx, top.indices[:, :2])
    want = layer.base(x) + lora_gather_reference(x, layer.lora_A, layer.lora_B, layer.last_idx, w)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    # aux = n * sum_i f_i * mean p_i ; it is 1 exactly when routing is uniform
    frac = torch.bincount(layer.last_idx.flatten(), minlength=6).float() / 40
    torch.testing.assert_close(layer.aux_loss, 6 * (frac * probs.mean(0)).sum())
    y.sum().backward()
    assert layer.router.grad.abs().sum() > 0  # learned weights: the router trains from the loss


def test_dense_uses_all_loras_with_softmax_weights():
    layer = layer_with_weights("dense").eval()
    x = torch.randn(8, 16)
    y = layer(x)
    probs = torch.softmax(x @ layer.router.T, -1)
    want = layer.base(x) + lora_gather_reference(x, layer.lora_A, layer.lora_B, torch.arange(6).expand(8, 6), probs * layer.omega)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_plain_lora():
    layer = layer_with_weights("lora", n=1, k=1, r=8).eval()
    x = torch.randn(8, 16)
    want = layer.base(x) + (2.0 / 8) * (x @ layer.lora_A[0].T @ layer.lora_B[0].T)
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    assert layer.router is None


def test_recording_usage_and_ess():
    remix_layer = layer_with_weights().eval()
    remix_layer.record = True
    with torch.no_grad():
        remix_layer(torch.randn(50, 16))
    assert int(remix_layer.usage.sum()) == 100  # 50 tokens x k = 2
    assert remix_layer.mean_ess() == 2.0  # constant weights: ESS is k exactly
    topk = layer_with_weights("softmax-topk").eval()
    topk.record = True
    with torch.no_grad():
        topk(torch.randn(50, 16))
    assert 1.0 <= topk.mean_ess() <= 2.0
    topk.reset_stats()
    assert int(topk.usage.sum()) == 0


def test_invalid_config_names_every_field():
    with pytest.raises(ValueError) as e:
        MixtureConfig(router="nope", n=0, r=-1, omega="bad").validate()
    for field in ("router", "n:", "r:", "omega"):
        assert field in str(e.value)


def test_compiled_module_call_follows_the_base_and_steps_aside():
    """The bound C++ call (base GEMM + routing + gather in one crossing) gives the torch path's result and steps aside
    whenever it must: an in-place change of any weight, a replaced base weight, a hook on the base, autograd."""
    from remix.kernels import cpu_ext

    if not cpu_ext.available():
        pytest.skip("no compiled kernels here")
    layer = layer_with_weights(n=8, k=2, r=4, d_in=40, d_out=36).eval()  # the base has a bias
    x = torch.randn(3, 5, 40)

    def check():
        with torch.no_grad():
            got = layer(x)
            with cpu_ext.disabled():
                want = layer(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    check()
    assert layer._call is not None  # bound on first use
    with torch.no_grad():
        layer.base.weight.mul_(0.5)  # in place: the call's watch sees the version change and the layer rebinds
        layer.router.mul_(-1.0)
    check()
    layer.base.weight = nn.Parameter(layer.base.weight.detach() * 2, requires_grad=False)  # a new tensor
    check()
    seen = []
    handle = layer.base.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    check()
    assert seen  # the base ran as a module, so its hook fired
    handle.remove()
    xg = x.clone().requires_grad_()
    out = layer(xg)  # autograd through the base: the compiled call must not take it
    assert out.requires_grad
    out.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_call_computes_what_every_later_call_does(dtype):
    """The first top-k forward binds the compiled call and takes it at once: the base GEMM of every call is the same
    kernel, so a layer's output does not change (not even by an ulp) between its first call and the next."""
    from remix.kernels import cpu_ext

    if not cpu_ext.available():
        pytest.skip("no compiled kernels here")
    for T in (1, 8, 32, 300):
        layer = layer_with_weights(n=8, k=2, r=4, d_in=64, d_out=96).to(dtype).eval()
        x = torch.randn(T, 64).to(dtype)
        with torch.no_grad():
            first = layer(x)
            assert layer._call is not None
            assert torch.equal(first, layer(x)), T


@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_module_call_equals_torch_path_on_every_split(threads):
    """The bound call runs the base GEMM inside the kernel's region: on one thread (serial), below 64 tokens (GEMM
    by output slice, then phase B on the same slice) and from 64 tokens (GEMM by slice, barrier, gather by token).
    Each equals the torch path (ATen's GEMM + torch ops), with a bias and a ragged last output slice (36 = 32 + 4)."""
    from remix.kernels import cpu_ext

    if not cpu_ext.available():
        pytest.skip("no compiled kernels here")
    layer = layer_with_weights(n=8, k=2, r=4, d_in=40, d_out=36).eval()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for T in (1, 5, 63, 64, 150):
            x = torch.randn(T, 40)
            with torch.no_grad():
                got = layer(x)
                assert layer._call is not None  # the compiled call took it
                with cpu_ext.disabled():
                    want = layer(x)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"T={T}")
    finally:
        torch.set_num_threads(before)
