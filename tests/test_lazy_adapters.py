"""--lazy-adapters: the adapters of --adapter-dir load when a request first names one; with --max-adapters the least
recently used one loaded that way that nothing uses gives way; requests get what they get from an adapter loaded at
start."""

import pytest

from server.engine import AdaptersBusy, Engine, EngineConfig, EngineError, GenerationRequest, collect
from tests.helpers import write_adapter
from tests.test_engine import lively_tiny, tokens_of
from tests.test_faults import greedy


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("lazy")
    for seed, name in enumerate(("a", "b", "c"), start=1):
        write_adapter(lively_tiny()[0], root / name, seed)
    (root / "notes").mkdir()  # (a folder without an adapter: never a model)
    return root


def engine_with(cap=0):
    model, tok = lively_tiny()
    return Engine(model, tok, EngineConfig(max_model_len=128, max_num_seqs=4, max_adapters=cap)), tok


def test_on_demand_adapters_give_way_least_recently_used_first(folder):
    engine, tok = engine_with(cap=2)
    ids = tok("The quick brown fox").input_ids
    reference, _ = engine_with()
    want = {}
    for name in "abc":
        reference.load_adapter(name, str(folder / name))
        want[name] = tokens_of(collect(reference, GenerationRequest(f"ref-{name}", ids, greedy(10), adapter=name)))
    assert len({tuple(t) for t in want.values()}) == 3  # (three different adapters: the comparison means something)

    def run(name):
        engine.ensure_adapter(name, str(folder / name))
        return tokens_of(collect(engine, GenerationRequest(f"{name}-{len(engine.registry.adapters)}", ids, greedy(10),
                                                           adapter=name)))

    assert run("a") == want["a"] and run("b") == want["b"]
    assert run("a") == want["a"]  # a used last: b is the least recently used
    assert run("c") == want["c"] and set(engine.registry.adapters) == {"a", "c"}
    assert run("b") == want["b"] and set(engine.registry.adapters) == {"b", "c"}  # then a gave way
    engine.ensure_adapter("b", str(folder / "b"))  # loaded already: nothing read, nothing evicted
    assert set(engine.registry.adapters) == {"b", "c"}

    # both in use (long requests running): a third cannot be loaded until one is idle
    for name in "bc":
        engine.submit(GenerationRequest(f"long-{name}", ids, greedy(40), adapter=name), lambda e: None)
    engine.step()
    with pytest.raises(AdaptersBusy, match="the least recently used gives way \(after 1 s\) once its requests finish"):
        engine.ensure_adapter("a", str(folder / "a"))
    assert AdaptersBusy.status == 429
    while engine.has_work():
        engine.step()
    assert run("a") == want["a"] and len(engine.registry.adapters) == 2
    stats = engine.stats()
    assert stats["slots_used"] == 0 and stats["adapters_loaded"] == 2
    assert (stats["adapter_loads_on_demand"], stats["adapter_evictions"]) == (5, 3)  # a, b, c, b again, a again; b, a, then c or b gave way


