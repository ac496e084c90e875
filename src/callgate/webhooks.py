"""Signed webhooks: the call lifecycle, told to the app's backend over HTTPS.

Theory of operation
-------------------
Webhooks are derived from the audit records as the trail writes them (`AuditLog.observer` is
`WebhookSender.observe_audit`; a burst of refusals the trail sums up in one record is one
webhook): what an auditor reads and what the backend is told never disagree, and a webhook
can only carry what the audit allow-list lets through, so never SDP, ICE candidates or tokens.
`webhooks_of` is the pure mapping from a record to webhooks.

Each webhook gets an id (`webhook-id`, random) when it is made, kept on every attempt: a
receiver that has seen an id has seen that event, so repeats are safe (Standard Webhooks,
https://www.standardwebhooks.com/). Headers: `webhook-id`, `webhook-timestamp` (unix seconds of
the attempt) and `webhook-signature` (`v1,` + base64 HMAC-SHA256 over `{id}.{timestamp}.{body}`,
keyed with the `whsec_` secret), signed by the `standardwebhooks` package.

Delivery is at least once, and never slows signaling: observing a record only appends to a
queue (`send_nowait` on an unbounded channel, with the bound counted here), and when
`queue_size` webhooks are waiting or being sent, a new one is dropped, counted in
`callgate_webhook_drops_total{reason="queue_full"}` and audited (`webhook.dropped`). `workers`
tasks send: each takes a call (or connection) that has webhooks waiting and sends them one at a
time until it has none, so a call's webhooks arrive in order, and a call whose webhook is being
retried holds up no other call. An attempt that fails (a status other than 2xx, no answer within
`timeout`, a connection or TLS error) is tried again after `backoff` seconds, doubling up to
`max_backoff`, `retries` times; then the webhook is dropped (`reason="gave_up"`). Redirects are
not followed; certificates are checked (httpx's defaults, certifi's roots).
"""

from __future__ import annotations

import collections
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import trio
from standardwebhooks.webhooks import Webhook as Signer

from callgate.audit import TERMINAL_CALL_EVENTS
from callgate.config import WebhookSettings
from callgate.log import get_logger
from callgate.metrics import Metrics

log = get_logger("callgate.webhooks")

# Audit records of a call step that become a webhook of the same name.
_CALL_STEPS = frozenset(
    {"call.requested", "call.pending", "call.ringing", "call.answered", "call.rejected"}
)
# How often a continuing burst of drops is summed up in the audit trail, seconds.
DROP_SUMMARY_INTERVAL = 60.0

Audit = Callable[[str, Mapping[str, Any]], None]


SIGNIN_REFUSED = "signin.refused"


@dataclass(frozen=True, slots=True)
class Hook:
    """One webhook: made once, sent until delivered or given up, the same bytes every time."""

    id: str
    type: str
    key: str  # what orders it: its call (caller and call id), or its connection
    body: bytes


