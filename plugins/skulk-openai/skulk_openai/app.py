"""The Quart app behind ``/v1`` and ``/openapi.json``: OpenAI's endpoints over the node's models.

Each handler checks its body (:mod:`skulk_openai.params`), resolves the model, renders and
tokenizes the prompt and asks the node's model server whether the request fits *before* any
response starts, so every refusal is a real HTTP status in OpenAI's error shape. Streams are
server-sent events; when the client goes away Quart cancels the response and closes its
generator, which closes the model server's generator, which frees the sequence at once.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, TypeVar

from attrs import frozen
from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from skulk_core import RequestError, SkulkError
from skulk_core import GenerationChunk, GenerationRequest, ModelNotReadyError, SamplingParams, error_body
from skulk_openai import wire
from skulk_openai.openapi import openapi_document
from skulk_openai.params import (
    ChatParams,
    CompletionParams,
    Generation,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_embedding,
    parse_tokenize,
    require_object,
)

if TYPE_CHECKING:
    from skulk_core.inference import ServedModel
    from skulk_core.node import Node

log = logging.getLogger("skulk.openai")
T = TypeVar("T")

MAX_BODY = 16 * 1024 * 1024
BODY_TIMEOUT = 60  # seconds a client may take to send its body; then a 408
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_TYPE = "text/event-stream; charset=utf-8"


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(wire.dumps(body), status=status, content_type="application/json", headers=headers)


def error_response(exc: SkulkError) -> Response:
    """Skulk's errors, as OpenAI's: a bad request 400, an unknown model 404, a loading model 503."""
    if isinstance(exc, ModelNotReadyError):
        return json_response(error_body(str(exc), type_="server_error", code="model_not_ready"), 503, {"Retry-After": "5"})
    if isinstance(exc, RequestError):
        status = 404 if exc.code == "model_not_found" else 400
        return json_response(error_body(str(exc), param=exc.param, code=exc.code), status)
    log.error("request failed: %s", exc)
    return json_response(error_body(str(exc), type_="server_error"), 500)


def stream_error(exc: BaseException) -> bytes:
    """An error after a stream has started: one event in OpenAI's error shape (the client raises it)."""
    if isinstance(exc, SkulkError):
        code = "model_not_ready" if isinstance(exc, ModelNotReadyError) else getattr(exc, "code", None)
        log.error("stream failed: %s", exc)
        return wire.sse(error_body(str(exc), type_="server_error", code=code))
    log.error("stream failed unexpectedly", exc_info=exc)
    return wire.sse(error_body("internal error; see the node's log", type_="server_error"))


