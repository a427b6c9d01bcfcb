"""The benchmark scripts run end to end (tiny settings) and their ratios come from what they measured."""

import json
import math
import statistics
import sys

import pytest
import torch

from remix.kernels import bench as kernel_bench
from remix.kernels import cpu_ext
from server import bench as server_bench


def test_kernel_bench_writes_times_ratios_and_table(tmp_path):
    out = kernel_bench.main(["--tokens", "1", "--min-time", "0.005", "--adapters", "2", "--copies", "3", "--json", str(tmp_path / "k.json"),
                             "--markdown", str(tmp_path / "k.md")])
    saved = json.loads((tmp_path / "k.json").read_text())
    assert len(saved["results"]) == 2  # both FFN shapes
    for res in saved["results"]:
        t, q = res["times_us"], res["ratios"]
        assert all(v > 0 and math.isfinite(v) for k, v in t.items())
        # against the faster base GEMM (the compiled kernels', which the module runs, or nn.Linear's): the median over
        # rounds of the module's time over that GEMM's in the same round; the ratio of the two medians kept beside it
        rd = res["rounds_us"]
        assert all(len(v) == 9 for v in rd.values())
        floor = "base" if t["base"] <= t["base_aten"] else "base_aten"
        within = statistics.median(m / b for m, b in zip(rd["remix"], rd[floor])) - 1
        assert math.isclose(q["overhead_over_base"], within, rel_tol=1e-2, abs_tol=1e-3)
        assert math.isclose(q["overhead_over_base_aten"], statistics.median(
            m / b for m, b in zip(rd["remix"], rd["base_aten"])) - 1, rel_tol=1e-2, abs_tol=1e-3)
        assert math.isclose(q["overhead_over_base_of_medians"], t["remix"] / min(t["base"], t["base_aten"]) - 1)
        # each delta: the median over rounds of the module minus its base GEMM timed back to back in the same round
        raw = statistics.median(m - b for m, b in zip(rd["remix"], rd["base"]))
        assert math.isclose(t["remix_delta"], max(raw, 1e-3), rel_tol=1e-2, abs_tol=0.02)
        assert res["remix_delta_measured"] == (t["remix_delta"] > 1e-3)
        assert math.isclose(q["torch_over_compiled"], t["remix_torch"] / t["remix"])
        # the dense LoRA's share is timed on its own, right after its base GEMM: positive, below its whole module
        assert 0 < t["dense_kr_delta"] < t["dense_kr"]
        assert math.isclose(q["fast_over_dense_kr"], t["remix_delta"] / t["dense_kr_delta"])
    assert out["goals"] == {}  # no goal is set at T = 1
    assert (tmp_path / "k.md").read_text().count("\n| 576→1536 | 1 |") == 1


def test_kernel_bench_rounds_take_turns_call_by_call():
    """Within a round the functions are called in turn (a, b, a, b, ...), each its own number of calls, the faster
    one's surplus at the round's end - not all of a's calls, then all of b's - so two functions compared within a
    round meet the same moment of a drifting machine; each round's time is the mean of its calls."""
    import time
    log = []

    def fn(name, seconds):
        def call():
            log.append(name)
            time.sleep(seconds)
        return call

    rounds = {}
    kernel_bench.time_rounds({"a": fn("a", 0.001), "b": fn("b", 0.003)}, min_time=0.06, repeats=3, rounds=rounds)
    first = next(i for i in range(1, len(log)) if log[i - 1] == "b" and log[i] == "a")  # after the sizing calls
    timed = log[first:]
    ca, cb = timed.count("a") // 3, timed.count("b") // 3
    assert ca > cb >= 2 and len(timed) == 3 * (ca + cb)
    assert timed == (["a", "b"] * cb + ["a"] * (ca - cb)) * 3
    assert all(len(v) == 3 for v in rounds.values())
    assert 0.001 <= min(rounds["a"]) * 1e-6 and max(rounds["a"]) < min(rounds["b"])


def test_a_goal_on_an_unmeasured_remix_delta_is_not_met():
    """A ReMix delta that came out <= 0 (clamped to 1e-3 us) would make loop_over_fast enormous: its goals do not count
    as met; the overhead goal, which does not use the delta, is judged as usual."""
    res = {"d_in": 576, "d_out": 1536, "T": 32, "remix_delta_measured": False,
           "ratios": {"overhead_over_base": 0.1, "fast_over_dense_kr": 1e-5, "loop_over_fast": 4e5}}
    goals = kernel_bench.judge([res])
    assert goals["overhead_over_base@576->1536,T=32"]["met"]
    for name in ("fast_over_dense_kr", "loop_over_fast"):
        g = goals[f"{name}@576->1536,T=32"]
        assert not g["met"] and "not measured" in g["note"]
    assert all(g["met"] for g in kernel_bench.judge([{**res, "remix_delta_measured": True}]).values())


