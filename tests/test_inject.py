import pytest
import torch

import remix
from remix.inject import find_targets


def test_default_targets_are_the_ffn(tiny):
    model, _ = tiny
    names = find_targets(model, remix.MixtureConfig().targets)
    assert names == [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]


def test_regex_targets(tiny):
    model, _ = tiny
    assert find_targets(model, ["re:model\\.layers\\.1\\.self_attn\\.(q|v)_proj"]) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_fresh_pools_keep_logits_and_unwrap_restores(tiny, device):
    model, tok = tiny
    model.to(device)
    ids = tok(["the quick brown fox", "jumps"], return_tensors="pt", padding=True).to(device)
    with torch.no_grad():
        before = model(**ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = remix.inject(model, remix.MixtureConfig(n=4, k=2, r=4))
    assert len(layers) == 6
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n or "router" in n) for n in trainable)
    from remix.kernels import cpu_ext

    for mode in ("train", "eval"):
        getattr(model, mode)()
        with torch.no_grad(), cpu_ext.disabled():  # the torch paths: the base layer as it was, plus exactly zero
            assert torch.equal(model(**ids).logits, before)
    if device == "cpu" and cpu_ext.available():
        # the compiled call (what eval uses on CPU) runs the base GEMM on the project's own kernel, which sums in
        # another order than ATen's linear: each layer adds exactly nothing to that kernel's output, and the logits
        # agree with the unwrapped model's to rounding
        with torch.no_grad():
            for layer in layers.values():
                x = torch.randn(3, layer.in_features)
                assert torch.equal(layer(x), cpu_ext.linear(x, layer.base.weight, layer.base.bias))
            torch.testing.assert_close(model(**ids).logits, before, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_()
        assert not torch.allclose(model(**ids).logits, before)
    remix.unwrap(model)
    assert not remix.wrapped_layers(model)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, before)


def test_errors(tiny):
    model, _ = tiny
    from remix.inject import NoTargets

    with pytest.raises(NoTargets,  # (a ValueError: training.fit names --targets with it)
                       match=r"no nn.Linear module matches targets \['nothing_here'\] \(the model's linear modules end "
                             r"in down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj; a 're:' target"):
        remix.inject(model, remix.MixtureConfig(targets=["nothing_here"]))
    # one target that selects nothing beside others that do (a typo: "dwn_proj" would leave down_proj without a pool)
    with pytest.raises(NoTargets, match=r"targets \['dwn_proj', 're:.*\.nope'\] match no nn.Linear module \(of targets "
                                        r"\['gate_proj', 'dwn_proj', 're:.*\.nope'\]; the model's linear modules end in"):
        remix.inject(model, remix.MixtureConfig(targets=["gate_proj", "dwn_proj", "re:.*\\.nope"]))
    assert not remix.wrapped_layers(model)  # (refused before anything was wrapped)
    remix.inject(model, remix.MixtureConfig())
    with pytest.raises(ValueError, match="already has"):
        remix.inject(model, remix.MixtureConfig())
