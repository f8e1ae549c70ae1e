"""The one error table (DESIGN §7): domain errors → gRPC codes → HTTP statuses.

Services raise these; the gRPC interceptor, the FastAPI handlers and the Flight edge map
them. Anything else becomes INTERNAL with a generic message and a correlation id that is
logged next to the real traceback — the exception text never reaches the wire.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.flight as flight

log = logging.getLogger(__name__)


class OnehopError(Exception):
    """Base of every error a client may see; its message is safe to send."""

    code = grpc.StatusCode.INTERNAL
    http_status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(OnehopError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class NotFound(OnehopError):
    code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class Unavailable(OnehopError):
    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class ResourceExhausted(OnehopError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429


class PayloadTooLarge(ResourceExhausted):
    http_status = 413


class DeadlineExceeded(OnehopError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class FailedPrecondition(OnehopError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 400


class Unauthenticated(OnehopError):
    code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class PermissionDenied(OnehopError):
    code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403


class Unimplemented(OnehopError):
    """A method this server does not offer (a generated base class's NotImplementedError)."""

    code = grpc.StatusCode.UNIMPLEMENTED
    http_status = 501


class Internal(OnehopError):
    """Unexpected failure; the message is generic and carries a correlation id."""

    @classmethod
    def wrap(cls, exc: BaseException) -> Internal:
        correlation_id = uuid.uuid4().hex[:12]
        log.error("unexpected error (correlation id %s)", correlation_id, exc_info=exc)
        return cls(f"internal error (correlation id {correlation_id})")


# The table's rows that a client can be told about; where two share a code or a status,
# the earlier one is what a peer's code or status maps back to.
_TABLE: tuple[type[OnehopError], ...] = (
    InvalidArgument,
    NotFound,
    Unavailable,
    ResourceExhausted,
    PayloadTooLarge,
    DeadlineExceeded,
    FailedPrecondition,
    Unauthenticated,
    PermissionDenied,
    Unimplemented,
)
_BY_CODE: dict[grpc.StatusCode, type[OnehopError]] = {cls.code: cls for cls in reversed(_TABLE)}
_BY_HTTP_STATUS: dict[int, type[OnehopError]] = {cls.http_status: cls for cls in reversed(_TABLE)}
RETRY_AFTER_SECONDS = 1


def from_rpc_error(exc: grpc.RpcError) -> OnehopError:
    """A downstream onehop service's status, re-raised at this edge with the same code.

    Messages from our own services are already safe; a transport failure reads as the
    dependency being down.
    """
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else ""
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Unavailable(f"dependency unavailable: {details or code.name}")
    cls = _BY_CODE.get(code)
    if cls is None:
        return Internal(details or "internal error")
    return cls(details or code.name)


def from_http_status(status: int, message: str) -> OnehopError:
    """The domain error behind an HTTP error answer of the gateway's bridge."""
    return _BY_HTTP_STATUS.get(status, Internal)(message)


def to_onehop_error(exc: BaseException) -> OnehopError:
    if isinstance(exc, OnehopError):
        return exc
    if isinstance(exc, grpc.RpcError):
        return from_rpc_error(exc)
    if isinstance(exc, NotImplementedError):
        return Unimplemented("this method is not implemented by this server")
    return Internal.wrap(exc)


# --- gRPC -------------------------------------------------------------------------------


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Applies the error table to every handler of a grpc.aio server. Must be the last
    interceptor: it keeps each method's wrapped handler, so later calls skip the lookup."""

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            wrapped = self._wrap(await continuation(handler_call_details))
            if wrapped is not None:
                self._wrapped[method] = wrapped
        return wrapped

    @staticmethod
    def _wrap(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
        if handler is None:
            return handler
        # Every kind gets the tolerant deserializer: a request (or one message of a request
        # stream) that does not parse is INVALID_ARGUMENT, not grpc's INTERNAL.
        deserializer = _tolerant(handler.request_deserializer)
        serializer = handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary), deserializer, serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream), deserializer, serializer
            )
        if handler.stream_unary:  # a request stream in, one answer out: awaited like unary
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(_checked_requests(handler.stream_unary)), deserializer, serializer
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(_checked_requests(handler.stream_stream)), deserializer, serializer
            )
        return handler


def retry_after(error: OnehopError) -> str | None:
    """Seconds a client should wait before retrying (the Retry-After header or trailing
    metadata): set for a dependency that is down and for overload, not for a body too large."""
    if isinstance(error, Unavailable) or type(error) is ResourceExhausted:
        return str(RETRY_AFTER_SECONDS)
    return None


