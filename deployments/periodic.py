"""A call repeated every period for as long as its task runs, through failures.

The replica's report to the placement controller and the ingress's sync from it both run
like this: a failure (the controller restarting, a timeout) is logged and the call is
tried again next period, so serving never stops on it; cancelling the task stops it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

logger = logging.getLogger("ray.serve")


async def repeat_every(period_s: float, call: Callable[[], Awaitable[object]], what: str) -> None:
    while True:
        try:
            await call()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.warning("%s failed: %r", what, e)
        await asyncio.sleep(period_s)
