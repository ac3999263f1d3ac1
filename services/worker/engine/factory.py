"""Which engine serves a model: `create_engine` plans the load (cheap checks of the path, device
and dtype) and returns the engine that will load it on start.

Kept apart from loading.py, which the engine imports, and light to import: torch and transformers
load with the engine class, when an engine is first made.
"""

from __future__ import annotations

from services.worker.engine.interface import Engine
from services.worker.engine.loading import EngineOptions, ModelSpec, plan_load


def create_engine(spec: ModelSpec, options: EngineOptions) -> Engine:
    """Resolve and validate `spec` (cheap); `await engine.start()` loads the model."""
    from services.worker.engine.hf_engine import HFEngine  # torch and transformers, on first use

    return HFEngine(plan_load(spec, options), options)