class _Malformed:
    """Stands for request bytes that did not parse: grpc would answer INTERNAL for a
    deserializer that raises, but bad bytes are the client's mistake (INVALID_ARGUMENT)."""


_MALFORMED = _Malformed()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError, or whatever a generated parser raises on garbage
            return _MALFORMED

    return deserialize


def _check_parsed(request: Any) -> None:
    if request is _MALFORMED:
        raise InvalidArgument("the request is not a valid protobuf message for this method")


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    error = to_onehop_error(exc)
    seconds = retry_after(error)
    if seconds is not None:
        context.set_trailing_metadata((("retry-after", seconds),))
    await context.abort(error.code, error.message)


def _checked_requests(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """`behavior` for a request stream, fed the stream with each message checked as it
    arrives (see `_Malformed`)."""

    async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            _check_parsed(request)
            yield request

    def call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        return behavior(checked(requests), context)

    return call


def _wrap_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            _check_parsed(request)
            answer = behavior(request, context)
            # A generated base class's method is synchronous (it raises NotImplementedError).
            return await answer if inspect.isawaitable(answer) else answer
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # the error table's catch-all: mapped, never leaked
            await _abort(context, exc)

    return wrapper


def _wrap_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """A server-streaming handler, whatever its form: an async generator (our servicers) or
    a coroutine that sends with `context.write` and returns None (grpc's aio health Watch).
    The wrapper itself sends with `context.write`, so both work."""

    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> None:
        try:
            _check_parsed(request)
            answers = behavior(request, context)
            if isinstance(answers, AsyncIterable):
                async for answer in answers:
                    await context.write(answer)
            else:
                await answers
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    return wrapper


# --- Arrow Flight -------------------------------------------------------------------------
#
# pyarrow's Flight server appends a Python traceback to the message of any exception that is
# not a FlightError, and FlightError subclasses exist only for UNAVAILABLE, INTERNAL,
# UNAUTHENTICATED, PERMISSION_DENIED, DEADLINE_EXCEEDED and CANCELLED. Client mistakes are
# therefore sent as FlightServerError (gRPC UNKNOWN) whose message leads with the table's
# code name, e.g. "NOT_FOUND: no dataset 'x'"; `from_flight_error` reads it back.

_FLIGHT_CLASSES: dict[grpc.StatusCode, type[flight.FlightError]] = {
    grpc.StatusCode.UNAVAILABLE: flight.FlightUnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: flight.FlightUnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: flight.FlightUnauthorizedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: flight.FlightTimedOutError,
    grpc.StatusCode.INTERNAL: flight.FlightInternalError,
}


def to_flight_error(exc: BaseException) -> flight.FlightError:
    if isinstance(exc, flight.FlightError):
        return exc
    error = to_onehop_error(exc)
    cls = _FLIGHT_CLASSES.get(error.code, flight.FlightServerError)
    return cls(f"{error.code.name}: {error.message}")


@contextmanager
def flight_errors() -> Iterator[None]:
    """Wrap a Flight handler body: domain errors leave as clean Flight errors."""
    try:
        yield
    except flight.FlightError:
        raise
    except Exception as exc:
        raise to_flight_error(exc) from None


def from_flight_error(exc: BaseException) -> OnehopError:
    """The domain error behind a Flight client exception (ours or a peer's)."""
    if isinstance(exc, flight.FlightUnavailableError):
        return Unavailable(_flight_message(exc))
    if isinstance(exc, flight.FlightTimedOutError):
        return DeadlineExceeded(_flight_message(exc))
    if isinstance(exc, flight.FlightUnauthenticatedError):
        return Unauthenticated(_flight_message(exc))
    if isinstance(exc, flight.FlightUnauthorizedError):
        return PermissionDenied(_flight_message(exc))
    if isinstance(exc, flight.FlightError | pa.ArrowException):
        message = _flight_message(exc)
        head, _, rest = message.partition(": ")
        cls = _BY_CODE.get(getattr(grpc.StatusCode, head, None))  # type: ignore[arg-type]
        if cls is not None:
            return cls(rest)
        return Internal(message)
    return to_onehop_error(exc)


def _flight_message(exc: BaseException) -> str:
    """The server's message without the transport's '. Detail: ...' tail."""
    text = str(exc)
    for prefix in ("Flight error: ",):
        text = text.removeprefix(prefix)
    return text.split(". Detail:", 1)[0].split(". gRPC client debug context", 1)[0]
