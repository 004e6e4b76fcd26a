"""A site's mosquitto bridged to the fleet's broker: the configuration ``edge-agent
fleet-bridge`` writes (docs/fleet.md, "Site topology").

The devices of a site talk to a broker on the site; one MQTT v5 bridge connection carries
upward what the cloud needs (hard cases, batches, telemetry, status, model events) and downward
what the devices need (verdicts, model commands and chunks), with QoS 1 both ways. MQTT v5
keeps the properties the protocol relies on (ResponseTopic, CorrelationData, the idempotency
key) across the bridge. A persistent bridge session (``cleansession false``) and a local
queue keep what the site sent while the uplink was down.

The site broker must not set ``max_inflight_messages 0`` (unlimited): an MQTT v5 bridge
announces it upstream as Receive Maximum 0, which is not a valid value, and the upstream
broker drops the connection as a protocol error. Any value from 1 works (20 is mosquitto's
default).
"""

from __future__ import annotations

import re

from edge_agent.errors import ConfigError

#: What goes up from the devices (topic suffix under ``<prefix>/<device>/``).
UP = ("hard", "batch", "telemetry", "status", "model")
#: What comes down to them.
DOWN = ("verdict/#", "cmd/model/#")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def site_bridge_conf(
    site: str,
    upstream: str,
    prefix: str = "edge",
    *,
    cafile: str = "",
    certfile: str = "",
    keyfile: str = "",
) -> str:
    """The lines to add to the site's ``mosquitto.conf`` (``upstream``: ``host:port``)."""
    if not _NAME.match(site):
        raise ConfigError(f"site name {site!r}: use 1-64 of A-Z a-z 0-9 _ . -")
    host, _, port = upstream.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"upstream {upstream!r}: expected host:port")
    if any(c in prefix for c in "+#") or not prefix:
        raise ConfigError(f"topic prefix {prefix!r} must be a plain topic")
    lines = [
        f"# edge-agent: site {site} bridged to the fleet's broker {upstream}",
        f"connection edge-site-{site}",
        f"address {host}:{port}",
        "bridge_protocol_version mqttv50",
        f"remote_clientid edge-site-{site}",
        # Keep the bridge's session (and what it queued) across reconnects of the uplink.
        "cleansession false",
        "local_cleansession false",
        "restart_timeout 1 30",
        # Retained device status and the last will travel as they are.
        "bridge_attempt_unsubscribe false",
        "try_private false",  # the private bridge flag is not valid in an MQTT v5 CONNECT
        "notifications true",
        f"notification_topic {prefix}/site/{site}/bridge",
    ]
    if cafile:
        lines.append(f"bridge_cafile {cafile}")
    if certfile:
        lines += [f"bridge_certfile {certfile}", f"bridge_keyfile {keyfile}"]
    lines += [f"topic {prefix}/+/{suffix} out 1" for suffix in UP]
    lines += [f"topic {prefix}/+/{suffix} in 1" for suffix in DOWN]
    return "\n".join(lines) + "\n"
