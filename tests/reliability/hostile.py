"""Hostile input for the reliability suite: every gRPC method of every service (from the
proto descriptors, plus Arrow Flight's), hypothesis strategies for random, mutated and
structurally valid messages, raw Flight `FlightData` frames, and the answers a hostile
client may get (the error table's client codes — never INTERNAL, never a traceback)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pyarrow.flight as flight
from google.protobuf import descriptor as pbd
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2
from hypothesis import strategies as st

from protos.inference import grpc_service_pb2
from protos.onehop.v1 import cache_pb2, data_pb2, gateway_pb2, trainer_pb2

# What a client mistake may be answered with (DESIGN §7); UNIMPLEMENTED for methods a
# server does not offer; OUT_OF_RANGE/ALREADY_EXISTS are gRPC's own client-side codes.
CLIENT_CODES = frozenset(
    {
        "OK",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "FAILED_PRECONDITION",
        "RESOURCE_EXHAUSTED",
        "OUT_OF_RANGE",
        "ALREADY_EXISTS",
        "UNIMPLEMENTED",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "PROTOCOL",  # see FLIGHT_TRANSPORT_REFUSALS
    }
)
# A server stream may legitimately stay open (Health.Watch, WatchJob of a live job).
STREAM_CODES = CLIENT_CODES | {"DEADLINE_EXCEEDED", "CANCELLED"}
LEAKS = ("Traceback", 'File "', "Error(", "pyarrow/", ".py:")

FLIGHT = "arrow.flight.protocol.FlightService"


@dataclass(frozen=True)
class Method:
    """One RPC of one server: where it is, its path, its shape, its request type."""

    service: str  # the onehop service whose port answers it
    port: str  # endpoint kind in the run file: grpc or flight
    path: str
    client_streaming: bool
    server_streaming: bool
    request: pbd.Descriptor | None  # None: Flight (raw bytes, seeds from `flight_seeds`)

    @property
    def id(self) -> str:
        return f"{self.service}:{self.path.rsplit('/', 2)[-2].rsplit('.', 1)[-1]}.{self.path.rsplit('/', 1)[-1]}"


def _methods_of(service: str, port: str, descriptor: pbd.ServiceDescriptor) -> list[Method]:
    return [
        Method(
            service,
            port,
            f"/{descriptor.full_name}/{m.name}",
            m.client_streaming,
            m.server_streaming,
            m.input_type,
        )
        for m in descriptor.methods
    ]


_FLIGHT_METHODS = {
    # name: (client streaming, server streaming)
    "Handshake": (True, True),
    "ListFlights": (False, True),
    "GetFlightInfo": (False, False),
    "PollFlightInfo": (False, False),
    "GetSchema": (False, False),
    "DoGet": (False, True),
    "DoPut": (True, True),
    "DoExchange": (True, True),
    "DoAction": (False, True),
    "ListActions": (False, True),
}


def all_methods() -> list[Method]:
    """Every RPC every service serves, by the public descriptors."""
    health = health_pb2.DESCRIPTOR.services_by_name["Health"]
    cache = cache_pb2.DESCRIPTOR.services_by_name["Cache"]
    trainer = trainer_pb2.DESCRIPTOR.services_by_name["Trainer"]
    gateway = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"]
    oip = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    methods = [
        *_methods_of("cache", "grpc", cache),
        *_methods_of("trainer", "grpc", trainer),
        *_methods_of("trainer", "grpc", oip),
        *_methods_of("gateway", "grpc", gateway),
        *_methods_of("gateway", "grpc", oip),
    ]
    for service in ("cache", "shard", "trainer", "gateway"):
        methods += _methods_of(service, "grpc", health)
    for service in ("cache", "shard", "gateway"):
        methods += [
            Method(service, "flight", f"/{FLIGHT}/{name}", cs, ss, None)
            for name, (cs, ss) in _FLIGHT_METHODS.items()
        ]
    return methods


# --- strategies ------------------------------------------------------------------------------

# Names that exist in the seeded mesh (so a message can reach deep code) and names that
# must never address anything. Never a real dataset with a real target: a fuzzed StartJob
# must not start hours of training.
NAMES = [
    "risk",
    "default",
    "",
    "../escape",
    "/etc/passwd",
    "a/../../b",
    "%2e%2e%2f",
    "file:///etc/passwd",
    "s3://bucket/key",
    "x" * 4096,
    "nul\x00byte",
    "\u202eevil",
    "..",
    ".",
    "CON",
]
INTS = [0, 1, -1, 2, 7, 2**31 - 1, -(2**31), 2**32 - 1, 2**63 - 1, -(2**63), 2**64 - 1]


def _scalar(field: pbd.FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t in (pbd.FieldDescriptor.TYPE_DOUBLE, pbd.FieldDescriptor.TYPE_FLOAT):
        return st.one_of(
            st.floats(allow_nan=True, allow_infinity=True, width=32),
            st.sampled_from([0.0, -1.0, 1e30]),
        )
    if t == pbd.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == pbd.FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from(NAMES), st.text(max_size=40))
    if t == pbd.FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=256), st.sampled_from([b"", b"\x00" * 64, b"risk"]))
    if t == pbd.FieldDescriptor.TYPE_ENUM:
        return st.one_of(
            st.sampled_from([v.number for v in field.enum_type.values]),
            st.integers(-5, 1000),
        )
    bits = {
        pbd.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
        pbd.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
        pbd.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
        pbd.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
        pbd.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
        pbd.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
        pbd.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
        pbd.FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
        pbd.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
        pbd.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
    }[t]
    lo, hi = bits
    return st.one_of(st.sampled_from([i for i in INTS if lo <= i <= hi]), st.integers(lo, hi))


@st.composite
def messages(draw: st.DrawFn, descriptor: pbd.Descriptor, depth: int = 0) -> Message:
    """A structurally valid message of `descriptor` with hostile values in its fields."""
    message = GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_f, value_f = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            for _ in range(draw(st.integers(0, 3))):
                key = draw(_scalar(key_f))
                target = getattr(message, field.name)
                if value_f.message_type is not None:
                    if depth < 2:
                        target[key].CopyFrom(draw(messages(value_f.message_type, depth + 1)))
                else:
                    target[key] = draw(_scalar(value_f))
            continue
        if field.message_type is not None:
            if depth >= 3:
                continue
            if field.is_repeated:
                for _ in range(draw(st.integers(0, 3))):
                    getattr(message, field.name).add().CopyFrom(
                        draw(messages(field.message_type, depth + 1))
                    )
            else:
                getattr(message, field.name).CopyFrom(draw(messages(field.message_type, depth + 1)))
            continue
        if field.is_repeated:
            values = draw(st.lists(_scalar(field), max_size=6))
            getattr(message, field.name).extend(values)
        else:
            setattr(message, field.name, draw(_scalar(field)))
    return message


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` with a few bytes flipped, cut, duplicated or inserted."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        at = draw(st.integers(0, max(0, len(out))))
        if op == "flip" and out:
            at = min(at, len(out) - 1)
            out[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            out = out[:at]
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "dup":
            out += out[at:]
    return bytes(out)


def flight_seeds() -> list[bytes]:
    """Well-formed Flight requests to mutate: descriptors, tickets, actions, criteria."""
    ticket = data_pb2.ShardTicket(dataset="credit", version=1, shard=0).SerializeToString()
    return [
        flight.FlightDescriptor.for_path("credit").serialize(),
        flight.FlightDescriptor.for_path("credit", "1").serialize(),
        flight.FlightDescriptor.for_command(
            data_pb2.DataRequest(dataset="credit").SerializeToString()
        ).serialize(),
        flight.Ticket(ticket).serialize(),
        flight.Action(
            "describe", data_pb2.DataRequest(dataset="credit").SerializeToString()
        ).serialize(),
        b"",
    ]


def requests_for(method: Method) -> st.SearchStrategy[bytes]:
    """Random bytes, mutated well-formed requests, and valid messages with hostile fields."""
    if method.request is None:
        seeds = st.sampled_from(flight_seeds())
        return st.one_of(st.binary(max_size=512), seeds.flatmap(mutated), seeds)
    valid = messages(method.request).map(lambda m: m.SerializeToString())
    return st.one_of(st.binary(max_size=512), valid.flatmap(mutated), valid)


# --- calling ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    code: str
    details: str
    seconds: float


def call_raw(channel: grpc.Channel, method: Method, payload: bytes, deadline: float) -> Answer:
    """Send `payload` (a serialized request, or garbage) as `method`'s request; read at most
    a few stream items. Identity (de)serializers: nothing is parsed on our side."""
    started = time.monotonic()
    try:
        if method.client_streaming:
            call = channel.stream_stream(method.path)
            _drain(call(iter([payload, payload[::-1]]), timeout=deadline))
        elif method.server_streaming:
            call = channel.unary_stream(method.path)
            _drain(call(payload, timeout=deadline))
        else:
            channel.unary_unary(method.path)(payload, timeout=deadline)
        code, details = "OK", ""
    except grpc.RpcError as exc:
        code, details = exc.code().name, exc.details() or ""  # type: ignore[attr-defined]
    return Answer(flight_code(method, code, details), details, time.monotonic() - started)


def _drain(stream: Iterator[bytes], items: int = 1) -> None:
    for i, _ in enumerate(stream):
        if i + 1 >= items:
            stream.cancel()  # type: ignore[attr-defined]
            return


# Arrow Flight's C++ transport answers a request it cannot decode before any Python handler
# runs (so onehop cannot map it): INTERNAL with no message.
FLIGHT_TRANSPORT_REFUSALS = frozenset({""})


def flight_code(method: Method, code: str, details: str) -> str:
    """Flight sends client mistakes as UNKNOWN with the table's code leading the message
    (onehop.errors' Flight edge); read it back so it is judged like any other answer. The
    transport's own refusals of undecodable frames count as PROTOCOL (a client mistake)."""
    if method.request is None and code in ("UNKNOWN", "INTERNAL"):
        if code == "INTERNAL" and details.strip() in FLIGHT_TRANSPORT_REFUSALS:
            return "PROTOCOL"
        head = details.split(":", 1)[0].strip()
        if head in CLIENT_CODES:
            return head
        # onehop's Flight edge always leads with a code name; an unprefixed UNKNOWN is
        # Arrow's C++ refusing the frames (e.g. "Invalid flatbuffers message.") before any
        # handler ran. Leaked tracebacks are caught by `leaks`.
        if code == "UNKNOWN" and head not in {c.name for c in grpc.StatusCode}:
            return "PROTOCOL"
    return code


def leaks(details: str) -> bool:
    return any(marker in details for marker in LEAKS)


# --- raw Flight DoPut frames -----------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def flight_data(
    header: bytes, body: bytes = b"", descriptor: bytes = b"", metadata: bytes = b""
) -> bytes:
    """A FlightData protobuf (Flight.proto): descriptor=1, data_header=2, app_metadata=3,
    data_body=1000 — hand-encoded so the IPC inside can be anything."""
    out = b""
    if descriptor:
        out += _field(1, descriptor)
    if header:
        out += _field(2, header)
    if metadata:
        out += _field(3, metadata)
    if body:
        out += _field(1000, body)
    return out
