"""Model aliases: ``model="<served>+<alias>"`` for clients that cannot send ``vllm_xargs``.

:class:`AliasMiddleware` (an ASGI middleware vLLM's app loads by name through ``--middleware``)
rewrites such a request's body before vLLM reads it: the served model name, and the alias's spec as
``vllm_xargs["moesteer"]``. An unknown alias is a 404, an alias beside a different
``vllm_xargs["moesteer"]`` a 400, both in vLLM's error format.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from starlette.datastructures import Headers
from vllm import envs
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware
from vllm.exceptions import VLLMNotFoundError, VLLMValidationError

from moesteer.serve.requests import STRATEGY_KEY

ALIAS_PATHS = ("/v1/completions", "/v1/chat/completions")
MIDDLEWARE = "moesteer.serve.aliases.AliasMiddleware"


class AliasError(ValueError):
    """A request naming an alias it cannot use; ``status`` is the HTTP answer."""

    def __init__(self, message: str, status: HTTPStatus) -> None:
        super().__init__(message)
        self.status = status


def resolve_alias(body: dict, served: str, aliases: dict[str, str]) -> bool:
    """Rewrite ``body`` in place when its model names ``served+alias``; whether it did."""
    model = body.get("model")
    if not isinstance(model, str) or "+" not in model:
        return False
    base, _, alias = model.rpartition("+")
    if base != served:
        return False
    if alias not in aliases:
        known = ", ".join(f"{served}+{name}" for name in aliases) or "none"
        raise AliasError(f"unknown alias {alias!r} of {served}; aliases: {known}", HTTPStatus.NOT_FOUND)
    xargs = body.get("vllm_xargs")
    xargs = {} if xargs is None else xargs
    if not isinstance(xargs, dict):
        return False  # vLLM's own validation answers
    given = xargs.get(STRATEGY_KEY)
    if given is not None and given != aliases[alias]:
        raise AliasError(
            f"model {model!r} runs {aliases[alias]}; vllm_xargs[{STRATEGY_KEY!r}] asks for {given!r}: give one of them",
            HTTPStatus.BAD_REQUEST,
        )
    body["model"] = base
    body["vllm_xargs"] = {**xargs, STRATEGY_KEY: aliases[alias]}
    return True


class AliasMiddleware:
    """ASGI middleware: aliases resolved in the request body (module docstring). The served name and
    the aliases are read from the app's engine client (``app.state.engine_client``)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        post = scope["type"] == "http" and scope["method"] == "POST"
        if not post or scope["path"] not in ALIAS_PATHS or not authorized(scope):
            await self.app(scope, receive, send)
            return
        engine = scope["app"].state.engine_client
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay(b"", receive), send)  # the client left; vLLM sees it
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            parsed = json.loads(body)
            changed = isinstance(parsed, dict) and resolve_alias(parsed, engine.served_name, engine.options.aliases)
        except json.JSONDecodeError:
            changed = False  # vLLM's own validation answers
        except AliasError as err:
            await _error(send, err)
            return
        if changed:
            body = json.dumps(parsed).encode()
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        await self.app(scope, _replay(body, receive), send)


def authorized(scope) -> bool:
    """Whether a request passes the server's ``--api-key`` check (vLLM's own, which runs inside
    moesteer's middleware: a request that fails it goes on to vLLM, which answers 401)."""
    args = scope["app"].state.args
    tokens = [key for key in (args.api_key or [envs.VLLM_API_KEY]) if key]
    return not tokens or AuthenticationMiddleware(None, tokens).verify_token(Headers(scope=scope))


def _replay(body: bytes, receive):
    """A ``receive`` that gives ``body`` once, then listens to the client (disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _error(send, err: AliasError) -> None:
    cls = VLLMNotFoundError if err.status == HTTPStatus.NOT_FOUND else VLLMValidationError
    await send_json(send, err.status, create_error_response(cls(str(err))).model_dump())


async def send_json(send, status: HTTPStatus, body: dict) -> None:
    """An ASGI response of ``body`` as JSON."""
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status.value, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
