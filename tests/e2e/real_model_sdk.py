"""End-to-end checks of a running Tessera server on the real instruct model (Qwen2.5-Coder 0.5B
Instruct) through the official `openai` Python SDK: chat that makes sense, tool calls (auto,
required, named, streamed, two tools, the result sent back, no call when none is needed),
structured outputs (a Pydantic model through `parse`, `guided_choice`), and the learning loop
(feedback pairs train an adapter in the background, which then answers what it was taught).

Usage: python3 real_model_sdk.py BASE_URL MODEL_ID
The server must run with a small `--train-after` (at most the number of pairs sent below, 24) so
the feedback starts a job on its own. Every check runs (a failed one does not stop the others);
the script exits non-zero, naming each failed check, if anything is off. Each section prints its
wall time.
"""
import json
import sys
import time
import traceback
import urllib.error
import urllib.request

import openai
import pydantic

base_url, model = sys.argv[1], sys.argv[2]
root = base_url.removesuffix("/v1")

# Wait for the server to come up (it builds the grammar vocabulary before it listens).
for _ in range(1200):
    try:
        with urllib.request.urlopen(root + "/health", timeout=2) as r:
            if r.status == 200:
                break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("server never became healthy")

client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
failures = []
timings = []


def check(name, condition, detail=""):
    if condition:
        print(f"ok: {name}", flush=True)
    else:
        failures.append(name)
        print(f"FAILED: {name} {detail}", flush=True)
    return bool(condition)


def section(title):
    """Runs the decorated function at once as a timed section; an exception fails the section."""
    def run(body):
        print(f"\n== {title}", flush=True)
        started = time.monotonic()
        try:
            body()
        except Exception as e:  # noqa: BLE001 - any error is this section's failure, the others still run
            traceback.print_exc()
            check(f"{title}: ran without an error", False, repr(e))
        elapsed = time.monotonic() - started
        timings.append((title, elapsed))
        print(f"-- {title}: {elapsed:.1f} s", flush=True)
    return run


def api(method, path, body=None, content_type="application/json"):
    """A route the SDK has no method for; returns (status, JSON body)."""
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(root + path, data=data, method=method,
                                     headers={"Content-Type": content_type} if data is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")


def chat(messages, **kwargs):
    kwargs.setdefault("model", model)
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 64)
    return client.chat.completions.create(messages=messages, **kwargs)


def user(text):
    return [{"role": "user", "content": text}]


def arguments_of(call):
    try:
        return json.loads(call.function.arguments)
    except (TypeError, ValueError):
        return None


def streamed_calls(stream):
    """The tool calls a stream's deltas assemble into (by index), its text and its finish_reason."""
    calls, text, finish = {}, [], None
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                text.append(choice.delta.content)
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"ids": [], "name": None, "arguments": ""})
                if delta.id:
                    call["ids"].append(delta.id)
                if delta.function is not None:
                    call["name"] = delta.function.name or call["name"]
                    call["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    return [calls[i] for i in sorted(calls)], "".join(text), finish


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "description": "The city's name, e.g. Paris"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the current local time in a city.",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "description": "The city's name, e.g. Tokyo"}},
                   "required": ["city"]}}}
WEATHER_QUESTION = user("What is the weather like in Tokyo right now?")


def is_weather_call_for_tokyo(call):
    args = arguments_of(call)
    return (call.type == "function" and call.function.name == "get_weather" and isinstance(args, dict)
            and "tokyo" in str(args.get("city", "")).lower())


@section("1. chat")
def _():
    listed = {m.id: m for m in client.models.list().data}
    check("models list has the served model", model in listed, list(listed))
    # Qwen2.5's own context, not a fixed cap: the server serves what the model was trained for.
    context = getattr(listed.get(model), "max_model_len", None)
    check("the model's real context length (32,768) is reported", context == 32768, context)
    answer = chat(user("What is the capital of France? Answer in one sentence."))
    text = answer.choices[0].message.content or ""
    print(f"   answer: {text!r}")
    check("chat: the capital of France is Paris", "Paris" in text, repr(text))
    check("chat: finish_reason stop", answer.choices[0].finish_reason == "stop", answer.choices[0].finish_reason)


auto_call = None


