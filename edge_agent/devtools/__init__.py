"""Operator tools that a device never runs: the benchmark, the demo, a local mosquitto."""
