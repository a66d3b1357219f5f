"""How blocking work leaves the event loop: worker threads, io_uring, buffers, pipes, polling.

``workers`` runs calls that may block on threads and hands results back in
batches; ``uring`` queues buffered writes and flushes on an io_uring (whose
ctypes ABI stays private in ``_ring``); ``buffers`` and ``pipes`` pool large
read buffers and the pipes large reads are spliced through; ``polling`` is the
adaptive busy-wait window; ``unix`` takes a UNIX socket path over only from a
program that is gone; ``tls`` loads QEMU-style TLS credentials and ``addresses``
says whether a listener is loopback-only; ``outq`` how much a peer has yet to
read.  May import ``blockd.devices`` (buffer helpers); nothing above it.
"""
