"""Starting a run: the launcher's processes, one-line errors, the output folder and the run's log.

Every entry point (main.py, main_moe.py, the SimMIM scripts, validate.py) goes through :func:`run`, which turns
the command line into a frozen config, joins the process group the launcher (torchrun, srun, none) set up, and
calls the entry's own ``entry(config, env)``.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Callable

from config import scale_learning_rates
from logger import create_logger
from utils.cuda import configure_cuda
from utils.distributed import DistEnv, cleanup, init_distributed
from utils.errors import UserError
from utils.host_memory import keep_freed_memory
from utils.peers import PeerWatch, failure_priority
from utils.rng import seed_process


def prepare_output(config) -> None:
    """Create the output folder, or fail with one line if it cannot be written."""
    try:
        os.makedirs(config.OUTPUT, exist_ok=True)
        probe = os.path.join(config.OUTPUT, f'.write_test_{os.getpid()}')
        with open(probe, 'w'):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"output folder {config.OUTPUT} is not writable: {e.strerror}") from None


def open_run_log(config, env: DistEnv):
    """The run's logger; rank 0 also writes the full config to OUTPUT/config.json."""
    logger = create_logger(config.OUTPUT, dist_rank=env.rank, name=f"{config.MODEL.NAME}")
    if env.is_main:
        with open(os.path.join(config.OUTPUT, "config.json"), "w") as f:
            f.write(config.dump())  # YAML text under the official file name
        logger.info(f"Full config saved to {os.path.join(config.OUTPUT, 'config.json')}")
    logger.info(config.dump())
    logger.info(json.dumps({'rank': env.rank, 'world_size': env.world_size, 'device': str(env.device)}))
    return logger


def run(argv: list[str] | None, parse: Callable, entry: Callable) -> int:
    """A script's whole run: ``parse(argv) -> (args, config)``, then ``entry(config, env)`` in this process's
    place of the job. User mistakes become one line on stderr and exit status 2, without a traceback; with
    several processes, a failure on one rank ends the others within seconds, with its message (utils/peers.py).
    """
    env = watch = None
    try:
        _, config = parse(argv)
        env = init_distributed()
        if env.distributed and config.PEER_TIMEOUT > 0:
            watch = PeerWatch(env.rank, timeout=config.PEER_TIMEOUT)
        if env.device.type == 'cpu' and config.HOST_MEMORY_CACHE:  # on a GPU node it would only grow host memory
            keep_freed_memory()
        if env.device.type == 'cuda':
            configure_cuda(config.ALLOW_TF32)
        config = scale_learning_rates(config, env.world_size)
        seed_process(config.SEED + env.rank)
        prepare_output(config)
        entry(config, env)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        if watch is not None:
            watch.report(str(e), status=2, priority=failure_priority(e))
        return 2
    except BaseException as e:
        if watch is not None:
            watch.report(f"{type(e).__name__}: {e}".splitlines()[0], status=1, priority=failure_priority(e))
        raise
    else:
        if watch is not None:
            watch.stop()
    finally:
        if env is not None:
            cleanup()
    return 0
