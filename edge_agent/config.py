"""Settings: one TOML file, overridable by ``EDGE_AGENT_<SECTION>_<KEY>`` variables.

The file is read once at start-up into frozen ``msgspec.Struct`` objects. An
unknown key, in the file or in the environment, is an error that names the key
and where it came from; so is a value of the wrong type or out of range.
Secrets are never values in the file: keys ending in ``_file`` name a file (or
a systemd credential) that is read only when the secret is needed.

Every key and its default is listed in docs/config.md.
"""

from __future__ import annotations

import math
import os
import re
import socket
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from edge_agent.errors import ConfigError
from edge_agent.util.files import UnreadableFile, read_toml

ENV_PREFIX = "EDGE_AGENT_"
# Variables with this prefix that are not settings (the CLI reads them itself).
_ENV_NOT_SETTINGS = frozenset({"EDGE_AGENT_CONFIG"})

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0.0)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every section: immutable, unknown keys rejected."""


class DeviceSettings(_Section, frozen=True):
    id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = ""
    state_dir: str = "/var/lib/edge-agent"


class ModelSettings(_Section, frozen=True):
    pack: str = ""
    packs_dir: str = ""
    #: Model store for large fetched files (GGUF); empty: $XDG_CACHE_HOME/edge-agent/models
    #: or ~/.cache/edge-agent/models (see modelpack.default_store_dir).
    store_dir: str = ""
    intra_op_threads: PositiveInt = 1
    inter_op_threads: PositiveInt = 1
    max_batch: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 64


class InputSettings(_Section, frozen=True):
    max_line_bytes: Annotated[int, msgspec.Meta(ge=64, le=64 * 1024 * 1024)] = 1024 * 1024
    max_frame_bytes: Annotated[int, msgspec.Meta(ge=16, le=64 * 1024 * 1024)] = 64 * 1024


class _BrokerSecurity(_Section, frozen=True):
    """TLS and credentials for a broker connection (off by default); the password is read
    from ``password_file`` at connect time."""

    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    username: str = ""
    password_file: str = ""


class SourceSettings(_BrokerSecurity, frozen=True):
    """``[source]``; for ``kind = "mqtt"`` the TLS and credential keys are the source broker's."""

    kind: Literal["jsonl", "replay", "udp", "unix", "mqtt"] = "jsonl"
    path: str = "-"
    format: Literal["jsonl", "frames"] = "jsonl"  #: frames: binary frames (docs/frames.md)
    samples: bool = False
    rate_hz: NonNegFloat = 0.0
    loops: Annotated[int, msgspec.Meta(ge=0)] = 1
    noise: NonNegFloat = 0.0
    seed: int = 0
    #: replay: a simulated faulty sensor: channel index (-1: none) whose values become
    #: value x shift_gain + shift_offset, from the shift_after-th replayed reading on.
    shift_channel: Annotated[int, msgspec.Meta(ge=-1)] = -1
    shift_offset: float = 0.0
    shift_gain: float = 1.0
    shift_after: Annotated[int, msgspec.Meta(ge=0)] = 0
    host: str = "127.0.0.1"
    port: Port = 1883
    max_wait_ms: NonNegFloat = 2.0
    socket_mode: Annotated[int, msgspec.Meta(ge=0, le=0o777)] = 0o660


class MqttSettings(_BrokerSecurity, frozen=True):
    host: str = "127.0.0.1"
    port: Port = 1883
    topic_prefix: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")] = (
        "edge"
    )
    keepalive_s: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 30


class OutboxSettings(_Section, frozen=True):
    hard_sync: Literal["full", "normal"] = "full"
    max_total_bytes: Annotated[int, msgspec.Meta(ge=64 * 1024)] = 64 * 1024 * 1024
    urgent_max_rows: PositiveInt = 10_000
    urgent_max_bytes: PositiveInt = 32 * 1024 * 1024
    urgent_ttl_s: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    batch_max_rows: PositiveInt = 100_000
    batch_max_bytes: PositiveInt = 48 * 1024 * 1024
    batch_ttl_s: Annotated[float, msgspec.Meta(gt=0)] = 86400.0
    telemetry_max_rows: PositiveInt = 10_000
    telemetry_max_bytes: PositiveInt = 8 * 1024 * 1024
    telemetry_ttl_s: Annotated[float, msgspec.Meta(gt=0)] = 3600.0


