"""Converters at the inference edge: OIP v2 protobuf messages and OIP REST bodies (JSON, plus
Triton's binary-tensor extension) to and from numpy. Pure functions; bad input raises
InvalidArgument with a message that says what to send instead.

onehop models take one FP32 input named "input" of shape [batch, n_features] and answer with
FP32 outputs of shape [batch, k] (DESIGN §8).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from onehop.errors import InvalidArgument
from protos.inference import grpc_service_pb2 as pb

INPUT_NAME = "input"
FP32 = "FP32"
# Triton's binary-tensor extension: the JSON header's length when binary data follows it.
HEADER_LENGTH = "Inference-Header-Content-Length"
_F32 = np.dtype("<f4")


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    # HTTP only: send this output as binary data; None = the request's default.
    binary: bool | None = None


@dataclass(frozen=True)
class InferRequest:
    """One inference request as the router sees it, plus what the edge needs to answer it."""

    model: str
    version: str
    rows: np.ndarray  # [batch, n_features] float32
    id: str = ""
    outputs: tuple[RequestedOutput, ...] | None = None  # None = every output
    # gRPC: the input came as raw_input_contents, so answer with raw_output_contents.
    raw: bool = False
    # HTTP: request-level `parameters.binary_data_output`.
    binary_output: bool = False
    # The request's own `parameters.timeout` (microseconds in OIP), in seconds; None = none.
    timeout: float | None = None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


# --- shared checks ----------------------------------------------------------------------


def _check_input_header(name: str, datatype: str, shape: Sequence[Any]) -> tuple[int, int]:
    if name != INPUT_NAME:
        raise InvalidArgument(f"unknown input {name!r}: onehop models take one input named 'input'")
    if datatype != FP32:
        raise InvalidArgument(
            f"input 'input' has datatype {datatype or '(empty)'!r}; onehop models take FP32"
        )
    dims = list(shape)
    if len(dims) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise InvalidArgument(
            f"input 'input' has shape {dims}; send a 2-D shape [batch, n_features]"
        )
    if dims[0] < 0 or dims[1] < 0:
        raise InvalidArgument(f"input 'input' has negative dimensions in shape {dims}")
    return dims[0], dims[1]


def rows_from_bytes(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """Little-endian FP32 bytes → a [batch, n_features] array, checking the byte count."""
    expected = shape[0] * shape[1] * _F32.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"input 'input' has {len(data)} bytes of data but shape {list(shape)} of FP32 "
            f"needs {expected}"
        )
    return np.frombuffer(data, dtype=_F32).astype(np.float32).reshape(shape)


def rows_from_values(values: Any, shape: tuple[int, int]) -> np.ndarray:
    """A flat or nested list of numbers → a [batch, n_features] array, checking the count."""
    try:
        array = np.asarray(values)
    except (ValueError, TypeError):
        raise InvalidArgument("input 'input' data is ragged or not a list of numbers") from None
    if array.size and array.dtype.kind not in "iuf":
        raise InvalidArgument("input 'input' data must be numbers (FP32), not strings or nulls")
    expected = shape[0] * shape[1]
    if array.size != expected:
        raise InvalidArgument(
            f"input 'input' has {array.size} values but shape {list(shape)} needs {expected}"
        )
    return array.astype(np.float32).reshape(shape)


def select_outputs(
    outputs: Mapping[str, np.ndarray],
    requested: Sequence[RequestedOutput] | None,
    default_binary: bool = False,
) -> list[tuple[str, np.ndarray, bool]]:
    """The outputs to send, in request order (or the model's order when none were named):
    (name, array, send as binary)."""
    if requested is None:
        return [(name, array, default_binary) for name, array in outputs.items()]
    chosen: list[tuple[str, np.ndarray, bool]] = []
    seen: set[str] = set()
    for output in requested:
        if output.name not in outputs:
            raise InvalidArgument(
                f"unknown output {output.name!r}; this model's outputs are {sorted(outputs)}"
            )
        if output.name in seen:
            raise InvalidArgument(f"output {output.name!r} is requested more than once")
        seen.add(output.name)
        binary = default_binary if output.binary is None else output.binary
        chosen.append((output.name, outputs[output.name], binary))
    return chosen


def _timeout_seconds(value: Any) -> float | None:
    """`parameters.timeout` (microseconds, as tritonclient sends it) → seconds; 0 = none."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgument("parameters.timeout must be a non-negative integer (microseconds)")
    return value / 1e6 if value else None


def _f32_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=_F32).tobytes()


# --- gRPC (inference.GRPCInferenceService) ---------------------------------------------


