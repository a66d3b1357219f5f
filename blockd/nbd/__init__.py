"""NBD, the Network Block Device protocol, as blockd serves it.

``constants`` holds the specification's numbers, ``wire`` its layouts and the receive buffer,
``errors`` the protocol-violation exception and the errno -> NBD error table, ``protocol`` one
sans-IO server connection (handshake, option haggling, request parsing and validation, reply
builders). The asyncio server that drives connections against devices lives in ``server``.
"""

__all__: list[str] = []
