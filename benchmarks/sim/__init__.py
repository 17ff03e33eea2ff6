"""Trace-driven cluster simulator: the project's router, placement planner, admission
controller and adapter slots at 8-256 replicas, in simulated time (see report.py)."""
