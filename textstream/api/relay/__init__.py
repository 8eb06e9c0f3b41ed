"""The stream back out: a job's Redis Stream read (job_events.py, through one
multiplexed XREAD per Redis master: mux.py, placement.py) and relayed to the client
as Server-Sent Events (sse.py), reasoning split from the answer (thinking.py)."""
