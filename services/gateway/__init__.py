"""The OpenAI-compatible HTTP gateway: FastAPI in front of the controller and the workers."""
