"""The worker process: claims jobs from the queue, runs an engine, publishes events.

main.py is one worker process (serve, drain); supervisor.py starts and watches
several; completion.py is the task body; detokenize.py and stops.py turn ids into
the text a client may see.
"""