def test_server_bench_runs_every_contender_on_the_tiny_model(tmp_path):
    out = server_bench.main(["--base", "tiny", "--concurrency", "1,2", "--prompt-tokens", "8", "--new-tokens", "4",
                             "--json", str(tmp_path / "s.json"), "--markdown", str(tmp_path / "s.md")])
    # each engine's weights / KV cache share on huge pages, where measurable (the tiny model's blocks hold no 2 MiB page)
    assert set(out["config"]["huge_pages"]) == {"engine_base", "engine_remix", "engine_4adapters"}
    assert all(set(s) <= {"weights", "kv_cache"} and all(0 <= v <= 1 for v in s.values())
               for s in out["config"]["huge_pages"].values())
    for c in (1, 2):
        row = out["results"][c]
        assert {"hf_generate", "hf_loop", "engine_base", "engine_remix", "engine_4adapters"} <= set(row)
        assert row["gemm_floor_ms"] > 0
        # the floor is the faster of ATen's GEMMs and (on CPU, kernels built) the compiled GEMM the engine runs
        assert row["gemm_floor_ms"] == min(row["gemm_floor_aten_ms"], row.get("gemm_floor_compiled_ms", math.inf))
        # timed in every round beside the contenders (2 by default), the fastest kept
        assert all(len(v) == 2 for v in row["gemm_floor_runs_ms"].values())
        assert row["gemm_floor_aten_ms"] == min(row["gemm_floor_runs_ms"]["aten"])
    r = out["results"][2]
    # each ratio: the median (of two rounds: the mean) of the ratio within each round, not a ratio of two bests
    within = [a / b for a, b in zip(r["engine_remix"]["runs_tokens_per_s"], r["hf_generate"]["runs_tokens_per_s"])]
    assert out["ratio_rounds"]["engine_remix_over_hf_generate@2"] == pytest.approx(within, rel=1e-2)
    assert math.isclose(out["ratios"]["engine_remix_over_hf_generate@2"], sum(within) / 2, rel_tol=1e-2)
    floors = [min(a, b) for a, b in zip(*r["gemm_floor_runs_ms"].values())]
    steps = r["engine_remix"]["runs_decode_step_ms"]
    # (the runs are stored rounded to the microsecond: a tiny model's step of ~0.3 ms then carries ~0.2 % of error)
    assert out["ratios"]["decode_step_over_gemm_floor@2"] == pytest.approx(
        statistics.median(s / f for s, f in zip(steps, floors)), rel=1e-2)
    assert "_runs" not in r["engine_remix"]
    # each engine's wall time per round, and the part of it in steps that carried prompt tokens (the prompts of 8
    # tokens fit one step's budget: some, never all, of the run)
    for name in ("engine_base", "engine_remix", "engine_4adapters"):
        walls, in_prompt = r[name]["runs_seconds"], r[name]["runs_seconds_in_prompt_steps"]
        assert len(walls) == len(in_prompt) == 2 and all(0 < p < w for p, w in zip(in_prompt, walls))
        assert r[name]["seconds"] == pytest.approx(min(walls), abs=1e-6)
    # the adapter's extra seconds over the bare engine's that fell in prompt steps, as a share (where each round's
    # extra is positive: on a tiny model it may drown in noise, and then the ratio is left out)
    a, b = r["engine_remix"], r["engine_base"]
    extra = [(pa - pb, wa - wb) for pa, pb, wa, wb in zip(a["runs_seconds_in_prompt_steps"], b["runs_seconds_in_prompt_steps"],
                                                          a["runs_seconds"], b["runs_seconds"])]
    if all(t > 0 for _, t in extra):
        assert out["ratios"]["adapter_cost_share_in_prompt_steps@2"] == pytest.approx(
            statistics.median(p / t for p, t in extra), rel=1e-2, abs=1e-2)
        assert "adapter_cost_share_in_prompt_steps@2" not in out["goals"]
    else:
        assert "adapter_cost_share_in_prompt_steps@2" not in out["ratios"]
    assert "engine_remix_over_hf_generate@2" in out["goals"]  # the goal is judged at the top concurrency
    assert "engine_remix_bs1_over_hf_generate_bs1" in out["goals"]  # batch 1 was measured
    assert "| 2 |" in (tmp_path / "s.md").read_text()
    # every contender ran twice (the default --repeats) and its fastest run is the one reported
    for name in ("hf_generate", "hf_loop", "engine_base", "engine_remix", "engine_4adapters"):
        runs = r[name]["runs_tokens_per_s"]
        assert len(runs) == 2 and math.isclose(r[name]["tokens_per_s"], max(runs), rel_tol=1e-3)
    if cpu_ext.available():  # where each engine's decode step went: the compiled stack timed its ops
        for name in ("engine_base", "engine_remix", "engine_4adapters"):
            b = r[name]["decode_breakdown_ms"]
            # 4 new tokens: the first comes from the prefill, three from full-batch decode steps
            assert b["steps"] == 3 and set(b["ops"]) == set(cpu_ext.STACK_OPS)
            # every kind of op ran in every layer - but at 2 rows an adapter's gate, up and act run as one op, on gate
            # (run_pair in cpu_ext, below _fuse_pair_below's 9 rows), where the dtype's base GEMM is the compiled one
            # (a bfloat16 model on a build without AVX512-BF16 takes the two calls)
            dtype = getattr(torch, out["config"]["dtype"])
            fused = {"up", "act"} if name != "engine_base" and cpu_ext.dot_gemm(dtype) else set()
            assert all((v == 0) if op in fused else (v > 0) for op, v in b["ops"].items()), (name, sorted(b["ops"].items()))
            # the stack's ops are a part of the step (the LM head, sampling and scheduling lie outside them)
            assert 0 < sum(b["ops"].values()) < b["step"] and b["outside_layers"] > 0
            # the README's groups take every op once
            groups = ("attention", "ffn_projections", "attention_projections", "norms_rotary_kv_act")
            assert sum(b[g] for g in groups) == pytest.approx(sum(b["ops"].values()))
            assert b["ffn_projections"] == pytest.approx(b["ops"]["gate"] + b["ops"]["up"] + b["ops"]["down"])
        assert "| 2 | 1 ReMix adapter |" in (tmp_path / "s.md").read_text()