class LinkSettings(_Section, frozen=True):
    inflight_window: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 64
    submit_queue: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    reconnect_min_s: Annotated[float, msgspec.Meta(gt=0)] = 0.2
    reconnect_max_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    retry_refused_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    retry_no_subscribers_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    batch_max_cases: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100
    batch_max_wait_s: NonNegFloat = 60.0
    max_payload_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 256 * 1024
    confirm: Literal["verdict", "puback"] = "verdict"
    confirm_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0


class RouterSettings(_Section, frozen=True):
    urgent_below: Fraction = 0.5
    urgent_reasons: list[str] = msgspec.field(
        default_factory=lambda: ["out_of_range", "feature_outlier"]
    )
    urgent_labels: list[str] = msgspec.field(default_factory=list)
    cooldown_s: NonNegFloat = 5.0
    max_urgent_per_minute: Annotated[int, msgspec.Meta(ge=0)] = 60
    deadline_ms: Annotated[float, msgspec.Meta(gt=0)] = 2000.0
    max_pending: PositiveInt = 10_000
    #: Readings whose scorer reason is one of these cannot be fixed by asking the cloud
    #: (the sensor is broken): they are reported as alerts instead of escalated ...
    alert_reasons: list[str] = msgspec.field(default_factory=lambda: ["dead_sensor", "saturated"])
    #: ... unless this is true (then they are escalated as well).
    alert_escalate: bool = False
    #: ``fixed``: escalate what the scorer calls hard; ``learned``: escalate by the cloud's
    #: verdicts so far (see docs/routing.md).
    policy: Literal["fixed", "learned"] = "fixed"
    #: learned: what a wrong local answer costs, in the currency of the cloud prices.
    wrong_answer_cost: NonNegFloat = 0.25
    #: learned: the share of local answers the cloud would have changed stays <= alpha ...
    alpha: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.05
    #: ... with probability >= 1 - delta.
    delta: Annotated[float, msgspec.Meta(gt=0.0, lt=1.0)] = 0.05
    #: learned: share of the readings answered locally still sent, at random, as audits.
    audit_share: Fraction = 0.01
    #: learned: inner edges of the confidence bins.
    learn_bins: list[Fraction] = msgspec.field(
        default_factory=lambda: [0.5, 0.8, 0.9, 0.95, 0.99, 0.999]
    )
    #: learned: scorer reasons that form strata of their own (instead of a confidence bin).
    learn_reasons: list[str] = msgspec.field(
        default_factory=lambda: ["out_of_range", "feature_outlier"]
    )
    #: learned: a disagreement counts as a correction when the verdict's confidence is >= this.
    correction_min_confidence: Fraction = 0.9
    #: learned: every count halves after this many readings.
    learn_half_life: Annotated[float, msgspec.Meta(ge=1.0)] = 20_000.0
    #: learned: forget the estimates when drift is flagged (a promotion always resets them).
    reset_on_drift: bool = True


class TelemetrySettings(_Section, frozen=True):
    interval_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    publish: bool = True
    textfile: str = ""
    http_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    latency_window: Annotated[int, msgspec.Meta(ge=10, le=10_000_000)] = 10_000
    status_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    #: The drift statistics and the psutil probe are taken again at most this often (a
    #: snapshot in between reuses them; its counters are always current).
    slow_interval_s: NonNegFloat = 1.0
    #: 0: a snapshot is published at once while the link is connected and has no telemetry
    #: stored, and stored only when it cannot be sent; 1: every snapshot through the outbox,
    #: deleted at the broker's PUBACK (docs/config.md).
    qos: Literal[0, 1] = 0


class DriftSettings(_Section, frozen=True):
    """Drift monitoring against the pack's ``[drift]`` reference (see docs/drift.md)."""

    enabled: bool = True
    window: Annotated[int, msgspec.Meta(ge=20, le=10_000)] = 200
    psi_threshold: Annotated[float, msgspec.Meta(gt=0.0)] = 0.6
    psi_clear: Annotated[float, msgspec.Meta(gt=0.0)] = 0.5
    epsilon: Annotated[float, msgspec.Meta(gt=0.0, le=0.1)] = 1e-3
    hard_rate_excess: Fraction = 0.0


