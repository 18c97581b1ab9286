"""The OpenAPI 3.1 document served at ``/openapi.json``: every endpoint, its body and its answers.

The schemas say what the server really accepts (``n`` is 1, ``response_format`` is text or
json_object, ``stop`` holds at most four strings), so a tool that generates requests from them,
such as schemathesis, gets the answers the document promises.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from skulk_openai.params import MAX_EMBEDDING_INPUTS, MAX_PROMPTS, MAX_STOP

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return {**schema, "type": [kind, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def _number(low: float, high: float, default: float, description: str) -> dict[str, Any]:
    return {"type": ["number", "null"], "minimum": low, "maximum": high, "default": default, "description": description}


def _errors(*statuses: int) -> dict[str, Any]:
    words = {
        400: "Invalid request: malformed JSON, a missing or wrong-typed field, a value out of range, an unsupported option, or a prompt longer than the model's context (code context_length_exceeded).",
        401: "An API key is configured and the request has no valid 'Authorization: Bearer <key>'.",
        404: "The model does not exist on this node (code model_not_found).",
        405: "Wrong method for this path.",
        408: "The request body did not arrive in time.",
        413: "The request body is over 16 MiB.",
        500: "An unexpected server error (logged by the node).",
        503: "The model is still loading, or failed to load (code model_not_ready); retry later.",
    }
    return {str(s): {"description": words[s], "content": {JSON: {"schema": _ref("Error")}}} for s in statuses}


_SAMPLING: dict[str, Any] = {
    "model": _ref("ModelId"),
    "max_tokens": {"type": ["integer", "null"], "minimum": 1, "description": "Most tokens to generate."},
    "temperature": _number(0, 2, 1, "Sampling temperature; 0 is greedy."),
    "top_p": _number(0, 1, 1, "Nucleus sampling: keep the most likely tokens whose probabilities add up to top_p."),
    "top_k": {"type": ["integer", "null"], "minimum": -1, "maximum": 1 << 20, "default": 0, "description": "Extension: keep only the k most likely tokens; 0 or -1 turns it off."},
    "min_p": _number(0, 1, 0, "Extension: drop tokens less likely than min_p times the most likely one."),
    "presence_penalty": _number(-2, 2, 0, "Penalty for tokens already generated."),
    "frequency_penalty": _number(-2, 2, 0, "Penalty growing with how often a token was generated."),
    "seed": {"type": ["integer", "null"], "minimum": -(2**63), "maximum": 2**63 - 1, "description": "Same seed and parameters give the same tokens."},
    "stop": {
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP}, {"type": "null"}],
        "description": f"Up to {MAX_STOP} strings; generation stops before the first of them (which is not returned).",
    },
    "n": {"type": ["integer", "null"], "minimum": 1, "maximum": 1, "default": 1, "description": "Only 1 is supported."},
    "stream": {"type": ["boolean", "null"], "default": False, "description": "Stream the answer as server-sent events."},
    "stream_options": {
        "type": ["object", "null"],
        "properties": {"include_usage": {"type": ["boolean", "null"], "description": "Send a last chunk with usage and no choices."}},
        "description": "Only with stream true.",
    },
    "logit_bias": {
        "type": ["object", "null"],
        "propertyNames": {"pattern": "^[0-9]+$"},
        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        "description": "Token id (as a string) to a bias added to its logit. Ids must be in the model's vocabulary.",
    },
    "ignore_eos": {"type": ["boolean", "null"], "default": False, "description": "Extension: keep generating past the end-of-turn token."},
    "user": {"type": ["string", "null"], "description": "Ignored."},
}

_STREAM_OPTIONS_NEED_STREAM = {
    "if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
    "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
}

_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}

_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"], "description": "'developer' is read as 'system'."},
        "content": {
            "anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}, {"type": "null"}],
            "description": "Text, or text parts (joined with newlines). Other part types are refused with a 400. Null only for assistant turns.",
        },
        "name": {"type": ["string", "null"]},
        "tool_call_id": {"type": ["string", "null"]},
        "tool_calls": {"type": ["array", "null"], "items": {"type": "object"}},
    },
    "if": {"properties": {"role": {"const": "assistant"}}},
    "else": {"required": ["content"], "properties": {"content": {"type": ["string", "array"]}}},
}

_CHAT_REQUEST = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        **_SAMPLING,
        "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1, "description": "Newer name of max_tokens; wins when both are given."},
        "logprobs": {"type": ["boolean", "null"], "default": False, "description": "Return the log-probability of each generated token."},
        "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 20, "description": "Alternatives per position; needs logprobs true."},
        "response_format": {"anyOf": [_ref("ResponseFormat"), {"type": "null"}]},
        "tools": {"type": ["array", "null"], "maxItems": 0, "description": "Not supported: must be absent or empty."},
        "tool_choice": {"anyOf": [{"enum": ["none", "auto"]}, {"type": "null"}]},
    },
    "allOf": [
        _STREAM_OPTIONS_NEED_STREAM,
        {
            "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
            "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
        },
    ],
}

_RESPONSE_FORMAT = {
    "type": "object",
    "required": ["type"],
    "properties": {"type": {"enum": ["text", "json_object"]}},
    "description": (
        "'text' (the default), or 'json_object': the generated text is one JSON object and generation stops "
        "when it closes (finish_reason 'length' if max_tokens cuts it first). json_schema is refused with a 400."
    ),
}

_TOKEN_IDS = _ref("TokenIds")

_COMPLETION_REQUEST = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        **_SAMPLING,
        "max_tokens": {
            "type": ["integer", "null"],
            "minimum": 0,
            "default": 16,
            "description": "Most tokens to generate (default 16, as OpenAI). 0 only with echo: the prompt alone, scored with logprobs.",
        },
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 0},
        "prompt": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_PROMPTS},
                _TOKEN_IDS,
                {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": MAX_PROMPTS},
            ],
            "description": "A prompt (a string, tokenized with the model's BOS if it wants one, or token ids), or an array of prompts: one choice each, decoded together.",
        },
        "echo": {
            "type": ["boolean", "null"],
            "default": False,
            "description": "Prepend the prompt to the text. With logprobs, the prompt's tokens are scored too: one entry each, "
            "the first with null log-probabilities, each other with its log-probability after the tokens before it.",
        },
        "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 5, "description": "Return log-probabilities with this many alternatives."},
        "best_of": {"type": ["integer", "null"], "minimum": 1, "maximum": 1},
        "response_format": {
            "anyOf": [_ref("ResponseFormat"), {"type": "null"}],
            "description": "Extension on this endpoint (as in llama.cpp's server); as for chat completions.",
        },
        "suffix": {"anyOf": [{"const": ""}, {"type": "null"}], "description": "Not supported."},
    },
    "allOf": [
        _STREAM_OPTIONS_NEED_STREAM,
        {  # max_tokens 0 needs echo: a prompt alone is an answer only when it is echoed (and scored)
            "if": {"anyOf": [{"required": [key], "properties": {key: {"const": 0}}} for key in ("max_tokens", "max_completion_tokens")]},
            "then": {"required": ["echo"], "properties": {"echo": {"const": True}}},
        },
    ],
}

_EMBEDDING_REQUEST = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": _ref("ModelId"),
        "input": {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_EMBEDDING_INPUTS},
                _TOKEN_IDS,
                {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": MAX_EMBEDDING_INPUTS},
            ]
        },
        "encoding_format": {"anyOf": [{"enum": ["float", "base64"]}, {"type": "null"}], "default": "float", "description": "base64: little-endian float32."},
        "dimensions": {"type": "null", "description": "Not supported: must be absent."},
        "user": {"type": ["string", "null"]},
    },
}

_TOP_LOGPROB = {
    "type": "object",
    "required": ["token", "logprob", "bytes"],
    "properties": {"token": {"type": "string"}, "logprob": {"type": "number"}, "bytes": {"type": ["array", "null"], "items": {"type": "integer"}}},
}

_TOKEN_LOGPROB = {
    "type": "object",
    "required": ["token", "logprob", "bytes", "top_logprobs"],
    "properties": {**_TOP_LOGPROB["properties"], "top_logprobs": {"type": "array", "items": _TOP_LOGPROB}},
}

_CHAT_LOGPROBS = _nullable(
    {
        "type": "object",
        "properties": {"content": {"type": ["array", "null"], "items": _TOKEN_LOGPROB}, "refusal": {"type": ["array", "null"], "items": _TOKEN_LOGPROB}},
    }
)

_FINISH = {"anyOf": [{"enum": ["stop", "length"]}, {"type": "null"}]}

_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        **{name: {"type": "integer", "minimum": 0} for name in ("prompt_tokens", "completion_tokens", "total_tokens")},
        "prompt_tokens_details": {
            "type": "object",
            "properties": {"cached_tokens": {"type": "integer", "minimum": 0}},
            "description": "Present when an earlier request's kept cache held part of the prompt: how many of its tokens were not computed again.",
        },
    },
}

_HEAD = {
    "id": {"type": "string"},
    "created": {"type": "integer"},
    "model": {"type": "string"},
    "system_fingerprint": {"type": ["string", "null"]},
}

_CHAT_COMPLETION = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        **_HEAD,
        "object": {"const": "chat.completion"},
        "choices": {
            "type": "array",
            "minItems": 1,
            "maxItems": 1,
            "items": {
                "type": "object",
                "required": ["index", "message", "finish_reason", "logprobs"],
                "properties": {
                    "index": {"type": "integer"},
                    "message": {
                        "type": "object",
                        "required": ["role", "content"],
                        "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}, "refusal": {"type": "null"}},
                    },
                    "logprobs": _CHAT_LOGPROBS,
                    "finish_reason": {"enum": ["stop", "length"]},
                },
            },
        },
        "usage": _ref("Usage"),
    },
}

_CHAT_CHUNK = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "description": "One server-sent event 'data: {...}'. The stream ends with 'data: [DONE]'; an error after the stream started is one event holding an Error.",
    "properties": {
        **_HEAD,
        "object": {"const": "chat.completion.chunk"},
        "choices": {
            "type": "array",
            "maxItems": 1,
            "items": {
                "type": "object",
                "required": ["index", "delta", "finish_reason"],
                "properties": {
                    "index": {"type": "integer"},
                    "delta": {"type": "object", "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}},
                    "logprobs": _CHAT_LOGPROBS,
                    "finish_reason": _FINISH,
                },
            },
        },
        "usage": _nullable(_ref("Usage")),
    },
}

_LEGACY_LOGPROBS = _nullable(
    {
        "type": "object",
        "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
        "properties": {
            "tokens": {"type": "array", "items": {"type": "string"}},
            "token_logprobs": {"type": "array", "items": {"type": "number"}},
            "top_logprobs": {"type": "array", "items": {"type": "object", "additionalProperties": {"type": "number"}}},
            "text_offset": {"type": "array", "items": {"type": "integer"}},
        },
    }
)

_COMPLETION = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "description": "The response, or (streaming) one server-sent event; a stream ends with 'data: [DONE]'.",
    "properties": {
        **_HEAD,
        "object": {"const": "text_completion"},
        "choices": {
            "type": "array",
            "maxItems": 1,
            "items": {
                "type": "object",
                "required": ["index", "text", "finish_reason", "logprobs"],
                "properties": {"index": {"type": "integer"}, "text": {"type": "string"}, "logprobs": _LEGACY_LOGPROBS, "finish_reason": _FINISH},
            },
        },
        "usage": _nullable(_ref("Usage")),
    },
}

_MODEL = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by", "status"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"const": "skulk"},
        "status": {"type": "string", "examples": ["loading", "ready", "failed"], "description": "Extension: whether the model serves yet (loading, ready or failed)."},
    },
}

_EMBEDDINGS = {
    "type": "object",
    "required": ["object", "data", "model", "usage"],
    "properties": {
        "object": {"const": "list"},
        "model": {"type": "string"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["object", "index", "embedding"],
                "properties": {
                    "object": {"const": "embedding"},
                    "index": {"type": "integer"},
                    "embedding": {"anyOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string", "contentEncoding": "base64"}]},
                },
            },
        },
        "usage": {
            "type": "object",
            "required": ["prompt_tokens", "total_tokens"],
            "properties": {"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}},
        },
    },
}

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string", "description": "invalid_request_error, authentication_error or server_error."},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_HEALTH = {
    "type": "object",
    "required": ["status", "node_id"],
    "properties": {
        "status": {"const": "ok"},
        "node_id": {"type": "string"},
        "models": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Model id to status."},
    },
}


_OPTIONAL_MODEL = {"anyOf": [_ref("ModelId"), {"type": "null"}], "description": "Needed only when the node serves several models."}

_TOKENIZE_REQUEST = {
    "type": "object",
    "properties": {
        "model": _OPTIONAL_MODEL,
        "prompt": {"type": "string", "description": "Text to tokenize (special tokens such as <|im_end|> written in it are parsed)."},
        "messages": {"type": "array", "items": _ref("ChatMessage"), "minItems": 1, "description": "A chat, rendered with the model's template first."},
        "add_special_tokens": {"type": ["boolean", "null"], "description": "Add the model's BOS where it wants one (default true for a prompt, false for messages)."},
        "add_generation_prompt": {"type": ["boolean", "null"], "default": True, "description": "Messages: end with the assistant's turn opening."},
    },
    "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}],
}

_TOKENIZE = {
    "type": "object",
    "required": ["count", "max_model_len", "tokens"],
    "properties": {"count": {"type": "integer"}, "max_model_len": {"type": "integer"}, "tokens": {"type": "array", "items": {"type": "integer"}}},
}

_DETOKENIZE_REQUEST = {
    "type": "object",
    "required": ["tokens"],
    "properties": {"model": _OPTIONAL_MODEL, "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}}},
}

_TOKENIZER_INFO = {
    "type": "object",
    "required": ["model", "eos_token", "bos_token", "chat_template", "model_max_length", "vocab_size"],
    "properties": {
        "model": {"type": "string"},
        "tokenizer_class": {"type": "string"},
        "bos_token": {"type": ["string", "null"]},
        "eos_token": {"type": ["string", "null"]},
        "pad_token": {"type": ["string", "null"]},
        "chat_template": {"type": ["string", "null"]},
        "model_max_length": {"type": "integer", "description": "Positions per sequence on this node."},
        "vocab_size": {"type": "integer"},
    },
}


def _event(chunk: str) -> dict[str, Any]:
    """One server-sent event of a stream (Open API 3.1 has ``schema`` describe each event): its data
    is a chunk, the error that ends a failed stream, or ``[DONE]``."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"type": "string"},
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {"type": "string", "contentMediaType": JSON, "contentSchema": {"anyOf": [_ref(chunk), _ref("Error")]}},
                ]
            },
        },
    }