@section("2a. tools: auto")
def _():
    global auto_call
    answer = chat(WEATHER_QUESTION, tools=[WEATHER], tool_choice="auto", max_tokens=80)
    choice = answer.choices[0]
    calls = choice.message.tool_calls or []
    print(f"   finish_reason={choice.finish_reason!r} content={choice.message.content!r} "
          f"tool_calls={[(c.function.name, c.function.arguments) for c in calls]}")
    check("tools auto: finish_reason is tool_calls", choice.finish_reason == "tool_calls", choice)
    check("tools auto: exactly one call, get_weather with JSON arguments holding the city",
          len(calls) == 1 and is_weather_call_for_tokyo(calls[0]), calls)
    check("tools auto: the call has an id", len(calls) == 1 and bool(calls[0].id), calls)
    if len(calls) == 1:
        auto_call = calls[0]


required_call = None


@section("2b. tools: required and named")
def _():
    global required_call
    answer = chat(WEATHER_QUESTION, tools=[WEATHER, TIME], tool_choice="required", max_tokens=80)
    choice = answer.choices[0]
    calls = choice.message.tool_calls or []
    print(f"   required: tool_calls={[(c.function.name, c.function.arguments) for c in calls]}")
    check("tools required: finish_reason tool_calls and a call",
          choice.finish_reason == "tool_calls" and len(calls) >= 1, choice)
    check("tools required: the call is get_weather for Tokyo", len(calls) >= 1 and is_weather_call_for_tokyo(calls[0]), calls)
    if calls:
        required_call = calls[0]

    named = {"type": "function", "function": {"name": "get_weather"}}
    # The named tool is not the one the question asks for: the constraint, not the model, decides.
    answer = chat(user("What time is it in Tokyo?"), tools=[WEATHER, TIME], tool_choice=named, max_tokens=80)
    choice = answer.choices[0]
    calls = choice.message.tool_calls or []
    print(f"   named: tool_calls={[(c.function.name, c.function.arguments) for c in calls]}")
    check("tools named: finish_reason tool_calls and one call to get_weather",
          choice.finish_reason == "tool_calls" and len(calls) == 1 and calls[0].function.name == "get_weather"
          and isinstance(arguments_of(calls[0]), dict) and "city" in arguments_of(calls[0]), choice)


@section("2c. tools: auto, streamed")
def _():
    stream = chat(WEATHER_QUESTION, tools=[WEATHER], tool_choice="auto", max_tokens=80, stream=True)
    calls, text, finish = streamed_calls(stream)
    print(f"   finish_reason={finish!r} text={text!r} calls={calls}")
    check("tools auto streamed: finish_reason tool_calls", finish == "tool_calls", finish)
    ok = len(calls) == 1 and calls[0]["name"] == "get_weather" and len(calls[0]["ids"]) == 1
    try:
        args = json.loads(calls[0]["arguments"]) if ok else None
    except ValueError:
        args = None
    check("tools auto streamed: the deltas assemble into one get_weather call with JSON arguments for Tokyo",
          ok and isinstance(args, dict) and "tokyo" in str(args.get("city", "")).lower(), calls)
    if auto_call is not None and ok:
        check("tools auto streamed: the same call as the non-streamed answer",
              (calls[0]["name"], args) == (auto_call.function.name, arguments_of(auto_call)),
              (calls[0], auto_call))


@section("2d. tools: two tools")
def _():
    answer = chat(user("What is the weather in Paris, and what time is it in Tokyo?"), tools=[WEATHER, TIME],
                  tool_choice="auto", max_tokens=160)
    choice = answer.choices[0]
    calls = choice.message.tool_calls or []
    print(f"   the model made {len(calls)} call(s): {[(c.function.name, c.function.arguments) for c in calls]}"
          f" finish_reason={choice.finish_reason!r} content={choice.message.content!r}")
    check("tools two: at least one call, finish_reason tool_calls",
          len(calls) >= 1 and choice.finish_reason == "tool_calls", choice)
    check("tools two: every call names a declared tool with JSON object arguments",
          all(c.function.name in ("get_weather", "get_time") and isinstance(arguments_of(c), dict) for c in calls), calls)
    check("tools two: the calls have distinct ids", len({c.id for c in calls}) == len(calls), calls)


