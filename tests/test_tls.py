"""DICOM TLS audited as a security officer would (PS3.15 Annex B, BCP 195): protocol versions,
cipher suites, certificates and their dates, both directions, with real peers (DCMTK,
``openssl s_client``/``s_server``) and ``dicom-node serve`` as a subprocess.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import NodeFactory
from peers import (
    DICOM_NODE,
    OPENSSL,
    SCU_AET,
    NodeProcess,
    TlsFiles,
    echoscu,
    free_port,
    listening,
    make_mr_series,
    make_tls_files,
    require_binary,
    storescp_to,
    wait_until,
)

from dicom_node.config import NodeSettings, PeerSettings, Settings, TLSSettings, load_settings
from dicom_node.errors import ConfigError, DeliveryError
from dicom_node.scp import certificate_validity
from dicom_node.send import echo_peer, store_seg

pytestmark = pytest.mark.peers

EXPIRED = ("-startdate", "20200101000000Z", "-enddate", "20200102000000Z")


def _certificate(pki: TlsFiles, name: str, *dates: str, ext: str) -> tuple[Path, Path]:
    """A certificate and key signed by ``pki``'s CA, dated by ``openssl ca``'s options
    (``openssl x509 -req`` sets no past dates)."""
    openssl = require_binary(OPENSSL)
    folder = pki.ca_cert.parent
    (folder / "index.txt").touch()
    if not (folder / "serial").exists():
        (folder / "serial").write_text("1000\n")
    (folder / "ca.cnf").write_text(
        "[ca]\ndefault_ca = this\n[this]\ndatabase = index.txt\nnew_certs_dir = .\n"
        "serial = serial\ndefault_md = sha256\npolicy = any\nunique_subject = no\n"
        "[any]\ncommonName = supplied\n"
    )
    (folder / f"{name}.ext").write_text(ext + "\n")
    for args in (
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
         "-keyout", f"{name}.key", "-out", f"{name}.csr"],
        ["ca", "-batch", "-notext", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key",
         "-in", f"{name}.csr", "-out", f"{name}.pem", "-extfile", f"{name}.ext", *dates],
    ):  # fmt: skip
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True, timeout=60)
    return folder / f"{name}.pem", folder / f"{name}.key"


def _client_certificate(pki: TlsFiles, name: str, *dates: str) -> tuple[Path, Path]:
    return _certificate(pki, name, *dates, ext="extendedKeyUsage=clientAuth")


def _server_certificate(pki: TlsFiles, name: str, *dates: str) -> tuple[Path, Path]:
    return _certificate(pki, name, *dates, ext="subjectAltName=IP:127.0.0.1")


def _configure_tls(node: NodeProcess, certificate: Path, key: Path, ca: Path) -> int:
    """``node.tls`` enabled with these files, client certificates required; its TLS port."""
    tls_port = free_port()
    while tls_port == node.port:
        tls_port = free_port()
    node.config["node"]["tls"] = {
        "enabled": True,
        "port": tls_port,
        "certificate": node.relative(certificate),
        "key": node.relative(key),
        "ca_certificate": node.relative(ca),
        "require_client_certificate": True,
    }
    node.config_path.write_text(yaml.safe_dump(node.config, sort_keys=False))
    return tls_port


def _refusals_logged(node: NodeProcess, since: int, count: int) -> list[str]:
    """The node's next ``count`` lines about refused TLS connections (logged as they end)."""

    def lines() -> list[str]:
        text = node.log_text()[since:]
        return [line for line in text.splitlines() if "DICOM TLS connection from" in line]

    wait_until(lambda: len(lines()) >= count, timeout_s=30, what=f"{count} TLS refusals logged")
    return lines()


