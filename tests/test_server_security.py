"""The server's locks and limits: API key, body size, image size, Host header, CORS, and the
defaults that keep a fresh `serve` private."""
from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pocketdiffusion.cli import build_parser
from pocketdiffusion.server import create_app
from pocketdiffusion.server.settings import ServerSettings
from server_process import b64_png, serving

KEY = "s3cret-key"


server = serving("--api-key", KEY, "--max-body-mb", "1", "--max-side", "256")


@pytest.fixture(scope="module")
def client(server):
    with server.client(headers={"X-API-Key": KEY}) as client:
        yield client


@pytest.mark.parametrize("path", ["/api/v1/server", "/sdapi/v1/samplers", "/sdapi/v1/progress"])
def test_every_api_request_needs_the_key(server, path):
    with httpx.Client(base_url=server.url) as anonymous:
        missing = anonymous.get(path)
        assert missing.status_code == 401 and "API key" in missing.json()["detail"]
        assert anonymous.get(path, headers={"X-API-Key": KEY[:-1] + "X"}).status_code == 401
        assert anonymous.get(path, headers={"X-API-Key": KEY}).status_code == 200
        assert anonymous.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert anonymous.post("/sdapi/v1/txt2img", json={"steps": 1}).status_code == 401


def test_the_editor_page_loads_without_the_key_and_forbids_outside_scripts(server):
    with httpx.Client(base_url=server.url) as anonymous:
        page = anonymous.get("/")
        assert page.status_code == 200 and "<canvas" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        script = anonymous.get("/static/editor.js")
        assert script.status_code == 200 and "default-src 'self'" in script.headers["content-security-policy"]


def test_the_schema_documents_the_key(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    assert "APIKeyHeader" in schema["components"]["securitySchemes"]


def test_a_body_over_the_limit_is_413_before_it_is_read(client):
    response = client.post("/sdapi/v1/png-info", json={"image": "A" * (1024 * 1024 + 10)})
    assert response.status_code == 413 and "1048576 bytes" in response.json()["detail"]


def test_a_chunked_body_over_the_limit_is_413(client):
    def chunks():
        yield b'{"image": "'
        for _ in range(40):
            yield b"A" * 32768
        yield b'"}'
    response = client.post("/sdapi/v1/png-info", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_images_and_sizes_over_the_limit_are_refused(client):
    big = b64_png(Image.new("RGB", (300, 64)))
    response = client.post("/sdapi/v1/img2img", json={"init_images": [big], "steps": 1})
    assert response.status_code == 413 and "300x64" in response.json()["detail"] and "256" in response.json()["detail"]
    response = client.post("/api/v1/jobs", json={"width": 512, "steps": 1})
    assert response.status_code == 400 and "256" in response.json()["detail"]


def test_a_foreign_host_header_is_refused(server):
    # What a DNS-rebinding page would send: our address under its own name.
    response = httpx.get(server.url + "/api/v1/server", headers={"Host": "evil.example", "X-API-Key": KEY})
    assert response.status_code == 400


def test_cors_is_closed_by_default(server):
    origin = {"Origin": "http://evil.example", "X-API-Key": KEY}
    response = httpx.get(server.url + "/sdapi/v1/samplers", headers=origin)
    assert "access-control-allow-origin" not in response.headers
    preflight = httpx.options(server.url + "/sdapi/v1/txt2img",
                              headers=origin | {"Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_opens_to_the_named_origins_only():
    app = create_app(ServerSettings(cors_origins=["http://localhost:3000"]))
    with TestClient(app, base_url="http://127.0.0.1") as client:  # the context runs the lifespan
        allowed = client.get("/sdapi/v1/samplers", headers={"Origin": "http://localhost:3000"})
        assert allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = client.get("/sdapi/v1/samplers", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_serve_defaults_to_loopback_port_7860_no_key():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.api_key, args.cors_origin) == ("127.0.0.1", 7860, None, None)
    assert ServerSettings().host == "127.0.0.1"
