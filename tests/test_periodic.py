"""repeat_every: the replica's placement report and the ingress's cluster sync keep
running through failures (the controller restarting) and stop only when cancelled."""

import asyncio
import logging

from ruvllm.deployments.periodic import repeat_every


def test_a_failing_call_is_logged_and_retried_until_cancelled(caplog):
    calls = []

    async def call():
        calls.append(len(calls))
        if len(calls) % 2:
            raise RuntimeError("controller restarting")

    async def scenario():
        task = asyncio.create_task(repeat_every(0.001, call, "placement report"))
        while len(calls) < 5:
            await asyncio.sleep(0.001)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return True
        return False

    logger = logging.getLogger("ray.serve")  # Ray may stop it propagating to the root
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="ray.serve"):
            assert asyncio.run(scenario())  # cancelling is the only way out
    finally:
        logger.removeHandler(caplog.handler)
    assert len(calls) >= 5
    failures = [r.getMessage() for r in caplog.records if "placement report failed" in r.getMessage()]
    assert len(failures) >= 2 and "controller restarting" in failures[0]
