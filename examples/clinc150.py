"""Teach a running Tessera server all 150 CLINC150 intents from feedback, and measure it.

The loop a user runs, end to end over HTTP: upload N utterances of every intent as feedback pairs
(the utterance alone as the user message, the intent's label as the answer: no label list in the
prompt), train the adapter in the background while streaming clients keep using the server, then
ask the promoted adapter every utterance of the validation split. Prints the job's progress, then
one table: accuracy, seconds from the upload to the promotion, tokens trained, and the
streaming clients' inter-token p95 before and during training.

    tessera serve --model gemma-3-270m --train-threads 2 &
    python3 examples/clinc150.py --data DIR     # DIR: train.jsonl and val.jsonl of the full split

Each line of the data files is {"text": ..., "intent": ...}; the full split is `data_full.json`
of github.com/clinc/oos-eval (7,500 training and 3,000 validation utterances of 150 intents).
Standard library only.
"""
import argparse
import collections
import concurrent.futures
import json
import statistics
import threading
import time
import urllib.error
import urllib.request


def call(server, method, path, body=None, content_type="application/json"):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(server + path, data=data, method=method, headers={"content-type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        raise SystemExit(f"{method} {path}: {e.code} {e.read().decode(errors='replace')}")


def read_split(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def pick(rows, per_intent):
    """The first `per_intent` utterances of every intent, in the file's order."""
    taken = collections.Counter()
    chosen = []
    for row in rows:
        if taken[row["intent"]] < per_intent:
            taken[row["intent"]] += 1
            chosen.append(row)
    return chosen


class StreamingClients:
    """`count` clients streaming chat completions one after another, recording the gaps between
    the content chunks they receive."""

    PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle stays upright.",
               "Describe a walk through a forest in autumn.", "List some uses of a paperclip and explain each."]

    def __init__(self, server, model, count):
        self.server, self.model, self.count = server, model, count
        self.gaps, self.lock, self.stop = [], threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(count)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()

    def run(self, i):
        body = {"model": self.model, "stream": True, "max_tokens": 96, "temperature": 0.8,
                "messages": [{"role": "user", "content": self.PROMPTS[i % len(self.PROMPTS)]}]}
        while not self.stop.is_set():
            request = urllib.request.Request(self.server + "/v1/chat/completions", data=json.dumps(body).encode(),
                                             method="POST", headers={"content-type": "application/json"})
            last = None
            with urllib.request.urlopen(request, timeout=600) as response:
                for line in response:
                    if not line.startswith(b"data: {"):
                        continue
                    now = time.perf_counter()
                    if last is not None:
                        with self.lock:
                            self.gaps.append(now - last)
                    last = now

    def p95_ms(self):
        with self.lock:
            gaps = sorted(self.gaps)
        return 1000 * gaps[int(0.95 * (len(gaps) - 1))] if gaps else float("nan")


def latest_step(server, job):
    events = call(server, "GET", f"/v1/fine_tuning/jobs/{job}/events?limit=20")["data"]
    for event in events:
        data = event.get("data") or {}
        if "total_steps" in data:
            return data
    return None


def follow(server, job):
    """Polls the job until it ends, printing a progress line; returns its final state."""
    while True:
        state = call(server, "GET", f"/v1/fine_tuning/jobs/{job}")
        step = latest_step(server, job)
        if step:
            print(f"\r  step {step['step']}/{step['total_steps']}  loss {step['train_loss']:.4f}  "
                  f"{step['tokens_per_second']:.0f} tok/s  [{state['status']}]", end="", flush=True)
        if state["status"] in ("succeeded", "failed", "cancelled"):
            print()
            return state
        time.sleep(5)


def accuracy(server, model, rows, parallel=16):
    def answer(row):
        body = {"model": model, "temperature": 0, "max_tokens": 12, "messages": [{"role": "user", "content": row["text"]}]}
        return call(server, "POST", "/v1/chat/completions", body)["choices"][0]["message"]["content"].strip()
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        answers = list(pool.map(answer, rows))
    return sum(a == row["intent"] for a, row in zip(answers, rows)) / len(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="http://127.0.0.1:8080")
    parser.add_argument("--data", required=True, help="a folder with train.jsonl and val.jsonl")
    parser.add_argument("--adapter", default="intents150")
    parser.add_argument("--per-intent", type=int, default=20, help="training utterances of each intent")
    parser.add_argument("--val-per-intent", type=int, default=20, help="validation utterances of each intent (all 20 by default)")
    parser.add_argument("--clients", type=int, default=4, help="streaming clients while it trains")
    parser.add_argument("--epochs", type=int, default=2,
                        help="for a job this script starts; one the upload starts (the server's --train-after) uses the server's defaults")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adalomo"], help="as --epochs")
    parser.add_argument("--method", default="lora", choices=["lora", "dora", "ia3"])
    args = parser.parse_args()

    base = call(args.server, "GET", "/v1/models")["data"][0]["id"]
    train = pick(read_split(f"{args.data}/train.jsonl"), args.per_intent)
    val = pick(read_split(f"{args.data}/val.jsonl"), args.val_per_intent)
    intents = len({row["intent"] for row in train})
    print(f"{len(train)} pairs over {intents} intents; {len(val)} validation utterances; base model {base}")

    with StreamingClients(args.server, base, args.clients) as idle:
        time.sleep(30)
    print(f"idle: {args.clients} streaming clients, inter-token p95 {idle.p95_ms():.1f} ms")

    lines = "\n".join(json.dumps({"instruction": row["text"], "output": row["intent"]}) for row in train).encode()
    with StreamingClients(args.server, base, args.clients) as busy:
        started = time.perf_counter()
        receipt = call(args.server, "POST", f"/v1/adapters/{args.adapter}/feedback?method={args.method}", lines, "application/jsonl")
        print(f"stored {receipt['stored']} pairs ({receipt['duplicates']} duplicates)")
        job = receipt.get("job")
        if job is None:
            hyperparameters = {"n_epochs": args.epochs, "optimizer": args.optimizer}
            job = call(args.server, "POST", f"/v1/adapters/{args.adapter}/train", {"hyperparameters": hyperparameters})["id"]
        state = follow(args.server, job)
        seconds = time.perf_counter() - started
    if state["status"] != "succeeded":
        raise SystemExit(f"the job ended {state['status']}: {state.get('error')}")
    h = state["hyperparameters"]
    version = call(args.server, "GET", f"/v1/adapters/{args.adapter}")["version"]
    print(f"job {job}: {h['n_epochs']} epochs, batch {h['batch_size']}, {h['optimizer']}; the adapter serves version {version}")
    print(f"training: {args.clients} streaming clients, inter-token p95 {busy.p95_ms():.1f} ms")

    print("asking the adapter every validation utterance...")
    tuned = accuracy(args.server, args.adapter, val)
    print(f"\n| model | pairs | validation accuracy | upload to promotion | tokens trained | p95 idle | p95 training |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {base} + {args.adapter} ({args.method}, {h['optimizer']}, {h['n_epochs']} epochs) | {len(train)} | {tuned:.3f} | "
          f"{seconds:.0f} s | {state['trained_tokens']} | {idle.p95_ms():.1f} ms | {busy.p95_ms():.1f} ms |")


if __name__ == "__main__":
    main()