class OpenAIFrontend:
    """The endpoints, over one node's model server."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.models = node.models

    # -- helpers -----------------------------------------------------------------------------

    async def _body(self) -> Any:
        data = await request.get_data(cache=False)
        if not data.strip():
            raise RequestError("The request body is empty; send a JSON object.", code="invalid_json")
        try:
            return wire.json_loads(data)
        except (ValueError, RecursionError) as exc:
            raise RequestError(
                f"We could not parse the JSON body of your request: {exc}. Send a JSON object with "
                f"'Content-Type: application/json'.",
                code="invalid_json",
            ) from None

    @staticmethod
    def _check_bias(served: ServedModel, generation: Generation) -> None:
        vocab = served.tokenizer.vocab_size
        for token in generation.sampling.logit_bias:
            if token >= vocab:
                raise RequestError(
                    f"Invalid value for 'logit_bias': {token} is not a token id of {served.id} (vocabulary of {vocab}).",
                    param="logit_bias",
                    code="invalid_value",
                )

    @staticmethod
    def _check_tokens(served: ServedModel, tokens: tuple[int, ...], param: str) -> None:
        vocab = served.tokenizer.vocab_size
        for index, token in enumerate(tokens):
            if token >= vocab:
                raise RequestError(
                    f"Invalid value for '{param}[{index}]': {token} is not a token id of {served.id} (vocabulary of {vocab}).",
                    param=f"{param}[{index}]",
                    code="invalid_value",
                )

    def _request(self, generation: Generation, prompt: list[int] | tuple[int, ...], prompt_logprobs: int | None = None) -> GenerationRequest:
        s = generation.sampling
        sampling = SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            seed=s.seed,
            logit_bias=dict(s.logit_bias),
            top_logprobs=generation.top_logprobs,
        )
        return GenerationRequest(
            model=generation.model,
            prompt=prompt,
            sampling=sampling,
            max_tokens=generation.max_tokens,
            stop=generation.stop,
            ignore_eos=generation.ignore_eos,
            logprobs=generation.logprobs,
            response_format=generation.response_format,
            prompt_logprobs=prompt_logprobs,
        )

    async def _collect(self, requests: Sequence[GenerationRequest]) -> list[_Answer]:
        """Each request's whole answer, generated side by side."""
        texts: list[list[str]] = [[] for _ in requests]
        tokens: list[list[Any]] = [[] for _ in requests]
        scores: list[tuple[Any, ...]] = [() for _ in requests]
        lasts: list[GenerationChunk | None] = [None] * len(requests)
        async with aclosing(_merged([self.models.generate(r) for r in requests])) as chunks:
            async for index, chunk in chunks:
                texts[index].append(chunk.text)
                tokens[index].extend(chunk.tokens)
                scores[index] = scores[index] or chunk.prompt_logprobs
                lasts[index] = chunk
        results = []
        for request, text, generated, scored, last in zip(requests, texts, tokens, scores, lasts):
            if last is None:  # the scheduler ended the stream without a last chunk
                raise ModelNotReadyError(f"{request.model} stopped before finishing the request; retry")
            results.append(_Answer("".join(text), generated, last, scored))
        return results

    @staticmethod
    def _streaming(events: AsyncIterator[bytes]) -> Response:
        response = Response(events, status=200, content_type=SSE_TYPE, headers=SSE_HEADERS)
        response.timeout = None  # a long generation is not a stuck one
        return response

    # -- endpoints ---------------------------------------------------------------------------

    async def chat_completions(self) -> Response:
        params = parse_chat(require_object(await self._body()))
        generation = params.generation
        served = self.models.ready(generation.model)
        self._check_bias(served, generation)
        text = self.models.render_chat(generation.model, params.messages)
        # The template already holds every special token the model wants (SmolLM2's has no BOS).
        prompt = self.models.encode(generation.model, text, add_special=False)
        gen_request = self._request(generation, prompt)
        self.models.check(gen_request)
        tokens = wire.TokenText(served.tokenizer)
        meta = {"id": wire.new_id("chatcmpl-"), "created": int(time.time()), "model": served.id, "system_fingerprint": _fingerprint(served)}
        if generation.stream:
            return self._streaming(self._chat_events(gen_request, params, meta, tokens))
        [answer] = await self._collect([gen_request])
        content, generated, last = answer.text, answer.tokens, answer.last
        logprobs = {"content": tokens.chat_content(generated), "refusal": None} if generation.logprobs else None
        return json_response(
            {
                **meta,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content, "refusal": None},
                        "logprobs": logprobs,
                        "finish_reason": last.finish_reason,
                    }
                ],
                "usage": wire.usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens),
            }
        )

    async def _chat_events(self, gen_request: GenerationRequest, params: ChatParams, meta: dict[str, Any], tokens: wire.TokenText) -> AsyncIterator[bytes]:
        generation = params.generation
        base = {**meta, "object": "chat.completion.chunk"}
        if generation.include_usage:
            base["usage"] = None

        def chunk(delta: dict[str, Any], finish_reason: str | None = None, logprobs: Any = None) -> bytes:
            return wire.sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]})

        content = wire.sse_with_text({**base, "choices": [{"index": 0, "delta": {"content": wire.TEXT_SLOT}, "logprobs": None, "finish_reason": None}]})
        yield chunk({"role": "assistant", "content": ""})
        last: GenerationChunk | None = None
        try:
            async with aclosing(self.models.generate(gen_request)) as chunks:
                async for piece in chunks:
                    logprobs = {"content": tokens.chat_content(piece.tokens), "refusal": None} if generation.logprobs else None
                    if logprobs is None:
                        if piece.text:
                            yield content(piece.text)
                    elif piece.text or logprobs["content"]:
                        yield chunk({"content": piece.text}, logprobs=logprobs)
                    if piece.finish_reason is not None:
                        last = piece
                        yield chunk({}, finish_reason=piece.finish_reason)
        except Exception as exc:
            yield stream_error(exc)
            return
        if last is None:
            yield stream_error(ModelNotReadyError(f"{gen_request.model} stopped before finishing the request; retry"))
            return
        if generation.include_usage:
            yield wire.sse({**base, "choices": [], "usage": wire.usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens)})
        yield wire.SSE_DONE

    async def completions(self) -> Response:
        params = parse_completion(require_object(await self._body()))
        generation = params.generation
        served = self.models.ready(generation.model)
        self._check_bias(served, generation)
        requests: list[GenerationRequest] = []
        prefixes: list[str] = []
        for index, prompt in enumerate(params.prompts):
            param = f"prompt[{index}]" if params.batched else "prompt"
            if isinstance(prompt, str):
                ids = self.models.encode(generation.model, prompt, add_special=True)
                echo = prompt
            else:
                self._check_tokens(served, prompt, param)
                ids = list(prompt)
                echo = _detokenize(served, ids)
            gen_request = self._request(generation, ids, params.prompt_logprobs)
            try:
                self.models.check(gen_request)
            except RequestError as exc:
                if exc.param in ("messages", "prompt"):  # the scheduler's names for the prompt: this one
                    raise RequestError(str(exc), param=param, code=exc.code) from None
                raise
            requests.append(gen_request)
            prefixes.append(echo if params.echo else "")
        tokens = wire.TokenText(served.tokenizer)
        meta = {"id": wire.new_id("cmpl-"), "object": "text_completion", "created": int(time.time()), "model": served.id, "system_fingerprint": _fingerprint(served)}
        if generation.stream:
            return self._streaming(self._completion_events(requests, params, meta, tokens, prefixes))
        results = await self._collect(requests)
        choices = []
        for index, (request, prefix, answer) in enumerate(zip(requests, prefixes, results)):
            logprobs = None
            if generation.logprobs and params.prompt_logprobs is None:
                logprobs = wire.LegacyLogprobs(tokens, len(prefix)).add(answer.tokens)
            elif generation.logprobs:  # the scored prompt's entries, then the completion's
                legacy = wire.LegacyLogprobs(tokens)
                prompt_entries = legacy.prompt(request.prompt, answer.prompt_logprobs, prefix)
                logprobs = wire.joined_legacy(prompt_entries, legacy.add(answer.tokens))
            choices.append({"index": index, "text": prefix + answer.text, "logprobs": logprobs, "finish_reason": answer.last.finish_reason})
        return json_response({**meta, "choices": choices, "usage": _summed_usage([answer.last for answer in results])})

    async def _completion_events(
        self, requests: list[GenerationRequest], params: CompletionParams, meta: dict[str, Any], tokens: wire.TokenText, prefixes: list[str]
    ) -> AsyncIterator[bytes]:
        generation = params.generation
        base = dict(meta)
        if generation.include_usage:
            base["usage"] = None

        def chunk(index: int, text: str, finish_reason: str | None = None, logprobs: Any = None) -> bytes:
            return wire.sse({**base, "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]})

        contents = [wire.sse_with_text({**base, "choices": [{"index": i, "text": wire.TEXT_SLOT, "logprobs": None, "finish_reason": None}]}) for i in range(len(requests))]

        # A scored prompt is echoed with its scores, which come with its first piece.
        scored = params.prompt_logprobs is not None
        if any(prefixes) and not scored:
            for index, prefix in enumerate(prefixes):
                yield chunk(index, prefix)
        else:
            yield wire.SSE_OPEN
        legacy = [wire.LegacyLogprobs(tokens, 0 if scored else len(prefix)) for prefix in prefixes]
        lasts: list[GenerationChunk | None] = [None] * len(requests)
        echoed = [not scored] * len(requests)
        try:
            streams = [self.models.generate(r) for r in requests]
            async with aclosing(_merged(streams)) as pieces:
                async for index, piece in pieces:
                    if not echoed[index]:
                        echoed[index] = True
                        yield chunk(index, prefixes[index], None, legacy[index].prompt(requests[index].prompt, piece.prompt_logprobs, prefixes[index]))
                    logprobs = legacy[index].add(piece.tokens) if generation.logprobs else None
                    if piece.finish_reason is not None:
                        lasts[index] = piece
                        yield chunk(index, piece.text, piece.finish_reason, logprobs)
                    elif logprobs is None:
                        if piece.text:
                            yield contents[index](piece.text)
                    elif piece.text or logprobs["tokens"]:
                        yield chunk(index, piece.text, None, logprobs)
        except Exception as exc:
            yield stream_error(exc)
            return
        if any(last is None for last in lasts):
            yield stream_error(ModelNotReadyError(f"{generation.model} stopped before finishing the request; retry"))
            return
        if generation.include_usage:
            yield wire.sse({**base, "choices": [], "usage": _summed_usage(lasts)})
        yield wire.SSE_DONE

    # -- the tokenizer, as vLLM's server offers it (lm-evaluation-harness's remote tokenizer) ----

    def _model_for_tokens(self, model: str | None) -> ServedModel:
        """The model named, or without a name the node's one model."""
        if model is not None:
            return self.models.ready(model)
        known = self.models.models()
        models = [m for m in known if m.status != "failed"] or known  # one that failed says why
        if not models:
            raise ModelNotReadyError("this node serves no model yet; retry in a moment")
        if len(models) > 1:
            raise RequestError(
                f"this node serves several models ({', '.join(m.id for m in models)}); name one with 'model'", param="model", code="invalid_value"
            )
        return self.models.ready(models[0].id)

    async def tokenize(self) -> Response:
        params = parse_tokenize(await self._body())
        served = self._model_for_tokens(params.model)
        if params.prompt is not None:
            text = params.prompt
        else:
            text = self.models.render_chat(served.id, params.messages or (), add_generation_prompt=params.add_generation_prompt)
        tokens = self.models.encode(served.id, text, add_special=params.add_special_tokens)
        return json_response({"count": len(tokens), "max_model_len": served.context_length, "tokens": tokens})

    async def detokenize(self) -> Response:
        model, tokens = parse_detokenize(await self._body())
        served = self._model_for_tokens(model)
        self._check_tokens(served, tokens, "tokens")
        tok = served.tokenizer  # control tokens are spelled out, so that text and tokens round-trip
        return json_response({"prompt": b"".join(tok.token_bytes(t) for t in tokens).decode("utf-8", "replace")})

    async def tokenizer_info(self) -> Response:
        model = request.args.get("model")
        served = self._model_for_tokens(model or None)
        bos, eos = self.models.special_tokens(served.id)
        return json_response(
            {
                "model": served.id,
                "tokenizer_class": "skulk",
                "bos_token": bos,
                "eos_token": eos,
                "pad_token": None,
                "chat_template": served.card.chat_template,
                "model_max_length": served.context_length,
                "vocab_size": served.tokenizer.vocab_size,
            }
        )

    async def list_models(self) -> Response:
        return json_response({"object": "list", "data": [_model_object(m) for m in self.models.models()]})

    async def get_model(self, model_id: str) -> Response:
        return json_response(_model_object(self.models.get(model_id)))

    async def embeddings(self) -> Response:
        params = parse_embedding(require_object(await self._body()))
        served = self.models.ready(params.model)
        token_lists: list[list[int]] = []
        for index, item in enumerate(params.inputs):
            if isinstance(item, str):
                token_lists.append(self.models.encode(params.model, item, add_special=True))
            else:
                self._check_tokens(served, item, f"input[{index}]" if len(params.inputs) > 1 else "input")
                token_lists.append(list(item))
        vectors = await self.models.embed(params.model, token_lists)
        data = []
        for index, vector in enumerate(vectors):
            if params.encoding_format == "base64":
                embedding: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
            else:
                embedding = [float(v) for v in vector]
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        used = sum(len(t) for t in token_lists)
        return json_response({"object": "list", "data": data, "model": served.id, "usage": {"prompt_tokens": used, "total_tokens": used}})

    async def openapi(self) -> Response:
        models = self.models.models()
        vocab = []
        for served in models:
            try:
                vocab.append(served.tokenizer.vocab_size)
            except SkulkError:  # not loaded yet, or headed by a node whose tokenizer is not here yet
                pass
        return json_response(openapi_document([m.id for m in models], max(vocab, default=None)))


@frozen
class _Answer:
    """One request's whole answer: its text, generated tokens and last chunk, and its prompt's
    scores where it asked for them (see :attr:`GenerationRequest.prompt_logprobs`)."""

    text: str
    tokens: list[Any]
    last: GenerationChunk
    prompt_logprobs: tuple[Any, ...] = ()


def _summed_usage(lasts: Iterable[GenerationChunk | None]) -> dict[str, int]:
    """One usage for several choices: their prompts' and their completions' tokens added up."""
    done = [last for last in lasts if last is not None]
    return wire.usage(
        sum(last.prompt_tokens for last in done), sum(last.completion_tokens for last in done), sum(last.cached_tokens for last in done)
    )


_END = object()


async def _merged(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Each stream's items as they come, as ``(index of the stream, item)``. Closing this closes
    every stream (freeing its sequence); a stream's failure ends this with that failure."""
    if len(streams) == 1:  # one prompt, the usual case: no tasks between the scheduler and the client
        async with aclosing(streams[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue(maxsize=len(streams))

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async with aclosing(stream) as items:
                async for item in items:
                    await queue.put((index, item))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put((index, exc))
            return
        await queue.put((index, _END))

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is _END:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _fingerprint(served: ServedModel) -> str:
    from skulk_core import __version__

    return f"skulk-{__version__}-{served.backend}"


def _model_object(served: ServedModel) -> dict[str, Any]:
    return {"id": served.id, "object": "model", "created": served.created, "owned_by": "skulk", "status": served.status}


def _detokenize(served: ServedModel, tokens: list[int]) -> str:
    tok = served.tokenizer
    return b"".join(tok.token_bytes(t) for t in tokens if not tok.is_control(t)).decode("utf-8", "replace")


def create_app(node: Node) -> Quart:
    """The app the plugin mounts at ``/v1``, ``/openapi.json`` and the tokenizer's three paths (the
    scope's path is left whole)."""
    app = Quart("skulk_openai")
    app.config.update(
        MAX_CONTENT_LENGTH=MAX_BODY,
        BODY_TIMEOUT=BODY_TIMEOUT,
        RESPONSE_TIMEOUT=None,  # Quart's default (60 s) would cut long streams
        PROPAGATE_EXCEPTIONS=False,
    )
    app.url_map.strict_slashes = False  # "/v1/models/" is "/v1/models", never a redirect
    api = OpenAIFrontend(node)
    routes: list[tuple[str, str, Callable[..., Any]]] = [
        ("/v1/chat/completions", "POST", api.chat_completions),
        ("/v1/completions", "POST", api.completions),
        ("/v1/embeddings", "POST", api.embeddings),
        ("/v1/models", "GET", api.list_models),
        ("/v1/models/<path:model_id>", "GET", api.get_model),
        ("/openapi.json", "GET", api.openapi),
        ("/tokenize", "POST", api.tokenize),
        ("/detokenize", "POST", api.detokenize),
        ("/tokenizer_info", "GET", api.tokenizer_info),
    ]
    for path, method, view in routes:
        app.add_url_rule(path, endpoint=view.__name__, view_func=view, methods=[method])

    @app.errorhandler(SkulkError)
    async def skulk_error(exc: SkulkError) -> Response:
        return error_response(exc)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response | HTTPException:
        if exc.code is None or exc.code < 400:
            return exc
        headers = {}
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            methods = [m for m in exc.valid_methods if m not in ("HEAD", "OPTIONS")] or list(exc.valid_methods)
            headers["Allow"] = ", ".join(exc.valid_methods)
            message = f"{request.method} is not allowed on {request.path}; use {', '.join(methods)}"
            code = "method_not_allowed"
        elif exc.code == 404:
            message, code = f"no such endpoint: {request.method} {request.path}", "not_found"
        elif isinstance(exc, RequestEntityTooLarge):
            message, code = f"The request body is over {MAX_BODY // (1024 * 1024)} MiB.", "request_too_large"
        else:
            message, code = exc.description or exc.name, None
        return json_response(error_body(message, code=code), exc.code, headers)

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.error("%s %s failed", request.method, request.path, exc_info=exc)
        return json_response(error_body("internal error; see the node's log", type_="server_error"), 500)

    return app
