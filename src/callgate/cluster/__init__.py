"""Cluster mode: several nodes route each message to the node that holds its target, and decide
on call state shared, signed and atomic, in Redis.

records.py (pure): the shared state as signed records, and one event's slice of it as a
switchboard; entries.py (pure): signed heartbeats, lease, verdicts and deliveries; store.py:
Redis through coredis (the scripts and keys); links.py: deliveries between nodes over direct TCP
links; line.py: the Redis inboxes behind the links, through redis-py in two threads; node.py: a
node. docs/cluster.md is the operator's guide.
"""
