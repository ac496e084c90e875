"""A real audit trail from real calls on real sockets, then tampered with in every way.

The trail is built once per module: a server with a rotating, keyed audit file serves calls
reaching every outcome of the contract, restarts, and serves more. Each test copies it and
edits, deletes, swaps, drops or cuts; `callgate audit verify` must name each.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio

from callgate.audit import AuditLog, FileSink
from callgate.cli import main as cli_main
from callgate.trail import calls, checkpoint_files_for, verify, write_report
from conftest import (
    AUDIT_KEY,
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


async def _build(directory: Path) -> None:
    settings = make_settings(
        calls={"ring_timeout": 0.3},
        limits={"call_request_pair": "5/minute"},
    )
    for _ in range(2):  # a restart between the two runs: the chain must continue
        sink = FileSink(directory / "audit.log", rotate_bytes=4096, rotate_seconds=3600)
        audit = AuditLog(sink, key=AUDIT_KEY, strict=True, checkpoint_every=25)
        async with trio.open_nursery() as nursery:
            h = Harness(nursery)
            h.capture.log = audit
            await h.start(settings)
            await _outcomes(h)
            for client in h.clients:
                await client.ws._stream.aclose()
            nursery.cancel_scope.cancel()
        audit.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("trail")
    trio.run(_build, directory)
    return directory


def trail_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if not p.name.endswith(".checkpoints"))


@pytest.fixture
def trail(built: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "trail"
    shutil.copytree(built, copy)
    return copy


def problems(directory: Path) -> list[Any]:
    files = trail_files(directory)
    return verify(files, AUDIT_KEY, checkpoint_files_for(files))


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_the_trail_spans_rotations_and_a_restart(built: Path) -> None:
    files = trail_files(built)
    assert len(files) >= 4, files  # several rotations
    records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    opened = Counter(r.get("reason") for r in records if r["event"] == "audit.opened")
    assert opened["start"] == 2 and opened["rotation"] >= 3
    for record in records:
        assert_valid_record(record)


def test_untouched_trail_is_intact(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert problems(trail) == []
    files = [str(p) for p in trail_files(trail)]
    env_config = trail / "verify.toml"
    env_config.write_text(
        f"[auth]\nsecret = 'x{'y' * 40}'\n[audit]\nkey = '{AUDIT_KEY.decode()}'\n"
    )
    assert cli_main(["audit", "verify", *files, "--config", str(env_config)]) == 0
    assert "intact" in capsys.readouterr().out


def test_an_edited_byte_is_named(trail: Path) -> None:
    target = trail_files(trail)[1]
    lines = lines_of(target)
    # One byte: the last digit of the timestamp.
    lines[3] = re.sub(r'(\d)Z"', lambda m: f'{(int(m.group(1)) + 1) % 10}Z"', lines[3], count=1)
    target.write_text("".join(lines))
    found = problems(trail)
    assert found[0].kind == "edited"
    assert (found[0].file, found[0].line) == (target.name, 4)


def test_a_deleted_line_is_named(trail: Path) -> None:
    target = trail_files(trail)[1]
    lines = lines_of(target)
    del lines[5]
    target.write_text("".join(lines))
    found = problems(trail)
    assert found[0].kind == "deleted"
    assert (found[0].file, found[0].line) == (target.name, 6)


def test_two_swapped_lines_are_named(trail: Path) -> None:
    target = trail_files(trail)[2]
    lines = lines_of(target)
    lines[4], lines[5] = lines[5], lines[4]
    target.write_text("".join(lines))
    found = problems(trail)
    assert found[0].kind == "reordered"
    assert (found[0].file, found[0].line) == (target.name, 5)


def test_a_dropped_rotated_file_is_named(trail: Path) -> None:
    files = trail_files(trail)
    dropped = files[1]
    dropped.unlink()
    found = problems(trail)
    assert found[0].kind == "missing_file"
    assert dropped.name in found[0].message


def test_a_cut_tail_is_named(trail: Path) -> None:
    current = trail / "audit.log"
    lines = lines_of(current)
    current.write_text("".join(lines[:-3]))
    found = problems(trail)
    assert [p.kind for p in found] == ["truncated"]


def test_verify_exit_status_says_broken(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = trail_files(trail)[0]
    lines = lines_of(target)
    del lines[2]
    target.write_text("".join(lines))
    config = trail / "verify.toml"
    config.write_text(f"[auth]\nsecret = 'x{'y' * 40}'\n[audit]\nkey = '{AUDIT_KEY.decode()}'\n")
    files = [str(p) for p in trail_files(trail) if p.suffix != ".toml"]
    assert cli_main(["audit", "verify", *files, "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "NOT intact" in out and f"{target.name}:3: deleted" in out


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
    write_report(calls(files, since="2999-01-01T00:00:00Z"), out, "jsonl", {})
    assert out.getvalue() == ""
    out = io.StringIO()
    write_report(calls(files), out, "table", {"carol": Counter({"denied:forbidden": 1})})
    assert "call_id" in out.getvalue().splitlines()[0]
    assert "carol: denied:forbidden 1" in out.getvalue()
