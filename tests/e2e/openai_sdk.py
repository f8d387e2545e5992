"""End-to-end check of a running Tessera server through the official `openai` Python SDK.

Usage: python3 openai_sdk.py BASE_URL MODEL_ID
Exits non-zero, naming the failed check, if anything is off.
"""
import array
import sys
import time
import urllib.request

import json

import openai
import pydantic

base_url, model = sys.argv[1], sys.argv[2]

# Wait for the server to come up.
for _ in range(600):
    try:
        with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=2) as r:
            if r.status == 200:
                break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("server never became healthy")

client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
messages = [{"role": "user", "content": "Write one sentence about the sea."}]


def check(name, condition, detail=""):
    if not condition:
        sys.exit(f"FAILED: {name} {detail}")
    print(f"ok: {name}")


# Models list.
models = [m.id for m in client.models.list().data]
check("models list has the served model", model in models, models)

# Chat, plain and streamed: the same text.
plain = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
text = plain.choices[0].message.content
check("chat returns text", isinstance(text, str) and len(text) > 0, plain)
check("chat usage", plain.usage.completion_tokens > 0 and plain.usage.total_tokens
      == plain.usage.prompt_tokens + plain.usage.completion_tokens, plain.usage)
stream = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0,
                                        stream=True, stream_options={"include_usage": True})
pieces, finish, usage = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
check("streamed chat equals plain chat", "".join(pieces) == text, ("".join(pieces), text))
check("streamed finish_reason", finish == plain.choices[0].finish_reason, finish)
check("streamed usage", usage is not None and usage.completion_tokens == plain.usage.completion_tokens, usage)

# Completions with logprobs.
completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                       temperature=0, logprobs=3)
lp = completion.choices[0].logprobs
check("completion logprobs", len(lp.tokens) == 8 and len(lp.token_logprobs) == 8
      and all(x <= 0 for x in lp.token_logprobs) and all(len(t) == 3 for t in lp.top_logprobs), lp)
check("completion text is the tokens", "".join(lp.tokens) == completion.choices[0].text, lp.tokens)

# Seeded sampling repeats.
runs = [client.completions.create(model=model, prompt="Once upon a time", max_tokens=16, temperature=1.0,
                                  seed=1234).choices[0].text for _ in range(2)]
check("seeded sampling repeats", runs[0] == runs[1], runs)

# Embeddings: the SDK asks for base64 unless told otherwise, and decodes it to the same floats.
info = client.models.retrieve(model).model_extra["embeddings"]
check("models say embeddings are mean-pooled", info["pooling"] == "mean" and info["normalized"], info)
texts = ["The sea is calm tonight.", "Stock prices fell sharply.", "The ocean is quiet this evening."]
embedded = client.embeddings.create(model=model, input=texts)
vectors = [d.embedding for d in embedded.data]
check("one embedding per input, in order", [d.index for d in embedded.data] == [0, 1, 2], embedded.data)
check("embeddings have the model's size", all(len(v) == info["dimensions"] for v in vectors), [len(v) for v in vectors])
check("embeddings are L2-normalised", all(abs(sum(x * x for x in v) - 1) < 1e-3 for v in vectors))
check("embedding usage", embedded.usage.prompt_tokens > 0 and embedded.usage.total_tokens == embedded.usage.prompt_tokens, embedded.usage)
floats = client.embeddings.create(model=model, input=texts, encoding_format="float")


def as_f32(values):
    """JSON numbers are float32s printed shortest; Python reads them as doubles."""
    return list(array.array("f", values))


check("float and base64 embeddings are the same float32s", [as_f32(d.embedding) for d in floats.data] == vectors)


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b))


check("similar sentences are nearer", cosine(vectors[0], vectors[2]) > cosine(vectors[0], vectors[1]),
      (cosine(vectors[0], vectors[2]), cosine(vectors[0], vectors[1])))
