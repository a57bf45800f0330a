"""An HTTP transport for httpx2 (the openai SDK's HTTP client) that plays API Gateway: each request becomes a
REST API proxy event and is sent to the function running under the real Lambda RIE; the proxy response
becomes the HTTP response. So the real `openai` SDK talks to the real function, with nothing mocked between.

Like a REST API's stage, the base URL's first path segment (`/v1`) is the stage: it is removed from the
event's `path` and kept in `requestContext.path`. The envelope is the sample event events/openai/
rest-chat-completions-sdk.json with the request's method, path, headers and body.
"""

from __future__ import annotations

import base64
import copy
import time
import uuid

import httpx2
from conftest import load_event
from rie import RieServer

BASE_URL = "https://abcdef1234.execute-api.us-east-1.amazonaws.com/v1"
"""What the deployed API's OpenAIBaseUrl output looks like. Never contacted: the transport answers."""


class ApiGatewayTransport(httpx2.BaseTransport):
    """Send every request to the function under `rie` as an API Gateway REST event (stage `v1`)."""

    def __init__(self, rie: RieServer, stage: str = "v1") -> None:
        self.rie = rie
        self.stage = stage
        self.template = load_event("openai/rest-chat-completions-sdk")
        self.events: list[dict] = []

    def event_for(self, request: httpx2.Request) -> dict:
        full_path = request.url.path  # decoded, as API Gateway puts it in the event
        prefix = f"/{self.stage}"
        path = full_path[len(prefix) :] if full_path.startswith(prefix + "/") else full_path
        headers: dict[str, list[str]] = {}
        for name, value in request.headers.multi_items():
            headers.setdefault(name, []).append(value)
        body = request.read()
        event = copy.deepcopy(self.template)
        event.update(
            resource=path,
            path=path,
            httpMethod=request.method,
            headers={name: values[-1] for name, values in headers.items()},
            multiValueHeaders=headers,
            queryStringParameters=dict(request.url.params) or None,
            multiValueQueryStringParameters={k: request.url.params.get_list(k) for k in request.url.params} or None,
            body=body.decode("utf-8") if body else None,
            isBase64Encoded=False,
        )
        context = event["requestContext"]
        context.update(
            httpMethod=request.method,
            path=full_path,
            resourcePath=path,
            stage=self.stage,
            requestId=str(uuid.uuid4()),
            requestTimeEpoch=int(time.time() * 1000),
        )
        return event

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        event = self.event_for(request)
        self.events.append(event)
        answer = self.rie.invoke(event)
        if "statusCode" not in answer:  # the runtime failed the invocation: API Gateway answers 502
            return httpx2.Response(502, json={"message": "Internal server error"}, request=request)
        multi = answer.get("multiValueHeaders") or {}
        seen = {name.lower() for name in multi}
        headers = [(name, value) for name, values in multi.items() for value in values]
        headers += [(name, value) for name, value in (answer.get("headers") or {}).items() if name.lower() not in seen]
        body = answer.get("body") or ""
        content = base64.b64decode(body) if answer.get("isBase64Encoded") else body.encode("utf-8")
        return httpx2.Response(answer["statusCode"], headers=headers, content=content, request=request)
