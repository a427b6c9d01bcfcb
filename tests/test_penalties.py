"""Presence / frequency / repetition penalties and logit bias: the sampler's arithmetic by hand, the engine against
plain reference loops and Hugging Face's own repetition penalty, batch-mates, and the API's checks."""

import pytest
import torch

from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, collect
from server.engine.sampler import TokenHistory, adjust_logits, sample
from tests.test_engine import PROMPTS, lively_tiny, tokens_of


def test_adjust_logits_by_hand():
    row = torch.tensor([2.0, -1.0, 4.0, 0.5, 1.0, 3.0])
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0, logit_bias={5: -100.0, 4: 3.0})
    history = TokenHistory([0, 1])
    got = adjust_logits(row.clone(), p, history.update([2, 2]).update([2, 2, 3]))  # counted once each
    # repetition over prompt + output {0, 1, 2, 3}: positive / 2, negative * 2 -> [1, -2, 2, 0.25, 1, 3]
    # frequency + presence over the output: token 2 twice -> -(2 * 0.25 + 0.5) = -1; token 3 once -> -0.75
    # bias: token 4 + 3, token 5 - 100
    assert got.tolist() == [1.0, -2.0, 1.0, -0.5, 4.0, -97.0]
    assert not SamplingParams().adjusts and SamplingParams(logit_bias={1: 0.5}).adjusts
    # OpenAI's penalties count the output only: with nothing generated they change nothing
    assert adjust_logits(row.clone(), SamplingParams(presence_penalty=2.0), TokenHistory([0, 1])).tolist() == row.tolist()


def test_sample_applies_them_to_greedy_and_sampled_rows_only_where_asked():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]] * 3)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logit_bias={2: 10.0}),
              SamplingParams(temperature=0.7, logit_bias={0: 100.0}, seed=1)]
    gens = [None, None, torch.Generator().manual_seed(1)]
    history = [None, TokenHistory([1]), TokenHistory([1])]
    assert sample(logits, params, gens, history).tolist() == [1, 2, 0]
    assert logits[0].tolist() == [0.0, 5.0, 1.0, 2.0]  # the caller's logits (log-probs come from them) untouched
    with pytest.raises(ValueError, match="history"):
        sample(logits, params, gens)


@pytest.fixture(scope="module")
def tiny():
    """The engine, and a separate copy of its (seeded) model for the references, untouched by the engine."""
    model, tok = lively_tiny()
    engine = Engine(model, tok, EngineConfig(max_model_len=160, max_num_seqs=8, max_prefill_chunk=16, max_batched_tokens=40))
    return engine, lively_tiny()[0], tok


