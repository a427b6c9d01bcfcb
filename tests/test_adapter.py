import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import remix
from remix.adapter import CONFIG_FILE, WEIGHTS_FILE, AdapterError, read_config
from remix.models import tiny_model


def trained_adapter(model, router="remix", seed=1):
    cfg = remix.MixtureConfig(router=router, n=4 if router != "lora" else 1, k=2, r=4)
    layers = remix.inject(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            for p in layer.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return layers


@pytest.mark.parametrize("router", ["remix", "softmax-topk", "dense", "lora"])
def test_round_trip_is_bit_exact(tmp_path, router):
    model, tok = tiny_model()
    trained_adapter(model, router)
    model.eval()
    ids = tok(["hello there", "general"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = model(**ids).logits
    path = remix.save_adapter(model, tmp_path / "adapter", training={"steps": 3})
    config = read_config(path)
    assert config["format"] == "remix-adapter" and config["router"] == router and config["training"] == {"steps": 3}
    assert config["base_model"]["name"] == "tiny"

    fresh, _ = tiny_model()
    layers = remix.load_adapter(fresh, path)
    saved = load_file(str(path / WEIGHTS_FILE))
    for name, layer in layers.items():
        assert torch.equal(layer.lora_A, saved[f"{name}.lora_A"])
        assert torch.equal(layer.lora_B, saved[f"{name}.lora_B"])
        assert not layer.training
    with torch.no_grad():
        assert torch.equal(fresh(**ids).logits, want)


def test_save_overwrites_atomically(tmp_path):
    model, _ = tiny_model()
    trained_adapter(model)
    path = tmp_path / "a"
    remix.save_adapter(model, path)
    remix.save_adapter(model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary directories left behind
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


def _saved(tmp_path):
    model, _ = tiny_model()
    trained_adapter(model)
    return remix.save_adapter(model, tmp_path / "adapter")


def test_every_problem_is_reported_at_once(tmp_path):
    path = _saved(tmp_path)
    tensors = load_file(str(path / WEIGHTS_FILE))
    tensors["model.layers.0.mlp.up_proj.lora_B"] = torch.zeros(4, 128, 5)  # wrong shape (r 5 instead of 4)
    del tensors["model.layers.1.mlp.down_proj.router"]  # missing tensor
    save_file(tensors, str(path / WEIGHTS_FILE))
    with pytest.raises(AdapterError) as e:
        remix.load_adapter(tiny_model()[0], path)
    msg = str(e.value)
    assert "2 problem(s)" in msg
    assert "tensor model.layers.0.mlp.up_proj.lora_B: shape [4, 128, 5], expected [4, 128, 4]" in msg
    assert "tensor model.layers.1.mlp.down_proj.router: missing" in msg


def test_config_and_base_mismatches_are_listed(tmp_path):
    path = _saved(tmp_path)
    config = json.loads((path / CONFIG_FILE).read_text())
    config["k"] = 9  # k > n
    config["modules"]["model.layers.7.mlp.gate_proj"] = [64, 128]  # no such layer in the base
    config["modules"]["model.layers.0.mlp.up_proj"] = [64, 999]  # wrong size
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(AdapterError) as e:
        remix.load_adapter(tiny_model()[0], path)
    problems = e.value.problems
    assert any(p.startswith("k: must be <= n") for p in problems)
    assert any("model.layers.7.mlp.gate_proj: not found" in p for p in problems)
    assert any("model.layers.0.mlp.up_proj: adapter has [d_in, d_out] = [64, 999]" in p for p in problems)


def test_different_base_weights_are_refused(tmp_path):
    path = _saved(tmp_path)
    other, _ = tiny_model(seed=5)
    with pytest.raises(AdapterError, match="different weights"):
        remix.load_adapter(other, path)
    remix.load_adapter(other, path, check_fingerprint=False)  # the operator may override


def test_truncated_file_gives_clear_error(tmp_path):
    path = _saved(tmp_path)
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        remix.load_adapter(tiny_model()[0], path)


def test_pickle_file_gives_clear_error(tmp_path):
    path = _saved(tmp_path)
    torch.save({"x": torch.zeros(2)}, path / WEIGHTS_FILE)
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        remix.load_adapter(tiny_model()[0], path)


def test_missing_files(tmp_path):
    with pytest.raises(AdapterError, match="is not a directory"):
        remix.load_adapter(tiny_model()[0], tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        remix.load_adapter(tiny_model()[0], tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        remix.load_adapter(tiny_model()[0], tmp_path / "bad")


def test_model_is_untouched_when_loading_fails(tmp_path):
    path = _saved(tmp_path)
    (path / WEIGHTS_FILE).write_bytes(b"garbage")
    model, _ = tiny_model()
    with pytest.raises(AdapterError):
        remix.load_adapter(model, path)
    assert not remix.wrapped_layers(model)
