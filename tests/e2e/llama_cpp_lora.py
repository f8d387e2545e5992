"""An adapter trained by Tessera, exported as GGUF-LoRA, decoded by llama.cpp's `--lora`.

Usage: python3 llama_cpp_lora.py TESSERA_BIN LLAMA_BIN_DIR MODEL_GGUF

Starts `tessera serve` on MODEL_GGUF with a fresh tuning store, posts feedback pairs to a new
adapter and trains it (one job, through the eval gate), downloads the promoted version as a
GGUF-LoRA file, and starts llama.cpp's `llama-server -m MODEL_GGUF --lora FILE`. Both then decode
the same prompts greedily, and the script prints, per prompt, how many of the first tokens agree.
Exits non-zero if the job does not promote a version or llama.cpp refuses the file. With
KEEP_GGUF=PATH set, the exported adapter is kept there.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

tessera_bin, llama_dir, model = sys.argv[1], sys.argv[2], sys.argv[3]
TESSERA, LLAMA = "http://127.0.0.1:18431", "http://127.0.0.1:18432"
TOKENS = 24
PROMPTS = ["Q: What colour is the sky?\nA:", "Q: Name a large animal.\nA:", "Q: What do bees make?\nA:",
           "Q: What is 3 plus one?\nA:", "Hello, my name is", "The capital of France is"]


def call(url, body=None, method=None, raw=False):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        payload = response.read()
        return payload if raw else json.loads(payload)


def wait_healthy(url, process):
    for _ in range(1200):
        if process.poll() is not None:
            sys.exit(f"{url}: the server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    sys.exit(f"{url} never became healthy")


def train(adapter):
    """Feedback pairs in one shape (a question → "Arr, <answer>, matey!"), then one job on them."""
    records = [{"instruction": f"Q: What is {n} plus one?\nA:", "output": f" Arr, {n + 1}, matey!"} for n in range(40)]
    request = urllib.request.Request(f"{TESSERA}/v1/adapters/{adapter}/feedback?rank=8&alpha=16",
                                     data="\n".join(json.dumps(r) for r in records).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=600) as response:
        print("feedback:", json.loads(response.read()))
    # SHARP=1 trains 3 epochs at 4× the learning rate, to a far lower loss than the defaults.
    hyperparameters = {"n_epochs": 3, "learning_rate_multiplier": 4} if os.environ.get("SHARP") else {}
    job = call(f"{TESSERA}/v1/adapters/{adapter}/train", {"hyperparameters": hyperparameters}, "POST")
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(2)
        job = call(f"{TESSERA}/v1/fine_tuning/jobs/{job['id']}")
    events = call(f"{TESSERA}/v1/fine_tuning/jobs/{job['id']}/events?limit=3")["data"]
    print("job:", job["status"], "|", " / ".join(e["message"] for e in events))
    info = call(f"{TESSERA}/v1/adapters/{adapter}")
    if job["status"] != "succeeded" or info.get("version", 0) < 1:
        sys.exit(f"no version was promoted: {info}")
    return info["version"]


def tessera_tokens(adapter, prompt):
    """Greedy token ids, and at each step the margin between the two likeliest tokens."""
    body = {"model": adapter, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0,
            "return_token_ids": True, "logprobs": 5}
    choice = call(f"{TESSERA}/v1/completions", body, "POST")["choices"][0]
    tops = choice["logprobs"]["top_logprobs"]
    return choice["token_ids"], [margin(top) for top in tops], tops[0]


def margin(top):
    best = sorted(top.values(), reverse=True)
    return best[0] - best[1] if len(best) > 1 else float("inf")


def llama_tokens(prompt):
    """Greedy token ids from llama.cpp, and its margin between the two likeliest at each step."""
    body = {"prompt": prompt, "n_predict": TOKENS, "temperature": 0, "top_k": 1,
            "cache_prompt": False, "return_tokens": True, "n_probs": 5}
    answer = call(f"{LLAMA}/completion", body, "POST")
    steps = answer.get("completion_probabilities", [])
    margins = [margin({t["id"]: t["logprob"] for t in step["top_logprobs"]}) for step in steps]
    first = {t["token"]: t["logprob"] for t in steps[0]["top_logprobs"]} if steps else {}
    return answer["tokens"], margins, first


END_OF_GENERATION = {1, 106}  # Gemma's <eos> and <end_of_turn>: llama.cpp stops at either


def first_step_error(ours, theirs):
    """The largest |Δ logprob| at the first step over the tokens both rank among their top 5."""
    (_, _, mine), (_, _, their) = ours, theirs
    shared = set(mine) & set(their)
    return max(abs(mine[t] - their[t]) for t in shared) if shared else float("nan")


def until_end(ids):
    return next((ids[:i] for i, t in enumerate(ids) if t in END_OF_GENERATION), ids)


def agreement(ours, theirs):
    """Leading tokens that agree (up to the end of generation), of how many, and the margins of
    both choices where they first differ."""
    (ids, margins, _), (theirs, their_margins, _) = ours, theirs
    ids, theirs = until_end(ids), until_end(theirs)
    same = next((i for i, (a, b) in enumerate(zip(ids, theirs)) if a != b), None)
    if same is None and len(ids) == len(theirs):
        return f"{len(ids)}/{len(ids)}"
    same = min(len(ids), len(theirs)) if same is None else same
    their_margin = their_margins[same] if same < len(their_margins) else float("nan")
    return f"{same}/{max(len(ids), len(theirs))}, then margins {margins[same]:.3f} / {their_margin:.3f}"


def detokenize(ids):
    return call(f"{TESSERA}/detokenize", {"tokens": ids}, "POST")["prompt"]


def llama_run(model, lora, prompts):
    """Greedy tokens of each prompt from llama.cpp's server, with `lora` when given."""
    command = [f"{llama_dir}/llama-server", "-m", model, "--port", LLAMA.rsplit(":", 1)[1], "-t", "2", "-c", "512", "-np", "1"]
    if lora:
        command += ["--lora", lora]
    llama = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(LLAMA, llama)
        return {p: llama_tokens(p) for p in prompts}
    finally:
        llama.terminate()
        llama.wait()