def _s_client(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary(OPENSSL), "s_client", "-connect", f"127.0.0.1:{port}", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# -- receive side ------------------------------------------------------------------------------


def test_tls_versions_and_cipher_suites_the_tls_port_takes(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    """TLS 1.2 with forward-secret AEAD suites (BCP 195) and TLS 1.3; TLS 1.1 and TLS 1.2's
    CBC suites (Python's default list took them) are refused, each logged with its reason."""
    pki = make_tls_files(tmp_path / "pki")
    node = node_factory(start=False)
    tls_port = _configure_tls(node, pki.server_cert, pki.server_key, pki.ca_cert)
    node.start()
    client = (
        "-cert",
        str(pki.client_cert),
        "-key",
        str(pki.client_key),
        "-CAfile",
        str(pki.ca_cert),
    )
    for version, cipher in (
        ("-tls1_3", None),
        ("-tls1_2", "ECDHE-RSA-AES128-GCM-SHA256"),
        ("-tls1_2", "ECDHE-RSA-AES256-GCM-SHA384"),
        ("-tls1_2", "ECDHE-RSA-CHACHA20-POLY1305"),
    ):
        taken = _s_client(tls_port, version, *(("-cipher", cipher) if cipher else ()), *client)
        assert taken.returncode == 0, taken.stdout + taken.stderr
        assert "Verify return code: 0 (ok)" in taken.stdout, taken.stdout
        if cipher:
            assert f"Cipher is {cipher}" in taken.stdout, taken.stdout

    logged = len(node.log_text())
    old = _s_client(tls_port, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0", *client)
    assert old.returncode != 0 and "Cipher is (NONE)" in old.stdout, old.stdout + old.stderr
    for cbc in ("ECDHE-RSA-AES128-SHA256", "ECDHE-RSA-AES256-SHA384"):
        refused = _s_client(tls_port, "-tls1_2", "-cipher", cbc, *client)
        assert refused.returncode != 0, refused.stdout + refused.stderr
        assert "Cipher is (NONE)" in refused.stdout, refused.stdout
    old_line, *cbc_lines = _refusals_logged(node, logged, 3)
    assert "WARNING" in old_line and "refused: UNSUPPORTED_PROTOCOL" in old_line, old_line
    assert "only TLS 1.1 or older; the node takes TLS 1.2 and 1.3" in old_line, old_line
    for line in cbc_lines:
        assert "refused: NO_SHARED_CIPHER (the sender offers no cipher suite" in line, line
        assert "AES-GCM or ChaCha20-Poly1305 (BCP 195)" in line, line
    assert node.running()


def test_tls_client_certificates_refused_with_their_reason_and_ae_titles_still_checked(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    """A client certificate that expired, or from another CA, is refused and the log says
    which (OpenSSL's reason alone was CERTIFICATE_VERIFY_FAILED for both, with a hint that
    suggested a missing certificate); a valid one still needs a configured calling AE."""
    pki, stranger = make_tls_files(tmp_path / "pki"), make_tls_files(tmp_path / "stranger")
    expired_cert, expired_key = _client_certificate(pki, "expired", *EXPIRED)
    node = node_factory(start=False)
    tls_port = _configure_tls(node, pki.server_cert, pki.server_key, pki.ca_cert)
    node.start()

    def tls_args(cert: Path, key: Path) -> list[str]:
        return ["+tls", str(key), str(cert), "+cf", str(pki.ca_cert)]

    logged = len(node.log_text())
    expired = echoscu(tls_port, extra_args=tls_args(expired_cert, expired_key))
    assert expired.returncode != 0
    other_ca = echoscu(tls_port, extra_args=tls_args(stranger.client_cert, stranger.client_key))
    assert other_ca.returncode != 0
    no_certificate = echoscu(tls_port, extra_args=["+tla", "+cf", str(pki.ca_cert)])
    assert no_certificate.returncode != 0
    expired_line, other_line, none_line = _refusals_logged(node, logged, 3)
    assert "refused: CERTIFICATE_VERIFY_FAILED: certificate has expired" in expired_line
    assert "(the sender's certificate, checked against node.tls.ca_certificate)" in expired_line
    assert "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate" in other_line
    assert "refused: PEER_DID_NOT_RETURN_A_CERTIFICATE (the sender sent no certificate" in none_line

    valid = tls_args(pki.client_cert, pki.client_key)
    assert echoscu(tls_port, extra_args=valid).returncode == 0
    unknown = echoscu(tls_port, aet="NOT-A-PEER", extra_args=valid)
    assert unknown.returncode != 0 and "Calling AE Title Not Recognized" in unknown.stdout + (
        unknown.stderr
    )
    node.wait_for_log("calling AE title 'NOT-A-PEER' is not a configured peer")


# -- send side ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _s_server(certificate: Path, key: Path, *args: str) -> Iterator[int]:
    """``openssl s_server`` as a TLS peer restricted by ``args`` (versions, cipher suites)."""
    port = free_port()
    command = [require_binary(OPENSSL), "s_server", "-accept", str(port), "-cert",
               str(certificate), "-key", str(key), *args]  # fmt: skip
    # stdin open: s_server ends a connection at the end of its input.
    with listening(command, port, "s_server", stdin=subprocess.PIPE) as listening_port:
        yield listening_port


def _settings(pki: TlsFiles, *, ca: Path | None) -> Settings:
    tls = TLSSettings(certificate=pki.client_cert, key=pki.client_key, ca_certificate=ca)
    return Settings(node=NodeSettings(tls=tls, network_timeout_s=5))


def _peer(port: int) -> PeerSettings:
    return PeerSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=port, tls=True)


def test_a_tls_peer_is_trusted_by_node_tls_ca_certificate_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With host names unchecked (peers are addressed by IP), trusting the system's CAs as
    well let any holder of a certificate from a public CA pass as the PACS and receive the
    SEG. SSL_CERT_FILE stands for the system's store, holding a 'public' CA here."""
    node_pki, public = make_tls_files(tmp_path / "node"), make_tls_files(tmp_path / "public")
    monkeypatch.setenv("SSL_CERT_FILE", str(public.ca_cert))
    image = make_mr_series(tmp_path / "gen", 1).paths[0]
    server = ["+tls", str(public.server_key), str(public.server_cert), "-ic"]
    with storescp_to(tmp_path / "received", *server) as port:
        with pytest.raises(DeliveryError) as caught:
            store_seg(_settings(node_pki, ca=node_pki.ca_cert), _peer(port), image)
        message = str(caught.value)
        assert "failed the TLS handshake: CERTIFICATE_VERIFY_FAILED" in message, message
        assert "unable to get local issuer certificate" in message, message
        # No node.tls.ca_certificate: the system's CAs are what there is to check against.
        assert echo_peer(_settings(node_pki, ca=None), _peer(port))["ok"]
    assert list((tmp_path / "received").iterdir()) == []


def test_a_tls_peer_checked_against_the_systems_cas_must_be_named_in_its_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without node.tls.ca_certificate the system's CAs are trusted, and host names were not
    checked: any holder of a public CA's certificate, for any name, passed as the PACS and
    received the SEG. Now the certificate must name the peer's host."""
    public = make_tls_files(tmp_path / "public")
    monkeypatch.setenv("SSL_CERT_FILE", str(public.ca_cert))
    certificate, key = _certificate(
        public, "elsewhere", "-days", "30", ext="subjectAltName=DNS:elsewhere.example"
    )
    image = make_mr_series(tmp_path / "gen", 1).paths[0]
    server = ["+tls", str(key), str(certificate), "-ic"]
    with storescp_to(tmp_path / "received", *server) as port:
        with pytest.raises(DeliveryError) as caught:
            store_seg(_settings(public, ca=None), _peer(port), image)
        message = str(caught.value)
        assert "failed the TLS handshake: CERTIFICATE_VERIFY_FAILED" in message, message
        assert "IP address mismatch" in message, message
        assert "must name the peer's host" in message, message
        echoed = echo_peer(_settings(public, ca=None), _peer(port))
        assert not echoed["ok"] and "IP address mismatch" in str(echoed["detail"]), echoed
    assert list((tmp_path / "received").iterdir()) == []
    # A certificate naming the host (IP:127.0.0.1) passes, as in the test above.
    server = ["+tls", str(public.server_key), str(public.server_cert), "-ic"]
    with storescp_to(tmp_path / "received-named", *server) as port:
        store_seg(_settings(public, ca=None), _peer(port), image)
    assert len(list((tmp_path / "received-named").iterdir())) == 1


def test_a_tls_peer_with_an_expired_certificate_fails_the_delivery_with_the_reason(
    tmp_path: Path,
) -> None:
    pki = make_tls_files(tmp_path / "pki")
    certificate, key = _server_certificate(pki, "expired-pacs", *EXPIRED)
    image = make_mr_series(tmp_path / "gen", 1).paths[0]
    server = ["+tls", str(key), str(certificate), "-ic"]
    with (
        storescp_to(tmp_path / "received", *server) as port,
        pytest.raises(DeliveryError) as caught,
    ):
        store_seg(_settings(pki, ca=pki.ca_cert), _peer(port), image)
    message = str(caught.value)
    assert "failed the TLS handshake: CERTIFICATE_VERIFY_FAILED: certificate has expired" in (
        message
    ), message
    assert caught.value.retryable and caught.value.peer_down
    assert list((tmp_path / "received").iterdir()) == []


@pytest.mark.parametrize(
    "restriction",
    [
        ("-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"),
        ("-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA256"),
        ("-tls1_2", "-cipher", "ECDHE-RSA-AES256-SHA384"),
    ],
    ids=["tls-1.1", "cbc-sha256", "cbc-sha384"],
)
def test_a_tls_peer_offering_only_tls_1_1_or_cbc_suites_is_refused(
    tmp_path: Path, restriction: tuple[str, ...]
) -> None:
    """The node as a client holds to BCP 195 too: TLS 1.2 or later, AEAD suites."""
    pki = make_tls_files(tmp_path / "pki")
    with _s_server(pki.server_cert, pki.server_key, *restriction) as port:
        echoed = echo_peer(_settings(pki, ca=pki.ca_cert), _peer(port))
    assert not echoed["ok"]
    assert str(echoed["detail"]).startswith("failed the TLS handshake: "), echoed


# -- start-up ----------------------------------------------------------------------------------


def _serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DICOM_NODE), "-c", str(config), "serve"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.mark.parametrize(
    "case",
    ["expired", "expired-for-peers-only", "passphrase", "not-pem", "key-of-another"],
)
def test_serve_refuses_node_tls_files_it_cannot_use(tmp_path: Path, case: str) -> None:
    """Each stops the start with a ConfigError that names the file and the fix, also for a
    certificate used only to send to TLS peers. Before: an expired certificate was served
    (every sender refused it); a key with a passphrase was
    '[Errno 22] Invalid argument' (and, on a terminal, `serve` waited for the passphrase);
    a file not PEM was '[SSL] PEM lib'."""
    pki = make_tls_files(tmp_path / "pki")
    certificate, key = pki.server_cert, pki.server_key
    expected = ""
    if case.startswith("expired"):
        certificate, key = _server_certificate(pki, "expired-node", *EXPIRED)
        expected = f"node.tls.certificate {certificate} expired on 2020-01-02 00:00 UTC"
    elif case == "passphrase":
        key = tmp_path / "encrypted.key"
        subprocess.run(
            [require_binary(OPENSSL), "pkey", "-in", str(pki.server_key), "-aes256",
             "-passout", "pass:secret", "-out", str(key)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        expected = f"node.tls.key {key} is encrypted with a passphrase"
    elif case == "not-pem":
        key = tmp_path / "not.pem"
        key.write_text("not a key\n")
        expected = "not a PEM certificate and its PEM private key"
    else:
        key = pki.client_key
        expected = "the key is not this certificate's"
    tls: dict[str, object] = {
        "certificate": str(certificate),
        "key": str(key),
        "ca_certificate": str(pki.ca_cert),
    }
    peers: list[dict[str, object]] = [
        {"name": "scu", "ae_title": SCU_AET, "host": "127.0.0.1", "port": 104}
    ]
    if case == "expired-for-peers-only":
        peers.append({"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 2762,
                      "tls": True})  # fmt: skip
    else:
        tls |= {"enabled": True, "port": free_port()}
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "node": {"port": free_port(), "bind_address": "127.0.0.1", "tls": tls},
                "storage": {"data_dir": "var", "min_free_disk_mb": 0},
                "workers": {"processes": 0},
                "peers": peers,
            }
        )
    )
    run = _serve(config)
    assert run.returncode == 2, run.stderr
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and expected in error, error
    assert "listening as AE" not in run.stderr, run.stderr


def test_a_running_node_warns_as_its_certificate_nears_expiry_and_once_it_expired(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A node runs for months and reads its certificate once, at start: the start's check
    alone never said that a certificate valid then had since come within 30 days of
    expiring, or expired (every TLS sender and peer then refused the node)."""
    import logging
    from datetime import timedelta

    from dicom_node.scp import warn_of_certificate_expiry

    pki = make_tls_files(tmp_path / "pki")
    certificate, _key = _server_certificate(pki, "running", "-days", "60")
    validity = certificate_validity(certificate)
    assert validity is not None
    _not_before, not_after = validity
    caplog.set_level(logging.WARNING, logger="dicom_node.scp")
    warn_of_certificate_expiry(certificate, not_after, not_after - timedelta(days=45))
    assert caplog.records == []
    warn_of_certificate_expiry(certificate, not_after, not_after - timedelta(days=9, hours=1))
    (soon,) = caplog.records
    assert soon.levelname == "WARNING", soon
    assert ", in 9 days: renew it before then, and restart the node" in soon.getMessage()
    caplog.clear()
    warn_of_certificate_expiry(certificate, not_after, not_after + timedelta(minutes=1))
    (expired,) = caplog.records
    assert expired.levelname == "ERROR", expired
    assert f"{certificate} expired on {not_after:%Y-%m-%d %H:%M} UTC" in expired.getMessage()
    assert "install a renewed certificate and restart the node" in expired.getMessage()


def test_metrics_give_the_node_certificates_expiry(tmp_path: Path) -> None:
    """For the alerting an administrator sets on certificates (Prometheus): when the
    certificate the node loaded expires; no such metric where the node uses none."""
    from dicom_node.metrics import IndexCollector
    from storage.database import Index
    from storage.filestore import FileStore

    pki = make_tls_files(tmp_path / "pki")
    certificate, key = _server_certificate(pki, "metrics", "-days", "60")
    validity = certificate_validity(certificate)
    assert validity is not None
    tls = TLSSettings(enabled=True, certificate=certificate, key=key, ca_certificate=pki.ca_cert)
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    name = "dicom_node_tls_certificate_expiry_timestamp_seconds"
    try:
        for settings, expected in [
            (Settings(node=NodeSettings(tls=tls)), validity[1].timestamp()),
            (Settings(), None),
        ]:
            collector = IndexCollector(settings, index, FileStore(tmp_path / "store", 0))
            samples = {s.name: s.value for f in collector.collect() for s in f.samples}
            assert samples.get(name) == expected
    finally:
        index.dispose()


def test_serve_warns_of_a_node_certificate_about_to_expire(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    pki = make_tls_files(tmp_path / "pki")
    certificate, key = _server_certificate(pki, "soon", "-days", "10")
    node = node_factory(start=False)
    tls_port = _configure_tls(node, certificate, key, pki.ca_cert)
    node.start()
    line = node.wait_for_log("soon.pem expires on")
    assert "WARNING" in line and "node.tls.certificate " in line, line
    assert ", in 9 days: renew it before then, and restart the node" in line, line
    client = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca_cert)]
    assert echoscu(tls_port, extra_args=client).returncode == 0


def test_certificate_validity_reads_the_dates_openssl_wrote(tmp_path: Path) -> None:
    pki = make_tls_files(tmp_path / "pki")
    certificate, _ = _server_certificate(pki, "dated", *EXPIRED)
    not_before, not_after = certificate_validity(certificate) or (None, None)
    assert (str(not_before), str(not_after)) == (
        "2020-01-01 00:00:00+00:00",
        "2020-01-02 00:00:00+00:00",
    )
    assert certificate_validity(pki.server_key) is None
    assert certificate_validity(tmp_path / "absent.pem") is None


def test_node_tls_ciphers_widens_the_tls_1_2_suites_for_an_older_device(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    """An older device offering only CBC suites (DICOM's former AES TLS profile) can be let in
    with ``node.tls.ciphers``; TLS 1.1 stays refused."""
    pki = make_tls_files(tmp_path / "pki")
    node = node_factory(start=False)
    tls_port = _configure_tls(node, pki.server_cert, pki.server_key, pki.ca_cert)
    node.config["node"]["tls"]["ciphers"] = "DEFAULT"
    node.config_path.write_text(yaml.safe_dump(node.config, sort_keys=False))
    node.start()
    client = ("-cert", str(pki.client_cert), "-key", str(pki.client_key))
    cbc = _s_client(tls_port, "-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA256", *client)
    assert cbc.returncode == 0, cbc.stdout + cbc.stderr
    assert "Cipher is ECDHE-RSA-AES128-SHA256" in cbc.stdout, cbc.stdout
    old = _s_client(tls_port, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0", *client)
    assert old.returncode != 0 and "Cipher is (NONE)" in old.stdout, old.stdout


def test_an_unknown_cipher_list_stops_the_start(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"node": {"tls": {"ciphers": "NO-SUCH-SUITE"}}}))
    with pytest.raises(ConfigError, match="no cipher suite OpenSSL knows matches 'NO-SUCH-SUITE'"):
        load_settings(config)
