"""Workers as Slurm jobs, against a real private Slurm (munge, slurmctld, two slurmd) and the
real vLLM worker on the tiny model.

The cluster emulates two nodes of two CPUs on this host (``slurmd -N``), so the backfill test
has a real gap to fill. Tests run in file order and share one cluster and broker; each leaves
no worker job behind, so the next one starts from zero.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from broker_config.messages import Error, Final, Started
from chatai.devstack.slurm_cluster import LocalSlurmCluster
from slurm_jobs.broker_view import BrokerView
from slurm_jobs.slurm import Slurm
from support.amqp_client import TestGatewayClient, final_body
from support.waiting import wait_until

# Models of their own, so that a session-wide worker of other suites (serving "tiny") never
# takes these tests' requests; the broker fixture adds their queues.
MODEL = "slurm-tiny"
IDLE_MODEL = "slurm-idle"  # nobody serves it: requests wait in its queue


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def slurm_cluster():
    """A private two-node Slurm on this host, for this module (starts in about a second); its
    SLURM_CONF is in os.environ only meanwhile, so other suites never see it."""
    cluster = LocalSlurmCluster.create(nodes=2, cpus_per_node=2, memory_mb_per_node=8192)
    cluster.start()
    old = os.environ.get("SLURM_CONF")
    os.environ.update(cluster.env)
    yield cluster
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    cluster.stop()


@pytest.fixture(scope="module")
def operator_env(slurm_cluster, broker, tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    """The operator's environment: CHATAI_SLURM_* settings, the worker's broker URL in a 0600
    file, small vLLM CPU settings for the worker (they travel with --export=ALL)."""
    broker.apply([MODEL, IDLE_MODEL])
    d = tmp_path_factory.mktemp("operator")
    url_file = d / "worker-broker-url"
    url_file.touch(mode=0o600)
    url_file.write_text(broker.url("worker") + "\n")
    env = {
        **os.environ,
        **slurm_cluster.env,
        "CHATAI_SLURM_MODELS": json.dumps({MODEL: str(tiny_model_dir)}),
        "CHATAI_SLURM_BROKER_URL_FILE": str(url_file),
        "CHATAI_SLURM_OPERATOR_BROKER_URL": broker.url("operator"),
        "CHATAI_SLURM_LOG_DIR": str(d / "logs"),
        "CHATAI_SLURM_TIME": "00:30:00",
        "CHATAI_SLURM_TIME_MIN": "none",  # Slurm 22.05 starts a --time-min job with just that limit
        "CHATAI_SLURM_CPUS_PER_TASK": "1",
        "CHATAI_SLURM_SIGNAL_GRACE": "60",
        "CHATAI_SLURM_DRAIN_GRACE": "2",  # short: long requests must outlast it even on an idle CPU
        "CHATAI_SLURM_IDLE_TIMEOUT": "600",
        "CHATAI_WORKER_MAX_NUM_SEQS": "4",
        # Long enough that the drain test's long requests outlast the grace even on an idle CPU
        # (the tiny model decodes ~500 tokens/s per stream here).
        "CHATAI_WORKER_MAX_MODEL_LEN": "8192",
        "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1",
        "CHATAI_WORKER_KV_CACHE_SPACE_GB": "1",
        "CHATAI_WORKER_HEARTBEAT_INTERVAL": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }
    env.pop("CHATAI_WORKER_BROKER_URL", None)
    return env


@pytest.fixture(scope="module")
def slurm_gateway(broker, tmp_path_factory):
    """A real gateway process on the test broker (no worker of its own): what users see."""
    from support.gateway import start_gateway

    gw = start_gateway(tmp_path_factory.mktemp("slurm-gateway"), broker.url("gateway"))
    yield gw
    gw.stop()


def chatai(env: dict[str, str], *args: str, timeout: float = 60) -> str:
    proc = subprocess.run(["chatai", *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"chatai {' '.join(args)} failed: {proc.stderr}{proc.stdout}"
    return proc.stdout


def worker_jobs(model: str = MODEL):
    return [j for j in Slurm().squeue(name_prefix=f"chatai-worker-{model}") if j.name == f"chatai-worker-{model}"]


def job_log(env: dict[str, str]) -> str:
    logs = Path(env["CHATAI_SLURM_LOG_DIR"])
    return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.glob("*.out")))


class Client(TestGatewayClient):
    """The gateway's AMQP side (``support.amqp_client``), sending this module's requests."""

    async def send(self, model: str = MODEL, stream: bool = False, max_tokens: int = 16,
                   ignore_eos: bool = True) -> str:
        req = self.request(model, content="Tell me about Slurm.", stream=stream, max_tokens=max_tokens,
                           ignore_eos=ignore_eos, temperature=0.0)
        await self.publish(req)
        return req.request_id

    def terminals(self, rid: str) -> list:
        return [f for f in self.frames[rid] if isinstance(f, (Final, Error))]

    def all_done(self, rids) -> bool:
        return all(self.terminals(r) for r in rids)

    async def wait_done(self, rids, timeout: float, alive=None) -> None:
        """Wait for a final or error frame of every request; ``alive`` (optional) fails the wait
        early when it returns False (e.g. no worker job left to answer), once the frames already
        on their way have had a few seconds to arrive."""
        try:
            await wait_until(lambda: self.all_done(rids) or (alive is not None and not alive()), timeout,
                             "every request to be answered", every=1.0)
        except TimeoutError:
            missing = [r for r in rids if not self.terminals(r)]
            raise AssertionError(f"{len(missing)} of {len(rids)} requests unanswered after {timeout:.0f} s") from None
        try:
            await self.wait_for(lambda: self.all_done(rids), 5)
        except asyncio.TimeoutError:
            raise AssertionError("no worker left to answer the requests") from None


async def queue_stats(broker, model: str = MODEL):
    view = BrokerView(broker.url("operator"))
    await view.open(heartbeats=False)
    try:
        return await view.queue_stats(model)
    finally:
        await view.close()


async def no_worker_jobs_left(broker, timeout: float) -> None:
    await wait_until(lambda: not worker_jobs(), timeout, "every worker job to leave the queue")
    stats = await queue_stats(broker)
    assert stats.consumers == 0


# ---------------------------------------------------------------------------- tests


async def test_backfill_starts_a_time_min_worker_in_a_gap_ahead_of_a_waiting_big_job(slurm_cluster, operator_env, broker):
    """Node n0 is busy for 10 min; a two-node job waits for it. A worker asking for an hour but
    content with 5 minutes (--time-min) fits the gap on n1 and starts at once, with its limit cut
    to the gap; a job asking for the same hour without --time-min does not."""
    slurm = Slurm()
    n0, n1 = (n.name for n in slurm_cluster.nodes)
    blocker = slurm.sbatch("#!/bin/bash\nsleep 600\n", ["--time=10", f"--nodelist={n0}", "--exclusive", "--job-name=blocker", "--output=/dev/null"])
    await wait_until(lambda: any(j.running for j in slurm.squeue(job_ids=[blocker])), 20, "the blocker to run")
    big = slurm.sbatch("#!/bin/bash\nsleep 1\n", ["--time=10", "--nodes=2", "--exclusive", "--job-name=big", "--output=/dev/null"])
    rigid = slurm.sbatch("#!/bin/bash\nsleep 1\n", ["--time=60", "--nodes=1", "--ntasks=1", "--job-name=rigid", "--output=/dev/null"])
    try:
        out = chatai(operator_env, "scale", "up", "--model", MODEL, "--workers", "1", "--time", "01:00:00",
                     "--time-min", "00:05:00")
        worker = re.search(r"array job (\d+)", out).group(1)
        (task,) = await wait_until(lambda: [j for j in worker_jobs() if j.running], 30, "backfill to start the worker")
        info = slurm.show_job(task.job_id)
        states = {j.name: j for j in slurm.squeue(job_ids=[big, rigid])}
        assert states["big"].pending and states["rigid"].pending, states
        assert states["big"].reason in ("Resources", "Priority"), states["big"]
        assert info["NodeList"] == n1
        limit_min = int(info["TimeLimit"].split(":")[0]) * 60 + int(info["TimeLimit"].split(":")[1])
        assert 5 <= limit_min <= 10, f"time limit {info['TimeLimit']} should be cut to the gap"
        assert info.get("TimeMin", "").startswith("00:05:00")
        assert worker == task.array_job_id
    finally:
        slurm.cancel([blocker, big, rigid])
        for j in worker_jobs():
            slurm.cancel([j.job_id])
    await no_worker_jobs_left(broker, 60)


async def test_scale_up_array_serves_requests_through_the_real_worker(operator_env, broker):
    out = chatai(operator_env, "scale", "up", "--model", MODEL, "--workers", "1")
    array_id = re.search(r"array job (\d+)", out).group(1)
    (task,) = worker_jobs()
    assert task.array_job_id == array_id and task.array_task_id == "0"
    script = subprocess.run(["scontrol", "write", "batch_script", task.job_id, "-"], capture_output=True, text=True,
                            check=True).stdout
    assert "amqp://" not in script and "exec " in script and "--signal=B:TERM@60" in script
    async with Client(broker.url("gateway")) as client:
        plain = [await client.send(max_tokens=12) for _ in range(3)]
        streamed = await client.send(stream=True, max_tokens=40)
        try:
            await client.wait_done(plain + [streamed], 180, alive=worker_jobs)
        except AssertionError:
            raise AssertionError(job_log(operator_env))
        for rid in plain + [streamed]:
            (final,) = client.terminals(rid)
            assert isinstance(final, Final), final
            assert final.usage.completion_tokens > 0
            started = [f for f in client.frames[rid] if isinstance(f, Started)]
            assert started and f"{array_id}_0" in started[0].worker_id
        assert all(final_body(client.terminals(r))["choices"][0]["message"]["content"] for r in plain)
        assert sum(1 for f in client.frames[streamed] if f.type == "data") >= 1


async def test_status_shows_jobs_depth_consumers_and_heartbeats(operator_env, broker):
    (task,) = [j for j in worker_jobs() if j.running]
    async with Client(broker.url("gateway")) as client:
        for _ in range(2):
            await client.send(model=IDLE_MODEL)  # nobody serves it: they wait in its queue
    data = json.loads(chatai(operator_env, "scale", "status", "--json", "--model", IDLE_MODEL))
    models = {m["model"]: m for m in data["models"]}
    assert models[MODEL]["consumers"] == 1 and models[MODEL]["running"] == 1
    assert models[MODEL]["workers_ready"] == 1 and models[MODEL]["capacity"] == 4
    assert models[IDLE_MODEL]["queue_ready"] >= 2 and models[IDLE_MODEL]["consumers"] == 0
    (job,) = [j for j in data["jobs"] if j["model"] == MODEL]
    assert job["job"] == task.display_id and job["state"] == "RUNNING"
    assert job["worker_state"] == "ready" and job["in_flight"] == 0
    table = chatai(operator_env, "scale", "status", "--model", IDLE_MODEL)
    for text in (MODEL, IDLE_MODEL, task.display_id, "RUNNING", "ready", "consumers"):
        assert text in table, table


LONG_TOKENS = 3000  # ~6 s of decoding per request at 4 concurrent streams: beyond the 2 s grace


async def test_scale_down_drains_in_flight_requests_without_losing_or_duplicating(operator_env, broker, slurm_gateway):
    """SIGTERM (scale down) while the worker holds 4 long requests and 4 more wait. Non-streaming
    ones are returned to the queue and answered in full by the next worker, each exactly once;
    the two streams (through the real gateway and the OpenAI SDK) end with a clear error, since
    tokens already sent cannot be taken back."""
    (task,) = [j for j in worker_jobs() if j.running]
    # The streams must start beside the long requests, which go straight to the broker: a
    # gateway that has not yet heard the worker would hold them until it has (a clean run's
    # streams started only after the long requests had finished).
    await asyncio.to_thread(slurm_gateway.wait_for, lambda h: h["models"].get(MODEL, {}).get("ready", 0) > 0,
                            30, "the gateway to hear the worker")
    sdk = slurm_gateway.async_client()
    streamed: dict[int, dict] = {i: {"text": "", "finish": None, "error": None} for i in range(2)}

    async def stream(i: int) -> None:
        try:
            chunks = await sdk.chat.completions.create(
                model=MODEL, stream=True, max_tokens=LONG_TOKENS, extra_body={"ignore_eos": True},
                messages=[{"role": "user", "content": "Tell me about Slurm."}])
            async for chunk in chunks:
                if chunk.choices:
                    streamed[i]["text"] += chunk.choices[0].delta.content or ""
                    streamed[i]["finish"] = chunk.choices[0].finish_reason or streamed[i]["finish"]
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            streamed[i]["error"] = str(exc)

    async with Client(broker.url("gateway")) as client:
        # The worker takes the first four (prefetch = capacity = 4): long ones that cannot finish
        # within the 2 s drain grace on a CPU. The four short ones wait in the queue.
        long_plain = [await client.send(max_tokens=LONG_TOKENS) for _ in range(2)]
        streams = [asyncio.create_task(stream(i)) for i in range(2)]
        await wait_until(lambda: all(client.frames[r] for r in long_plain) and all(v["text"] for v in streamed.values()),
                       60, "the long requests to start")
        short_plain = [await client.send(max_tokens=20) for _ in range(4)]
        plain = long_plain + short_plain
        out = chatai(operator_env, "scale", "down", "--model", MODEL, "--all")
        assert task.display_id in out
        await wait_until(lambda: not worker_jobs(), 60, "the drained worker to exit")
        assert not any(client.terminals(r) for r in long_plain), f"{LONG_TOKENS} tokens cannot be done in a 2 s grace"
        # the next worker (idle timeout short, so it leaves by itself afterwards) takes the rest
        env = {**operator_env, "CHATAI_SLURM_IDLE_TIMEOUT": "5"}
        chatai(env, "scale", "up", "--model", MODEL, "--workers", "1")
        try:
            await client.wait_done(plain, 240)
            await asyncio.wait_for(asyncio.gather(*streams), 60)
        except (AssertionError, asyncio.TimeoutError):
            raise AssertionError(job_log(operator_env))
        await no_worker_jobs_left(broker, 90)  # idle exit: scale to zero by itself
        for rid in plain:
            terms = client.terminals(rid)
            assert len(terms) == 1 and isinstance(terms[0], Final), (rid, terms)
            assert terms[0].usage.completion_tokens == (LONG_TOKENS if rid in long_plain else 20)
        for rid in long_plain:  # returned by the drain, answered in full by the next worker
            assert client.terminals(rid)[0].attempt == 2
    for outcome in streamed.values():
        assert outcome["text"], outcome  # tokens were streamed before the drain
        # either it finished within the grace, or it ended with an error that says what happened
        assert (outcome["finish"] == "length" and outcome["error"] is None) or \
            (outcome["error"] and "worker" in outcome["error"].lower()), outcome
    sacct_state = subprocess.run(["scontrol", "-o", "show", "job", task.job_id], capture_output=True, text=True).stdout
    assert "ExitCode=0:0" in sacct_state, sacct_state


async def test_autoscaler_takes_a_model_from_zero_to_n_and_back_to_zero(operator_env, broker):
    """A backlog of 8 (3 per worker, at most 2) brings two array tasks from zero; they answer
    everything once, go idle, leave by themselves, and the model is back at zero."""
    assert not worker_jobs()
    env = {**operator_env, "CHATAI_SLURM_IDLE_TIMEOUT": "6"}
    log_path = Path(operator_env["CHATAI_SLURM_LOG_DIR"]) / "autoscaler.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        scaler = subprocess.Popen(["chatai", "autoscale", "--model", MODEL, "--max-workers", "2",
                                   "--backlog-per-worker", "3", "--cooldown", "5", "--interval", "1"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        seen_max = 0

        def count():
            nonlocal seen_max
            seen_max = max(seen_max, len(worker_jobs()))
            return seen_max

        async with Client(broker.url("gateway")) as client:
            rids = [await client.send(max_tokens=100) for _ in range(8)]
            await wait_until(lambda: count() >= 2, 30, "the autoscaler to submit two workers")
            try:
                await client.wait_done(rids, 240)
            except AssertionError:
                raise AssertionError(log_path.read_text() + job_log(operator_env))
            assert all(isinstance(client.terminals(r)[0], Final) and len(client.terminals(r)) == 1 for r in rids)
            await wait_until(lambda: (count(), not worker_jobs())[1], 90, "idle workers to leave (scale to zero)")
            assert (await queue_stats(broker)).consumers == 0
            assert seen_max == 2
        await no_worker_jobs_left(broker, 90)
    finally:
        scaler.terminate()
        scaler.wait(timeout=20)
    text = log_path.read_text()
    assert scaler.returncode == 0, text
    assert re.search(r"submitted 2 task\(s\)", text), text
    assert "Traceback" not in text, text


def _models(gw) -> dict[str, dict]:
    r = httpx.get(gw.base_url + "/v1/models", headers={"Authorization": f"Bearer {gw.api_key}"}, timeout=10)
    return {m["id"]: m for m in r.json()["data"]}


CHAT_STATUS_LOG = """
window.statuses = [];
new MutationObserver(() => window.statuses.push(document.getElementById('chat-status').textContent))
  .observe(document.getElementById('chat-status'), {childList: true, characterData: true, subtree: true});
