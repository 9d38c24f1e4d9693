"""The OpenAPI document against the real server: validated, then fuzzed with schemathesis (issue 16).

A threaded server on loopback serves ``/api/v1/openapi.json``; the document must be valid OpenAPI
3.0 (openapi-spec-validator), and every operation in it is fuzzed with schemathesis: requests built
from the document (valid ones, and invalid ones in negative mode) go to the real server, signed like
a real client signs them. The server must never answer 5xx, must answer only the status codes the
document lists, and every JSON body must match its documented schema.

Signing: the HMAC signature covers method, path with query, body hash, timestamp and a fresh nonce
(fl_common/crypto/signing.py), so it must be computed on the *final* prepared request. A
``requests`` auth handler runs exactly there (after the body is serialized), the same place
``fl_client.api.ServerApi._send`` signs. Admin routes get the admin bearer token instead.

Bounded: a few examples per operation (``FL_FUZZ_EXAMPLES``, default 8), derandomized, no
shrinking database, so the whole module takes about a minute on a loaded 2-core machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import requests

schemathesis = pytest.importorskip("schemathesis")
openapi_spec_validator = pytest.importorskip("openapi_spec_validator")

from hypothesis import HealthCheck, settings  # noqa: E402

from fl_client.api import ApiRefused  # noqa: E402
from fl_common.crypto import sign_request  # noqa: E402
from fl_common.crypto.signing import HEADER_SIGNATURE  # noqa: E402
from fl_common.protocol.rest import ENV_ADMIN_TOKEN, ENV_ENROLLMENT_TOKEN, PATH_MODEL, PATH_OPENAPI, PATH_TOKEN  # noqa: E402
from tests.e2e.harness import ScriptedClient, threaded_server, token_env  # noqa: E402
from tests.e2e.scripted_rounds import tiny_cfg  # noqa: E402

#: examples per operation and generation mode: enough to hit every documented refusal, few enough
#: to keep the module to about a minute on a shared machine
MAX_EXAMPLES = int(os.environ.get("FL_FUZZ_EXAMPLES", "8"))


class Federation:
    """A real server, one registered client whose keys sign the fuzzer's requests, and the admin token."""

    def __init__(self, url: str, env: dict[str, str], client: ScriptedClient) -> None:
        self.url, self.env, self.client = url, env, client


class SignedAuth(requests.auth.AuthBase):
    """Signs the final prepared request with the client's HMAC key and adds its bearer session token.

    A ``POST /api/v1/token`` the fuzzer makes renews the session token (the old one stops working),
    so a 200 from that route is read back into the client's credentials."""

    def __init__(self, client: ScriptedClient, bearer: bool) -> None:
        self.client, self.bearer = client, bearer

    def __call__(self, prepared: requests.PreparedRequest) -> requests.PreparedRequest:
        creds = self.client.api.creds
        assert creds is not None and prepared.method is not None
        if HEADER_SIGNATURE in prepared.headers:  # absent: schemathesis checks that an unsigned request is refused
            raw = prepared.body if isinstance(prepared.body, bytes) else (prepared.body or "").encode()
            prepared.headers.update(sign_request(prepared.method, prepared.path_url, raw, client_id=creds.client_id,
                                                 hmac_key=creds.keys.hmac_key))
        if self.bearer and "Authorization" in prepared.headers:  # likewise for a request without a token
            prepared.headers["Authorization"] = f"Bearer {creds.session_token}"
        prepared.register_hook("response", self._renewed)
        return prepared

    def _renewed(self, resp: requests.Response, **_: Any) -> requests.Response:
        creds = self.client.api.creds
        if (resp.request.method, resp.request.path_url, resp.status_code) == ("POST", PATH_TOKEN, 200) and creds is not None:
            data = resp.json()
            creds.session_token, creds.token_expires_at = data["session_token"], float(data["token_expires_at"])
        return resp


class AdminAuth(requests.auth.AuthBase):
    def __init__(self, token: str) -> None:
        self.token = token

    def __call__(self, prepared: requests.PreparedRequest) -> requests.PreparedRequest:
        if "Authorization" in prepared.headers:  # absent: schemathesis checks that a request without it is refused
            prepared.headers["Authorization"] = f"Bearer {self.token}"
        return prepared


def auth_for(case: Any, fed: Federation) -> requests.auth.AuthBase | None:
    """The credentials the document's ``security`` asks for on this operation (None: public)."""
    schemes = {name for requirement in case.operation.definition.raw.get("security", []) for name in requirement}
    if "admin" in schemes:
        return AdminAuth(fed.env[ENV_ADMIN_TOKEN])
    if "signature" in schemes:
        return SignedAuth(fed.client, bearer="session" in schemes)
    return None


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    env = token_env()
    cfg = tiny_cfg(num_clients=2, num_rounds=3)
    with threaded_server(cfg, tmp_path_factory.mktemp("fuzz") / "srv", env) as (url, _service):
        yield Federation(url, env, ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], "fuzzer"))


@pytest.fixture(scope="module")
def api_schema(federation: Federation) -> Any:
    loaded = schemathesis.openapi.from_url(federation.url + PATH_OPENAPI)
    loaded.config.generation.update(max_examples=MAX_EXAMPLES, deterministic=True, database="none")
    return loaded


schema = schemathesis.pytest.from_fixture("api_schema")


def test_the_served_document_is_valid_openapi(federation: Federation) -> None:
    doc = requests.get(federation.url + PATH_OPENAPI, timeout=10).json()
    openapi_spec_validator.validate(doc)
    assert doc["openapi"].startswith("3.0")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented(case: Any, federation: Federation) -> None:
    case.call_and_validate(auth=auth_for(case, federation), timeout=30,
                           excluded_checks=[schemathesis.checks.positive_data_acceptance])


def test_numbers_the_fuzzer_found_are_refused_not_500(federation: Federation) -> None:
    """Reproducers of what fuzzing found: a 23-digit round number reached SQLite (OverflowError, 500), and
    digits that ``str.isdigit`` accepts but ``int()`` does not ('²') were a 500 in three query parameters."""
    api, admin = federation.client.api, {"Authorization": f"Bearer {federation.env[ENV_ADMIN_TOKEN]}"}
    with pytest.raises(ApiRefused) as err:
        api.upload_update(10**22, b"x", "k-huge", encrypted=True)
    assert err.value.status == 404  # no route takes a round number that large
    with pytest.raises(ApiRefused) as err:
        api.secagg_send(10**22, 1, "advertise", b"x", encrypted=True)
    assert err.value.status == 404
    assert requests.get(f"{federation.url}/api/v1/audit?limit=%C2%B2", headers=admin, timeout=10).status_code == 400
    resp = requests.get(f"{federation.url}{PATH_MODEL}?version=%C2%B2", auth=SignedAuth(federation.client, bearer=True),
                        headers={HEADER_SIGNATURE: "-", "Authorization": "-"}, timeout=10)
    assert (resp.status_code, resp.json()["error"]) == (400, "bad_version")


def test_a_get_with_a_body_to_a_post_route_is_405_not_413(federation: Federation) -> None:
    """The body limit ran before routing, so a GET with a body to a POST-only route said 413."""
    resp = requests.get(f"{federation.url}/api/v1/register", data=b'{"a": 1}', timeout=10)
    assert resp.status_code == 405 and resp.headers["Allow"]
