"""edge-agent: score sensor readings on the device, send only the hard cases to the cloud."""

__version__ = "0.1.0"
