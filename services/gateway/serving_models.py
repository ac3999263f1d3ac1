"""The handlers of GET /health, GET /v1/models and GET /v1/models/{model}: whether the controller
answers, and the models it serves."""

from __future__ import annotations

import time

from services.common.errors import ModelNotFoundError
from services.gateway.clients import Upstream
from services.gateway.http_helpers import RequestContext
from services.gateway.protocol import ModelCard, ModelList


class ModelServing:
    """Health and the model listing; one per app."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    async def health(self) -> bool:
        return await self.upstream.controller.is_serving()

    async def list_models(self, ctx: RequestContext) -> ModelList:
        models = await self.upstream.list_models(deadline=ctx.deadline, metadata=ctx.metadata)
        created = int(time.time())
        names = sorted({model.name for model in models})
        return ModelList(data=[ModelCard(id=name, created=created) for name in names])

    async def retrieve_model(self, name: str, ctx: RequestContext) -> ModelCard:
        for card in (await self.list_models(ctx)).data:
            if card.id == name:
                return card
        raise ModelNotFoundError(f"The model '{name}' does not exist.", param="model")
