"""Incremental detokenization and stop handling (server.engine.sequence.update_text), token by token, without a model:
the streamed pieces must add up to what decoding the whole output gives, never split a UTF-8 character, never emit text
a stop string will remove, and cost a window of tokens per call, not the whole output."""

from __future__ import annotations

import pytest

from remix.models.tiny import tiny_tokenizer
from server.engine.sampler import SamplingParams
from server.engine.sequence import GenerationRequest, Sequence, decoder, update_text

TEXT = "Zürich – 東京 🚀 naïve café, «quoted» text; then plain ASCII words and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 at the end."


def stream(tok, ids, params, eos=frozenset(), max_len=10_000, decode=None):
    """Feed ids one at a time as the engine does; returns (pieces, finish_reason, seq)."""
    decode = decode or decoder(tok)
    seq = Sequence(GenerationRequest("r", [1], params), 0, -1, lambda e: None, None)
    pieces = []
    for t in ids:
        seq.output_ids.append(t)
        new, finished = update_text(seq, decode, set(eos), max_len)
        pieces.append(new)
        if finished:
            break
    return pieces, seq.finish_reason, seq


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()  # byte-level BPE: multi-byte characters span several tokens


def test_pieces_add_up_to_the_full_decode_and_never_split_a_character(tok):
    ids = tok(TEXT).input_ids
    assert len(ids) > len(TEXT.encode()) // 2  # many characters take several tokens here
    pieces, reason, seq = stream(tok, ids, SamplingParams(max_tokens=len(ids)))
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == TEXT
    assert reason == "length" and seq.text == TEXT
    assert all("\ufffd" not in p for p in pieces)  # an incomplete character is held back, never emitted half
    assert sum(1 for p in pieces if p == "") >= 5  # ...which happened (🚀, 東京 and 𝔘 are 3-4 bytes each)


def test_default_base_tokenizer_streams_the_same_text(default_base):
    _, tok = default_base
    text = "Paris, the capital of France 🇫🇷, is known as « la Ville Lumière » — 東京 is Tokyo.\n\nNew paragraph."
    ids = tok(text, add_special_tokens=False).input_ids
    pieces, _, _ = stream(tok, ids, SamplingParams(max_tokens=len(ids)))
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)


def test_stop_string_across_tokens_is_cut_and_never_streamed(tok):
    ids = tok(TEXT).input_ids
    pieces, reason, seq = stream(tok, ids, SamplingParams(max_tokens=len(ids), stop=["café"]))
    assert reason == "stop" and "".join(pieces) == TEXT[: TEXT.find("café")] == seq.text
    assert not any("caf" in p for p in pieces)  # a prefix of the stop string was held back, not emitted


def test_eos_and_stop_token_ids_end_without_their_text(tok):
    ids = tok("hello world").input_ids
    eos = tok("!").input_ids[-1]
    pieces, reason, _ = stream(tok, ids + [eos, *tok(" more").input_ids], SamplingParams(max_tokens=50), eos={eos})
    assert reason == "stop" and "".join(pieces) == "hello world"
    pieces, reason, _ = stream(tok, ids + [eos], SamplingParams(max_tokens=50, ignore_eos=True, stop_token_ids=[ids[-1]]))
    assert reason == "stop" and "".join(pieces) == tok.decode(ids[:-1])


def test_include_stop_str_in_output_keeps_what_ended_the_text(tok):
    """vLLM's include_stop_str_in_output: the stop string stays (the text after it still goes), and so does a stop
    token's text; streamed pieces add up to it as before."""
    ids = tok(TEXT).input_ids
    pieces, reason, seq = stream(tok, ids, SamplingParams(max_tokens=len(ids), stop=["café", "naïve"],
                                                          include_stop_str_in_output=True))
    assert reason == "stop" and "".join(pieces) == TEXT[: TEXT.find("naïve") + len("naïve")] == seq.text
    hello = tok("hello world").input_ids
    pieces, reason, _ = stream(tok, hello + [65], SamplingParams(max_tokens=50, stop_token_ids=[hello[-1]],
                                                                 include_stop_str_in_output=True))
    assert reason == "stop" and "".join(pieces) == "hello world"


def test_skip_special_tokens_false_keeps_their_text(tok):
    """vLLM's skip_special_tokens: by default a special token's text is left out of the output; false keeps it (the
    engine picks the decoder by the request's flag)."""
    special = tok.convert_tokens_to_ids(tok.all_special_tokens[0])
    ids = tok("hi").input_ids + [special] + tok(" there").input_ids
    pieces, _, _ = stream(tok, ids, SamplingParams(max_tokens=len(ids)))
    assert "".join(pieces) == "hi there"
    pieces, _, _ = stream(tok, ids, SamplingParams(max_tokens=len(ids), skip_special_tokens=False),
                          decode=decoder(tok, skip_special_tokens=False))
    assert "".join(pieces) == "hi" + tok.all_special_tokens[0] + " there"


def test_an_incomplete_character_at_the_end_is_flushed(tok):
    ids = tok("ok 🚀").input_ids[:-1]  # the rocket's last byte never comes: the length limit ends the output first
    pieces, reason, seq = stream(tok, ids, SamplingParams(max_tokens=len(ids)))
    assert reason == "length" and "".join(pieces) == tok.decode(ids) == seq.text and seq.text.endswith("\ufffd")


def test_each_call_decodes_a_window_not_the_whole_output(tok):
    ids = tok(TEXT * 8).input_ids
    longest = []

    def counting(window):
        longest.append(len(window))
        return tok.decode(window, skip_special_tokens=True)

    pieces, _, _ = stream(tok, ids, SamplingParams(max_tokens=len(ids)), decode=counting)
    assert "".join(pieces) == TEXT * 8
    assert max(longest) <= 8  # the whole output decoded each step would reach len(ids) (> 800)
