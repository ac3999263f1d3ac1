"""A real WorkerService serving a tiny random Llama (tests/unit/models.py) in-process on port 0,
for tests that need the real engine's checks behind gRPC (context window, fuzzing)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from chatfleet.v1 import worker_pb2_grpc
from services.common.grpc_server import create_server
from services.worker.engine.factory import create_engine
from services.worker.engine.loading import EngineOptions, ModelSpec
from services.worker.main import SERVICE_NAME
from services.worker.servicer import ModelRegistry, WorkerServicer

TINY_MODEL = "tiny"


@dataclass(frozen=True)
class TinyWorker:
    address: str
    context_length: int
    vocab_size: int


@asynccontextmanager
async def tiny_worker(model_dir: Path, *, max_running: int = 4) -> AsyncIterator[TinyWorker]:
    """Serve the model saved in `model_dir` as TINY_MODEL; yields once it is SERVING."""
    engine = create_engine(
        ModelSpec(str(model_dir), (TINY_MODEL,)),
        # One torch thread: a tiny model gains nothing from more, and the cores are shared.
        EngineOptions(threads=1, max_running=max_running, quantization="none"),
    )
    models = ModelRegistry([engine])
    server = create_server("127.0.0.1", 0, [SERVICE_NAME])
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerServicer(models), server.server)
    await server.start()
    try:
        await models.start()
        await server.set_serving(True)
        description = engine.description
        yield TinyWorker(
            address=f"127.0.0.1:{server.port}",
            context_length=description.context_length,
            vocab_size=_vocab_size(model_dir),
        )
    finally:
        await server.server.stop(None)
        await models.stop()


def _vocab_size(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    return int(config["vocab_size"])
