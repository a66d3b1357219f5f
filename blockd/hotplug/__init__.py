"""Following the host: udev events and drive status polling turned into device changes.

``media_watch`` follows host CD-ROM drives (udev change events, the eject
button, a periodic status read) and has the devices apply what it sees.
May import ``blockd.block``; never the wire packages.
"""
