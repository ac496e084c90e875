"""callgate: a WebRTC signaling server on Trio."""

__version__ = "0.1.0"