"""


async def test_a_scaled_to_zero_model_answers_its_first_users_while_the_autoscaler_starts_a_worker(
        operator_env, broker, slurm_gateway):
    """Scale to zero without failing anyone. With nothing to start a worker, a request is told so at
    once (503 model_not_loaded, retry-after). With the autoscaler running, the model stays listed
    (cold, on demand), and a non-streamed and a streamed request (the OpenAI SDK's default
    timeout, no retries) and the chat page (headless Chromium) all wait for the one worker that
    their waiting requests make the autoscaler start, and get their answers."""
    from openai import OpenAI, APIStatusError
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from support.browser import chromium

    assert not worker_jobs()
    gw = slurm_gateway
    # One /health read per poll: the model may leave between two reads.
    await wait_until(lambda: not (_models(gw).get(MODEL) or {}).get("on_demand"), 30,
                     "the last test's autoscaler to be forgotten")
    sdk = OpenAI(base_url=gw.base_url + "/v1", api_key=gw.api_key, max_retries=0)  # default timeout (600 s)
    messages = [{"role": "user", "content": "Tell me about Slurm."}]
    began = time.monotonic()
    with pytest.raises(APIStatusError) as refused:
        await asyncio.to_thread(sdk.chat.completions.create, model=MODEL, messages=messages, max_tokens=8)
    assert time.monotonic() - began < 25, "told at once, not after the 30 s queue timeout"
    assert refused.value.status_code == 503 and refused.value.code == "model_not_loaded"
    assert refused.value.response.headers["retry-after"] == "60"
    assert refused.value.response.headers["x-should-retry"] == "false"  # the SDK's own retries would not help

    env = {**operator_env, "CHATAI_SLURM_IDLE_TIMEOUT": "8"}
    log_path = Path(operator_env["CHATAI_SLURM_LOG_DIR"]) / "autoscaler-cold.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        scaler = subprocess.Popen(["chatai", "autoscale", "--model", MODEL, "--max-workers", "1", "--cooldown", "5",
                                   "--interval", "1"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        listed = await wait_until(lambda: _models(gw).get(MODEL, {}).get("on_demand") and _models(gw)[MODEL], 30,
                                  "the gateway to hear the autoscaler")
        assert listed["state"] == "cold" and not worker_jobs()
        status = httpx.get(gw.base_url + "/api/status", headers={"Authorization": f"Bearer {gw.api_key}"},
                           timeout=10).json()
        assert {"name": MODEL, "state": "cold", "on_demand": True}.items() <= \
            next(m for m in status["models"] if m["name"] == MODEL).items()

        def plain() -> str:
            r = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                            extra_body={"ignore_eos": True})
            return r.choices[0].message.content

        def streamed() -> str:
            chunks = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True,
                                                 extra_body={"ignore_eos": True})
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        with chromium() as browser:
            browser.get(gw.base_url + "/")
            browser.find_element(By.ID, "api-key").send_keys(gw.api_key)
            browser.find_element(By.ID, "connect").click()
            option = WebDriverWait(browser, 60).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, f'#model option[value="{MODEL}"]'), "the cold model listed")
            assert option[0].text == f"{MODEL} (cold)"
            Select(browser.find_element(By.ID, "model")).select_by_value(MODEL)
            browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
            browser.find_element(By.ID, "max-tokens").send_keys("8")
            browser.find_element(By.ID, "extra-params").send_keys('{"ignore_eos": true}')
            browser.execute_script(CHAT_STATUS_LOG)
            answers = asyncio.gather(asyncio.to_thread(plain), asyncio.to_thread(streamed))
            await asyncio.sleep(0.2)  # both SDK requests are on their way (threads of their own)
            browser.find_element(By.ID, "prompt").send_keys("Hello from the browser")
            browser.find_element(By.ID, "send").click()
            page_done = WebDriverWait(browser, 400, poll_frequency=0.5).until
            try:
                await asyncio.to_thread(page_done, lambda d: d.find_element(By.ID, "chat-status").text == "Done."
                                        or "Error" in d.find_element(By.ID, "chat-status").text, "the page's answer")
                texts = await asyncio.wait_for(answers, 400)
            except Exception:
                raise AssertionError(log_path.read_text() + job_log(operator_env))
            statuses = browser.execute_script("return window.statuses")
            page_answer = browser.find_element(By.CSS_SELECTOR, "#messages .message.assistant .content").text
            final_status = browser.find_element(By.ID, "chat-status").text
        assert final_status == "Done.", statuses
        assert page_answer.strip() and all(t.strip() for t in texts), (page_answer, texts)
        # The page said what it waited for, then the gateway's SSE comments kept the stream alive.
        assert any(s.startswith(f"Starting a worker for {MODEL} (") for s in statuses), statuses
        assert any("waited" in s for s in statuses), statuses
        assert _models(gw)[MODEL]["state"] == "ready"
        assert _models(gw)[MODEL]["startup_seconds"] > 0  # measured by the worker, for the next "about N s"
        await no_worker_jobs_left(broker, 90)  # idle again: back to zero, and still listed
        await wait_until(lambda: _models(gw)[MODEL]["state"] == "cold", 30, "the model to be cold again")
    finally:
        scaler.terminate()
        scaler.wait(timeout=20)
    text = log_path.read_text()
    assert re.search(r"submitted 1 task\(s\)", text) and "could not announce" not in text, text


async def test_dev_slurm_handle_submits_through_the_template_and_drains_on_stop(tmp_path):
    """The handle ``chatai dev --slurm`` uses: its own Slurm, a submitted array whose script reads
    the broker URL from the 0600 file (not argv), and stop() that drains before it stops Slurm."""
    from chatai.devstack.dev_slurm import start_dev_slurm

    template = tmp_path / "probe.sbatch"
    template.write_text(
        "#!/bin/bash\n{{ sbatch_directives }}\nurl_file={{ broker_url_file }}\n"
        '{{ broker_url_env }}="$(< "$url_file")"; export {{ broker_url_env }}\n'
        'trap \'echo "got TERM"; exit 0\' TERM\n'
        'echo "model={{ served_model_name }} path={{ model_path }} url=${CHATAI_WORKER_BROKER_URL}"\n'
        "while true; do sleep 0.2; done\n"
    )
    slurm = start_dev_slurm(tmp_path / "state")
    try:
        job = slurm.scale_up("tiny", "/models/tiny", "amqp://worker:pw@127.0.0.1:1/chatai", workers=2,
                             template=template)
        assert (slurm.state_dir / "worker-broker-url").stat().st_mode & 0o077 == 0
        running = await wait_until(lambda: [j for j in slurm.worker_jobs("tiny") if j.running and j.array_job_id == job],
                                 30, "both dev workers to run")
        assert len(running) >= 1
        logs = slurm.state_dir / "logs"
        await wait_until(lambda: len(list(logs.glob("*.out"))) == 2 and all("url=amqp://" in p.read_text()
                                                                          for p in logs.glob("*.out")),
                       30, "the probes to print what they read")
    finally:
        slurm.stop(timeout=30)
    texts = [p.read_text() for p in sorted((slurm.state_dir / "logs").glob("*.out"))]
    assert all("model=tiny path=/models/tiny" in t and "got TERM" in t for t in texts), texts
    assert not slurm.cluster.processes


async def test_scale_down_of_one_task_leaves_the_rest_of_its_array_running(slurm_cluster, tmp_path):
    """Draining one worker signals that task alone. The last task of an array carries the
    array's base id as its own job id, and Slurm applies a base id to every task: a drain by
    bare job id ended the whole array (or, in the drain test, the next array)."""
    from slurm_jobs.jobs import WorkerJobs
    from slurm_jobs.settings import SlurmSettings

    template = tmp_path / "probe.sbatch"
    template.write_text("#!/bin/bash\n{{ sbatch_directives }}\ntrap 'exit 0' TERM\n"
                        "while true; do sleep 0.2; done\n")
    settings = SlurmSettings(template=template, time="00:10:00", time_min=None, cpus_per_task=1,
                             log_dir=tmp_path / "logs", broker_url_file=tmp_path / "unused", models={})
    jobs = WorkerJobs(settings, Slurm())
    array = jobs.submit("probe", 2, "/models/probe")
    try:
        await wait_until(lambda: len([j for j in jobs.jobs("probe") if j.running]) == 2, 30, "both tasks to run")
        (base_task,) = [j for j in jobs.jobs("probe") if j.job_id == array]  # the task holding the base id
        gone = jobs.drain("probe", 1, busy={j.display_id: 1 for j in jobs.jobs("probe") if j.display_id != base_task.display_id})
        assert gone == [base_task.display_id]
        await wait_until(lambda: base_task.display_id not in [j.display_id for j in jobs.jobs("probe")], 30,
                         "the drained task to end")
        left = [j for j in jobs.jobs("probe") if j.running]
        assert len(left) == 1 and left[0].array_job_id == array and left[0].display_id != base_task.display_id
    finally:
        jobs.drain("probe")
        await wait_until(lambda: not jobs.jobs("probe"), 30, "the probe array to end")


# Attack 9: secrets in the operator's environment must not reach sbatch (--export=ALL would copy
# them into slurmctld's state, the job's environment and the accounting records).
SECRET_VARS = ["DB_PASSWORD", "MYSQL_PWD", "GPG_PASSPHRASE", "APP_SECRET", "GITHUB_TOKEN", "HF_TOKEN",
               "OPENAI_API_KEY", "STRIPE_APIKEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "AWS_PROFILE", "AZURE_CLIENT_SECRET", "AZURE_STORAGE_CONNECTION_STRING",
               "GOOGLE_APPLICATION_CREDENTIALS", "DOCKER_AUTH_CONFIG", "SSH_PRIVATE_KEY_PATH", "SIGNING_KEY",
               "SSH_AUTH_SOCK", "CHATAI_WORKER_BROKER_URL", "DATABASE_URL", "SENTRY_DSN", "VAULT_ADDR"]
SECRET_VALUES = {"MIRROR_URL": "https://user:{canary}@mirror.example/simple",
                 "SOME_SETTING": "-----BEGIN OPENSSH PRIVATE KEY-----{canary}"}
KEPT_VARS = ["CHATAI_WORKER_COALESCE_TOKENS", "TOKENIZERS_PARALLELISM", "HF_HOME", "CHATAI_PROBE_PLAIN"]


async def test_sbatch_never_receives_secret_environment_variables(slurm_cluster, tmp_path, monkeypatch):
    canary = "canary" + uuid.uuid4().hex
    for name in SECRET_VARS:
        monkeypatch.setenv(name, f"{canary}-{name}")
    for name, value in SECRET_VALUES.items():
        monkeypatch.setenv(name, value.format(canary=canary))
    for name in KEPT_VARS:
        monkeypatch.setenv(name, f"kept-{name}")
    out = tmp_path / "job-env.out"
    script = "#!/bin/bash\nenv\necho END-OF-ENV\n"
    job = Slurm().sbatch(script, ["--export=ALL", f"--output={out}", "--time=1", "--job-name=chatai-env-probe"])
    await wait_until(lambda: out.exists() and "END-OF-ENV" in out.read_text(), 30, f"job {job} to print its env")
    job_env = out.read_text()
    assert canary not in job_env, [line.split("=")[0] for line in job_env.splitlines() if canary in line]
    for name in KEPT_VARS:  # ordinary settings still travel with the job
        assert f"{name}=kept-{name}" in job_env
    # Nor in what slurmctld keeps of the job.
    stored = subprocess.run(["scontrol", "show", "job", "-d", job], capture_output=True, text=True).stdout
    assert canary not in stored
