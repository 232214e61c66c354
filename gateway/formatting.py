"""OpenAI response objects for chat and text completions, whole and as stream chunks."""

from __future__ import annotations

import time
from typing import Any, Literal

from broker_config.messages import ChoiceEnd, Delta, Final, TokenLogprob, Usage

Kind = Literal["chat", "completion"]


def _usage(u: Usage) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens}


def _finish(reason: str | None) -> str | None:
    return "stop" if reason == "abort" else reason


def _chat_logprobs(items: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if items is None:
        return None
    return {"content": [
        {"token": i.token, "logprob": i.logprob, "bytes": list(i.token.encode()),
         "top_logprobs": [{"token": a.token, "logprob": a.logprob, "bytes": list(a.token.encode())}
                          for a in i.top_logprobs]}
        for i in items]}


def _text_logprobs(items: list[TokenLogprob] | None, prompt: list[TokenLogprob] | None = None,
                   offset: int = 0) -> dict[str, Any] | None:
    """OpenAI's completions shape; with echo, the prompt's tokens come first (the first of them
    has no logprob: null, as in OpenAI's and vLLM's replies)."""
    if items is None:
        return None
    items = [*(prompt or []), *items]
    offsets, pos = [], offset
    for i in items:
        offsets.append(pos)
        pos += len(i.token)
    return {"tokens": [i.token for i in items], "token_logprobs": [i.logprob for i in items],
            "top_logprobs": [None if i.logprob is None else {a.token: a.logprob for a in i.top_logprobs}
                             for i in items],
            "text_offset": offsets}


class ResponseBuilder:
    """Shapes one request's output as the OpenAI API does, for either endpoint."""

    def __init__(self, kind: Kind, response_id: str, model: str, include_usage: bool = False) -> None:
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + response_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self._text_offsets: dict[int, int] = {}

    def _head(self, chunk: bool) -> dict[str, Any]:
        if self.kind == "chat":
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    # ------------------------------------------------------------------ whole responses

    def completion(self, final: Final) -> dict[str, Any]:
        body = self._head(chunk=False)
        body["choices"] = [self._whole_choice(c) for c in sorted(final.choices, key=lambda c: c.index)]
        body["usage"] = _usage(final.usage)
        return body

    def _whole_choice(self, c: ChoiceEnd) -> dict[str, Any]:
        if self.kind == "chat":
            return {"index": c.index, "message": {"role": "assistant", "content": c.text or ""},
                    "logprobs": _chat_logprobs(c.logprobs), "finish_reason": _finish(c.finish_reason)}
        return {"index": c.index, "text": c.text or "", "logprobs": _text_logprobs(c.logprobs, c.prompt_logprobs),
                "finish_reason": _finish(c.finish_reason)}

    # ------------------------------------------------------------------ stream chunks

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body = self._head(chunk=True)
        body["choices"] = choices
        if self.include_usage:
            body["usage"] = None
        return body

    def role_chunk(self, n: int) -> dict[str, Any] | None:
        """Chat streams open with the assistant role, as OpenAI's do."""
        if self.kind != "chat":
            return None
        return self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None} for i in range(n)])

    def delta_chunk(self, d: Delta) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {"index": d.index, "delta": {"content": d.text}, "logprobs": _chat_logprobs(d.logprobs),
                      "finish_reason": None}
        else:
            offset = self._text_offsets.get(d.index, 0)
            self._text_offsets[d.index] = offset + len(d.text)
            choice = {"index": d.index, "text": d.text, "logprobs": _text_logprobs(d.logprobs, d.prompt_logprobs, offset),
                      "finish_reason": None}
        return self._chunk([choice])

    def finish_chunk(self, final: Final) -> dict[str, Any]:
        choices = []
        for c in sorted(final.choices, key=lambda c: c.index):
            if self.kind == "chat":
                choices.append({"index": c.index, "delta": {}, "logprobs": None,
                                "finish_reason": _finish(c.finish_reason)})
            else:
                choices.append({"index": c.index, "text": "", "logprobs": None,
                                "finish_reason": _finish(c.finish_reason)})
        return self._chunk(choices)

    def usage_chunk(self, final: Final) -> dict[str, Any]:
        body = self._head(chunk=True)
        body["choices"] = []
        body["usage"] = _usage(final.usage)
        return body
