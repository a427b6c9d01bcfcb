"""peft's LoRA adapters (PeftModel.save_pretrained's files) loaded by remix.load_adapter and served by the engine,
against peft's own forward; what cannot be served is reported, every problem at once."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import remix
from remix.adapter import AdapterError
from server.bench import make_peft_adapter
from server.engine import Engine, EngineConfig, GenerationRequest, collect
from tests.test_engine import PROMPTS, greedy, hf_greedy, hf_logprobs, lively_tiny, logprobs_of, make_adapter, tokens_of

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def write_peft(path, seed=0, **config):
    """A peft LoRA (r 4, alpha 8 on TARGETS unless ``config`` says otherwise) on the lively tiny model, B random."""
    return make_peft_adapter(lively_tiny()[0], path, seed, 0.5, **{"r": 4, "lora_alpha": 8, "target_modules": TARGETS,
                                                                   **config})


def peft_logits(pm, ids):
    with torch.no_grad():
        return pm(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("config", [{}, {"use_rslora": True},
                                    # ranks differ with one scaling (8 / 4 = 16 / 8): padded with zeros
                                    {"rank_pattern": {"down_proj": 8}, "alpha_pattern": {"down_proj": 16}}],
                         ids=["lora", "rslora", "rank_pattern"])
def test_load_adapter_equals_peft_forward(tmp_path, config):
    pm = write_peft(tmp_path / "p", **config)
    model, tok = lively_tiny()
    layers = remix.load_adapter(model, tmp_path / "p")
    assert set(name.rsplit(".", 1)[-1] for name in layers) == set(TARGETS)
    assert all(layer.kind == "lora" and layer.n == 1 for layer in layers.values())
    r = 4
    want_omega = 8 / (r ** 0.5 if config.get("use_rslora") else r)
    assert all(layer.omega == pytest.approx(want_omega) for layer in layers.values())
    bare, _ = lively_tiny()
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        with torch.no_grad():
            ours, base = model(torch.tensor([ids])).logits[0], bare(torch.tensor([ids])).logits[0]
        theirs = peft_logits(pm, ids)
        assert (theirs - base).abs().max() > 1e-2  # the adapter changes the output: the comparison means something
        # float32 through 2 layers, summed in a different order than peft's two nn.Linear calls
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_engine_serves_peft_adapter_beside_remix_ones(tmp_path, device):
    pm = write_peft(tmp_path / "p", seed=3, r=8, lora_alpha=16)  # rank 8 beside the ReMix adapter's 4: padded ranks
    model, tok = lively_tiny(device=device)
    engine = Engine(model, tok, EngineConfig(max_model_len=160, max_num_seqs=8, max_prefill_chunk=8, max_batched_tokens=32))
    loaded = engine.load_adapter("p", str(tmp_path / "p"))
    assert loaded.info["format"] == "peft" and loaded.info["router"] == "lora" and loaded.info["omega"] == 2.0
    engine.load_adapter("mix", str(make_adapter(lively_tiny()[0], tmp_path / "mix", seed=4)))
    prompts = [tok(p).input_ids for p in PROMPTS]
    alone = {}
    for i, ids in enumerate(prompts):  # the peft adapter alone: peft's own greedy text and log-probabilities
        events = collect(engine, GenerationRequest(f"alone{i}", ids, greedy(10), adapter="p"))
        new = tokens_of(events)
        assert new == hf_greedy(pm, ids, 10)
        torch.testing.assert_close(torch.tensor(logprobs_of(events)), torch.tensor(hf_logprobs(pm, ids, new)),
                                   atol=1e-4, rtol=1e-4)
        alone[i] = new
    adapters = ["p", "mix", None, "p", "mix", "p"]
    sinks = {i: [] for i in range(len(adapters))}
    for i, adapter in enumerate(adapters):
        engine.submit(GenerationRequest(f"b{i}", prompts[i % 4], greedy(10), adapter=adapter), sinks[i].append)
    while engine.has_work():
        engine.step()
    for i, adapter in enumerate(adapters):
        if adapter == "p":  # in a batch with a ReMix adapter and the bare base: the same tokens as alone
            assert tokens_of(sinks[i]) == alone[i % 4]
    assert engine.stats()["slots_used"] == 0


def test_engine_mixing_peft_loras_equals_pefts_mixed_batch(tmp_path):
    """Three peft LoRAs (ranks 4, 8, 4) mixed in one batch with the bare base: each row's greedy tokens from the engine
    equal peft's mixed-batch inference (generate with ``adapter_names``, as server.bench --peft-mixed runs it)."""
    names = ["p0", "p1", "p2"]
    for i, name in enumerate(names):
        write_peft(tmp_path / name, seed=10 + i, **({"r": 8, "lora_alpha": 16} if i == 1 else {}))
    model, tok = lively_tiny()
    engine = Engine(model, tok, EngineConfig(max_model_len=160, max_num_seqs=8))
    for name in names:
        engine.load_adapter(name, str(tmp_path / name))
    pm = peft.PeftModel.from_pretrained(lively_tiny()[0], str(tmp_path / "p0"), adapter_name="p0")
    for name in names[1:]:
        pm.load_adapter(str(tmp_path / name), adapter_name=name)
    pm.eval()
    rows = [("p0", 0), ("p1", 1), ("__base__", 2), ("p2", 3), ("p1", 0), ("p2", 1)]  # (adapter, prompt)
    length = 6  # every prompt cut to one length: HF's batch needs no padding
    prompts = [tok(PROMPTS[j]).input_ids[:length] for _, j in rows]
    assert all(len(p) == length for p in prompts)
    with torch.no_grad():
        theirs = pm.generate(input_ids=torch.tensor(prompts), attention_mask=torch.ones(len(rows), length, dtype=torch.long),
                             max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None,
                             adapter_names=[a for a, _ in rows])[:, length:].tolist()
    sinks = {i: [] for i in range(len(rows))}
    for i, ((adapter, _), ids) in enumerate(zip(rows, prompts)):
        engine.submit(GenerationRequest(f"m{i}", ids, greedy(10), adapter=None if adapter == "__base__" else adapter),
                      sinks[i].append)
    while engine.has_work():
        engine.step()
    ours = [tokens_of(sinks[i]) for i in range(len(rows))]
    assert ours == theirs
    assert len({tuple(t) for t in theirs}) >= 4  # the LoRAs change the text: the comparison means something


