"""The vLLM adapter: one in-process ``AsyncLLM``, wire requests in, per-choice deltas out.

Everything vLLM-specific lives here, so the AMQP side never sees a vLLM type. The engine core
runs in a child process that vLLM spawns: whatever imports this module as a script needs the
``if __name__ == "__main__"`` guard (``python -m gpu_worker`` and the ``chatai`` command have it).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from broker_config.messages import GenerateRequest, TokenLogprob, TopLogprob
from gpu_worker.lifecycle import end_processes, engine_processes
from gpu_worker.settings import WorkerSettings

log = logging.getLogger("chatai.worker.engine")


# Prompts up to this size are tokenized on the event loop (well under a millisecond); a thread hop
# costs more than that under load, as the GIL passes back and forth. Longer ones go to a thread
# so a huge prompt never stalls the other streams.
INLINE_TOKENIZE_CHARS = 8192


def _prompt_chars(req: GenerateRequest) -> int:
    if req.kind == "chat":
        return sum(len(m.content) for m in req.messages or [])
    return sum(len(p) for p in req.prompt_list() if isinstance(p, str))


class RequestFailed(Exception):
    """A request the engine cannot serve; status and code follow the OpenAI error format."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class EngineDead(Exception):
    """The engine core is gone: the worker must stop, held messages go back to the queue."""


@dataclass
class ChoiceDelta:
    """New output of one choice since the previous step."""

    index: int
    text: str
    tokens: int
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # echo with logprobs: with the first output
    finish_reason: str | None = None  # "stop" | "length" | "abort" once the choice ended
    stop_reason: str | int | None = None


@dataclass
class Step:
    prompt_tokens: int
    choices: list[ChoiceDelta] = field(default_factory=list)
    finished: bool = False


# JSON has no -inf: the floor vLLM's own server reports for a token that could not be sampled.
MIN_LOGPROB = -9999.0


def _token_logprobs(token_ids, logprobs, top_n: int, decode=None) -> list[TokenLogprob]:
    """vLLM's per-position {token_id: Logprob} dicts -> the wire's chosen token + top-N list.

    A position without a dict (None: a prompt's first token, which has no context) gets the
    token's text from ``decode`` and no logprob, as vLLM's server reports it.
    """
    out: list[TokenLogprob] = []
    for tid, entries in zip(token_ids, logprobs or []):
        if entries is None:
            out.append(TokenLogprob(token=decode(tid) if decode else "", logprob=None))
            continue
        chosen = entries.get(tid)
        tops = sorted(entries.values(), key=lambda lp: lp.rank if lp.rank is not None else 1 << 30)[:top_n]
        out.append(
            TokenLogprob(
                token=(chosen.decoded_token if chosen else None) or "",
                logprob=max(chosen.logprob, MIN_LOGPROB) if chosen else MIN_LOGPROB,
                top_logprobs=[TopLogprob(token=lp.decoded_token or "", logprob=max(lp.logprob, MIN_LOGPROB))
                              for lp in tops],
            )
        )
    return out


class TokenEngine(Protocol):
    """What the consumer needs of an engine: vLLM's (``Engine``) or the load-test source
    (``gpu_worker.synthetic.SyntheticEngine``)."""

    max_num_seqs: int
    max_model_len: int

    def generate(self, req: GenerateRequest) -> AsyncIterator[Step]: ...

    async def abort(self, request_id: str) -> None: ...

    def shutdown(self) -> None: ...


