"""Tool calling on /v1/chat/completions: the tools and the conversation's calls and results rendered into the prompt
(by a template that knows Hermes' format, or written here for one that does not), calls held to the tools' schemas by
a structural tag, and the output parsed back into OpenAI tool_calls, whole and streamed, over HTTP."""

import json
import random

import httpx
import pytest

import remix
from remix import chat
from server import tools
from server.protocol import ChatCompletionRequest, ChatMessage

pytest.importorskip("xgrammar")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]

CALLS = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


def parse(pieces, call_format=chat.HERMES):
    """(content, [(name, arguments)]) from a CallParser fed ``pieces``, by its events (as the stream sends them)."""
    p = tools.CallParser(call_format)
    content, calls = "", []
    for ev in [e for piece in pieces for e in p.feed(piece)] + p.finish():
        if ev[0] == "content":
            content += ev[1]
        elif ev[0] == "call":
            assert ev[1] == len(calls)
            calls.append([ev[2], ""])
        else:
            calls[ev[1]][1] += ev[2]
    assert content == p.content and [[c["function"]["name"], c["function"]["arguments"]] for c in p.tool_calls()] == calls
    return content, [tuple(c) for c in calls]


def test_parser_splits_content_and_calls_however_the_text_arrives():
    want = ("Let me check.\n\n", [("get_weather", '{"city": "Paris", "days": 2}'), ("get_time", "{}")])
    assert parse([CALLS]) == want
    assert parse(list(CALLS)) == want  # a character at a time
    rng = random.Random(0)
    for _ in range(50):  # random cuts, so the tags and the header split anywhere
        cuts = sorted(rng.sample(range(1, len(CALLS)), rng.randint(1, 12)))
        assert parse([CALLS[a:b] for a, b in zip([0] + cuts, cuts + [len(CALLS)])]) == want


def test_parser_keeps_what_is_not_a_call_and_cut_off_calls():
    assert parse(["a <b> <tool", "s"]) == ("a <b> <tools", [])  # held back while it could be a tag, then content
    assert parse(["x <tool_"]) == ("x <tool_", [])  # the end: what was held is content
    assert parse(["<tool_call>not json"]) == ("<tool_call>not json", [])  # no readable name: content after all
    # cut off by max_tokens: the arguments that came, without the part of the closing that came
    assert parse(['<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool']) == ("", [("f", '{"x": 1}')])
    assert parse(['<tool_call>\n{"name": "f", "arguments": {"x": 1}']) == ("", [("f", '{"x": 1}')])  # its own "}"
    assert parse(['<tool_call>\n{"name": "f", "arguments": {"x": "a}\\n</tool_call>"}}\n</tool_call>']) == (
        "", [("f", '{"x": "a}\\n</tool_call>"}')])  # (an escaped newline in a string is not the closing)
    assert parse(['<tool_call>\n{"name": "we\\"ird", "arguments": {}}\n</tool_call>']) == ("", [('we"ird', "{}")])


def msgs(*raw):
    return [ChatMessage(**m) for m in raw]


