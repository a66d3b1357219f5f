"""The block layer: nodes, devices, the registry and exports (QEMU's block layer core).

``node`` is one opened backing (BlockDriverState); ``device`` the named front
end that owns the tray, the medium lock, the I/O status, the error policy and
the accounting (BlockBackend plus the guest device); ``tray`` the removable-
medium rules a device applies; ``stats`` QEMU's block accounting; ``registry``
every node, device and export by name; ``exports`` what an NBD export is and
what the QMP commands need of the NBD server.

May import ``blockd.devices`` (drivers) and ``blockd.aio`` (how requests are
run off the loop); never the wire packages (qmp, nbd), monitoring or hotplug.
"""
