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
from gpu_worker.settings import WorkerSettings

log = logging.getLogger("chatai.worker.engine")


# Prompts up to this size are tokenized on the event loop (well under a millisecond); a thread hop
# costs more than that under load, as the GIL passes back and forth. Longer ones go to a thread
# so a huge prompt never stalls the other streams.
INLINE_TOKENIZE_CHARS = 8192


def _prompt_chars(req: GenerateRequest) -> int:
    if req.kind == "chat":
        return sum(len(m.content) for m in req.messages or [])
    return len(req.prompt or "")


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
    finish_reason: str | None = None  # "stop" | "length" | "abort" once the choice ended
    stop_reason: str | int | None = None


@dataclass
class Step:
    prompt_tokens: int
    choices: list[ChoiceDelta] = field(default_factory=list)
    finished: bool = False


def _token_logprobs(token_ids, logprobs, top_n: int) -> list[TokenLogprob]:
    """vLLM's per-position {token_id: Logprob} dicts -> the wire's chosen token + top-N list."""
    out: list[TokenLogprob] = []
    for tid, entries in zip(token_ids, logprobs or []):
        chosen = entries.get(tid)
        tops = sorted(entries.values(), key=lambda lp: lp.rank if lp.rank is not None else 1 << 30)[:top_n]
        out.append(
            TokenLogprob(
                token=(chosen.decoded_token if chosen else None) or "",
                logprob=chosen.logprob if chosen else float("-inf"),
                top_logprobs=[TopLogprob(token=lp.decoded_token or "", logprob=lp.logprob) for lp in tops],
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

    def __init__(self, llm, tokenizer, max_model_len: int, max_num_seqs: int) -> None:
        self._llm = llm
        self._tok = tokenizer
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs  # what the engine's scheduler runs at once: the capacity

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
        # As an OpenAI server: vLLM then picks the same batch defaults as its own server does.
        llm = AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER)
        return cls(llm, llm.get_tokenizer(), llm.model_config.max_model_len,
                   llm.vllm_config.scheduler_config.max_num_seqs)

    def shutdown(self) -> None:
        """Stop the engine core now, while the interpreter is whole (vLLM's __del__ fails late)."""
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
            del llm
            gc.collect()

    # ------------------------------------------------------------------ request mapping

    def prompt_ids(self, req: GenerateRequest) -> list[int]:
        """Token ids of the prompt: the model's chat template for chat requests."""
        if req.kind == "chat":
            messages = [m.model_dump(exclude_none=True) for m in req.messages or []]
            if not messages:
                raise RequestFailed(400, "invalid_request_error", "messages must not be empty")
            try:
                text = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as exc:  # template errors are the caller's fault (e.g. role order)
                raise RequestFailed(400, "invalid_request_error", f"chat template failed: {type(exc).__name__}")
            ids = self._tok.encode(text, add_special_tokens=False)
        else:
            if req.prompt is None:
                raise RequestFailed(400, "invalid_request_error", "prompt is required")
            ids = self._tok.encode(req.prompt)
        return list(ids)

    def sampling_params(self, req: GenerateRequest, prompt_len: int):
        """OpenAI options -> vllm.SamplingParams, with OpenAI's context-length rule."""
        from vllm import SamplingParams
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
                ignore_eos=s.ignore_eos,
                output_kind=RequestOutputKind.DELTA,
            )
        except (ValueError, TypeError) as exc:
            raise RequestFailed(400, "invalid_request_error", str(exc)) from None

    # ------------------------------------------------------------------ generation

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Step]:
        """Run one request; yields a Step per engine output, the last one with finished=True."""
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        if _prompt_chars(req) <= INLINE_TOKENIZE_CHARS:
            ids = self.prompt_ids(req)
        else:
            ids = await asyncio.to_thread(self.prompt_ids, req)
        params = self.sampling_params(req, len(ids))
        top_n = req.sampling.logprobs
        echo = req.sampling.echo and req.kind == "completion"
        echoed: set[int] = set()
        try:
            async for out in self._llm.generate({"prompt_token_ids": ids}, params, req.request_id):
                step = Step(prompt_tokens=len(ids), finished=out.finished)
                for c in out.outputs:
                    text = c.text
                    if echo and c.index not in echoed:
                        echoed.add(c.index)
                        text = (req.prompt or "") + text
                    step.choices.append(
                        ChoiceDelta(
                            index=c.index,
                            text=text,
                            tokens=len(c.token_ids),
                            logprobs=_token_logprobs(c.token_ids, c.logprobs, top_n) if top_n is not None else None,
                            finish_reason=c.finish_reason,
                            stop_reason=c.stop_reason,
                        )
                    )
                yield step
        except EngineDeadError as exc:
            raise EngineDead(str(exc)) from exc
        except VLLMClientError as exc:
            raise RequestFailed(400, "invalid_request_error", str(exc)) from None

    async def abort(self, request_id: str) -> None:
        """Stop a request; its generator then ends with finish_reason "abort"."""
        await self._llm.abort(request_id)

    @property
    def dead(self) -> bool:
        return self._llm is None or bool(self._llm.errored)
