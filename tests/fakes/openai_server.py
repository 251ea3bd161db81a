"""A fake OpenAI Chat Completions API: `POST /v1/chat/completions` answered with the real
`chat.completion.chunk` stream (role chunk, content and tool-call deltas by index, a
finish_reason chunk, a usage chunk, `data: [DONE]`), in-stream `{"error": {...}}` data, and
`{"error": {"message", "type", "param", "code"}}` error bodies."""

from __future__ import annotations

import itertools
import time
from typing import Any

from tests.fakes import (
    FakeProviderServer,
    HttpError,
    Step,
    StreamError,
    json_fragments,
    sse,
    word_chunks,
)

_ids = itertools.count(1)


class FakeOpenAIServer(FakeProviderServer):
    path = "/v1/chat/completions"

    @property
    def base_url(self) -> str:
        """What to give the SDK: like OPENAI_BASE_URL, it ends in /v1."""
        return f"{self.origin}/v1"

    def response_headers(self) -> dict[str, str]:
        return {"x-request-id": f"req_fake_{next(_ids)}"}

    def error_body(self, error: HttpError) -> dict[str, Any]:
        return {"error": _error_object(error.error_type, error.message, error.code)}

    def stream_error_frame(self, error: StreamError) -> bytes:
        return sse({"error": _error_object(error.error_type, error.message, error.code)})

    def frames(self, step: Step, model: str) -> list[bytes]:
        completion_id = f"chatcmpl-fake{next(_ids)}"
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            return sse(
                {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "delta": delta,
                            "logprobs": None,
                            "finish_reason": finish_reason,
                        }
                    ],
                    "usage": None,
                }
            )

        frames = [chunk({"role": "assistant", "content": ""})]
        # Not OpenAI's own field: what DeepSeek and vLLM stream reasoning as.
        frames += [chunk({"reasoning_content": c}) for c in word_chunks(step.reasoning)]
        frames += [chunk({"content": c}) for c in word_chunks(step.text)]
        for index, call in enumerate(step.tool_calls):
            frames.append(
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": index,
                                "id": call.id,
                                "type": "function",
                                "function": {"name": call.name, "arguments": ""},
                            }
                        ]
                    }
                )
            )
            frames += [
                chunk({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
                for fragment in json_fragments(call.args)
            ]
        frames.append(chunk({}, "tool_calls" if step.tool_calls else "stop"))
        prompt_tokens = step.input_tokens + step.cache_read_tokens
        frames.append(
            sse(
                {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": step.output_tokens,
                        "total_tokens": prompt_tokens + step.output_tokens,
                        "prompt_tokens_details": {"cached_tokens": step.cache_read_tokens},
                    },
                }
            )
        )
        frames.append(sse("[DONE]"))
        return frames


def _error_object(error_type: str | None, message: str, code: str | None) -> dict[str, Any]:
    return {"message": message, "type": error_type, "param": None, "code": code}
