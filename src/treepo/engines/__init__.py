"""Generators behind one protocol (`base.Engine`): the embedded transformers engine, and the server engine
(`server.ServerEngine`) for OpenAI-compatible completions servers."""

from .base import Engine, EngineStats, SegmentOutput, SegmentRequest

__all__ = ["Engine", "EngineStats", "SegmentOutput", "SegmentRequest"]
