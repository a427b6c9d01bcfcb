import itertools
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from remix import routing
from remix.config import MixtureConfig
from remix.layer import ReMixLinear
from training import rloo
from training.config import ConfigError, TrainConfig, load_config
from training.data import DataError, read_jsonl
from training.tasks import TASK_DEFAULTS


def test_hand_worked_three_sample_rloo():
    # k = 1, q = softmax(logits) = (.5, .3, .2); three selections J = 0, 1, 2 with losses 1, 2, 6.
    # L̄ = 3, advantages (-2, -1, 3), divided by M-1 = 2: (-1, -0.5, 1.5).
    # d log q_i / d logits = e_i - q, so G = -1(e0-q) - .5(e1-q) + 1.5(e2-q) = (-1, -.5, 1.5) - 0*q
    # (the advantages sum to zero, so the q terms cancel).
    logits = torch.tensor([0.5, 0.3, 0.2]).log().requires_grad_()
    log_q = routing.plackett_luce_log_prob(torch.log_softmax(logits, -1).expand(3, 3), torch.tensor([[0], [1], [2]]))
    surrogate = rloo.rloo_surrogate(torch.tensor([[1.0], [2.0], [6.0]]), log_q.view(3, 1))
    surrogate.backward()
    torch.testing.assert_close(logits.grad, torch.tensor([-1.0, -0.5, 1.5]))
    # and its value: sum_m adv_m log Q_m / 2 = (-2 log .5 - log .3 + 3 log .2) / 2
    assert float(surrogate.detach()) == pytest.approx((-2 * math.log(0.5) - math.log(0.3) + 3 * math.log(0.2)) / 2, abs=1e-6)


def test_rloo_is_unbiased_against_exact_enumeration():
    """E over selections of the RLOO gradient = d/dP sum_J Q(J) L(J), computed by enumerating all 6 ordered pairs."""
    torch.manual_seed(0)
    layer = ReMixLinear(nn.Linear(4, 2, bias=False), MixtureConfig(n=3, k=2, r=2)).train()
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.mul_(3.0)  # a non-uniform router
    x = torch.randn(1, 4)
    target = torch.tensor([[1.0, -1.0]])

    def loss_of(y):
        return ((y - target) ** 2).sum(-1)

    # exact: L(J) for each ordered pair, weighted by Q(J) as a function of P
    pairs = torch.tensor(list(itertools.permutations(range(3), 2)))  # [6, 2]
    with torch.no_grad():
        from remix.kernels import lora_gather_reference

        y_j = layer.base(x) + torch.cat([lora_gather_reference(x, layer.lora_A, layer.lora_B, p[None], layer.omega) for p in pairs])
        L_j = loss_of(y_j)  # [6]
    log_probs = torch.log_softmax(routing.router_logits(x, layer.router), -1).expand(6, 3)
    expected = (routing.plackett_luce_log_prob(log_probs, pairs).exp() * L_j).sum()
    exact = torch.autograd.grad(expected, layer.router)[0]

    # RLOO: B independent "examples" (the same x), M = 4 selections each, in one replicated forward
    M, B = 4, 20000
    layer.router.grad = None
    y = layer(x.expand(M * B, 4))
    losses = loss_of(y).view(M, B)
    log_q = layer.last_log_q.view(M, B)
    rloo.rloo_surrogate(losses, log_q).backward()
    estimate = layer.router.grad
    # per-example estimates have std ~ |G|; the mean of 20,000 is within a few percent of |G|
    err = (estimate - exact).norm() / exact.norm()
    assert err < 0.05, (estimate, exact)


def test_replicate_is_selection_major():
    batch = {"input_ids": torch.tensor([[1, 2], [3, 4]])}
    assert rloo.replicate(batch, 3)["input_ids"][:, 0].tolist() == [1, 3, 1, 3, 1, 3]


