"""Which engine serves a model: `create_engine` plans the load (cheap checks of the path, device
and dtype) and returns the engine that will load it on start.

Kept apart from loading.py, which the engine imports, and light to import: torch and transformers
load with the engine class, when an engine is first made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.worker.engine.interface import Engine
from services.worker.engine.loading import EngineOptions, ModelSpec, plan_load

if TYPE_CHECKING:
    from services.worker.engine.cores import CoreShare


def create_engine(
    spec: ModelSpec, options: EngineOptions, cores: CoreShare | None = None
) -> Engine:
    """Resolve and validate `spec` (cheap); `await engine.start()` loads the model. `cores`:
    the engine process's share of the machine's cores, where replicas share them."""
    from services.worker.engine.hf_engine import HFEngine  # torch and transformers, on first use

    return HFEngine(plan_load(spec, options), options, cores)
