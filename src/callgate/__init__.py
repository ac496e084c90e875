"""callgate: a WebRTC signaling server on Trio."""

from callgate._accel import choose_implementation

__version__ = "0.1.0"

# "compiled" when the mypyc build of the hot path is present and matches its sources; otherwise
# the same modules run from source (see callgate/_accel.py).
IMPLEMENTATION = choose_implementation()
