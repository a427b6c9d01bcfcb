"""Structured output (xgrammar): JSON, JSON schemas, regexes and choices constrain every sampled token, greedy and
sampled, alone and in a batch, over the engine and the API; bad grammars are a 400 naming the field."""

import json
import re

import pytest
import torch

from server.engine import Engine, EngineConfig, EngineError, GenerationRequest, SamplingParams, collect
from tests.test_engine import PROMPTS, lively_tiny

pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tiny():
    model, tok = lively_tiny()
    engine = Engine(model, tok, EngineConfig(max_model_len=256, max_num_seqs=8, max_prefill_chunk=16, max_batched_tokens=64))
    return engine, tok


def text_of(events):
    return "".join(e.text for e in events), events[-1].finish_reason


def run(engine, tok, rid, grammar, prompt=PROMPTS[0], ids=None, **kw):
    params = SamplingParams(max_tokens=kw.pop("max_tokens", 120), temperature=kw.pop("temperature", 0.0), grammar=grammar, **kw)
    return text_of(collect(engine, GenerationRequest(rid, ids or tok(prompt).input_ids, params)))


def loads(text):
    """Python's strict parser: it refuses raw control characters in strings, which xgrammar's converter admits in
    length-bounded strings (as SCHEMA's name) unless server.engine.grammar narrows them, and the tiny model samples"""
    return json.loads(text)


def valid(doc) -> bool:
    return (set(doc) == {"name", "age", "tags"} and isinstance(doc["name"], str) and len(doc["name"]) <= 8
            and isinstance(doc["age"], int) and 0 <= doc["age"] <= 120 and len(doc["tags"]) <= 3
            and set(doc["tags"]) <= {"a", "b"})


def test_outputs_follow_their_grammar(tiny):
    engine, tok = tiny
    # the lively tiny model left alone answers "888888..." or bytes; each grammar holds it to its language
    for i, prompt in enumerate(PROMPTS):
        for temperature in (0.0, 1.0):
            text, reason = run(engine, tok, f"c{i}{temperature}", ("choice", ["yes", "no", "maybe"], "guided_choice"),
                               prompt, temperature=temperature, seed=i)
            assert text in ("yes", "no", "maybe") and reason == "stop"
            text, reason = run(engine, tok, f"r{i}{temperature}", ("regex", r"[0-9]{3}-[a-z]{2}", "guided_regex"),
                               prompt, temperature=temperature, seed=i)
            assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text) and reason == "stop"
            text, reason = run(engine, tok, f"s{i}{temperature}", ("json_schema", SCHEMA, "response_format"),
                               prompt, temperature=temperature, seed=i, max_tokens=200)
            assert reason == "stop" and valid(loads(text)), text
    for seed in range(3):  # any JSON object (a length cut leaves a prefix of one)
        text, reason = run(engine, tok, f"obj{seed}", ("json_object", None, "response_format"), max_tokens=60,
                           temperature=1.0, seed=seed)
        assert text.startswith("{") and (reason == "length" or isinstance(loads(text), dict)), text


def test_a_cut_by_max_tokens_is_a_prefix_and_batches_do_not_matter(tiny):
    engine, tok = tiny
    grammar = ("json_schema", SCHEMA, "response_format")
    full, _ = run(engine, tok, "full", grammar, max_tokens=200, temperature=0.9, seed=5)
    cut, reason = run(engine, tok, "cut", grammar, max_tokens=6, temperature=0.9, seed=5)
    assert reason == "length" and full.startswith(cut)
    # seeded, in a batch with unconstrained and other constrained requests: the same text
    sinks = {i: [] for i in range(4)}
    for i in range(4):
        g = grammar if i % 2 == 0 else None
        params = SamplingParams(max_tokens=200, temperature=0.9, seed=5 if i == 0 else i, grammar=g)
        engine.submit(GenerationRequest(f"b{i}", tok(PROMPTS[0]).input_ids, params), sinks[i].append)
    while engine.has_work():
        engine.step()
    assert text_of(sinks[0])[0] == full
    assert valid(loads(text_of(sinks[2])[0]))
    # n = 2 sequences each keep their own matcher
    events = collect(engine, GenerationRequest("n2", tok(PROMPTS[1]).input_ids, SamplingParams(
        max_tokens=200, temperature=1.0, seed=9, n=2, grammar=grammar)))
    for index in (0, 1):
        assert valid(loads("".join(e.text for e in events if e.index == index)))
    assert engine.stats()["slots_used"] == 0


