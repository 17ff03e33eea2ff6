"""Admission control at the ingress: whether a request may start now, given the engines'
KV capacity and each tenant's share (`controller.py`). Its own room because it is its own
subsystem (the `admission:` config section, its metrics, the cluster simulator runs it
without Serve), below the Serve app that calls it (`deployments/ingress/`, `admission_pools.py`).
"""
