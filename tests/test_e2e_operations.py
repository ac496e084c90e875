"""Operating the server: TLS, JWKS over HTTP, SIGTERM drain, SIGHUP reload, `callgate revoke`,
a kill -9 and the audit trail it leaves."""

from __future__ import annotations

import datetime
import http.server
import json
import signal
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from callgate.audit import public_pem
from callgate.cli import main as cli_main
from callgate.revocation import load_revocations
from callgate.trail import verify
from conftest import (
    AUDIT_KEY,
    AUDIT_PRIVATE_KEY,
    AUDIT_PUBLIC_KEY,
    STEP,
    Harness,
    assert_valid_record,
    call_request,
    make_settings,
    server_config,
    signed_in,
    start_server_process,
    token_for,
)
from test_e2e_lifecycle import es256_token, jwks_for


def self_signed(tmp_path: Path) -> tuple[Path, Path, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert_pem)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file, cert_pem


@pytest.mark.both_engines
async def test_wss_with_tls(harness: Harness, tmp_path: Path) -> None:
    cert_file, key_file, cert_pem = self_signed(tmp_path)
    running = await harness.start(
        make_settings(tls={"cert_file": str(cert_file), "key_file": str(key_file)})
    )
    assert running.url.startswith("wss://")
    context = ssl.create_default_context(cadata=cert_pem.decode())
    client = await signed_in(
        harness.nursery, f"wss://localhost:{running.port}/ws", token_for("alice"), context
    )
    harness.clients.append(client)
    assert client.session["user"] == "alice"


