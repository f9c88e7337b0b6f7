"""A trio-native stdio transport that feeds the ``mcp`` SDK's dispatch.

Theory of operation
===================

The SDK's serving loop (``serve_dual_era_loop``) wants a pair of streams:
``ReadStream[SessionMessage | Exception]`` and ``WriteStream[SessionMessage]``.
This module provides both over any pair of trio byte streams (on stdio, two
:class:`trio.lowlevel.FdStream`, so no thread ever reads stdin)::

    stdin bytes -> _reader (framing, size bound, parse, error replies) -> memory stream -> SDK
    SDK -> _LineWriter.send (serialize, one whole line at a time, under a lock) -> stdout bytes

Framing is newline-delimited JSON. The reader answers what the SDK would drop
silently: a line that is not JSON (or not UTF-8) gets ``-32700`` with id
``null``, and so does one holding ``NaN``/``Infinity`` or a number beyond the
float range, which pydantic's parser would read (a cheap byte check first,
then a strict re-parse only when the bytes could hold one); a JSON value that
is not a request object gets ``-32600``; a line longer than
``max_message_size`` gets ``-32600`` as soon as it crosses the bound and is
then skipped to its newline, so memory stays bounded.

The transport tracks the ids of requests it has handed to the SDK until their
answer is written (or the client cancels them). That is what a graceful stop
waits for, except ``subscriptions/listen``: its response is a stream that
lasts as long as the connection, not work in flight, so it is never waited
for (the SDK ends it when told the input has ended). On EOF, SIGINT or
SIGTERM the transport stops reading, lets those requests finish for up to
``grace`` seconds, and only then tells the SDK the input has ended (the SDK
cancels whatever is still running at that point). A broken
stdout (the client is gone) stops at once: nobody is left to answer.

What is written is strict JSON: pydantic writes a non-finite float as
``null``, so a response whose result holds one is replaced by a ``-32603``
error for that request rather than sent with its numbers silently changed.

Writes are shielded so a line is never cut in half by a cancellation; a hard
stop cancels them explicitly and marks the output broken, after which nothing
more is written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import select
import signal
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

import anyio
import trio
from mcp.shared.dispatcher import coerce_request_id
from mcp.shared.message import SessionMessage
from mcp_types import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    PARSE_ERROR,
    ErrorData,
    JSONRPCError,
    JSONRPCNotification,
    JSONRPCRequest,
    JSONRPCResponse,
    jsonrpc_message_adapter,
)
from pydantic import BaseModel, ValidationError

from ._settings import DEFAULT_MAX_MESSAGE_SIZE

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "StdioTransport"]

logger = logging.getLogger("mcp_sessions.transport")

_CHUNK = 65536
#: After the grace period, how long the cancelled requests' error replies may take.
_FINAL_FLUSH_S = 1.0
#: How often a watchdog checks whether the client closed our stdout.
_STDOUT_POLL_INTERVAL = 0.25
#: The request whose response is a stream of events (2026-07-28): not work in flight.
_LISTEN = "subscriptions/listen"

RequestKey = int | str
ServeLoop = Callable[[Any, Any], Awaitable[None]]


class _LineWriter:
    """The SDK's write stream: serializes each message and writes it as one line.

    Writes go one at a time (a FIFO lock) and are shielded, so a cancelled
    handler cannot leave half a line on the wire. A failed write marks the
    output broken and asks the transport to stop; later messages are dropped.
    """

    def __init__(self, transport: StdioTransport) -> None:
        self._transport = transport

    async def send(self, item: SessionMessage, /) -> None:
        message = item.message
        data = message.model_dump_json(by_alias=True, exclude_unset=True).encode() + b"\n"
        # pydantic writes a non-finite float as null (JSON has no NaN or Infinity):
        # a result that changed that way is not the answer; say so instead.
        if (
            b"null" in data
            and isinstance(message, JSONRPCResponse)
            and _holds_non_finite(message.result)
        ):
            logger.warning("the result of request %r holds NaN or Infinity; answering an error",
                           message.id)  # fmt: skip
            data = _error_line(
                message.id,
                INTERNAL_ERROR,
                "Internal error: the result holds NaN or Infinity, which JSON cannot carry",
            )
        try:
            await self._transport._write(data)
        finally:
            # A request is done once its answer is out (or can no longer get out):
            # only then may a graceful stop stop waiting for it.
            if isinstance(message, JSONRPCResponse | JSONRPCError) and message.id is not None:
                self._transport._settle(message.id)

    async def aclose(self) -> None:
        # The transport owns stdout; the SDK closing its side changes nothing.
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class StdioTransport:
    """Newline-delimited JSON-RPC over a pair of trio byte streams.

    ``serve(loop)`` runs ``await loop(read_stream, write_stream)`` (normally
    the SDK's ``serve_dual_era_loop``) and returns when the loop has ended,
    which happens after stdin EOF, a stop signal, :meth:`stop`, or a broken
    stdout. It never raises for any of those: they are the normal ways a
    stdio server ends.
    """

    def __init__(
        self,
        stdin: trio.abc.ReceiveStream,
        stdout: trio.abc.SendStream,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        grace: float = 10.0,
        handle_signals: bool = False,
        stdout_fd: int | None = None,
    ) -> None:
        if max_message_size <= 0:
            raise ValueError("max_message_size must be positive")
        self._stdin = stdin
        self._stdout = stdout
        self.max_message_size = max_message_size
        self.grace = grace
        self._handle_signals = handle_signals
        self._stdout_fd = stdout_fd
        self._write_lock = trio.StrictFIFOLock()
        self._write_scopes: set[trio.CancelScope] = set()
        self._broken = False
        self._pending: dict[RequestKey, int] = {}
        #: Open ``subscriptions/listen`` streams: requests, but not work in flight.
        self._listening: dict[RequestKey, int] = {}
        self._drained: trio.Event | None = None
        self._read_scope = trio.CancelScope()
        self._drain_scope = trio.CancelScope()
        self._stop_reason: str | None = None
        self._hard = False
        self._nursery: trio.Nursery | None = None
        #: Called once on a hard stop (a second signal, a broken stdout).
        self.on_hard_stop: Callable[[], None] | None = None
        self._at_once = False
        self.writer = _LineWriter(self)

    # -- public -----------------------------------------------------------------

    @property
    def broken(self) -> bool:
        """True once a write to stdout failed (the client is gone)."""
        return self._broken

    @property
    def stop_reason(self) -> str | None:
        """Why the transport stopped reading: ``eof``, ``SIGINT``, ``SIGTERM``, ``broken``, ..."""
        return self._stop_reason

    def stop(self, reason: str = "stop", *, hard: bool = False) -> None:
        """Stop reading; with ``hard``, also skip the grace period and abandon writes.

        A hard stop (a second signal, a broken stdout) also calls ``on_hard_stop``.
        """
        self._stop(reason, hard=hard, at_once=hard)

    def _stop(self, reason: str, *, hard: bool, at_once: bool) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason
            logger.info("stdio transport stopping (%s)", reason)
        self._read_scope.cancel()
        if hard:
            self._drain_scope.cancel()
            # A client that stopped reading must not hold us: abandon the write
            # in progress (nothing more is written after it).
            self._hard = True
            for scope in list(self._write_scopes):
                scope.cancel()
        if at_once and not self._at_once:  # (not when only the final flush timed out)
            self._at_once = True
            if self.on_hard_stop is not None:
                self.on_hard_stop()

    async def serve(self, loop: ServeLoop) -> None:
        """Run ``loop(read_stream, write_stream)`` over this transport until it ends."""
        send, receive = anyio.create_memory_object_stream[SessionMessage | Exception](0)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._reader, send, name="mcp_sessions.stdio.reader")
            if self._handle_signals:
                await nursery.start(forward_signals, self)
            if self._stdout_fd is not None:
                nursery.start_soon(self._watch_stdout, name="mcp_sessions.stdio.watchdog")
            try:
                await loop(receive, self.writer)
            finally:
                nursery.cancel_scope.cancel()
                # Whatever is still being written once the loop is done is abandoned.
                for scope in self._write_scopes:
                    scope.cancel()

    # -- reading ------------------------------------------------------------------

    async def _hard_stop_after(self, seconds: float) -> None:
        await trio.sleep(seconds)
        # Only the writes: a client that stopped reading says nothing of the store.
        self._stop(self._stop_reason or "grace", hard=True, at_once=False)

    async def _reader(self, send: anyio.abc.ObjectSendStream[SessionMessage | Exception]) -> None:
        async with send:
            with self._read_scope:
                try:
                    await self._read_lines(send)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    logger.info("stdin failed: %r", exc)
                if self._stop_reason is None:
                    self._stop_reason = "eof"
                    logger.info("stdin closed; stopping")
            # Stopped reading. Let the requests we handed over finish, up to the grace period.
            with self._drain_scope:
                self._drain_scope.deadline = min(
                    self._drain_scope.deadline, trio.current_time() + self.grace
                )
                while self._pending:
                    self._drained = trio.Event()
                    await self._drained.wait()
            if self._pending and not self._hard:
                logger.warning("grace period over with %d request(s) unanswered; cancelling them",
                               len(self._pending))  # fmt: skip
                # EOF (below) makes the SDK cancel them and answer with errors;
                # give those answers a moment, but no client that stopped reading
                # can hold us past it.
                if self._nursery is not None:
                    self._nursery.start_soon(self._hard_stop_after, _FINAL_FLUSH_S)
        # Leaving `async with send` is EOF for the SDK: it cancels what still runs.

    async def _read_lines(
        self, send: anyio.abc.ObjectSendStream[SessionMessage | Exception]
    ) -> None:
        limit = self.max_message_size
        buf = bytearray()
        skipping = False  # inside an oversize line, discarding up to its newline
        while True:
            chunk = await self._stdin.receive_some(_CHUNK)
            if not chunk:
                if buf and not skipping:
                    await self._handle_line(bytes(buf), send)
                return
            start = 0
            while True:
                newline = chunk.find(b"\n", start)
                if newline < 0:
                    if not skipping:
                        if len(buf) + len(chunk) - start > limit:
                            await self._oversize()
                            buf.clear()
                            skipping = True
                        else:
                            buf += chunk[start:]
                    break
                if skipping:
                    skipping = False
                elif buf:
                    buf += chunk[start:newline]
                    line = bytes(buf)
                    buf.clear()
                    if len(line) > limit:
                        await self._oversize()
                    else:
                        await self._handle_line(line, send)
                elif newline - start > limit:
                    await self._oversize()
                else:
                    await self._handle_line(bytes(chunk[start:newline]), send)
                start = newline + 1

    async def _handle_line(
        self, line: bytes, send: anyio.abc.ObjectSendStream[SessionMessage | Exception]
    ) -> None:
        if _suspect_number(line) and _holds_non_json_number(line):
            # pydantic reads NaN/Infinity literals and turns 1e400 into inf: not JSON.
            await self._reply_error(
                None,
                PARSE_ERROR,
                "Parse error: NaN, Infinity and numbers beyond the float range are not JSON",
            )
            return
        try:
            message = jsonrpc_message_adapter.validate_json(line, by_name=False)
        except (ValidationError, ValueError, RecursionError):
            await self._reject(line)
            return
        pending_id: RequestKey | None = None
        if isinstance(message, JSONRPCRequest):
            pending_id = coerce_request_id(message.id)
            # A listen stream lasts until the client or the server ends it: a
            # graceful stop must not wait for it (EOF to the SDK ends it).
            track = self._listening if message.method == _LISTEN else self._pending
            track[pending_id] = track.get(pending_id, 0) + 1
        elif isinstance(message, JSONRPCNotification):
            if _has_id(line):
                # A request whose id is not a string or an integer: pydantic
                # read it as a notification. Refuse it rather than drop it.
                await self._reply_error(
                    None, INVALID_REQUEST, "Invalid Request: id must be a string or an integer"
                )
                return
            if message.method == "notifications/cancelled":
                request_id = (message.params or {}).get("requestId")
                if isinstance(request_id, int | str) and not isinstance(request_id, bool):
                    # The SDK never answers a cancelled request; stop waiting for it.
                    self._settle(request_id)
        try:
            await send.send(SessionMessage(message))
        except BaseException:
            if pending_id is not None:  # never handed over: nobody will answer it
                self._settle(pending_id)
            raise

    async def _reject(self, line: bytes) -> None:
        """Answer a line the SDK cannot take: not UTF-8, not JSON, or not a JSON-RPC object."""
        if not line.strip():
            return
        try:
            value = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            await self._reply_error(None, PARSE_ERROR, "Parse error: message is not valid UTF-8")
            return
        except (ValueError, RecursionError):
            await self._reply_error(None, PARSE_ERROR, "Parse error: message is not valid JSON")
            return
        if not isinstance(value, dict):
            await self._reply_error(
                None, INVALID_REQUEST, "Invalid Request: a message must be a JSON-RPC object"
            )
            return
        request_id = value.get("id")
        if "id" not in value and isinstance(value.get("method"), str):
            # A malformed notification: JSON-RPC forbids answering notifications.
            logger.warning("dropped a malformed notification %r", value.get("method"))
            return
        if isinstance(request_id, bool) or not isinstance(request_id, int | str):
            request_id = None
        await self._reply_error(request_id, INVALID_REQUEST, "Invalid Request")

    async def _oversize(self) -> None:
        logger.warning("dropped a message longer than %d bytes", self.max_message_size)
        await self._reply_error(
            None,
            INVALID_REQUEST,
            f"Invalid Request: message exceeds the {self.max_message_size}-byte limit",
        )

    async def _reply_error(self, request_id: RequestKey | None, code: int, message: str) -> None:
        await self._write(_error_line(request_id, code, message))

    def _settle(self, request_id: RequestKey) -> None:
        request_id = coerce_request_id(request_id)
        count = self._pending.get(request_id)
        if count is None:
            _decrement(self._listening, request_id)
            return
        _decrement(self._pending, request_id)
        if not self._pending and self._drained is not None:
            self._drained.set()

    # -- writing ------------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        if self._broken or self._hard:
            return
        async with self._write_lock:
            if self._broken or self._hard:
                return
            # Shielded: a whole line or nothing. Only a hard stop cancels it.
            with trio.CancelScope(shield=True) as scope:
                self._write_scopes.add(scope)
                try:
                    await self._stdout.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._mark_broken(repr(exc))
                finally:
                    self._write_scopes.discard(scope)
            if scope.cancelled_caught:
                # Part of a line may be out; nothing after it could be framed.
                self._mark_broken("write abandoned")

    def _mark_broken(self, why: str) -> None:
        if not self._broken:
            self._broken = True
            logger.info("stdout is gone (%s); stopping", why)
        self.stop("broken", hard=True)

    # -- watching -----------------------------------------------------------------

    async def _watch_stdout(self) -> None:
        """Notice a closed stdout even when there is nothing to write.

        A pipe whose reader has gone reports POLLERR; polling with an empty
        event mask asks only for that, without ever blocking.
        """
        assert self._stdout_fd is not None
        poller = select.poll()
        poller.register(self._stdout_fd, 0)
        while not self._broken:
            events = poller.poll(0)
            if events and events[0][1] & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                self._mark_broken("stdout closed by the client")
                return
            await trio.sleep(_STDOUT_POLL_INTERVAL)


async def forward_signals(
    transport: StdioTransport, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """SIGINT/SIGTERM: the first stops gracefully, the next stops at once; none kills us."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if transport.stop_reason is None:
                transport.stop(name)
            else:
                logger.info("%s while stopping: stopping now", name)
                transport.stop(name, hard=True)


def _error_line(request_id: RequestKey | None, code: int, message: str) -> bytes:
    error = JSONRPCError(jsonrpc="2.0", id=request_id, error=ErrorData(code=code, message=message))
    return error.model_dump_json(by_alias=True, exclude_unset=True).encode() + b"\n"


#: An exponent of three digits or more (100 and up; only past 308 is it too big).
_BIG_EXPONENT = re.compile(rb"[eE][+-]?0*[1-9][0-9]{2}")
#: Digits as zeros: a run of 309 digits is then a plain substring search.
_DIGITS_AS_ZEROS = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGIT_RUN = b"0" * 309


def _suspect_number(line: bytes) -> bool:
    """A cheap byte check: may ``line`` hold NaN, Infinity or a number beyond the float range?

    False means it cannot; True only means the strict re-parse must decide
    (the bytes may be inside a string, or an exponent between 100 and 308).
    """
    if b"NaN" in line or b"Infinity" in line or _BIG_EXPONENT.search(line) is not None:
        return True
    return len(line) > 309 and _LONG_DIGIT_RUN in line.translate(_DIGITS_AS_ZEROS)


class _NotJSONNumber(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NotJSONNumber(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJSONNumber(text)
    return value


def _holds_non_json_number(line: bytes) -> bool:
    """The strict re-parse: a NaN/Infinity literal or a float that overflows, outside strings."""
    try:
        json.loads(line, parse_constant=_refuse_constant, parse_float=_finite_float)
    except _NotJSONNumber:
        return True
    except (ValueError, RecursionError):
        return False  # not JSON for another reason: the usual path answers it
    return False


def _holds_non_finite(value: object) -> bool:
    """Whether a message's payload holds a float JSON cannot carry (NaN, +-Infinity)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, BaseModel):
            stack.extend(vars(item).values())
    return False


def _decrement(counts: dict[RequestKey, int], key: RequestKey) -> None:
    count = counts.get(key)
    if count is None:
        return
    if count > 1:
        counts[key] = count - 1
    else:
        del counts[key]


def _has_id(line: bytes) -> bool:
    """Whether a line that parsed as a notification carries an ``id`` member."""
    if b'"id"' not in line:
        return False
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and "id" in value


def claim_stdio() -> tuple[trio.lowlevel.FdStream, trio.lowlevel.FdStream, Callable[[], None]]:
    """Take fds 0 and 1 for the protocol and return streams over them and a restore function.

    Like the SDK, point fd 0 at ``/dev/null`` and fd 1 at stderr while we
    serve, so a stray ``print`` or a child process can never write into (or
    read from) the protocol stream.
    """
    import sys

    if sys.stdout is not None:
        sys.stdout.flush()
    saved_in, saved_out = os.dup(0), os.dup(1)
    stdin = trio.lowlevel.FdStream(os.dup(0))
    stdout = trio.lowlevel.FdStream(os.dup(1))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)

    def restore() -> None:
        if sys.stdout is not None:
            sys.stdout.flush()
        os.dup2(saved_in, 0)
        os.dup2(saved_out, 1)
        os.close(saved_in)
        os.close(saved_out)

    return stdin, stdout, restore
