"""Worker -> client: the job stream contract (events.py), read by the API process
through one multiplexed XREAD (mux.py) and relayed as Server-Sent Events (sse.py)."""
