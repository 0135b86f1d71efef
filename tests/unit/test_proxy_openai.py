"""The official ``openai`` client, unchanged, against the proxy (stand-in workers behind it)."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from proxy.testing import Cluster

MODEL = "standin-model"


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster(1, 1, models=[MODEL], api_key="client-key") as c:
        yield c


@pytest.fixture
def client(cluster: Cluster) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=cluster.url + "/v1", api_key="client-key", max_retries=0, timeout=20) as cl:
        yield cl


def test_completions_plain_and_streamed(client: openai.OpenAI, cluster: Cluster) -> None:
    plain = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=5)
    assert plain.choices[0].text == " w0 w1 w2 w3 w4"
    assert plain.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon", max_tokens=5, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert [r.body["kv_transfer_params"] for r in cluster.prefill[0].received] == [{"do_remote_decode": True}] * 2


def test_chat_plain_and_streamed(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                           max_completion_tokens=4)
    assert plain.choices[0].message.content == " w0 w1 w2 w3"
    stream = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                            max_completion_tokens=4, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == plain.choices[0].message.content


def test_request_id_header_is_returned(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="x", max_tokens=1,
                                                      extra_headers={"X-Request-Id": "oa-1"})
    assert raw.headers["x-request-id"] == "oa-1"
    assert raw.parse().choices[0].text == " w0"


def test_models_list(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_errors_map_to_openai_exceptions(client: openai.OpenAI, cluster: Cluster) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model="unknown", prompt="x")
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as br:
        client.chat.completions.create(model=MODEL, messages=[])
    assert br.value.param == "messages"
    with openai.OpenAI(base_url=cluster.url + "/v1", api_key="wrong", max_retries=0) as bad, \
            pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="x")


def test_stream_broken_midway_raises_in_the_client(client: openai.OpenAI, cluster: Cluster) -> None:
    cluster.decode[0].behaviour.break_after = 2
    got = []
    with pytest.raises(openai.APIError):
        for chunk in client.completions.create(model=MODEL, prompt="x", max_tokens=6, stream=True):
            got.append(chunk.choices[0].text)
    assert got == [" w0", " w1"]


def test_async_client(cluster: Cluster) -> None:
    import asyncio

    async def go() -> str:
        async with openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="client-key", max_retries=0) as cl:
            outs = await asyncio.gather(*(cl.completions.create(model=MODEL, prompt=str(i), max_tokens=3)
                                          for i in range(8)))
            return "".join(o.choices[0].text for o in outs)

    assert asyncio.run(go()) == " w0 w1 w2" * 8
