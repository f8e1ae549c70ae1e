"""Auth and TLS: a mesh started with a bearer token refuses calls without it or with a wrong
one (UNAUTHENTICATED / 401) on gRPC, HTTP and Flight, at the gateway and the inner services,
while grpc.health.v1 stays open to probes; a mesh with mTLS refuses a client with no
certificate, one from an untrusted CA and an expired one."""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pyarrow.flight as flight
import pytest
from harness import SERVICE_NAMES, MeshUnderTest, Report

from onehop.launcher import health_status
from onehop.settings import Settings
from protos.onehop.v1 import cache_pb2, cache_pb2_grpc, gateway_pb2, gateway_pb2_grpc

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

TOKEN = "s3cret-token"
HAS_AUTH = "auth_token" in Settings.model_fields
HAS_TLS = {"tls_cert_file", "tls_key_file", "tls_ca_file", "tls_client_auth"} <= set(
    Settings.model_fields
)


@pytest.fixture(scope="module")
def token_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshUnderTest]:
    if not HAS_AUTH:
        pytest.skip("no auth_token setting yet (ONEHOP_AUTH_TOKEN)")
    mesh = MeshUnderTest(tmp_path_factory.mktemp("auth") / "data", env={"ONEHOP_AUTH_TOKEN": TOKEN})
    try:
        yield mesh.start()
    finally:
        mesh.stop()


CREDENTIALS = {"none": None, "wrong": "Bearer nope", "right": f"Bearer {TOKEN}"}


def test_bearer_token_on_grpc_http_and_flight(token_mesh: MeshUnderTest, report: Report) -> None:
    mesh = token_mesh
    seen: dict[str, dict[str, str]] = {}
    for who, value in CREDENTIALS.items():
        metadata = [("authorization", value)] if value else []
        answers = seen.setdefault(who, {})
        with grpc.insecure_channel(mesh.endpoint("gateway")) as channel:
            try:
                gateway_pb2_grpc.GatewayStub(channel).ListDatasets(
                    gateway_pb2.ListDatasetsRequest(), metadata=metadata, timeout=10
                )
                answers["gateway grpc"] = "OK"
            except grpc.RpcError as exc:
                answers["gateway grpc"] = exc.code().name
        with grpc.insecure_channel(mesh.endpoint("cache")) as channel:
            try:
                cache_pb2_grpc.CacheStub(channel).Get(
                    cache_pb2.GetRequest(key=b"pred/x"), metadata=metadata, timeout=10
                )
                answers["cache grpc"] = "OK"
            except grpc.RpcError as exc:
                answers["cache grpc"] = exc.code().name
        headers = {"Authorization": value} if value else {}
        response = httpx.get(
            f"http://{mesh.endpoint('gateway', 'http')}/v1/datasets", headers=headers, timeout=10
        )
        answers["gateway http"] = str(response.status_code)
        report.bad_input("auth: missing/wrong token", 0 if who == "right" else len(answers))
    for who in ("none", "wrong"):
        assert seen[who] == {
            "gateway grpc": "UNAUTHENTICATED",
            "cache grpc": "UNAUTHENTICATED",
            "gateway http": "401",
        }, seen
    assert seen["right"] == {
        "gateway grpc": "OK",
        "cache grpc": "OK",
        "gateway http": "200",
    }, seen
    # Probes need no token.
    for service in SERVICE_NAMES:
        assert health_status(mesh.endpoint(service)) == "SERVING", service