def test_a_grammar_complete_before_min_tokens_still_ends(tiny):
    engine, tok = tiny
    text, reason = run(engine, tok, "m", ("choice", ["ok"], "guided_choice"), min_tokens=10, max_tokens=20)
    assert text == "ok" and reason == "stop"


def test_bad_grammars_are_refused_naming_the_field(tiny):
    engine, tok = tiny
    for grammar in (("regex", "[a-", "guided_regex"), ("json_schema", {"type": "nonsense"}, "response_format")):
        with pytest.raises(EngineError) as err:
            engine.submit(GenerationRequest("bad", [1, 2], SamplingParams(grammar=grammar)), lambda e: None)
        assert err.value.param == grammar[2] and "[" not in str(err.value).split(":")[0]
    assert not engine.has_work()


def test_ebnf_and_lark_grammars_hold_the_output(tiny):
    """vLLM's structured_outputs.grammar: EBNF (xgrammar's, llama.cpp's GBNF form) or Lark; the same language either
    way, greedy and sampled; a grammar that does not parse is refused naming the field."""
    engine, tok = tiny
    ebnf = 'root ::= "id-" [0-9] [0-9] ("-" [a-z])?'
    lark = 'start: "id-" DIGIT DIGIT ("-" LOWER)?\nDIGIT: /[0-9]/\nLOWER: /[a-z]/'
    for i, text in enumerate((ebnf, lark)):
        for temperature in (0.0, 1.0):
            out, reason = run(engine, tok, f"g{i}{temperature}", ("grammar", text, "structured_outputs.grammar"),
                              temperature=temperature, seed=3, max_tokens=20)
            assert re.fullmatch(r"id-[0-9]{2}(-[a-z])?", out) and reason == "stop", out
    for text in ('root ::= "a" undefined_rule', "start: (", 'root ::= "unclosed'):
        with pytest.raises(EngineError) as err:
            engine.submit(GenerationRequest("bad", [1, 2], SamplingParams(
                grammar=("grammar", text, "structured_outputs.grammar"))), lambda e: None)
        assert err.value.param == "structured_outputs.grammar" and str(err.value).startswith("structured_outputs.grammar: ")
    assert not engine.has_work()


def test_structural_tags_in_both_forms(tiny):
    """vLLM's structured_outputs.structural_tag: xgrammar's form, or vLLM's older {"structures", "triggers"}: free text
    until a trigger, then the tag's schema (strict JSON strings, no free whitespace), then free text again."""
    import xgrammar as xgr

    engine, tok = tiny
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"]}
    older = {"structures": [{"begin": "<f>", "schema": schema, "end": "</f>"}], "triggers": ["<f"]}
    newer = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<f"], "tags": [
        {"type": "tag", "begin": "<f>", "content": {"type": "json_schema", "json_schema": schema}, "end": "</f>"}]}}

    def takes(compiled, text):
        m = xgr.GrammarMatcher(compiled)
        return all(m.accept_token(t) for t in tok(text, add_special_tokens=False).input_ids)

    from server.protocol import ChatCompletionRequest

    as_format = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}],
                                      response_format={"type": "structural_tag", **older}).to_sampling(10).grammar[1]
    for tag in (older, json.dumps(older), newer, as_format):
        compiled = engine.compile_grammar("structural_tag", tag, "structured_outputs.structural_tag")
        assert takes(compiled, 'Let me see. <f>{"city": "Oslo"}</f> done')
        assert not takes(compiled, 'x <f>{"town": "Oslo"}')  # the schema holds inside the tag
        assert not takes(compiled, 'x <f>{"city": "O\x01')  # JSON's strings: no raw control characters
    with pytest.raises(EngineError) as err:
        engine.submit(GenerationRequest("bad", [1, 2], SamplingParams(grammar=(
            "structural_tag", {"structures": [{"begin": "<f>"}], "triggers": ["<f"]}, "structured_outputs.structural_tag"
        ))), lambda e: None)
    assert err.value.param == "structured_outputs.structural_tag" and "structures" in str(err.value)


