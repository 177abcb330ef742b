"""`/v1/embeddings` end to end: broker, the real all-MiniLM-L6-v2 embedding worker beside a tiny chat
worker, and the API, driven by the official `openai` client, LangChain and raw HTTP; every response
checked against OpenAI's schema, every vector against sentence-transformers' own `encode`."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys

import numpy as np
import openai
import pytest

from tests.helpers import TINY_MODEL, wait_for_models
from tests.openai_schema import validate
from tests.processes import ROOT, start_worker, stop
from tests.test_openai_api import Api, post
from worker.embedding_source import DEFAULT_EMBEDDING_MODEL_NAME, resolve_embedding_model

MODEL = DEFAULT_EMBEDDING_MODEL_NAME
TEXTS = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today.",
         "Paris is the capital of France, on the Seine.", "tokenbus serves models over ZeroMQ."]


@pytest.fixture(scope="module")
def embed_bus(bus):
    """The module's bus ('tiny', capacity 4) with an embedding worker beside it."""
    worker = start_worker(bus.address, None, "--task", "embed", "--max-batch", "16")
    try:
        asyncio.run(wait_for_models(bus.address, {MODEL}))
        yield bus
    finally:
        stop(worker)


@pytest.fixture(scope="module")
def api(embed_bus):
    server = Api(embed_bus.address).wait()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference():
    """sentence-transformers itself, on the same model folder: what every vector must equal."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_embedding_model(None).location, device="cpu")


def raw_embeddings(api: Api, **body) -> dict:
    """The JSON the server sent, checked against the spec (the openai client would decode base64 itself)."""
    status, answer = post(api.url + "/v1/embeddings", body)
    assert status == 200, answer
    if body.get("encoding_format") == "base64":  # the spec describes the float form only: check it decoded
        assert all(isinstance(item["embedding"], str) for item in answer["data"])
        decoded = [{**item, "embedding": np.frombuffer(base64.b64decode(item["embedding"]), "<f4").tolist()}
                   for item in answer["data"]]
        validate("CreateEmbeddingResponse", {**answer, "data": decoded})
    else:
        validate("CreateEmbeddingResponse", answer)
    return answer


def matrix(answer: dict) -> np.ndarray:
    return np.array([item["embedding"] for item in sorted(answer["data"], key=lambda item: item["index"])])


def test_vectors_equal_sentence_transformers_own(api, reference):
    expected = reference.encode(TEXTS)
    single = raw_embeddings(api, model=MODEL, input=TEXTS[0])
    assert single["model"] == MODEL and len(single["data"]) == 1
    np.testing.assert_allclose(matrix(single)[0], expected[0], atol=1e-5, rtol=0)
    batch = raw_embeddings(api, model=MODEL, input=TEXTS, user="someone")
    assert [item["index"] for item in batch["data"]] == list(range(len(TEXTS)))
    np.testing.assert_allclose(matrix(batch), expected, atol=1e-5, rtol=0)
    tokens = [len(reference.tokenizer(text)["input_ids"]) for text in TEXTS]  # special tokens included
    assert batch["usage"] == {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}


def test_meaning_a_guitar_is_closer_to_an_instrument_than_to_the_stock_market(api):
    vectors = matrix(raw_embeddings(api, model=MODEL, input=TEXTS[:3]))
    guitar, instrument, market = vectors
    assert guitar @ instrument > guitar @ market + 0.2  # unit vectors: dot products are cosines


def test_openai_client_single_batch_and_base64_decode_to_the_same_floats(api):
    client = api.client()
    floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert [len(item.embedding) for item in floats.data] == [384] * len(TEXTS)
    # The client asks for base64 by default and decodes it to floats itself.
    decoded = client.embeddings.create(model=MODEL, input=TEXTS)
    assert [item.embedding for item in decoded.data] == [item.embedding for item in floats.data]
    raw = raw_embeddings(api, model=MODEL, input=TEXTS, encoding_format="base64")
    for item, expected in zip(raw["data"], floats.data, strict=True):
        vector = np.frombuffer(base64.b64decode(item["embedding"]), "<f4")
        assert vector.tolist() == expected.embedding  # the same float32 values, bit for bit


def test_token_id_input_gives_the_texts_vectors(api, reference):
    ids = [reference.tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS[:2]]
    by_text = matrix(raw_embeddings(api, model=MODEL, input=TEXTS[:2]))
    by_ids = raw_embeddings(api, model=MODEL, input=ids)
    np.testing.assert_allclose(matrix(by_ids), by_text, atol=1e-6)
    one = api.client().embeddings.create(model=MODEL, input=ids[0])  # a single list of token ids
    np.testing.assert_allclose(one.data[0].embedding, by_text[0], atol=1e-6)
    assert one.usage.prompt_tokens == len(ids[0]) + 2  # [CLS] and [SEP]


def test_more_inputs_than_one_bus_request_holds_come_back_in_order(api, reference):
    texts = [f"sentence number {n}" for n in range(300)]
    answer = raw_embeddings(api, model=MODEL, input=texts)
    assert [item["index"] for item in answer["data"]] == list(range(300))
    picked = [0, 31, 32, 299]  # both sides of a bus request's edge
    np.testing.assert_allclose(matrix(answer)[picked], reference.encode([texts[n] for n in picked]), atol=1e-5)
    texts[200] = "word " * 300
    with pytest.raises(openai.BadRequestError) as caught:
        api.client().embeddings.create(model=MODEL, input=texts)
    assert "'input[200]' has 302 tokens" in caught.value.message  # counted in the call, not in its bus request


@pytest.mark.parametrize(("body", "status", "code", "words"), [
    ({"input": "hi", "dimensions": 64}, 400, None, "cannot shorten"),
    ({"input": "word " * 300}, 400, "context_length_exceeded", "more than the maximum of 256 tokens"),
    ({"input": ""}, 400, "invalid_value", "empty"),
    ({"input": [[1, 2], "three"]}, 400, "invalid_value", "token ids"),
    ({"input": [[10**6]]}, 400, None, "outside the vocabulary"),
    ({"input": "hi", "encoding_format": "int8"}, 400, "invalid_value", "encoding_format"),
    ({"input": "hi", "model": TINY_MODEL}, 400, None, "does not serve 'embed'"),
    ({"input": "hi", "model": "nope"}, 404, "model_not_found", "not served"),
])
def test_errors_are_openai_error_objects(api, body, status, code, words):
    client = api.client()
    with pytest.raises(openai.APIStatusError) as caught:
        client.embeddings.create(**{"model": MODEL, **body})
    error = caught.value
    assert error.status_code == status and error.code == code and words in error.message
    assert set(error.body) == {"message", "type", "param", "code"}


def test_a_chat_request_to_the_embedding_model_is_a_400_that_says_so(api):
    with pytest.raises(openai.BadRequestError) as caught:
        api.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert f"model '{MODEL}' does not serve 'generate' requests; it serves: embed" in caught.value.message


def test_models_lists_both_kinds(api):
    listed = api.client().models.with_raw_response.list().http_response.json()
    validate("ListModelsResponse", listed)
    assert {MODEL, TINY_MODEL} <= {model["id"] for model in listed["data"]}


def test_langchain_retrieval_over_the_server(api):
    from langchain_core.documents import Document
    from langchain_core.vectorstores import InMemoryVectorStore
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(model=MODEL, base_url=api.url + "/v1", api_key="none",
                                  check_embedding_ctx_length=False)  # else it downloads a tiktoken file
    store = InMemoryVectorStore(embeddings)
    store.add_documents([Document(page_content=text) for text in [
        "The Eiffel Tower is in Paris.", "Bananas are rich in potassium.", "Python is a programming language."]])
    [found] = store.similarity_search("Which fruit has a lot of potassium?", k=1)
    assert found.page_content == "Bananas are rich in potassium."


async def test_many_embeddings_beside_chat_streams_all_answered_chat_unharmed(api):
    client = openai.AsyncOpenAI(base_url=api.url + "/v1", api_key="none", max_retries=0, timeout=120)

    async def chat() -> tuple[str, int, str]:
        stream = await client.chat.completions.create(
            model=TINY_MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=24, temperature=0,
            stream=True, stream_options={"include_usage": True})
        text, finish, tokens = "", None, 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return text, tokens, finish

    async def embed(n: int) -> list[float]:
        answer = await client.embeddings.create(model=MODEL, input=[f"request {n}", TEXTS[n % len(TEXTS)]])
        return answer.data[1].embedding

    alone = await chat()
    results = await asyncio.gather(*(chat() for _ in range(4)), *(embed(n) for n in range(48)))
    await client.close()
    chats, vectors = results[:4], results[4:]
    assert all(result == alone for result in chats)  # greedy: the same text, length and ending as alone
    assert alone[1:] == (24, "length")
    first = np.array(vectors[0])
    assert all(np.allclose(vectors[n], vectors[n % len(TEXTS)], atol=1e-5) for n in range(48))
    assert first.shape == (384,)


def test_raw_embedding_client_from_the_protocol_page_works(embed_bus):
    """The page's EMBED example, run as written (only the address changed): pyzmq, msgpack, numpy."""
    page = (ROOT / "docs" / "protocol.md").read_text()
    example = page.split("### EMBED", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    example = example.replace("tcp://127.0.0.1:5555", embed_bus.address)
    output = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=60, cwd="/")
    assert output.returncode == 0, output.stderr
    assert "(2, 384)" in output.stdout