class RolloutSettings(_Section, frozen=True):
    """Model updates on the device (see docs/models.md). A release's manifest may state its own
    bounds in ``[rollout]``; these are the defaults."""

    enabled: bool = True
    #: Folder of trusted Ed25519 public keys (``*.pub``); empty: ``<state_dir>/trusted-keys``.
    #: ``$CREDENTIALS_DIRECTORY/release-key.pub`` (systemd ``LoadCredential=``) is trusted too.
    trusted_keys_dir: str = ""
    max_file_bytes: Annotated[int, msgspec.Meta(ge=1)] = 512 * 1024 * 1024
    max_files: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 32
    chunk_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1024 * 1024)] = 64 * 1024
    shadow_readings: Annotated[int, msgspec.Meta(ge=1)] = 200
    shadow_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    shadow_queue: Annotated[int, msgspec.Meta(ge=1)] = 1000
    min_agreement: Fraction = 0.95
    max_hard_rate_increase: Fraction = 0.05
    max_p99_ms: Annotated[float, msgspec.Meta(gt=0)] = 50.0
    max_cloud_agreement_drop: Fraction = 0.05
    min_cloud_verdicts: Annotated[int, msgspec.Meta(ge=1)] = 20
    health_readings: Annotated[int, msgspec.Meta(ge=1)] = 200
    health_max_hard_rate_increase: Fraction = 0.2
    health_max_error_rate: Fraction = 0.01


class CloudSettings(_Section, frozen=True):
    pack: str = "basicmotions-cloud"
    group: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = "cloud"
    worker_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{0,64}$")] = ""
    batch_max: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 256
    dedupe_keys: PositiveInt = 100_000
    #: Hard-case messages the broker may hand this worker before it acknowledged them (MQTT v5
    #: Receive Maximum): the rest wait at the broker, so a busy worker is not flooded and a
    #: killed one takes at most this many unanswered messages with it.
    receive_maximum: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 32
    max_payload_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 4 * 1024 * 1024
    price_sync_per_1k_tokens: NonNegFloat = 0.04
    batch_discount: Fraction = 0.5
    tokens_per_reading: PositiveInt = 1500
    ledger_path: str = ""
    #: ``normal``: a recorded charge survives the worker's crash; ``full``: also a power cut
    #: (one fsync per transaction).
    ledger_sync: Literal["normal", "full"] = "normal"
    #: How long the ledger's database remembers an answered case (longer than a device keeps
    #: one in its outbox: ``outbox.batch_ttl_s``), so that a re-sent copy is not charged again.
    answers_keep_s: Annotated[float, msgspec.Meta(gt=0)] = 172800.0
    #: ``pack``: score with ``cloud.pack``'s own backend; ``endpoint``: ask the OpenAI-compatible
    #: endpoint of ``[endpoint]``, with ``cloud.pack`` giving the labels, input shape and prompt.
    backend: Literal["pack", "endpoint"] = "pack"
    #: Serve the worker's Prometheus metrics on 127.0.0.1:<port> (0: off).
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    #: Export the highest readings count of each device (one series per device: the all-cloud
    #: counterfactual); turn off for fleets too large for a series per device.
    metrics_devices: bool = True