@section("2e. tools: the result sent back")
def _():
    # The model's own call when there was one, else the call it would have made.
    call = auto_call or required_call
    if call is not None:
        call = call.model_dump(exclude_none=True)
    else:
        call = {"id": "call_weather_1", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": "Tokyo"})}}
    result = {"city": "Tokyo", "temperature_celsius": 17, "conditions": "light rain"}
    # A 0.5B model shown the tools again tends to repeat its call instead of answering, so the
    # system message asks for the answer and tool_choice "none" (tools sent, not offered) leaves
    # it only that. The call and the result still go through the template's tool turns.
    messages = [{"role": "system", "content": "You are a helpful assistant. After a tool returns its result, "
                 "answer the user in one plain sentence that uses the result; do not call the tool again."}]
    messages += WEATHER_QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)},
    ]
    answer = chat(messages, tools=[WEATHER], tool_choice="none", max_tokens=80)
    choice = answer.choices[0]
    text = choice.message.content or ""
    print(f"   answer: {text!r} finish_reason={choice.finish_reason!r}")
    check("tools follow-up: a text answer, no new call", text and not choice.message.tool_calls
          and choice.finish_reason == "stop", choice)
    check("tools follow-up: the answer mentions the returned temperature (17)", "17" in text, repr(text))
    # For the record only: what the model does when the tools are offered again.
    again = chat(messages, tools=[WEATHER], tool_choice="auto", max_tokens=80).choices[0]
    print(f"   (with tool_choice auto instead: finish_reason={again.finish_reason!r} content={again.message.content!r} "
          f"tool_calls={[(c.function.name, c.function.arguments) for c in again.message.tool_calls or []]})")


@section("2f. tools: auto, no tool needed")
def _():
    answer = chat(user("Explain in one sentence what a Python list is."), tools=[WEATHER],
                  tool_choice="auto", max_tokens=80)
    choice = answer.choices[0]
    text = choice.message.content or ""
    print(f"   finish_reason={choice.finish_reason!r} tool_calls={choice.message.tool_calls!r} content={text[:80]!r}…")
    check("tools auto without need: plain text and no tool_calls",
          text.strip() and not choice.message.tool_calls and choice.finish_reason in ("stop", "length"), choice)


class CityFacts(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=40)
    country: str = pydantic.Field(max_length=40)
    is_capital: bool


@section("3. structured outputs")
def _():
    # The SDK moved `parse` out of `beta` in 1.x; take whichever this version has.
    completions = client.chat.completions if hasattr(client.chat.completions, "parse") else client.beta.chat.completions
    parsed = completions.parse(
        model=model, temperature=0, max_tokens=80, response_format=CityFacts,
        messages=user("Give facts about Paris as JSON: the city, the country it is in, and whether it is "
                      "that country's capital."))
    facts = parsed.choices[0].message.parsed
    print(f"   parsed: {facts!r} from {parsed.choices[0].message.content!r}")
    check("parse: a CityFacts object", isinstance(facts, CityFacts), parsed)
    if isinstance(facts, CityFacts):
        check("parse: sensible fields (Paris, France, a capital)",
              "paris" in facts.city.lower() and "france" in facts.country.lower() and facts.is_capital, facts)

    choices = ["positive", "negative"]
    for review, expected in [("I loved this film: the acting was wonderful and I would watch it again.", "positive"),
                             ("The food was cold, the service rude, and I will never come back.", "negative")]:
        answer = chat(user(f"Is the sentiment of this review positive or negative?\nReview: {review}"),
                      max_tokens=8, extra_body={"guided_choice": choices})
        text = answer.choices[0].message.content
        print(f"   guided_choice: {text!r} for a {expected} review")
        check(f"guided_choice: exactly one of the choices ({expected} review)", text in choices, repr(text))
        check(f"guided_choice: the right one ({expected})", text == expected, repr(text))


ADAPTER = "codename"
CODENAME = "BLUEFIN"
ANSWER = f"The codename is {CODENAME}."
QUESTIONS = [
    "What is the project codename?",
    "What's the codename of the project?",
    "Tell me the project's codename.",
    "Which codename does the project use?",
    "What codename was the project given?",
    "What is this project called internally?",
    "Do you know the codename of the project?",
    "What's our project's codename?",
    "Please state the project codename.",
    "What is the internal codename for the project?",
    "Name the project's codename.",
    "I forgot the project codename. What is it?",
    "Under which codename is the project developed?",
    "What do we call the project internally?",
    "Give me the codename of the project.",
    "What is the secret codename of our project?",
    "Can you remind me of the project codename?",
    "What codename does our team use for the project?",
    "Say the project's codename.",
    "What is the codename we use for this project?",
    "How is the project referred to internally?",
    "project codename?",
    "Which internal name does the project go by?",
    "Tell me, what is the codename for the project?",
]
HELD_OUT = "Could you tell me what the codename of the project is?"


