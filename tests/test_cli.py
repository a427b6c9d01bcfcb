"""python -m server's settings: precedence, validation messages that name the field, dtype resolution."""

import os

import pytest
import torch

from server import cli


def test_flags_override_config_file(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("max_num_seqs: 4\ndtype: bfloat16\n")
    s = cli.load_settings(["--config", str(cfg), "--max-num-seqs", "9", "--base", "tiny"])
    assert s["max_num_seqs"] == 9 and s["dtype"] == "bfloat16" and s["base"] == "tiny"


@pytest.mark.parametrize("argv,field", [(["--dtype", "fp8"], "--dtype"), (["--port", "0"], "--port"),
                                        (["--adapter", "nopath"], "--adapter"), (["--decoder", "fast"], "--decoder"),
                                        (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype"),
                                        (["--root-path", "api/"], "--root-path"),
                                        (["--num-speculative-tokens", "-1"], "--num-speculative-tokens"),
                                        (["--prompt-lookup-min", "5"], "--prompt-lookup-min"),
                                        (["--speculative-max-seqs", "0"], "--speculative-max-seqs"),
                                        (["--speculative-schedule", "heuristic"], "--speculative-schedule"),
                                        (["--max-prefill-chunk", "0"], "--max-prefill-chunk")])
def test_bad_values_name_the_field(argv, field):
    with pytest.raises(SystemExit, match=field):
        cli.load_settings(argv + ["--base", "tiny"])


def test_an_adapter_may_not_take_the_base_models_name(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")  # (what the flag's check before the model loads looks for)
    with pytest.raises(SystemExit, match=r"--adapter tiny=\.\.\.: 'tiny' is the base model's name \(--base\)"):
        cli.load_settings(["--base", "tiny", "--adapter", f"tiny={tmp_path}"])
    with pytest.raises(SystemExit, match=r"'m' is the base model's name \(--served-name\)"):
        cli.load_settings(["--base", "tiny", "--served-name", "m", "--adapter", f"m={tmp_path}"])
    assert cli.load_settings(["--base", "tiny", "--served-name", "m", "--adapter", f"tiny={tmp_path}"])["adapters"] == {
        "tiny": str(tmp_path)}


def test_every_bad_adapter_flag_is_said_at_once_before_the_model_loads(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    (good / "adapter_config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        cli.load_settings(["--base", "tiny", "--adapter", f"a={good}", "--adapter", f"a={good}",
                           "--adapter", f"b={tmp_path / 'missing'}", "--adapter", f"c={tmp_path / 'empty'}",
                           "--adapter", f"={good}", "--adapter", "nopath"])
    message = str(e.value)
    for said in ("'a' is given twice", "missing is not a directory", "empty has no adapter_config.json",
                 "the name before '=' is empty", "expects NAME=PATH, got 'nopath'"):
        assert said in message, (said, message)
    assert cli.load_settings(["--base", "tiny", "--adapter", f"a={good}"])["adapters"] == {"a": str(good)}


def test_max_model_len_follows_the_bases_trained_context(monkeypatch):
    """0 (the default) takes the base's trained context up to 2048 (SmolLM2: 2048 of its 8192);
    a length past that context is refused, naming both, unless REMIX_ALLOW_LONG_MAX_MODEL_LEN=1 (vLLM's rule)."""
    from transformers import LlamaConfig

    monkeypatch.delenv("REMIX_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    assert cli.load_settings(["--base", "tiny"])["max_model_len"] == 0
    assert cli.max_model_len(0, LlamaConfig(max_position_embeddings=512), "tiny") == 512
    assert cli.max_model_len(0, LlamaConfig(max_position_embeddings=8192), "smol") == 2048
    assert cli.max_model_len(4096, LlamaConfig(max_position_embeddings=8192), "smol") == 4096
    with pytest.raises(SystemExit, match=r"--max-model-len 9000 is past the context smol was trained for \(8192 "
                                         r"positions\); give at most 8192, or set REMIX_ALLOW_LONG_MAX_MODEL_LEN=1"):
        cli.max_model_len(9000, LlamaConfig(max_position_embeddings=8192), "smol")
    monkeypatch.setenv("REMIX_ALLOW_LONG_MAX_MODEL_LEN", "1")
    assert cli.max_model_len(9000, LlamaConfig(max_position_embeddings=8192), "smol") == 9000
    with pytest.raises(SystemExit, match="--max-model-len must be >= 1"):
        cli.load_settings(["--base", "tiny", "--max-model-len", "-5"])
    state = cli.build_state(cli.load_settings(["--base", "tiny"]))  # (the tiny model's 4096: the 2048 cap)
    assert state.engine.config.max_model_len == 2048
    monkeypatch.delenv("REMIX_ALLOW_LONG_MAX_MODEL_LEN")
    with pytest.raises(SystemExit, match="past the context tiny was trained for"):
        cli.build_state(cli.load_settings(["--base", "tiny", "--max-model-len", "5000"]))


def test_config_values_take_their_options_types_or_are_named(tmp_path):
    cfg = tmp_path / "s.yaml"
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "adapter_config.json").write_text("{}")
    # YAML reads on / off as booleans: they mean the options' "on" / "off"; 4.0 is an integer; one adapter may be a string
    cfg.write_text(f"prefix_caching: off\ncuda_graphs: on\nmax_num_seqs: 4.0\nkv_memory_gb: 1\nadapter: a={tmp_path}/x\n"
                   "api_key:\nmax_queue:\n")  # (empty values: not given)
    s = cli.load_settings(["--config", str(cfg), "--base", "tiny"])
    assert (s["prefix_caching"], s["cuda_graphs"], s["max_num_seqs"], s["kv_memory_gb"], s["adapters"], s["max_queue"]) == (
        "off", "on", 4, 1.0, {"a": f"{tmp_path}/x"}, 256)
    assert s["api_key"] == os.environ.get("REMIX_API_KEY", "")
    cfg.write_text("max_num_seqs: abc\nmax_queue: 4.5\nport: [1]\nadapter: 3\n")
    with pytest.raises(SystemExit) as e:
        cli.load_settings(["--config", str(cfg)])
    assert str(e.value) == (f"error: --config {cfg}:\n  - max_num_seqs: expected an integer, got 'abc'\n  - max_queue: "
                            "expected an integer, got 4.5\n  - port: expected an integer, got [1]\n  - adapter: expected "
                            "NAME=PATH strings, got 3")
    cfg.write_text("- a\n")
    with pytest.raises(SystemExit, match="expected a mapping"):
        cli.load_settings(["--config", str(cfg)])
    for argv, said in ((["--port", "70000"], "--port must be at most 65535"), (["--kv-memory-gb", "0"], "--kv-memory-gb"),
                       (["--drain-timeout", "-1"], "--drain-timeout"), (["--log-level", "loud"], "--log-level"),
                       (["--max-adapters", "-1"], "--max-adapters must be >= 0, got -1")):
        with pytest.raises(SystemExit, match=said):
            cli.load_settings(argv + ["--base", "tiny"])


def test_unknown_config_field_is_named(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("max_num_seq: 4\n")
    with pytest.raises(SystemExit, match="max_num_seq"):
        cli.load_settings(["--config", str(cfg)])


def test_demo_adapter_only_joins_the_default_base(tmp_path, monkeypatch):
    demo = tmp_path / "runs" / "demo" / "adapter"
    demo.mkdir(parents=True)
    monkeypatch.setattr(cli, "DEMO_ADAPTER", demo)
    assert cli.load_settings([])["adapters"] == {"demo": str(demo)}
    assert cli.load_settings(["--base", "tiny"])["adapters"] == {}


def test_dtype_resolution():
    assert cli.resolve_dtype("float32") == torch.float32
    assert cli.resolve_dtype("bfloat16") == torch.bfloat16
    from remix.kernels import cpu_ext

    from remix.models.loading import BF16_FLAGS

    fast = torch.cuda.is_available() or bool(BF16_FLAGS & cpu_ext.cpu_flags())
    assert cli.resolve_dtype("auto") == (torch.bfloat16 if fast else torch.float32)
    assert cli.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    bf16 = bool({"amx_bf16", "avx512_bf16"} & cpu_ext.cpu_flags())
    assert cli.resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if bf16 else torch.float32)


def test_prefix_caching_flag():
    assert cli.load_settings(["--base", "tiny"])["prefix_caching"] == "on"
    with pytest.raises(SystemExit, match="--prefix-caching must be on or off"):
        cli.load_settings(["--base", "tiny", "--prefix-caching", "yes"])
    from server.cli import build_state

    engine = build_state(cli.load_settings(["--base", "tiny", "--device", "cpu", "--prefix-caching", "off"])).engine
    assert engine.config.prefix_caching is False and engine.prefix is None and not engine.stats()["prefix_caching"]


def test_batch_invariant_flag():
    assert cli.load_settings(["--base", "tiny"])["batch_invariant"] == "off"
    with pytest.raises(SystemExit, match="--batch-invariant must be on or off"):
        cli.load_settings(["--base", "tiny", "--batch-invariant", "1"])
    with pytest.raises(SystemExit, match="--batch-invariant: needs --decoder lean"):
        cli.load_settings(["--base", "tiny", "--device", "cpu", "--batch-invariant", "on", "--decoder", "exact"])
    from remix.kernels import cpu_ext
    from server.cli import build_state

    if not cpu_ext.dot_gemm(torch.float32):
        return
    settings = cli.load_settings(["--base", "tiny", "--device", "cpu", "--dtype", "float32", "--batch-invariant", "on"])
    engine = build_state(settings).engine
    assert engine.config.batch_invariant is True and engine.stats()["batch_invariant"] is True


def test_cuda_graphs_flag():
    assert cli.load_settings(["--base", "tiny"])["cuda_graphs"] == "on"
    with pytest.raises(SystemExit, match="--cuda-graphs must be on or off"):
        cli.load_settings(["--base", "tiny", "--cuda-graphs", "maybe"])
    from server.cli import build_state

    engine = build_state(cli.load_settings(["--base", "tiny", "--device", "cpu", "--cuda-graphs", "off"])).engine
    assert engine.config.cuda_graphs is False and engine.stats()["cuda_graphs"] is False


def test_device_resolution_and_errors(capsys):
    assert cli.resolve_device("cpu") == torch.device("cpu")
    assert cli.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "gpu", "cuda:x"):
        with pytest.raises(SystemExit, match="--device"):
            cli.load_settings(["--base", "tiny", "--device", bad])
    if not torch.cuda.is_available():  # asking for a device that is not there names the problem, before any loading
        with pytest.raises(SystemExit, match="no CUDA device"):
            cli.load_settings(["--base", "tiny", "--device", "cuda"])
    else:
        with pytest.raises(SystemExit, match="CUDA device"):
            cli.load_settings(["--base", "tiny", "--device", f"cuda:{torch.cuda.device_count()}"])


def test_decoder_flag_reaches_the_engine():
    from server.cli import build_state

    engine = build_state(cli.load_settings(["--base", "tiny"])).engine
    assert engine.runner.lean is not None and engine.runner.lean.compiled
    assert engine.stats()["decoder"] == "lean" and "decoder_fallback" not in engine.stats()
    assert not build_state(cli.load_settings(["--base", "tiny", "--decoder", "exact"])).engine.runner.lean.compiled
    assert build_state(cli.load_settings(["--base", "tiny", "--decoder", "hf"])).engine.runner.lean is None


def test_max_prefill_chunk_flag_reaches_the_engine():
    """A lone 40-token prompt prefills in chunks of at most --max-prefill-chunk tokens (default 512: one step)."""
    from server.cli import build_state
    from server.engine import GenerationRequest, SamplingParams

    assert cli.load_settings(["--base", "tiny"])["max_prefill_chunk"] == 512
    for flag, steps in (([], 1), (["--max-prefill-chunk", "16"], 3)):
        engine = build_state(cli.load_settings(["--base", "tiny", "--device", "cpu", *flag])).engine
        assert engine.config.max_prefill_chunk == (16 if flag else 512)
        engine.submit(GenerationRequest("r", list(range(3, 43)), SamplingParams(max_tokens=1)), lambda ev: None)
        seen = 0
        while engine.has_work():
            engine.step()
            seen += engine.last_step["prefill_tokens"] > 0
        assert seen == steps


def test_kv_cache_dtype_flag_reaches_the_engine():
    from server.cli import build_state

    assert cli.load_settings(["--base", "tiny"])["kv_cache_dtype"] == "auto"
    engine = build_state(cli.load_settings(["--base", "tiny", "--device", "cpu", "--kv-cache-dtype", "int8"])).engine
    assert engine.runner.cache.quantized and engine.stats()["kv_cache_dtype"] == "int8"
    plain = build_state(cli.load_settings(["--base", "tiny", "--device", "cpu"])).engine
    assert plain.stats()["kv_cache_dtype"] == plain.stats()["dtype"]  # auto: the model's dtype
    if torch.cuda.is_available():  # CPU kernels only: refused before anything loads
        with pytest.raises(SystemExit, match="--kv-cache-dtype int8 runs on CPU only"):
            cli.load_settings(["--base", "tiny", "--device", "cuda", "--kv-cache-dtype", "int8"])


def test_allowed_origins_reach_the_state():
    from server.cli import build_state

    s = cli.load_settings(["--base", "tiny", "--allowed-origins", "http://a.example, http://b.example"])
    assert build_state(s).allowed_origins == ["http://a.example", "http://b.example"]
    assert build_state(cli.load_settings(["--base", "tiny"])).allowed_origins == []


def test_root_path_behind_a_proxy():
    """--root-path: a proxy serves the API under a prefix and strips it before forwarding; the routes answer as
    ever, and the OpenAPI schema and the docs page name the prefix, so links from /docs go through the proxy."""
    import httpx

    from tests.helpers import LiveServer

    srv = LiveServer(["--root-path", "/remix"])
    try:
        assert httpx.get(srv.url + "/v1/models").json()["data"][0]["id"] == "tiny"
        assert httpx.get(srv.url + "/openapi.json").json()["servers"] == [{"url": "/remix"}]
        assert "/remix/openapi.json" in httpx.get(srv.url + "/docs").text
    finally:
        srv.stop()


def test_chat_template_flag(tmp_path):
    """--chat-template: a file or the template itself replaces the tokenizer's (chat and /tokenize use it); a broken
    one or a missing file stops the server before anything loads, naming the flag."""
    from server.cli import build_state

    inline = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    state = build_state(cli.load_settings(["--base", "tiny", "--chat-template", inline]))
    assert state.engine.tokenizer.chat_template == inline
    path = tmp_path / "t.jinja"
    path.write_text(inline)
    assert cli.load_settings(["--base", "tiny", "--chat-template", str(path)])["chat_template"] == inline
    for bad, words in (("{% for m in %}", "line 1"), (str(tmp_path / "none.jinja"), "neither a file")):
        with pytest.raises(SystemExit, match="--chat-template.*" + words):
            cli.load_settings(["--base", "tiny", "--chat-template", bad])


def test_a_taken_port_is_said_before_the_model_loads(monkeypatch):
    """The socket is bound before the base loads: a port another server listens on is an error naming the flag and
    the port at once, not after a load (uvicorn's own bind came after it)."""
    import socket

    from server import cli

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    monkeypatch.setattr(cli, "build_state", lambda settings: pytest.fail("the model was loaded before the bind"))
    try:
        with pytest.raises(SystemExit) as e:
            cli.main(["--base", "tiny", "--host", "127.0.0.1", "--port", str(port)])
    finally:
        taken.close()
    assert f"--host/--port: cannot listen on 127.0.0.1:{port}" in str(e.value) and "another server" in str(e.value)


@pytest.mark.parametrize("host,key,flag,want", [
    ("127.0.0.1", "", "auto", True), ("localhost", "", "auto", True), ("::1", "", "auto", True),
    ("0.0.0.0", "", "auto", False), ("10.0.0.5", "", "auto", False), ("myhost.example", "", "auto", False),
    ("0.0.0.0", "secret", "auto", True), ("0.0.0.0", "", "on", True), ("127.0.0.1", "secret", "off", False),
])
def test_adapter_loading_resolves_by_exposure(host, key, flag, want, monkeypatch):
    """--adapter-loading auto: on where only this machine reaches the server or a key is needed, off where anyone who
    reaches the address could load (any readable directory) and unload adapters; on / off as given."""
    monkeypatch.delenv("REMIX_API_KEY", raising=False)
    settings = cli.load_settings(["--base", "tiny", "--host", host, "--adapter-loading", flag]
                                 + (["--api-key", key] if key else []))
    assert cli.adapter_loading(settings) is want


def test_adapter_loading_off_refuses_the_load_endpoints_with_403(tmp_path):
    from fastapi.testclient import TestClient

    import remix
    from server.app import ServerState, create_app
    from server.engine import Engine, EngineConfig

    model, tok = remix.tiny_model()
    engine = Engine(model, tok, EngineConfig(max_model_len=64, max_num_seqs=1))
    client = TestClient(create_app(ServerState(engine=engine, base_name="tiny", adapter_loading=False)))
    engine.start()
    for method, path, body in (("POST", "/v1/adapters", {"name": "a", "path": str(tmp_path)}),
                               ("POST", "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(tmp_path)}),
                               ("POST", "/v1/unload_lora_adapter", {"lora_name": "a"}),
                               ("DELETE", "/v1/adapters/a", None)):
        r = client.request(method, path, json=body)
        assert r.status_code == 403, (path, r.text)
        assert r.json()["error"]["code"] == "adapter_loading_off" and r.json()["error"]["type"] == "permission_error"
    try:  # (the rest of the API as before)
        assert client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}).status_code == 200
    finally:
        engine.stop()
    with pytest.raises(SystemExit, match="--adapter-loading must be on, off or auto"):
        cli.load_settings(["--adapter-loading", "maybe"])


def self_signed(tmp_path, name: str = "server") -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM files), made by the openssl command line."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("no openssl command here")
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return str(cert), str(key)


def test_tls_flags_are_checked_before_anything_loads(tmp_path):
    cert, key = self_signed(tmp_path)
    other_cert, other_key = self_signed(tmp_path, "other")
    settings = cli.load_settings(["--base", "tiny", "--ssl-certfile", cert, "--ssl-keyfile", key])
    assert (settings["ssl_certfile"], settings["ssl_keyfile"]) == (cert, key)
    for argv, said in ((["--ssl-certfile", cert], "--ssl-certfile serves HTTPS together with --ssl-keyfile: give both"),
                       (["--ssl-keyfile", key], "--ssl-keyfile serves HTTPS together with --ssl-certfile: give both"),
                       (["--ssl-certfile", cert, "--ssl-keyfile", str(tmp_path / "nope.key")],
                        "--ssl-keyfile .*nope.key: no such file"),
                       (["--ssl-certfile", cert, "--ssl-keyfile", other_key], "not a PEM certificate and its"),
                       (["--ssl-certfile", key, "--ssl-keyfile", key], "not a PEM certificate and its")):
        with pytest.raises(SystemExit, match=said):
            cli.load_settings(["--base", "tiny", *argv])
