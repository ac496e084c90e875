"""WebSocket frames a server reads and writes most (RFC 6455 section 5), without I/O.

The wsproto engine (transport/engine.py) decodes a client's whole, masked text frames and pongs
here and frames its own text messages here; everything else goes through wsproto. These are the
per-message byte loops, so they are kept apart from the engine's async code and compiled with
the rest of the hot path (callgate/_accel.py).
"""

from __future__ import annotations

from functools import lru_cache

_TEXT, _PONG = 0x1, 0xA


def fast_frames(
    buffer: bytes | bytearray, max_size: int
) -> tuple[int, list[str], list[bytes], bool]:
    """Decode the leading complete client frames of `buffer` that need no protocol state.

    Those are what a signaling client sends nearly always: a whole text message in one masked
    frame, and pongs. Returns (bytes used, the messages, the pong payloads, whether the rest
    must go to wsproto). The rest starts at a frame boundary and is anything else (a fragment,
    a binary, ping or close frame, reserved bits, an unmasked frame, invalid UTF-8, a message
    over `max_size`): wsproto then takes over the connection's input with its full checks and
    errors, and has missed nothing that changes its state (it never sees whole text frames or
    pongs as part of a fragmented message, because a fragment ends the fast path first).
    """
    messages: list[str] = []
    pongs: list[bytes] = []
    position, end = 0, len(buffer)
    while end - position >= 2:
        first, second = buffer[position], buffer[position + 1]
        opcode, length = first & 0x0F, second & 0x7F
        simple = first & 0xF0 == 0x80 and second & 0x80 and opcode in (_TEXT, _PONG)
        if not simple:
            return position, messages, pongs, True
        header = 6
        if length == 126:
            header = 8
            if end - position < header:
                break
            length = int.from_bytes(buffer[position + 2 : position + 4], "big")
        elif length == 127:
            header = 14
            if end - position < header:
                break
            length = int.from_bytes(buffer[position + 2 : position + 10], "big")
        if length > max_size or (opcode == _PONG and length > 125):
            return position, messages, pongs, True
        if end - position < header + length:
            break
        start = position + header
        payload = _unmask(buffer[start : start + length], buffer[start - 4 : start])
        if opcode == _TEXT:
            try:
                messages.append(payload.decode("utf-8"))
            except UnicodeDecodeError:
                return position, messages, pongs, True
        else:
            pongs.append(payload)
        position = start + length
    return position, messages, pongs, False


def _unmask(payload: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    """The payload XOR the repeated 4-byte mask, as one big-integer XOR (no per-byte loop)."""
    size = len(payload)
    if not size:
        return b""
    words = (size + 3) // 4
    if words <= _REPEATERS_UP_TO:  # signaling messages: the key is one multiplication
        key = int.from_bytes(mask, "little") * _mask_repeater(words)
    else:
        key = int.from_bytes(bytes(mask) * words, "little")
    value = int.from_bytes(payload, "little") ^ key
    if size % 4:  # the key ran past the payload: drop its extra high bytes
        value &= (1 << (size * 8)) - 1
    return value.to_bytes(size, "little")


# Frames up to 4 KiB (about 1,000 words) get their repeater from a small cache: 64 of them, at
# most 4 KiB each. Larger frames build the key from the repeated mask bytes.
_REPEATERS_UP_TO = 1024


@lru_cache(maxsize=64)
def _mask_repeater(words: int) -> int:
    """A 1 at the bottom of each of `words` 32-bit words: the mask times this is the mask
    repeated `words` times (no carries: the mask fits in one word)."""
    return int.from_bytes(b"\x01\x00\x00\x00" * words, "little")


def text_frame(message: str) -> bytes:
    """One unfragmented server-to-client text frame (RFC 6455 5.2: FIN, opcode 1, no mask).

    Written here rather than by wsproto, whose per-frame Python was a tenth of the send path:
    a server's outgoing data frames are a header and the payload. No extension is negotiated
    (the handshake accepts none), and sending does not change wsproto's state, which still
    frames the control frames (close, ping, pong).
    """
    payload = message.encode("utf-8")
    size = len(payload)
    if size < 126:
        return _SHORT_HEADERS[size] + payload
    if size < 65536:
        return b"\x81\x7e" + size.to_bytes(2, "big") + payload
    return b"\x81\x7f" + size.to_bytes(8, "big") + payload


# The two header bytes of every frame shorter than 126 bytes (FIN + text, then the length).
_SHORT_HEADERS = [bytes((0x81, size)) for size in range(126)]
