"""A distributed process ends cleanly: no gloo thread outlives the process group into interpreter exit.

A group's gloo threads that are still alive when the interpreter finalizes can abort the process
("terminate called without an active exception", SIGABRT) after a run that trained and saved correctly.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides
from tests.helpers import TORCH_ENDS_GROUPS, launch, run_on_ranks

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux /proc"),
    pytest.mark.skipif(
        not TORCH_ENDS_GROUPS, reason="torch 2.11 keeps fully_shard's DeviceMesh past destroy()"
    ),
]

# a fresh interpreter, as under torchrun: the optimizer's constructor is the first import of torch._dynamo, and
# ZeRO-1 and FSDP2 (whose DTensor caches keep its mesh) come after the group, as in the trainer
SCRIPT = textwrap.dedent(
    """
    import os
    import torch
    from llmtrain.distributed.env import all_reduce_sum, destroy, init_distributed

    info = init_distributed("cpu")
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = fully_shard(torch.nn.Linear(4, 4))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    other = torch.nn.Linear(4, 4)
    zero = ZeroRedundancyOptimizer(other.parameters(), optimizer_class=torch.optim.AdamW)
    all_reduce_sum(torch.ones(3))
    del model, optimizer, other, zero
    destroy()
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    print(f"rank {info.rank} gloo threads {sum('gloo' in name for name in names)}", flush=True)
    """
)


def test_no_gloo_thread_survives_destroy(tmp_path):
    proc = run_on_ranks(tmp_path, SCRIPT)
    # the ranks' lines may interleave
    counts = sorted(re.findall(r"rank (\d) gloo threads (\d+)", proc.stdout))
    assert counts == [("0", "0"), ("1", "0")], proc.stdout


def test_a_run_that_fails_also_ends_its_groups(corpus_file, cache_dir, tmp_path):
    """The error path: train.py destroys the groups once the error no longer holds the trainer (an exception's
    traceback keeps fit()'s frame, and with it the model, its mesh and the groups, alive)."""
    overrides = tiny_overrides(corpus_file, cache_dir, tmp_path) + [
        "parallel=fsdp",
        "optim.lr=1e25",  # non-finite after the first update: the guard stops the run with rc 1
        "trainer.max_steps=6",
        "trainer.micro_batch_size=4",
        "trainer.num_threads=1",
        "trainer.sample_tokens=0",
    ]
    proc = launch(2, overrides, returncode=1)
    assert "error: non-finite loss" in proc.stderr