def test_the_decode_stack_clock_runs_only_when_on():
    if not cpu_ext.available():
        pytest.skip("compiled CPU kernels not built")
    from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
    from server.engine.engine import collect
    import remix

    model, tok = remix.load_base("tiny")
    engine = Engine(model, tok, EngineConfig(max_model_len=64, max_num_seqs=2))

    def decode(n):
        collect(engine, GenerationRequest(f"c{n}", [1, 2, 3], SamplingParams(max_tokens=n, ignore_eos=True)))

    cpu_ext.stack_clock(False)
    decode(4)
    ops, runs = cpu_ext.stack_clock(True)  # (read and reset; on from here)
    assert runs == 0 and not any(ops.values())
    decode(4)  # the prompt (its three tokens as rows of the stack), then three decode steps
    ops, runs = cpu_ext.stack_clock(False)
    assert runs == 4 and all(v > 0 for v in ops.values())
    decode(3)
    assert cpu_ext.stack_clock(False) == ({name: 0.0 for name in cpu_ext.STACK_OPS}, 0)


def test_server_bench_in_bfloat16_runs_every_contender_in_that_dtype():
    out = server_bench.main(["--base", "tiny", "--concurrency", "2", "--prompt-tokens", "8", "--new-tokens", "3",
                             "--skip-hf-loop", "--dtype", "bfloat16", "--repeats", "1"])
    assert out["config"]["dtype"] == "bfloat16"
    assert out["config"]["cpu"] == cpu_ext.cpu_model() and out["config"]["cpu"]  # which machine the figures are from
    # batch 1 was not measured: no batch-1 ratio (it used to be computed from the lowest concurrency, here 2)
    assert "engine_remix_bs1_over_hf_generate_bs1" not in out["ratios"]
    assert {"hf_generate", "engine_base", "engine_remix", "engine_4adapters"} <= set(out["results"][2])


def test_server_bench_with_peft_times_peft_and_the_engine_on_the_same_lora(tmp_path):
    pytest.importorskip("peft")
    out = server_bench.main(["--base", "tiny", "--concurrency", "2", "--prompt-tokens", "8", "--new-tokens", "3",
                             "--skip-hf-loop", "--peft", "--repeats", "1", "--markdown", str(tmp_path / "s.md")])
    row = out["results"][2]
    assert {"hf_peft", "engine_peft"} <= set(row) and row["engine_peft"]["tokens_per_s"] > 0
    assert out["ratios"]["engine_peft_over_hf_peft@2"] == pytest.approx(
        row["engine_peft"]["tokens_per_s"] / row["hf_peft"]["tokens_per_s"], rel=1e-2)  # one round: the round's ratio
    assert "engine_peft_over_hf_peft@2" not in out["goals"]  # measured, no goal set
    assert "HF + peft LoRA" in (tmp_path / "s.md").read_text()


def test_server_bench_peft_mixed_times_many_loras_in_one_batch(tmp_path):
    """--peft-mixed 3: three peft LoRAs, request i taking LoRA i mod 3, in HF generate (peft's adapter_names) and in
    the engine; the ratio is measured with no goal."""
    pytest.importorskip("peft")
    out = server_bench.main(["--base", "tiny", "--concurrency", "3", "--new-tokens", "4", "--prompt-tokens", "12",
                      "--skip-hf-loop", "--peft-mixed", "3", "--repeats", "1", "--markdown", str(tmp_path / "s.md")])
    row = out["results"][3]
    assert {"hf_peft_mixed", "engine_peft_mixed"} <= set(row) and row["engine_peft_mixed"]["tokens_per_s"] > 0
    assert out["ratios"]["engine_peft_mixed_over_hf_peft_mixed@3"] == pytest.approx(
        row["engine_peft_mixed"]["tokens_per_s"] / row["hf_peft_mixed"]["tokens_per_s"], rel=1e-2)
    assert out["config"]["peft_mixed_loras"] == 3 and "engine_peft_mixed_over_hf_peft_mixed@3" not in out["goals"]
    assert "engine, same LoRAs mixed" in (tmp_path / "s.md").read_text()
    with pytest.raises(SystemExit):
        server_bench.main(["--base", "tiny", "--peft-mixed", "1"])


def test_server_bench_samples_every_contender_alike():
    out = server_bench.main(["--base", "tiny", "--concurrency", "2", "--prompt-tokens", "8", "--new-tokens", "3",
                             "--skip-hf-loop", "--repeats", "1", "--temperature", "0.7", "--top-p", "0.9"])
    assert out["config"]["sampling"] == {"temperature": 0.7, "top_p": 0.9}
    assert {"hf_generate", "engine_base", "engine_remix"} <= set(out["results"][2])
    assert server_bench.hf_sampling(None) == {"do_sample": False}
    assert server_bench.hf_sampling({"temperature": 0.7, "top_p": 0.9})["top_k"] == 0  # (HF's default would be 50)