def test_vllm_structured_outputs_fields_map_to_grammars():
    """The request fields: structured_outputs (vLLM since v0.12) and the guided_* fields before it, one at most, each
    mapped to the grammar the engine compiles with the field it blames; disable_additional_properties closes objects."""
    import pydantic

    from server.protocol import CompletionRequest, _grammar

    def spec(**body):
        return _grammar(CompletionRequest(model="m", prompt="x", **body))

    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}},
                                               "c": {"type": "object", "additionalProperties": True}}}
    closed = spec(structured_outputs={"json": schema, "disable_additional_properties": True})
    assert closed[0] == "json_schema" and closed[2] == "structured_outputs.json"
    assert closed[1]["additionalProperties"] is False and closed[1]["properties"]["a"]["additionalProperties"] is False
    assert closed[1]["properties"]["c"]["additionalProperties"] is True  # (what a schema says stays)
    assert "additionalProperties" not in spec(structured_outputs={"json": json.dumps(schema)})[1]
    assert spec(structured_outputs={"regex": "[a-z]+", "choice": None}) == ("regex", "[a-z]+", "structured_outputs.regex")
    assert spec(structured_outputs={"choice": ["a", "b"]}) == ("choice", ["a", "b"], "structured_outputs.choice")
    assert spec(structured_outputs={"grammar": 'root ::= "x"'}) == ("grammar", 'root ::= "x"', "structured_outputs.grammar")
    assert spec(structured_outputs={"json_object": True, "disable_any_whitespace": True})[0] == "json_object"
    assert spec(structured_outputs={"structural_tag": '{"structures": [], "triggers": []}'})[1] == {
        "structures": [], "triggers": []}
    assert spec(guided_json='{"type": "object"}', guided_decoding_backend="xgrammar") == (
        "json_schema", {"type": "object"}, "guided_json")
    assert spec(guided_grammar='root ::= "x"') == ("grammar", 'root ::= "x"', "guided_grammar")
    older = {"structures": [{"begin": "<f>", "schema": {"type": "object"}, "end": "</f>"}], "triggers": ["<f"]}
    assert spec(response_format={"type": "structural_tag", **older}) == ("structural_tag", older, "response_format")
    fmt = {"type": "triggered_tags", "triggers": ["<f"], "tags": []}
    assert spec(response_format={"type": "structural_tag", "format": fmt}) == (
        "structural_tag", {"type": "structural_tag", "format": fmt}, "response_format")
    for body, says in (({"structured_outputs": {}}, "exactly one"),
                       ({"structured_outputs": {"json": {}, "regex": "a"}}, "exactly one"),
                       ({"structured_outputs": {"json": "{nope"}}, "not valid JSON"),
                       ({"structured_outputs": {"json": "[1]"}}, "JSON object"),
                       ({"structured_outputs": {"json_object": False}}, "must be true"),
                       ({"structured_outputs": {"choice": ["a", ""]}}, "non-empty"),
                       ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "not supported"),
                       ({"structured_outputs": {"regex": "a"}, "guided_regex": "b"}, "at most one"),
                       ({"guided_json": {}, "response_format": {"type": "json_object"}}, "at most one"),
                       ({"guided_json": "nope"}, "not valid JSON"),
                       ({"response_format": {"type": "structural_tag"}}, "needs format"),
                       ({"response_format": {"type": "structural_tag", "structures": []}}, "needs format"),
                       ({"response_format": {"type": "json_object", "triggers": ["<f"]}}, "go with type")):
        with pytest.raises(pydantic.ValidationError, match=says):
            spec(**body)