def test_bad_jsonl_rows_name_file_line_and_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(
        '{"prompt": "a", "completion": "b"}\n'
        '{"prompt": "a"}\n'
        "not json\n"
        '{"prompt": 3, "completion": "x"}\n'
        '{"messages": [{"role": "user", "content": "hi"}]}\n'
        '{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    )
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    msg = str(e.value)
    assert "5 bad row(s)" in msg
    assert f"{path}:2: field 'completion' is missing" in msg
    assert f"{path}:3: invalid JSON" in msg
    assert f"{path}:4: field 'prompt' must be a string" in msg
    assert f"{path}:5: field 'messages' must end with an assistant message" in msg
    assert f"{path}:6: field 'messages[0].role'" in msg


def test_config_precedence_and_errors(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("k: 3\nr: 4\nrouter: softmax-topk\n")
    cfg = load_config(["--config", str(cfg_file), "--r", "16"])
    # a yes/no flag alone means on (--resume, as people type it); with a value it takes that value
    bare = load_config(["--resume", "--eval-base", "off", "--output", str(tmp_path / "r")])
    assert bare.resume is True and bare.eval_base is False
    assert (cfg.k, cfg.r, cfg.router, cfg.n) == (3, 16, "softmax-topk", 8)  # default < yaml < flag
    cfg_file.write_text("kk: 3\n")
    with pytest.raises(ConfigError, match="unknown field"):
        load_config(["--config", str(cfg_file)])
    with pytest.raises(ConfigError) as e:
        load_config(["--k", "9", "--samples", "1", "--lr", "0"])
    assert "--k: must be <= n" in str(e.value) and "--samples" in str(e.value) and "--lr" in str(e.value)
    # a file's values take their fields' types (PyYAML reads 1e-3 as a string, off as a boolean) or are named
    cfg_file.write_text("targets: gate_proj,up_proj\nchat: off\nsteps: 3.0\nlr: 1e-3\n")
    cfg = load_config(["--config", str(cfg_file)])
    assert (cfg.targets, cfg.chat, cfg.steps, cfg.lr) == (["gate_proj", "up_proj"], False, 3, 0.001)
    cfg_file.write_text("lr: abc\nsteps: [1]\nchat: maybe\nk: 2.5\n")
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(cfg_file)])
    assert str(e.value) == (f"--config {cfg_file}:\n  - lr: expected a number, got 'abc'\n  - steps: expected an integer, "
                            "got [1]\n  - chat: expected true or false, got 'maybe'\n  - k: expected an integer, got 2.5")
    # data that is neither a built-in task nor a file fails with the other fields, before any model loads
    data = tmp_path / "train.jsonl"
    data.write_text("")
    assert load_config(["--data", str(data), "--eval-data", "facts"]).data == str(data)
    with pytest.raises(ConfigError) as e:
        load_config(["--data", str(tmp_path / "missing.jsonl"), "--eval-data", "nope", "--k", "9"])
    msg = str(e.value)
    assert f"--data: '{tmp_path / 'missing.jsonl'}' is neither a built-in task (facts," in msg
    assert "--eval-data: 'nope' is neither" in msg and "--k: must be <= n" in msg
    with pytest.raises(ConfigError, match=f"--output: {data} is a file, not a run directory"):
        load_config(["--output", str(data)])


def test_fit_names_bad_targets_context_output_and_device(tmp_path, capsys):
    """A --targets that selects nothing is a CLI error naming the flag and what the base's linears are called; so are
    a --max-seq-len past the base's trained context, a run directory that cannot be made and --device cuda without a
    CUDA device."""
    from training.fit import main

    assert main(["--base", "tiny", "--targets", "gate,re:.*mlp", "--steps", "1", "--progress", "false",
                 "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --targets: no nn.Linear module matches targets ['gate', 're:.*mlp'] (the model's "
                          "linear modules end in down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj;")
    assert not (tmp_path / "run" / "adapter").exists()
    assert main(["--base", "tiny", "--targets", "gate_proj,up_proj,dwn_proj", "--steps", "1", "--progress", "false",
                 "--output", str(tmp_path / "run")]) == 2  # (a typo among good targets: not a pool silently left off)
    assert capsys.readouterr().err.startswith("error: --targets: targets ['dwn_proj'] match no nn.Linear module")
    # the tiny base was trained for 4096 positions (its config's max_position_embeddings): a longer example is refused
    assert main(["--base", "tiny", "--max-seq-len", "5000", "--steps", "1", "--progress", "false",
                 "--output", str(tmp_path / "long")]) == 2
    assert capsys.readouterr().err.startswith("error: --max-seq-len 5000 is past the context tiny was trained for "
                                              "(4096 positions); give at most 4096")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["--base", "tiny", "--output", str(blocker / "run"), "--steps", "1", "--progress", "false"]) == 2
    assert f"error: --output {blocker / 'run'}: cannot create the run directory" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--base", "tiny", "--device", "cuda", "--output", str(tmp_path / "c"), "--steps", "1"]) == 2
        assert "error: invalid training config:\n  - --device cuda: no CUDA device here" in capsys.readouterr().err


