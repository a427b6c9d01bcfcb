"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) on a live server (tiny base), driven by the
official anthropic client: the same tokens as the chat endpoint for the same conversation, streamed and not; stop
sequences named; tool use held to the tools' schemas, and results fed back; Anthropic-shaped errors."""

import json

import httpx
import openai
import pytest

import remix
from tests.helpers import LiveServer, write_adapter

anthropic = pytest.importorskip("anthropic")

KEY = "test-key"
GREEDY = {"temperature": 0}  # (today's client takes no temperature argument; older ones, and vLLM, send the field)
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                            "required": ["city"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = write_adapter(remix.tiny_model()[0], tmp_path_factory.mktemp("adapters") / "alpha", 1, 4, 2, 4)
    srv = LiveServer(["--adapter", f"alpha={path}", "--api-key", KEY, "--max-model-len", "1024", "--max-num-seqs", "4"])
    yield srv
    srv.stop()


@pytest.fixture
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)  # (x-api-key)


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_blocks_become_chat_messages():
    """The translation itself: system blocks, an assistant's thinking (dropped), text and tool_use, a user's
    tool_result alone (only the tool message) and beside text (the tool message, then the user's text)."""
    from server.messages import MessagesRequest, chat_body

    body = MessagesRequest(model="m", max_tokens=4, system=[{"type": "text", "text": "S"}], messages=[
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm"}, {"type": "text", "text": "a"},
                                          {"type": "tool_use", "id": "t1", "name": "f", "input": {"x": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": True,
                                      "content": [{"type": "text", "text": "r"}]}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "r2"},
                                     {"type": "text", "text": "more"}]}])
    assert chat_body(body)["messages"] == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "tool_calls": [{"id": "t1", "type": "function",
                                                               "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "Error: r"},
        {"role": "tool", "tool_call_id": "t1", "content": "r2"}, {"role": "user", "content": "more"}]


def test_a_message_is_the_chat_completion_of_the_same_conversation(claude, oai):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": [{"type": "text", "text": "how"}, {"type": "text", "text": "are you"}]}]
    m = claude.messages.create(model="alpha", max_tokens=10, system="Be brief.", messages=turns, extra_body=GREEDY)
    c = oai.chat.completions.create(model="alpha", max_tokens=10, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, *turns[:2], {"role": "user", "content": "how\nare you"}])
    assert m.type == "message" and m.role == "assistant" and m.model == "alpha" and m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == c.choices[0].message.content
    assert m.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[c.choices[0].finish_reason]
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == c.usage.prompt_tokens
    assert m.usage.output_tokens == c.usage.completion_tokens
    count = claude.messages.count_tokens(model="alpha", system="Be brief.", messages=turns)
    assert count.input_tokens == c.usage.prompt_tokens
    # streamed: the same text, the events in Anthropic's order, the final message assembled by the client
    with claude.messages.stream(model="alpha", max_tokens=10, system="Be brief.", messages=turns, extra_body=GREEDY) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "content_block_delta" in kinds
    assert final.content[0].text == m.content[0].text and final.stop_reason == m.stop_reason
    assert final.usage.output_tokens == m.usage.output_tokens


def test_stop_sequences_are_named_and_cut(claude):
    ask = dict(model="alpha", max_tokens=24, messages=[{"role": "user", "content": "Tell me a story"}],
               extra_body={"temperature": 1.0, "seed": 11})  # (seeded: the same text each time)
    text = claude.messages.create(**ask).content[0].text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text.find(text[i:i + 2]) == i)
    m = claude.messages.create(**ask, stop_sequences=["nowhere", stop])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert m.content[0].text == text[: text.find(stop)]
    with claude.messages.stream(**ask, stop_sequences=["nowhere", stop]) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == m.content[0].text and final.stop_reason == "stop_sequence" and final.stop_sequence == stop


def test_tool_use_is_held_to_the_schema_and_results_go_back(claude):
    ask = dict(model="alpha", max_tokens=120, tools=[WEATHER], tool_choice={"type": "any", "disable_parallel_tool_use": True},
               extra_body=GREEDY,
               messages=[{"role": "user", "content": "Weather in Paris?"}])
    m = claude.messages.create(**ask)
    call = next(b for b in m.content if b.type == "tool_use")
    assert m.stop_reason == "tool_use" and call.name == "get_weather" and set(call.input) == {"city"}
    assert call.id and isinstance(call.input["city"], str)
    with claude.messages.stream(**ask) as s:
        final = s.get_final_message()
    streamed = next(b for b in final.content if b.type == "tool_use")
    assert streamed.name == call.name and streamed.input == call.input and final.stop_reason == "tool_use"
    # the call and its result go back as the next turn (named tool, one call only)
    again = claude.messages.create(
        model="alpha", max_tokens=120, tools=[WEATHER], extra_body=GREEDY,
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        messages=[*ask["messages"], {"role": "assistant", "content": m.content},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 C"},
                                               {"type": "text", "text": "And tomorrow?"}]}])
    assert [b.name for b in again.content if b.type == "tool_use"] == ["get_weather"]
    none = claude.messages.create(model="alpha", max_tokens=6, tools=[WEATHER], tool_choice={"type": "none"},
                                  extra_body=GREEDY, messages=ask["messages"])
    assert all(b.type == "text" for b in none.content) and none.stop_reason != "tool_use"


def test_output_config_format_holds_the_text_to_a_schema(claude):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    m = claude.messages.create(model="alpha", max_tokens=30, messages=[{"role": "user", "content": "A number?"}],
                               output_config={"format": {"type": "json_schema", "schema": schema}, "effort": "low"},
                               extra_body={"temperature": 1.0, "seed": 3})
    assert m.stop_reason == "end_turn" and set(json.loads(m.content[0].text)) == {"n"}


def test_anthropics_client_lists_the_models(claude, oai):
    """One /v1/models answers both clients: Anthropic's fields (type, display_name, created_at, the two limits, a
    page that has no more) beside OpenAI's."""
    listed = {m.id: m for m in claude.models.list()}
    assert set(listed) == {"tiny", "alpha"} == {m.id for m in oai.models.list()}
    alpha = claude.models.retrieve("alpha")
    assert alpha.type == "model" and alpha.display_name == "alpha" and alpha.max_input_tokens == 1024
    assert alpha.created_at.timestamp() == oai.models.retrieve("alpha").created


def test_errors_have_anthropics_shape(server, claude):
    for kw, status, says in (
            ({"max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}, 400, "max_tokens"),
            ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400,
             "image"),
            ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "temperature": 1.5}, 400, "temperature"),
            ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "thinking": {"type": "enabled"}}, 400,
             "think"),
            ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}],
              "tool_choice": {"type": "tool", "name": "nope"}, "tools": [WEATHER]}, 400, "nope")):
        r = httpx.post(server.url + "/v1/messages", headers={"x-api-key": KEY}, json={"model": "alpha", **kw})
        body = r.json()
        assert r.status_code == status and body["type"] == "error", (kw, r.text)
        assert body["error"]["type"] == "invalid_request_error" and says in body["error"]["message"], body
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="nope", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    r = httpx.post(server.url + "/v1/messages", headers={"x-api-key": "wrong"},
                   json={"model": "alpha", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert json.loads(httpx.post(server.url + "/v1/completions", headers={"x-api-key": KEY}, json={
        "model": "alpha", "prompt": "x", "max_tokens": 0}).text)["usage"]  # (x-api-key works everywhere)
    # OpenAI's endpoints keep OpenAI's error shape
    assert "error" in httpx.post(server.url + "/v1/completions", headers={"x-api-key": KEY}, json={}).json()
