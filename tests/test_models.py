import time

import pytest
import torch

import remix
from remix.models import fingerprint, tiny_tokenizer


def test_tiny_tokenizer_round_trips_bytes_and_has_chat_template():
    tok = tiny_tokenizer()
    text = "héllo, wörld ✓"
    ids = tok(text).input_ids
    assert max(ids) < 256 and tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token_id == 258 and tok.pad_token_id == 256


def test_load_base_tiny_and_errors(tmp_path):
    model, tok = remix.load_base("tiny")
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    with pytest.raises(FileNotFoundError, match="neither"):
        remix.load_base(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        remix.load_base(str(tmp_path / "missing.gguf"))


def test_a_base_that_cannot_be_loaded_is_one_message_naming_it(tmp_path):
    """A directory that is not a model, a model directory without weights or without a tokenizer, a file that is
    not GGUF: each a BaseModelError (a FileNotFoundError, which the command lines print as one line) naming the
    spec and why, not a traceback from inside transformers."""
    (tmp_path / "plain").mkdir()
    with pytest.raises(remix.BaseModelError, match="has no config.json"):
        remix.load_base(str(tmp_path / "plain"))
    model, tok = remix.load_base("tiny")
    model.config.save_pretrained(tmp_path / "config_only")
    with pytest.raises(remix.BaseModelError, match=r"config_only.*the model cannot be loaded: OSError"):
        remix.load_base(str(tmp_path / "config_only"))
    model.save_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(remix.BaseModelError, match=r"no_tokenizer.*its tokenizer cannot be loaded"):
        remix.load_base(str(tmp_path / "no_tokenizer"))
    (tmp_path / "x.gguf").write_bytes(b"not gguf at all")
    with pytest.raises(remix.BaseModelError, match=r"x.gguf.*the GGUF file cannot be loaded.*GGUF magic"):
        remix.load_base(str(tmp_path / "x.gguf"))
    assert issubclass(remix.BaseModelError, FileNotFoundError)


def test_load_base_from_a_local_hf_directory(tmp_path, capsys):
    model, tok = remix.load_base("tiny")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    capsys.readouterr()
    again, tok2 = remix.load_base(str(tmp_path / "m"))
    # stderr is no terminal here: transformers' "Loading weights" bar stays out of it (in a server's log its
    # carriage-return redraws had piled up on the first line), and comes back on afterwards for whoever wants it
    from transformers.utils import logging as hf_logging

    assert "Loading weights" not in capsys.readouterr().err and hf_logging.is_progress_bar_enabled()
    assert fingerprint(again) == fingerprint(model)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_fingerprint_is_dtype_robust_and_weight_sensitive():
    a, _ = remix.tiny_model(seed=0)
    b, _ = remix.tiny_model(seed=1)
    assert fingerprint(a) != fingerprint(b)
    a16, _ = remix.tiny_model(seed=0)
    assert fingerprint(a16.to(torch.bfloat16)) == fingerprint(a)


@pytest.mark.slow
def test_default_base_answers_paris(default_base):
    model, tok = default_base
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.mark.slow
def test_default_base_cached_load_is_fast(default_base):
    start = time.perf_counter()
    remix.load_base()
    assert time.perf_counter() - start < 5.0  # converted once; the cached safetensors load in ~1-2 s


@pytest.mark.slow
def test_default_base_with_adapter_round_trip(default_base, tmp_path):
    model, tok = remix.load_base()
    layers = remix.inject(model, remix.MixtureConfig())
    assert len(layers) == 90  # 30 layers x (gate, up, down)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(std=0.01)
    path = remix.save_adapter(model, tmp_path / "a")
    remix.unwrap(model)
    fresh, _ = default_base
    loaded = remix.load_adapter(fresh, path)
    try:
        assert len(loaded) == 90
    finally:
        remix.unwrap(fresh)


def test_conversion_cache_is_keyed_by_content_not_path(tmp_path, monkeypatch):
    """The same GGUF installed in two environments shares one conversion; a different file gets its own."""
    import os

    from remix.models import loading

    monkeypatch.setenv("REMIX_CACHE_DIR", str(tmp_path / "cache"))
    data = os.urandom(3 << 20)
    a, b, c = tmp_path / "env1" / "m.gguf", tmp_path / "env2" / "m.gguf", tmp_path / "env3" / "m.gguf"
    for path, blob in ((a, data), (b, data), (c, data[:-1] + bytes([data[-1] ^ 1]))):
        path.parent.mkdir()
        path.write_bytes(blob)
    os.utime(b, (1, 1))  # another mtime, as a fresh install would have
    assert loading._converted_dir(a, "m") == loading._converted_dir(b, "m") != loading._converted_dir(c, "m")