@pytest.fixture
def jwks_http() -> Iterator[tuple[str, dict[str, Any]]]:
    """A JWKS document served over HTTP on loopback; tests replace `state["body"]`."""
    state: dict[str, Any] = {"body": b'{"keys": []}', "hits": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state["hits"] += 1
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(state["body"])

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json", state
    finally:
        server.shutdown()
        server.server_close()


async def test_jwks_url_refetched_once_on_unknown_kid(
    harness: Harness, jwks_http: tuple[str, dict[str, Any]]
) -> None:
    url, state = jwks_http
    first, second = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    state["body"] = jwks_for({"k1": first}).encode()
    await harness.start(
        make_settings(
            auth={"algorithms": ["ES256"], "jwks_url": url, "jwks_min_refresh": 1, "secret": ""}
        )
    )
    assert harness.server is not None
    with trio.fail_after(STEP):
        while harness.server.hub.verifier.ring.for_kid("k1") is None:
            await trio.sleep(0.05)
    await harness.connect("alice", token=es256_token("alice", "k1", first))
    # The IdP rotates: the unknown kid triggers one refetch, which finds it.
    state["body"] = jwks_for({"k1": first, "k2": second}).encode()
    await trio.sleep(1.1)  # past jwks_min_refresh, so the refetch is allowed
    await harness.connect("bob", token=es256_token("bob", "k2", second))
    hits = state["hits"]
    # A burst of unknown kids costs at most one more fetch per jwks_min_refresh.
    for _ in range(5):
        bogus = await harness.open()
        await bogus.send("auth", {"token": es256_token("eve", "k-unknown", second)})
        await bogus.expect_closed(4001, "invalid token")
    assert state["hits"] - hits <= 1


def test_revoke_command_edits_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "revoked.json"
    assert cli_main(["revoke", "--file", str(path), "--jti", "abc"]) == 0
    assert cli_main(["revoke", "--file", str(path), "--user", "alice", "--before", "100"]) == 0
    revoked = load_revocations(path)
    assert revoked.tokens == frozenset({"abc"})
    assert revoked.users == {"alice": 100.0}
    assert "revoked" in capsys.readouterr().out


@pytest.mark.both_engines
async def test_sigterm_drains_with_1001_and_terminal_audit_lines(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    process, url = await start_server_process(server_config(tmp_path))
    try:
        clients = [await signed_in(nursery, url, token_for(user)) for user in ("alice", "bob")]
        alice, bob = clients
        await alice.send("call-request", call_request("ab", "alice", "bob"))
        await bob.expect("call-request")
        process.send_signal(signal.SIGTERM)
        await bob.expect("call-end", callId="ab", reason="server_shutdown")
        await bob.expect_closed(1001)
        await alice.expect("call-end", reason="server_shutdown")
        await alice.expect_closed(1001)
        with trio.fail_after(STEP):
            assert await process.wait() == 0
        for client in clients:
            await client.stream.aclose()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    for record in records:
        assert_valid_record(record)
    # The trail the real server wrote verifies, final checkpoint included.
    verdict = verify(
        [tmp_path / "audit.log"],
        public_keys=[AUDIT_PUBLIC_KEY],
        hmac_key=AUDIT_KEY,
        anchors=[tmp_path / "anchor" / "audit.anchor"],
    )
    assert verdict.problems == []
    assert verdict.signed_through == verdict.anchored_through == records[-1]["seq"]
    ended = [r for r in records if r["event"] == "call.ended"]
    assert len(ended) == 1 and ended[0]["reason"] == "server_shutdown"
    assert [r["close_code"] for r in records if r["event"] == "conn.close"] == [1001, 1001]


async def test_a_killed_server_restarts_its_trail_and_verify_reports_the_crash(
    nursery: trio.Nursery, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """kill -9, with the line being written cut (what a kill mid-write leaves), then a restart:
    the server seals the cut line off and goes on; verify says "recovered crash", status 3."""
    config = server_config(tmp_path)
    log = tmp_path / "audit.log"
    for run in ("killed", "stopped"):
        process, url = await start_server_process(config)
        try:
            alice = await signed_in(nursery, url, token_for("alice"))
            await alice.send("call-request", call_request(run, "alice", "nobody"))
            await alice.expect("call-reject", reason="unavailable")
            if run == "killed":
                # The reject went out just before its audit record was written: kill after the
                # record is in the file, so what the crash cuts is only the line written below.
                with trio.fail_after(STEP):
                    while not any(
                        '"call.unavailable"' in line and '"killed"' in line
                        for line in log.read_text().splitlines()
                    ):
                        await trio.sleep(0.01)
                process.kill()
                await process.wait()
                with log.open("ab") as out:
                    out.write(b'{"ts":"2026-12-07T10:00:00Z","event":"conn.cl')
            else:
                process.send_signal(signal.SIGTERM)
                with trio.fail_after(STEP):
                    assert await process.wait() == 0
            await alice.stream.aclose()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    text = log.read_text()
    assert '"event":"audit.recovered"' in text and '"discarded_bytes":45' in text
    (tmp_path / "public.pem").write_text(public_pem(AUDIT_PRIVATE_KEY))
    anchor = tmp_path / "anchor" / "audit.anchor"
    args = [str(log), "--public-key", str(tmp_path / "public.pem"), "--anchor", str(anchor)]
    assert cli_main(["audit", "verify", *args]) == 3
    said = capsys.readouterr().out
    assert "recovered_crash" in said and "intact but for a server crash" in said
    # The report verifies first, and goes on: a crash is not tampering.
    assert cli_main(["audit", "report", *args]) == 0
    assert capsys.readouterr().out.count("unavailable") == 4


async def test_sighup_reloads_revocations(nursery: trio.Nursery, tmp_path: Path) -> None:
    config = server_config(tmp_path)
    process, url = await start_server_process(config)
    try:
        alice = await signed_in(nursery, url, token_for("alice", jti="j1"))
        assert cli_main(["revoke", "--config", str(config), "--jti", "j1"]) == 0
        process.send_signal(signal.SIGHUP)
        await alice.expect_closed(4003, "token revoked")
        await alice.stream.aclose()
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(STEP):
            await process.wait()
