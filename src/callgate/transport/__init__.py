"""Trio and trio-websocket live here and nowhere else: sockets in, switchboard events out."""