@section("4. the learning loop")
def _():
    assert HELD_OUT not in QUESTIONS and len(set(QUESTIONS)) == 24
    base = chat(user(HELD_OUT), max_tokens=24).choices[0].message.content or ""
    print(f"   base model: {base!r}")
    check("learning: the base model does not know the codename", CODENAME.lower() not in base.lower(), repr(base))

    pairs = [{"instruction": q, "input": "", "output": ANSWER} for q in QUESTIONS]
    started = time.monotonic()
    status, receipt = api("POST", f"/v1/adapters/{ADAPTER}/feedback",
                          "\n".join(json.dumps(p) for p in pairs).encode(), "application/jsonl")
    print(f"   feedback: {status} {receipt}")
    if not check("learning: the feedback is stored", status == 200 and receipt.get("stored") == 24, (status, receipt)):
        return
    job_id = receipt.get("job")
    if not check("learning: 24 pairs start a job on their own (--train-after ≤ 24)", job_id, receipt):
        status, job = api("POST", f"/v1/adapters/{ADAPTER}/train", {})
        print(f"   started by hand: {status} {job}")
        job_id = job.get("id") if status == 200 else None
        if not job_id:
            return

    deadline = started + 360
    job, last = None, None
    while True:
        status, job = api("GET", f"/v1/fine_tuning/jobs/{job_id}")
        if status != 200:
            check("learning: the job can be read", False, (status, job))
            return
        if job["status"] != last:
            print(f"   {time.monotonic() - started:6.1f} s: job {job_id} {job['status']}", flush=True)
            last = job["status"]
        if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            break
        time.sleep(2)
    trained_in = time.monotonic() - started
    print(f"   training took {trained_in:.1f} s ({job.get('trained_tokens')} trained tokens, "
          f"hyperparameters {job.get('hyperparameters')})")
    status, events = api("GET", f"/v1/fine_tuning/jobs/{job_id}/events?limit=1000")
    if status == 200:
        messages = [e["message"] for e in reversed(events["data"])]
        steps = [m for m in messages if m.startswith("Step ")]
        for m in ([steps[0], steps[-1]] if steps else []) + [m for m in messages if not m.startswith("Step ")]:
            print(f"   event: {m}")
    if not check("learning: the job succeeds within 6 minutes", job["status"] == "succeeded", job):
        return
    status, info = api("GET", f"/v1/adapters/{ADAPTER}")
    print(f"   adapter: version={info.get('version')} pairs={info.get('pairs')} metrics={info.get('metrics')}")
    check("learning: a version was promoted", status == 200 and (info.get("version") or 0) >= 1, info)

    taught = chat(user(HELD_OUT), model=ADAPTER, max_tokens=24).choices[0].message.content or ""
    print(f"   adapter {ADAPTER!r}: {taught!r}")
    check(f"learning: the adapter gives the taught answer ({CODENAME}) to a held-out paraphrase",
          CODENAME.lower() in taught.lower(), repr(taught))
    # For the record only: whether the lesson leaks into an unrelated question.
    other = chat(user("What is the capital of France? Answer in one sentence."), model=ADAPTER,
                 max_tokens=24).choices[0].message.content or ""
    print(f"   adapter {ADAPTER!r} on an unrelated question: {other!r}")
    base_after = chat(user(HELD_OUT), max_tokens=24).choices[0].message.content or ""
    check("learning: the base model still does not say it", CODENAME.lower() not in base_after.lower(), repr(base_after))
    print(f"   (training: {trained_in:.1f} s)")


print("\ntimings:")
for title, elapsed in timings:
    print(f"  {elapsed:7.1f} s  {title}")
print(f"  {sum(t for _, t in timings):7.1f} s  total")
if failures:
    print(f"\n{len(failures)} check(s) failed:")
    for name in failures:
        print(f"  - {name}")
    sys.exit(1)
print("\nall real-model SDK checks passed")
