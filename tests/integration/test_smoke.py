from __future__ import annotations

from tests.fakes.upstream import FakeUpstream


async def test_json_roundtrip(make_proxy, fake: FakeUpstream) -> None:
    client = await make_proxy()
    body = b'{"model":  "gpt-4o-mini", "messages": [{"role":"user","content":"hi"}]}'
    resp = await client.post(
        "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 200, await resp.text()
    data = await resp.json()
    assert data["model"] == "gpt-4o-mini"
    assert fake.last.body == body
    assert fake.last.headers["authorization"] == "Bearer sk-upstream-secret"
    assert fake.last.path == "/v1/chat/completions"