def reference_greedy(model, ids, new, presence=0.0, frequency=0.0, bias=None):
    """Greedy decoding by a full forward per token, the penalties applied by hand (OpenAI's formula)."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(new):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            for t in set(out):
                logits[t] -= out.count(t) * frequency + presence
            for t, b in (bias or {}).items():
                logits[t] += b
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out


def run(engine, rid, ids, **kw):
    params = SamplingParams(max_tokens=kw.pop("max_tokens", 24), temperature=kw.pop("temperature", 0.0), ignore_eos=True, **kw)
    return tokens_of(collect(engine, GenerationRequest(rid, ids, params)))


def test_engine_penalties_equal_reference_loops(tiny):
    engine, model, tok = tiny
    for i, prompt in enumerate(PROMPTS[:3]):
        ids = tok(prompt).input_ids
        plain = run(engine, f"plain{i}", ids)
        assert plain == reference_greedy(model, ids, 24)
        # the lively tiny model repeats itself greedily; the penalties must change that, exactly as the loop does
        for kw in ({"presence": 1.5}, {"frequency": 0.7}, {"presence": -0.5, "frequency": 0.3}):
            got = run(engine, f"pen{i}{kw}", ids, presence_penalty=kw.get("presence", 0.0),
                      frequency_penalty=kw.get("frequency", 0.0))
            assert got == reference_greedy(model, ids, 24, kw.get("presence", 0.0), kw.get("frequency", 0.0)), (prompt, kw)
        penalised = run(engine, f"f{i}", ids, frequency_penalty=2.0)
        assert len(set(penalised)) > len(set(plain))  # fewer repeats
        # a bias of +100 forces a token; -100 bans the plain run's first choice
        assert run(engine, f"force{i}", ids, logit_bias={65: 100.0}, max_tokens=6) == [65] * 6
        banned = run(engine, f"ban{i}", ids, logit_bias={plain[0]: -100.0}, max_tokens=4)
        assert banned[0] != plain[0] and banned == reference_greedy(model, ids, 4, bias={plain[0]: -100.0})


def test_repetition_penalty_equals_hf_generate(tiny):
    engine, model, tok = tiny
    for i, prompt in enumerate(PROMPTS):
        ids = tok(prompt).input_ids
        want = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, repetition_penalty=1.3,
                              eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert run(engine, f"rep{i}", ids, repetition_penalty=1.3, max_tokens=20) == want


def test_penalised_sampling_does_not_depend_on_batch_mates(tiny):
    engine, model, tok = tiny
    kw = dict(temperature=0.9, top_p=0.95, seed=7, presence_penalty=0.8, frequency_penalty=0.4, repetition_penalty=1.1,
              logit_bias={66: 2.0})
    ids = tok(PROMPTS[0]).input_ids
    alone = run(engine, "alone", ids, **kw)
    sinks = {i: [] for i in range(len(PROMPTS))}
    for i, prompt in enumerate(PROMPTS):
        params = SamplingParams(max_tokens=24, ignore_eos=True, **(kw if i == 0 else dict(temperature=0.8, seed=i)))
        engine.submit(GenerationRequest(f"mate{i}", tok(prompt).input_ids, params), sinks[i].append)
    while engine.has_work():
        engine.step()
    assert tokens_of(sinks[0]) == alone


def test_engine_refuses_bad_values(tiny):
    from server.engine import EngineError

    engine, model, tok = tiny
    vocab = model.config.vocab_size
    for params, field in ((SamplingParams(logit_bias={vocab: 1.0}), "logit_bias"),
                          (SamplingParams(repetition_penalty=0.0), "repetition_penalty")):
        with pytest.raises(EngineError) as err:
            engine.submit(GenerationRequest("bad", [1, 2], params), lambda e: None)
        assert err.value.param == field
    assert not engine.has_work()


def test_allowed_token_ids_and_bad_words_by_hand():
    """vLLM's allowed_token_ids (every other token at -inf) and bad_words (a word's last token at -inf where the output
    ends with the tokens before it; a one-token word everywhere), beside a bias; a bad word yields where nothing else
    would be left."""
    from server.engine.sampler import banned_words

    row = torch.tensor([2.0, -1.0, 4.0, 0.5, 1.0, 3.0])
    inf = float("-inf")
    p = SamplingParams(allowed_token_ids=[1, 3, 4], logit_bias={4: 3.0})
    assert p.adjusts and adjust_logits(row.clone(), p, TokenHistory([0])).tolist() == [inf, -1.0, inf, 0.5, 4.0, inf]
    p = SamplingParams(bad_words_ids=[[5], [0, 2], [3, 0, 4]])
    assert banned_words(p, []) == [5] and banned_words(p, [1, 0]) == [5, 2] and banned_words(p, [3, 0]) == [5, 2, 4]
    assert adjust_logits(row.clone(), p, TokenHistory([0]).update([7, 0])).tolist() == [2.0, -1.0, inf, 0.5, 1.0, inf]
    only = SamplingParams(allowed_token_ids=[5], bad_words_ids=[[5]])  # (5 is all that is left: it stays)
    assert adjust_logits(row.clone(), only, TokenHistory([0])).tolist() == [inf] * 5 + [3.0]


def test_engine_allowed_token_ids_and_bad_words_equal_reference_loops(tiny):
    """Greedy and sampled: only allowed ids come out, and a bad word is never completed - the reference loop with the
    same masks gives the same greedy tokens."""
    from server.engine import EngineError

    engine, model, tok = tiny
    ids = tok(PROMPTS[0]).input_ids
    plain = run(engine, "plain-a", ids, max_tokens=16)
    allowed = sorted({plain[0], plain[1], 70, 71, 72})
    got = run(engine, "allow", ids, allowed_token_ids=allowed, max_tokens=16)
    want, seq = [], list(ids)
    with torch.no_grad():
        for _ in range(16):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            keep = torch.full_like(logits, float("-inf"))
            keep[allowed] = logits[allowed]
            want.append(int(keep.argmax()))
            seq.append(want[-1])
    assert got == want
    sampled = run(engine, "allow-s", ids, allowed_token_ids=allowed, max_tokens=40, temperature=1.3, seed=3)
    assert set(sampled) <= set(allowed)
    # the plain run's first two tokens as a bad word: its second token never follows its first
    word = plain[:2]
    got = run(engine, "bad", ids, bad_words_ids=[word], max_tokens=16)
    assert got[0] == plain[0] and got[1] != plain[1]
    assert all(got[i:i + 2] != word for i in range(len(got) - 1))
    with pytest.raises(EngineError) as err:
        engine.submit(GenerationRequest("x", [1, 2], SamplingParams(allowed_token_ids=[])), lambda e: None)
    assert err.value.param == "allowed_token_ids"
    with pytest.raises(EngineError) as err:
        engine.submit(GenerationRequest("x", [1, 2], SamplingParams(allowed_token_ids=[1],
                                                                    grammar=("choice", ["a"], "guided_choice"))),
                      lambda e: None)
    assert err.value.param == "allowed_token_ids"
    assert not engine.has_work()


def reference_min_tokens(model, ids, new, banned, min_tokens):
    """Greedy by full forwards, ``banned`` at -inf until ``min_tokens`` tokens are out."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(new):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            if len(out) < min_tokens:
                logits[list(banned)] = float("-inf")
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out


