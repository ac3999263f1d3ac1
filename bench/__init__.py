"""chatfleet's serving benchmark (`make bench`): a streaming load generator against the gateway,
vLLM-style latency metrics and in-process HF `generate` baselines."""