CONVERSATION = ({"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Weather in"}, {"type": "text", "text": "Paris?"}]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                      "arguments": '{"city": "Paris", "days": 1}'}},
                    {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call_2", "content": "noon"})


def test_a_template_without_tools_gets_them_written_in_hermes_form():
    """The tiny tokenizer's ChatML template knows nothing of tools (as SmolLM2's): the tools go into the system
    message (after the developer's, which becomes system), calls into the assistant's content, both results into
    one user turn."""
    tok = remix.tiny_model()[1]
    assert not chat.native(tok)
    text = tok.decode(tools.prompt_ids(tok, msgs(*CONVERSATION), [tools_model(t) for t in TOOLS]))
    specs = "\n".join(json.dumps(t) for t in TOOLS)
    assert text == (
        "<|im_start|>system\nBe brief.\n\n" + chat.SYSTEM_PROMPT.format(tools=specs) + "<|im_end|>\n"
        "<|im_start|>user\nWeather in\nParis?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nnoon\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")
    assert "# Tools" in chat.SYSTEM_PROMPT
    # without tools, plain messages render exactly as the template renders them
    plain = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi", "name": "ann"}]
    assert tools.prompt_ids(tok, msgs(*plain)) == list(tok.apply_chat_template(plain, add_generation_prompt=True,
                                                                                tokenize=True)["input_ids"])


HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson }}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_that_knows_tools_renders_them_itself():
    tok = remix.tiny_model()[1]
    tok.chat_template = HERMES_TEMPLATE
    assert chat.native(tok)
    text = tok.decode(tools.prompt_ids(tok, msgs(*CONVERSATION), [tools_model(WEATHER)]))
    assert text.startswith("<|im_start|>system\n" + json.dumps(WEATHER) + "\n<|im_end|>\n<|im_start|>system\nBe brief.")
    # the calls' arguments reach the template as objects, the results as tool messages
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}\n</tool_call>' in text
    assert "<|im_start|>tool\nsunny<|im_end|>\n<|im_start|>tool\nnoon<|im_end|>" in text


def tools_model(spec):
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], tools=[spec]).tools[0]


def test_structural_tags_per_tool_choice():
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], tools=TOOLS)
    assert req.tool_mode == "auto"
    tag = tools.structural_tag(req.tools, "auto", parallel=True)["format"]
    assert tag["type"] == "triggered_tags" and tag["triggers"] == ["<tool_call>"] and not tag["stop_after_first"]
    assert [t["begin"] for t in tag["tags"]] == ['<tool_call>\n{"name": "get_weather", "arguments": ',
                                                '<tool_call>\n{"name": "get_time", "arguments": ']
    assert tag["tags"][0]["content"]["json_schema"] == WEATHER["function"]["parameters"]
    tag = tools.structural_tag(req.tools, "required", parallel=False)["format"]
    assert tag["type"] == "tags_with_separator" and tag["at_least_one"] and tag["stop_after_first"]
    tag = tools.structural_tag(req.tools, "named", parallel=True, named="get_time")["format"]
    assert tag["type"] == "tag" and '"get_time"' in tag["begin"] and tag["end"] == "}\n</tool_call>"
    assert ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], tools=TOOLS,
                                 tool_choice="none").tool_mode is None


# ---------------------------------------------------------------- over HTTP (tiny base)

# `server` and `client`: the default base's (tests/conftest.py)

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def valid_weather(arguments: str) -> bool:
    args = json.loads(arguments)
    return set(args) == {"city", "days"} and args["city"] in ("Paris", "Rome") and args["days"] in range(1, 8)


def streamed(client, **kw):
    """(content, [(id, name, arguments)], finish_reason) accumulated from a stream, as an OpenAI client does."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            d = ch.delta
            content += d.content or ""
            for tc in d.tool_calls or []:
                c = calls.setdefault(tc.index, [None, None, ""])
                if tc.id:
                    assert c[0] is None  # each call's id and name come once, with its first piece
                    c[0], c[1] = tc.id, tc.function.name
                c[2] += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    return content, [tuple(calls[i]) for i in sorted(calls)], finish


def test_required_and_named_calls_follow_the_schemas(client):
    """Sampled at temperature 1 from a random model, every call is one of the tools with arguments its schema
    allows; with parallel_tool_calls false exactly one call (finish "tool_calls"); a named function gets exactly one
    call of it (finish "stop", as OpenAI's)."""
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, n=4, temperature=1.0, seed=3, max_tokens=300)
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1 and ch.message.content is None
        call = ch.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        if call.function.name == "get_weather":
            assert valid_weather(call.function.arguments)
        else:
            assert call.function.name == "get_time" and json.loads(call.function.arguments) == {}
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, temperature=1.0, seed=5, n=4,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       max_tokens=300)
    for ch in r.choices:
        assert ch.finish_reason == "stop" and [c.function.name for c in ch.message.tool_calls] == ["get_weather"]
        assert valid_weather(ch.message.tool_calls[0].function.arguments)


