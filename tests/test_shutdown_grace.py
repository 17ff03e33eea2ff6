"""Scaling down or replacing a replica must not cut a request the config still allows to
run: Serve's graceful shutdown wait covers `ingress.request_timeout_s` (before: a fixed
30 s, while requests may run 600 s), on the engine replicas and the ingress alike."""

from __future__ import annotations

import pytest

from ruvllm.deployments.app import _ingress_options, _replica_options
from ruvllm.config import AppConfig


@pytest.mark.parametrize("timeout_s", [45, 600, 3600])
def test_the_shutdown_wait_covers_the_request_deadline(timeout_s):
    config = AppConfig.from_args({
        "ingress": {"request_timeout_s": timeout_s},
        "quantized": [{"name": "q", "isq": {"method": "rtn", "bits": 8},
                       "replicas": {"num_replicas": 1}}]})
    engine = _replica_options(config)["graceful_shutdown_timeout_s"]
    dedicated = _replica_options(config, config.quantized[0].replicas,
                                 "ISQ-q")["graceful_shutdown_timeout_s"]
    ingress = _ingress_options(config)["graceful_shutdown_timeout_s"]
    assert engine == dedicated == ingress > timeout_s
    assert ingress <= timeout_s + 30  # and not much more: a stuck replica still goes


def test_the_options_are_serve_deployment_options():
    """Serve accepts them as they are (a misspelt key would fail at deploy time)."""
    from ray import serve

    config = AppConfig.from_args({"ingress": {"request_timeout_s": 120}})
    for options in (_replica_options(config), _ingress_options(config)):
        deployment = serve.deployment(lambda: None).options(**options)
        assert deployment._deployment_config.graceful_shutdown_timeout_s == 130
