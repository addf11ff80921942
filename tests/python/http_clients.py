"""odmoed's HTTP APIs driven by the official `openai` and `anthropic` packages.

Usage: http_clients.py PHASE BASE_URL KEY MODEL [UNCACHED_BASE_URL UNCACHED_KEY]

Phases (each prints one JSON object of what it saw on its last line; a failed check raises):
  apis        chat, completion and messages, streamed and not, errors, tools
  apis_without_tools  the same without tools (for templates that render none)
  prefix      a conversation sent twice, the second time one turn longer
  cancel      a stream dropped after a few chunks
  concurrent  16 chat requests at once
  thinking    Anthropic's thinking blocks, asked for and not, streamed and not, sent back
"""

import json
import sys
import threading

import anthropic
import openai

phase, base, key, model = sys.argv[1:5]
uncached_base, uncached_key = (sys.argv[5], sys.argv[6]) if len(sys.argv) > 6 else (None, None)

oa = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)
an = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=120)

SYSTEM = "You are terse."
QUESTION = "Name a colour."
# The anthropic package no longer sends sampling fields itself; odmoed reads them.
GREEDY = {"temperature": 0}
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
TOOL_ROUND_TRIP = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


def expect_error(kind, status, call):
    try:
        call()
    except kind as error:
        assert error.status_code == status, (error.status_code, error)
        return error
    raise AssertionError(f"expected {kind.__name__} ({status})")


def apis(tools=True):
    report = {}
    assert [m.id for m in oa.models.list()] == [model]

    chat = oa.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length"), choice.finish_reason
    assert chat.usage.completion_tokens >= 1
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    report["chat"] = {"text": choice.message.content, "prompt_tokens": chat.usage.prompt_tokens}

    pieces, finish, usage = [], None, None
    for chunk in oa.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ):
        usage = chunk.usage or usage
        for delta in chunk.choices:
            pieces.append(delta.delta.content or "")
            finish = delta.finish_reason or finish
    assert "".join(pieces) == choice.message.content, (pieces, choice.message.content)
    assert finish == choice.finish_reason
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens

    completion = oa.completions.create(
        model=model, prompt="The quick brown fox", max_tokens=8, temperature=0
    )
    text = completion.choices[0].text
    assert text and completion.usage.completion_tokens >= 1
    streamed = "".join(
        c.choices[0].text
        for c in oa.completions.create(
            model=model, prompt="The quick brown fox", max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == text, (streamed, text)
    report["completion"] = text

    message = an.messages.create(
        model=model, max_tokens=12, system=SYSTEM, extra_body=GREEDY,
        messages=[{"role": "user", "content": QUESTION}],
    )
    assert message.role == "assistant" and message.content[0].type == "text"
    assert message.stop_reason in ("end_turn", "max_tokens"), message.stop_reason
    # The same conversation through the same template: the same greedy reply.
    assert message.content[0].text == choice.message.content
    with an.messages.stream(
        model=model, max_tokens=12, system=SYSTEM, extra_body=GREEDY,
        messages=[{"role": "user", "content": QUESTION}],
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == message.content[0].text
    assert final.usage.output_tokens == message.usage.output_tokens
    assert final.stop_reason == message.stop_reason

    if tools:
        report.update(tool_round_trips())
    errors()
    return report


def tool_round_trips():
    report = {}
    with_tools = oa.chat.completions.create(
        model=model, messages=TOOL_ROUND_TRIP, tools=TOOLS, max_tokens=8, temperature=0
    )
    without = oa.chat.completions.create(
        model=model, messages=TOOL_ROUND_TRIP, tools=TOOLS, tool_choice="none",
        max_tokens=8, temperature=0,
    )
    assert with_tools.usage.prompt_tokens > without.usage.prompt_tokens
    report["tools_prompt_tokens"] = with_tools.usage.prompt_tokens
    report["no_tools_prompt_tokens"] = without.usage.prompt_tokens

    tool_reply = an.messages.create(
        model=model, max_tokens=8, extra_body=GREEDY,
        tools=[{
            "name": "get_weather",
            "description": "The weather in a city",
            "input_schema": TOOLS[0]["function"]["parameters"],
        }],
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny, 21 C"},
            ]},
        ],
    )
    usage = tool_reply.usage
    report["anthropic_tools_prompt_tokens"] = usage.input_tokens + usage.cache_read_input_tokens
    return report