def test_an_adapter_in_steady_use_gives_way_to_one_that_waits(folder, monkeypatch):
    """--max-adapters 1, a in use: a request for b is refused for now, and a gives way - it takes no new requests
    (those wait as b's does) while its running one finishes - then b loads. Then b, in use, gives way to a. Where the
    waiter stops asking (ROOM_WANT_S), the adapter takes requests again. An adapter loaded by name never gives way."""
    import server.engine.engine as engine_module

    monkeypatch.setattr(engine_module, "GIVE_WAY_AFTER_S", 0.0)  # (the grace is checked below)
    engine, tok = engine_with(cap=1)
    ids = tok("The quick brown fox").input_ids
    path = {name: str(folder / name) for name in "abc"}
    engine.ensure_adapter("a", path["a"])
    for first, second in (("a", "b"), ("b", "a")):
        engine.submit(GenerationRequest(f"long-{first}", ids, greedy(12), adapter=first), lambda e: None)
        engine.step()
        read = []
        real_prepare = engine.registry.prepare
        monkeypatch.setattr(engine.registry, "prepare", lambda p, *a: read.append(p) or real_prepare(p, *a))
        for _ in range(3):  # (a waiter asks again and again: nothing more gives way, nothing is read)
            with pytest.raises(AdaptersBusy, match="once its requests finish"):
                engine.ensure_adapter(second, path[second])
        assert read == [] and engine.registry.adapters[first].giving_way and engine.stats()["adapters_giving_way"] == 1
        with pytest.raises(AdaptersBusy, match=f"the adapter '{first}' is giving way"):
            engine.ensure_adapter(first, path[first])  # its own new requests wait too
        while engine.has_work():
            engine.step()
        engine.ensure_adapter(second, path[second])  # it finished: it is unloaded, the other loaded
        assert set(engine.registry.adapters) == {second} and read == [path[second]]
        monkeypatch.setattr(engine.registry, "prepare", real_prepare)

    engine.submit(GenerationRequest("long-a2", ids, greedy(12), adapter="a"), lambda e: None)
    engine.step()
    with pytest.raises(AdaptersBusy):
        engine.ensure_adapter("c", path["c"])
    assert engine.registry.adapters["a"].giving_way
    engine._room_wanted = {name: (0.0, 0.0) for name in engine._room_wanted}  # c's waiter stopped asking long ago
    engine.ensure_adapter("a", path["a"])  # nothing wants room any more: a takes requests again
    assert not engine.registry.adapters["a"].giving_way

    # the grace: a waiter makes another give way only once it has waited GIVE_WAY_AFTER_S for one to fall idle
    monkeypatch.setattr(engine_module, "GIVE_WAY_AFTER_S", 30.0)
    for _ in range(2):
        with pytest.raises(AdaptersBusy, match="gives way \\(after 30 s\\)"):
            engine.ensure_adapter("c", path["c"])
    assert not engine.registry.adapters["a"].giving_way
    while engine.has_work():
        engine.step()
    engine.ensure_adapter("c", path["c"])  # a fell idle within the grace: it went, nothing waited on it
    assert set(engine.registry.adapters) == {"c"}

    pinned, _ = engine_with(cap=1)
    pinned.load_adapter("a", path["a"])  # (by name: it stays)
    pinned.submit(GenerationRequest("long", ids, greedy(12), adapter="a"), lambda e: None)
    pinned.step()
    with pytest.raises(AdaptersBusy, match="none of them loaded on demand"):
        pinned.ensure_adapter("b", path["b"])
    assert not pinned.registry.adapters["a"].giving_way


def test_an_adapter_ensured_for_a_request_is_held_until_the_request_arrives(folder, monkeypatch):
    """ensure_adapter(hold=True), as the HTTP layer calls it: the adapter is not idle - no waiter for another unloads it
    - until its request is submitted, or HOLD_S has passed. (Without the hold, under steady contention a waiter
    unloaded the adapter just loaded before its request came, and that request got a 404 after three tries.)"""
    import server.engine.engine as engine_module

    engine, tok = engine_with(cap=1)
    ids = tok("The quick brown fox").input_ids
    path = {name: str(folder / name) for name in "ab"}
    engine.ensure_adapter("a", path["a"], hold=True)
    with pytest.raises(AdaptersBusy):
        engine.ensure_adapter("b", path["b"], hold=True)  # a's request is on its way: a is not idle
    assert set(engine.registry.adapters) == {"a"}
    collect(engine, GenerationRequest("other", ids, greedy(2), adapter="a"))  # (not the one held for: a stays held)
    with pytest.raises(AdaptersBusy):
        engine.ensure_adapter("b", path["b"], hold=True)
    collect(engine, GenerationRequest("a1", ids, greedy(2), adapter="a", held=True))  # it arrived, ran and finished
    engine.ensure_adapter("b", path["b"], hold=True)
    assert set(engine.registry.adapters) == {"b"}
    monkeypatch.setattr(engine_module, "HOLD_S", 0.0)  # a hold whose request never comes lapses
    engine.ensure_adapter("b", path["b"], hold=True)
    engine.ensure_adapter("a", path["a"])
    assert set(engine.registry.adapters) == {"a"}