def test_without_xgrammar_the_request_is_refused(monkeypatch):
    from server.engine import grammar

    monkeypatch.setattr(grammar, "xgr", None)
    model, tok = lively_tiny()
    engine = Engine(model, tok, EngineConfig(max_model_len=64, max_num_seqs=2))
    with pytest.raises(EngineError, match="xgrammar") as err:
        engine.submit(GenerationRequest("g", [1, 2], SamplingParams(grammar=("choice", ["a"], "guided_choice"))),
                      lambda e: None)
    assert err.value.param == "guided_choice"
    assert collect(engine, GenerationRequest("plain", [1, 2], SamplingParams(max_tokens=2)))[-1].finished


@pytest.mark.slow
def test_default_base_answers_within_its_grammar():
    """SmolLM2-135M-Instruct, bfloat16, greedy: a regex keeps its own answer's form; a schema gives parseable JSON."""
    import torch

    import remix

    model, tok = remix.load_base(dtype=torch.bfloat16)
    engine = Engine(model, tok, EngineConfig(max_model_len=256, max_num_seqs=2))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    text, reason = run(engine, tok, "re", ("regex", r"The capital of France is [A-Z][a-z]+\.", "guided_regex"),
                       max_tokens=30, prompt=None, ids=ids)
    assert text == "The capital of France is Paris." and reason == "stop"
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"type": "string", "maxLength": 20}},
              "required": ["city", "country"], "additionalProperties": False}
    text, reason = run(engine, tok, "js", ("json_schema", schema, "response_format"), max_tokens=40, prompt=None, ids=ids)
    assert reason == "stop" and set(loads(text)) == {"city", "country"}


def test_json_strings_take_no_raw_control_characters(tiny):
    """xgrammar's converter admits raw control characters in length-bounded strings; the server narrows them to
    JSON's, in response_format schemas and in tools' argument schemas alike (and allows no free whitespace)."""
    import xgrammar as xgr

    from server import tools
    from server.protocol import ChatCompletionRequest

    engine, tok = tiny
    bounded = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 8}}, "required": ["a"]}
    offered = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], tool_choice="required",
                                    tools=[{"type": "function", "function": {"name": "f", "parameters": bounded}}])
    cases = ((engine.compile_grammar("json_schema", bounded), ""),
             (engine.compile_grammar(*offered.to_sampling(10).grammar), tools.OPEN + '\n{"name": "f", "arguments": '))

    def takes(compiled, text):
        m = xgr.GrammarMatcher(compiled)
        return all(m.accept_token(t) for t in tok(text, add_special_tokens=False).input_ids)

    for compiled, head in cases:
        assert takes(compiled, head + '{"a": "xy"}') and takes(compiled, head + '{"a": "x\u00e9')
        for bad in ("\x01", "\x1f", "\t", "\n"):
            assert not takes(compiled, head + '{"a": "x' + bad), repr(bad)
        assert not takes(compiled, head + '{ "a"') and not takes(compiled, head + '{"a":"')  # no free whitespace


def three_grammars(engine):
    """A regex, a JSON schema and a choice (as the request fields give them), and their compilations."""
    kinds = [("regex", r"[0-9]{3}-[a-z]{2}", "guided_regex"), ("json_schema", SCHEMA, "response_format"),
             ("choice", ["yes", "no"], "guided_choice")]
    return kinds, [engine.compile_grammar(*k) for k in kinds]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("apply", ["xgrammar", "torch"])