def test_bearer_token_on_flight(token_mesh: MeshUnderTest, report: Report) -> None:
    seen = {}
    for who, value in CREDENTIALS.items():
        for service in ("gateway", "shard", "cache"):
            client = flight.connect(f"grpc+tcp://{token_mesh.endpoint(service, 'flight')}")
            options = flight.FlightCallOptions(
                headers=[(b"authorization", value.encode())] if value else [], timeout=10
            )
            try:
                client.do_get(flight.Ticket(b"x"), options).read_all()
                seen[(who, service)] = "OK"
            except flight.FlightUnauthenticatedError:
                seen[(who, service)] = "UNAUTHENTICATED"
            except flight.FlightError as exc:
                seen[(who, service)] = (
                    "answered" if "INVALID_ARGUMENT" in str(exc) else str(exc)[:80]
                )
            finally:
                client.close()
            report.bad_input("auth: missing/wrong token", 0 if who == "right" else 1)
    for who in ("none", "wrong"):
        for service in ("gateway", "shard", "cache"):
            assert seen[(who, service)] == "UNAUTHENTICATED", seen
    assert all(seen[("right", s)] != "UNAUTHENTICATED" for s in ("gateway", "shard", "cache"))


# --- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    trustme = pytest.importorskip("trustme")
    root = tmp_path_factory.mktemp("pki")
    ca, rogue = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@onehop")
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = ca.issue_cert(
        "client@onehop",
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    stranger = rogue.issue_cert("client@onehop")
    files = {}
    for name, blob in {
        "ca": ca.cert_pem,
        "server.crt": server.cert_chain_pems[0],
        "server.key": server.private_key_pem,
        "client.crt": client.cert_chain_pems[0],
        "client.key": client.private_key_pem,
        "expired.crt": expired.cert_chain_pems[0],
        "expired.key": expired.private_key_pem,
        "stranger.crt": stranger.cert_chain_pems[0],
        "stranger.key": stranger.private_key_pem,
    }.items():
        path = root / name
        blob.write_to_path(str(path))
        files[name] = path
    return files


@pytest.fixture(scope="module")
def tls_mesh(
    pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MeshUnderTest]:
    if not HAS_TLS:
        pytest.skip("no TLS settings yet (ONEHOP_TLS_*)")
    env = {
        "ONEHOP_TLS_CERT_FILE": str(pki["server.crt"]),
        "ONEHOP_TLS_KEY_FILE": str(pki["server.key"]),
        "ONEHOP_TLS_CA_FILE": str(pki["ca"]),
        "ONEHOP_TLS_CLIENT_AUTH": "true",
    }
    mesh = MeshUnderTest(tmp_path_factory.mktemp("tls") / "data", env=env, start_timeout=60)
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()


def _grpc_answer(address: str, pki: dict[str, Path], cert: str | None) -> str:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(),
        private_key=pki[f"{cert}.key"].read_bytes() if cert else None,
        certificate_chain=pki[f"{cert}.crt"].read_bytes() if cert else None,
    )
    with grpc.secure_channel(address, credentials) as channel:
        try:
            gateway_pb2_grpc.GatewayStub(channel).ListDatasets(
                gateway_pb2.ListDatasetsRequest(), timeout=10
            )
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name


def _https_answer(address: str, pki: dict[str, Path], cert: str | None) -> str:
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    if cert:
        context.load_cert_chain(str(pki[f"{cert}.crt"]), str(pki[f"{cert}.key"]))
    try:
        return str(
            httpx.get(f"https://{address}/v1/datasets", verify=context, timeout=10).status_code
        )
    except (httpx.TransportError, ssl.SSLError):
        return "REFUSED"


def test_mtls_refuses_missing_untrusted_and_expired_certificates(
    tls_mesh: MeshUnderTest, pki: dict[str, Path], report: Report
) -> None:
    grpc_address = tls_mesh.endpoint("gateway")
    https_address = tls_mesh.endpoint("gateway", "http")
    answers = {
        cert or "none": (
            _grpc_answer(grpc_address, pki, cert),
            _https_answer(https_address, pki, cert),
        )
        for cert in (None, "stranger", "expired", "client")
    }
    report.bad_input("TLS: bad client certificates", 6)
    assert answers["client"] == ("OK", "200"), answers
    for who in ("none", "stranger", "expired"):
        assert answers[who][0] == "UNAVAILABLE", answers  # the handshake fails: no call at all
        assert answers[who][1] == "REFUSED", answers
