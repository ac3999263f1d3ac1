"""The worker's engines in a process of their own, so the model never shares a GIL or a core's
time slices with the gRPC server.

Why: on a CPU the decode step is torch's OpenMP threads working in lock step. In the gRPC
process, every token a stream sends wakes the event loop and gRPC's threads, which take the GIL
from the engine thread and time slices from OpenMP threads at their barriers; with two torch
threads that lost more than the second core gave (bench/README.md). In a process of its own the
engine uses every core, and the serving process only relays requests and chunks. vLLM splits its
API server from its engine core for the same reason.

Shape: the worker holds one `EngineProcessClient` per child process (client.py: the process, its
pipe and a thread that reads it) and a `ReplicaPool` per model (replicas.py), which implements
the `Engine` interface by sending calls to the model's replica in each child, sized by sizing.py.
The child (`EngineChildHost`, host.py) runs the same engines the worker would otherwise run
in-process, answers calls from its own event loop, and sends back what they produce. Both sides
speak the typed messages of pipe.py. Generation is cancelled by a message; a request leaves the
batch at the next step.

Failure: when a child dies, every call in flight fails with UnavailableError (the gateway retries
a request elsewhere before its first token), new calls are refused, and `failure()` completes so
the worker shuts down and exits non-zero for its supervisor to restart it. When the worker dies,
the child reads end-of-file on the pipe and exits.
"""