def test_training_peft_export_loads_back_equal(tmp_path):
    """A router-"lora" adapter written by training's peft export is read back as the same adapter."""
    from training.export import export_peft

    model, tok = lively_tiny()
    layers = remix.inject(model, remix.MixtureConfig(router="lora", n=1, k=1, r=4, alpha=8.0))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen))
    remix.save_adapter(model, tmp_path / "ours")
    export_peft(model, tmp_path / "peft", "tiny")
    a, _ = lively_tiny()
    b, _ = lively_tiny()
    remix.load_adapter(a, tmp_path / "ours")
    remix.load_adapter(b, tmp_path / "peft")
    ids = torch.tensor([tok(PROMPTS[0]).input_ids])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)  # same tensors, same omega: bit-identical


def edit(path, config=None, tensors=None):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(config or {})
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        weights = load_file(str(path / "adapter_model.safetensors"))
        save_file(tensors(weights), str(path / "adapter_model.safetensors"))


def problems_of(path):
    with pytest.raises(AdapterError) as e:
        remix.load_adapter(lively_tiny()[0], path)
    return e.value.problems


def test_unservable_peft_features_are_all_reported(tmp_path):
    write_peft(tmp_path / "p")
    key = "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight"

    def damage(w):
        w.pop(key)  # a module with A and no B
        w["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 256)  # LoRA on an embedding
        return w

    edit(tmp_path / "p", {"use_dora": True, "bias": "all", "modules_to_save": ["lm_head"], "task_type": "SEQ_CLS"},
         tensors=damage)
    problems = problems_of(tmp_path / "p")
    text = "\n".join(problems)
    for needle in ("use_dora", "bias: 'all'", "modules_to_save", "task_type: 'SEQ_CLS'", "lora_embedding_A",
                   "model.layers.0.mlp.gate_proj: has lora_A but no lora_B"):
        assert needle in text, (needle, problems)
    assert len(problems) == 6


def test_peft_scalings_that_differ_and_wrong_shapes_are_reported(tmp_path):
    write_peft(tmp_path / "p", rank_pattern={"down_proj": 8})  # alpha 8: down_proj's scaling 1, the others' 2
    problems = problems_of(tmp_path / "p")
    assert len(problems) == 1 and "scalings (lora_alpha / r) differ" in problems[0]
    assert "model.layers.0.mlp.down_proj: 1" in problems[0] and "model.layers.0.mlp.gate_proj: 2" in problems[0]

    write_peft(tmp_path / "q")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    edit(tmp_path / "q", {"peft_type": "IA3"}, tensors=lambda w: {**w, key: torch.zeros(32, 4)})
    problems = problems_of(tmp_path / "q")
    assert any("peft_type: only LORA" in p for p in problems)
    assert any("model.layers.1.self_attn.q_proj: adapter has [d_in, d_out] = [64, 32]" in p for p in problems), problems


def test_pickled_peft_weights_are_refused_with_the_fix(tmp_path):
    write_peft(tmp_path / "p")
    weights = tmp_path / "p" / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), tmp_path / "p" / "adapter_model.bin")
    weights.unlink()
    problems = problems_of(tmp_path / "p")
    assert len(problems) == 1 and "adapter_model.bin is a pickle" in problems[0] and "safe_serialization" in problems[0]
