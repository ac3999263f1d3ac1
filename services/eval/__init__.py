"""Evaluation of the served models: MT-bench answers through the gateway, graded by an LLM judge."""
