"""Every Prometheus metric of the server, declared in one place (prefix ``remix_``, fixed label names).

Routing counters live in the engine as tensors (one bincount per module per step); they are turned
into samples only at scrape time by :class:`RoutingCollector`, so the hot path never touches Prometheus.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque

import torch
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from remix.routing import selection_entropy

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 20, 40, 80)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def split_module(name: str) -> tuple[str, str]:
    """'model.layers.12.mlp.gate_proj' -> ('12', 'mlp.gate_proj')."""
    m = _LAYER.search(name)
    if not m:
        return "-", name
    return m.group(1), name[m.end():]


class Metrics:
    """All metrics of one server instance, on their own registry (so tests can run several servers)."""

    def __init__(self, engine, window_s: float = 60.0):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("remix_time_to_first_token_seconds", "Time from arrival to the first generated token.",
                              ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("remix_inter_token_latency_seconds", "Time between consecutive generated tokens of a sequence.",
                             ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("remix_e2e_request_latency_seconds", "Time from arrival to the last token of a request.",
                             ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("remix_prompt_tokens", "Prompt tokens processed.", ["adapter"], registry=r)
        self.generation_tokens = Counter("remix_generation_tokens", "Tokens generated.", ["adapter"], registry=r)
        self.finished = Counter("remix_requests_finished", "Finished sequences by reason (stop, length, cancelled, error).",
                                ["adapter", "reason"], registry=r)
        self.http_errors = Counter("remix_http_errors", "Requests refused, by HTTP status.", ["status"], registry=r)
        self.adapter_wait = Histogram("remix_adapter_wait_seconds", "Time a request waited for its adapter to be loaded "
                                      "on demand (--lazy-adapters): the load, and any wait for room before it.",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.tool_calls = Counter("remix_tool_calls", "Tool calls returned to chat requests that offered tools.",
                                  ["adapter", "function"], registry=r)
        self.tool_choices = Counter("remix_tool_choices", "Chat choices that were offered tools, by whether they "
                                    "called (called = true / false).", ["adapter", "called"], registry=r)
        r.register(EngineCollector(engine))
        r.register(RoutingCollector(engine, window_s))


class EngineCollector:
    """Running and waiting requests and KV cache usage, read from the engine at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        yield GaugeMetricFamily("remix_requests_running", "Sequences being prefilled or decoded.", value=s["running"])
        yield GaugeMetricFamily("remix_requests_waiting", "Requests queued for a cache slot.", value=s["waiting"])
        yield GaugeMetricFamily("remix_kv_cache_usage_ratio", "Share of the KV cache's token capacity in use.", value=s["kv_usage"])
        yield GaugeMetricFamily("remix_kv_cache_slots_used", "Cache slots held by running sequences.", value=s["slots_used"])
        yield GaugeMetricFamily("remix_kv_cache_slots", "Cache slots (sequences that can run at once).", value=s["slots"])
        yield GaugeMetricFamily("remix_adapters_loaded", "Adapters loaded.", value=s["adapters_loaded"])
        yield GaugeMetricFamily("remix_adapters_giving_way", "Adapters loaded on demand that take no new requests "
                                "until they are unloaded to make room for one that waits (--max-adapters).",
                                value=s["adapters_giving_way"])
        yield CounterMetricFamily("remix_adapter_loads_on_demand", "Adapters of --adapter-dir loaded because a request "
                                  "named them (--lazy-adapters).", value=s["adapter_loads_on_demand"])
        yield CounterMetricFamily("remix_adapter_evictions", "Adapters loaded on demand that were unloaded, least "
                                  "recently used first, to make room for another (--max-adapters).",
                                  value=s["adapter_evictions"])
        if "spec_draft_tokens" in s:  # speculative decoding on (vLLM's spec_decode counters)
            yield CounterMetricFamily("remix_spec_decode_draft_tokens", "Draft tokens proposed by prompt lookup and "
                                      "checked.", value=s["spec_draft_tokens"])
            yield CounterMetricFamily("remix_spec_decode_accepted_tokens", "Draft tokens that were the model's own "
                                      "greedy tokens (each saved a decode step).", value=s["spec_accepted_tokens"])
            yield CounterMetricFamily("remix_spec_decode_steps", "Decode steps that checked drafts.",
                                      value=s["spec_steps"])
            yield GaugeMetricFamily("remix_spec_decode_check_cost_seconds", "What checking drafts costs a decode step "
                                    "at all, as the cost schedule measures it (0 until measured).",
                                    value=s["spec_check_cost_ms"] / 1e3)
            yield GaugeMetricFamily("remix_spec_decode_draft_token_cost_seconds", "What each draft token costs a "
                                    "decode step, as the cost schedule measures it (0 until measured).",
                                    value=s["spec_draft_token_cost_ms"] / 1e3)
        huge = self.engine.huge_pages
        if huge:  # CPU: a block on 4 KiB pages streams slower (the engine reads these once, at start)
            g = GaugeMetricFamily("remix_huge_pages_ratio", "Share of a memory block the decode steps stream (the "
                                  "weights, the KV cache) that sits on transparent huge pages.", labels=["block"])
            for block, v in sorted(huge.items()):
                g.add_metric([block], v)
            yield g
        shares = self.engine.thread_shares
        if shares:  # CPU: each thread's share of the kernels' split work, by its measured speed
            g = GaugeMetricFamily("remix_cpu_thread_share", "Share of the compiled kernels' split work (GEMM outputs, "
                                  "decode attention rows) each CPU thread takes: even, unless one thread has measured "
                                  "slower (a vCPU whose host core is shared).", labels=["thread"])
            for h, v in enumerate(shares):
                g.add_metric([str(h)], v)
            yield g
        if s.get("prefix_caching"):
            yield CounterMetricFamily("remix_prefix_cache_queries", "New sequences that looked up their prompt's prefix.",
                                      value=s["prefix_cache_queries"])
            yield CounterMetricFamily("remix_prefix_cache_hits", "Sequences that took part of their prompt from the "
                                      "prefix cache.", value=s["prefix_cache_hits"])
            yield CounterMetricFamily("remix_prefix_cache_tokens", "Prompt tokens taken from the prefix cache instead of "
                                      "computed.", value=s["prefix_cache_tokens"])