def test_adapters_loaded_by_name_stay_and_on_demand_ones_give_way_to_them(folder):
    """An adapter loaded at start or through the API is never unloaded to make room; one loaded on demand gives way
    to it; with only such adapters loaded, a further load is the usual adapter_limit error."""
    engine, _ = engine_with(cap=2)
    engine.load_adapter("pinned", str(folder / "a"))
    engine.ensure_adapter("b", str(folder / "b"))
    engine.load_adapter("also", str(folder / "c"))  # b (on demand, idle) gives way
    assert set(engine.registry.adapters) == {"pinned", "also"}
    with pytest.raises(EngineError, match="--max-adapters 2") as e:
        engine.load_adapter("more", str(folder / "b"))
    assert e.value.code == "adapter_limit"
    with pytest.raises(AdaptersBusy):
        engine.ensure_adapter("b", str(folder / "b"))


@pytest.fixture
def client(folder):
    from fastapi.testclient import TestClient

    from server.app import ServerState, create_app

    engine, _ = engine_with(cap=1)
    engine.start()
    with TestClient(create_app(ServerState(engine=engine, base_name="tiny", lazy_dir=folder))) as c:
        yield c
    engine.stop()


def test_the_api_loads_a_folders_adapter_when_a_request_names_it(client):
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert set(models) == {"tiny", "a", "b", "c"} and not models["a"]["adapter"]["loaded"]  # (not "notes")
    body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    first = client.post("/v1/completions", json={"model": "a", **body})
    assert first.status_code == 200, first.text
    assert client.get("/v1/models/a").json()["adapter"]["loaded"] is True
    assert client.post("/v1/chat/completions", json={"model": "b", "messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 4}).status_code == 200
    loaded = {m["id"]: m["adapter"]["loaded"] for m in client.get("/v1/models").json()["data"] if "adapter" in m}
    assert loaded == {"a": False, "b": True, "c": False}  # (--max-adapters 1: a gave way to b)
    again = client.post("/v1/completions", json={"model": "a", **body})
    assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    metrics = client.get("/metrics").text
    for line in ("remix_adapters_loaded 1.0", "remix_adapter_loads_on_demand_total 3.0",
                 "remix_adapter_evictions_total 2.0", "remix_adapter_wait_seconds_count 3.0"):
        assert line in metrics, line  # (three requests waited for their adapter: a, b, then a again)
    tok = client.post("/tokenize", json={"model": "c", "prompt": "hi"})  # (a name is enough: nothing loads for it)
    assert tok.status_code == 200 and not client.get("/v1/models/c").json()["adapter"]["loaded"]
    for name in ("notes", "../a", "a/../b", ".hidden", "nothere"):
        r = client.post("/v1/completions", json={"model": name, **body})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", (name, r.text)


def test_cli_lazy_adapters_needs_the_folder_and_loads_nothing_at_start(folder):
    from server import cli

    with pytest.raises(SystemExit, match="--lazy-adapters on loads adapters from --adapter-dir"):
        cli.load_settings(["--base", "tiny", "--lazy-adapters", "on"])
    settings = cli.load_settings(["--base", "tiny", "--adapter-dir", str(folder), "--lazy-adapters", "on"])
    assert settings["adapters"] == {}
    assert set(cli.load_settings(["--base", "tiny", "--adapter-dir", str(folder)])["adapters"]) == {"a", "b", "c"}
    state = cli.build_state({**settings, "max_model_len": 128, "max_num_seqs": 2})
    assert state.lazy_dir == folder and not state.engine.registry.adapters


def test_a_broken_adapter_in_the_folder_is_a_server_error_naming_it(folder, tmp_path):
    from fastapi.testclient import TestClient

    from server.app import ServerState, create_app

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    engine, _ = engine_with()
    engine.start()
    try:
        client = TestClient(create_app(ServerState(engine=engine, base_name="tiny", lazy_dir=tmp_path)))
        r = client.post("/v1/completions", json={"model": "bad", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 500 and r.json()["error"]["code"] == "invalid_adapter", r.text
        assert "'bad' could not be loaded" in r.json()["error"]["message"]
        assert client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}).status_code == 200
    finally:
        engine.stop()


def test_a_request_waits_for_room_then_gets_a_429_past_the_wait(client, monkeypatch):
    """--max-adapters 1 with a long request on a: a request for b waits for a to finish, then loads b and answers;
    with no wait allowed, it gets a 429 adapter_limit (with Retry-After) instead."""
    import threading
    import time

    import server.app as app_module

    long = {"model": "a", "prompt": "The quick brown fox", "max_tokens": 100, "temperature": 0, "ignore_eos": True}
    short = {"model": "b", "prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0}

    def run_long(out):
        out.append(client.post("/v1/completions", json=long))

    engine = client.app.state.remix.engine
    real, busy = engine.ensure_adapter, []

    def ensure(name, path, hold=False):
        try:
            return real(name, path, hold)
        except AdaptersBusy:
            busy.append(name)
            raise

    monkeypatch.setattr(engine, "ensure_adapter", ensure)

    for wait, want in ((30.0, 200), (0.0, 429)):
        monkeypatch.setattr(app_module, "LAZY_WAIT_S", wait)
        assert client.post("/v1/completions", json={**short, "model": "a"}).status_code == 200  # a loaded, idle
        done = []
        worker = threading.Thread(target=run_long, args=(done,))
        worker.start()
        deadline = time.monotonic() + 30
        while not client.get("/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        r = client.post("/v1/completions", json=short)
        worker.join(60)
        assert done and done[0].status_code == 200
        assert r.status_code == want, r.text
        assert busy and set(busy) == {"b"}  # (b found no room at first: it waited, or was refused)
        busy.clear()
        if want == 429:
            assert r.json()["error"]["code"] == "adapter_limit" and r.headers["retry-after"] == "1"


def test_steady_traffic_to_one_adapter_does_not_starve_another(client, monkeypatch):
    """--max-adapters 1 and three clients keeping a busy without a pause: a request for b used to wait its whole
    wait for a moment with a idle, then got a 429; now a gives way, b answers well within the wait, and every one of
    a's requests answers too (each waited for its turn)."""
    import threading
    import time

    import server.app as app_module

    monkeypatch.setattr(app_module, "LAZY_WAIT_S", 20.0)
    body = {"prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    assert client.post("/v1/completions", json={"model": "a", **body}).status_code == 200
    stop, statuses = threading.Event(), []

    def keep_a_busy():
        while not stop.is_set():
            statuses.append(client.post("/v1/completions", json={"model": "a", **body}).status_code)

    workers = [threading.Thread(target=keep_a_busy) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.5)
        start = time.monotonic()
        r = client.post("/v1/completions", json={"model": "b", **body, "max_tokens": 4})
        took = time.monotonic() - start
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    assert r.status_code == 200, r.text
    assert took < 10, took
    assert statuses and set(statuses) == {200}, statuses


def test_selection_counters_survive_an_adapter_going_and_coming_back(folder):
    """An adapter unloaded (to make room, or through the API) and loaded again from the same path takes up its
    selection counters where they stood: remix_lora_selections_total stays a counter under on-demand loading."""
    engine, tok = engine_with(cap=1)
    ids = tok("The quick brown fox").input_ids
    engine.ensure_adapter("a", str(folder / "a"))
    collect(engine, GenerationRequest("a1", ids, greedy(6), adapter="a"))
    first = engine.registry.selection_counts()["a"]
    total = sum(map(sum, first.values()))
    assert total > 0
    engine.ensure_adapter("b", str(folder / "b"))  # a gives way
    assert "a" not in engine.registry.selection_counts()
    engine.ensure_adapter("a", str(folder / "a"))
    assert engine.registry.selection_counts()["a"] == first
    collect(engine, GenerationRequest("a2", ids, greedy(6), adapter="a"))
    again = engine.registry.selection_counts()["a"]
    assert sum(map(sum, again.values())) == 2 * total  # (the same greedy request: the same selections again)
    engine.unload_adapter("a")
    engine.load_adapter("a", str(folder / "b"))  # another adapter under the name: counted afresh
    assert sum(map(sum, engine.registry.selection_counts()["a"].values())) == 0
    # the counters of at most RETIRED_KEEP unloaded adapters are kept, the least recently unloaded going first
    engine.registry.RETIRED_KEEP = 1
    engine.unload_adapter("a")
    engine.ensure_adapter("c", str(folder / "c"))
    collect(engine, GenerationRequest("c1", ids, greedy(6), adapter="c"))
    engine.unload_adapter("c")  # (a's from b's path is dropped for c's)
    assert list(engine.registry._retired) == [("c", str(folder / "c"))]
    engine.load_adapter("a", str(folder / "a"))  # (its 2 x total from before went with the bound)
    assert sum(map(sum, engine.registry.selection_counts()["a"].values())) == 0