def test_batched_greedy_grammar_rows_equal_the_row_by_row_path(tiny, dtype, apply, monkeypatch):
    """Greedy rows held only by a grammar are masked and argmaxed together (one bitmask, one application, in the
    logits' dtype); each gets the token the row-by-row path (widen, adjust_logits, argmax) gives it, beside plain
    greedy rows, a sampled grammar row (the sampling kernel's, below) and a greedy grammar row with a penalty, which
    take their own paths."""
    from server.engine.grammar import Matcher
    from server.engine.sampler import TokenHistory, adjust_logits, first_argmax, sample

    monkeypatch.setattr(Matcher, "APPLY", apply)
    engine, tok = tiny
    vocab = engine.runner.model.config.vocab_size
    kinds, compiled = three_grammars(engine)
    torch.manual_seed(0)
    logits = (torch.randn(7, vocab) * 3).to(dtype)
    grammar = [0, 1, None, 2, 0, 1, 2]  # row 2 plain; row 4 sampled; row 5 (penalty) takes the row-by-row path
    params, history = [], []
    for i, g in enumerate(grammar):
        p = SamplingParams(temperature=1.0 if i == 4 else 0.0, grammar=kinds[g] if g is not None else None,
                           presence_penalty=0.5 if i == 5 else 0.0)
        h = TokenHistory([1, 2], matcher=Matcher(compiled[g], vocab) if g is not None else None)
        if i in (1, 5):
            h.update(tok('{"name', add_special_tokens=False).input_ids)  # (a matcher part-way through)
        params.append(p)
        history.append(h)
    got = sample(logits, params, [torch.Generator().manual_seed(i) for i in range(7)], history)
    for i in (0, 1, 3, 5):
        row = adjust_logits(logits[i].float().clone(), params[i], history[i])
        assert int(got[i]) == int(first_argmax(row.view(1, -1))[0]), i
    assert int(got[2]) == int(first_argmax(logits[2:3])[0])
    assert torch.isfinite(adjust_logits(logits[4].float().clone(), params[4], history[4])[int(got[4])])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_sampled_grammar_rows_equal_the_row_by_row_path(tiny, dtype, monkeypatch):
    """Sampled rows held only by a grammar are drawn together by the compiled kernel with their bitmasks applied
    inside it (Matcher.APPLY "xgrammar"); with APPLY "torch" each row is widened, masked by adjust_logits and drawn on
    its own: the same seeds give the same tokens, each allowed by its grammar."""
    from server.engine import sampler
    from server.engine.grammar import Matcher
    from server.engine.sampler import TokenHistory, adjust_logits, sample

    if sampler.cpu_ext.for_input(torch.zeros(1, 4)) is None:
        pytest.skip("the compiled CPU kernels are not built here")
    engine, tok = tiny
    vocab = engine.runner.model.config.vocab_size
    kinds, compiled = three_grammars(engine)
    torch.manual_seed(1)
    logits = (torch.randn(6, vocab) * 3).to(dtype)
    params = [SamplingParams(temperature=t, top_p=q, top_k=k, grammar=kinds[i % 3])
              for i, (t, q, k) in enumerate([(0.7, 0.9, 0), (1.0, 1.0, 0), (1.3, 0.5, 5), (0.7, 0.9, 0), (1.0, 1.0, 3),
                                             (0.2, 1.0, 0)])]
    draws = {}
    for apply in ("xgrammar", "torch"):
        monkeypatch.setattr(Matcher, "APPLY", apply)
        history = [TokenHistory([1, 2], matcher=Matcher(compiled[i % 3], vocab)) for i in range(6)]
        draws[apply] = sample(logits, params, [torch.Generator().manual_seed(i) for i in range(6)], history).tolist()
        for i, t in enumerate(draws[apply]):
            assert torch.isfinite(adjust_logits(logits[i].float().clone(), params[i], history[i])[t])
    assert draws["xgrammar"] == draws["torch"]