class RoutingCollector:
    """remix_lora_selections_total and the effective number of LoRAs per layer over a recent window."""

    def __init__(self, engine, window_s: float):
        self.engine, self.window_s = engine, window_s
        self.history: deque[tuple[float, dict]] = deque()
        self.lock = threading.Lock()

    def collect(self):
        counts = self.engine.registry.selection_counts()  # {adapter: {module: [per LoRA]}}
        now = time.monotonic()
        selections = CounterMetricFamily(
            "remix_lora_selections", "Tokens that selected each LoRA, per adapter, layer and module.",
            labels=["adapter", "layer", "module", "lora"])
        for adapter, modules in counts.items():
            for module, per_lora in modules.items():
                layer, short = split_module(module)
                for i, c in enumerate(per_lora):
                    selections.add_metric([adapter, layer, short, str(i)], c)
        yield selections
        with self.lock:
            self.history.append((now, counts))
            while len(self.history) > 1 and now - self.history[1][0] >= self.window_s:
                self.history.popleft()
            base_time, base = self.history[0]
        effective = GaugeMetricFamily(
            "remix_effective_loras",
            "exp(entropy) of the LoRA selection shares per layer (mean over its modules) since the oldest scrape "
            "in the window (k..n when healthy; ~k when the router always picks the same LoRAs).",
            labels=["adapter", "layer"])
        for adapter, modules in counts.items():
            per_layer: dict[str, list[float]] = {}
            for module, per_lora in modules.items():
                old = base.get(adapter, {}).get(module) if base is not counts else None
                delta = [c - o for c, o in zip(per_lora, old)] if old and base_time < now else per_lora
                if min(delta, default=0) < 0:  # counted afresh since (another adapter loaded under this name)
                    delta = per_lora
                if sum(delta) > 0:
                    per_layer.setdefault(split_module(module)[0], []).append(selection_entropy(torch.tensor(delta))[1])
            for layer, values in per_layer.items():
                effective.add_metric([adapter, layer], sum(values) / len(values))
        yield effective