def test_server_bench_takes_the_8bit_cache():
    out = server_bench.main(["--base", "tiny", "--concurrency", "2", "--prompt-tokens", "8", "--new-tokens", "3",
                             "--skip-hf-loop", "--repeats", "1", "--kv-cache-dtype", "int8"])
    assert out["config"]["kv_cache_dtype"] == "int8" and out["results"][2]["engine_remix"]["tokens_per_s"] > 0


def test_server_bench_takes_the_engines_token_budget(capsys):
    """--max-batched-tokens is the engine's own setting (the JSON records the engine's config; a budget of 3 still serves
    every contender), 512 without it; one that cannot hold the decode rows is refused with the flag's name."""
    out = server_bench.main(["--base", "tiny", "--concurrency", "2", "--prompt-tokens", "8", "--new-tokens", "3",
                             "--skip-hf-loop", "--repeats", "1", "--max-batched-tokens", "3"])
    assert out["config"]["max_batched_tokens"] == 3 and out["results"][2]["engine_remix"]["tokens_per_s"] > 0
    assert server_bench.main(["--base", "tiny", "--concurrency", "2", "--prompt-tokens", "8", "--new-tokens", "2",
                              "--skip-hf-loop", "--repeats", "1"])["config"]["max_batched_tokens"] == 512
    with pytest.raises(SystemExit):
        server_bench.main(["--base", "tiny", "--concurrency", "4", "--max-batched-tokens", "4"])
    assert "--max-batched-tokens: must exceed the largest concurrency" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--concurrency", "1,x"], "--concurrency: comma-separated whole numbers, got '1,x'"),
    (["--concurrency", "8,0"], "--concurrency: each level must be at least 1, got '8,0'"),
    (["--new-tokens", "0"], "--new-tokens: must be at least 1, got 0"),
    (["--top-p", "1.5"], "--temperature must be >= 0 and --top-p in (0, 1], got 0.0 and 1.5"),
])
def test_server_bench_names_a_bad_flag_before_loading_anything(args, message, capsys):
    with pytest.raises(SystemExit):
        server_bench.main(["--base", "/nonexistent", *args])  # (refused before the base would fail to load)
    assert message in capsys.readouterr().err


def test_kernel_bench_names_every_bad_flag(capsys):
    with pytest.raises(SystemExit):
        kernel_bench.main(["--tokens", "32,x"])
    assert "--tokens: comma-separated whole numbers, got '32,x'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        kernel_bench.main(["--tokens", "0", "--k", "9", "--r", "0", "--min-time", "0"])
    err = capsys.readouterr().err
    assert ("--tokens: each T must be at least 1, got '0'; --r: must be at least 1, got 0; --k: must be between 1 and "
            "--n (8), got 9; --min-time: must be > 0 seconds, got 0.0") in err


def test_kv_bench_measures_both_caches_in_rounds_and_their_agreement(tmp_path):
    from server import bench_kv

    out = bench_kv.main(["--base", "tiny", "--prompt-tokens", "8,40", "--new-tokens", "5", "--concurrency", "2",
                         "--repeats", "2", "--json", str(tmp_path / "k.json"), "--markdown", str(tmp_path / "k.md")])
    t = out["kv_tokens_per_gib"]
    assert t["int8"] > 1.5 * t["auto"]  # int8 codes and a float32 scale against the model's dtype
    for length in (8, 40):
        r = out["results"][length]
        for kv in ("auto", "int8"):
            runs = r[kv]["runs_tokens_per_s"]
            assert len(runs) == 2 and math.isclose(r[kv]["tokens_per_s"], max(runs), rel_tol=1e-3)
        # the ratio of tok/s is the median (of two rounds: the mean) of each round's ratio, not a ratio of bests
        rounds = [b / a for a, b in zip(r["auto"]["runs_tokens_per_s"], r["int8"]["runs_tokens_per_s"])]
        assert math.isclose(r["int8_over_auto_tokens_per_s"], sum(rounds) / 2, rel_tol=1e-2)
        a = r["agreement"]
        assert 0 <= a["common_prefix_share"] <= 1 and 0 <= a["identical_requests"] <= 1 and a["max_abs_logprob_diff"] >= 0
    assert "| 40 |" in (tmp_path / "k.md").read_text() and "tokens per GiB" in (tmp_path / "k.md").read_text()


def test_prefix_bench_measures_both_engines_and_hf_on_an_app_and_chats(tmp_path):
    from server import bench_prefix

    out = bench_prefix.main(["--base", "tiny", "--system-tokens", "40", "--question-tokens", "8", "--new-tokens", "4",
                             "--concurrency", "3", "--turns", "2", "--repeats", "2", "--dtype", "float32",
                             "--json", str(tmp_path / "p.json"), "--markdown", str(tmp_path / "p.md")])
    app, chat = out["app"], out["chat"]
    for name in ("cache", "no_cache"):
        assert len(app[name]["runs"]) == 2 and app[name]["tokens_per_s"] == max(r["tokens_per_s"] for r in app[name]["runs"])
    assert app["hf_generate"]["ttft_s"] > 0 and app["hf_generate"]["tokens_per_s"] > 0
    rounds = [c["ttft_s"] / n["ttft_s"] for c, n in zip(app["cache"]["runs"], app["no_cache"]["runs"])]
    assert math.isclose(app["cache_over_no_cache_ttft"], sum(rounds) / 2, rel_tol=1e-6)
    assert len(chat["turns_ttft_s"]) == 2 and chat["cache"]["tokens_per_s"] > 0
    # float32: the replies are the same with and without the cache, and the cache served the system prompt (two
    # whole blocks of its 40 tokens) to every request after the first, and the chats their earlier turns
    assert out["identical_replies"] == 1.0
    pc = out["prefix_cache"]
    assert pc["prefix_cache_hits"] >= 3 * 3 - 1 + 3 and pc["prefix_cache_tokens"] >= 32 * (3 * 3 - 1) + 3 * 48
    assert "time to first token" in (tmp_path / "p.md").read_text()


