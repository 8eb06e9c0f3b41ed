"""Start textstream worker processes: `python runner.py [MODEL] --workers N --concurrency K`.

The same command as `textstream worker` (same options, same defaults; see
`--help`): each process loads the model once and runs K batch slots. Ctrl-C or
SIGTERM stops them cleanly (in-flight jobs get WORKER_SHUTDOWN_GRACE seconds to
finish); `--gpus 0,1` starts one process per GPU, each seeing only its own.
"""

from __future__ import annotations

import sys

from textstream.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["worker", *sys.argv[1:]]))