with tempfile.TemporaryDirectory() as home:
    tessera = subprocess.Popen([tessera_bin, "serve", "--model", model, "--port", TESSERA.rsplit(":", 1)[1],
                                "--tuning-dir", f"{home}/tuning", "--adapters-dir", f"{home}/adapters",
                                "--plugins-dir", f"{home}/plugins", "--train-threads", "2",
                                "--train-after", "1000"])
    try:
        wait_healthy(TESSERA, tessera)
        version = train("pirate")
        gguf = call(f"{TESSERA}/v1/adapters/pirate/download?format=gguf", raw=True)
        with open(f"{home}/pirate.gguf", "wb") as f:
            f.write(gguf)
        if os.environ.get("KEEP_GGUF"):
            shutil.copy(f"{home}/pirate.gguf", os.environ["KEEP_GGUF"])
        ours = {p: tessera_tokens("pirate", p) for p in PROMPTS}
        base_id = model.rsplit("/", 1)[-1].removesuffix(".gguf")
        base = {p: tessera_tokens(base_id, p) for p in PROMPTS}
        their_base = llama_run(model, None, PROMPTS)
        theirs = llama_run(model, f"{home}/pirate.gguf", PROMPTS)
        print(f"adapter pirate v{version}, rank 8, {len(gguf)} bytes as GGUF; {TOKENS} greedy tokens per prompt")
        print("| prompt | base: Tessera = llama.cpp | first-step max abs Δlogprob | with the adapter: Tessera = llama.cpp `--lora` | first-step max abs Δlogprob | the adapter changed the tokens |")
        print("| --- | --- | --- | --- | --- | --- |")
        for prompt in PROMPTS:
            print(f"| {prompt!r} | {agreement(base[prompt], their_base[prompt])} | {first_step_error(base[prompt], their_base[prompt]):.3f} "
                  f"| {agreement(ours[prompt], theirs[prompt])} | {first_step_error(ours[prompt], theirs[prompt]):.3f} "
                  f"| {'yes' if ours[prompt][0] != base[prompt][0] else 'no'} |")
        for prompt in PROMPTS:
            print(f"{prompt!r}\n  Tessera:   {detokenize(ours[prompt][0])!r}\n  llama.cpp: {detokenize(theirs[prompt][0])!r}")
    finally:
        tessera.terminate()
        tessera.wait()
