"""Chat prompts as training and serving both build them: OpenAI-form messages (and tools) through a tokenizer's chat
template, so an adapter trained on a conversation sees at serving time the prompt it was trained on.

Messages are dicts in OpenAI's form: ``role`` (system, developer - taken as system -, user, assistant, tool),
``content`` (a string, a list of text parts, or None for an assistant message that only calls), optional ``name``,
``tool_calls`` (an assistant's: ``{"id", "type": "function", "function": {"name", "arguments"}}``, arguments as JSON
text or an object) and ``tool_call_id`` (a tool result's). Tools are OpenAI's ``{"type": "function", "function":
{"name", "description", "parameters"}}``.

Two call formats. Hermes' (Qwen2.5, Qwen3, NousResearch Hermes)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and Llama 3.1-3.3's JSON (``llama3_json``: the object alone, ``"parameters"`` for the arguments, results in
``ipython`` turns)::

    {"name": "get_weather", "parameters": {"city": "Paris"}}

A chat template that writes one of these itself (its source mentions ``<tool_call>``, or writes calls as
``"parameters": `` with ``tool_calls``) renders the tools, the earlier calls and their results. Any other template
(SmolLM2's has no tool support) gets them written in Hermes' format here: the tools in a system message (Qwen2.5's
wording), calls inside the assistant's content, results as user turns in ``<tool_response>`` tags (consecutive results
in one turn).
"""

from __future__ import annotations

import json

OPEN, CLOSE = "<tool_call>", "</tool_call>"

SYSTEM_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>"
)


HERMES, LLAMA3_JSON = "hermes", "llama3_json"


def call_format(tokenizer) -> str:
    """The call format the model is prompted with and held to: llama3_json where the chat template writes calls as
    Llama 3.1-3.3's do, else hermes (the template's own, or written in here)."""
    template = tokenizer.chat_template
    if (isinstance(template, str) and OPEN not in template and "tool_calls" in template
            and ('"parameters": ' in template or "<|python_tag|>" in template)):
        return LLAMA3_JSON
    return HERMES


def native(tokenizer) -> bool:
    """Whether the tokenizer's chat template writes tools and calls itself (in either format)."""
    template = tokenizer.chat_template
    return isinstance(template, str) and (OPEN in template or call_format(tokenizer) == LLAMA3_JSON)


def text_of(content) -> str:
    """A message's content as one string (text parts joined by newlines, as vLLM joins them; None: empty)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content)


def arguments(value):
    """A call's arguments as templates want them: an object (parsed when given as JSON text), else the text."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def call_text(name: str, args) -> str:
    """One call in Hermes' format, as the model writes it."""
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments(args)}, ensure_ascii=False)}\n{CLOSE}"


def assistant_text(message: dict) -> str:
    """What the model writes for an assistant message where the template has no tool support: its content, then
    its calls (one per line)."""
    calls = [call_text(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []]
    content = text_of(message.get("content"))
    return "\n".join(([content] if content else []) + calls)


def conversation(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> tuple[list[dict], dict]:
    """The messages and tools as the chat template's arguments: (messages as the template takes them, extra keyword
    arguments). Without tools or calls, each message is {role, content} (and name)."""
    own = native(tokenizer)
    out: list[dict] = []
    last_tool = False  # the previous message was a tool result (merged into one user turn when written here)
    for m in messages:
        role = "system" if m["role"] == "developer" else m["role"]
        text = text_of(m.get("content"))
        d = {"role": role, "content": text}
        if m.get("name") is not None:
            d["name"] = m["name"]
        if role == "tool" and own:
            d = {"role": "tool", "content": text, "tool_call_id": m.get("tool_call_id")}
        elif role == "tool":
            block = f"<tool_response>\n{text}\n</tool_response>"
            if last_tool:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            last_tool = True
            continue
        elif m.get("tool_calls") and own:
            d["tool_calls"] = [{"type": "function", **({"id": c["id"]} if c.get("id") else {}),
                                "function": {"name": c["function"]["name"],
                                             "arguments": arguments(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        elif m.get("tool_calls"):
            d["content"] = assistant_text(m)
        last_tool = False
        out.append(d)
    if tools and own:
        return out, {"tools": list(tools)}
    if tools:
        text = SYSTEM_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, {}


def prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
               continue_final_message: bool = False, template_kwargs: dict | None = None) -> list[int]:
    """The chat template applied to the conversation (and tools), as token ids; continue_final_message: the last
    (assistant) message left open for the model to go on with; template_kwargs: the template's own variables."""
    msgs, extra = conversation(tokenizer, messages, tools)
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        continue_final_message=continue_final_message, **(template_kwargs or {}), **extra)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