try:
    client.embeddings.create(model=model, input="a", dimensions=info["dimensions"] // 2)
    check("embeddings with other dimensions raise BadRequestError", False)
except openai.BadRequestError as e:
    check("embeddings name the refused dimensions", e.body.get("param") == "dimensions", e.body)

# Responses: create, continue, stream (the SDK's helper and stream=True), retrieve, delete.
first = client.responses.create(model=model, input="Write one sentence about the sea.", instructions="Be brief.",
                                max_output_tokens=24, temperature=0)
check("a response has text", first.id.startswith("resp_") and len(first.output_text) > 0, first)
check("a response's usage adds up", first.usage.output_tokens > 0 and first.usage.total_tokens
      == first.usage.input_tokens + first.usage.output_tokens, first.usage)
fetched = client.responses.retrieve(first.id)
check("a stored response is retrieved as created", fetched.id == first.id and fetched.output_text == first.output_text,
      fetched)
# Instructions are not carried into a continuation: sent again, the prompt keeps its prefix.
followed = client.responses.create(model=model, input="Now one about the mountains.", previous_response_id=first.id,
                                   instructions="Be brief.", max_output_tokens=8, temperature=0)
check("a continuation finds the conversation in the prefix cache",
      followed.usage.input_tokens > first.usage.input_tokens
      and followed.usage.input_tokens_details.cached_tokens > 0, followed.usage)


class Verdict(pydantic.BaseModel):
    salty: bool


deltas = []
with client.responses.stream(model=model, input="Is the sea salty? Answer in JSON.", text_format=Verdict,
                             max_output_tokens=24, temperature=0) as stream:
    for event in stream:
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
    streamed = stream.get_final_response()
check("the stream helper assembles the streamed text", streamed.output_text == "".join(deltas) and deltas,
      (streamed.output_text, deltas))
check("text_format comes back parsed", isinstance(streamed.output_parsed, Verdict), streamed.output_parsed)
kinds = [event.type for event in client.responses.create(model=model, input="Write one sentence about the sea.",
                                                         instructions="Be brief.", max_output_tokens=24,
                                                         temperature=0, stream=True, store=False)]
check("stream=True sends the typed events in order", kinds[:4] == ["response.created", "response.in_progress",
      "response.output_item.added", "response.content_part.added"]
      and kinds[-1] in ("response.completed", "response.incomplete"), kinds)
client.responses.delete(first.id)
try:
    client.responses.retrieve(first.id)
    check("a deleted response is gone", False)
except openai.NotFoundError as e:
    check("a deleted response is gone", e.status_code == 404, e.body)
try:
    client.responses.create(model=model, input=[{"type": "image_generation_call", "id": "x"}])
    check("an unknown input item raises BadRequestError", False)
except openai.BadRequestError as e:
    check("an unknown input item raises BadRequestError naming it", e.body.get("param") == "input[0]", e.body)

# Errors map to the SDK's exception types.
try:
    client.chat.completions.create(model=model, messages=messages, temperature=7)
    check("bad parameter raises BadRequestError", False)
except openai.BadRequestError as e:
    check("bad parameter raises BadRequestError", e.body.get("param") == "temperature", e.body)
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    check("unknown model raises NotFoundError", False)
except openai.NotFoundError as e:
    check("unknown model raises NotFoundError", e.body.get("code") == "model_not_found", e.body)

# Files and fine-tuning jobs: a one-step job on the real model, then its adapter by name.
import io
import json
import time

lines = [json.dumps({"messages": [{"role": "user", "content": f"Reply with the color of item {i}."},
                                  {"role": "assistant", "content": "blue"}]}) for i in range(4)]
uploaded = client.files.create(file=("colors.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="fine-tune")
check("file uploaded", uploaded.id.startswith("file-") and uploaded.purpose == "fine-tune", uploaded)
check("file retrieved", client.files.retrieve(uploaded.id).filename == "colors.jsonl")
check("file listed", any(f.id == uploaded.id for f in client.files.list().data))
try:
    client.files.create(file=("bad.jsonl", io.BytesIO(b'{"messages": []}')), purpose="fine-tune")
    check("invalid file raises BadRequestError", False)
except openai.BadRequestError as e:
    check("invalid file raises BadRequestError", e.body.get("code") == "invalid_record", e.body)

job = client.fine_tuning.jobs.create(model=model, training_file=uploaded.id, suffix="sdk", seed=7,
                                     hyperparameters={"n_epochs": 1, "batch_size": 4})
check("job created", job.status in ("validating_files", "queued", "running") and job.seed == 7, job)
deadline = time.time() + 300
while job.status not in ("succeeded", "failed", "cancelled"):
    if time.time() > deadline:
        check("job finishes within 5 minutes", False, job)
    time.sleep(1)
    job = client.fine_tuning.jobs.retrieve(job.id)
check("job succeeded", job.status == "succeeded" and job.fine_tuned_model.startswith("ft-sdk-"), job)
check("job listed", any(j.id == job.id for j in client.fine_tuning.jobs.list().data))
events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
check("job events carry the step loss", any(e.type == "metrics" and "train_loss" in e.data for e in events), events)
check("job checkpoints list", client.fine_tuning.jobs.checkpoints.list(job.id).data is not None)
tuned = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=4, temperature=0,
                                       messages=[{"role": "user", "content": "Reply with the color of item 9."}])
check("the fine-tuned model serves by name", tuned.choices[0].message.content is not None, tuned)

# A DPO job: OpenAI's preference lines and `method`, followed through its events, then served.
preferences = [json.dumps({"input": {"messages": [{"role": "user", "content": f"Reply with the color of item {i}."}]},
                           "preferred_output": [{"role": "assistant", "content": "blue"}],
                           "non_preferred_output": [{"role": "assistant", "content": "red"}]}) for i in range(4)]
preference_file = client.files.create(file=("colors-dpo.jsonl", io.BytesIO("\n".join(preferences).encode())), purpose="fine-tune")
try:
    client.fine_tuning.jobs.create(model=model, training_file=preference_file.id,
                                   method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 20}}})
    check("beta outside (0, 10] raises BadRequestError", False)
