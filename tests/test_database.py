"""The store interface (gateway/database.py) when PostgreSQL goes away and comes back.

A real PostgreSQL cluster of the test's own (so it can be stopped), a real ``KeyStore`` and the
gateway's real request guard in front of a stand-in API, driven with the official OpenAI SDK:
while the database is down, a request gets 503 ``database_unavailable`` (not a 500, and never a
401 that would tell a client its valid key is wrong); once it is back, the same store
reconnects by itself and the key works again.
"""

from __future__ import annotations

import openai
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from chatai.devstack.postgres_node import LocalPostgres, postgres_installed
from gateway.http_guard import RequestGuard
from gateway.keys import KeyStore

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not postgres_installed(), reason="needs Debian's postgresql")]


@pytest.fixture
def cluster():
    pg = LocalPostgres.create(durable=False)
    pg.start()
    yield pg
    pg.stop()


def test_a_request_while_the_database_is_down_gets_503_and_the_store_reconnects(cluster):
    keys = KeyStore(cluster.new_database("gw"))
    key = keys.create("alice")[1]

    async def models(_):
        return JSONResponse({"object": "list", "data": []})

    app = RequestGuard(Starlette(routes=[Route("/v1/models", models)]), keys=lambda: keys,
                       max_body_bytes=1 << 20, max_file_bytes=1 << 20)
    client = openai.OpenAI(base_url="http://testserver/v1", api_key=key, max_retries=0,
                           http_client=TestClient(app))
    assert client.models.list().data == []
    cluster.stop(remove=False)
    with pytest.raises(openai.InternalServerError) as down:
        client.models.list()
    assert down.value.status_code == 503 and down.value.body["code"] == "database_unavailable"
    assert down.value.response.headers["retry-after"] == "2"
    cluster.start()
    assert client.models.list().data == []  # the broken connection was replaced
    keys.close()