def errors():

    bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
    expect_error(openai.AuthenticationError, 401, lambda: bad.models.list())
    bad = anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0)
    expect_error(anthropic.AuthenticationError, 401, lambda: bad.messages.create(
        model=model, max_tokens=4, messages=[{"role": "user", "content": "hi"}]))
    huge = [{"role": "user", "content": "x" * (200 * 1024)}]
    expect_error(openai.APIStatusError, 413, lambda: oa.chat.completions.create(
        model=model, messages=huge, max_tokens=1))
    expect_error(openai.NotFoundError, 404, lambda: oa.chat.completions.create(
        model="no-such-model", messages=MESSAGES, max_tokens=1))
    error = expect_error(openai.BadRequestError, 400, lambda: oa.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=1, temperature=-1))
    assert "temperature" in str(error), error
    expect_error(anthropic.BadRequestError, 400, lambda: an.messages.create(
        model=model, max_tokens=4, messages=[{"role": "robot", "content": "hi"}]))


def conversation(turns):
    messages = [{"role": "system", "content": SYSTEM}]
    for question, answer in turns:
        messages.append({"role": "user", "content": question})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


def prefix():
    first_turn = "Tell me about the quick brown fox that jumps over the lazy dog, at length. " * 8
    first = oa.chat.completions.create(
        model=model, messages=conversation([(first_turn, None)]), max_tokens=16, temperature=0
    )
    answer = first.choices[0].message.content
    extended = conversation([(first_turn, answer), ("And then?", None)])
    second = oa.chat.completions.create(model=model, messages=extended, max_tokens=16, temperature=0)
    uncached = openai.OpenAI(base_url=uncached_base + "/v1", api_key=uncached_key, max_retries=0, timeout=120)
    fresh = uncached.chat.completions.create(
        model=model, messages=extended, max_tokens=16, temperature=0
    )
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert second.choices[0].message.content == fresh.choices[0].message.content
    return {
        "prompt_tokens": second.usage.prompt_tokens,
        "cached_tokens": second.usage.prompt_tokens_details.cached_tokens,
        "reply": second.choices[0].message.content,
    }


def cancel():
    received = 0
    stream = oa.chat.completions.create(
        model=model, messages=MESSAGES, stream=True, temperature=0, max_tokens=3000
    )
    for _ in stream:
        received += 1
        if received >= 4:
            break
    # Closing the response drops the connection mid-stream.
    stream.close()
    return {"chunks": received}


def concurrent():
    results, errors = [], []

    def ask(index):
        try:
            reply = oa.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": f"Question number {index}"}],
                max_tokens=8, temperature=0,
            )
            results.append(reply.usage.completion_tokens)
        except Exception as error:  # every failure is reported, not just the first
            errors.append(repr(error))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return {"answered": len(results)}


def thinking():
    """A model whose every word is reasoning (its template opens `<think>`)."""
    asked = dict(
        model=model, max_tokens=12, extra_body=GREEDY,
        messages=[{"role": "user", "content": QUESTION}],
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    message = an.messages.create(**asked)
    kinds = [block.type for block in message.content]
    assert kinds == ["thinking", "text"], kinds
    thought = message.content[0]
    assert thought.thinking and thought.signature == "", thought
    assert message.content[1].text == ""
    with an.messages.stream(**asked) as stream:
        deltas = [
            event.delta.thinking for event in stream
            if event.type == "content_block_delta" and event.delta.type == "thinking_delta"
        ]
        final = stream.get_final_message()
    assert "".join(deltas) == thought.thinking, (deltas, thought.thinking)
    assert [block.type for block in final.content] == kinds
    assert final.content[0].thinking == thought.thinking
    # Not asked: the answer alone.
    unasked = an.messages.create(
        model=model, max_tokens=12, extra_body=GREEDY,
        messages=[{"role": "user", "content": QUESTION}],
    )
    assert [block.type for block in unasked.content] == ["text"], unasked.content
    # The reply sent back as the client keeps it, thinking block and all.
    again = an.messages.create(
        model=model, max_tokens=4, extra_body=GREEDY,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": message.content},
            {"role": "user", "content": "Another."},
        ],
    )
    assert again.content[0].type == "thinking", again.content
    return {"thinking": thought.thinking}


PHASES = {
    "apis": apis,
    "apis_without_tools": lambda: apis(tools=False),
    "prefix": prefix,
    "thinking": thinking,
    "cancel": cancel,
    "concurrent": concurrent,
}
print(json.dumps(PHASES[phase]()))