def test_streamed_calls_add_up_to_the_whole_response(client):
    for kw in ({"tool_choice": "required"}, {"tool_choice": "required", "parallel_tool_calls": False},
               {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}):
        body = dict(model="tiny", messages=ASK, tools=TOOLS, temperature=0, max_tokens=300, **kw)
        whole = client.chat.completions.create(**body).choices[0]
        content, calls, finish = streamed(client, **body)
        assert finish == whole.finish_reason and content == (whole.message.content or "")
        assert [(n, a) for _, n, a in calls] == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
        assert all(cid.startswith("call_") for cid, _, _ in calls) and len({cid for cid, _, _ in calls}) == len(calls)


def test_auto_parses_calls_out_of_the_text(client):
    """tool_choice auto: the model may answer in text or call. A call forced here by guided_regex (which then holds
    instead of the tools' tag) comes back as a tool call beside the text before it, whole and streamed."""
    said = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 3}}\n</tool_call>')
    body = dict(model="tiny", messages=ASK, tools=TOOLS, temperature=0, max_tokens=300,
                extra_body={"guided_regex": said.replace("{", r"\{").replace("}", r"\}").replace(".", r"\.")})
    ch = client.chat.completions.create(**body).choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content == "Checking."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in ch.message.tool_calls] == [
        ("get_weather", {"city": "Rome", "days": 3})]
    assert streamed(client, **body)[::2] == ("Checking.", "tool_calls")
    # no call: the text is the content, as without tools
    ch = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, temperature=0, max_tokens=20,
                                        extra_body={"guided_regex": "Sunny, probably\\."}).choices[0]
    assert ch.message.content == "Sunny, probably." and ch.message.tool_calls is None and ch.finish_reason == "stop"
    # free generation with tools offered runs (a random model rarely opens a call; when it does, the call is valid)
    for ch in client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, temperature=1.0, seed=1, n=4,
                                             max_tokens=200).choices:
        assert ch.finish_reason in ("stop", "length", "tool_calls") and (ch.message.content or ch.message.tool_calls)
        assert (ch.finish_reason == "tool_calls") == (bool(ch.message.tool_calls) and ch.finish_reason != "length")
        for call in ch.message.tool_calls or []:
            assert call.function.name in ("get_weather", "get_time")
            if ch.finish_reason == "tool_calls":  # (complete calls: their arguments parse)
                json.loads(call.function.arguments)


def test_a_conversation_with_calls_and_results_continues(client, server):
    r = client.chat.completions.create(model="tiny", messages=list(CONVERSATION), tools=TOOLS, temperature=0,
                                       max_tokens=5, tool_choice="none")
    assert r.choices[0].message.content is not None and r.choices[0].message.tool_calls is None
    counted = httpx.post(server.url + "/tokenize", json={"messages": list(CONVERSATION), "tools": TOOLS}).json()
    used = client.chat.completions.create(model="tiny", messages=list(CONVERSATION), tools=TOOLS, temperature=0,
                                          max_tokens=1)
    assert counted["count"] == used.usage.prompt_tokens > r.usage.prompt_tokens  # (the tools written in, or not)


@pytest.mark.parametrize("body,param,words", [
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not among"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "unique"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "pattern"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, None, "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools", ""),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages",
     "text only"),
    ({"messages": [{"role": "tool", "content": "r"}]}, "messages", "tool_call_id"),
    ({"messages": [{"role": "user", "content": None}]}, "messages", "needs content"),
])
def test_bad_tool_requests_are_400s(server, body, param, words):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": ASK, **body})
    err = r.json()["error"]
    assert r.status_code == 400 and words in err["message"], err
    assert param is None or (err["param"] or "").startswith(param), err


