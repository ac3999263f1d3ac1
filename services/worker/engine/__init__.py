"""The generation core: models loaded with transformers, served by engines with continuous
batching, behind the Engine interface (interface.py). Free of gRPC: the worker's servicer converts
protobuf to these types (services/worker/convert.py) and maps their errors to status codes."""
