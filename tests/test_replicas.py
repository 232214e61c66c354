"""Three gateway replicas share one deployment through a real PostgreSQL (issue 21).

Three ``chatai gateway`` processes on one database (``CHATAI_GATEWAY_DATABASE_URL``) and one
files directory, the session's broker and worker: a key made once works on every replica and a
revoke stops it everywhere at once; a per-key limit holds for the three together under
concurrent load; a 500-line batch survives the replica that drives it being killed (SIGKILL)
mid-batch, and every line is answered exactly once. ``chatai gateway --replicas 2`` runs two
such processes on one port.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import psutil
import pytest

from conftest import SERVED_MODEL
from gateway.database import Database
from gateway.keys import KeyStore
from support.gateway import GatewayProcess, start_gateway
from support.waiting import wait_until
from test_batches import jsonl, read, wait_batch, wait_done

REPLICAS = 3
# A quick dispatcher and a short batch lease: a dead replica's batch changes hands within seconds.
REPLICA_ENV = {"CHATAI_GATEWAY_BATCH_TICK": "0.2", "CHATAI_GATEWAY_BATCH_LEASE": "3",
               "CHATAI_GATEWAY_BATCH_MAX_IN_FLIGHT": "32", "CHATAI_GATEWAY_QUEUE_TIMEOUT": "60"}


class Deployment:
    def __init__(self, url: str, gateways: list[GatewayProcess]) -> None:
        self.url = url
        self.gateways = gateways

    def client(self, i: int, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateways[i].base_url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def deployment(broker, served_worker, postgres, tmp_path_factory):
    url = postgres.new_database()
    files = tmp_path_factory.mktemp("shared-files")  # as NFS would be between VMs
    env = {**REPLICA_ENV, "CHATAI_GATEWAY_DATABASE_URL": url, "CHATAI_GATEWAY_BATCH_FILES_DIR": str(files)}
    gateways: list[GatewayProcess] = []
    try:
        for i in range(REPLICAS):
            gw = start_gateway(tmp_path_factory.mktemp(f"replica-{i}"), broker.url("gateway"), extra_env=env)
            gateways.append(gw)
        for gw in gateways:
            gw.wait_for(lambda h: h["models"].get(SERVED_MODEL, {}).get("ready", 0) >= 1, timeout=60,
                        what="a heartbeat of the served worker")
        yield Deployment(url, gateways)
    finally:
        for gw in gateways:
            gw.stop()


def _chat(client: openai.OpenAI) -> str:
    reply = client.chat.completions.create(model=SERVED_MODEL, max_tokens=2,
                                           messages=[{"role": "user", "content": "Hi"}])
    return reply.choices[0].finish_reason


def test_a_key_works_on_every_replica_and_a_revoke_stops_it_everywhere_at_once(deployment):
    keys = KeyStore(deployment.url)  # `chatai keys create` with the deployment's database URL
    info, key = keys.create("shared")
    for i in range(REPLICAS):
        assert _chat(deployment.client(i, key)) in ("length", "stop")
    assert keys.revoke(info.id)
    for i in range(REPLICAS):  # at once: each request reads the shared table, there is no cache to age
        with pytest.raises(openai.AuthenticationError):
            _chat(deployment.client(i, key))
    keys.close()


def test_a_per_key_limit_holds_for_all_replicas_together_under_load(deployment):
    keys = KeyStore(deployment.url)
    rpm = 15
    _, key = keys.create("limited", limits={"rpm": rpm})
    keys.close()
    attempts = 3 * rpm

    def one(i: int) -> int:
        try:
            _chat(deployment.client(i % REPLICAS, key))
            return 200
        except openai.RateLimitError:
            return 429

    with ThreadPoolExecutor(max_workers=9) as pool:  # three clients at once on each replica
        statuses = list(pool.map(one, range(attempts)))
    assert statuses.count(200) == rpm, statuses  # exactly the limit for the deployment, not 3x
    assert statuses.count(429) == attempts - rpm


def test_a_batch_completes_exactly_once_when_the_replica_driving_it_is_killed(deployment):
    n = 500
    key = deployment.gateways[0].api_key
    client = deployment.client(0, key)
    items = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": SERVED_MODEL, "max_tokens": 12, "ignore_eos": True,
                       "messages": [{"role": "user", "content": f"Count to {i}."}]}} for i in range(n)]
    upload = client.files.create(file=("input.jsonl", jsonl(items)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    mid = wait_batch(client, batch.id, lambda b: b.request_counts and b.request_counts.completed >= 30, 180,
                     "some results before the kill")
    db = Database(deployment.url)
    holder = db.one("SELECT leased_by FROM batches WHERE id = ?", (batch.id,))["leased_by"]
    pid = int(holder.rsplit("-", 2)[1])  # replica names are host-pid-random (gateway.database.replica_name)
    [victim] = [gw for gw in deployment.gateways if gw.pid == pid]
    victim.kill()  # SIGKILL: no shutdown hooks, its lease, publishes and unacked results left as they were
    assert mid.request_counts.completed < n, "finished before the kill"
    survivor = next(i for i, gw in enumerate(deployment.gateways) if gw is not victim)
    client = deployment.client(survivor, key)  # the same key, on another replica
    done = wait_done(client, batch.id)
    assert done.status == "completed"
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (n, n, 0)
    outputs = read(client, done.output_file_id)  # written by whichever replica finished it, read here
    ids = [o["custom_id"] for o in outputs]
    assert len(ids) == len(set(ids)) == n and set(ids) == {f"line-{i}" for i in range(n)}
    assert all(o["response"]["status_code"] == 200 for o in outputs)
    assert read(client, done.error_file_id) == []
    ended = db.one("SELECT leased_by FROM batches WHERE id = ?", (batch.id,))["leased_by"]
    assert ended != holder  # another replica took the batch over
    db.close()


def test_gateway_replicas_flag_serves_from_several_processes_on_one_port(deployment, broker, tmp_path):
    env = {**REPLICA_ENV, "CHATAI_GATEWAY_DATABASE_URL": deployment.url}
    gw = start_gateway(tmp_path / "two", broker.url("gateway"), extra_env=env, args=["--replicas", "2"])
    try:
        gw.wait_for(lambda h: h["models"].get(SERVED_MODEL, {}).get("ready", 0) >= 1, timeout=60,
                    what="a heartbeat of the served worker")
        replicas = [p for p in psutil.Process(gw.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        assert len(replicas) == 2
        # Two full gateways: the first may answer /health while the second still starts.
        wait_until(lambda: gw.log_text().count("Application startup complete") == 2, timeout=60,
                   what="both replicas' start-up")
        client = openai.OpenAI(base_url=gw.base_url + "/v1", api_key=deployment.gateways[1].api_key,
                               max_retries=0, timeout=60)  # a key of the shared database
        assert _chat(client) in ("length", "stop")
    finally:
        gw.stop()