except openai.BadRequestError as e:
    check("beta outside (0, 10] raises BadRequestError", e.body.get("param") == "method.dpo.hyperparameters.beta", e.body)
dpo_job = client.fine_tuning.jobs.create(
    model=model, training_file=preference_file.id, suffix="dpo", seed=7,
    method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 4}}})
check("DPO job created", dpo_job.method.type == "dpo" and dpo_job.method.dpo.hyperparameters.beta == 0.2, dpo_job)
deadline = time.time() + 300
while dpo_job.status not in ("succeeded", "failed", "cancelled"):
    if time.time() > deadline:
        check("DPO job finishes within 5 minutes", False, dpo_job)
    time.sleep(1)
    dpo_job = client.fine_tuning.jobs.retrieve(dpo_job.id)
check("DPO job succeeded", dpo_job.status == "succeeded" and dpo_job.fine_tuned_model.startswith("ft-dpo-"), dpo_job)
events = client.fine_tuning.jobs.list_events(dpo_job.id, limit=100).data
check("DPO job events carry the loss and the reward accuracy",
      any(e.type == "metrics" and "train_loss" in e.data and "train_reward_accuracy" in e.data for e in events), events)
preferred = client.chat.completions.create(model=dpo_job.fine_tuned_model, max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "Reply with the color of item 9."}])
check("the DPO-tuned model serves by name", preferred.choices[0].message.content is not None, preferred)

long_job = client.fine_tuning.jobs.create(model=model, training_file=uploaded.id, hyperparameters={"n_epochs": 50})
cancelled = client.fine_tuning.jobs.cancel(long_job.id)
check("job cancelled", cancelled.status == "cancelled", cancelled)


