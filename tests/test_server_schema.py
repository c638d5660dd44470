"""Property-based run against the server's own OpenAPI schema (schemathesis): every operation
gets generated inputs, valid and not; none may answer 5xx. The server runs with tight limits so
that the generated requests that are valid generate in a fraction of a second."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from server_process import serving

EXAMPLES = 25  # per operation: about 20 operations in well under a minute


server = serving("--max-steps", "2", "--max-side", "64", "--max-images", "2", "--max-body-mb", "1")


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_the_server_fail(case, server):
    response = case.call(timeout=120)
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text}"


def test_the_schema_documents_both_apis(server):
    import httpx
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/progress", "/sdapi/v1/interrupt",
                 "/sdapi/v1/samplers", "/sdapi/v1/sd-models", "/sdapi/v1/options", "/sdapi/v1/png-info",
                 "/api/v1/jobs", "/api/v1/jobs/{job_id}", "/api/v1/jobs/{job_id}/events",
                 "/api/v1/jobs/{job_id}/cancel", "/api/v1/jobs/{job_id}/images/{index}",
                 "/api/v1/jobs/{job_id}/result"):
        assert path in paths, path
    assert "text/event-stream" in paths["/api/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
