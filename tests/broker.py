"""The tests' broker is the package's own local mosquitto launcher."""

from edge_agent.devtools.localbroker import Mosquitto, free_port

__all__ = ["Mosquitto", "free_port"]