@pytest.mark.slow
def test_default_base_calls_the_tool_with_the_city_it_was_asked_about():
    """SmolLM2-135M-Instruct (its template has no tools: they are written in), bfloat16, greedy, tool_choice
    required with one call: get_weather for Paris; the whole request path but HTTP (server.tools + protocol)."""
    import torch

    from server.engine import Engine, EngineConfig, GenerationRequest, collect

    model, tok = remix.load_base(dtype=torch.bfloat16)
    engine = Engine(model, tok, EngineConfig(max_model_len=1024, max_num_seqs=2))
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                               "required": ["city"]}}}
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "What is the weather like in Paris today?"}],
                                tools=[weather, TIME], tool_choice="required", parallel_tool_calls=False, temperature=0,
                                max_tokens=60)
    params = req.to_sampling(512)
    text = "".join(e.text for e in collect(engine, GenerationRequest("t", tools.prompt_ids(tok, req.messages, req.tools),
                                                                     params)))
    p = tools.CallParser()
    p.feed(text)
    p.finish()
    (call,) = p.tool_calls()
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_without_xgrammar_tools_are_refused_naming_them(monkeypatch):
    from server.engine import Engine, EngineConfig, EngineError, grammar

    monkeypatch.setattr(grammar, "xgr", None)
    model, tok = remix.tiny_model()
    engine = Engine(model, tok, EngineConfig(max_model_len=64, max_num_seqs=2))
    req = ChatCompletionRequest(model="m", messages=ASK, tools=TOOLS)
    with pytest.raises(EngineError, match="xgrammar") as err:
        engine.compile_grammar(*req.to_sampling(10).grammar)
    assert err.value.param == "tools"
    assert ChatCompletionRequest(model="m", messages=ASK, tools=TOOLS, tool_choice="none").to_sampling(10).grammar is None


def test_chat_template_controls():
    """vLLM's add_generation_prompt, continue_final_message (an assistant message left open: the model goes on with
    it) and chat_template_kwargs (the template's own variables), for chat and /tokenize alike."""
    tok = remix.tiny_model()[1]
    convo = msgs({"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"})
    text = tok.decode(tools.prompt_ids(tok, convo, continue_final_message=True, add_generation_prompt=False))
    assert text == "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nThe colour is"
    assert tok.decode(tools.prompt_ids(tok, convo[:1], add_generation_prompt=False)).endswith("colour.<|im_end|>\n")
    tok.chat_template = "{{ greeting }}{% for m in messages %}{{ m.content }}{% endfor %}"
    assert tok.decode(tools.prompt_ids(tok, convo[:1], template_kwargs={"greeting": "Hey! "})) == "Hey! Name a colour."
    req = ChatCompletionRequest(model="m", messages=[m.model_dump() for m in convo], continue_final_message=True)
    assert req.add_generation_prompt is False  # (implied; asking for both is an error, below)


def test_continue_final_message_over_http(client, server):
    convo = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]
    body = {"messages": convo, "continue_final_message": True}
    r = client.chat.completions.create(model="tiny", max_tokens=3, temperature=0, extra_body={"continue_final_message": True},
                                       messages=convo)
    counted = httpx.post(server.url + "/tokenize", json=body).json()
    assert r.usage.prompt_tokens == counted["count"] and counted["token_strs"][-1] == "s"  # "...is": left open
    for extra, param in (({"add_generation_prompt": True}, "continue_final_message"),
                         ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs")):
        err = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", **body, **extra})
        assert err.status_code == 400 and err.json()["error"]["param"] == param
    err = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": convo[:1],
                                                                 "continue_final_message": True})
    assert err.status_code == 400 and "assistant message last" in err.json()["error"]["message"]


