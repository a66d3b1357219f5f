"""NBD, the Network Block Device protocol, as blockd serves it.

``constants`` holds the specification's numbers, ``wire`` its layouts and the receive buffer,
``errors`` the protocol-violation exception and the errno -> NBD error table, ``protocol`` one
sans-IO server connection (handshake, option haggling, request parsing and validation, reply
builders). The asyncio side: ``server`` (listeners, clients, exports), ``connection`` (one
client's adapter between its socket and a device), ``replies`` (its reply writer) and
``poller`` (its busy-polling).
"""

__all__: list[str] = []
