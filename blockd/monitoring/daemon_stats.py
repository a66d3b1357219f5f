"""Daemon-wide counters that no other object keeps: QMP commands, hotplug events, start time.

Everything else the metrics report is read from where it already lives: device
statistics from each device's :class:`~blockd.block.stats.BlockAcctStats`, open and
accepted QMP sessions from the QMP server, NBD connections from the NBD server,
exports and devices from the registry.  This object only holds what would
otherwise not be counted at all.

Like the rest of the daemon's state it is updated and read on the event loop
thread only; the metrics collector copies it there (see :mod:`blockd.monitoring`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["HOTPLUG_ACTIONS", "DaemonStats"]

#: The hotplug actions counted (udev's add, remove and change).
HOTPLUG_ACTIONS = ("add", "remove", "change")


class DaemonStats:
    """Counters for ``blockd_qmp_commands_total``, ``blockd_hotplug_events_total`` and
    the start time.

    ``wall_clock`` (seconds since the epoch) and ``clock`` (monotonic seconds) are
    injectable for tests.
    """

    def __init__(
        self,
        *,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.start_time = wall_clock()
        """When the daemon started, in seconds since the epoch."""
        self._start_monotonic = clock()
        self.qmp_commands: dict[tuple[str, str], int] = {}
        """Executed QMP commands by (command, result); result is "success" or an error class."""
        self.hotplug_events: dict[str, int] = dict.fromkeys(HOTPLUG_ACTIONS, 0)
        """Hotplug events handled, by action."""

    def uptime(self) -> float:
        """Seconds since the daemon started (monotonic: immune to clock changes)."""
        return self._clock() - self._start_monotonic

    def command_done(self, command: str, result: str) -> None:
        """Count one executed QMP command; ``result`` is "success" or its QMP error class."""
        key = (command, result)
        self.qmp_commands[key] = self.qmp_commands.get(key, 0) + 1

    def hotplug_event(self, action: str) -> None:
        """Count one hotplug event (``add``, ``remove`` or ``change``).

        Raises ValueError for another action, so a typo cannot create a new series.
        """
        if action not in self.hotplug_events:
            raise ValueError(f"unknown hotplug action: {action!r}")
        self.hotplug_events[action] += 1