def test_invariant_bench_measures_the_mode_against_the_default_and_what_it_buys(tmp_path):
    from server import bench_invariant

    if not cpu_ext.dot_gemm(torch.float32):
        pytest.skip("no compiled dot-product GEMM on this CPU")
    out = bench_invariant.main(["--base", "tiny", "--dtype", "float32", "--workloads", "p=3x300x3,d=4x20x5",
                                "--repeats", "2", "--json", str(tmp_path / "i.json"), "--markdown", str(tmp_path / "i.md")])
    for w in ("p", "d"):
        r = out["workloads"][w]
        rounds = [a / b for a, b in zip(r["invariant"]["runs"], r["default"]["runs"])]
        assert math.isclose(r["invariant_over_default_tokens_per_s"], sum(rounds) / 2, rel_tol=1e-6)
        assert r["default"]["tokens_per_s"] == max(r["default"]["runs"])
    assert out["alone_equals_batch"]["invariant"] == 1.0 and 0 <= out["alone_equals_batch"]["default"] <= 1
    assert "batch-invariant" in (tmp_path / "i.md").read_text()
    with pytest.raises(SystemExit):
        bench_invariant.main(["--base", "tiny", "--workloads", "p=3x300"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemm_bench_times_every_linear_of_a_decode_step_both_ways(tmp_path, dtype):
    from remix.kernels import cpu_ext
    from remix.kernels import gemm_bench

    if not cpu_ext.available():
        pytest.skip("no compiled kernels here")
    out = gemm_bench.main(["--base", "tiny", "--dtype", dtype, "--rows", "1,3", "--passes", "2",
                           "--json", str(tmp_path / "g.json")])
    assert out["config"]["dtype"] == dtype and [r["rows"] for r in out["results"]] == [1, 3]
    for r in out["results"]:
        assert set(r["ms"]["ours"]) == {"qkv", "o", "gate", "up", "down", "lm_head"} == set(r["ms"]["aten"])
        assert all(v > 0 for who in ("ours", "aten") for v in r["ms"][who].values())
        assert math.isclose(r["aten_over_ours"], r["total_ms"]["aten"] / r["total_ms"]["ours"])
        assert math.isclose(r["total_ms"]["ours"], sum(r["ms"]["ours"].values()))
    assert (tmp_path / "g.json").exists()
    # --batch-invariant: ours at every size for the run only (the process's setting comes back)
    assert not cpu_ext.set_batch_invariant(False)
    out = gemm_bench.main(["--base", "tiny", "--dtype", dtype, "--rows", "300", "--passes", "1", "--batch-invariant"])
    assert out["config"]["batch_invariant"] and out["results"][0]["total_ms"]["ours"] > 0
    assert not cpu_ext.set_batch_invariant(False)
    with pytest.raises(SystemExit):  # a bad --rows names the flag
        gemm_bench.main(["--base", "tiny", "--rows", "1,x"])


def test_kernel_bench_in_bfloat16_times_every_variant_in_that_dtype():
    """--dtype bfloat16 (the serving default on CPUs with bfloat16 instructions): the same variants and ratios."""
    out = kernel_bench.main(["--tokens", "2", "--min-time", "0.005", "--adapters", "2", "--copies", "2", "--dtype", "bfloat16"])
    assert out["config"]["dtype"] == "bfloat16" and len(out["results"]) == 2 and out["config"]["cpu"]
    for res in out["results"]:
        assert all(v > 0 and math.isfinite(v) for v in res["times_us"].values())
        assert math.isfinite(res["ratios"]["overhead_over_base"])


def test_structured_bench_times_xgrammars_apply_against_torch_ops(tmp_path):
    pytest.importorskip("xgrammar")
    from server import bench_structured

    out = bench_structured.main(["--base", "tiny", "--requests", "2", "--prompt-tokens", "8", "--new-tokens", "6",
                                 "--repeats", "2", "--json", str(tmp_path / "s.json"), "--markdown", str(tmp_path / "s.md")])
    assert len(out["rounds"]) == 2 and all(r["tokens"]["grammar"] == r["tokens"]["plain"] == 12 for r in out["rounds"])
    # the same constrained text whichever applies the mask, and every character within the pattern's class
    assert all(r["constrained_texts_match"] for r in out["rounds"]) and out["all_constrained_outputs_match_the_pattern"]
    steps = [r["decode_step_ms"]["grammar"] / r["decode_step_ms"]["grammar_torch"] for r in out["rounds"]]
    assert out["ratios"]["grammar_over_grammar_torch"] == pytest.approx(statistics.median(steps))
    assert "xgrammar" in (tmp_path / "s.md").read_text() and "offered tools" in (tmp_path / "s.md").read_text()
    tools = [r["decode_step_ms"]["tools_auto"] / r["decode_step_ms"]["plain"] for r in out["rounds"]]
    assert out["ratios"]["tools_auto_over_plain"] == pytest.approx(statistics.median(tools))
    from server.engine.grammar import Matcher
    assert Matcher.APPLY == "xgrammar"  # the bench leaves the server's path in place


def test_spec_bench_measures_both_engines_and_both_hf_modes_on_two_workloads(tmp_path):
    """The tiny model (its tokenizer has a chat template) through every contender: tokens/s of each, the ratios, the
    share of drafts accepted, and the replies with speculation the same as without (greedy)."""
    from server import bench_spec

    out = bench_spec.main(["--base", "tiny", "--prompts", "2", "--new-tokens", "12", "--repeats", "1",
                           "--concurrency", "2", "--num-speculative-tokens", "4",
                           "--json", str(tmp_path / "s.json"), "--markdown", str(tmp_path / "s.md")])
    assert set(out["results"]) == {"edit", "free"}
    for r in out["results"].values():
        for label in ("hf_generate", "hf_prompt_lookup", "engine", "engine_spec", "engine_c", "engine_spec_c"):
            assert r[label]["tokens_per_s"] > 0, label
        if cpu_ext.load() is not None:  # (bit for bit on the compiled path; elsewhere SDPA rounds chunks differently)
            assert r["identical_with_and_without"] == 1.0 and r["identical_with_and_without_c"] == 1.0
        assert r["engine_spec_over_engine"] > 0 and 0 <= r["accepted_share"] <= 1
    assert json.loads((tmp_path / "s.json").read_text())["num_speculative_tokens"] == 4
    assert "spec / HF lookup" in (tmp_path / "s.md").read_text()
    sampled = bench_spec.main(["--base", "tiny", "--prompts", "2", "--new-tokens", "8", "--repeats", "1",
                               "--concurrency", "0", "--temperature", "0.8"])
    assert sampled["temperature"] == 0.8 and sampled["concurrency"] == 0
    if cpu_ext.load() is not None:  # seeded: the same replies with and without drafts
        assert all(r["identical_with_and_without"] == 1.0 for r in sampled["results"].values())
    with pytest.raises(SystemExit):
        bench_spec.main(["--base", "tiny", "--prompt-lookup-min", "3", "--prompt-lookup-max", "2"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_prompt_bench_measures_the_prompt_tiles_the_decode_kernel_and_hf(tmp_path, dtype):
    from server import bench_prompt

    ext = cpu_ext.load()
    if not hasattr(ext, "_prompt_dtypes") or dtype not in ext._prompt_dtypes():
        pytest.skip(f"no prompt kernel for {dtype} on this CPU (bfloat16: AVX512-BF16; float32: AVX-512 or AVX2)")
    out = bench_prompt.main(["--base", "tiny", "--dtype", dtype, "--prompt-tokens", "40,90", "--new-tokens", "3",
                             "--concurrency", "2", "--repeats", "2", "--json", str(tmp_path / "t.json"),
                             "--markdown", str(tmp_path / "t.md")])
    assert [r["prompt_tokens"] for r in out["results"]] == [40, 90]
    for r in out["results"]:
        for name in ("tiles", "decode_kernel"):
            assert len(r[name]["runs"]) == 2 and r[name]["ttft_s"] == min(x["ttft_s"] for x in r[name]["runs"])
        rounds = [a["ttft_s"] / b["ttft_s"] for a, b in zip(r["tiles"]["runs"], r["decode_kernel"]["runs"])]
        assert math.isclose(r["tiles_over_decode_kernel_ttft"], sum(rounds) / 2, rel_tol=1e-6)
        assert math.isclose(r["hf_over_tiles_ttft"], r["hf_generate"]["ttft_s"] / r["tiles"]["ttft_s"], rel_tol=1e-6)
        assert 0 <= r["common_prefix_share"] <= 1 and 0 <= r["identical_replies"] <= 1
        if dtype == "float32":  # the decode kernel's bits: the same replies
            assert r["identical_replies"] == 1
    assert out["form"] == ("vectors" if dtype == "float32" or not cpu_ext.amx_bf16() else "amx")
    assert cpu_ext.load()._prompt_tiles(True)  # left on
    assert "| 90 |" in (tmp_path / "t.md").read_text()


def test_prefill_chunk_ab_times_each_chunk_size_in_turn():
    """scripts/ab_prefill_chunk.py: one engine per chunk size serves the same prompt in every counted round."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "ab_prefill_chunk.py"
    spec = importlib.util.spec_from_file_location("ab_prefill_chunk", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--base", "tiny", "--prompt-tokens", "300", "--chunks", "64,256", "--rounds", "2"])
    assert out["prompt_tokens"] == 300 and set(out["ttft_s"]) == {"64", "256"}
    assert all(len(v) == 2 and min(v) > 0 for v in out["ttft_s"].values())
    with pytest.raises(SystemExit):
        mod.main(["--base", "tiny", "--chunks", "0,8"])


def test_module_scripts_take_one_shape_and_few_layers(capsys, monkeypatch):
    """scripts/ab_modules.py and scripts/module_stages.py: --shape binds calls of that shape alone, --layers that many
    of them (a few: weights and pools from cache), and each prints a time for every variant and every thread."""
    from pathlib import Path

    if cpu_ext.load() is None:
        pytest.skip("the compiled CPU kernels are not built here")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    import ab_modules
    import module_stages

    calls = ab_modules.bind_ffn_modules(1, torch.float32, "1536x576", 2)
    assert [D for _, D in calls] == [1536, 1536]
    assert len(ab_modules.bind_ffn_modules(1, torch.float32, "ffn", 1)) == 3
    ab_modules.main(["--rows", "4", "--adapters", "1", "--rounds", "2", "--dtype", "float32", "--shape", "576x1536",
                     "--layers", "1", "--variant", "on=ext._phase_a_prefetch(True)",
                     "--variant", "off=ext._phase_a_prefetch(False)"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("adapters=1 rows=4") and " on " in line and " off " in line and " bare " in line
    module_stages.main(["--rows", "8", "--adapters", "1", "--rounds", "2", "--dtype", "float32", "--shape", "1536x576",
                        "--layers", "2"])
    out = capsys.readouterr().out
    assert "adapters=1 rows=8 (4 calls)" in out  # the two bound calls (two layers of one shape) in two counted rounds
    threads = [line.strip() for line in out.splitlines() if line.strip().startswith("thread ")]
    assert len(threads) == min(torch.get_num_threads(), 16)  # every thread of the calls' regions (the clock's limit: 16)
    assert all(f"{stage} " in line for line in threads for stage in cpu_ext.MODULE_STAGES)
    for bad in (["--shape", "8x8"], ["--layers", "0"]):
        with pytest.raises(SystemExit):
            module_stages.main(bad)


def test_ab_steps_rejects_a_malformed_long_prompts_option(capsys, monkeypatch):
    """scripts/ab_steps.py --long-prompts N:TOKENS: anything but two integers (N >= 0, TOKENS >= 1) is a usage error
    naming the option, before any model loads."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    import ab_steps

    for bad in ("8", "8:x", "a:1500", "8:1500:2", "-1:1500", "8:0"):
        with pytest.raises(SystemExit) as e:
            ab_steps.main(["--long-prompts", bad, "--variant", "a=None", "--variant", "b=None"])
        assert e.value.code == 2 and "--long-prompts" in capsys.readouterr().err, bad


def test_ab_steps_rejects_a_negative_thread_count(capsys, monkeypatch):
    """scripts/ab_steps.py --threads N: below 0 is a usage error naming the option, before any model loads (0 keeps
    torch's default)."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    import ab_steps

    with pytest.raises(SystemExit) as e:
        ab_steps.main(["--threads", "-1", "--variant", "a=None", "--variant", "b=None"])
    assert e.value.code == 2 and "--threads" in capsys.readouterr().err


def test_ab_steps_adds_each_steps_module_clock_per_thread_and_stage(monkeypatch):
    """scripts/ab_steps.py --stages: each timed step's module clock (per thread {stage: ms}) is summed per thread and
    stage; a thread first seen in a later step starts at zero."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    import ab_steps

    total: list[dict[str, float]] = []
    ab_steps.add_stages(total, [{"route": 1.0, "phase_b": 2.0}])
    ab_steps.add_stages(total, [{"route": 0.5, "phase_b": 0.25}, {"route": 3.0, "phase_b": 4.0}])
    assert total == [{"route": 1.5, "phase_b": 2.25}, {"route": 3.0, "phase_b": 4.0}]
    ab_steps.add_stages(total, [])  # a step with no module call (the clock read empty) adds nothing
    assert total == [{"route": 1.5, "phase_b": 2.25}, {"route": 3.0, "phase_b": 4.0}]


def _run_c_probe(tmp_path, name: str, opt: str, arg: str, timeout: int) -> str:
    """Build scripts/<name> as its header says (gcc `opt` -march=native, warnings as errors) and run it with `arg`: its
    output. Skips without gcc or AVX-512 (the probes time 512-bit instructions)."""
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("gcc") is None or "avx512f" not in cpu_ext.cpu_flags():
        pytest.skip("needs gcc and AVX-512")
    exe = tmp_path / Path(name).stem
    src = Path(__file__).resolve().parents[1] / "scripts" / name
    subprocess.run(["gcc", opt, "-march=native", "-Wall", "-Werror", str(src), "-o", str(exe)], check=True)
    return subprocess.run([str(exe), arg], check=True, capture_output=True, text=True, timeout=timeout).stdout


def test_vector_rates_probe_times_independent_chains(tmp_path):
    """scripts/vector_rates.c: builds as its header says, prints each rate, and its twelve chains are independent (the
    throughput line well below the one-chain latency line; chains of the same inputs, merged by the compiler into
    one, read as one chain's latency over twelve - the trap the probe's last line shows)."""
    import re

    out = _run_c_probe(tmp_path, "vector_rates.c", "-O2", "200000", timeout=60)
    rates = {m[1].strip(): float(m[2]) for m in re.finditer(r"^(.+?)\s+([\d.]+) TSC cycles\s+[\d.]+ G a second$", out, re.M)}
    fma, fma_lat = rates["512-bit FMA, 12 independent chains (throughput)"], rates["512-bit FMA, one chain (latency)"]
    assert 0 < fma < fma_lat / 2  # an FMA's latency is several of its issue slots
    assert "512-bit FMA, 12 chains of the same inputs (the trap)" in rates and "256-bit FMA, 12 independent chains (throughput)" in rates
    if "avx512_bf16" in cpu_ext.cpu_flags():
        dp, dp_lat = rates["vdpbf16ps (512-bit), 12 independent chains (throughput)"], rates["vdpbf16ps (512-bit), one chain (latency)"]
        assert 0 < dp < dp_lat


def test_pool_reads_probe_reads_every_order_and_times_phase_b(tmp_path):
    """scripts/pool_reads.c: builds as its header says and prints a read rate for each order and set, phase B's and
    phase A's times from both sets, and phase B's from memory with its prefetch at four distances and after a read pass.
    Only orderings a cache gives whatever the machine's load are asserted: a slice read from L2 faster than from a set
    past L2 (300 copies: ~118 MB), each phase faster with its pool rows in L2, and no way of reading them from memory
    (prefetched, or read first) bringing phase B under its time from L2."""
    import re

    out = _run_c_probe(tmp_path, "pool_reads.c", "-O3", "300", timeout=120)
    reads = {(m[1].strip(), m[2].strip()): float(m[3])
             for m in re.finditer(r"^read, (.+?) from (.+?)\s+([\d.]+) us\s+[\d.]+ GB/s$", out, re.M)}
    orders = ("the pools' layout", "rows adjacent", "interleaved by 32")
    assert set(reads) == {(o, w) for o in orders for w in ("memory", "last-level cache", "L2")}
    for order in orders:
        assert 0 < reads[order, "L2"] < reads[order, "memory"]
    phase_b = {m[1].strip(): float(m[2]) for m in re.finditer(r"^phase B, B\^T from (.+?)\s+([\d.]+) us$", out, re.M)}
    assert set(phase_b) == {"memory", "L2"} and 0 < phase_b["L2"] < phase_b["memory"]
    # from memory, whether prefetched or read in a pass first, phase B is never faster than with its rows in L2
    ahead = {int(m[1]): float(m[2]) for m in re.finditer(r"^phase B \+ prefetch\s+(\d+) floats ahead, B\^T from memory\s+([\d.]+) us$", out, re.M)}
    assert sorted(ahead) == [32, 64, 128, 256] and phase_b["L2"] < min(ahead.values())
    assert phase_b["L2"] < float(re.search(r"^a read pass, then phase B, B\^T from memory\s+([\d.]+) us$", out, re.M)[1])
    phase_a = {m[1].strip(): float(m[2]) for m in re.finditer(r"^phase A, A from (.+?)\s+([\d.]+) us a LoRA$", out, re.M)}
    assert set(phase_a) == {"memory", "L2"} and 0 < phase_a["L2"] < phase_a["memory"]


def test_server_bench_warns_of_an_engine_off_huge_pages():
    """huge_page_warnings: a warning for each engine with a block under 0.9 on huge pages while another is not (its steps
    run slower than its rivals'), one note where every measured engine is so, nothing where all are on them or none
    could be measured (the tiny model)."""
    ok, low = {"weights": 1.0, "kv_cache": 1.0}, {"weights": 0.4, "kv_cache": 1.0}
    lines = server_bench.huge_page_warnings({"engine_base": ok, "engine_remix": low, "engine_4adapters": ok})
    assert len(lines) == 1 and lines[0].startswith("warning: engine_remix's weights 40 % on huge pages")
    assert "engine_base 1.00, engine_remix 0.40, engine_4adapters 1.00" in lines[0]
    notes = server_bench.huge_page_warnings({"engine_base": {"weights": 0.0}, "engine_remix": {"weights": 0.1}})
    assert len(notes) == 1 and notes[0].startswith("note: no engine's memory")
    assert server_bench.huge_page_warnings({"engine_base": ok, "engine_remix": ok}) == []
    assert server_bench.huge_page_warnings({"engine_base": {}, "engine_remix": {}}) == []


def test_live_bench_times_the_real_server_against_its_engine(tmp_path):
    """server.bench_live on the tiny model: a python -m server subprocess and the in-process engine serve the same
    greedy requests at each concurrency; both rates, the ratio against its goal and the replies' agreement (float32:
    the same tokens through HTTP as from the loop) are written, and the table names every level."""
    from server import bench_live

    out = bench_live.main(["--base", "tiny", "--dtype", "float32", "--concurrency", "1,3", "--prompt-tokens", "12",
                           "--new-tokens", "6", "--repeats", "1", "--json", str(tmp_path / "o.json"),
                           "--markdown", str(tmp_path / "o.md")])
    assert set(out["results"]) == {"1", "3"}
    for r in out["results"].values():
        assert r["live_tokens_per_s"] > 0 and r["engine_tokens_per_s"] > 0
        assert r["live_over_engine"] == pytest.approx(r["live_tokens_per_s"] / r["engine_tokens_per_s"], rel=0.01)
        assert r["identical_replies"] == 1.0
        assert 0 <= r["client_cpu_share"] < 2.5  # (this process's CPU over the live rounds' wall time)
        if sys.platform.startswith("linux"):  # the server's CPU a token, from /proc: its HTTP thread found by name
            assert 0 < r["http_thread_us_per_token"] < 1000 * r["server_cpu_ms_per_token"]
    assert out["goal"]["live_over_engine"] == ">= 0.9"
    assert json.loads((tmp_path / "o.json").read_text())["results"]["3"]["runs_live"]
    table = (tmp_path / "o.md").read_text()
    assert "| 1 |" in table and "| 3 |" in table
    streamed = bench_live.main(["--base", "tiny", "--dtype", "float32", "--concurrency", "2", "--prompt-tokens", "12",
                                "--new-tokens", "6", "--repeats", "1", "--stream"])  # (the chunks' ids add up)
    assert streamed["config"]["stream"] and streamed["results"]["2"]["identical_replies"] == 1.0
