"""`chatfleet test-message`: one prompt to a model through the controller, or to one worker."""

from __future__ import annotations

import os
import sys
import uuid

import grpc

from chatfleet.v1 import controller_pb2, controller_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.cli.main import new_parser, run
from services.common.fastchat_compat import host_port
from services.common.grpc_server import open_channel
from services.common.security import security_from_environ


async def test_message(
    controller_address: str,
    worker_address: str | None,
    model: str,
    message: str,
    max_tokens: int,
    temperature: float,
    timeout: float,
) -> int:
    # The token and TLS settings the services use (CHATFLEET_GRPC_TOKEN, CHATFLEET_TLS_*).
    security = security_from_environ(os.environ)
    try:
        if worker_address is None:
            async with open_channel(controller_address, security) as channel:
                controller = controller_pb2_grpc.ControllerServiceStub(channel)
                listed = await controller.ListModels(
                    controller_pb2.ListModelsRequest(), timeout=timeout
                )
                print(f"Models: {[m.name for m in listed.models]}")
                chosen = await controller.SelectWorker(
                    controller_pb2.SelectWorkerRequest(model=model), timeout=timeout
                )
                worker_address = chosen.address
        print(f"worker: {worker_address}")
        async with open_channel(worker_address, security) as channel:
            worker = worker_pb2_grpc.WorkerServiceStub(channel)
            request = worker_pb2.GenerateRequest(
                request_id=f"test-message-{uuid.uuid4().hex[:12]}",
                model=model,
                chat=worker_pb2.ChatMessages(
                    messages=[worker_pb2.ChatMessage(role="user", content=message)]
                ),
                sampling=worker_pb2.SamplingParams(temperature=temperature),
                stopping=worker_pb2.StoppingCriteria(max_tokens=max_tokens),
            )
            print(f"USER: {message}\nASSISTANT: ", end="", flush=True)
            usage = None
            async for reply in worker.Generate(request, timeout=timeout):
                print(reply.text, end="", flush=True)
                if reply.finish_reason:
                    usage = reply.usage
            print()
            if usage is not None:
                print(
                    f"[{usage.prompt_tokens} prompt tokens, "
                    f"{usage.completion_tokens} completion tokens]"
                )
        return 0
    except grpc.aio.AioRpcError as error:
        print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser, flags = new_parser(
        "test-message", "Send one chat message to a model and stream the answer (gRPC)."
    )
    flags.add("--controller-address", default="127.0.0.1:21001", help="controller host:port")
    flags.add(
        "--worker-address",
        default=None,
        help="talk to this worker directly instead of asking the controller for one",
    )
    flags.add(
        "--model-name",
        default="SmolLM2-135M-Instruct",
        help="the model to ask",
        env="CHATFLEET_TEST_MODEL",
    )
    flags.add(
        "--message",
        default="Tell me a story with more than 1000 words.",
        help="the user message",
        env="CHATFLEET_TEST_MESSAGE",
    )
    flags.add("--max-new-tokens", default=64, type=int, help="maximum tokens to generate")
    flags.add("--temperature", default=0.0, type=float, help="sampling temperature (0: greedy)")
    flags.add("--timeout", default=120.0, type=float, help="seconds before giving up")
    ns = parser.parse_args(argv)
    return run(
        test_message(
            # FastChat's test_message takes URLs (http://host:port): gRPC wants host:port.
            host_port(ns.controller_address),
            host_port(ns.worker_address) if ns.worker_address else None,
            ns.model_name,
            ns.message,
            ns.max_new_tokens,
            ns.temperature,
            ns.timeout,
        )
    )
