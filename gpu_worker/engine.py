"""vLLM in this process: its engine (``AsyncLLM``) and its own OpenAI application on top.

The worker does not re-implement the OpenAI API. It builds vLLM's API server application exactly
as ``vllm serve`` does (the same argument parser, ``build_app`` and ``init_app_state``) and calls
it in-process for each request (``gpu_worker.asgi_call``): chat with tools and structured
outputs, completions, the Responses API, embeddings, LoRA adapters and whatever vLLM adds,
configured with vLLM's own serve arguments (``WorkerSettings.vllm_argv``). No port is opened.

The engine core runs in a child process that vLLM spawns: whatever imports this module as a
script needs the ``if __name__ == "__main__"`` guard (``python -m gpu_worker`` and the ``chatai``
command have it).
"""

from __future__ import annotations

import gc
import json
import logging
import os
from argparse import Namespace
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from broker_config.messages import ApiRequest
from gpu_worker.asgi_call import AsgiCall, ASGIApp, ResponseSink
from gpu_worker.cache_stats import PrefixCacheCount, stat_logger
from gpu_worker.lifecycle import end_processes, engine_processes
from gpu_worker.settings import WorkerSettings
from gpu_worker.token_count import CountingEngineClient, TokenCount

log = logging.getLogger("chatai.worker.engine")


class EngineDead(Exception):
    """The engine core is gone: the worker must stop, held messages go back to the queue."""


class ApiEngine(Protocol):
    """What the consumer needs of an engine: vLLM's (``Engine``) or the load-test source
    (``gpu_worker.synthetic.SyntheticEngine``)."""

    max_num_seqs: int
    max_model_len: int
    adapters: list[str]
    tasks: list[str]
    prefix_cache: PrefixCacheCount

    async def open_api(self) -> None: ...

    async def handle(self, req: ApiRequest, sink: ResponseSink, count: TokenCount) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def shutdown(self) -> None: ...


def serve_args(settings: WorkerSettings) -> Namespace:
    """vLLM's serve arguments, parsed and checked by vLLM's own parser (as ``vllm serve``)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser(prog="chatai worker")).parse_args(settings.vllm_argv())
    validate_parsed_serve_args(args)
    return args


@contextmanager
def _root_logging_kept() -> Iterator[None]:
    """vLLM's app set-up imports SageMaker's hosting standards, which set the root logger (and
    its handlers) to ERROR unless SAGEMAKER_CONTAINER_LOG_LEVEL says otherwise: the worker's own
    log would fall silent from then on (no "worker ready" line, no request lines)."""
    root = logging.getLogger()
    levels = (root.level, [(h, h.level) for h in root.handlers])
    try:
        yield
    finally:
        root.setLevel(levels[0])
        for handler, level in levels[1]:
            handler.setLevel(level)


class Engine:
    """Owns the AsyncLLM and vLLM's OpenAI application; answers one API request at a time each."""

    def __init__(self, llm: Any, args: Namespace, stop_timeout: float,
                 prefix_cache: PrefixCacheCount | None = None) -> None:
        self._llm = llm
        self.prefix_cache = prefix_cache or PrefixCacheCount()  # added to by the engine's stat logger
        self._args = args
        self.stop_timeout = stop_timeout
        self._spawned: list = []  # the engine's processes (psutil), ended at shutdown if still there
        self.max_model_len: int = llm.model_config.max_model_len
        # What the engine's scheduler runs at once: the capacity (prefetch) of this worker.
        self.max_num_seqs: int = llm.vllm_config.scheduler_config.max_num_seqs
        self.adapters = [m.name for m in (args.lora_modules or [])]
        self.tasks: list[str] = []
        self._app: ASGIApp | None = None
        self._calls: dict[str, AsgiCall] = {}

    @classmethod
    def start(cls, settings: WorkerSettings) -> "Engine":
        """Build the engine (blocking, seconds to minutes: call it in a thread); then ``open_api``."""
        for name, value in settings.engine_env().items():
            os.environ.setdefault(name, value)
        args = serve_args(settings)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        before = {p.pid for p in engine_processes()}
        prefix_cache = PrefixCacheCount()
        # As an OpenAI server: vLLM then picks the same batch defaults as its own server does.
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs.from_cli_args(args),
                                        usage_context=UsageContext.OPENAI_API_SERVER,
                                        stat_loggers=[stat_logger(prefix_cache)])
        try:
            engine = cls(llm, args, settings.engine_stop_timeout, prefix_cache)
            engine._spawned = [p for p in engine_processes() if p.pid not in before]
            return engine
        finally:
            # vLLM keeps this frame alive (a traceback it caught while starting holds it), and a
            # frame that outlives its call keeps its locals: without this, the AsyncLLM lives on
            # after shutdown() until interpreter teardown, where its __del__ fails with a traceback.
            del llm

    async def open_api(self) -> None:
        """Build vLLM's OpenAI application on this engine, as its server does (on the event loop)."""
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app

        client = CountingEngineClient(self._llm)
        tasks = tuple(await self._llm.get_supported_tasks())
        with _root_logging_kept():
            app = build_app(self._args, tasks, self._llm.model_config)
        await init_app_state(client, app.state, self._args, tasks)
        self.tasks, self._app = list(tasks), app

    async def handle(self, req: ApiRequest, sink: ResponseSink, count: TokenCount) -> None:
        """Answer one request with vLLM's layer; the response goes to ``sink`` as it is made, the
        engine's token counts to ``count``."""
        assert self._app is not None, "open_api() first"
        call = AsgiCall(self._app, req.endpoint, json.dumps(req.body).encode(),
                        # vLLM names its engine requests after this: chatcmpl-<id>, cmpl-<id>-<i>.
                        {"x-request-id": req.request_id})
        self._calls[req.request_id] = call
        token = count.watch()
        try:
            await call.run(sink)
        finally:
            TokenCount.unwatch(token)
            self._calls.pop(req.request_id, None)
        if self.dead:
            raise EngineDead("the engine core died")

    def abort(self, request_id: str) -> None:
        """Stop a request: vLLM's handler sees its client leave and aborts the engine request."""
        if (call := self._calls.get(request_id)) is not None:
            call.disconnect()

    def shutdown(self) -> None:
        """Stop the engine core now, while the interpreter is whole (vLLM's __del__ fails late).

        Its processes get ``stop_timeout`` seconds to end by themselves (vLLM's default of 5 s is
        what its CPU build takes every time), then what is left of them is ended here, so that a
        preempted worker gives its node back in seconds and leaves no orphan behind."""
        llm, self._llm = self._llm, None
        self._app = None
        if llm is not None:
            llm.shutdown(timeout=self.stop_timeout)
            del llm
            gc.collect()
            # Known since start-up: an engine core that was killed has orphaned its own child.
            end_processes([p for p in self._spawned if p.is_running()], grace=self.stop_timeout)

    @property
    def dead(self) -> bool:
        return self._llm is None or bool(self._llm.errored)
