"""The daemon: configuration, the composition root, and systemd's notification.

``config`` turns the command line and the TOML file into frozen settings,
``root`` builds every part from them and runs it, ``sdnotify`` talks to
systemd.  The top of the dependency graph: may import every other package.
"""