def grpc_to_request(request: pb.ModelInferRequest) -> InferRequest:
    """A client's ModelInferRequest → InferRequest; typed fp32_contents or raw_input_contents."""
    if len(request.inputs) != 1:
        raise InvalidArgument(
            f"expected exactly one input tensor named 'input', got {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    shape = _check_input_header(tensor.name, tensor.datatype, tensor.shape)
    if "shared_memory_region" in tensor.parameters:
        raise InvalidArgument("shared-memory inputs are not supported; send the data inline")
    typed = {field.name for field, _ in tensor.contents.ListFields()}
    raw = len(request.raw_input_contents) > 0
    if raw:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidArgument(
                f"{len(request.raw_input_contents)} raw_input_contents for "
                f"{len(request.inputs)} input; send one per input"
            )
        if typed:
            raise InvalidArgument(
                "input 'input' has both raw_input_contents and typed contents; send one"
            )
        rows = rows_from_bytes(request.raw_input_contents[0], shape)
    else:
        if typed - {"fp32_contents"}:
            raise InvalidArgument(
                f"input 'input' is FP32 but carries {sorted(typed)}; use fp32_contents"
            )
        rows = rows_from_values(np.asarray(tensor.contents.fp32_contents, dtype=np.float32), shape)
    outputs = (
        tuple(RequestedOutput(output.name) for output in request.outputs)
        if request.outputs
        else None
    )
    timeout = None
    if "timeout" in request.parameters:
        timeout = _timeout_seconds(grpc_parameters(request.parameters)["timeout"])
    return InferRequest(
        model=request.model_name,
        version=request.model_version,
        rows=rows,
        id=request.id,
        outputs=outputs,
        raw=raw,
        timeout=timeout,
    )


def grpc_response(
    request: InferRequest, model_version: str, outputs: Mapping[str, np.ndarray]
) -> pb.ModelInferResponse:
    """Outputs → ModelInferResponse, raw when the request was raw (as tritonclient expects)."""
    response = pb.ModelInferResponse(
        model_name=request.model, model_version=model_version, id=request.id
    )
    for name, array, _ in select_outputs(outputs, request.outputs):
        tensor = response.outputs.add(name=name, datatype=FP32, shape=list(array.shape))
        if request.raw:
            response.raw_output_contents.append(_f32_bytes(array))
        else:
            tensor.contents.fp32_contents.extend(array.reshape(-1).tolist())
    return response


def grpc_infer_request(
    model: str, version: str, rows: np.ndarray, input_name: str = INPUT_NAME
) -> pb.ModelInferRequest:
    """The gateway's own request to a model server: FP32 rows as raw_input_contents."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name=input_name, datatype=FP32, shape=list(rows.shape))
    request.raw_input_contents.append(_f32_bytes(rows))
    return request


def grpc_outputs(response: pb.ModelInferResponse, rows: int) -> dict[str, np.ndarray]:
    """A model server's response → {name: [rows, k] float32}, in the response's order."""
    raw = response.raw_output_contents
    if raw and len(raw) != len(response.outputs):
        raise InvalidArgument(f"{len(raw)} raw_output_contents for {len(response.outputs)} outputs")
    outputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(response.outputs):
        if tensor.datatype != FP32:
            raise InvalidArgument(f"output {tensor.name!r} is {tensor.datatype}, not FP32")
        if raw:
            values = np.frombuffer(raw[index], dtype=_F32)
        else:
            values = np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
        if rows == 0 or values.size % rows:
            raise InvalidArgument(
                f"output {tensor.name!r} has {values.size} values for {rows} rows"
            )
        outputs[tensor.name] = values.astype(np.float32).reshape(rows, values.size // rows)
    return outputs


def grpc_parameters(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """An InferParameter map → plain Python values."""
    plain: dict[str, Any] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            plain[key] = getattr(parameter, choice)
    return plain


def metadata_from_grpc(response: pb.ModelMetadataResponse) -> ModelMetadata:
    def specs(tensors: Sequence[Any]) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in tensors)

    return ModelMetadata(
        name=response.name,
        versions=tuple(response.versions),
        platform=response.platform,
        inputs=specs(response.inputs),
        outputs=specs(response.outputs),
    )


def metadata_to_grpc(metadata: ModelMetadata) -> pb.ModelMetadataResponse:
    response = pb.ModelMetadataResponse(
        name=metadata.name, versions=list(metadata.versions), platform=metadata.platform
    )
    for spec in metadata.inputs:
        response.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
    for spec in metadata.outputs:
        response.outputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
    return response


def metadata_to_json(metadata: ModelMetadata) -> dict[str, Any]:
    def specs(tensors: Sequence[TensorSpec]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors]

    return {
        "name": metadata.name,
        "versions": list(metadata.versions),
        "platform": metadata.platform,
        "inputs": specs(metadata.inputs),
        "outputs": specs(metadata.outputs),
    }


# --- HTTP (OIP REST + binary-tensor extension) ------------------------------------------


def _header_length(value: str | None, body_length: int) -> int | None:
    if value is None:
        return None
    try:
        length = int(value.strip())
    except ValueError:
        raise InvalidArgument(
            f"{HEADER_LENGTH} must be a non-negative integer, got {value!r}"
        ) from None
    if length < 0:
        raise InvalidArgument(f"{HEADER_LENGTH} must be a non-negative integer, got {length}")
    if length > body_length:
        raise InvalidArgument(
            f"{HEADER_LENGTH} is {length} but the request body has only {body_length} bytes"
        )
    return length


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(
            f"the request's JSON header is malformed: {exc.msg} at byte {exc.pos}"
        ) from None
    if not isinstance(document, dict):
        raise InvalidArgument("the request body must be a JSON object with an 'inputs' list")
    return document


def _dict_field(document: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = document.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where}.{key} must be a JSON object")
    return value


def _bool_field(document: Mapping[str, Any], key: str, where: str) -> bool | None:
    value = document.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise InvalidArgument(f"{where}.{key} must be true or false")
    return value


def http_to_request(
    model: str, version: str, body: bytes, header_length: str | None = None
) -> InferRequest:
    """An OIP REST body → InferRequest. With `Inference-Header-Content-Length: L` the first
    L bytes are the JSON header and the rest the binary tensors, in input order."""
    length = _header_length(header_length, len(body))
    header, binary = (body, b"") if length is None else (body[:length], body[length:])
    document = _json_object(header)

    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument("'id' must be a string")
    parameters = _dict_field(document, "parameters", "request")
    binary_output = bool(_bool_field(parameters, "binary_data_output", "parameters"))
    timeout = _timeout_seconds(parameters.get("timeout"))

    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise InvalidArgument("'inputs' must be a list of tensor objects")
    if len(inputs) != 1:
        raise InvalidArgument(f"expected exactly one input tensor named 'input', got {len(inputs)}")
    tensor = inputs[0]
    shape_field = tensor.get("shape")
    if not isinstance(shape_field, list):
        raise InvalidArgument("input 'input' needs a 'shape' list, e.g. [batch, n_features]")
    shape = _check_input_header(
        str(tensor.get("name", "")), str(tensor.get("datatype", "")), shape_field
    )
    tensor_parameters = _dict_field(tensor, "parameters", "inputs[0]")
    if "shared_memory_region" in tensor_parameters:
        raise InvalidArgument("shared-memory inputs are not supported; send the data inline")
    size = tensor_parameters.get("binary_data_size")
    offset = 0
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgument("inputs[0].parameters.binary_data_size must be an integer >= 0")
        if "data" in tensor:
            raise InvalidArgument("input 'input' has both 'data' and binary_data_size; send one")
        if length is None:
            raise InvalidArgument(
                f"input 'input' is binary but the {HEADER_LENGTH} header is missing"
            )
        if size > len(binary):
            raise InvalidArgument(
                f"input 'input' declares binary_data_size {size} but only {len(binary)} "
                "bytes follow the JSON header"
            )
        rows = rows_from_bytes(binary[:size], shape)
        offset = size
    elif "data" in tensor:
        rows = rows_from_values(tensor["data"], shape)
    else:
        raise InvalidArgument("input 'input' has no 'data' and no binary_data_size")
    if offset != len(binary):
        raise InvalidArgument(
            f"{len(binary) - offset} bytes follow the binary tensors that no input declares"
        )

    outputs: tuple[RequestedOutput, ...] | None = None
    if document.get("outputs") is not None:
        requested = document["outputs"]
        if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
            raise InvalidArgument("'outputs' must be a list of objects with a 'name'")
        chosen = []
        for index, output in enumerate(requested):
            name = output.get("name")
            if not isinstance(name, str) or not name:
                raise InvalidArgument(f"outputs[{index}] needs a 'name'")
            where = f"outputs[{index}].parameters"
            output_parameters = _dict_field(output, "parameters", f"outputs[{index}]")
            chosen.append(
                RequestedOutput(name, _bool_field(output_parameters, "binary_data", where))
            )
        outputs = tuple(chosen)
    return InferRequest(
        model=model,
        version=version,
        rows=rows,
        id=request_id,
        outputs=outputs,
        binary_output=binary_output,
        timeout=timeout,
    )


def http_response(
    request: InferRequest, model_version: str, outputs: Mapping[str, np.ndarray]
) -> tuple[bytes, dict[str, str]]:
    """Outputs → (body, headers). Binary outputs follow the JSON header in order, each
    announced by `parameters.binary_data_size`."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array, binary in select_outputs(outputs, request.outputs, request.binary_output):
        entry: dict[str, Any] = {"name": name, "datatype": FP32, "shape": list(array.shape)}
        if binary:
            blob = _f32_bytes(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            # orjson writes the float32 array directly, without a Python list in between.
            entry["data"] = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
        entries.append(entry)
    document: dict[str, Any] = {"model_name": request.model, "model_version": model_version}
    if request.id:
        document["id"] = request.id
    document["outputs"] = entries
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {"content-type": "application/json"}
    return b"".join([header, *blobs]), {
        "content-type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }
