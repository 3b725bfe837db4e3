"""Generators behind one protocol (`base.Engine`): the embedded transformers engine for now."""

from .base import Engine, EngineStats, SegmentOutput, SegmentRequest

__all__ = ["Engine", "EngineStats", "SegmentOutput", "SegmentRequest"]