def test_min_tokens_bans_stop_tokens_and_defers_stop_strings(tiny):
    engine, model, tok = tiny
    ids = tok(PROMPTS[1]).input_ids
    plain = run(engine, "p", ids, max_tokens=12)
    # a stop token id ends the sequence at once without min_tokens ...
    events = collect(engine, GenerationRequest("s0", ids, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[plain[0]])))
    assert tokens_of(events) == [plain[0]] and events[-1].finish_reason == "stop" and events[-1].text == ""
    # ... and cannot be sampled before min_tokens: the reference loop with it banned for 5 tokens
    events = collect(engine, GenerationRequest("s5", ids, SamplingParams(max_tokens=12, temperature=0.0, min_tokens=5,
                                                                         stop_token_ids=[plain[0]])))
    got = tokens_of(events)
    want = reference_min_tokens(model, ids, 12, {plain[0]}, 5)
    assert plain[0] not in got[:5] and got == want[: len(got)]
    assert len(got) == 12 or (got[-1] == plain[0] and events[-1].finish_reason == "stop")
    # EOS (forced by a bias) is banned until min_tokens, then ends the sequence
    eos = sorted(engine.eos_ids)[0]
    events = collect(engine, GenerationRequest("e", ids, SamplingParams(max_tokens=12, temperature=0.0, min_tokens=3,
                                                                        logit_bias={eos: 100.0})))
    assert tokens_of(events)[:3] == plain[:3] and tokens_of(events)[3] == eos and events[-1].finish_reason == "stop"
    # a stop string found before min_tokens does not end (or cut) the text; one completed after it does. The
    # lively tiny model answers this prompt "888888..." greedily (after a special token): "88" completes after
    # token 3 (min 3: the text ends at the first match from there) and only before token 8 (min 8: no cut)
    text = tok.decode(plain)
    stop = text[1:3]
    for min_tokens in (3, 8):
        events = collect(engine, GenerationRequest(f"t{min_tokens}", ids, SamplingParams(
            max_tokens=12, temperature=0.0, ignore_eos=True, min_tokens=min_tokens, stop=[stop])))
        out = "".join(e.text for e in events)
        # (the text of the first min_tokens - 1 tokens is out, unheld, when the next arrives: a match may start from
        # its end on)
        floor = len(tok.decode(plain[: min_tokens - 1]))
        at = text.find(stop, floor)
        assert (at >= 0) == (min_tokens == 3)  # both cases are exercised
        assert out == (text if at < 0 else text[:at]), (min_tokens, out, text)
        assert len(tokens_of(events)) >= min_tokens and events[-1].finish_reason == ("length" if at < 0 else "stop")
    from server.engine import EngineError
    with pytest.raises(EngineError) as err:
        engine.submit(GenerationRequest("bad", ids, SamplingParams(max_tokens=2, min_tokens=3)), lambda e: None)
    assert err.value.param == "min_tokens"
