"""chatfleet: an LLM serving platform built from gRPC microservices."""
