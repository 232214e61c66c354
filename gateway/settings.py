"""Gateway configuration: one settings class, from ``CHATAI_GATEWAY_*`` variables and CLI flags."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway import private
from gateway.database import sqlite_url
from gateway.limits import Limits


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHATAI_GATEWAY_", extra="ignore")

    host: str = Field("127.0.0.1", description="Listen address.")
    port: int = Field(8000, description="Listen port.")
    state_dir: Path = Field(Path(".chatai-gateway"), description="API keys, batch database and files.")
    # Where keys, per-key limits, files' metadata and batches live (gateway/database.py). None:
    # SQLite in the state directory, for one gateway process. Replicas share a PostgreSQL database
    # (postgresql://user:password@host:5432/db) and a files directory (CHATAI_GATEWAY_BATCH_FILES_DIR
    # on a shared filesystem); see docs/deploy.md, "Several gateway replicas".
    database_url: SecretStr | None = None

    # The broker, with this gateway deployment's broker user (its name is the deployment's
    # namespace on the broker). With a tunnel configured (the default deployment), its host and
    # port are not used: AMQP runs over the SSH connection, in-process.
    broker_url: SecretStr = SecretStr("amqp://gateway:gateway@127.0.0.1:5672/chatai")
    broker_direct: bool = Field(False, description="Connect to the broker without the SSH tunnel "
                                "(must be asked for explicitly).")
    broker_reconnect_interval: float = Field(2.0, gt=0, description="Seconds between attempts to "
                                             "reopen a lost broker connection.")

    # The SSH tunnel to the login node (see circuit_breaker/ and docs/).
    tunnel_host: str | None = None
    tunnel_port: int = 22
    tunnel_user: str = "chatai-tunnel"
    tunnel_key: Path | None = None
    tunnel_known_hosts: Path | None = None  # pinned host key(s) of the login node
    tunnel_remote_host: str = "127.0.0.1"  # the broker, as the login node sees it
    tunnel_remote_port: int = 5672
    tunnel_keepalive: float = 15.0
    # Reconnecting to the login node: the first delay, doubled (with jitter) up to the maximum.
    tunnel_backoff_initial: float = Field(0.5, gt=0)
    tunnel_backoff_max: float = Field(10.0, gt=0)

    queue_timeout: float = Field(30.0, description="Seconds an interactive request may wait for a worker.")
    # Scale to zero (docs/operators.md, "Cold models"): a request for a model with no ready worker
    # waits for one to start while an autoscaler runs for it or a worker is loading.
    cold_start_timeout: float = Field(
        540.0, gt=0, description="Seconds a request for a cold model may wait for a worker to start. Below the "
        "OpenAI SDK's default read timeout (600 s), so its client gets the gateway's answer, not its own timeout.")
    cold_start_timeouts: dict[str, float] = Field(
        default_factory=dict, description="Per model (JSON: name -> seconds), for models that load for longer.")
    models: list[str] = Field(
        default_factory=list, description="The deployment's models (JSON list, the names given to `chatai broker "
        "apply --model`): listed by /v1/models even while no worker serves them and no autoscaler runs.")
    stream_keepalive: float = Field(
        10.0, gt=0, description="A streamed request that waits for a cold model's worker gets its 200 status "
        "after this many seconds (once the broker has accepted it) and an SSE comment every as many seconds.")
    stream_idle_timeout: float = 120.0  # longest silence from a worker mid-generation
    stream_send_timeout: float = Field(
        30.0, gt=0, description="Seconds a streamed response may wait for a client that takes no bytes "
        "(its socket buffers full) before the gateway ends the stream and cancels the generation "
        "(docs/reliability.md, slow clients).")
    max_request_bytes: int = 4 * 1024 * 1024  # any body but a file upload (BATCH_MAX_FILE_BYTES)
    header_timeout: float = Field(
        10.0, gt=0, description="Seconds a client has to send a request's head (request line and headers) "
        "once it connected or began the request: slow or silent clients (slowloris) are disconnected.")
    keep_alive_timeout: int = Field(
        30, gt=0, description="Seconds an idle keep-alive connection stays open. Longer than clients keep "
        "idle connections (the OpenAI SDK's httpx pool: 5 s), so the client always closes first: a server "
        "that closes as the client reuses the connection fails that request without an answer. Behind a "
        "load balancer, set it above the balancer's idle timeout.")
    api_docs: bool = Field(False, description="Serve Swagger UI at /docs. It loads scripts from a CDN on the "
                           "chat page's origin, so it is off unless asked for; /openapi.json is always served.")

    # What one request may ask of a GPU, and of the gateway (docs/api.md, "What the gateway itself
    # checks"). Interactive requests and batch lines alike; 400 over any of them.
    max_output_tokens: int = Field(32_768, ge=1, description="choices (n x prompts) x max tokens per request.")
    max_top_logprobs: int = Field(20, ge=0, description="top_logprobs, logprobs (completions), prompt_logprobs.")
    max_logprob_tokens: int = Field(65_536, ge=1, description="Logprob entries per request: output tokens x "
                                    "(1 + top_logprobs), when logprobs are asked for (~100 bytes each).")
    context_fallback: int = Field(131_072, ge=1, description="The context assumed for a model no worker has "
                                  "announced yet (heartbeats carry max_model_len).")
    min_json_values: int = Field(16_384, ge=1, description="JSON values (array items, object members) a body "
                                 "may hold: 4 x the longest context served, at least this.")
    # A bearer token Prometheus must send for /metrics (its `authorization: credentials_file`).
    # None: /metrics is open, for a gateway that only trusted hosts can reach (docs/security.md).
    metrics_token: SecretStr | None = None
    worker_expiry_intervals: float = 3.0  # forget a worker after this many missed heartbeats

    # Prefix-cache affinity (gateway/cluster/affinity.py, docs/operators.md): a conversation's next
    # turn goes first to the worker that served its last one, spilling to the shared queue.
    affinity: bool = Field(True, description="Prefer the worker that served a conversation's last turn "
                           "(its prefix cache) for the next one.")
    affinity_ttl: float = Field(600.0, gt=0, description="Seconds a conversation's hash and worker are kept "
                                "after its last turn (about as long as a worker's cache may hold it).")
    affinity_max_conversations: int = Field(50_000, ge=1, description="Conversation hashes kept at most "
                                            "(the least recent go first).")

    # Per-API-key limits: the default for keys without their own (``chatai keys create/set-limits``).
    # 0 means unlimited. See gateway/limits.py and docs/security.md ("Per-key limits").
    limit_rpm: int = Field(600, ge=0)  # chat + completion requests per minute
    # prompt + completion tokens per minute, interactive and batch alike: about what one GPU gives a
    # mid-sized model (~8,000 tokens/s); raise it per key (`chatai keys set-limits --tpm`) for more.
    limit_tpm: int = Field(500_000, ge=0)
    limit_concurrent: int = Field(64, ge=0)  # requests in flight at once
    limit_upload_bytes: int = Field(2 * 1024**3, ge=0)  # bytes of uploaded batch files kept at once
    limit_open_batches: int = Field(20, ge=0)  # batches not yet completed, failed, expired or cancelled

    @model_validator(mode="after")
    def _one_way_in(self) -> "GatewaySettings":
        if self.tunnel_host is None and not self.broker_direct:
            raise ValueError(
                "no SSH tunnel configured: set CHATAI_GATEWAY_TUNNEL_HOST (and key, known_hosts), "
                "or ask for a direct broker connection with --broker-direct"
            )
        return self

    @property
    def database(self) -> str:
        """The database URL: the one configured, or the SQLite file in the state directory."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return sqlite_url(private.database(self.state_dir))

    def cold_start_timeout_for(self, model: str) -> float:
        return self.cold_start_timeouts.get(model, self.cold_start_timeout)

    @property
    def default_limits(self) -> Limits:
        return Limits(rpm=self.limit_rpm, tpm=self.limit_tpm, max_concurrent=self.limit_concurrent,
                      upload_bytes=self.limit_upload_bytes, open_batches=self.limit_open_batches)
