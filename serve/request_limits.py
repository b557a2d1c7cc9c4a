"""What the fronts accept, bounded before any work is spent on it.

1. The request's size: HTTP answers a body over ``max_request_bytes`` with 413 before reading
   it (Content-Length) or as soon as a chunked body passes it, and never parses it; gRPC is
   given the same number as ``grpc.max_receive_message_length`` (RESOURCE_EXHAUSTED above it,
   from gRPC itself, before deserializing). ``brownout-jax serve`` derives the default from
   the context: ``default_max_request_bytes``.
2. Prompt text: longer than the context could hold at the tokenizer's longest token, it is
   refused before tokenizing (``brownout_jax.engine.requests.check_prompt_text``; both fronts,
   through ``Engine.submit`` and the chat path here, 400 / INVALID_ARGUMENT naming the field).
3. HTTP's tokenizing and chat-template rendering run on a few threads with a bounded queue
   (``http_request.PreparePool``); when it is full a request gets 429 at once, never an
   unbounded wait.

The HTTP side of 1 and 3 is serve/http_request.py. This module imports nothing heavy (the CLI
builds its parser and derives the default from it).
"""

from __future__ import annotations

import dataclasses

# A prompt's tokens as JSON text: an id list needs at most 7 bytes an id ("151935,"), text
# about 4 bytes a token, up to 12 when escaped (a CJK token as "\u4e2d\u6587"). 32 leaves room
# for long tokens and chat framing.
BYTES_PER_TOKEN = 32
FIELDS_ALLOWANCE = 1 << 20  # every other field (stop strings, messages' framing), generously
GRPC_DEFAULT_MAX_RECEIVE = 4 << 20  # gRPC's own default receive limit


def default_max_request_bytes(max_model_len: int) -> int:
    """``max_model_len`` × 32 bytes + 1 MiB: a prompt filling the context, as JSON, with room
    to spare (8 k context: 1.25 MiB; 128 k: 5 MiB)."""
    return max_model_len * BYTES_PER_TOKEN + FIELDS_ALLOWANCE


@dataclasses.dataclass(frozen=True, slots=True)
class RequestLimits:
    max_request_bytes: int = GRPC_DEFAULT_MAX_RECEIVE  # serve: default_max_request_bytes
    # HTTP: threads that tokenize / render chat templates, and requests that may wait for one
    # (the engine thread needs the CPU too: a few threads suffice).
    prepare_threads: int = 4
    prepare_queue: int = 64

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be ≥ 1, got {self.max_request_bytes}")
        if self.prepare_threads < 1 or self.prepare_queue < 0:
            raise ValueError(
                f"prepare_threads must be ≥ 1 and prepare_queue ≥ 0, got "
                f"{self.prepare_threads} and {self.prepare_queue}"
            )
