"""An IsoFLOP multirun as a user runs it: `scripts/train.py -m experiment=isoflop_cpu ...`, then its readers."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from llmtrain.config import to_dataclass
from llmtrain.measure.flops import forward_flops
from llmtrain.measure.scaling import load_runs
from llmtrain.measure.shapes import lengths_for, model_config_for
from tests.conftest import ROOT, tiny_overrides

BUDGET = 3e8


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_isoflop_multirun_gives_one_run_per_point(corpus_file, cache_dir, tmp_path, capsys):
    shrink = [
        o
        for o in tiny_overrides(corpus_file, cache_dir, tmp_path)
        if not o.startswith(("run_name=", "model.d_model="))
    ]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "-m", "experiment=isoflop_cpu", *shrink,
         "model.d_model=16,32,48", f"trainer.max_flops={BUDGET}", "trainer.num_threads=1"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = sorted(tmp_path.glob("isoflop-decoder-*"))
    assert [d.name for d in run_dirs] == [f"isoflop-decoder-d{d}-l2-c300000000.0" for d in (16, 32, 48)]
    assert (
        tmp_path / "multirun.yaml"
    ).is_file()  # Hydra's sweep record lands beside the runs, not in the repo

    points, skipped = load_runs(run_dirs)
    assert not skipped and [p.budget for p in points] == [BUDGET] * 3
    for run_dir, point in zip(run_dirs, points):
        cfg = to_dataclass(json.loads((run_dir / "config.json").read_text()))
        lengths = lengths_for(cfg)
        step_flops = forward_flops(model_config_for(cfg), lengths).training * cfg.trainer.micro_batch_size
        spent = point.n_tokens / (lengths.corpus * cfg.trainer.micro_batch_size) * step_flops
        assert BUDGET - step_flops < spent <= BUDGET  # the trainer spends the budget, to the last whole step
    assert points[0].n_params < points[1].n_params < points[2].n_params
    assert points[0].n_tokens > points[2].n_tokens  # a bigger model sees fewer tokens for the same FLOPs

    # one budget: the fit says what is missing; the curves plot
    fit_script = load_script("fit_scaling")
    assert fit_script.main([str(tmp_path / "isoflop-*"), "--out", str(tmp_path / "fit")]) == 2
    assert "at least 2 budgets" in capsys.readouterr().err
    out = tmp_path / "curves.png"
    assert load_script("plot").main([*map(str, run_dirs), "--x", "flops", "--out", str(out)]) == 0
    assert out.stat().st_size > 5000
