"""DICOM TLS (PS3.15 B.1) and the limits on untrusted input, against real DCMTK peers.

The certificates (a CA, a server certificate for 127.0.0.1/localhost, a client
certificate) are made here with ``cryptography``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import (
    DCMTK_ENV,
    NodeProcess,
    echoscu,
    free_port,
    make_series,
    need_tool,
    stored_files,
    storescu,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicomnode.config import DestinationTls
from dicomnode.export.dimse import DimseSender, Peer, scan

# -- certificates ---------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from a CA the node does not trust
    rogue_key: Path


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    path.chmod(0o600)  # the node refuses a private key that group or others may read


def _cert(subject: str, key: Any, issuer: str, issuer_key: Any, *, ca: bool = False,
          server: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                          False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    out: dict[str, Path] = {}

    def save(name: str, cert: x509.Certificate, key: Any) -> None:
        out[f"{name}_cert"] = d / f"{name}.crt"
        out[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{name}_key"] = d / f"{name}.key"
        _write_key(key, out[f"{name}_key"])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("Test CA", ca_key, "Test CA", ca_key, ca=True)
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        save(name, _cert(name, key, "Test CA", ca_key, server=server), key)
    rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    save("rogue", _cert("rogue", key, "Rogue CA", rogue_ca_key), key)
    return Pki(ca=d / "ca.crt", **out)


def _tls_settings(pki: Pki, **tls: Any) -> dict[str, Any]:
    return {"ingest": {"tls": {"certfile": str(pki.server_cert), "keyfile": str(pki.server_key),
                               "ca_file": str(pki.ca), **tls}}}


def _client_tls(pki: Pki) -> list[str]:
    """storescu/echoscu options: TLS with the client certificate, trusting the test CA."""
    return ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]


def _tls_echo(port: int, pki: Pki, tls: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    need_tool("echoscu")
    return subprocess.run(
        ["echoscu", "-aet", "ECHOSCU", "-aec", "DICOMNODE", "-to", "10",
         *(tls if tls is not None else _client_tls(pki)), "127.0.0.1", str(port)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=30)


def _sops(storage: Path) -> set[str]:
    return {p.stem for p in stored_files(storage)}


def _wait_stored(node: NodeProcess, n: int, timeout: float = 15) -> None:
    node.wait_for(lambda: len(stored_files(node.storage)) >= n, timeout=timeout)


# -- DICOM TLS ------------------------------------------------------------------------


def test_storescu_over_tls_is_stored_and_plain_dicom_is_refused(
        node_factory: Any, pki: Pki, tmp_path: Path) -> None:
    node = node_factory(_tls_settings(pki)).start()  # the main port is TLS-only
    files = make_series(tmp_path / "in", n=3)
    r = storescu(node.port, files, extra=_client_tls(pki))
    assert r.returncode == 0, r.stderr + r.stdout
    _wait_stored(node, 3)
    assert _sops(node.storage) == {pydicom.dcmread(f).SOPInstanceUID for f in files}

    # plain DICOM to the TLS port fails cleanly, and the node goes on answering TLS
    plain = storescu(node.port, make_series(tmp_path / "plain", n=1), timeout=60)
    assert plain.returncode != 0
    assert len(stored_files(node.storage)) == 3
    assert echoscu(node.port).returncode != 0
    assert node.proc is not None and node.proc.poll() is None
    r = _tls_echo(node.port, pki)
    assert r.returncode == 0, r.stderr + node.log()[-3000:]
    assert "TLS handshake" in node.log()


def test_separate_tls_port_next_to_a_plain_one(node_factory: Any, pki: Pki, tmp_path: Path) -> None:
    tls_port = free_port()
    node = node_factory(_tls_settings(pki, port=tls_port)).start()
    a = make_series(tmp_path / "a", n=2)
    b = make_series(tmp_path / "b", n=2)
    r = storescu(node.port, a)  # the main port stays plain
    assert r.returncode == 0, r.stderr
    r = storescu(tls_port, b, extra=_client_tls(pki))
    assert r.returncode == 0, r.stderr
    _wait_stored(node, 4)
    assert _tls_echo(node.port, pki).returncode != 0  # no TLS on the plain port
    assert echoscu(node.port).returncode == 0


def test_require_client_cert_refuses_clients_without_a_trusted_one(
        node_factory: Any, pki: Pki, tmp_path: Path) -> None:
    node = node_factory(_tls_settings(pki, require_client_cert=True)).start()
    files = make_series(tmp_path / "in", n=1)
    anonymous = ["+tla", "+cf", str(pki.ca)]  # TLS, but no client certificate
    r = storescu(node.port, files, extra=anonymous, timeout=60)
    assert r.returncode != 0
    rogue = ["+tls", str(pki.rogue_key), str(pki.rogue_cert), "+cf", str(pki.ca)]
    r = storescu(node.port, files, extra=rogue, timeout=60)
    assert r.returncode != 0
    assert stored_files(node.storage) == []
    r = storescu(node.port, files, extra=_client_tls(pki))
    assert r.returncode == 0, r.stderr + node.log()[-3000:]
    _wait_stored(node, 1)


def test_dimse_sender_over_tls_to_storescp(pki: Pki, tmp_path: Path) -> None:
    need_tool("storescp")
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    log = (tmp_path / "storescp.log").open("wb")
    proc = subprocess.Popen(
        ["storescp", "-aet", "TLSSCP", "+tls", str(pki.server_key), str(pki.server_cert),
         "+cf", str(pki.ca), "-od", str(out), str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV)
    try:
        tls = DestinationTls(ca_file=str(pki.ca), certfile=str(pki.client_cert),
                             keyfile=str(pki.client_key))
        sender = DimseSender(Peer("TLSSCP", "127.0.0.1", port), "DICOMNODE", tls=tls,
                             acse_timeout=10, dimse_timeout=10, network_timeout=10)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert sender.echo() == 0
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        files, _ = scan(make_series(tmp_path / "in", n=3))
        statuses = sender.send_files(files)
        assert [s.status for s in statuses] == [0, 0, 0], statuses
        assert len(list(out.iterdir())) == 3

        # a peer whose certificate the node does not trust is not sent to
        untrusting = DimseSender(Peer("TLSSCP", "127.0.0.1", port), "DICOMNODE",
                                 tls=DestinationTls(ca_file=str(pki.rogue_cert)),
                                 acse_timeout=5, dimse_timeout=5, network_timeout=5)
        assert {s.kind for s in untrusting.send_files(files)} == {"unreachable"}
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


# -- limits ---------------------------------------------------------------------------


def _ae(title: str, timeout: float = 10) -> AE:
    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae


def test_max_associations_per_caller(node_factory: Any) -> None:
    node = node_factory({"ingest": {"max_associations_per_caller": 2}}).start()
    ae = _ae("GREEDY")
    held = [ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        t0 = time.monotonic()
        third = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert time.monotonic() - t0 < 5
        assert third.is_rejected
        rj = third.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        other = _ae("POLITE").associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert other.is_established
        assert other.send_c_echo().Status == 0
        other.release()
    finally:
        for a in held:
            a.release()
    # released associations no longer count
    again = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert again.is_established
    again.release()


def test_max_associations_rejects_instead_of_hanging(node_factory: Any) -> None:
    node = node_factory({"ingest": {"max_associations": 2}}).start()
    held = [_ae(f"A{i}").associate("127.0.0.1", node.port, ae_title="DICOMNODE")
            for i in range(2)]
    try:
        assert all(a.is_established for a in held)
        t0 = time.monotonic()
        third = _ae("A3").associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert time.monotonic() - t0 < 5
        assert third.is_rejected
        rj = third.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
    finally:
        for a in held:
            a.release()


def test_max_instance_bytes(node_factory: Any, tmp_path: Path) -> None:
    small, big = make_series(tmp_path / "s", n=1, size=16)[0], make_series(tmp_path / "b", n=1,
                                                                           size=128)[0]
    limit = (len(small.read_bytes()) + len(big.read_bytes())) // 2
    node = node_factory({"ingest": {"max_instance_bytes": limit}}).start()
    assoc = _ae("SENDER").associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(pydicom.dcmread(big)).Status == 0xA700
        assert assoc.send_c_store(pydicom.dcmread(small)).Status == 0x0000
    finally:
        assoc.release()
    _wait_stored(node, 1)
    time.sleep(0.5)
    assert _sops(node.storage) == {str(pydicom.dcmread(small).SOPInstanceUID)}
    assert "larger than the limit" in node.log()


def test_silent_sender_is_dropped_and_nothing_partial_is_kept(
        node_factory: Any, tmp_path: Path) -> None:
    node = node_factory({"ingest": {"network_timeout": 2}}).start()
    ds = pydicom.dcmread(make_series(tmp_path / "in", n=1, size=256)[0])
    ae = _ae("SILENT", timeout=60)  # our own side must not time out first
    ae.maximum_pdu_size = 16384
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE",
                         max_pdu=16384)
    assert assoc.is_established
    cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage)

    prim = C_STORE()
    prim.MessageID = 1
    prim.AffectedSOPClassUID = ds.SOPClassUID
    prim.AffectedSOPInstanceUID = ds.SOPInstanceUID
    prim.Priority = 0
    encoded = encode(ds, cx.transfer_syntax[0] == "1.2.840.10008.1.2", True)
    assert encoded is not None
    prim.DataSet = BytesIO(encoded)
    msg = C_STORE_RQ()
    msg.primitive_to_message(prim)
    pdus = []
    for primitive in msg.encode_msg(cx.context_id, 16384):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu)
    assert len(pdus) > 4
    for pdu in pdus[: len(pdus) // 2]:  # the command and half the dataset, then silence
        assoc.dul.socket.send(pdu.encode())
    t0 = time.monotonic()
    deadline = t0 + 15
    while not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted, "the node did not drop the silent sender"
    assert 1.5 < time.monotonic() - t0 < 10
    assert "Network timeout" in node.log()
    assert stored_files(node.storage) == []
    assert list((node.storage / "tmp").iterdir()) == []
    assert echoscu(node.port).returncode == 0



def test_tls_with_several_receiving_processes(node_factory: Any, pki: Pki, tmp_path: Path) -> None:
    settings = _tls_settings(pki)
    settings["ingest"]["processes"] = 2
    node = node_factory(settings).start()
    files = make_series(tmp_path / "in", n=4)
    r = storescu(node.port, files, extra=_client_tls(pki))
    assert r.returncode == 0, r.stderr + node.log()[-3000:]
    _wait_stored(node, 4)
    assert _tls_echo(node.port, pki).returncode == 0


def test_tls_config_validation(pki: Pki) -> None:
    from dicomnode.config import parse_config
    from dicomnode.errors import ConfigError

    base = {"certfile": str(pki.server_cert), "keyfile": str(pki.server_key)}
    with pytest.raises(ConfigError, match="ca_file"):
        parse_config({"ingest": {"tls": {**base, "require_client_cert": True}}})
    with pytest.raises(ConfigError, match="processes"):
        parse_config({"ingest": {"processes": 2, "tls": {**base, "port": 2762}}})
    with pytest.raises(ConfigError, match="certfile and keyfile"):
        parse_config({"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "h",
                                        "port": 104, "tls": {"certfile": "x.crt"}}]})
    cfg = parse_config({"ingest": {"max_associations_per_caller": 4, "max_instance_bytes": 10**9,
                                   "tls": {**base, "port": 2762}}})
    assert cfg.ingest.tls is not None and cfg.ingest.tls.port == 2762
