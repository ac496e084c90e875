"""The wsproto engine frames outgoing text itself: byte for byte what wsproto would send."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage

from callgate.transport.engine import text_frame

# Around each length boundary of the frame header (7-bit, 16-bit, 64-bit lengths).
SIZES = st.sampled_from([0, 1, 125, 126, 127, 65535, 65536, 65537]) | st.integers(0, 70000)


@settings(max_examples=200)
@given(text=st.text(st.characters(exclude_categories=["Cs"])), size=SIZES)
def test_text_frames_match_wsproto(text: str, size: int) -> None:
    message = (text * (size // max(1, len(text)) + 1))[:size] if text else "a" * size
    assert text_frame(message) == Connection(ConnectionType.SERVER).send(TextMessage(data=message))