def test_training_rows_with_tools_are_prompted_as_served(tmp_path):
    """A training row in OpenAI's form (tools, calls, results; remix.chat renders it for both sides): the prompt the
    trainer builds is the one the server builds for the same conversation, and the loss covers the assistant's
    calls as the model writes them."""
    from training.data import DataError, IGNORE, read_jsonl, tokenize

    tok = remix.tiny_model()[1]
    answer = {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}}]}
    row = {"tools": TOOLS, "messages": [*CONVERSATION, {"role": "assistant", "content": "Sunny at noon."},
                                        {"role": "user", "content": "And Rome?"}, answer]}
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (row,) = read_jsonl(path)
    ex = tokenize(row, tok, 4096)
    served = tools.prompt_ids(tok, msgs(*row["messages"][:-1]), [tools_model(t) for t in TOOLS])
    assert ex.prompt_ids == served and ex.input_ids[: len(served)] == served
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}\n</tool_call>'
    assert ex.reference == call
    learned = [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE]
    earlier = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    assert tok.decode(learned) == "".join(t + "<|im_end|>\n" for t in (earlier, "Sunny at noon.", call))  # every assistant turn
    for bad, words in (({"role": "user", "content": "x", "tool_calls": answer["tool_calls"]}, "only assistant"),
                       ({"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}, r"tool_calls\[0\]"),
                       ({"role": "assistant", "content": None}, "content")):
        path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, bad]}) + "\n")
        with pytest.raises(DataError, match=words):
            read_jsonl(path)
    path.write_text(json.dumps({"tools": [{"name": "f"}], "messages": [answer]}) + "\n")
    with pytest.raises(DataError, match="field 'tools'"):
        read_jsonl(path)


def test_check_tools_script_scores_through_the_api(server, capsys):
    """scripts/check_tools.py: the verdicts (a call must match name and arguments exactly, a text answer must not
    call), and a run against a live server that prints a score."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("check_tools", Path(__file__).parent.parent / "scripts/check_tools.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_time", "arguments": {"city": "Oslo"}}}]}]}
    call = {"tool_calls": [{"function": {"name": "get_time", "arguments": '{"city": "Oslo"}'}}]}
    assert mod.verdict(row, call) and not mod.verdict(row, {"content": "noon"})
    assert not mod.verdict(row, {"tool_calls": [{"function": {"name": "get_time", "arguments": '{"city": "Lima"}'}}]})
    text = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "42"}]}
    assert mod.verdict(text, {"content": "42."}) and not mod.verdict(text, {"content": "42", **call})
    assert mod.main(["--url", server.url, "--model", "tiny", "--size", "3"]) == 0
    assert "all: " in capsys.readouterr().out


def test_tool_call_metrics(client, server):
    """remix_tool_calls_total by function and remix_tool_choices_total by whether a choice offered tools called,
    counted once per choice, whole and streamed."""
    from prometheus_client.parser import text_string_to_metric_families

    def counts():
        out = {}
        for fam in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
            for smp in fam.samples:
                if smp.name in ("remix_tool_calls_total", "remix_tool_choices_total"):
                    out[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
        return out

    before = counts()
    named = {"type": "function", "function": {"name": "get_time"}}
    client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=named, n=2, temperature=0,
                                   max_tokens=200)
    streamed(client, model="tiny", messages=ASK, tools=TOOLS, tool_choice=named, temperature=0, max_tokens=200)
    client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, temperature=0, max_tokens=20,
                                   extra_body={"guided_regex": "No call\\."})
    after = counts()

    def grew(name, **labels):
        key = (name, tuple(sorted({"adapter": "tiny", **labels}.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("remix_tool_calls_total", function="get_time") == 3
    assert grew("remix_tool_choices_total", called="true") == 3 and grew("remix_tool_choices_total", called="false") == 1


def test_streamed_calls_of_several_choices_stay_apart(client):
    """n = 2, sampled with a seed, streamed: each choice's deltas carry its own calls (their chunks interleave), and
    they add up to the whole response's choices."""
    body = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", n=2, temperature=1.0, seed=9,
                max_tokens=300)
    whole = client.chat.completions.create(**body)
    calls: dict = {}
    for chunk in client.chat.completions.create(stream=True, **body):
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                c = calls.setdefault((ch.index, tc.index), [None, ""])
                c[0] = tc.function.name or c[0]
                c[1] += tc.function.arguments or ""
    for ch in whole.choices:
        got = [tuple(calls[(ch.index, i)]) for i in range(len(ch.message.tool_calls))]
        assert got == [(c.function.name, c.function.arguments) for c in ch.message.tool_calls]
    assert len(calls) == sum(len(ch.message.tool_calls) for ch in whole.choices)
