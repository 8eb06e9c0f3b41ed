"""`python -m textstream ...`: the `textstream` command (cli.py), without installing."""

from textstream.cli import main

raise SystemExit(main())