def webhooks_of(event: str, fields: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """The webhooks (type, ordering key, data) an audit record makes; most make none."""
    if event == "auth.failed":
        data = {"reason": fields.get("reason"), "user": fields.get("user")}
        return [(SIGNIN_REFUSED, f"conn:{fields.get('conn')}", _present(data))]
    if not event.startswith("call."):
        return []
    key = f"call:{fields.get('caller')}:{fields.get('call_id')}"
    call = {
        "callId": fields.get("call_id"),
        "caller": fields.get("caller"),
        "callee": fields.get("callee"),
        "media": fields.get("media"),
    }
    hooks: list[tuple[str, str, dict[str, Any]]] = []
    if event in _CALL_STEPS:
        step = {**call, "devices": fields.get("devices"), "reason": fields.get("reason")}
        hooks.append((event, key, _present(step)))
    elif event == "call.missed":
        hooks.append((event, key, {**call, "reason": fields.get("reason")}))
    if event in TERMINAL_CALL_EVENTS:
        reason = fields.get("reason")
        if event in {"call.rate_limited", "call.unavailable", "call.timeout"}:
            reason = event.removeprefix("call.")
        ended = {
            **call,
            "reason": reason,
            "answered": bool(fields.get("answered", False)),
            "durationMs": int(fields.get("duration_ms") or 0),
            "by": fields.get("by"),
        }
        hooks.append(("call.ended", key, _present(ended)))
    return hooks


def _present(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


def new_hook(kind: str, key: str, data: Mapping[str, Any], now: float) -> Hook:
    """A webhook with a fresh id; its body, in the Standard Webhooks payload shape."""
    stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
    body = orjson.dumps({"type": kind, "timestamp": stamp.replace("+00:00", "Z"), "data": data})
    return Hook(f"msg_{secrets.token_urlsafe(18)}", kind, key, body)


class WebhookSender:
    """The queue and the workers that send it (`run`); fed by `observe_audit`, which never waits."""

    def __init__(
        self,
        settings: WebhookSettings,
        metrics: Metrics,
        audit: Audit,
    ) -> None:
        if settings.url is None or settings.secret is None:
            raise ValueError("webhooks need a url and a secret")  # checked when settings load
        self._settings = settings
        self._url = settings.url
        self._signer = Signer(settings.secret.get_secret_value())
        self._wanted = frozenset(settings.events)
        self._metrics = metrics
        self._audit = audit
        # Each ordering key (a call, a connection) with webhooks to send has its own queue here,
        # and is in `_ready` once: a free worker takes the key and sends its queue in order. A
        # call whose webhook is being retried so holds up only itself, never other calls.
        self._by_key: dict[str, collections.deque[Hook]] = {}
        self._ready, self._ready_keys = trio.open_memory_channel[str](float("inf"))
        self._queued = 0  # made and not yet delivered or given up
        # Of those, `signin.refused` ones: strangers cause them, so they get a tenth of the
        # queue and can never crowd out a call's webhooks (`call.pending` wakes a phone).
        self._queued_signins = 0
        self._max_signins = max(1, settings.queue_size // 10)
        self._idle = trio.Event()
        self._idle.set()
        # Bursts of drops, by reason: [drops not yet in the audit trail, when that count began].
        self._bursts: dict[str, list[float]] = {}

    @property
    def queued(self) -> int:
        """Webhooks waiting or being sent."""
        return self._queued

    @property
    def attempt_timeout(self) -> float:
        return self._settings.timeout

    def observe_audit(self, event: str, fields: Mapping[str, Any]) -> None:
        """Queue the webhooks an audit record makes. Never waits; drops when the queue is full."""
        for kind, key, data in webhooks_of(event, fields):
            if kind in self._wanted:
                self.enqueue(new_hook(kind, key, data, time.time()))

    def enqueue(self, hook: Hook) -> None:
        signin = hook.type == SIGNIN_REFUSED
        if self._queued >= self._settings.queue_size or (
            signin and self._queued_signins >= self._max_signins
        ):
            self._dropped(hook, "queue_full")
            return
        self._queued += 1
        self._queued_signins += signin
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        waiting = self._by_key.get(hook.key)
        if waiting is None:
            self._by_key[hook.key] = collections.deque([hook])
            self._ready.send_nowait(hook.key)
        else:
            waiting.append(hook)  # after the key's others; its worker takes it in turn
        self._burst_over("queue_full")

    async def drain(self) -> None:
        """Wait until nothing is queued (the caller bounds the wait: a shutdown's deadline)."""
        await self._idle.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send until cancelled."""
        settings = self._settings
        async with httpx.AsyncClient(
            # The attempt's deadline is `timeout` (below); httpx's own is the same, per phase.
            timeout=httpx.Timeout(settings.timeout),
            follow_redirects=False,
            headers={"user-agent": "callgate-webhooks", "content-type": "application/json"},
        ) as client:
            try:
                async with trio.open_nursery() as nursery:
                    for _ in range(settings.workers):
                        nursery.start_soon(self._work, client)
                    task_status.started()
            finally:
                for reason in list(self._bursts):
                    self._sum_up(reason)

    async def _work(self, client: httpx.AsyncClient) -> None:
        """Take a ready key, send its webhooks in order until it has none, then the next key."""
        async for key in self._ready_keys:
            waiting = self._by_key[key]
            try:
                while waiting:
                    hook = waiting[0]
                    try:
                        await self._deliver(client, hook)
                    finally:
                        waiting.popleft()
                        self._queued -= 1
                        self._queued_signins -= hook.type == SIGNIN_REFUSED
                        if self._queued == 0:
                            self._idle.set()
            finally:
                del self._by_key[key]

    async def _deliver(self, client: httpx.AsyncClient, hook: Hook) -> None:
        settings = self._settings
        for attempt in range(settings.retries + 1):
            if attempt:
                await trio.sleep(min(settings.backoff * 2 ** (attempt - 1), settings.max_backoff))
            result = await self._attempt(client, hook)
            self._metrics.webhook_attempts.labels(result).inc()
            if result == "2xx":
                self._metrics.webhooks_delivered.inc()
                self._burst_over("gave_up")
                return
        log.warning("webhook not delivered, gave up", webhook_id=hook.id, webhook_type=hook.type)
        self._dropped(hook, "gave_up")

    async def _attempt(self, client: httpx.AsyncClient, hook: Hook) -> str:
        """One POST; its result: `2xx` .. `5xx`, `timeout` or `error`."""
        timestamp = int(time.time())
        signature = self._signer.sign(hook.id, datetime.fromtimestamp(timestamp, UTC), hook.body)
        headers = {
            "webhook-id": hook.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature,
        }
        with trio.move_on_after(self._settings.timeout):
            try:
                response = await client.post(self._url, content=hook.body, headers=headers)
            except httpx.TimeoutException:
                return "timeout"
            except httpx.HTTPError as failed:
                # The URL and the error's kind only: never the body.
                log.info("webhook attempt failed", webhook_id=hook.id, error=type(failed).__name__)
                return "error"
            return f"{response.status_code // 100}xx"
        return "timeout"

    def _dropped(self, hook: Hook, reason: str) -> None:
        """Count a dropped webhook. The first of a burst is audited in full; the rest are summed
        up in one record when the burst ends, and once a minute while it goes on."""
        self._metrics.webhook_drops.labels(reason).inc()
        now = trio.current_time()
        burst = self._bursts.get(reason)
        if burst is None:
            self._bursts[reason] = [0, now]
            data = orjson.loads(hook.body)["data"]
            first = {"msg_event": hook.type, "reason": reason, "call_id": data.get("callId")}
            self._audit("webhook.dropped", {**first, "caller": data.get("caller")})
            return
        burst[0] += 1
        if now - burst[1] >= DROP_SUMMARY_INTERVAL:
            self._sum_up(reason)
            self._bursts[reason] = [0, now]

    def _burst_over(self, reason: str) -> None:
        if reason in self._bursts:
            self._sum_up(reason)

    def _sum_up(self, reason: str) -> None:
        count = int(self._bursts.pop(reason)[0])
        if count:
            self._audit("webhook.dropped", {"reason": reason, "count": count})