class EndpointSettings(_Section, frozen=True):
    """The OpenAI-compatible endpoint the cloud tier asks (``cloud.backend = "endpoint"``)."""

    #: Base URL up to and including the API version, e.g. ``https://api.openai.com/v1``.
    base_url: str = ""
    model: str = ""
    #: File (or systemd credential name) holding the API key; empty: no Authorization header.
    api_key_file: str = ""
    api: Literal["chat", "completions"] = "chat"
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    #: Reserved from an urgent case's deadline for the verdict's way back to the device.
    deadline_margin_ms: NonNegFloat = 50.0
    #: Deadline of one request for a batch case (the batch tier is throughput, not latency).
    batch_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    #: Attempts per request, the first included (429, 5xx and connection failures are retried).
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    backoff_min_s: Annotated[float, msgspec.Meta(gt=0)] = 0.05
    backoff_max_s: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    #: A Retry-After longer than this is not waited for: the request fails (``rate_limited``).
    retry_after_max_s: NonNegFloat = 60.0
    #: Requests in flight at once, urgent tier / batch tier.
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=256)] = 4
    batch_concurrency: Annotated[int, msgspec.Meta(ge=1, le=256)] = 2
    #: Client-side token bucket over all requests: refill rate per second (0: no limit), size.
    rate_per_s: NonNegFloat = 10.0
    burst: Annotated[int, msgspec.Meta(ge=1)] = 10
    #: Urgent cases waiting for a free request slot; past it a case is answered "no verdict".
    max_queue: PositiveInt = 256
    #: Batch cases whose request failed are tried again after this long (with jitter) ...
    batch_retry_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    #: ... up to this many tries in all; then the device gets "no verdict" for them.
    batch_max_tries: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    #: Batch cases held for a later try, at most; past it a failed case gets "no verdict".
    max_retry_cases: PositiveInt = 10_000
    price_prompt_per_1k: NonNegFloat = 0.0025
    price_completion_per_1k: NonNegFloat = 0.01
    #: Price of a batch-tier request relative to an urgent one.
    batch_price_factor: Fraction = 0.5


class Settings(_Section, frozen=True):
    device: DeviceSettings = msgspec.field(default_factory=DeviceSettings)
    model: ModelSettings = msgspec.field(default_factory=ModelSettings)
    input: InputSettings = msgspec.field(default_factory=InputSettings)
    source: SourceSettings = msgspec.field(default_factory=SourceSettings)
    mqtt: MqttSettings = msgspec.field(default_factory=MqttSettings)
    outbox: OutboxSettings = msgspec.field(default_factory=OutboxSettings)
    link: LinkSettings = msgspec.field(default_factory=LinkSettings)
    router: RouterSettings = msgspec.field(default_factory=RouterSettings)
    cloud: CloudSettings = msgspec.field(default_factory=CloudSettings)
    endpoint: EndpointSettings = msgspec.field(default_factory=EndpointSettings)
    telemetry: TelemetrySettings = msgspec.field(default_factory=TelemetrySettings)
    drift: DriftSettings = msgspec.field(default_factory=DriftSettings)
    rollout: RolloutSettings = msgspec.field(default_factory=RolloutSettings)

    @property
    def device_id(self) -> str:
        """The configured device id, or the host name (made topic-safe) when unset."""
        if self.device.id:
            return self.device.id
        host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64]
        return host or "device"


_SECTIONS: dict[str, type[_Section]] = {
    name: typing.get_type_hints(Settings)[name] for name in Settings.__struct_fields__
}

_UNKNOWN = re.compile(r"Object contains unknown field `(?P<key>[^`]+)`(?: - at `\$(?P<at>[^`]*)`)?")
_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<at>[^`]*)`)?$")


def _dotted(at: str | None, key: str | None = None) -> str:
    parts = [p for p in (at or "").split(".") if p]
    if key:
        parts.append(key)
    return ".".join(parts) or "(top level)"


def _translate(exc: msgspec.ValidationError, origin: str) -> ConfigError:
    text = str(exc)
    unknown = _UNKNOWN.search(text)
    if unknown:
        key = _dotted(unknown.group("at"), unknown.group("key"))
        hint = ""
        if key.endswith("password"):
            hint = " (secrets are read from files: use mqtt.password_file)"
        return ConfigError(f"{origin}: unknown key '{key}'{hint}")
    match = _AT.match(text)
    if match is None:  # pragma: no cover - the pattern matches any string
        return ConfigError(f"{origin}: {text}")
    return ConfigError(f"{origin}: key '{_dotted(match.group('at'))}': {match.group('msg')}")


def _base_type(tp: Any) -> Any:
    """Strip ``Annotated`` and ``Literal`` down to the Python type an env string must become."""
    if typing.get_origin(tp) is Annotated:
        return _base_type(typing.get_args(tp)[0])
    if typing.get_origin(tp) is list:
        return list
    if typing.get_origin(tp) is Literal:
        return type(typing.get_args(tp)[0])
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return str
    return tp


