"""Tool calling with a Llama 3.x chat template (llama3_json): the template renders tools, calls and results itself,
calls are held to '{"name": ..., "parameters": ...}' and parsed back out of the text, whole and streamed."""

import json
import random

import openai
import pytest

import remix
from remix import chat
from server import tools
from tests.helpers import LiveServer
from tests.test_tools import TOOLS, msgs, streamed, tools_model, valid_weather
from tests.test_tools import parse as parse_calls

pytest.importorskip("xgrammar")

# The tool parts of Llama 3.2 Instruct's template (tools in the first user message, a call as the JSON object, a
# result as an ipython turn; one call per assistant turn, as Meta's raises on more), with the tiny model's tokens.
LLAMA3_TEMPLATE = (
    "{%- if not tools is defined %}{%- set tools = none %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "<|im_start|>system\n{%- if tools is not none %}Environment: ipython\n{%- endif %}{{ system_message }}<|im_end|>\n"
    "{%- if tools is not none %}{%- set first_user_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}<|im_start|>user\n"
    "Given the following functions, please respond with a JSON for a function call with its proper arguments that "
    "best answers the given prompt.\n\n"
    "Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}."
    "Do not use variables.\n\n{%- for t in tools %}{{ t | tojson(indent=4) }}\n\n{%- endfor %}"
    "{{ first_user_message }}<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n"
    "{%- elif 'tool_calls' in message %}"
    "{%- if not message.tool_calls|length == 1 %}{{ raise_exception('This model only supports single tool-calls at once!') }}"
    "{%- endif %}{%- set tool_call = message.tool_calls[0].function %}"
    "<|im_start|>assistant\n{{ '{\"name\": \"' + tool_call.name + '\", ' }}{{ '\"parameters\": ' }}"
    "{{ tool_call.arguments | tojson }}{{ '}' }}<|im_end|>\n"
    "{%- elif message.role == 'tool' or message.role == 'ipython' %}<|im_start|>ipython\n"
    "{%- if message.content is mapping %}{{ message.content | tojson }}{%- else %}{{ message.content }}{%- endif %}"
    "<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")

CALLS = ('{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}; '
         '{"name": "get_time", "parameters": {}}')


def llama_tok():
    tok = remix.tiny_model()[1]
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def parse(pieces):
    return parse_calls(pieces, chat.LLAMA3_JSON)


def test_the_format_is_the_templates():
    assert chat.call_format(llama_tok()) == chat.LLAMA3_JSON and chat.native(llama_tok())
    assert chat.call_format(remix.tiny_model()[1]) == chat.HERMES  # no tools in its template: Hermes', written in


def test_parser_splits_llama3_calls_however_the_text_arrives():
    want = ("", [("get_weather", '{"city": "Paris", "days": 2}'), ("get_time", "{}")])
    assert parse([CALLS]) == want and parse(list(CALLS)) == want
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(CALLS)), rng.randint(1, 12)))
        assert parse([CALLS[a:b] for a, b in zip([0] + cuts, cuts + [len(CALLS)])]) == want
    # text before a call; braces, quotes and escapes inside strings do not end the arguments
    odd = 'Sure. {"name": "f", "parameters": {"x": "a}\\"{", "y": [1, {"z": "]"}]}} Done.'
    assert parse(list(odd)) == ("Sure. Done.", [("f", '{"x": "a}\\"{", "y": [1, {"z": "]"}]}')])
    assert parse(['{"name": "f", "parameters": {"x": 1']) == ("", [("f", '{"x": 1')])  # cut off
    assert parse(['{"nam']) == ('{"nam', []) and parse(['a {"b": 1}']) == ('a {"b": 1}', [])  # no call after all


def test_structural_tags_in_llama3_json():
    tag = tools.structural_tag([tools_model(t) for t in TOOLS], "required", parallel=True,
                               call_format=chat.LLAMA3_JSON)["format"]
    assert tag["separator"] == "; " and [t["begin"] for t in tag["tags"]] == [
        '{"name": "get_weather", "parameters": ', '{"name": "get_time", "parameters": ']
    assert {t["end"] for t in tag["tags"]} == {"}"}
    tag = tools.structural_tag([tools_model(t) for t in TOOLS], "auto", parallel=True,
                               call_format=chat.LLAMA3_JSON)["format"]
    assert tag["triggers"] == ['{"name": ']


def test_the_template_renders_tools_calls_and_results_itself():
    tok = llama_tok()
    conversation = ({"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": "c1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
                    {"role": "tool", "tool_call_id": "c1", "content": "sunny"})
    text = tok.decode(tools.prompt_ids(tok, msgs(*conversation), [tools_model(t) for t in TOOLS]))
    assert "Environment: ipython" in text and json.dumps(TOOLS[0], indent=4) in text
    # (this template's "{%-" eats the newlines before its tags)
    assert text.endswith('<|im_start|>assistant\n{"name": "get_weather", "parameters": {"city": "Paris", "days": 1}}'
                         "<|im_end|><|im_start|>ipythonsunny<|im_end|><|im_start|>assistant")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3") / "template.jinja"
    path.write_text(LLAMA3_TEMPLATE)
    srv = LiveServer(["--max-model-len", "2048", "--max-num-seqs", "8", "--chat-template", str(path)])
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
    srv.stop()


ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_served_llama3_calls_follow_the_schemas_whole_and_streamed(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", n=4,
                                       temperature=1.0, seed=3, max_tokens=300)
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls" and ch.message.tool_calls and ch.message.content is None
        for call in ch.message.tool_calls:
            if call.function.name == "get_weather":
                assert valid_weather(call.function.arguments)
            else:
                assert call.function.name == "get_time" and json.loads(call.function.arguments) == {}
    for kw in ({"tool_choice": "required"}, {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}):
        body = dict(model="tiny", messages=ASK, tools=TOOLS, temperature=0, max_tokens=300, **kw)
        whole = client.chat.completions.create(**body).choices[0]
        content, calls, finish = streamed(client, **body)
        assert finish == whole.finish_reason and content == (whole.message.content or "")
        assert [(n, a) for _, n, a in calls] == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    # auto: a call the model writes (forced here by guided_regex) is parsed out of the text
    said = 'Checking. {"name": "get_weather", "parameters": {"city": "Rome", "days": 3}}'
    ch = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, temperature=0, max_tokens=300, extra_body={
        "guided_regex": said.replace("{", r"\{").replace("}", r"\}").replace(".", r"\.")}).choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content == "Checking."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in ch.message.tool_calls] == [
        ("get_weather", {"city": "Rome", "days": 3})]
