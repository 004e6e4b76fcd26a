"""The exception tree of edge-agent.

Every error the package raises on purpose derives from one root, so a caller
can catch ``EdgeAgentError`` and know it is ours. Errors of libraries we call
(ONNX Runtime, SQLite, paho-mqtt, the file system) are translated at the
boundary with ``raise ... from exc`` so the original stays in the traceback::

    EdgeAgentError
    ├── ConfigError             the TOML file or an EDGE_AGENT_* variable is wrong
    ├── ModelError
    │   ├── ModelPackError      a manifest is missing, unreadable or invalid
    │   ├── ModelIntegrityError a model file is missing, has the wrong size or sha256
    │   ├── BackendUnavailable  the backend's runtime is not installed / unknown name
    │   ├── ReleaseError        a signed model release was refused (signature, version, size, name)
    │   │   └── ReleaseFilesError   the bytes on the device do not match the signed statement
    │   ├── FetchError          a pack's store file could not be fetched from its registry package
    │   └── ModelLoadError      the runtime refused the model, or warm-up failed
    ├── ReadingError            one reading was rejected (carries a stable reason code)
    ├── FrameError              a binary reading frame could not be built (``encode_frame``)
    ├── OutboxError             the durable queue could not take or keep a message
    │   └── OutboxFull          a class is full and its policy is to refuse
    ├── LedgerError             the cloud's cost ledger file cannot be opened or written
    ├── LinkError               the MQTT connection failed (refused CONNACK, TLS, auth)
    ├── EndpointError           the cloud tier's HTTP endpoint gave no usable answer (reason code)
    └── BrokerError             a local mosquitto (demo, benchmark) is missing or would not start
"""

from __future__ import annotations


class EdgeAgentError(Exception):
    """Root of every error edge-agent raises on purpose."""


class ConfigError(EdgeAgentError):
    """The configuration file or environment holds an invalid, unknown or mistyped key."""


class ModelError(EdgeAgentError):
    """Base for everything that goes wrong with a model pack or its backend."""


class ModelPackError(ModelError):
    """A model pack's manifest is missing, unreadable or does not validate."""


class ModelIntegrityError(ModelError):
    """A model file is missing or its size or sha256 differs from the manifest."""


class BackendUnavailable(ModelError):
    """The backend named by a pack is unknown or its runtime is not installed."""


class ReleaseError(ModelError):
    """A model release was refused: bad or missing signature, untrusted key, a file that
    fails its sha256 or size, a name with a path in it, or a version lower than the
    committed one. ``release`` is the release id when the statement could be read (the
    device's ``refused`` event carries it), else ``""``."""

    def __init__(self, message: str, *, release: str = "") -> None:
        super().__init__(message)
        self.release = release


class ReleaseFilesError(ReleaseError):
    """A file of a release, as the device holds it, is missing or differs from the signed
    statement (size or sha256). A verdict on that copy of the bytes, not on the release: the
    device forgets it, and the intact files under the same statement are taken later."""


class FetchError(ModelError):
    """A pack's store file could not be fetched (index unreachable, bad wheel, no space)."""


class ModelLoadError(ModelError):
    """The runtime could not load the model, or the warm-up run failed."""


class ReadingError(EdgeAgentError):
    """A reading was rejected before scoring.

    ``code`` is a stable machine-readable reason (see ``readings.REASONS``);
    the message is for people.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class FrameError(EdgeAgentError, ValueError):
    """``wire.frames.encode_frame`` was given values, an id or a timestamp that a frame
    cannot carry (not 2-D, a dimension over 65535, an id over 255 bytes, ...)."""


class OutboxError(EdgeAgentError):
    """The durable outbox could not store, read or delete a message."""


class OutboxFull(OutboxError):
    """A message class is at its bound and its policy is to refuse new messages."""


class LedgerError(EdgeAgentError):
    """The cloud worker's cost ledger (``cloud.ledger_path``) cannot be opened or written."""


class LinkError(EdgeAgentError):
    """The MQTT link could not be established or was refused by the broker."""


class EndpointError(EdgeAgentError):
    """The OpenAI-compatible endpoint of the cloud tier gave no usable answer.

    ``reason`` is a stable code (``endpoint.FAILURES``: ``unreachable``, ``rate_limited``,
    ``server_error``, ``http_401``, ``bad_response``, ``unparseable``, ``deadline``, ...);
    ``retry_after`` is the server's Retry-After in seconds, when it sent one.
    """

    def __init__(self, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


class BrokerError(EdgeAgentError):
    """A local mosquitto for the demo or the benchmark is not installed or would not start."""
