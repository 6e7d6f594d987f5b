"""Logging for training runs: the official console and file format, plus a TensorBoard writer.

Rank 0 prints to stdout with a coloured prefix (``[time name] (file line): LEVEL message``); every
rank appends plain text to ``<output_dir>/log_rank{rank}.txt``. TensorBoard event files go to
``<output_dir>/tensorboard`` and are written by rank 0 only.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from termcolor import colored

_PLAIN_FORMAT = '[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s'
_DATE_FORMAT = '%Y-%m-%d %H:%M:%S'
TB_SUBDIR = 'tensorboard'
_OURS = '_swin_logger_handler'  # marks handlers this module added, so a second call replaces them


def _use_colour(stream) -> bool:
    """Colour only on a terminal (so redirected logs stay free of escape codes); NO_COLOR / FORCE_COLOR win."""
    if os.environ.get('NO_COLOR'):
        return False
    if os.environ.get('FORCE_COLOR'):
        return True
    return hasattr(stream, 'isatty') and stream.isatty()


def _console_format(stream) -> str:
    if not _use_colour(stream):
        return _PLAIN_FORMAT
    # Decided here rather than by termcolor, which caches its terminal check for the whole process.
    return (colored('[%(asctime)s %(name)s]', 'green', force_color=True)
            + ' ' + colored('(%(filename)s %(lineno)d)', 'yellow', force_color=True)
            + ': %(levelname)s %(message)s')


def _mark(handler: logging.Handler) -> logging.Handler:
    setattr(handler, _OURS, True)
    return handler


def create_logger(output_dir: str, dist_rank: int = 0, name: str = '') -> logging.Logger:
    """Console (rank 0, coloured) and per-rank file logging; calling it again replaces, never duplicates."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    for handler in [h for h in logger.handlers if getattr(h, _OURS, False)]:
        logger.removeHandler(handler)
        handler.close()

    if dist_rank == 0:
        console = _mark(logging.StreamHandler(sys.stdout))
        console.setLevel(logging.DEBUG)
        console.setFormatter(logging.Formatter(_console_format(sys.stdout), datefmt=_DATE_FORMAT))
        logger.addHandler(console)

    os.makedirs(output_dir, exist_ok=True)
    file_handler = _mark(logging.FileHandler(os.path.join(output_dir, f'log_rank{dist_rank}.txt'), mode='a'))
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(logging.Formatter(_PLAIN_FORMAT, datefmt=_DATE_FORMAT))
    logger.addHandler(file_handler)
    _route_library_logs(logger.handlers)
    return logger


# Our packages log through logging.getLogger(__name__) (e.g. the data loader naming unreadable
# images); their records go to the run's console and files too.
_LIBRARY_LOGGERS = ('data', 'models', 'utils', 'optimizer', 'lr_scheduler', 'engine')


def _route_library_logs(handlers: list) -> None:
    for name in _LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        for handler in [h for h in library.handlers if getattr(h, _OURS, False)]:
            library.removeHandler(handler)
        for handler in handlers:
            library.addHandler(handler)
        library.setLevel(logging.INFO)
        library.propagate = False


def create_tb_writer(output_dir: str, dist_rank: int):
    """A TensorBoard ``SummaryWriter`` on ``<output_dir>/tensorboard`` for rank 0; None elsewhere.

    Returns None (with a warning) when the tensorboard package is missing: training does not need it.
    """
    if dist_rank != 0:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        warnings.warn(f"TensorBoard logging disabled: {e}")
        return None
    return SummaryWriter(log_dir=os.path.join(output_dir, TB_SUBDIR))

