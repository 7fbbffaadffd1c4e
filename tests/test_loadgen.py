"""bench/loadgen.py, the benchmark's HTTP client: against the real server it reads what httpx reads, error
answers included, on one keep-alive connection; and it reads chunked bodies."""

from __future__ import annotations

import asyncio
import json

import pytest

from bench.loadgen import Connection, HttpError
from bench.serve import OUTPUT_SAMPLE, drive
from pha_core.tasks import get_task
from tests.support.processes import ApiServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loadgen")
    settings = {"PHA_CHECKPOINT": str(tiny_checkpoint), "PHA_REDIS_URL": "", "PHA_REGISTRY_DIR": str(folder / "r")}
    with ApiServer(settings, folder / "api.log") as api:
        api.wait_ready()
        yield api


def test_answers_match_httpx_on_one_connection(server):
    good = {"inputs": "sentence: a fine film.", "task": "sst2", "max_new_tokens": 2}
    bad = {"inputs": "x", "task": "no_such_task"}
    with server.client() as client:
        expected_good, expected_bad = client.post("/predict", json=good), client.post("/predict", json=bad)

    async def run() -> list[tuple[int, bytes]]:
        async with Connection(server.base) as conn:
            wire = [conn.request_bytes("/predict", body) for body in (good, bad, good)]
            return [await conn.send(request) for request in wire]

    (s1, b1), (s2, b2), (s3, b3) = asyncio.run(run())
    assert (s1, json.loads(b1)) == (200, expected_good.json())
    assert (s2, json.loads(b2)["detail"]) == (expected_bad.status_code, expected_bad.json()["detail"])
    assert s2 >= 400 and (s3, b3) == (s1, b1)  # the connection stays usable after an error answer


def test_drive_counts_every_answer(server):
    body = {"inputs": "sentence: fine.", "task": "sst2", "max_new_tokens": 2}
    result = asyncio.run(drive(server.base, [body], concurrency=3, duration=1.0))
    assert result["failures"] == {} and result["requests"] > 0
    # every answer read and parsed: the sample holds the first answers, each one of SST-2's labels
    assert len(result["outputs"]) == min(result["requests"], OUTPUT_SAMPLE)
    assert set(result["outputs"]) <= set(get_task("sst2").labels)


def test_chunked_bodies_are_read():
    async def run() -> tuple[int, bytes]:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)  # the body "{}"
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n")
            await writer.drain()

        listener = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        async with listener, Connection(f"http://127.0.0.1:{port}") as conn:
            return await conn.send(conn.request_bytes("/", {}))

    assert asyncio.run(run()) == (200, b"abcde")


def test_non_http_answers_and_bad_bases_are_refused():
    async def run() -> None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"SSH-2.0-OpenSSH\r\n")
            await writer.drain()

        listener = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        async with listener, Connection(f"http://127.0.0.1:{port}") as conn:
            await conn.send(conn.request_bytes("/", {}))

    with pytest.raises(HttpError, match="status line"):
        asyncio.run(run())
    with pytest.raises(ValueError, match="http://host:port"):
        Connection("https://example.org")
