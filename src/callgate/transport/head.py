"""The head of an HTTP/1.1 request (its line and headers), parsed by httptools.

Every WebSocket starts as one of these, so a reconnect storm is mostly request heads: h11, in
pure Python, parsing them was 12% of the server's time in a 10,000-client storm (W3 profile).
httptools wraps llhttp, the C parser of Node.js, which does the same work, as strictly, in a
fraction of the time. h11 stays for the metrics endpoint (transport/http.py).

Sans-I/O: `HeadParser.feed` takes bytes as they arrive and returns the head once it is complete;
the listener does the reading.
"""

from __future__ import annotations

from dataclasses import dataclass

import httptools


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A request line and its headers, names lowercased, values without surrounding blanks."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]


class BadHead(Exception):
    """Not an HTTP/1.x request head, or one larger than the limit."""


class _Collected:
    """What llhttp's callbacks collect, apart from the parser that calls them.

    The parser holds its callbacks. Were they `HeadParser`'s own methods, every `HeadParser`
    would be a reference cycle, which only the cyclic garbage collector frees: twelve objects
    per connection, all it collected in a 10,000-client storm. Held apart, the parser
    and its callbacks go as soon as the connection's head is read.
    """

    __slots__ = ("complete", "headers", "target")

    def __init__(self) -> None:
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    # llhttp's callbacks (httptools calls them during `feed_data`)

    def on_url(self, url: bytes) -> None:
        self.target += url  # in pieces when the line arrives in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value.strip(b" \t")))

    def on_headers_complete(self) -> None:
        self.complete = True


class HeadParser:
    """Feeds a request's bytes to llhttp until its head is complete.

    After an upgrade request (`Connection: Upgrade` with an `Upgrade` header) the parser stops
    at the end of the head, and `trailing` holds the bytes that came after it: the first
    WebSocket frames of a client that did not wait for the 101.
    """

    __slots__ = ("_collected", "_limit", "_parser", "_received", "trailing")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._received = 0
        self.trailing = b""
        self._collected = _Collected()
        self._parser = httptools.HttpRequestParser(self._collected)

    def feed(self, data: bytes) -> RequestHead | None:
        """The head once `data` completes it; None while more is needed.

        Raises: BadHead.
        """
        self._received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.trailing = data[upgrade.args[0] :]
        except httptools.HttpParserError:
            raise BadHead("not an HTTP/1.x request") from None
        collected = self._collected
        if not collected.complete:
            if self._received > self._limit:
                raise BadHead("request head too large")
            return None
        return RequestHead(self._parser.get_method(), collected.target, collected.headers)
