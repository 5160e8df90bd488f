"""Embeddings (``LLM.embed``, ``/v1/embeddings``): the final hidden states pooled (last token or
mean) and unit length, equal to HF transformers' base model's ``last_hidden_state`` pooled the
same way (fp32, 1e-5), batched over inputs of different lengths; the server driven with the
official ``openai`` client (floats and base64), its errors OpenAI-shaped, and embeddings taken
between generation steps leaving generation as it was."""

import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F
import transformers

from mlx_serve import LLM, SamplingParams
from mlx_serve.server import build_app
from tests.serve.helpers import LiveServer

MODEL = "tiny-embed"
TEXTS = ["hello there", "w5 w9 w17 w3 w4 w8 w2", "be brief", "w40"]


def _saved(tmp_path, tiny_tokenizer, family):
    from mlx_core import build_model, get_preset, save_model

    torch.manual_seed(0)
    model = build_model(get_preset(family))
    return save_model(model, tmp_path / family, tokenizer=tiny_tokenizer)


def _hf_embeddings(directory, token_lists, pooling):
    hf = transformers.AutoModel.from_pretrained(directory).eval()
    out = []
    with torch.no_grad():
        for ids in token_lists:  # one at a time: no padding on HF's side
            hidden = hf(torch.tensor([ids])).last_hidden_state[0]
            out.append(hidden[-1] if pooling == "last" else hidden.mean(dim=0))
    return F.normalize(torch.stack(out), dim=-1)


@pytest.mark.hf_parity
# RoPE tables switching at 16 tokens: each input gets its own length's (the last one's is past)
@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2", "tiny-llama-dynamic-rope",
                                    "tiny-phi3-longrope"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_embeddings_equal_hf_hidden_states_pooled(tmp_path, tiny_tokenizer, family, pooling):
    directory = _saved(tmp_path, tiny_tokenizer, family)
    llm = LLM(directory, num_blocks=16, block_size=4, pooling=pooling)
    prompts = TEXTS + [[7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], list(range(20, 40))]
    outputs = llm.embed(prompts)
    assert [o.prompt_token_ids for o in outputs[:4]] == [tiny_tokenizer.encode(t) for t in TEXTS]
    got = torch.tensor([o.outputs.embedding for o in outputs])
    want = _hf_embeddings(directory, [o.prompt_token_ids for o in outputs], pooling)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(prompts)))
    single = llm.embed(TEXTS[1])[0].outputs.embedding  # alone: the same as in the batch
    torch.testing.assert_close(torch.tensor(single), got[1], atol=1e-6, rtol=0)


def test_bad_pooling_is_named():
    from mlx_serve import EngineConfig

    with pytest.raises(ValueError, match="unknown pooling 'cls'; choose one of: last, mean"):
        EngineConfig(pooling="cls")


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_tokenizer):
    """A server, and an offline LLM over the same weights as the reference (the served engine
    belongs to the server's thread)."""
    directory = _saved(tmp_path_factory.mktemp("embed"), tiny_tokenizer, "tiny-llama")
    options = dict(num_blocks=64, block_size=4, max_model_len=32)
    served_llm = LLM(directory, **options)
    server = LiveServer(build_app(served_llm.engine, MODEL))
    yield server, LLM(directory, **options), served_llm.engine
    server.stop()


def test_official_client_gets_the_engines_embeddings(served):
    server, llm, _ = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=30)
    want = np.array([o.outputs.embedding for o in llm.embed(TEXTS)], dtype=np.float32)
    response = client.embeddings.create(model=MODEL, input=TEXTS)  # the client asks for base64
    assert [d.index for d in response.data] == list(range(len(TEXTS)))
    np.testing.assert_array_equal(np.array([d.embedding for d in response.data], np.float32), want)
    tokens = sum(len(o.prompt_token_ids) for o in llm.embed(TEXTS))
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens
    floats = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, want[0], rtol=0, atol=1e-7)
    ids = client.embeddings.create(model=MODEL, input=[[5, 9, 17], [3]])
    assert len(ids.data) == 2 and ids.usage.prompt_tokens == 4


def test_bad_embedding_requests_are_openai_errors(served):
    server, llm, engine = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=30)
    hidden = llm.engine.model.config.hidden_size
    with pytest.raises(openai.BadRequestError, match=f"have {hidden} dimensions"):
        client.embeddings.create(model=MODEL, input="hello", dimensions=8)
    with pytest.raises(openai.BadRequestError, match="has 40 tokens; this model takes at most 32"):
        client.embeddings.create(model=MODEL, input=[list(range(1, 41))])
    with pytest.raises(openai.BadRequestError, match="the input is empty"):
        client.embeddings.create(model=MODEL, input=[])
    with pytest.raises(openai.BadRequestError, match=r"token ids must be in \[0, "):
        client.embeddings.create(model=MODEL, input=[[10**6]])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.embeddings.create(model="other", input="hello")
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_embeddings_between_generation_steps_leave_generation_as_it_was(served):
    """An embedding request runs on the engine thread between steps of a streamed completion;
    the completion's greedy tokens equal the same completion run alone."""
    server, llm, _ = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=30)
    params = dict(model=MODEL, prompt="hello there w5", max_tokens=12, temperature=0)
    alone = client.completions.create(**params).choices[0].text
    stream = client.completions.create(**params, stream=True)
    pieces = [next(iter(stream)).choices[0].text]
    vectors = client.embeddings.create(model=MODEL, input=TEXTS).data
    pieces += [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert "".join(pieces) == alone and len(vectors) == len(TEXTS)
    greedy = llm.generate(["hello there w5"], SamplingParams(temperature=0, max_tokens=12))
    assert greedy[0].outputs[0].text == alone  # the offline engine over the same weights
