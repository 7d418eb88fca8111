"""Train any llmtrain family: `python scripts/train.py model=encoder trainer.max_steps=200`.

Under torchrun the same command runs on every rank (the distributed layer slots in beside the trainer).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.errors import record

from llmtrain.cli import setup_logging
from llmtrain.config import ConfigError, register_configs, to_dataclass, validate
from llmtrain.data import DataError
from llmtrain.distributed.env import destroy
from llmtrain.models import ModelConfigError
from llmtrain.training.guards import NonFiniteError

register_configs()


def train(dict_cfg: DictConfig) -> int:
    """Train; an expected failure prints one `error:` line and gives the exit code."""
    try:
        resolved = OmegaConf.to_container(dict_cfg, resolve=True)
        cfg = to_dataclass(dict_cfg)
        validate(cfg)
        from llmtrain.training.trainer import Trainer  # heavy imports after the config is known to be sound

        Trainer(cfg, resolved_config=resolved).fit()
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
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
