"""Adapters loaded in the engine: validated with ``remix.adapter``, stacked into slots on each module."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from remix.adapter import AdapterError, validate_adapter
from remix.models.loading import fingerprint
from remix.stack import PoolStack
from server.engine.runner import ModelRunner

SERVABLE = ("remix", "lora")  # weighted routers (softmax-topk, dense) need their weights; not served


@dataclass
class LoadedAdapter:
    name: str
    path: str
    slot: int
    config: dict
    modules: list[str]
    active: int = 0  # running sequences using it
    unloading: bool = False
    info: dict = field(default_factory=dict)
    evictable: bool = False  # loaded on demand (Engine.ensure_adapter): unloaded when idle to make room for another
    last_used: float = 0.0  # time.monotonic() of its load or its latest request (the least recent is evicted first)
    giving_way: bool = False  # on demand, chosen to make room for another that waits: takes no new requests (the
    # HTTP layer holds them as it holds the other's) until its running ones finish and it is unloaded
    holds: int = 0  # requests on their way to it (Engine.ensure_adapter(hold=True)): not idle until they are submitted
    held_until: float = 0.0  # ... or until then (time.monotonic())


class AdapterRegistry:
    RETIRED_KEEP = 1024  # unloaded adapters whose counters are kept (the least recently unloaded go first): a server
    # loading ever new paths through the API would otherwise hold every one's for ever (~50 KB each for the demo's shape)

    def __init__(self, runner: ModelRunner, reserve: int = 0):
        self.runner = runner
        self.adapters: dict[str, LoadedAdapter] = {}
        self.reserve = reserve  # adapters each module's pool stack makes room for at once (the engine's max_adapters)
        # the frozen base's, taken once: a load then reads none of the model's weights (on a GPU, none of its memory
        # from the loading thread, while the engine's may be capturing a CUDA graph)
        self.fingerprint = fingerprint(runner.model)
        # (name, path) -> {module: selections per LoRA} of an adapter unloaded, taken up again if it is loaded again
        self._retired: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    def load(self, name: str, path: str | Path, check_fingerprint: bool = True) -> LoadedAdapter:
        """Validate and stack an adapter; raises AdapterError listing every problem (nothing changes then)."""
        return self.install(name, path, self.prepare(path, check_fingerprint))

    def prepare(self, path: str | Path, check_fingerprint: bool = True) -> tuple:
        """Read and validate an adapter (AdapterError lists every problem) and lay out its pools as the modules keep
        them: the part of a load that touches nothing the engine's steps use, so it runs on the caller's thread while
        the engine goes on."""
        config, mix, tensors = validate_adapter(self.runner.model, path, check_fingerprint, self.fingerprint)
        if mix.router not in SERVABLE:
            raise AdapterError(path, [f"router {mix.router!r} is not served (only {', '.join(SERVABLE)}): its "
                                      "learned routing weights have no place in the constant-weight kernel"])
        # (on the CPU, converted here; a GPU's copies are left to the engine's thread, where no graph is being captured)
        device, pools = (self.runner.device if self.runner.device.type == "cpu" else torch.device("cpu")), {}
        for module in config["modules"]:
            A = tensors[f"{module}.lora_A"].to(device=device, dtype=torch.float32)
            B = tensors[f"{module}.lora_B"].to(device=device, dtype=torch.float32)
            router = tensors.get(f"{module}.router")
            if router is None:  # plain LoRA: a pool of one, always selected
                router = torch.zeros(1, A.shape[2])
            router = router.to(device=device, dtype=torch.float32)
            pools[module] = (A, B, router, PoolStack.kernel_rows(A, B, router, self.runner.dtype))
        return config, mix, pools

    def install(self, name: str, path: str | Path, prepared: tuple) -> LoadedAdapter:
        """Stack a prepared adapter into the modules' pools (between steps: the engine thread)."""
        if name in self.adapters:
            raise AdapterError(path, [f"an adapter named {name!r} is already loaded"])
        config, mix, pools = prepared
        modules = list(config["modules"])
        self.runner.ensure_wrapped(modules)
        used = {a.slot for a in self.adapters.values()}
        slot = next(s for s in range(len(used) + 1) if s not in used)  # (the lowest free: the kernels' slot tables
        # stay as long as the most adapters loaded at once, however many have come and gone)
        omega = float(config.get("omega_value") or mix.omega_value())
        for module in modules:
            *tensors, rows = pools[module]
            A, B, router = (t.to(self.runner.device) for t in tensors)  # (a GPU's: copied here; on the CPU, no-ops)
            self.runner.stacked[module].stack.add(slot, A, B, router, mix.k if mix.router == "remix" else 1, omega,
                                                  dtype=self.runner.dtype, reserve=self.reserve * A.shape[0], rows=rows)
        loaded = LoadedAdapter(name, str(path), slot, config, modules,
                               info={"format": config.get("training", {}).get("converted_from", "remix"),
                                     "router": mix.router, "n": mix.n, "k": mix.k, "r": mix.r, "omega": omega})
        earlier = self._retired.pop((name, str(path)), None)
        slots = {module: self.runner.stacked[module].stack.slots[slot] for module in modules}
        if earlier is not None and earlier.keys() == slots.keys() and all(
                earlier[m].shape == slots[m].counts.shape for m in modules):  # the same adapter loaded again: its
            for module, counts in earlier.items():  # counters go on from where they stood
                slots[module].counts.add_(counts.to(slots[module].counts.device))
        self.adapters[name] = loaded
        return loaded

    def remove(self, name: str) -> None:
        adapter = self.adapters.pop(name)
        retired = {}
        for module in adapter.modules:
            stack = self.runner.stacked[module].stack
            retired[module] = stack.slots[adapter.slot].counts.clone()
            stack.remove(adapter.slot)
        self._retired[(name, adapter.path)] = retired
        while len(self._retired) > self.RETIRED_KEEP:
            self._retired.pop(next(iter(self._retired)))

    def selection_counts(self) -> dict[str, dict[str, list[int]]]:
        """{adapter: {module: selections per LoRA}} since the adapter was first loaded from its path (kept while it is
        unloaded, so counters stay counters under on-demand loading). Safe to call from another thread."""
        adapters = list(self.adapters.items())
        where, parts = [], []
        for name, adapter in adapters:
            for module in adapter.modules:
                weights = self.runner.stacked[module].stack.slots.get(adapter.slot)
                if weights is not None:
                    where.append((name, module, weights.counts.numel()))
                    parts.append(weights.counts)
        flat = torch.cat(parts).tolist() if parts else []  # one read from the device, not one per module (CUDA)
        out: dict[str, dict[str, list[int]]] = {name: {} for name, _ in adapters}
        at = 0
        for name, module, n in where:
            out[name][module] = flat[at : at + n]
            at += n
        return out
