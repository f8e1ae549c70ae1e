"""The inference edge's converters: OIP protobuf and REST bodies ↔ numpy, and every malformed
request answered with InvalidArgument and a message that says what to fix."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from gateway import tensors
from gateway.tensors import HEADER_LENGTH, InferRequest, RequestedOutput, TensorSpec
from onehop.errors import InvalidArgument
from onehop.keys import prediction_keys
from protos.inference import grpc_service_pb2 as pb

ROWS = np.array([[1.0, 2.5, -3.0], [0.0, 4.0, 1e-3]], dtype=np.float32)
OUTPUTS = {
    "probability": np.array([[0.25], [0.75]], dtype=np.float32),
    "logits": np.array([[-1.0, 1.0], [2.0, -2.0]], dtype=np.float32),
}


def grpc_request(raw: bool = True) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="risk", model_version="2", id="req-1")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(ROWS.shape))
    if raw:
        request.raw_input_contents.append(ROWS.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(ROWS.ravel().tolist())
    return request


def binary_body(
    rows: np.ndarray = ROWS, extra: bytes = b"", **document: object
) -> tuple[bytes, str]:
    """A body as tritonclient.http sends it by default: JSON header + raw FP32 tensor."""
    blob = rows.astype("<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(rows.shape),
                "parameters": {"binary_data_size": len(blob)},
            }
        ],
        "parameters": {"binary_data_output": True},
        **document,
    }
    encoded = json.dumps(header).encode()
    return encoded + blob + extra, str(len(encoded))


def json_body(data: object, shape: object = None, **tensor: object) -> bytes:
    entry = {"name": "input", "datatype": "FP32", "shape": shape or list(ROWS.shape), "data": data}
    entry.update(tensor)
    return json.dumps({"inputs": [entry]}).encode()


def parse_binary_response(body: bytes, header_length: int) -> dict[str, np.ndarray]:
    document = json.loads(body[:header_length])
    offset = header_length
    arrays = {}
    for output in document["outputs"]:
        size = output["parameters"]["binary_data_size"]
        chunk = body[offset : offset + size]
        arrays[output["name"]] = np.frombuffer(chunk, dtype="<f4").reshape(output["shape"])
        offset += size
    assert offset == len(body)
    return arrays


# --- gRPC -------------------------------------------------------------------------------


def test_grpc_raw_round_trip() -> None:
    parsed = tensors.grpc_to_request(grpc_request(raw=True))
    assert (parsed.model, parsed.version, parsed.id, parsed.raw) == ("risk", "2", "req-1", True)
    assert parsed.rows.dtype == np.float32
    np.testing.assert_array_equal(parsed.rows, ROWS)

    response = tensors.grpc_response(parsed, "2", OUTPUTS)
    assert (response.model_name, response.model_version, response.id) == ("risk", "2", "req-1")
    assert [o.name for o in response.outputs] == ["probability", "logits"]
    assert len(response.raw_output_contents) == 2
    assert not response.outputs[0].contents.fp32_contents
    decoded = tensors.grpc_outputs(response, rows=2)
    for name, array in OUTPUTS.items():
        np.testing.assert_array_equal(decoded[name], array)
    assert list(response.outputs[1].shape) == [2, 2]


def test_grpc_typed_round_trip() -> None:
    parsed = tensors.grpc_to_request(grpc_request(raw=False))
    assert parsed.raw is False
    np.testing.assert_array_equal(parsed.rows, ROWS)
    response = tensors.grpc_response(parsed, "2", OUTPUTS)
    assert not response.raw_output_contents
    assert list(response.outputs[0].contents.fp32_contents) == [0.25, 0.75]
    np.testing.assert_array_equal(
        tensors.grpc_outputs(response, rows=2)["logits"], OUTPUTS["logits"]
    )


def test_grpc_requested_outputs_are_honoured() -> None:
    request = grpc_request()
    request.outputs.add(name="logits")
    parsed = tensors.grpc_to_request(request)
    assert parsed.outputs == (RequestedOutput("logits"),)
    response = tensors.grpc_response(parsed, "2", OUTPUTS)
    assert [o.name for o in response.outputs] == ["logits"]
    assert len(response.raw_output_contents) == 1

    request.outputs.add(name="nope")
    with pytest.raises(InvalidArgument, match="unknown output 'nope'.*probability"):
        tensors.grpc_response(tensors.grpc_to_request(request), "2", OUTPUTS)


def test_grpc_infer_request_for_the_trainer() -> None:
    request = tensors.grpc_infer_request("risk", "3", ROWS)
    assert (request.model_name, request.model_version) == ("risk", "3")
    assert (request.inputs[0].name, request.inputs[0].datatype) == ("input", "FP32")
    assert list(request.inputs[0].shape) == [2, 3]
    np.testing.assert_array_equal(tensors.grpc_to_request(request).rows, ROWS)


def _bad(request: pb.ModelInferRequest, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        tensors.grpc_to_request(request)


def test_grpc_malformed_requests() -> None:
    request = grpc_request()
    request.inputs[0].datatype = "FP64"
    _bad(request, "datatype 'FP64'.*FP32")

    request = grpc_request()
    request.inputs[0].name = "x"
    _bad(request, "unknown input 'x'")

    request = grpc_request()
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend([6])
    _bad(request, r"shape \[6\].*2-D")

    request = grpc_request()
    request.inputs[0].shape[0] = -1
    _bad(request, "negative")

    request = grpc_request()
    request.raw_input_contents[0] = request.raw_input_contents[0][:-1]
    _bad(request, "23 bytes.*needs 24")

    request = grpc_request()
    request.raw_input_contents.append(b"")
    _bad(request, "2 raw_input_contents for 1 input")

    request = grpc_request()
    request.inputs[0].contents.fp32_contents.append(1.0)
    _bad(request, "both raw_input_contents and typed")

    request = grpc_request(raw=False)
    request.inputs[0].contents.fp32_contents.append(1.0)
    _bad(request, "7 values but shape .* needs 6")

    request = grpc_request(raw=False)
    request.inputs[0].contents.int_contents.append(1)
    _bad(request, "int_contents.*fp32_contents")

    request = grpc_request()
    request.inputs.add(name="other", datatype="FP32", shape=[1, 1])
    _bad(request, "exactly one input.*got 2")

    _bad(pb.ModelInferRequest(model_name="risk"), "exactly one input.*got 0")

    request = grpc_request()
    request.inputs[0].parameters["shared_memory_region"].string_param = "r"
    _bad(request, "shared-memory")


def test_grpc_outputs_rejects_a_wrong_row_count() -> None:
    response = tensors.grpc_response(InferRequest("risk", "1", ROWS, raw=True), "1", OUTPUTS)
    with pytest.raises(InvalidArgument, match="for 3 rows"):
        tensors.grpc_outputs(response, rows=3)


def test_grpc_parameters_are_plain_values() -> None:
    response = pb.ModelInferResponse()
    response.parameters["onehop-weights-digest"].string_param = "abc"
    response.parameters["n"].int64_param = 3
    response.parameters["flag"].bool_param = True
    assert tensors.grpc_parameters(response.parameters) == {
        "onehop-weights-digest": "abc",
        "n": 3,
        "flag": True,
    }


def test_metadata_round_trip() -> None:
    metadata = tensors.ModelMetadata(
        name="risk",
        versions=("1", "2"),
        platform="pytorch",
        inputs=(TensorSpec("input", "FP32", (-1, 3)),),
        outputs=(TensorSpec("probability", "FP32", (-1, 1)),),
    )
    assert tensors.metadata_from_grpc(tensors.metadata_to_grpc(metadata)) == metadata
    assert tensors.metadata_to_json(metadata) == {
        "name": "risk",
        "versions": ["1", "2"],
        "platform": "pytorch",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": [{"name": "probability", "datatype": "FP32", "shape": [-1, 1]}],
    }


# --- HTTP -------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [ROWS.ravel().tolist(), ROWS.tolist()], ids=["flat", "nested"])
def test_http_json_round_trip(data: list) -> None:
    parsed = tensors.http_to_request("risk", "", json_body(data))
    np.testing.assert_array_equal(parsed.rows, ROWS)
    assert (parsed.model, parsed.version, parsed.outputs, parsed.binary_output) == (
        "risk",
        "",
        None,
        False,
    )
    body, headers = tensors.http_response(parsed, "4", OUTPUTS)
    assert headers == {"content-type": "application/json"}
    document = json.loads(body)
    assert document["model_name"] == "risk" and document["model_version"] == "4"
    assert "id" not in document
    out = {o["name"]: o for o in document["outputs"]}
    assert out["logits"]["shape"] == [2, 2] and out["logits"]["datatype"] == "FP32"
    np.testing.assert_array_equal(
        np.asarray(out["logits"]["data"], dtype=np.float32).reshape(2, 2), OUTPUTS["logits"]
    )


def test_http_binary_round_trip_as_tritonclient_sends_it() -> None:
    body, length = binary_body(id="abc")
    parsed = tensors.http_to_request("risk", "2", body, length)
    np.testing.assert_array_equal(parsed.rows, ROWS)
    assert parsed.binary_output is True and parsed.id == "abc"

    response, headers = tensors.http_response(parsed, "2", OUTPUTS)
    assert headers["content-type"] == "application/octet-stream"
    header_length = int(headers[HEADER_LENGTH])
    assert json.loads(response[:header_length])["id"] == "abc"
    decoded = parse_binary_response(response, header_length)
    for name, array in OUTPUTS.items():
        np.testing.assert_array_equal(decoded[name], array)


def test_http_per_output_binary_choice() -> None:
    body, length = binary_body(
        outputs=[
            {"name": "logits", "parameters": {"binary_data": True}},
            {"name": "probability", "parameters": {"binary_data": False}},
        ]
    )
    parsed = tensors.http_to_request("risk", "", body, length)
    response, headers = tensors.http_response(parsed, "1", OUTPUTS)
    header_length = int(headers[HEADER_LENGTH])
    document = json.loads(response[:header_length])
    assert [o["name"] for o in document["outputs"]] == ["logits", "probability"]
    assert document["outputs"][1]["data"] == [0.25, 0.75]
    assert "data" not in document["outputs"][0]
    np.testing.assert_array_equal(
        np.frombuffer(response[header_length:], dtype="<f4").reshape(2, 2), OUTPUTS["logits"]
    )


def test_http_requested_unknown_output() -> None:
    body = json.dumps(
        {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1], "data": [1]}],
            "outputs": [{"name": "nope"}],
        }
    ).encode()
    parsed = tensors.http_to_request("risk", "", body)
    with pytest.raises(InvalidArgument, match="unknown output 'nope'"):
        tensors.http_response(parsed, "1", OUTPUTS)


@pytest.mark.parametrize(
    ("body", "length", "match"),
    [
        (b"{not json", None, "malformed"),
        (b"\xff\xfe", None, "not UTF-8|malformed"),
        (b"[1, 2]", None, "JSON object"),
        (b'{"inputs": {}}', None, "'inputs' must be a list"),
        (b'{"inputs": []}', None, "exactly one input.*got 0"),
        (json_body([1, 2, 3, 4, 5]), None, "5 values but shape .* needs 6"),
        (json_body([[1, 2], [3]]), None, "ragged"),
        (json_body(["1", "2", "3", "4", "5", "6"]), None, "numbers"),
        (json_body([1, None, 3, 4, 5, 6]), None, "numbers"),
        (json_body([1] * 6, datatype="INT32"), None, "datatype 'INT32'.*FP32"),
        (json_body([1] * 6, name="x"), None, "unknown input 'x'"),
        (json_body([1] * 6, shape=[6]), None, "2-D"),
        (json_body([1] * 6, shape=[2, "3"]), None, "2-D"),
        (json_body([1] * 6, id=5), None, None),  # ids on tensors are ignored
        (b'{"id": 5, "inputs": []}', None, "'id' must be a string"),
        (
            json.dumps(
                {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1]}]}
            ).encode(),
            None,
            "no 'data'",
        ),
        (b"{}", "x", "must be a non-negative integer"),
        (b"{}", "-1", "non-negative"),
        (b"{}", "99", "99 but the request body has only 2 bytes"),
    ],
)
def test_http_malformed_bodies(body: bytes, length: str | None, match: str | None) -> None:
    if match is None:
        tensors.http_to_request("risk", "", body, length)
        return
    with pytest.raises(InvalidArgument, match=match):
        tensors.http_to_request("risk", "", body, length)


def test_http_binary_size_mismatches() -> None:
    body, length = binary_body()
    with pytest.raises(InvalidArgument, match="only 23 bytes follow"):
        tensors.http_to_request("risk", "", body[:-1], length)

    body, length = binary_body(extra=b"\0\0\0\0")
    with pytest.raises(InvalidArgument, match="4 bytes follow the binary tensors"):
        tensors.http_to_request("risk", "", body, length)

    body, length = binary_body(rows=ROWS[:, :2])  # declares shape [2, 2] → 16 bytes
    document = json.loads(body[: int(length)])
    document["inputs"][0]["shape"] = [2, 3]
    header = json.dumps(document).encode()
    with pytest.raises(InvalidArgument, match="16 bytes of data but shape \\[2, 3\\].*needs 24"):
        tensors.http_to_request("risk", "", header + body[int(length) :], str(len(header)))

    body, length = binary_body()
    with pytest.raises(InvalidArgument, match="header is missing"):
        tensors.http_to_request("risk", "", body[: int(length)], None)
    with pytest.raises(InvalidArgument, match="malformed|not UTF-8"):
        # Without the header length the JSON parser meets the binary tail: still a 400.
        tensors.http_to_request("risk", "", body, None)


def test_http_binary_with_data_too_is_rejected() -> None:
    blob = ROWS.astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [2, 3],
                    "data": [0] * 6,
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    ).encode()
    with pytest.raises(InvalidArgument, match="both 'data' and binary_data_size"):
        tensors.http_to_request("risk", "", header + blob, str(len(header)))


def test_http_bad_parameter_types() -> None:
    with pytest.raises(InvalidArgument, match="binary_data_output must be true or false"):
        tensors.http_to_request(
            "risk", "", b'{"parameters": {"binary_data_output": "yes"}, "inputs": []}'
        )
    with pytest.raises(InvalidArgument, match=r"outputs\[0\] needs a 'name'"):
        tensors.http_to_request("risk", "", json_body([1] * 6)[:-1] + b', "outputs": [{}]}')


def test_struct_packing_matches_tritonclient() -> None:
    """tritonclient packs the JSON then the tensor bytes with struct: same bytes as ours."""
    body, length = binary_body()
    header = body[: int(length)]
    blob = ROWS.astype("<f4").tobytes()
    assert body == struct.pack(f"{len(header)}s{len(blob)}s", header, blob)


# --- keys ---------------------------------------------------------------------------------


def test_prediction_keys_are_per_row_and_include_the_digest() -> None:
    rows = np.array([[1.0, 2.0], [1.0, 2.0], [2.0, 1.0]], dtype=np.float32)
    keys = prediction_keys("risk", "d1", rows)
    assert len(keys) == 3
    assert keys[0] == keys[1] != keys[2]
    assert all(key.startswith(b"pred/risk/d1/") for key in keys)
    assert len(keys[0].rsplit(b"/", 1)[1]) == 64  # sha256 hex: 256 bits
    assert prediction_keys("risk", "d2", rows)[0] != keys[0]
    assert prediction_keys("risk", "d1", rows.astype(np.float64))[0] == keys[0]
