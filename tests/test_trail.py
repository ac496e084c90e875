"""A real audit trail from real calls on real sockets, then attacked as an auditor would.

The trail is built once per module: a server with a rotating, keyed, signed and anchored audit
file serves calls reaching every outcome of the contract, crashes mid-write (its last line cut,
as kill -9 leaves it), restarts, and serves more. Each test copies it and edits, deletes,
reorders, duplicates, replays, forges, re-seals, drops or cuts; `callgate audit verify` must
name each, with the public key alone and with the HMAC key too, without a traceback.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callgate.audit import (
    AuditLog,
    FileAnchor,
    FileSink,
    Signer,
    canonical,
    chain_digest,
    chain_mac,
    public_pem,
    render,
)
from callgate.cli import main as cli_main
from callgate.trail import (
    EXIT_BROKEN,
    EXIT_CRASHED,
    EXIT_INTACT,
    Verdict,
    calls,
    parse_time,
    verify,
    write_report,
)
from conftest import (
    AUDIT_KEY,
    AUDIT_PRIVATE_KEY,
    AUDIT_PUBLIC_KEY,
    AUDIT_SIGNING_KEY,
    SDP_ANSWER,
    Harness,
    assert_valid_record,
    call_request,
    make_settings,
)


async def _outcomes(h: Harness) -> None:
    """One call for each outcome of contract section 4, plus a rate-limited one."""
    alice, bob = await h.connect("alice"), await h.connect("bob")
    answer = {"type": "answer", "sdp": SDP_ANSWER}
    # answered, then hung up
    await alice.send("call-request", call_request("hangup", "alice", "bob"))
    await bob.expect("call-request")
    await bob.send("call-answer", {"callId": "hangup", "to": "alice", "answer": answer})
    await alice.expect("call-answer")
    await alice.send("call-end", {"callId": "hangup", "to": "bob"})
    await bob.expect("call-end")
    # rejected
    await alice.send("call-request", call_request("rejected", "alice", "bob", "voice"))
    await bob.expect("call-request")
    await bob.send("call-reject", {"callId": "rejected", "to": "alice"})
    await alice.expect("call-reject")
    # cancelled
    await alice.send("call-request", call_request("cancelled", "alice", "bob"))
    await bob.expect("call-request")
    await alice.send("call-end", {"callId": "cancelled", "to": "bob"})
    await bob.expect("call-end", reason="cancelled")
    # unavailable
    await alice.send("call-request", call_request("unavailable", "alice", "nobody"))
    await alice.expect("call-reject", reason="unavailable")
    # busy and glare
    carol = await h.connect("carol")
    await alice.send("call-request", call_request("first", "alice", "bob"))
    await bob.expect("call-request")
    await carol.send("call-request", call_request("busy", "carol", "bob"))
    await carol.expect("call-reject", reason="busy")
    await bob.send("call-request", call_request("glare", "bob", "alice"))
    await bob.expect("call-reject", reason="glare")
    # timeout (ring_timeout is short here)
    await bob.expect("call-end", callId="first", reason="timeout")
    await alice.expect("call-end", callId="first", reason="timeout")
    # peer_disconnected
    await carol.send("call-request", call_request("dropped", "carol", "bob"))
    await bob.expect("call-request")
    await bob.send("call-answer", {"callId": "dropped", "to": "carol", "answer": answer})
    await carol.expect("call-answer")
    await bob.ws.aclose()
    await carol.expect("call-end", reason="peer_disconnected")
    # rate limited (call_request_pair is 5/minute here)
    for n in range(5):
        await carol.send("call-request", call_request(f"spam{n}", "carol", "nobody"))
        await carol.expect("call-reject", reason="unavailable")
    await carol.send("call-request", call_request("spam5", "carol", "nobody"))
    await carol.expect_error("rate_limited")
    # refused messages, for the per-user summary
    await carol.send("call-request", call_request("x", "alice", "bob"))
    await carol.expect_error("forbidden")
    await alice.ws.aclose()
    await carol.ws.aclose()
    await h.settle()


# Half a record, as a crash mid-write leaves it: the restarted server must seal it off.
TORN = b'{"ts":"2026-12-07T10:00:00.000001Z","event":"call.requested","call_id":"lost","cal'


def open_log(directory: Path) -> tuple[AuditLog, FileSink, FileAnchor]:
    """The audit log of the test server: rotating every 4 KiB, keyed, signed, anchored."""
    sink = FileSink(directory / "logs" / "audit.log", rotate_bytes=4096, rotate_seconds=3600)
    anchor = FileAnchor(directory / "anchor" / "audit.anchor")
    audit = AuditLog(
        sink,
        key=AUDIT_KEY,
        signer=Signer(AUDIT_PRIVATE_KEY),
        anchors=[anchor],
        strict=True,
        checkpoint_every=25,
    )
    return audit, sink, anchor


async def _run(directory: Path, *, crash: bool) -> None:
    settings = make_settings(
        calls={"ring_timeout": 0.3},
        limits={"call_request_pair": "5/minute"},
    )
    audit, sink, anchor = open_log(directory)
    async with trio.open_nursery() as nursery:
        h = Harness(nursery)
        h.capture.log = audit
        await h.start(settings)
        await _outcomes(h)
        for client in h.clients:
            await client.stream.aclose()
        nursery.cancel_scope.cancel()
    if crash:  # killed: no final checkpoint, and the line being written is cut
        sink.close()
        anchor.close()
        with (directory / "logs" / "audit.log").open("ab") as log:
            log.write(TORN)
    else:
        audit.close()


async def _build(directory: Path) -> None:
    await _run(directory, crash=True)
    await _run(directory, crash=False)  # the restart: the chain must continue


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("trail")
    trio.run(_build, directory)
    (directory / "public.pem").write_text(public_pem(AUDIT_PRIVATE_KEY))
    return directory


def trail_files(directory: Path) -> list[Path]:
    """The log files in trail order (the rotated ones by time, the current one last)."""
    logs = directory / "logs"
    current = [logs / "audit.log"] if (logs / "audit.log").exists() else []
    return [*sorted(logs.glob("audit.log.2*")), *current]


@pytest.fixture
def trail(built: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "trail"
    shutil.copytree(built, copy)
    return copy


def check(directory: Path, *, hmac: bool = True, anchored: bool = True) -> Verdict:
    return verify(
        trail_files(directory),
        public_keys=[AUDIT_PUBLIC_KEY],
        hmac_key=AUDIT_KEY if hmac else None,
        anchors=[directory / "anchor" / "audit.anchor"] if anchored else [],
    )


def kinds(verdict: Verdict) -> list[str]:
    return [problem.kind for problem in verdict.problems if problem.is_tampering]


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def records_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def test_the_trail_spans_rotations_a_crash_and_a_restart(built: Path) -> None:
    files = trail_files(built)
    assert len(files) >= 4, files  # several rotations
    records = [json.loads(line) for f in files for line in lines_of(f) if line.endswith("}\n")]
    opened = Counter(r.get("reason") for r in records if r["event"] == "audit.opened")
    assert opened["start"] == 2 and opened["rotation"] >= 3
    recovered = [r for r in records if r["event"] == "audit.recovered"]
    assert len(recovered) == 1 and recovered[0]["discarded_bytes"] == len(TORN)
    # The torn line is ended and left as evidence; the chain goes on without a repeated seq.
    seqs = [r["seq"] for r in records]
    assert seqs == list(range(1, len(records) + 1))
    for record in records:
        assert_valid_record(record)
    # Every call record carries the server's call key, unique per call across the restart.
    requested = [r for r in records if r["event"] == "call.requested"]
    assert len({r["call_key"] for r in requested}) == len(requested)
    assert all("call_key" in r for r in records if r["event"].startswith("call."))


@pytest.mark.parametrize("hmac", [False, True], ids=["public-key", "public-and-hmac-key"])
def test_untouched_trail_is_intact_but_for_the_crash(built: Path, hmac: bool) -> None:
    verdict = check(built, hmac=hmac)
    assert [p.kind for p in verdict.problems] == ["recovered_crash"], verdict.problems
    assert verdict.exit_status == EXIT_CRASHED
    assert verdict.signed_through == verdict.anchored_through == verdict.last_seq


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = cli_main(args)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return status, captured.out + captured.err


def test_verify_needs_only_the_public_key_no_token_settings(
    built: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("CALLGATE_AUTH_SECRET", "CALLGATE_AUDIT_KEY"):
        monkeypatch.delenv(variable, raising=False)
    files = [str(p) for p in trail_files(built)]
    anchor = str(built / "anchor" / "audit.anchor")
    args = ["audit", "verify", *files, "--public-key", str(built / "public.pem")]
    status, out = _cli([*args, "--anchor", anchor], capsys)
    assert status == EXIT_CRASHED, out
    assert "recovered_crash" in out and "intact but for a server crash" in out
    assert "anchored through" in out
    # The HMAC key alone, from the environment (no config file, no auth.secret anywhere).
    monkeypatch.setenv("CALLGATE_AUDIT_KEY", AUDIT_KEY.decode())
    status, out = _cli(["audit", "verify", *files], capsys)
    assert status == EXIT_CRASHED, out
    assert "a cut of the newest records cannot be seen" in out
    # No key at all: the command cannot run.
    monkeypatch.delenv("CALLGATE_AUDIT_KEY")
    status, out = _cli(["audit", "verify", *files], capsys)
    assert status == 2 and "--public-key" in out


def test_a_file_named_twice_and_the_anchor_in_a_glob_are_no_problem(
    trail: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # What `audit.log*` takes in when the anchor is beside the log: it is skipped, not read.
    beside = trail / "logs" / "audit.log.anchor"
    shutil.copy(trail / "anchor" / "audit.anchor", beside)
    files = [str(p) for p in (trail / "logs").glob("audit.log*")]
    assert str(beside) in files
    args = ["audit", "verify", *files, files[0], "--public-key", str(trail / "public.pem")]
    status, out = _cli(args, capsys)
    assert status == EXIT_CRASHED, out
    assert "reordered" not in out and "skipped" in out


def test_formatting_only_changes_are_not_flagged(trail: Path) -> None:
    """Spaces, key order, escapes and CRLF line ends change no record."""
    for path in trail_files(trail):
        out = []
        for line in lines_of(path):
            if not line.endswith("}\n"):
                out.append(line)
                continue
            record = json.loads(line)
            reordered = dict(reversed(list(record.items())))
            text = json.dumps(reordered, indent=None, separators=(", ", " : "))
            out.append(text.replace("a", "\\u0061", 1) + "\r\n")
        path.write_text("".join(out))
    verdict = check(trail)
    assert kinds(verdict) == [], verdict.problems


# -- the tamper corpus ----------------------------------------------------------------------------

Tamper = Callable[[Path], None]
CORPUS: dict[str, tuple[Tamper, set[str]]] = {}


def tamper(*first: str) -> Callable[[Tamper], Tamper]:
    """Register a manipulation and the kinds its first reported problem may have."""

    def register(function: Tamper) -> Tamper:
        CORPUS[function.__name__.removeprefix("_").replace("_", "-")] = (function, set(first))
        return function

    return register


def rewrite(path: Path, change: Callable[[list[str]], object]) -> None:
    lines = lines_of(path)
    change(lines)
    path.write_text("".join(lines))


def middle_file(trail: Path) -> Path:
    return trail_files(trail)[2]


def newest(trail: Path) -> Path:
    return trail / "logs" / "audit.log"


def _set(lines: list[str], index: int, **fields: Any) -> None:
    record = json.loads(lines[index])
    record.update(fields)
    lines[index] = json.dumps(record, separators=(",", ":")) + "\n"


@tamper("edited")
def _edit_a_byte(trail: Path) -> None:
    def change(lines: list[str]) -> None:
        lines[3] = lines[3].replace('Z"', 'Z "', 1).replace(":0", ":1", 1)

    rewrite(middle_file(trail), change)


@tamper("edited")
def _edit_who_called(trail: Path) -> None:
    for path in trail_files(trail):
        text = path.read_text()
        if '"caller":"alice"' in text:
            path.write_text(text.replace('"caller":"alice"', '"caller":"mallory"', 1))
            return


@tamper("edited")
def _edit_a_record_of_the_newest_file(trail: Path) -> None:
    """Past the last rotation: only the checkpoint after it (or its MAC) can tell."""
    rewrite(newest(trail), lambda lines: _set(lines, 2, addr="10.9.9.9"))


@tamper("deleted")
def _delete_the_first_record_of_a_file(trail: Path) -> None:
    rewrite(middle_file(trail), lambda lines: lines.pop(0))


@tamper("deleted")
def _delete_a_middle_record_of_a_file(trail: Path) -> None:
    rewrite(middle_file(trail), lambda lines: lines.pop(5))


@tamper("deleted")
def _delete_the_last_record_of_a_file(trail: Path) -> None:
    rewrite(middle_file(trail), lambda lines: lines.pop())


@tamper("missing_start")
def _delete_the_first_record_of_the_trail(trail: Path) -> None:
    rewrite(trail_files(trail)[0], lambda lines: lines.pop(0))


@tamper("truncated")
def _delete_the_last_record_of_the_trail(trail: Path) -> None:
    rewrite(newest(trail), lambda lines: lines.pop())


@tamper("reordered")
def _swap_two_records(trail: Path) -> None:
    def change(lines: list[str]) -> None:
        lines[4], lines[5] = lines[5], lines[4]

    rewrite(middle_file(trail), change)


@tamper("duplicate")
def _duplicate_a_record(trail: Path) -> None:
    rewrite(middle_file(trail), lambda lines: lines.insert(5, lines[4]))


@tamper("reordered")
def _replay_an_old_record(trail: Path) -> None:
    old = lines_of(trail_files(trail)[0])[3]
    rewrite(newest(trail), lambda lines: lines.insert(len(lines) - 1, old))


@tamper("edited")
def _a_line_from_another_trail(trail: Path) -> None:
    """The record with the same seq from another server's trail (same keys, other records)."""
    other = trail / "other"
    audit = AuditLog(
        FileSink(other / "audit.log", 1 << 20, 3600),
        key=AUDIT_KEY,
        signer=Signer(AUDIT_PRIVATE_KEY),
    )
    target = middle_file(trail)
    seq = json.loads(lines_of(target)[4])["seq"]
    for n in range(seq):
        audit.write("conn.open", {"conn": f"c{n}", "addr": "10.0.0.1"})
    audit.close()
    foreign = next(line for line in lines_of(other / "audit.log") if f'"seq":{seq},' in line)
    shutil.rmtree(other)

    def change(lines: list[str]) -> None:
        lines[4] = foreign

    rewrite(target, change)


@tamper("missing_start")
def _drop_the_oldest_files_and_forge_a_first_record(trail: Path) -> None:
    files = trail_files(trail)
    files[0].unlink()
    files[1].unlink()
    first = json.loads(lines_of(files[2])[0])
    forged = {
        "ts": first["ts"],
        "event": "auth.failed",
        "conn": "x",
        "addr": "10.6.6.6",
        "reason": "bad_signature",
        "seq": first["seq"] - 1,
        "mac": "0" * 64,
    }
    rewrite(files[2], lambda lines: lines.insert(0, json.dumps(forged) + "\n"))


def reseal(
    trail: Path,
    edit: Callable[[dict[str, Any]], None],
    private: Ed25519PrivateKey,
    hmac_key: bytes,
    claimed_key_id: str | None = None,
) -> None:
    """What an attacker with their own keys does: change a record, then rebuild both chains and
    every checkpoint's signature, as the server would have (the anchor is out of reach)."""
    mac, digest = "", ""
    signer = Signer(private)
    for path in trail_files(trail):
        out = []
        for line in lines_of(path):
            if not line.endswith("}\n"):
                out.append(line)  # the torn line stays, sealed as before
                continue
            record = json.loads(line)
            edit(record)
            record.pop("mac", None)
            if record["event"] == "audit.opened":
                record.update(prev=digest, prev_mac=mac)
            if record["event"] == "audit.checkpoint":
                record["digest"] = digest
                signer.seal(record)
                if claimed_key_id is not None:
                    record["key_id"] = claimed_key_id
            digest = chain_digest(digest, canonical(record))
            mac = chain_mac(hmac_key, mac, record)
            record["mac"] = mac
            out.append(render(record) + "\n")
        path.write_text("".join(out))


def _to_mallory(record: dict[str, Any]) -> None:
    if record.get("caller") == "alice":
        record["caller"] = "mallory"


ATTACKER_KEY = b"the-attackers-own-hmac-key-32-bytes-long"


@tamper("bad_checkpoint", "edited")
def _reseal_with_another_key(trail: Path) -> None:
    reseal(trail, _to_mallory, Ed25519PrivateKey.generate(), ATTACKER_KEY)


@tamper("bad_checkpoint", "edited")
def _reseal_claiming_the_servers_key_id(trail: Path) -> None:
    real_id = Signer(AUDIT_PRIVATE_KEY).key_id
    reseal(trail, _to_mallory, Ed25519PrivateKey.generate(), ATTACKER_KEY, real_id)


@tamper("missing_start")
def _drop_the_oldest_file(trail: Path) -> None:
    trail_files(trail)[0].unlink()


@tamper("deleted")
def _drop_a_middle_file(trail: Path) -> None:
    middle_file(trail).unlink()


@tamper("truncated")
def _drop_the_newest_file(trail: Path) -> None:
    newest(trail).unlink()


@tamper("truncated")
def _cut_the_newest_records(trail: Path) -> None:
    rewrite(newest(trail), lambda lines: lines.__delitem__(slice(3, None)))


