"""The serving engine (no HTTP here): continuous batching of ReMix adapters over one frozen base."""

from server.engine.engine import (ADAPTER_GONE, ENGINE_STOPPED, INTERNAL_ERROR, AdaptersBusy, Engine, EngineConfig,
                                  EngineError, EngineStopped, QueueFull, ShuttingDown, UnknownAdapter, collect)
from server.engine.sampler import SamplingParams
from server.engine.sequence import Event, GenerationRequest

__all__ = ["ADAPTER_GONE", "ENGINE_STOPPED", "INTERNAL_ERROR", "AdaptersBusy", "Engine", "EngineConfig", "EngineError", "EngineStopped",
           "Event", "GenerationRequest", "QueueFull", "SamplingParams", "ShuttingDown", "UnknownAdapter", "collect"]
