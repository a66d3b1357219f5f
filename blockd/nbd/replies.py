"""The replies of one NBD client, gathered and written once per turn of the event loop.

With many requests in flight that is one system call (and one wake-up of the client)
for a batch of replies instead of one per reply, which is most of the server's speed.
Pooled read buffers go back to their pool only once the transport has handed every byte
to the kernel (it may keep references until then); read data waiting in a pipe is spliced
into the socket right behind its header, which is safe only while the transport has
nothing buffered.  The transport's write-buffer limits are zero, so ``pause_writing``
means "something is buffered" and ``resume_writing`` "everything reached the kernel".
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from blockd.aio.buffers import MIN_POOLED, BufferPool
from blockd.aio.pipes import Pipe, PipePool

__all__ = ["MAX_UNSENT", "Reply", "ReplyWriter"]

MAX_UNSENT = 8 << 20  # the client is backlogged while this much reply data waits unsent

Reply = bytes | bytearray | memoryview


class ReplyWriter:
    """Queues replies and writes them together, at the end of the current turn.

    ``out`` is the queue itself: the connection appends replies it produces
    while it handles input and then calls :meth:`flush` once; replies that
    come from callbacks go through :meth:`write`, which schedules ``turn_end``
    (the connection's flush) with ``call_soon``.  ``scheduled`` says a flush is
    already due.  ``backpressure`` is called after a write while the transport
    holds data (see :meth:`backlogged`); ``failed`` when splicing into the
    socket fails (the peer is gone).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        buffers: BufferPool,
        pipes: PipePool,
        turn_end: Callable[[], None],
        backpressure: Callable[[], None],
        failed: Callable[[OSError], None],
    ) -> None:
        self.out: list[Reply] = []  # in order; never replaced, only emptied
        self.queued = 0  # read data bytes in ``out`` (the connection flushes at max_unsent)
        self.max_unsent = MAX_UNSENT  # the client's limit (NbdLimits.unsent)
        self.scheduled = False
        self.writing_paused = False  # the transport holds unsent data
        self.closed = False
        self.transport: asyncio.Transport | None = None
        self.sock_fd = -1  # where spliced data goes
        self._lent: list[bytearray] = []  # pooled buffers queued in ``out``
        self._unsent: list[bytearray] = []  # pooled buffers the transport may still hold
        self._spliced: list[tuple[bytes, Pipe]] = []  # read replies whose data is in a pipe
        self._buffers = buffers
        self._pipes = pipes
        self._call_soon = loop.call_soon
        self._turn_end = turn_end
        self._backpressure = backpressure
        self._failed = failed

    def attach(self, transport: asyncio.Transport, sock_fd: int) -> None:
        self.transport = transport
        self.sock_fd = sock_fd

    def close(self) -> None:
        """The connection is gone: drop what comes later, give the pipes back."""
        self.closed = True
        self.sock_fd = -1
        spliced, self._spliced = self._spliced, []
        for _, pipe in spliced:
            self._pipes.put(pipe)

    # -- queueing --------------------------------------------------------------------

    def write(self, data: Reply) -> None:
        """Queue a reply and make sure a flush is due."""
        if self.closed:
            return
        self.out.append(data)
        if not self.scheduled:
            self.scheduled = True
            self._call_soon(self._turn_end)

    def write_data(self, header: bytes, buf: bytearray, length: int) -> None:
        """Queue a read reply: ``header``, then the first ``length`` bytes of ``buf``.

        A buffer of ``MIN_POOLED`` bytes or more came from the pool and goes
        back to it once the transport has sent it.
        """
        if self.closed:
            return
        self.out.append(header)
        self.queued += length
        if length < MIN_POOLED:
            self.write(buf)
        else:
            self._lent.append(buf)
            self.write(buf if len(buf) == length else memoryview(buf)[:length])

    def write_pipe(self, header: bytes, pipe: Pipe) -> None:
        """Queue a read reply whose data waits in ``pipe`` (given back once sent)."""
        if self.closed:
            self._pipes.put(pipe)
            return
        self._spliced.append((header, pipe))
        if not self.scheduled:
            self.scheduled = True
            self._call_soon(self._turn_end)

    # -- writing ---------------------------------------------------------------------

    def flush(self) -> bool:
        """Write everything queued; False if there was nothing to write (or no one to)."""
        self.scheduled = False
        self.queued = 0
        out = self.out
        transport = self.transport
        if transport is None or transport.is_closing() or not (out or self._spliced):
            out.clear()
            self._lent.clear()
            return False
        try:
            if self._spliced:
                self._send_spliced(out)
            elif len(out) == 1:
                transport.write(out[0])
            else:
                transport.writelines(out)
        finally:
            out.clear()
        lent = self._lent
        if lent:
            self._unsent += lent
            lent.clear()
        # Pooled buffers go back once the transport holds nothing more to send:
        # now, or in drained().
        if self._unsent and not transport.get_write_buffer_size():
            self._recycle()
        if self.writing_paused:
            self._backpressure()
        return True

    def backlogged(self) -> bool:
        """Whether so much reply data waits unsent that the client should wait too."""
        transport = self.transport
        return (
            self.writing_paused and transport is not None
            and transport.get_write_buffer_size() > self.max_unsent
        )

    def pause_writing(self) -> None:
        self.writing_paused = True

    def drained(self) -> None:
        """The transport passed everything to the kernel (``resume_writing``)."""
        self.writing_paused = False
        self._recycle()
        self._send_spliced()

    def _send_spliced(self, out: list[Reply] | None = None) -> None:
        """Send the replies whose data waits in pipes, each header followed by its data.

        The data goes from the pipe straight into the socket, which is only
        safe while the transport has nothing buffered (else the bytes would
        overtake it).  Whatever the socket does not take at once is copied out
        of the pipe and left to the transport; the remaining replies wait until
        the transport has drained.  ``out``: other replies to write first, in
        the same system call as the first header.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        pipes = self._pipes
        spliced = self._spliced
        while spliced and not transport.get_write_buffer_size():
            header, pipe = spliced.pop(0)
            if out:
                out.append(header)
                transport.writelines(out)
                out = None
            else:
                transport.write(header)
            if not transport.get_write_buffer_size():
                try:
                    pipe.send(self.sock_fd)
                except OSError as exc:
                    pipes.put(pipe)
                    self._failed(exc)
                    return
            if pipe.held:  # the socket is full: the transport sends the rest
                transport.write(pipe.take())
            pipes.put(pipe)
        if out:
            transport.writelines(out)

    def _recycle(self) -> None:
        unsent = self._unsent
        put = self._buffers.put
        for buf in unsent:
            put(buf)
        unsent.clear()
