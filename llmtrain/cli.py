"""What every script does first."""

from __future__ import annotations

import logging

QUIET = ("httpx", "urllib3", "datasets", "filelock", "fsspec")


def setup_logging() -> None:
    """Timestamped INFO logs to stderr; the chatty libraries at WARNING."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
