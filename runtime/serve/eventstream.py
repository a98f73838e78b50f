"""A server-sent-event response that notices at once when its client goes away.

Starlette's StreamingResponse, under ASGI 2.4 servers, only finds out when a write
fails, and leaves closing the body's generator to garbage collection. Here the stream
and a listener for `http.disconnect` run side by side; whichever ends first stops the
other, and the body generator is always closed (its `finally` runs: ttserve cancels the
request there, so a disconnected user's slot and pages are freed at the next step).
"""
from __future__ import annotations

import anyio
from starlette.responses import StreamingResponse


class EventStream(StreamingResponse):
    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:
            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:  # the connection broke under a write
                    pass
                group.cancel_scope.cancel()

            async def listen() -> None:
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            group.start_soon(listen)
        await self.body_iterator.aclose()
