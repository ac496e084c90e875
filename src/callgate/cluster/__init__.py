"""Cluster mode: several nodes share one switchboard through a signed, ordered log on Redis.

entries.py (pure): the log's entries and their signatures; replica.py (pure): applying them to
this node's switchboard; link.py: Redis, from worker threads. docs/cluster.md is the operator's
guide.
"""