# Batches: one file of chat requests over the base and both tuned adapters, run in the background.
batch_models = [model, job.fine_tuned_model, dpo_job.fine_tuned_model]
batch_lines = [json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                           "body": {"model": m, "max_tokens": 6, "temperature": 0,
                                    "messages": [{"role": "user", "content": f"Reply with the color of item {i}."}]}})
               for i, m in enumerate(batch_models)]
batch_file = client.files.create(file=("batch.jsonl", io.BytesIO("\n".join(batch_lines).encode())), purpose="batch")
batch = client.batches.create(input_file_id=batch_file.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"from": "sdk"})
check("batch created", batch.status == "validating" and batch.metadata == {"from": "sdk"}, batch)
for _ in range(600):
    batch = client.batches.retrieve(batch.id)
    if batch.status in ("completed", "failed", "cancelled"):
        break
    time.sleep(0.2)
check("batch completed", batch.status == "completed" and batch.request_counts.completed == 3
      and batch.request_counts.failed == 0, batch)
check("batch listed", any(b.id == batch.id for b in client.batches.list(limit=5).data))
results = [json.loads(l) for l in client.files.content(batch.output_file_id).text.splitlines()]
check("batch output has each line once", sorted(r["custom_id"] for r in results) == ["req-0", "req-1", "req-2"], results)
for r in results:
    i = int(r["custom_id"].split("-")[1])
    alone = client.chat.completions.create(model=batch_models[i], max_tokens=6, temperature=0,
                                           messages=[{"role": "user", "content": f"Reply with the color of item {i}."}])
    check(f"batch line {i} answers as the request alone", r["response"]["status_code"] == 200 and
          r["response"]["body"]["choices"][0]["message"]["content"] == alone.choices[0].message.content, r)

# Structured outputs: a Pydantic model as the response format, parsed by the SDK.
class Reading(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=30)
    celsius: int = pydantic.Field(ge=-60, le=60)
    sky: str = pydantic.Field(json_schema_extra={"enum": ["clear", "cloudy", "rain"]})


parsed = client.chat.completions.parse(
    model=model, max_tokens=120, temperature=0.7, seed=11, response_format=Reading,
    messages=[{"role": "user", "content": "Give a weather reading for Lisbon as JSON."}])
reading = parsed.choices[0].message.parsed
check("parse() returns the Pydantic object", isinstance(reading, Reading) and reading.sky in ("clear", "cloudy", "rain"), parsed)

# Tools: a required call, parsed; its result sent back as a `tool` message; an answer comes.
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}]
ask = [{"role": "user", "content": "What is the weather in Paris?"}]
called = client.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice="required",
                                        max_tokens=60, temperature=0)
call = called.choices[0].message.tool_calls[0] if called.choices[0].message.tool_calls else None
check("a required call comes back parsed", called.choices[0].finish_reason == "tool_calls" and call is not None
      and call.function.name == "get_weather" and "city" in json.loads(call.function.arguments), called)
reply = client.chat.completions.create(
    model=model, max_tokens=30, temperature=0, tools=tools,
    messages=ask + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 21, "sky": "clear"})}])
check("the tool's result gets an answer", reply.choices[0].message.content, reply)

# Streamed, the call's deltas reassemble into the same call.
name, arguments, ids = None, "", set()
finish = None
for chunk in client.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice="required",
                                            max_tokens=60, temperature=0, stream=True):
    choice = chunk.choices[0]
    for delta in choice.delta.tool_calls or []:
        ids.update([delta.id] if delta.id else [])
        name = delta.function.name or name
        arguments += delta.function.arguments or ""
    finish = choice.finish_reason or finish
check("streamed call deltas reassemble into the call", (name, json.loads(arguments), finish, len(ids))
      == (call.function.name, json.loads(call.function.arguments), "tool_calls", 1), (name, arguments, finish))

print("all SDK checks passed")
