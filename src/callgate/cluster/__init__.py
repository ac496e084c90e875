"""Cluster mode: several nodes route each message to the node that holds its target, and decide
on call state shared, signed and atomic, in Redis.

records.py (pure): the shared state as signed records, and one event's slice of it as a
switchboard; entries.py (pure): signed heartbeats, lease, verdicts and deliveries; store.py:
Redis through coredis (the scripts and keys); line.py: deliveries between nodes, through redis-py
in two threads; node.py: a node. docs/cluster.md is the operator's guide.
"""
