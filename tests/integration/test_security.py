"""Fleet security against a real mosquitto: per-device certificates, ACLs bound to the
certificate identity, refused TLS failures with no plaintext fallback, and secrets kept out of
logs and telemetry.

The test CA, the broker's certificate and one client certificate per device are generated here
with ``cryptography``. The broker requires a client certificate, takes its CN as the user name
(``use_identity_as_username``) and as the client id (``use_username_as_clientid``: nobody can
take over another device's session by sending its client id), and an ACL ``pattern`` lets each
device write only ``<prefix>/<its CN>/...`` and read only its own verdicts and commands.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import Settings, load_settings
from edge_agent.delivery.link import Link
from edge_agent.delivery.outbox import Cls
from edge_agent.models.pack import open_pack
from edge_agent.mqtt.session import new_client
from edge_agent.scoring.scorer import Scorer
from edge_agent.service.agent import Agent
from edge_agent.service.wiring import open_outbox
from edge_agent.wire.messages import Topics
from tests.broker import Mosquitto
from tests.conftest import make_fake_pack

pytestmark = pytest.mark.integration

TIMEOUT = 10.0


# -- a test PKI --------------------------------------------------------------------------


@dataclass
class Issued:
    cert: Path
    key: Path


class TestCA:
    """A CA that issues server and device certificates into ``folder``."""

    __test__ = False  # not a pytest class

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.path = folder / f"{name}.crt"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        cn: str,
        *,
        server_names: tuple[str, ...] = (),
        expired: bool = False,
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        if expired:
            start, end = now - dt.timedelta(days=10), now - dt.timedelta(days=1)
        else:
            start, end = now - dt.timedelta(days=1), now + dt.timedelta(days=30)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if server_names:
            sans: list[x509.GeneralName] = []
            for n in server_names:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    sans.append(x509.DNSName(n))
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        tag = f"{cn}{'-expired' if expired else ''}"
        out = Issued(self.folder / f"{tag}.crt", self.folder / f"{tag}.key")
        out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        out.key.chmod(0o600)
        return out


@dataclass
class Fleet:
    broker: Mosquitto
    ca: TestCA
    prefix: str
    devices: dict[str, Issued]
    cloud: Issued


def fleet_acl(prefix: str) -> str:
    return (
        # Every device (user name = its certificate's CN): write under its own id only,
        # read only its own verdicts and commands.
        f"pattern write {prefix}/%u/#\n"
        f"pattern read {prefix}/%u/verdict\n"
        f"pattern read {prefix}/%u/verdict/#\n"
        f"pattern read {prefix}/%u/cmd/#\n"
        # The cloud tier: reads every device's topics, answers on their verdict topics.
        "user cloud\n"
        f"topic read {prefix}/#\n"
        f"topic write {prefix}/+/verdict\n"
        f"topic write {prefix}/+/verdict/#\n"
        f"topic write {prefix}/+/cmd/#\n"
    )


def start_tls_broker(folder: Path, ca: TestCA, server: Issued, acl: str) -> Mosquitto:
    folder.mkdir(parents=True, exist_ok=True)
    acl_file = folder / "acl"
    acl_file.write_text(acl)
    extra = (
        "user root\n"  # keep privileges: the key files live under pytest's 0700 tmp folder
        f"cafile {ca.path}\n"
        f"certfile {server.cert}\n"
        f"keyfile {server.key}\n"
        "require_certificate true\n"
        "use_identity_as_username true\n"
        "use_username_as_clientid true\n"
        f"acl_file {acl_file}\n"
    )
    return Mosquitto(folder, extra=extra).start()


@pytest.fixture
def fleet(tmp_path: Path, topic_prefix: str) -> Iterator[Fleet]:
    ca = TestCA(tmp_path / "pki", "fleet-ca")
    server = ca.issue("broker", server_names=("localhost", "127.0.0.1"))
    devices = {d: ca.issue(d) for d in ("dev-a", "dev-b")}
    cloud = ca.issue("cloud")
    b = start_tls_broker(tmp_path / "broker", ca, server, fleet_acl(topic_prefix))
    yield Fleet(b, ca, topic_prefix, devices, cloud)
    b.stop()


def device_settings(
    port: int, prefix: str, state: Path, device: str, ca: Path, cert: Issued, **extra: str
) -> Settings:
    env = {
        "EDGE_AGENT_MQTT_HOST": "127.0.0.1",
        "EDGE_AGENT_MQTT_PORT": str(port),
        "EDGE_AGENT_MQTT_TOPIC_PREFIX": prefix,
        "EDGE_AGENT_MQTT_TLS_CA": str(ca),
        "EDGE_AGENT_MQTT_TLS_CERT": str(cert.cert),
        "EDGE_AGENT_MQTT_TLS_KEY": str(cert.key),
        "EDGE_AGENT_DEVICE_ID": device,
        "EDGE_AGENT_DEVICE_STATE_DIR": str(state),
        "EDGE_AGENT_MQTT_KEEPALIVE_S": "5",
        "EDGE_AGENT_LINK_RECONNECT_MIN_S": "0.05",
        "EDGE_AGENT_LINK_RECONNECT_MAX_S": "0.3",
        "EDGE_AGENT_LINK_RETRY_REFUSED_S": "0.2",
        "EDGE_AGENT_LINK_RETRY_NO_SUBSCRIBERS_S": "0.2",
    }
    env.update({f"EDGE_AGENT_{k.upper()}": v for k, v in extra.items()})
    return load_settings(None, env=env)


class Peer:
    """A TLS MQTT client with a given certificate that records what it receives."""

    def __init__(self, fleet: Fleet, who: Issued, client_id: str, topics: list[str]) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.granted: list[int] = []
        self.acks: list[int] = []
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        self.client.tls_set(
            ca_certs=str(fleet.ca.path), certfile=str(who.cert), keyfile=str(who.key)
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = lambda _c, _u, _m, rc, _p: self.acks.append(rc.value)
        self.client.connect("127.0.0.1", fleet.broker.port, keepalive=10)
        self.client.loop_start()
        self.client.subscribe([(t, 1) for t in topics])
        assert self.ready.wait(TIMEOUT)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.append((msg.topic, bytes(msg.payload)))

    def _on_subscribe(
        self, _c: mqtt.Client, _u: object, _mid: int, codes: list, _p: object
    ) -> None:
        self.granted = [c.value for c in codes]
        self.ready.set()

    def topics(self) -> list[str]:
        with self.lock:
            return [t for t, _ in self.got]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def case(key: str) -> bytes:
    device, _, seq = key.partition(":")
    return (
        b'{"v":1,"key":"%s","device":"%s","seq":%s,"values":[[1.0]],'
        b'"local":{"label":"a","confidence":0.4,"reason":"low_confidence","model":"m@1"},'
        b'"tier":"urgent"}' % (key.encode(), device.encode(), seq.encode())
    )


def wait_until(predicate: object, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return bool(predicate())  # type: ignore[operator]


# -- tests -------------------------------------------------------------------------------


def test_a_device_cannot_publish_as_another_read_its_verdicts_or_take_its_session(
    fleet: Fleet, tmp_path: Path
) -> None:
    p, t = fleet.prefix, Topics(fleet.prefix)
    cloud = Peer(fleet, fleet.cloud, "cloud-observer", [f"{p}/+/hard", f"{p}/+/status"])
    # Device B, honest, with its own certificate.
    b_settings = device_settings(
        fleet.broker.port, p, tmp_path / "b", "dev-b", fleet.ca.path, fleet.devices["dev-b"]
    )
    link_b = Link(b_settings, open_outbox(b_settings), "dev-b")
    # Device A's certificate, but configured to be B: a compromised device impersonating B.
    spoof = device_settings(
        fleet.broker.port, p, tmp_path / "a", "dev-b", fleet.ca.path, fleet.devices["dev-a"]
    )
    link_spoof = Link(spoof, open_outbox(spoof), "dev-b")
    a_reader: Peer | None = None
    link_b.start()
    try:
        assert link_b.connected.wait(TIMEOUT), link_b.last_error
        assert link_b.submit(Cls.URGENT, "dev-b:1", t.hard("dev-b"), case("dev-b:1"))
        assert wait_until(lambda: t.hard("dev-b") in cloud.topics())  # positive control

        link_spoof.start()
        assert wait_until(lambda: link_spoof.counters["connects"] >= 1)
        assert link_spoof.submit(Cls.URGENT, "dev-b:666", t.hard("dev-b"), case("dev-b:666"))
        assert wait_until(
            lambda: (
                link_spoof.counters["nacked_urgent"] >= 1 or link_spoof.counters["disconnects"] >= 1
            )
        )
        time.sleep(1.0)
        forged = [pl for tp, pl in cloud.got if b"dev-b:666" in pl]
        assert not forged, "a device published on another device's topic"
        assert link_spoof.outbox.depth()["urgent"] == 1  # refused, kept (never counted as sent)
        assert link_spoof.counters["published_urgent"] == 0
        link_spoof.stop()  # A's certificate has one session only (client id = CN)

        # A's read of B's verdicts, with B's client id: refused at subscribe, nothing delivered.
        a_reader = Peer(
            fleet,
            fleet.devices["dev-a"],
            "edge-agent-dev-b",
            [t.verdict("dev-b"), t.verdict("dev-a")],
        )
        cloud.client.publish(t.verdict("dev-b"), b'{"secret":"for b"}', qos=1)
        cloud.client.publish(t.verdict("dev-a"), b'{"for":"a"}', qos=1)
        assert wait_until(lambda: t.verdict("dev-a") in a_reader.topics())  # positive control
        time.sleep(0.5)
        assert t.verdict("dev-b") not in a_reader.topics()
        # (mosquitto 2.0 grants the subscription and filters each delivery by the ACL.)

        # Session takeover: A connected with B's client id did not kick B off (the broker
        # uses the certificate's CN as the client id).
        assert link_b.counters["disconnects"] == 0
        assert link_b.connected.is_set()
        print(
            f"\nimpersonation: spoofing link {dict(link_spoof.counters)};"
            f" honest link {dict(link_b.counters)}; A's SUBACK codes {a_reader.granted}"
        )
    finally:
        link_spoof.stop()
        link_b.stop()
        if a_reader is not None:
            a_reader.close()
        cloud.close()


#: paho-mqtt 2.2 leaves the TLS socket of a failed handshake unclosed (``_ssl_wrap_socket``
#: raises from ``do_handshake`` without closing it); the garbage collector closes it, with a
#: ResourceWarning that pytest reports as unraisable.
PAHO_TLS_LEAK = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@PAHO_TLS_LEAK
@pytest.mark.parametrize("fault", ["wrong_ca", "expired_certificate", "hostname_mismatch"])
def test_tls_failures_are_refused_with_no_plaintext_fallback(
    fault: str, tmp_path: Path, topic_prefix: str
) -> None:
    ca = TestCA(tmp_path / "pki", "fleet-ca")
    names = ("broker.example.com",) if fault == "hostname_mismatch" else ("127.0.0.1",)
    server = ca.issue("broker", server_names=names)
    broker = start_tls_broker(tmp_path / "broker", ca, server, fleet_acl(topic_prefix))
    trusted = ca.path
    cert = ca.issue("dev-a")
    if fault == "wrong_ca":
        trusted = TestCA(tmp_path / "other-pki", "other-ca").path
    elif fault == "expired_certificate":
        cert = ca.issue("dev-a", expired=True)
    settings = device_settings(
        broker.port, topic_prefix, tmp_path / "state", "dev-a", trusted, cert
    )
    link = Link(settings, open_outbox(settings), "dev-a")
    link.start()
    try:
        link.submit(Cls.URGENT, "dev-a:1", Topics(topic_prefix).hard("dev-a"), case("dev-a:1"))
        assert wait_until(lambda: link.counters["connect_attempts"] >= 3), (
            link.counters,
            link.last_error,
            link.healthy,
        )
        time.sleep(0.5)
        assert link.counters["connects"] == 0, f"connected despite {fault}"
        assert not link.connected.is_set()
        assert link.outbox.depth()["urgent"] == 1  # kept for when TLS is fixed
        print(
            f"\n{fault}: {link.counters['connect_attempts']} attempts,"
            f" last error {link.last_error!r}"
        )
        if fault != "expired_certificate":  # the device itself refuses the broker
            assert (
                "CERTIFICATE_VERIFY_FAILED" in link.last_error or "certificate" in link.last_error
            )
    finally:
        link.stop()
        broker.stop()
    log = (tmp_path / "broker" / "mosquitto.log").read_text()
    if fault == "expired_certificate":
        assert "certificate" in log.lower() or "ssl" in log.lower() or "tls" in log.lower(), log


@PAHO_TLS_LEAK
def test_a_tls_device_never_falls_back_to_a_plaintext_listener(
    tmp_path: Path, topic_prefix: str
) -> None:
    """A device configured for TLS pointed at a plaintext listener: no connection at all."""
    plain = Mosquitto(tmp_path / "plain").start()
    ca = TestCA(tmp_path / "pki", "fleet-ca")
    settings = device_settings(
        plain.port, topic_prefix, tmp_path / "state", "dev-a", ca.path, ca.issue("dev-a")
    )
    link = Link(settings, open_outbox(settings), "dev-a")
    link.start()
    try:
        assert wait_until(lambda: link.counters["connect_attempts"] >= 3)
        assert link.counters["connects"] == 0
    finally:
        link.stop()
        plain.stop()


PASSWORD = "s3cr3t-Pa55word-7f1c"  # a test secret, looked for in logs


def test_password_from_a_credentials_file_never_appears_in_logs_or_telemetry(
    tmp_path: Path,
    topic_prefix: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = tmp_path / "broker"
    folder.mkdir()
    pw = folder / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "dev-a", PASSWORD], check=True)
    pw.chmod(0o644)
    b = Mosquitto(folder, anonymous=False, extra=f"user root\npassword_file {pw}").start()
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt-password").write_text(PASSWORD + "\n")
    wrong = tmp_path / "credentials-wrong"
    wrong.mkdir()
    (wrong / "mqtt-password").write_text(PASSWORD[::-1] + "\n")
    env = {
        "EDGE_AGENT_MQTT_PORT": str(b.port),
        "EDGE_AGENT_MQTT_TOPIC_PREFIX": topic_prefix,
        "EDGE_AGENT_MQTT_USERNAME": "dev-a",
        "EDGE_AGENT_MQTT_PASSWORD_FILE": "mqtt-password",  # relative: $CREDENTIALS_DIRECTORY
        "EDGE_AGENT_DEVICE_ID": "dev-a",
        "EDGE_AGENT_LINK_RECONNECT_MIN_S": "0.05",
        "EDGE_AGENT_LINK_RECONNECT_MAX_S": "0.2",
        "EDGE_AGENT_TELEMETRY_INTERVAL_S": "0.2",
    }
    pack = make_fake_pack(tmp_path / "pack")
    caplog.set_level(logging.DEBUG)
    published: list[tuple[str, bytes]] = []  # what the broker delivered under the device's topics
    try:
        # Right password (systemd's LoadCredential= puts it in $CREDENTIALS_DIRECTORY).
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
        settings = load_settings(
            None, env={**env, "EDGE_AGENT_DEVICE_STATE_DIR": str(tmp_path / "s1")}
        )
        # A client built by new_client from the same settings (the password only inside paho)
        # gets in, and reads what the device really publishes: status and telemetry.
        probe = new_client(settings, "probe")
        granted = threading.Event()
        probe.on_subscribe = lambda *_a: granted.set()
        probe.on_message = lambda _c, _u, m: published.append((m.topic, bytes(m.payload)))
        probe.connect("127.0.0.1", b.port)
        probe.loop_start()
        probe.subscribe(f"{topic_prefix}/dev-a/#", qos=1)
        assert granted.wait(TIMEOUT), "the probe with the password file's password was refused"
        agent = Agent(settings, Scorer.open(open_pack(pack)))
        agent.link.start()
        agent.telemetry.start()
        try:
            assert agent.link.connected.wait(TIMEOUT), agent.link.last_error
            topics = Topics(topic_prefix)
            assert wait_until(
                lambda: (
                    {topics.telemetry("dev-a"), topics.status("dev-a")} <= {t for t, _ in published}
                )
            ), f"no telemetry and status published: {[t for t, _ in published]}"
        finally:
            agent.close()
            probe.loop_stop()
            probe.disconnect()
        blobs = [p for _, p in published]
        blobs += [agent.status_line().encode(), repr(settings).encode()]
        # Wrong password: refused, logged as refused, the secret still never shown.
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(wrong))
        settings = load_settings(
            None, env={**env, "EDGE_AGENT_DEVICE_STATE_DIR": str(tmp_path / "s2")}
        )
        link = Link(settings, open_outbox(settings), "dev-a")
        link.start()
        try:
            assert wait_until(lambda: link.counters["connect_refused"] >= 2)
            assert link.counters["connects"] == 0
        finally:
            link.stop()
    finally:
        b.stop()
    text = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert "refused" in text
    for secret in (PASSWORD, PASSWORD[::-1]):
        assert secret not in text, "the MQTT password appeared in the logs"
        for blob in blobs:
            assert secret.encode() not in blob, "the MQTT password appeared in telemetry/status"
