"""Tool calling on the chat endpoint: the Hermes and Llama-3-JSON parsers, the prompt for
templates with and without tool support, ``tool_choice`` required / named constrained to calls
whose arguments fit the function's schema (through the official client, streamed and not),
conversations with tool results, and the errors."""

import json

import openai
import pytest

from mlx_core.tokenizer import Tokenizer
from mlx_serve import LLM
from mlx_serve.server import build_app
from mlx_serve.tools import call_constraint, held_back, parse_tool_calls, prompt_messages
from tests.serve.helpers import LiveServer, byte_level_model_dir

MODEL = "tiny-tools"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["c", "f"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False,
                                       "required": ["zone"],
                                       "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def test_hermes_calls_and_the_content_around_them():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>')
    content, calls = parse_tool_calls(text, "hermes")
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert calls[0].id.startswith("call_") and calls[0].id != calls[1].id
    assert parse_tool_calls("no calls here", "hermes") == ("no calls here", [])
    broken = "<tool_call>{not json}</tool_call>"
    assert parse_tool_calls(broken, "hermes") == (broken, [])


def test_llama3_json_calls():
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; ' \
           '{"name": "get_time", "parameters": {"zone": "UTC"}}'
    content, calls = parse_tool_calls(text, "llama3_json")
    assert content is None and [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Oslo"}
    assert parse_tool_calls("The answer is 4.", "llama3_json") == ("The answer is 4.", [])
    assert parse_tool_calls('{"not": "a call"}', "llama3_json") == ('{"not": "a call"}', [])


def test_streaming_holds_back_what_may_be_a_call():
    assert held_back("Sure. <tool_", "hermes") == len("<tool_")
    assert held_back("Sure. <tool_call>\n{", "hermes") == len("<tool_call>\n{")
    assert held_back("Sure.", "hermes") == 0
    assert held_back('  {"name"', "llama3_json") == len('  {"name"')
    assert held_back("The", "llama3_json") == 0


def test_templates_without_tool_support_get_the_tools_and_the_turns_as_text():
    messages = [{"role": "system", "content": "Be brief."}, *ASK,
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18}'}]
    out, tools = prompt_messages(messages, [WEATHER], reads_tools=False)
    assert tools is None and [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.") and '"get_weather"' in out[0]["content"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in out[2]["content"]
    assert out[3]["content"] == '<tool_response>\n{"temp": 18}\n</tool_response>'
    same, passed = prompt_messages(messages, [WEATHER], reads_tools=True)
    assert same is messages and passed == [WEATHER]


def test_a_template_that_reads_tools_gets_them(tiny_tokenizer):
    import copy

    hf = copy.deepcopy(tiny_tokenizer)
    hf.chat_template = ("{% if tools %}TOOLS {% for t in tools %}{{ t.function.name }} {% endfor %}"
                        "{% endif %}{% for m in messages %}{{ m['content'] }} {% endfor %}")
    text = Tokenizer(hf).apply_chat_template(ASK, tools=[WEATHER, TIME], tokenize=False)
    assert text.startswith("TOOLS get_weather get_time")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    directory = byte_level_model_dir(tmp_path_factory.mktemp("tools"))
    llm = LLM(directory, num_blocks=256, block_size=16)
    server = LiveServer(build_app(llm.engine, MODEL))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    yield client, directory
    server.stop()


def _arguments_fit(call, tool) -> None:
    properties = tool["function"]["parameters"]["properties"]
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == set(properties)
    assert all(arguments[k] in properties[k]["enum"] for k in arguments)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_and_named_choices_give_calls_that_fit_their_schemas(served, seed):
    client, _ = served
    common = dict(model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=200,
                  temperature=1.0, seed=seed, parallel_tool_calls=False)
    reply = client.chat.completions.create(tool_choice="required", **common).choices[0]
    assert reply.finish_reason == "tool_calls" and len(reply.message.tool_calls) == 1
    call = reply.message.tool_calls[0]
    _arguments_fit(call, {"get_weather": WEATHER, "get_time": TIME}[call.function.name])
    named = client.chat.completions.create(
        tool_choice={"type": "function", "function": {"name": "get_time"}}, **common).choices[0]
    assert [c.function.name for c in named.message.tool_calls] == ["get_time"]
    _arguments_fit(named.message.tool_calls[0], TIME)


def test_streamed_calls_assemble_to_the_unstreamed_ones(served):
    client, _ = served
    common = dict(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                  max_tokens=200, temperature=0, parallel_tool_calls=False)
    whole = client.chat.completions.create(**common).choices[0].message.tool_calls
    calls, finish = {}, None
    for chunk in client.chat.completions.create(**common, stream=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole]


def test_a_conversation_with_a_tool_result_continues(served):
    client, _ = served
    call = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=200,
        temperature=0, parallel_tool_calls=False).choices[0].message.tool_calls[0]
    turns = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                   {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 18}'}]
    reply = client.chat.completions.create(model=MODEL, messages=turns, tools=[WEATHER],
                                           max_tokens=8, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_bad_tool_requests_are_400s(served):
    client, _ = served
    with pytest.raises(openai.BadRequestError, match="tool_choice needs tools"):
        client.chat.completions.create(model=MODEL, messages=ASK, tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="names the function 'nope'"):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER],
                                       tool_choice={"type": "function",
                                                    "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="both constrain the output"):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER],
                                       tool_choice="required",
                                       response_format={"type": "json_object"})


def test_the_grammar_admits_only_allowed_calls(served):
    import llguidance
    from llguidance import LLMatcher
    from transformers import AutoTokenizer

    _, directory = served
    hf = AutoTokenizer.from_pretrained(directory)
    tokenizer = llguidance.hf.from_tokenizer(hf)
    grammar = LLMatcher.grammar_from_lark(call_constraint([TIME], "hermes", False)["grammar"])
    good = '<tool_call>\n{"name":"get_time","arguments":{"zone":"UTC"}}\n</tool_call>'
    bad = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris","unit":"c"}}\n</tool_call>'
    for text, accepted in ((good, True), (bad, False)):
        matcher = LLMatcher(tokenizer, grammar)
        ids = hf.encode(text, add_special_tokens=False)
        assert (matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()) == accepted


@pytest.mark.builtin_model
@pytest.mark.slow
def test_builtin_model_calls_the_weather_tool_for_paris():
    """SmolLM2's template has no tools: they reach it in the system message, and the required
    call comes back constrained to the function's schema, naming Paris."""
    llm = LLM("smollm2-135m-instruct", kv_cache_memory="256MiB")
    server = LiveServer(build_app(llm.engine, "smollm2"))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                       "properties": {"city": {"type": "string"}}}}}
    try:
        reply = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What's the weather in Paris?"}],
            tools=[weather, TIME], tool_choice="required", parallel_tool_calls=False,
            max_tokens=48, temperature=0).choices[0]
    finally:
        server.stop()
    assert reply.finish_reason == "tool_calls"
    call = reply.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
