"""What every script does first: logging, and the argparse types of the scripts' flags (a bad value stops
argparse at once with `error: argument --FLAG: ...`, exit status 2, naming what is allowed)."""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

QUIET = ("httpx", "urllib3", "datasets", "filelock", "fsspec")


def setup_logging() -> None:
    """Timestamped INFO logs to stderr (under torchrun from rank 0; the other ranks' warnings and errors only);
    the chatty libraries at WARNING."""
    level = logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)


def number(
    kind: type[int] | type[float],
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    meaning: str = "",
) -> Callable[[str], int | float]:
    """An argparse type: a finite `kind` >= minimum (or > above) and <= maximum; `meaning` explains them."""
    bounds = [
        f"{op} {bound}" for op, bound in ((">=", minimum), (">", above), ("<=", maximum)) if bound is not None
    ]
    allowed = " and ".join(bounds) + meaning

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
        low_ok = (minimum is None or value >= minimum) and (above is None or value > above)
        if not (math.isfinite(value) and low_ok and (maximum is None or value <= maximum)):
            raise argparse.ArgumentTypeError(f"{text} is not allowed; allowed: {allowed}")
        return value

    return parse


def device(text: str) -> str:
    """An argparse type: a torch device this machine has (cpu, cuda, cuda:N, mps)."""
    try:
        chosen = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device; allowed: cpu, cuda, cuda:N, mps"
        ) from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device; use --device cpu")
        if chosen.index is not None and chosen.index >= count:
            devices = ", ".join(f"cuda:{i}" for i in range(count))
            raise argparse.ArgumentTypeError(f"{text}: no such device here; allowed: cuda, {devices}")
    elif chosen.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available here; use --device cpu")
    elif chosen.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r} is not supported; allowed: cpu, cuda, cuda:N, mps")
    return text


def output_file(text: str) -> Path:
    """An argparse type: a file to write, in a folder that exists (checked before the work, not after)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; pass a file name")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: the folder {path.parent} does not exist; create it first")
    return path
