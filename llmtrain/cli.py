"""What every script does first."""

from __future__ import annotations

import logging
import os

QUIET = ("httpx", "urllib3", "datasets", "filelock", "fsspec")


def setup_logging() -> None:
    """Timestamped INFO logs to stderr (under torchrun from rank 0; the other ranks' warnings and errors only);
    the chatty libraries at WARNING."""
    level = logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