class Engine:
    """Owns the AsyncLLM and its tokenizer; maps wire requests to vLLM and back."""

    def __init__(self, llm, tokenizer, max_model_len: int, max_num_seqs: int, stop_timeout: float = 2.0) -> None:
        self._llm = llm
        self.stop_timeout = stop_timeout
        self._spawned: list = []  # the engine's processes (psutil), ended at shutdown if still there
        self._tok = tokenizer
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs  # what the engine's scheduler runs at once: the capacity
        self._engine_ids: dict[str, list[str]] = {}  # request id -> its engine requests, one per prompt

    @classmethod
    def start(cls, settings: WorkerSettings) -> "Engine":
        """Build the engine (blocking, seconds to minutes: call it in a thread)."""
        kwargs = settings.engine_kwargs()
        for name, value in settings.engine_env().items():
            os.environ.setdefault(name, value)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from vllm.usage.usage_lib import UsageContext

        args = AsyncEngineArgs(**kwargs)
        before = {p.pid for p in engine_processes()}
        # As an OpenAI server: vLLM then picks the same batch defaults as its own server does.
        llm = AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER)
        try:
            engine = cls(llm, llm.get_tokenizer(), llm.model_config.max_model_len,
                         llm.vllm_config.scheduler_config.max_num_seqs, settings.engine_stop_timeout)
            engine._spawned = [p for p in engine_processes() if p.pid not in before]
            return engine
        finally:
            # vLLM keeps this frame alive (a traceback it caught while starting holds it), and a
            # frame that outlives its call keeps its locals: without this, the AsyncLLM lives on
            # after shutdown() until interpreter teardown, where its __del__ fails with a traceback.
            del llm

    def shutdown(self) -> None:
        """Stop the engine core now, while the interpreter is whole (vLLM's __del__ fails late).

        Its processes get ``stop_timeout`` seconds to end by themselves (vLLM's default of 5 s is
        what its CPU build takes every time), then what is left of them is ended here, so that a
        preempted worker gives its node back in seconds and leaves no orphan behind."""
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown(timeout=self.stop_timeout)
            del llm
            gc.collect()
            # Known since start-up: an engine core that was killed has orphaned its own child.
            end_processes([p for p in self._spawned if p.is_running()], grace=self.stop_timeout)

    # ------------------------------------------------------------------ request mapping

    def prompt_ids(self, req: GenerateRequest) -> list[list[int]]:
        """Token ids of each prompt: the model's chat template for a chat request (one prompt);
        a completion's prompts as given when they are token ids, tokenized when text."""
        if req.kind == "chat":
            messages = [m.model_dump(exclude_none=True) for m in req.messages or []]
            if not messages:
                raise RequestFailed(400, "invalid_request_error", "messages must not be empty")
            try:
                text = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as exc:  # template errors are the caller's fault (e.g. role order)
                raise RequestFailed(400, "invalid_request_error", f"chat template failed: {type(exc).__name__}")
            return [list(self._tok.encode(text, add_special_tokens=False))]
        prompts = req.prompt_list()
        if not prompts:
            raise RequestFailed(400, "invalid_request_error", "prompt is required")
        return [list(p) if isinstance(p, list) else list(self._tok.encode(p)) for p in prompts]

    def sampling_params(self, req: GenerateRequest, prompt_len: int):
        """OpenAI options -> vllm.SamplingParams, with OpenAI's context-length rule."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        s = req.sampling
        room = self.max_model_len - prompt_len
        if room <= 0 or (s.max_tokens is not None and s.max_tokens > room):
            asked = prompt_len + (s.max_tokens or 0)
            raise RequestFailed(
                400,
                "context_length_exceeded",
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {asked} tokens ({prompt_len} in the prompt, {s.max_tokens or 0} for the "
                "completion). Please reduce the length of the prompt or the completion.",
            )
        try:
            return SamplingParams(
                n=s.n,
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=s.max_tokens if s.max_tokens is not None else room,
                min_tokens=s.min_tokens,
                stop=list(s.stop) or None,
                seed=s.seed,
                presence_penalty=s.presence_penalty,
                frequency_penalty=s.frequency_penalty,
                logprobs=s.logprobs,
                prompt_logprobs=s.logprobs if s.prompt_logprobs else None,
                logit_bias=s.logit_bias,
                ignore_eos=s.ignore_eos,
                output_kind=RequestOutputKind.DELTA,
            )
        except (ValueError, TypeError, VLLMClientError) as exc:  # e.g. n > 1 with greedy sampling
            raise RequestFailed(400, "invalid_request_error", str(exc)) from None

    # ------------------------------------------------------------------ generation

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Step]:
        """Run one request; yields a Step per engine output, the last one with finished=True.

        Several prompts run as one engine request each (``<request id>-<p>``), their outputs
        merged as they come; choice i of prompt p is choice ``p * n + i``, as in OpenAI's API.
        """
        from vllm.exceptions import VLLMClientError
        from vllm.utils.async_utils import merge_async_iterators
        from vllm.v1.engine.exceptions import EngineDeadError

        if _prompt_chars(req) <= INLINE_TOKENIZE_CHARS:
            prompts = self.prompt_ids(req)
        else:
            prompts = await asyncio.to_thread(self.prompt_ids, req)
        params = [self.sampling_params(req, len(ids)) for ids in prompts]
        n, top_n = req.sampling.n, req.sampling.logprobs
        echo = req.sampling.echo and req.kind == "completion"
        with_prompt_logprobs = echo and top_n is not None and req.sampling.prompt_logprobs
        texts: list[str] = []
        if echo:  # the prompt as text: as given, or the token ids decoded (as vLLM's server does)
            texts = [p if isinstance(p, str) else self._tok.decode(p) for p in req.prompt_list()]
        ids_of = [req.request_id] if len(prompts) == 1 else [f"{req.request_id}-{p}" for p in range(len(prompts))]
        self._engine_ids[req.request_id] = ids_of
        prompt_tokens = sum(len(ids) for ids in prompts)
        unfinished = set(range(len(prompts)))
        prompt_lps: dict[int, list[TokenLogprob]] = {}
        echoed: set[int] = set()
        try:
            outputs = merge_async_iterators(*(
                self._llm.generate({"prompt_token_ids": ids}, params[p], ids_of[p]) for p, ids in enumerate(prompts)))
            async for p, out in outputs:
                if out.finished:
                    unfinished.discard(p)
                if with_prompt_logprobs and p not in prompt_lps and out.prompt_logprobs:
                    prompt_lps[p] = _token_logprobs(prompts[p], out.prompt_logprobs, top_n, self._tok.decode)
                step = Step(prompt_tokens=prompt_tokens, finished=not unfinished)
                for c in out.outputs:
                    index = p * n + c.index
                    text, plp = c.text, None
                    if echo and index not in echoed:
                        echoed.add(index)
                        text, plp = texts[p] + text, prompt_lps.get(p)
                    step.choices.append(
                        ChoiceDelta(
                            index=index,
                            text=text,
                            tokens=len(c.token_ids),
                            logprobs=_token_logprobs(c.token_ids, c.logprobs, top_n) if top_n is not None else None,
                            prompt_logprobs=plp,
                            finish_reason=c.finish_reason,
                            stop_reason=c.stop_reason,
                        )
                    )
                yield step
        except EngineDeadError as exc:
            raise EngineDead(str(exc)) from exc
        except VLLMClientError as exc:
            raise RequestFailed(400, "invalid_request_error", str(exc)) from None
        finally:
            self._engine_ids.pop(req.request_id, None)

    async def abort(self, request_id: str) -> None:
        """Stop a request (every prompt of it); its generator then ends with finish_reason "abort"."""
        await self._llm.abort(self._engine_ids.get(request_id, [request_id]))

    @property
    def dead(self) -> bool:
        return self._llm is None or bool(self._llm.errored)
