"""OpenAI's Responses API (/v1/responses) over the chat path: the same tokens as the chat endpoint for the same
conversation, OpenAI's objects and stream events (checked against the official client's own pydantic types), stored
responses continued by previous_response_id, function calls out and their results back in, and 400s naming the field."""

import json

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.helpers import drop_streams, wait_idle

EVENT = TypeAdapter(ResponseStreamEvent)
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                          "required": ["city"], "additionalProperties": False}}


# `server` and `client`: the default base's (tests/conftest.py)

def post(server, body, path="/v1/responses"):
    return httpx.post(server.url + path, json=body, timeout=120)


def events_of(server, body) -> list[dict]:
    """The raw SSE events of a streamed response, each checked: its ``event:`` line names its type."""
    out = []
    with httpx.stream("POST", server.url + "/v1/responses", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for block in r.read().decode().split("\n\n"):
            if block.strip():
                head, data = block.split("\n", 1)
                event = json.loads(data.removeprefix("data: "))
                assert head == f"event: {event['type']}"
                out.append(event)
    return out


def test_text_equals_the_chat_endpoint_and_fits_openai_types(server, client):
    body = {"model": "tiny", "instructions": "Answer briefly.", "input": "Say something.", "max_output_tokens": 12,
            "temperature": 0}
    raw = post(server, body).json()
    r = Response.model_validate(raw)  # the official client's type, strictly: every required field, right types
    chat = client.chat.completions.create(model="tiny", max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Say something."}])
    assert r.output_text == chat.choices[0].message.content and r.output_text
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"  # 12 tokens, cut
    assert r.output[0].type == "message" and r.output[0].status == "incomplete"
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.id.startswith("resp_") and r.instructions == "Answer briefly." and r.max_output_tokens == 12
    # the stream: OpenAI's events in order, numbered from 0, the deltas adding up to the same text
    events = events_of(server, body)
    for e in events:
        EVENT.validate_python(e)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    types = [e["type"] for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == r.output_text == events[-4]["text"]
    final = Response.model_validate(events[-1]["response"])
    assert final.output_text == text and final.usage.output_tokens == 12 and final.status == "incomplete"


def test_stored_responses_continue_and_can_be_read_and_deleted(server, client):
    first = client.responses.create(model="tiny", input="Hello.", max_output_tokens=6, temperature=0)
    assert client.responses.retrieve(first.id).output_text == first.output_text
    second = client.responses.create(model="tiny", input="And then?", previous_response_id=first.id,
                                     max_output_tokens=6, temperature=0)
    # the same prompt as the whole conversation sent to the chat endpoint
    chat = client.chat.completions.create(model="tiny", max_tokens=6, temperature=0, messages=[
        {"role": "user", "content": "Hello."}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"}])
    assert second.usage.input_tokens == chat.usage.prompt_tokens and second.output_text == chat.choices[0].message.content
    assert second.previous_response_id == first.id
    # streamed responses are stored too
    streamed = [e for e in events_of(server, {"model": "tiny", "input": "Hi", "max_output_tokens": 3})][-1]["response"]
    assert client.responses.retrieve(streamed["id"]).output_text == Response.model_validate(streamed).output_text
    client.responses.delete(first.id)
    for call in (lambda: client.responses.retrieve(first.id),
                 lambda: client.responses.create(model="tiny", input="x", previous_response_id=first.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    unstored = client.responses.create(model="tiny", input="x", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_function_calls_out_and_results_back_in(server, client):
    pytest.importorskip("xgrammar")
    ask = {"model": "tiny", "input": "What is the weather in Paris?", "tools": [WEATHER],
           "tool_choice": {"type": "function", "name": "get_weather"}, "max_output_tokens": 200, "temperature": 1.0,
           "seed": 4}
    r = Response.model_validate(post(server, ask).json())
    calls = [o for o in r.output if o.type == "function_call"]
    assert r.status == "completed" and len(calls) == 1 and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments)["city"] in ("Paris", "Rome") and calls[0].call_id.startswith("call_")
    assert r.tools[0].name == "get_weather" and r.tool_choice.name == "get_weather"
    # streamed: the call's item, its argument pieces adding up, the same call as the whole response's
    events = events_of(server, ask)
    for e in events:
        EVENT.validate_python(e)
    pieces = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0]["arguments"] == pieces == calls[0].arguments
    assert events[-1]["type"] == "response.completed"
    # the call and its result as input items: the prompt the chat endpoint builds from the same turns
    follow = client.responses.create(model="tiny", max_output_tokens=4, temperature=0, tools=[WEATHER], input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 21 C"}])
    chat = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, tools=[
        {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}], messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": calls[0].call_id, "type": "function", "function": {
            "name": "get_weather", "arguments": calls[0].arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].call_id, "content": "Sunny, 21 C"}])
    assert follow.usage.input_tokens == chat.usage.prompt_tokens > 100


def test_json_schema_text_format(server):
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    r = Response.model_validate(post(server, {"model": "tiny", "input": "Answer in JSON.", "temperature": 1.0, "seed": 1,
                                              "max_output_tokens": 100, "text": {"format": {
                                                  "type": "json_schema", "name": "answer", "schema": schema}}}).json())
    assert r.status == "completed" and isinstance(json.loads(r.output_text)["ok"], bool)
    assert r.text.format.type == "json_schema" and r.text.format.name == "answer"


@pytest.mark.parametrize("body,param", [
    ({"input": "x", "frobnicate": 1}, "frobnicate"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input"),
    ({"input": "x", "include": ["message.output_text.logprobs"]}, "include"),
    ({"input": "x", "background": True}, "background"),
    ({"input": []}, "input"),
    ({"input": "x", "max_output_tokens": 5000}, "max_output_tokens"),
    ({"input": [{"type": "function_call_output", "output": "no call id"}]}, "input"),
], ids=["unknown", "tool_choice", "reasoning", "image", "include", "background", "empty", "context", "call_output"])
def test_bad_requests_are_400_naming_the_field(server, body, param):
    r = post(server, {"model": "tiny", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"].split(".")[0] == param, err
    assert httpx.get(server.url + "/health").status_code == 200  # and the server goes on


def test_dropped_response_streams_free_everything(server):
    """Clients that hang up at any point of a stream (before its first event, or after a few) cancel their requests."""
    drop_streams(server.url, 30, lambda i: {"model": "tiny", "input": f"stream {i}", "max_output_tokens": 300,
                                            "stream": True}, keep_lines=lambda i: i % 5, path="/v1/responses")
    h = wait_idle(server.url)
    assert (h["running"], h["waiting"], h["slots_used"], h["kv_tokens_used"]) == (0, 0, 0, 0), h
