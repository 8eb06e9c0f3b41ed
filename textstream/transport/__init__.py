"""The contract between the two processes: the job stream's format and its Lua
scripts (events.py, scripts.py). The worker writes it (worker/writer.py), the API
reads it (api/relay/); this package imports neither side."""
