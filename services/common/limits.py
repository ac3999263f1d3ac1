"""Limits and names of the OpenAI-compatible surface that both the gateway and the worker check.

One home for each: the gateway refuses a request with them before any gRPC call, and the worker
checks the same values on its own RPCs (grpcurl and generated clients reach it directly).
"""

from __future__ import annotations

import re

# Most alternatives per position a request may ask for (OpenAI's own limit for top_logprobs).
MAX_TOP_LOGPROBS = 20
# logit_bias values, as OpenAI bounds them.
LOGIT_BIAS_MIN = -100.0
LOGIT_BIAS_MAX = 100.0
# Ids taken from clients are kept only when short and made of characters that are safe in a log
# line, a header and gRPC metadata.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
# Tool (function) names, as OpenAI accepts them.
FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