def _list_item_type(tp: Any) -> Any:
    """The item type of a (possibly ``Annotated``) ``list[...]``; ``str`` when unsure."""
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    args = typing.get_args(tp)
    return args[0] if typing.get_origin(tp) is list and args else str


def _from_env_string(name: str, raw: str, tp: Any) -> Any:
    base = _base_type(tp)
    if base is bool:
        low = raw.strip().lower()
        if low in {"1", "true", "yes", "on"}:
            return True
        if low in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"environment variable {name}={raw!r}: not a valid bool")
    if base is list:
        items = [item.strip() for item in raw.split(",") if item.strip()]
        inner = _list_item_type(tp)
        return [item if inner is str else _from_env_string(name, item, inner) for item in items]
    try:
        if base is int:
            text = raw.strip()
            return int(text, 8) if text.startswith("0") and text.isdigit() else int(text, 0)
        if base is float:
            return float(raw.strip())
    except ValueError as exc:
        raise ConfigError(
            f"environment variable {name}={raw!r}: not a valid {base.__name__}"
        ) from exc
    return raw


def _env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    known: dict[str, tuple[str, str, Any]] = {}
    for section, cls in _SECTIONS.items():
        hints = typing.get_type_hints(cls, include_extras=True)
        for key in cls.__struct_fields__:
            known[f"{ENV_PREFIX}{section}_{key}".upper()] = (section, key, hints[key])
    out: dict[str, dict[str, Any]] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in _ENV_NOT_SETTINGS:
            continue
        if name not in known:
            raise ConfigError(f"environment variable {name}: no such setting (see docs/config.md)")
        section, key, tp = known[name]
        out.setdefault(section, {})[key] = _from_env_string(name, raw, tp)
    return out


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file at ``path`` (optional), apply environment overrides, validate.

    Raises ConfigError naming the file or variable and the key at fault.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        try:
            data = read_toml(path)
        except FileNotFoundError as exc:
            raise ConfigError(f"{origin}: config file not found") from exc
        except UnreadableFile as exc:
            raise ConfigError(f"{origin}: {exc}") from exc
    _reject_non_finite(data, origin, "")
    try:
        msgspec.convert(data, Settings)  # file alone first, so errors name the file
    except msgspec.ValidationError as exc:
        raise _translate(exc, origin) from exc
    overrides = _env_overrides(env)
    for section, values in overrides.items():
        current = data.get(section)
        merged = dict(current) if isinstance(current, dict) else {}
        merged.update(values)
        data[section] = merged
    _reject_non_finite(overrides, "environment (EDGE_AGENT_* variables)", "")
    try:
        return msgspec.convert(data, Settings)
    except msgspec.ValidationError as exc:
        raise _translate(exc, "environment (EDGE_AGENT_* variables)") from exc


def _reject_non_finite(data: Any, origin: str, at: str) -> None:
    """inf and nan are valid TOML (and float() reads them) but no setting means them:
    an infinite TTL, backoff or price would break arithmetic far from the config."""
    if isinstance(data, float) and not math.isfinite(data):
        raise ConfigError(f"{origin}: key '{at}': {data} is not a finite number")
    if isinstance(data, dict):
        for key, value in data.items():
            _reject_non_finite(value, origin, f"{at}.{key}" if at else str(key))
    elif isinstance(data, list):
        for value in data:
            _reject_non_finite(value, origin, at)


def read_secret(path: str) -> str:
    """Read a secret from ``path``.

    A relative path is looked up in ``$CREDENTIALS_DIRECTORY`` first (systemd's
    ``LoadCredential=``), then relative to the working directory. Trailing
    newlines are stripped. The secret itself never appears in an error.
    """
    candidates = []
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and not os.path.isabs(path):
        candidates.append(Path(cred_dir) / path)
    candidates.append(Path(path))
    for candidate in candidates:
        try:
            return candidate.read_text(encoding="utf-8").rstrip("\r\n")
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(f"secret file {candidate}: cannot read: {exc.strerror}") from exc
    raise ConfigError(f"secret file {path}: not found")
