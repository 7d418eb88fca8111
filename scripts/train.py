"""Train any llmtrain family: `python scripts/train.py model=encoder trainer.max_steps=200`.

Under torchrun the same command runs on every rank (the distributed layer slots in beside the trainer).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.errors import record

from llmtrain.cli import setup_logging
from llmtrain.config import ConfigError, register_configs, to_dataclass, validate
from llmtrain.data import DataError
from llmtrain.distributed.env import destroy
from llmtrain.models import ModelConfigError
from llmtrain.training.guards import NonFiniteError, StopRequest

register_configs()


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


SWEEP_RUNS: dict[Path, int] = {}
"""Run directory -> the job of this multirun (`-m`; Hydra's launcher runs its jobs in this process) that has it."""


def check_hydra_use(dict_cfg: DictConfig) -> None:
    """Hydra settings that would not do what they say: llmtrain writes output_dir/run_name, not Hydra's run
    directory, and every job of a sweep must have a run directory of its own (a job that shared one resumed
    the earlier job's run: it trained nothing, or continued its weights, under its own settings)."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    run_dir = Path(dict_cfg.output_dir) / dict_cfg.run_name
    if hydra_cfg.mode == RunMode.RUN and hydra_cfg.run.dir != ".":
        raise ConfigError(
            f"hydra.run.dir={hydra_cfg.run.dir} is not used: llmtrain writes each run to output_dir/run_name "
            f"(here {run_dir}); set output_dir= and run_name= instead"
        )
    if in_sweep():
        job = hydra_cfg.job.num
        earlier = SWEEP_RUNS.setdefault(run_dir.resolve(), job)
        if earlier != job:
            raise ConfigError(
                f"job #{job} of this sweep would write {run_dir}, as job #{earlier} did (it would resume that "
                "run instead of training its own settings): the swept settings must reach run_name, e.g. "
                "run_name=lr${optim.lr} (experiment=isoflop_cpu names its runs by the swept sizes)"
            )


STOP_SWEEP = -1
"""train()'s code for a run stopped by a signal inside a sweep: the process exits 0 before the next job."""


class SweepStopped(BaseException):
    """Ends a sweep after a signal: past Hydra's launcher and @record, which take SystemExit(0) as a job's end."""


def train(dict_cfg: DictConfig) -> int:
    """Train; an expected failure prints one `error:` line and gives the exit code."""
    try:
        check_hydra_use(dict_cfg)
        resolved = OmegaConf.to_container(dict_cfg, resolve=True)
        cfg = to_dataclass(dict_cfg)
        validate(cfg)
        from llmtrain.training.trainer import Trainer  # heavy imports after the config is known to be sound

        # the signal handlers before the Trainer: a signal while rank 0 tokenizes or the first evaluation runs
        # stops the run at its first step (SIGUSR1's default action killed the rank)
        stop = StopRequest(cfg.trainer.time_limit_minutes)
        try:
            Trainer(cfg, resolved_config=resolved).fit(stop)
        finally:
            stop.restore()
        if stop.by_signal and in_sweep():
            # a scheduler's signal is for the whole job: the sweep's next runs would start, to be killed
            print(
                f"a signal ({stop.reason}) stopped job #{HydraConfig.get().job.num} of this sweep after its "
                "checkpoint; the jobs after it are not started (the same command resumes the sweep)",
                file=sys.stderr,
            )
            return STOP_SWEEP
    except (ConfigError, ModelConfigError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:  # the guard's verdict, naming the step (trainer.nonfinite)
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. a full disk: a save that fails leaves only its .partial folder
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside the training loop (which checkpoints and exits 0 on SIGINT)
        print("error: interrupted before training started or while it finished", file=sys.stderr)
        return 130
    return 0


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
@record  # inside Hydra, which turns an exception into sys.exit(1) before an outer @record could write it
def main(dict_cfg: DictConfig) -> None:
    setup_logging()
    try:
        code = train(dict_cfg)
    finally:
        # after train() has returned, so an error's traceback no longer holds the trainer and its process groups:
        # a group still alive at interpreter exit can abort it (see llmtrain.distributed.env.destroy)
        destroy()
    if code == STOP_SWEEP:
        raise SweepStopped
    if code:
        sys.exit(code)


if __name__ == "__main__":
    try:
        main()
    except SweepStopped:
        sys.exit(0)