FIT = [sys.executable, "-m", "training.fit", "--base", "tiny", "--train-size", "40", "--eval-size", "6",
       "--batch-size", "4", "--eval-max-new-tokens", "4", "--progress", "false", "--threads", "1"]


def _run(args, env=None):
    return subprocess.run(FIT + args, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_fit_two_steps_is_reproducible(tmp_path):
    for name in ("a", "b"):
        res = _run(["--steps", "2", "--output", str(tmp_path / name)])
        assert res.returncode == 0, res.stderr
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == 2 and a == b
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert (tmp_path / "a" / "adapter" / "adapter_config.json").is_file() and "eval_exact_match" in summary
    # the frozen base evaluated first (step 0 of the log), beside the adapter's scores in the summary
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "eval_loss" in rows[0] and "loss" not in rows[0]
    base = summary["base"]
    assert base["eval_loss"] == rows[0]["eval_loss"] and base["eval_exact_match"] == rows[0]["eval_exact_match"]
    assert set(base["tasks_exact_match"]) == set(summary["tasks"]) and math.isfinite(base["eval_loss"])
    assert base["eval_loss"] != summary["eval_loss"]  # two steps of training moved the held-out loss
    off = _run(["--steps", "1", "--eval-base", "false", "--output", str(tmp_path / "c"), "--progress", "true"])
    assert off.returncode == 0, off.stderr
    # stderr is a pipe, not a terminal: the progress bar's states come as whole lines (tqdm redraws with carriage
    # returns, which a log keeps as one endless line)
    assert "\r" not in off.stderr and re.search(r"^train remix: 100%.*1/1 .*loss=", off.stderr, re.M), off.stderr
    assert "base" not in json.loads((tmp_path / "c" / "summary.json").read_text())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_cuda_writes_an_adapter_the_cpu_loads(tmp_path):
    res = _run(["--steps", "3", "--device", "cuda", "--output", str(tmp_path / "gpu")])
    assert res.returncode == 0, res.stderr
    losses = _losses(tmp_path / "gpu")
    assert len(losses) == 3 and all(math.isfinite(loss) for _, loss in losses)
    import remix

    model, _ = remix.load_base("tiny")
    layers = remix.load_adapter(model, tmp_path / "gpu" / "adapter")  # written from CUDA, read on the CPU
    assert layers and all(layer.lora_A.device.type == "cpu" for layer in layers.values())


def test_kill_and_resume_gives_the_same_curve(tmp_path):
    common = ["--steps", "6", "--save-every", "2", "--eval-every", "0", "--warmup-steps", "2"]
    assert _run(common + ["--output", str(tmp_path / "straight")]).returncode == 0
    killed = _run(common + ["--output", str(tmp_path / "killed")], env={"REMIX_TEST_CRASH_AT_STEP": "5"})
    assert killed.returncode == 9  # hard exit after step 5; the last checkpoint is step 4
    resumed = _run(common + ["--output", str(tmp_path / "killed"), "--resume", "true"])
    assert resumed.returncode == 0, resumed.stderr
    straight, again = _losses(tmp_path / "straight"), _losses(tmp_path / "killed")
    assert [s for s, _ in again] == list(range(1, 7))
    assert again == straight
    # the base's scores (evaluated before step 1 of the first attempt) reach the resumed run's summary from its log
    first = json.loads((tmp_path / "straight" / "summary.json").read_text())["base"]
    assert json.loads((tmp_path / "killed" / "summary.json").read_text())["base"] == first
    # resuming with settings that shape the adapter otherwise is refused, naming each (it was a size-mismatch traceback)
    other = _run(common + ["--output", str(tmp_path / "killed"), "--resume", "true", "--n", "4", "--optimizer", "sgd"])
    assert other.returncode == 2 and "error: --resume: the checkpoint " in other.stderr
    assert "  - n: the checkpoint has 8, this run 4\n  - optimizer: the checkpoint has 'adamw', this run 'sgd'" in other.stderr


@pytest.mark.parametrize("router", ["softmax-topk", "dense", "lora"])
def test_baselines_train(tmp_path, router):
    extra = ["--load-balance-coef", "0.01"] if router == "softmax-topk" else []
    res = _run(["--steps", "2", "--router", router, "--output", str(tmp_path / router)] + extra)
    assert res.returncode == 0, res.stderr
    if router == "lora":
        assert (tmp_path / router / "peft_adapter" / "adapter_config.json").is_file()


def test_cli_reports_bad_field(tmp_path):
    res = _run(["--steps", "2", "--k", "0", "--output", str(tmp_path / "x")])
    assert res.returncode == 2 and "--k: must be a positive integer" in res.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    res = _run(["--steps", "1", "--data", str(bad), "--output", str(tmp_path / "y")])
    assert res.returncode == 2 and f"{bad}:1: field 'completion' is missing" in res.stderr


def test_two_process_ddp_matches_one_process(tmp_path):
    """torchrun with 2 ranks (gloo) and the same global batch gives the parameters of 1 process.

    Pools agree to float rounding (~1e-7). Routers agree to ~1e-4: their RLOO gradients are differences of
    nearly equal losses early on, and Adam divides them by their own tiny running RMS, which magnifies the
    last-bit differences of the two GEMM shapes.
    """
    from safetensors.torch import load_file

    # (float32: in bfloat16 the two ranks' GEMM shapes round apart by bfloat16's steps, which would hide a real gap)
    common = ["--steps", "3", "--batch-size", "4", "--eval-every", "0", "--save-every", "0", "--eval-size", "2",
              "--dtype", "float32"]
    one = _run(common + ["--output", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0"]
    two = subprocess.run(torchrun + FIT[1:] + common + ["--output", str(tmp_path / "two")], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        tol = 1e-4 if key.endswith("router") else 1e-6
        torch.testing.assert_close(a[key], b[key], atol=tol, rtol=0, msg=key)
    assert [round(l, 4) for _, l in _losses(tmp_path / "one")] == [round(l, 4) for _, l in _losses(tmp_path / "two")]


def test_a_task_brings_its_own_defaults(tmp_path):
    """--data tools raises max_seq_len and eval_max_new_tokens to what its rows need (with the defaults every row
    would be cut: "no example has a completion within max_seq_len=128"); a config file or a flag still wins."""
    cfg = load_config(["--data", "tools"])
    assert (cfg.max_seq_len, cfg.eval_max_new_tokens) == (TASK_DEFAULTS["tools"]["max_seq_len"], 64)
    assert load_config(["--data", "tools", "--max-seq-len", "300"]).max_seq_len == 300
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data: tools\neval_max_new_tokens: 50\n")
    cfg = load_config(["--config", str(cfg_file)])
    assert (cfg.max_seq_len, cfg.eval_max_new_tokens) == (TASK_DEFAULTS["tools"]["max_seq_len"], 50)
    assert load_config([]).max_seq_len == 128  # the mixture keeps the plain defaults


def test_evaluate_cli_scores_an_adapter_and_its_base_as_fit_did(tmp_path):
    """python -m training.evaluate ADAPTER: the adapter's training settings pick the same held-out set fit scored, so
    its scores are fit's final ones exactly; the base, evaluated bare, matches fit's step-0 evaluation (through the
    fresh pools' kernels) to float rounding; bad input is a message and exit code 2."""
    assert _run(["--steps", "2", "--output", str(tmp_path / "run")]).returncode == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    cmd = [sys.executable, "-m", "training.evaluate", str(tmp_path / "run" / "adapter"), "--threads", "1"]
    res = subprocess.run(cmd + ["--json", str(tmp_path / "ev.json")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "ev.json").read_text())
    assert out["examples"] == 6 and out["settings"]["eval_size"] == 6 and out["base_model"] == "tiny"
    assert out["adapter"]["eval_loss"] == summary["eval_loss"]
    assert out["adapter"]["eval_exact_match"] == summary["eval_exact_match"]
    assert {t: r["exact_match"] for t, r in out["adapter"]["tasks"].items()} == {
        t: r["exact_match"] for t, r in summary["tasks"].items()}
    assert math.isclose(out["base"]["eval_loss"], summary["base"]["eval_loss"], rel_tol=1e-5)
    assert out["base"]["eval_exact_match"] == summary["base"]["eval_exact_match"]
    lines = res.stdout.splitlines()  # the table: a header, then base and adapter rows
    assert lines[1].split()[:3] == ["loss", "exact", "match"] and lines[2].startswith("base") and lines[3].startswith("adapter")
    assert f"{summary['eval_loss']:.3f}" in lines[3]
    # another task: its own held-out set (and the task's defaults), not the adapter's
    other = subprocess.run(cmd + ["--data", "arithmetic", "--eval-size", "4", "--skip-base", "--json", str(tmp_path / "a.json")],
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 0, other.stderr
    got = json.loads((tmp_path / "a.json").read_text())
    assert got["examples"] == 4 and set(got["adapter"]["tasks"]) == {"arithmetic"} and "base" not in got
    # other data than the adapter's: not its training lengths (--eval-max-new-tokens 4 here), the task's or fit's own
    want = {**{k: getattr(TrainConfig, k) for k in ("max_seq_len", "eval_max_new_tokens")},
            **{k: v for k, v in TASK_DEFAULTS.get("arithmetic", {}).items() if k in ("max_seq_len", "eval_max_new_tokens")}}
    assert {k: got["settings"][k] for k in want} == want and out["settings"]["eval_max_new_tokens"] == 4
    missing = subprocess.run([sys.executable, "-m", "training.evaluate", str(tmp_path / "nope")], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and "is not a directory" in missing.stderr and "Traceback" not in missing.stderr
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "2+2=", "completion": "4"}\n')
    nosplit = subprocess.run(cmd + ["--data", str(rows)], capture_output=True, text=True, timeout=120)
    assert nosplit.returncode == 2 and "--eval-data" in nosplit.stderr
    bad = subprocess.run(cmd + ["--eval-size", "0", "--data", str(tmp_path / "gone.jsonl")], capture_output=True,
                         text=True, timeout=120)  # every bad setting named, before the base loads (was a misleading error)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "  - --eval-size: must be >= 1, got 0\n  - --data: " in bad.stderr and "is neither a built-in task" in bad.stderr
    long = subprocess.run(cmd + ["--max-seq-len", "5000"], capture_output=True, text=True, timeout=120)
    assert long.returncode == 2 and "--max-seq-len 5000 is past the context tiny was trained for (4096" in long.stderr
    import remix  # another base (other weights, a wider FFN): the adapter's loader lists what does not fit, exit 2

    other, tok = remix.tiny_model(seed=5, intermediate_size=96)
    other.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    wrong = subprocess.run(cmd + ["--base", str(tmp_path / "other"), "--skip-base"], capture_output=True, text=True,
                           timeout=120)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr, wrong.stderr
    message = wrong.stderr[wrong.stderr.index("error: "):]
    assert "7 problem(s)" in message and "base model has [64, 96]" in message and "different weights" in message, message


def test_study_names_bad_seeds_and_unknown_configurations(tmp_path, capsys):
    from training import study

    for argv, said in ((["--seeds", "0,x"], "--seeds: comma-separated whole numbers, got '0,x'"),
                       (["--only", "remix,nope"], "--only: no configuration named nope (there are remix, ")):
        with pytest.raises(SystemExit):
            study.main([*argv, "--out", str(tmp_path / "o"), "--report", str(tmp_path / "r")])
        assert said in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything is written


def test_split_rows_holds_out_a_seeded_share():
    """floor(share * rows), at most cap, drawn by the seed; train and held out partition the rows in their order."""
    from training.data import split_rows

    rows = [{"i": i} for i in range(50)]
    train, held = split_rows(rows, 0.1, 96, seed=3)
    assert len(held) == 5 and len(train) == 45 and sorted(r["i"] for r in train + held) == list(range(50))
    assert [r["i"] for r in train] == sorted(r["i"] for r in train)
    assert split_rows(rows, 0.1, 96, seed=3) == (train, held) and split_rows(rows, 0.1, 96, seed=4)[1] != held
    assert len(split_rows(rows, 0.5, 7, seed=0)[1]) == 7  # the cap (--eval-size)
    assert split_rows(rows[:19], 0.05, 96, seed=0) == (rows[:19], [])  # too few rows for one
    assert split_rows(rows, 0.0, 96, seed=0) == (rows, [])


def test_a_jsonl_file_without_eval_data_is_scored_on_rows_held_out_of_it(tmp_path):
    """--data FILE.jsonl and no --eval-data: --eval-split's share of the rows is held out (not trained on) and
    scored, as Hugging Face's scripts split a validation set; training.evaluate rebuilds that same set (fit's score
    exactly). --eval-split 0, or too few rows: no held-out set, and the run says so."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "completion": str(2 * a)}) + "\n" for a in range(40)))
    res = _run(["--data", str(rows), "--eval-split", "0.1", "--steps", "2", "--output", str(tmp_path / "run")])
    assert res.returncode == 0, res.stderr
    assert "evaluating on 4 of the rows of" in res.stderr
    adapter = tmp_path / "run" / "adapter"  # the closing line: the scores and the command that serves the adapter
    assert f"done: the adapter is in {adapter}; held-out loss " in res.stderr
    assert f"(base -> adapter). Serve it: python -m server --base tiny --adapter run={adapter}" in res.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["training"]["train_examples"] == 36 and "eval_loss" in summary
    ev = subprocess.run([sys.executable, "-m", "training.evaluate", str(tmp_path / "run" / "adapter"), "--threads", "1",
                         "--skip-base", "--json", str(tmp_path / "ev.json")], capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    out = json.loads((tmp_path / "ev.json").read_text())
    assert out["examples"] == 4 and out["adapter"]["eval_loss"] == summary["eval_loss"]
    none = _run(["--data", str(rows), "--eval-split", "0", "--steps", "1", "--output", str(tmp_path / "none")])
    assert none.returncode == 0 and "no held-out set" in none.stderr
    assert "eval_loss" not in json.loads((tmp_path / "none" / "summary.json").read_text())
    assert json.loads((tmp_path / "none" / "adapter" / "adapter_config.json").read_text())["training"]["train_examples"] == 40
    bad = _run(["--data", str(rows), "--eval-split", "1.5", "--output", str(tmp_path / "bad")])
    assert bad.returncode == 2 and "--eval-split: must be in [0, 1), got 1.5" in bad.stderr


def test_the_base_dtype_trains_float32_pools_and_evaluate_follows_it(tmp_path):
    """--dtype bfloat16 loads the frozen base in bfloat16 and trains float32 pools around it (the adapter is float32
    either way); the resolved dtype goes into the adapter's training metadata, and training.evaluate loads the base
    so, reproducing fit's final scores exactly. --dtype float32 is the full-precision run, and a bad value is named."""
    runs = {}
    for dtype in ("bfloat16", "float32"):
        run = tmp_path / dtype
        res = _run(["--steps", "2", "--dtype", dtype, "--output", str(run)])
        assert res.returncode == 0, res.stderr
        config = json.loads((run / "adapter" / "adapter_config.json").read_text())
        assert config["dtype"] == "float32" and config["training"]["base_dtype"] == dtype
        runs[dtype] = json.loads((run / "summary.json").read_text())
    assert runs["bfloat16"]["eval_loss"] != runs["float32"]["eval_loss"]  # (two precisions: near, not equal)
    assert math.isclose(runs["bfloat16"]["eval_loss"], runs["float32"]["eval_loss"], rel_tol=0.02)
    res = subprocess.run([sys.executable, "-m", "training.evaluate", str(tmp_path / "bfloat16" / "adapter"), "--threads",
                          "1", "--skip-base", "--json", str(tmp_path / "ev.json")], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "ev.json").read_text())
    assert out["dtype"] == "bfloat16" and out["adapter"]["eval_loss"] == runs["bfloat16"]["eval_loss"]
    bad = _run(["--steps", "1", "--dtype", "float16", "--output", str(tmp_path / "bad")])
    assert bad.returncode == 2 and "--dtype: must be float32, bfloat16 or auto, got 'float16'" in bad.stderr


def test_evaluate_keeps_an_older_adapters_whole_file():
    """An adapter trained before --eval-split existed trained on all of its file's rows: none is held out now
    (scoring it on rows it trained on would flatter it)."""
    from training.evaluate import settings_for

    older = {"data": "rows.jsonl", "eval_data": "", "eval_size": 96, "seed": 0}
    assert settings_for(older, {})["eval_split"] == 0.0
    assert settings_for({**older, "eval_split": 0.1}, {})["eval_split"] == 0.1
    assert settings_for({**older, "eval_split": 0.1}, {"data": "other.jsonl"})["eval_split"] == 0.0


def test_the_closing_line_says_what_was_made_and_how_to_serve_it():
    from training.fit import closing_line

    summary = {"adapter": "runs/x/adapter", "eval_loss": 0.8, "eval_exact_match": 0.27,
               "base": {"eval_loss": 5.48, "eval_exact_match": 0.0}}
    assert closing_line(summary, "smollm2-135m-instruct") == (
        "done: the adapter is in runs/x/adapter; held-out loss 5.480 -> 0.800, exact match 0.0 % -> 27.0 % "
        "(base -> adapter). Serve it: python -m server --adapter x=runs/x/adapter")
    assert closing_line({"adapter": "out/mine"}, "tiny") == (
        "done: the adapter is in out/mine. Serve it: python -m server --base tiny --adapter mine=out/mine")
