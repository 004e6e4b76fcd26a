"""The device service: the agent's main loop, systemd integration and telemetry."""