@tamper("truncated", "deleted")
def _cut_the_newest_records_and_strip_the_checkpoints_left(trail: Path) -> None:
    for path in trail_files(trail)[-2:]:
        rewrite(path, lambda lines: lines.__delitem__(slice(len(lines) // 2, None)))
    for path in trail_files(trail):
        text = "".join(x for x in lines_of(path) if '"audit.checkpoint"' not in x)
        path.write_text(text)


@tamper("unreadable")
def _a_duplicate_key(trail: Path) -> None:
    def change(lines: list[str]) -> None:
        index = next(i for i, line in enumerate(lines) if '"caller":"' in line)
        lines[index] = lines[index].replace('{"ts"', '{"caller":"mallory","ts"', 1)

    for path in trail_files(trail):
        if '"caller":"' in path.read_text():
            rewrite(path, change)
            return


def _hostile(value: str) -> Tamper:
    def change(trail: Path) -> None:
        def put(lines: list[str]) -> None:
            lines[4] = re.sub(r'"seq":\d+', f'"seq":{value}', lines[4])

        rewrite(middle_file(trail), put)

    return change


for _name, _value, _kinds in [
    ("a-negative-seq", "-1000000000", {"unreadable"}),
    ("a-seq-of-2-to-the-40", str(2**40), {"deleted", "reordered"}),
    ("a-seq-past-the-safe-integers", str(2**64), {"unreadable"}),
    ("a-seq-of-5000-digits", "9" * 5000, {"unreadable"}),
    ("an-infinite-seq", "1e400", {"unreadable"}),
    ("a-nan-seq", "NaN", {"unreadable"}),
    ("a-float-seq", "7.5", {"unreadable"}),
    ("a-nested-seq", '{"a":[1]}', {"unreadable"}),
]:
    CORPUS[_name] = (_hostile(_value), _kinds)


@tamper("unreadable")
def _a_line_of_a_megabyte(trail: Path) -> None:
    rewrite(middle_file(trail), lambda lines: lines.insert(3, "{" + "x" * 2**20 + "}\n"))


@tamper("unreadable")
def _binary_garbage(trail: Path) -> None:
    with middle_file(trail).open("r+b") as handle:
        handle.seek(200)
        handle.write(b"\xff\xfe\x00garbage")


@tamper("unreadable")
def _a_cut_line_in_the_middle(trail: Path) -> None:
    rewrite(middle_file(trail), lambda lines: lines.__setitem__(4, lines[4][:40] + "\n"))


@pytest.mark.parametrize("hmac", [False, True], ids=["public-key", "public-and-hmac-key"])
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_manipulation_is_detected(trail: Path, name: str, hmac: bool) -> None:
    manipulate, first_kinds = CORPUS[name]
    manipulate(trail)
    verdict = check(trail, hmac=hmac)
    found = kinds(verdict)
    assert found, verdict.problems
    assert found[0] in first_kinds, verdict.problems
    assert verdict.exit_status == EXIT_BROKEN


@pytest.mark.parametrize("claimed", [None, Signer(AUDIT_PRIVATE_KEY).key_id])
def test_a_resealed_trail_fails_on_its_signatures_alone(trail: Path, claimed: str | None) -> None:
    """No anchor, no HMAC key: the public key alone refuses checkpoints it did not sign."""
    reseal(trail, _to_mallory, Ed25519PrivateKey.generate(), ATTACKER_KEY, claimed)
    verdict = check(trail, hmac=False, anchored=False)
    assert kinds(verdict)[0] == "bad_checkpoint", verdict.problems
    expected = "does not verify" if claimed else "which was not given"
    assert expected in verdict.problems[0].message


def test_the_cli_names_a_break_with_its_file_and_line(
    trail: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = middle_file(trail)
    _duplicate_a_record(trail)
    files = [str(p) for p in trail_files(trail)]
    args = ["audit", "verify", *files, "--public-key", str(trail / "public.pem")]
    status, out = _cli([*args, "--anchor", str(trail / "anchor" / "audit.anchor")], capsys)
    assert status == EXIT_BROKEN
    assert f"{target.name}:6: duplicate" in out and "NOT intact" in out


def test_a_torn_tail_is_a_crash_not_tampering(trail: Path) -> None:
    with newest(trail).open("ab") as log:
        log.write(TORN)
    verdict = check(trail)
    assert kinds(verdict) == [], verdict.problems
    assert [p.kind for p in verdict.problems] == ["recovered_crash", "torn_tail"]
    assert verdict.exit_status == EXIT_CRASHED


def test_a_torn_tail_is_sealed_when_the_server_starts_again(trail: Path) -> None:
    with newest(trail).open("ab") as log:
        log.write(TORN[:17])
    audit, _, _ = open_log(trail)
    audit.write("conn.open", {"conn": "after", "addr": "127.0.0.1"})
    audit.close()
    verdict = check(trail)
    assert [p.kind for p in verdict.problems] == ["recovered_crash", "recovered_crash"]
    assert verdict.signed_through == verdict.anchored_through == verdict.last_seq


def test_the_window_after_the_last_anchored_checkpoint(trail: Path) -> None:
    """The documented limit: records written after the last checkpoint that reached the anchor
    can be cut unseen (here the server died before its final checkpoint was anchored)."""
    anchor = trail / "anchor" / "audit.anchor"
    rewrite(anchor, lambda lines: lines.pop())
    last_anchored = json.loads(lines_of(anchor)[-1])["seq"]

    files = trail_files(trail)
    holder = next(p for p in files if f'"seq":{last_anchored},' in p.read_text())
    for later in files[files.index(holder) + 1 :]:
        later.unlink()

    def cut(lines: list[str]) -> None:
        index = next(i for i, x in enumerate(lines) if f'"seq":{last_anchored},' in x)
        del lines[index + 1 :]

    rewrite(holder, cut)
    verdict = check(trail, hmac=False)
    assert kinds(verdict) == [] and verdict.anchored_through == verdict.last_seq


def test_retention_is_verified_from_the_anchor(
    trail: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    files = trail_files(trail)
    kept = files[2]
    config = trail / "audit.toml"
    config.write_text(
        f"[audit]\nsigning_key = '{AUDIT_SIGNING_KEY}'\n"
        f"anchor_path = '{trail / 'anchor' / 'audit.anchor'}'\n"
    )
    status, out = _cli(["audit", "retain", str(kept), "--config", str(config)], capsys)
    assert status == 0, out
    for old in files[:2]:
        old.unlink()
    verdict = check(trail)
    assert kinds(verdict) == [], verdict.problems
    assert (
        verdict.retained_from is not None
        and verdict.first_seq == json.loads(lines_of(kept)[0])["seq"]
    )
    # One file more gone than the retention record allows: the beginning is missing.
    kept.unlink()
    assert kinds(check(trail))[0] == "missing_start"


def test_report_has_the_right_row_for_every_outcome(built: Path) -> None:
    refusals: dict[str, Counter[str]] = {}
    rows = list(calls(trail_files(built), refusals=refusals))
    first_run = {row.call_id: row for row in rows[: len(rows) // 2]}
    expected = {
        "hangup": ("ended", "hangup"),
        "rejected": ("rejected", "rejected"),
        "cancelled": ("cancelled", "cancelled"),
        "unavailable": ("unavailable", "unavailable"),
        "busy": ("busy", "busy"),
        "glare": ("busy", "glare"),
        "first": ("timeout", "timeout"),
        "dropped": ("ended", "peer_disconnected"),
        "spam5": ("rate_limited", "call_request_pair"),
    }
    for call_id, (outcome, reason) in expected.items():
        row = first_run[call_id]
        assert (row.outcome, row.reason) == (outcome, reason), row
    hangup = first_run["hangup"]
    assert hangup.caller == "alice" and hangup.callee == "bob" and hangup.media == "video"
    assert hangup.answered and hangup.ended and hangup.duration_ms is not None
    assert first_run["rejected"].media == "voice"
    assert first_run["first"].devices == 1
    assert len(hangup.connections) == 2  # the caller's device and the answering one
    assert refusals["carol"]["denied:forbidden"] == 2
    assert refusals["carol"]["rate_limited:call_request_pair"] == 2


def test_report_formats_and_filters(built: Path) -> None:
    files = trail_files(built)
    out = io.StringIO()
    count = write_report(calls(files, user="carol"), out, "csv", {})
    parsed = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert len(parsed) == count > 0
    assert all("carol" in (row["caller"], row["callee"]) for row in parsed)
    out = io.StringIO()
    write_report(calls(files, since=parse_time("2999-01-01T00:00:00Z")), out, "jsonl", {})
    assert out.getvalue() == ""
    out = io.StringIO()
    write_report(calls(files), out, "table", {"carol": Counter({"denied:forbidden": 1})})
    assert "call_id" in out.getvalue().splitlines()[0]
    assert "carol: denied:forbidden 1" in out.getvalue()


def test_report_verifies_first_and_refuses_a_broken_trail(
    trail: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit_who_called(trail)
    files = [str(p) for p in trail_files(trail)]
    args = ["audit", "report", *files, "--public-key", str(trail / "public.pem")]
    status, out = _cli(args, capsys)
    assert status == EXIT_BROKEN and "NOT intact" in out and "--unverified" in out
    assert "call_key" not in out  # no table
    status, out = _cli([*args, "--unverified"], capsys)
    assert status == 0 and "UNVERIFIED" in out and "mallory" in out


def test_report_survives_bad_values_and_shows_ids_in_full(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long_call, long_user = "c" * 40 + "-end", "u" * 30 + "-end"
    log = tmp_path / "audit.log"
    audit = AuditLog(FileSink(log, 1 << 20, 3600), key=AUDIT_KEY, signer=Signer(AUDIT_PRIVATE_KEY))
    fields = {"call_key": "k.1", "call_id": long_call, "caller": long_user, "callee": "bob"}
    audit.write("call.requested", {**fields, "media": "video", "conn": "c1"})
    audit.write("call.ringing", {**fields, "devices": "many"})  # not a number
    audit.write("call.ended", {**fields, "reason": "hangup", "duration_ms": "long"})
    # The same caller-chosen id again, another call: the server's key tells them apart.
    audit.write("call.requested", {**fields, "call_key": "k.2", "conn": "c2"})
    audit.write("call.unavailable", {**fields, "call_key": "k.2", "reason": "unavailable"})
    # A summary of repeated refusals counts as `count` of them (audit.RefusalDigest).
    denied = {"conn": "c1", "user": long_user, "msg_event": "call-end", "reason": "forbidden"}
    audit.write("authz.denied", denied)
    for _ in range(6):
        audit.write("authz.denied", denied)
    audit.close()
    rewrite(log, lambda lines: _set(lines, 1, ts="not a time"))  # reported unverified below
    args = ["audit", "report", str(log), "--unverified"]
    status, out = _cli(args, capsys)
    assert status == 0
    assert long_call in out and long_user in out
    assert out.count(long_call) == 2 and "k.1" in out and "k.2" in out
    assert f"{long_user}: denied:forbidden 7" in out
    status, out = _cli([*args, "--since", "yesterday"], capsys)
    assert status == 2 and "--since" in out


def test_keygen_public_key_and_bad_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    private = tmp_path / "signing.pem"
    status, out = _cli(["audit", "keygen", str(private)], capsys)
    assert status == 0 and private.stat().st_mode & 0o777 == 0o600
    printed = out[out.index("-----BEGIN PUBLIC KEY") :]
    config = tmp_path / "audit.toml"
    config.write_text(f"[audit]\nsigning_key_file = '{private}'\n")
    status, out = _cli(["audit", "public-key", "--config", str(config)], capsys)
    assert status == 0 and printed in out
    status, out = _cli(["audit", "keygen", str(private)], capsys)
    assert status == 2 and "not overwriting" in out
    # A private key where the verifier wants the public one, and a signing key that is no key.
    log = tmp_path / "audit.log"
    log.write_text("")
    status, out = _cli(["audit", "verify", str(log), "--public-key", str(private)], capsys)
    assert status == 2 and "public key only" in out
    config.write_text("[audit]\nsigning_key = 'bm90IGEga2V5'\n")
    status, out = _cli(["audit", "public-key", "--config", str(config)], capsys)
    assert status == 2 and "audit.signing_key" in out


def test_two_nodes_sharing_one_anchor_are_verified_each_on_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cluster: each node writes its own trail; their checkpoints meet in one anchor (a shared
    syslog). Each trail is checked against its own anchor lines, told apart by its trail id."""
    shared = tmp_path / "shared.anchor"
    logs = {}
    for node in ("n1", "n2"):
        sink = FileSink(tmp_path / node / "audit.log", 2048, 3600)
        anchor = FileAnchor(shared)
        logs[node] = (
            AuditLog(sink, signer=Signer(AUDIT_PRIVATE_KEY), anchors=[anchor], checkpoint_every=4),
            anchor,
        )
    for n in range(30):
        for node, (audit, _) in logs.items():
            audit.write("conn.open", {"conn": f"{node}-{n}", "addr": "127.0.0.1"})
    for audit, _ in logs.values():
        audit.close()
    files = sorted(str(p) for p in tmp_path.glob("n*/audit.log*"))
    args = [*files, "--public-key", str(_public_pem_file(tmp_path)), "--anchor", str(shared)]
    status, out = _cli(["audit", "verify", *args], capsys)
    assert status == EXIT_INTACT, out
    assert out.count("-- trail ") == 2 and out.count("anchored through seq") == 2
    assert out.count("audit trail intact:") == 2
    status, out = _cli(["audit", "report", *args], capsys)
    assert status == 0, out
    # The newest records of one node cut: that trail, and only it, is truncated.
    rewrite(tmp_path / "n2" / "audit.log", lambda lines: lines.__delitem__(slice(1, None)))
    status, out = _cli(["audit", "verify", *args], capsys)
    assert (
        status == EXIT_BROKEN
        and out.count("truncated") == 1
        and out.count("audit trail intact") == 1
    )


def _public_pem_file(folder: Path) -> Path:
    path = folder / "public.pem"
    path.write_text(public_pem(AUDIT_PRIVATE_KEY))
    return path


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_no_byte_an_attacker_writes_makes_verify_crash(built: Path, data: st.DataObject) -> None:
    """Random bytes overwritten, inserted or cut anywhere in any file, the anchor included: a
    verdict, never a traceback."""
    with tempfile.TemporaryDirectory() as scratch:
        trail = Path(scratch) / "trail"
        shutil.copytree(built, trail)
        files = [*trail_files(trail), trail / "anchor" / "audit.anchor"]
        target = data.draw(st.sampled_from(files))
        content = bytearray(target.read_bytes())
        at = data.draw(st.integers(0, len(content) - 1))
        noise = data.draw(st.binary(min_size=1, max_size=12))
        how = data.draw(st.sampled_from(["overwrite", "insert", "cut"]))
        if how == "overwrite":
            content[at : at + len(noise)] = noise
        elif how == "insert":
            content[at:at] = noise
        else:
            del content[at : at + len(noise)]
        if bytes(content) == target.read_bytes():
            return
        target.write_bytes(bytes(content))
        verdict = check(trail, hmac=data.draw(st.booleans()))
        assert verdict.exit_status in (EXIT_BROKEN, EXIT_CRASHED, EXIT_INTACT)


def _forged_trail(directory: Path) -> Path:
    """A trail written by hand by someone with no key: its own trail id, chained by the public
    rule (anyone can compute it), no checkpoint, one made-up call."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "forged.log"
    records: list[dict[str, Any]] = [
        {
            "event": "audit.opened",
            "reason": "start",
            "prev": "",
            "prev_mac": "",
            "trail": "f00dfeedf00dfeed",
        },
        {
            "event": "call.requested",
            "call_id": "fake",
            "call_key": "z.1",
            "caller": "mallory",
            "callee": "bob",
            "media": "voice",
        },
        {
            "event": "call.ended",
            "call_id": "fake",
            "call_key": "z.1",
            "caller": "mallory",
            "callee": "bob",
            "media": "voice",
            "reason": "hangup",
            "by": "mallory",
            "answered": True,
            "duration_ms": 99000,
        },
    ]
    lines = []
    for seq, fields in enumerate(records, start=1):
        record = {"ts": "2026-12-07T00:00:00.000000Z", **fields, "seq": seq, "mac": "0" * 64}
        lines.append(json.dumps(record) + "\n")
    path.write_text("".join(lines))
    return path


def test_a_forged_trail_in_place_of_a_deleted_one_is_not_intact(
    trail: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real trail deleted, a keyless forger's trail of another id given instead: the anchor
    vouches for a trail no file was given of, and the forged one is signed by no key."""
    forged = _forged_trail(trail / "forged")
    for path in trail_files(trail):
        path.unlink()
    key, anchor = str(trail / "public.pem"), str(trail / "anchor" / "audit.anchor")
    status, out = _cli(
        ["audit", "verify", str(forged), "--public-key", key, "--anchor", anchor], capsys
    )
    assert status == EXIT_BROKEN, out
    assert "no file of it was given" in out and "unsigned" in out
    status, out = _cli(
        ["audit", "report", str(forged), "--public-key", key, "--anchor", anchor], capsys
    )
    assert (
        status == EXIT_BROKEN
        and "mallory" not in out.split("callgate: no report")[0].split("NOT intact")[-1]
    )


def test_a_forged_trail_beside_the_real_one_is_not_intact(
    trail: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    forged = _forged_trail(trail / "forged")
    files = [str(p) for p in trail_files(trail)]
    key, anchor = str(trail / "public.pem"), str(trail / "anchor" / "audit.anchor")
    status, out = _cli(
        ["audit", "verify", *files, str(forged), "--public-key", key, "--anchor", anchor], capsys
    )
    assert status == EXIT_BROKEN, out
    assert "unsigned" in out
    status, out = _cli(["audit", "report", *files, str(forged), "--public-key", key], capsys)
    assert status == EXIT_BROKEN and "no report" in out and "z.1" not in out


def test_a_mac_with_non_ascii_characters_is_an_edit_not_a_crash(trail: Path) -> None:
    """hmac.compare_digest refuses str with non-ASCII characters (the fuzz test found it)."""
    rewrite(middle_file(trail), lambda lines: _set(lines, 3, mac="\u00e9" * 64))
    verdict = check(trail)
    assert kinds(verdict)[0] == "edited", verdict.problems
