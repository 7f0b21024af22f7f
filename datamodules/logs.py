"""Logging from DataModules on the first process only.

Every DDP process runs ``setup`` on the same data and would repeat the same summaries and
warnings; they are logged where Lightning's rank is 0 (``rank_zero_only.rank``, set from the
launcher's environment and by the Trainer). Errors still raise on every process.
"""

from __future__ import annotations

import logging

from lightning.pytorch.utilities.rank_zero import rank_zero_only


def log_rank_zero(logger: logging.Logger, level: int, msg: str, *args: object) -> None:
    """``logger.log(level, msg, *args)`` on the process of rank 0 only."""
    if getattr(rank_zero_only, "rank", 0) == 0:
        logger.log(level, msg, *args)
