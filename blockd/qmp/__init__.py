"""QMP, the QEMU Machine Protocol, as blockd speaks it.

``message`` frames the unframed JSON input stream and encodes replies; ``protocol`` is one
sans-IO session (greeting, capabilities negotiation, envelope checks). The asyncio server, the
argument schema and the commands live in the other modules of this package.  May import
``blockd.block``, ``blockd.devices``, ``blockd.aio`` (socket paths), ``errors`` and
``events``; never ``blockd.nbd``.
"""

__all__: list[str] = []
