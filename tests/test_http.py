"""The node's HTTP dispatcher on a real socket: builtin routes, errors, the API key, plugin routes and
a plugin-mounted ASGI app."""

from __future__ import annotations

import httpx
import pytest

import skulk_core

ROUTES_AND_APP = """
import json

from skulk_core import hookimpl
from skulk_core.http import HttpResponse


async def echo_app(scope, receive, send):
    # a bare ASGI app, as Quart or Starlette would be
    body = json.dumps({"app": "echo", "path": scope["path"], "method": scope["method"]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


async def inner_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"inner"})


@hookimpl
def skulk_register_http(registry, node):
    async def hello(request):
        return HttpResponse(200, {"hello": request.query.get("name", "world"), "node_id": node.node_id})

    async def add(request):
        payload = request.json()
        return HttpResponse(201, {"sum": payload["a"] + payload["b"]}, headers={"x-skulk-test": "yes"})

    async def fails(request):
        raise RuntimeError("a bug in a plugin")

    async def text(request):
        return HttpResponse(200, b"plain bytes", content_type="text/plain")

    registry.route("GET", "/v1/hello", hello)
    registry.route("POST", "/v1/add", add)
    registry.route("GET", "/v1/fails", fails)
    registry.route("GET", "/echo/exact", text)
    registry.mount("/echo", echo_app)
    registry.mount("/echo/inner", inner_app)
"""


@pytest.fixture
def plugin_node(make_skulk_node, write_plugin):
    return make_skulk_node(plugins=[str(write_plugin("routes_and_app", ROUTES_AND_APP))])


@pytest.fixture
def client(plugin_node):
    with httpx.Client(base_url=plugin_node.api_url, timeout=10) as client:
        yield client


def assert_error(response: httpx.Response, status: int, type_: str) -> dict:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_ and body["error"]["message"]
    return body["error"]


# -- builtin routes --------------------------------------------------------------------------


def test_health_node_id_and_node(skulk_node):
    assert skulk_node.api_url.startswith("http://127.0.0.1:")
    with httpx.Client(base_url=skulk_node.api_url, timeout=10) as client:
        health = client.get("/health").json()
        assert (health["status"], health["node_id"]) == ("ok", skulk_node.node_id)  # later issues add keys
        assert client.get("/node_id").json() == skulk_node.node_id
        info = client.get("/node").json()
    assert info["node_id"] == skulk_node.node_id
    assert info["name"] == skulk_node.name
    assert info["version"] == skulk_core.__version__
    assert info["uptime_s"] >= 0
    assert [p["name"] for p in info["plugins"]] == skulk_node.plugins.names()
    assert {"name": "http-core", "source": "builtin", "distribution": "skulk", "version": skulk_core.__version__} in info["plugins"]


def test_head_is_answered_by_the_get_route(skulk_node):
    with httpx.Client(base_url=skulk_node.api_url, timeout=10) as client:
        response = client.head("/health")
    assert response.status_code == 200


# -- errors ----------------------------------------------------------------------------------


def test_unknown_path_is_a_json_404(client):
    error = assert_error(client.get("/v1/nothing-here"), 404, "invalid_request_error")
    assert error["message"] == "no such endpoint: GET /v1/nothing-here"
    assert error["code"] == "not_found"


def test_wrong_method_is_a_json_405_with_allow(client):
    response = client.post("/health", json={})
    error = assert_error(response, 405, "invalid_request_error")
    assert response.headers["allow"] == "GET"
    assert "POST is not allowed on /health; use GET" == error["message"]


def test_bad_json_is_a_400_and_a_failing_route_a_500(client):
    error = assert_error(client.post("/v1/add", content=b"{not json"), 400, "invalid_request_error")
    assert "not valid JSON" in error["message"]
    error = assert_error(client.get("/v1/fails"), 500, "server_error")
    assert "a bug in a plugin" not in error["message"]  # the details go to the log, not the client


# -- plugin routes and apps ------------------------------------------------------------------


def test_plugin_routes(client, plugin_node):
    assert client.get("/v1/hello", params={"name": "skulk"}).json() == {"hello": "skulk", "node_id": plugin_node.node_id}
    response = client.post("/v1/add", json={"a": 2, "b": 3})
    assert (response.status_code, response.json(), response.headers["x-skulk-test"]) == (201, {"sum": 5}, "yes")


def test_plugin_mounted_asgi_app(client):
    # the mounted app sees the whole path
    assert client.get("/echo").json() == {"app": "echo", "path": "/echo", "method": "GET"}
    assert client.delete("/echo/a/b").json() == {"app": "echo", "path": "/echo/a/b", "method": "DELETE"}
    # the longest prefix wins among mounts, and exact routes win over mounts
    assert client.get("/echo/inner/x").text == "inner"
    response = client.get("/echo/exact")
    assert (response.text, response.headers["content-type"]) == ("plain bytes", "text/plain")
    # a prefix matches whole path segments only
    assert client.get("/echoes").status_code == 404


def test_mount_prefix_must_be_absolute(write_plugin, tmp_path):
    from skulk_core import PluginError
    from skulk_core.config import ConfigLoader
    from skulk_core.node import build_node

    path = write_plugin("relative_mount", """
        from skulk_core import hookimpl

        @hookimpl
        def skulk_register_http(registry, node):
            registry.mount("v1", object())
    """)
    node = build_node(ConfigLoader(env={}, cli={"node": {"data_dir": str(tmp_path)}}), plugins=[str(path)], autoload=False)
    with pytest.raises(PluginError, match="plugin 'relative_mount': mount prefix 'v1' must start with '/'"):
        node.plugins.http(node)


# -- API key ---------------------------------------------------------------------------------


def test_api_key(make_skulk_node, write_plugin):
    node = make_skulk_node(plugins=[str(write_plugin("routes_and_app", ROUTES_AND_APP))], sections={"api": {"key": "s3cret"}})
    with httpx.Client(base_url=node.api_url, timeout=10) as client:
        assert client.get("/health").status_code == 200  # stays open, for load balancers and probes
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic s3cret"}):
            for path in ("/node", "/v1/hello", "/echo/x", "/nothing"):
                response = client.get(path, headers=headers)
                error = assert_error(response, 401, "authentication_error")
                assert error["code"] == "invalid_api_key"
                assert response.headers["www-authenticate"] == "Bearer"
        good = {"authorization": "Bearer s3cret"}
        assert client.get("/node", headers=good).json()["node_id"] == node.node_id
        assert client.get("/echo/x", headers=good).json()["app"] == "echo"
        assert client.get("/nothing", headers=good).status_code == 404