def _generation(summary: str, request: str, response: str, chunk: str, operation_id: str) -> dict[str, Any]:
    return {
        "post": {
            "operationId": operation_id,
            "summary": summary,
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref(request)}}},
            "responses": {
                "200": {
                    "description": "The completion, or with stream true a stream of server-sent events.",
                    "content": {JSON: {"schema": _ref(response)}, "text/event-stream": {"schema": _event(chunk)}},
                },
                **_errors(400, 401, 404, 408, 413, 500, 503),
            },
        }
    }


def openapi_document(model_ids: Sequence[str] = (), vocab_size: int | None = None) -> dict[str, Any]:
    """The document. ``model_ids`` (the node's models now) are the examples of every ``model``;
    ``vocab_size`` (the largest of their vocabularies, when known) bounds token ids."""
    from skulk_core import __version__

    model_id: dict[str, Any] = {"type": "string", "minLength": 1, "description": "A model id from GET /v1/models."}
    if model_ids:
        model_id["examples"] = list(model_ids)
    token_id: dict[str, Any] = {"type": "integer", "minimum": 0}
    if vocab_size:
        token_id["maximum"] = vocab_size - 1

    schemas = {
        "ModelId": model_id,
        "TokenIds": {"type": "array", "minItems": 1, "items": token_id, "description": "Token ids of the model's vocabulary."},
        "ChatMessage": _MESSAGE,
        "ResponseFormat": _RESPONSE_FORMAT,
        "ChatCompletionRequest": _CHAT_REQUEST,
        "ChatCompletion": _CHAT_COMPLETION,
        "ChatCompletionChunk": _CHAT_CHUNK,
        "CompletionRequest": _COMPLETION_REQUEST,
        "Completion": _COMPLETION,
        "EmbeddingRequest": _EMBEDDING_REQUEST,
        "EmbeddingList": _EMBEDDINGS,
        "Model": _MODEL,
        "ModelList": {"type": "object", "required": ["object", "data"], "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}}},
        "Usage": _USAGE,
        "Error": _ERROR,
        "Health": _HEALTH,
        "TokenizeRequest": _TOKENIZE_REQUEST,
        "Tokenize": _TOKENIZE,
        "DetokenizeRequest": _DETOKENIZE_REQUEST,
        "Detokenize": {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        "TokenizerInfo": _TOKENIZER_INFO,
    }
    model_parameter: dict[str, Any] = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    if model_ids:
        model_parameter["schema"]["examples"] = list(model_ids)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Skulk OpenAI-compatible API",
            "version": __version__,
            "description": "OpenAI's chat, completions, models and embeddings endpoints served by a Skulk node. Every error has OpenAI's shape {'error': {message, type, param, code}}.",
        },
        "servers": [{"url": "/"}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "Needed only when the node runs with --api-key."}},
            "schemas": schemas,
        },
        "security": [{}, {"bearer": []}],
        "paths": {
            "/v1/chat/completions": _generation("Create a chat completion", "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk", "createChatCompletion"),
            "/v1/completions": _generation("Create a text completion", "CompletionRequest", "Completion", "Completion", "createCompletion"),
            "/v1/embeddings": {
                "post": {
                    "operationId": "createEmbedding",
                    "summary": "Embed text or token ids (where the model's backend computes embeddings)",
                    "requestBody": {"required": True, "content": {JSON: {"schema": _ref("EmbeddingRequest")}}},
                    "responses": {"200": {"description": "One embedding per input.", "content": {JSON: {"schema": _ref("EmbeddingList")}}}, **_errors(400, 401, 404, 408, 413, 500, 503)},
                }
            },
            "/v1/models": {
                "get": {
                    "operationId": "listModels",
                    "summary": "The models this node serves, ready or loading",
                    "responses": {"200": {"description": "The models.", "content": {JSON: {"schema": _ref("ModelList")}}}, **_errors(401)},
                }
            },
            "/v1/models/{model}": {
                "get": {
                    "operationId": "retrieveModel",
                    "summary": "One model",
                    "parameters": [model_parameter],
                    "responses": {"200": {"description": "The model.", "content": {JSON: {"schema": _ref("Model")}}}, **_errors(401, 404)},
                }
            },
            "/health": {
                "get": {
                    "operationId": "health",
                    "summary": "Liveness of the node and the status of its models; never needs an API key",
                    "security": [{}],
                    "responses": {"200": {"description": "The node is up.", "content": {JSON: {"schema": _ref("Health")}}}},
                }
            },
            "/tokenize": {
                "post": {
                    "operationId": "tokenize",
                    "summary": "Token ids of a prompt or a chat, as the model tokenizes them (vLLM's endpoint)",
                    "requestBody": {"required": True, "content": {JSON: {"schema": _ref("TokenizeRequest")}}},
                    "responses": {"200": {"description": "The tokens.", "content": {JSON: {"schema": _ref("Tokenize")}}}, **_errors(400, 401, 404, 408, 413, 500, 503)},
                }
            },
            "/detokenize": {
                "post": {
                    "operationId": "detokenize",
                    "summary": "The text of token ids, control tokens spelled out (vLLM's endpoint)",
                    "requestBody": {"required": True, "content": {JSON: {"schema": _ref("DetokenizeRequest")}}},
                    "responses": {"200": {"description": "The text.", "content": {JSON: {"schema": _ref("Detokenize")}}}, **_errors(400, 401, 404, 408, 413, 500, 503)},
                }
            },
            "/tokenizer_info": {
                "get": {
                    "operationId": "tokenizerInfo",
                    "summary": "The model's special tokens, chat template and lengths (vLLM's endpoint)",
                    "parameters": [{"name": "model", "in": "query", "required": False, "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "The tokenizer.", "content": {JSON: {"schema": _ref("TokenizerInfo")}}}, **_errors(400, 401, 404, 500, 503)},
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {"200": {"description": "The OpenAPI document.", "content": {JSON: {"schema": {"type": "object"}}}}, **_errors(401)},
                }
            },
        },
    }
