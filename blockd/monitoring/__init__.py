"""Monitoring: the daemon's numbers as Prometheus metrics.

``samples`` copies counters on the event loop thread, ``device_families`` and
``collector`` turn samples into metric families, ``http`` serves them.
``daemon_stats`` counts what the daemon itself does (QMP commands).
May import ``blockd.block`` (read-only) and prometheus_client; never the wire
packages (the QMP and NBD servers are reached through their counters only).
"""
