"""The reference library on Tessera's 150-intent task: PEFT LoRA + torch, float32, on the CPU.

The same pairs as `examples/clinc150.py` uploads (the first 20 training utterances of each of the
150 CLINC150 intents, the utterance alone as the user turn, the label as the answer scored
through the end of its turn), the same base (Gemma 3 270M, dequantized from the same GGUF to
float32) and the job Tessera runs by default: LoRA r16, α 32, on all seven projections, AdamW
(β 0.9/0.999, ε 1e-8, weight decay 0.01), global-norm clipping at 1, peak rate 1e-3 with a tenth
of the steps warming up and a cosine decay, batches of 4, two epochs, in a seeded order. Then
every utterance of the validation split, answered greedily (at most 12 tokens) and compared with
its label. Prints the accuracy and the wall times and writes them as JSON (`--out`).

Not part of the test suite (it needs torch and tens of minutes):

    /tmp/torchenv/bin/python tests/anchors/peft_clinc150.py --data DIR --threads 2 \\
        --out tests/anchors/out/peft_clinc150.json

Only the answer positions go through the output layer (as Tessera's loss does): the rest of a
sequence needs no logits, and at 262k vocabulary entries they would be most of the work.
"""
import argparse
import collections
import json
import math
import os
import platform
import random
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def read_split(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def pick(rows, per_intent, intents):
    taken, order, chosen = collections.Counter(), [], []
    for row in rows:
        intent = row["intent"]
        if intent not in taken and len(order) == intents:
            continue
        if intent not in taken:
            order.append(intent)
        if taken[intent] < per_intent:
            taken[intent] += 1
            chosen.append(row)
    return chosen, set(order)


def prompt_ids(tokenizer, text):
    """The user turn as Tessera renders it for Gemma (the GGUF file carries no chat template)."""
    turn = f"<start_of_turn>user\n{text.strip()}<end_of_turn>\n<start_of_turn>model\n"
    return [tokenizer.bos_token_id] + tokenizer.encode(turn, add_special_tokens=False)


def example(tokenizer, row, end_of_turn):
    """Token ids and, per position, the id it must predict (-100 where nothing is scored)."""
    prompt = prompt_ids(tokenizer, row["text"])
    answer = tokenizer.encode(row["intent"], add_special_tokens=False) + [end_of_turn]
    ids = prompt + answer
    targets = [-100] * (len(prompt) - 1) + answer + [-100]
    return ids, targets


def batch_loss(model, batch, pad):
    width = max(len(ids) for ids, _ in batch)
    ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
    targets = torch.tensor([t + [-100] * (width - len(t)) for _, t in batch])
    hidden = model.base_model.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    scored = targets != -100
    logits = model.base_model.model.lm_head(hidden[scored]).float()
    return torch.nn.functional.cross_entropy(logits, targets[scored])


def rate(step, total, peak):
    warmup = max(total // 10, 1)
    if step <= warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def train(model, examples, pad, epochs, batch_size, peak, seed):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=peak, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = steps_per_epoch * epochs
    order = random.Random(seed)
    step, tokens, started = 0, 0, time.perf_counter()
    model.train()
    for _ in range(epochs):
        shuffled = examples[:]
        order.shuffle(shuffled)
        for i in range(0, len(shuffled), batch_size):
            batch = shuffled[i:i + batch_size]
            step += 1
            for group in optimizer.param_groups:
                group["lr"] = rate(step, total, peak)
            loss = batch_loss(model, batch, pad)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            tokens += sum(len(ids) for ids, _ in batch)
            if step % 25 == 0 or step == total:
                seconds = time.perf_counter() - started
                print(f"step {step}/{total}: loss {loss.item():.4f}, {tokens / seconds:.0f} tok/s", flush=True)
    return total, tokens, time.perf_counter() - started


@torch.no_grad()
def accuracy(model, tokenizer, rows, end_of_turn, batch_size=32):
    model.eval()
    pad = tokenizer.pad_token_id
    right = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        prompts = [prompt_ids(tokenizer, row["text"]) for row in chunk]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             eos_token_id=[end_of_turn, tokenizer.eos_token_id], pad_token_id=pad)
        for row, generated in zip(chunk, out[:, width:]):
            answer = tokenizer.decode(generated, skip_special_tokens=True).strip()
            right += answer == row["intent"]
    return right / len(rows)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.expanduser("~/.cache/tessera/models/gemma-3-270m-q4_k_m.gguf"))
    parser.add_argument("--data", required=True, help="a folder with train.jsonl and val.jsonl")
    parser.add_argument("--per-intent", type=int, default=20)
    parser.add_argument("--intents", type=int, default=150, help="fewer to try the script quickly")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="where to write the figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(args.model), gguf_file=os.path.basename(args.model))
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(args.model), gguf_file=os.path.basename(args.model),
                                                 dtype=torch.float32, attn_implementation="eager")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"))
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")

    train_rows, intents = pick(read_split(f"{args.data}/train.jsonl"), args.per_intent, args.intents)
    val_rows = [row for row in read_split(f"{args.data}/val.jsonl") if row["intent"] in intents]
    examples = [example(tokenizer, row, end_of_turn) for row in train_rows]
    print(f"{len(examples)} pairs over {len(intents)} intents, {len(val_rows)} validation utterances", flush=True)

    steps, tokens, train_seconds = train(model, examples, tokenizer.pad_token_id, args.epochs, 4, 1e-3, seed=0)
    started = time.perf_counter()
    tuned = accuracy(model, tokenizer, val_rows, end_of_turn)
    eval_seconds = time.perf_counter() - started
    figures = {
        "library": "PEFT + torch, float32",
        "cpu": cpu_name(),
        "threads": args.threads,
        "pairs": len(examples),
        "intents": len(intents),
        "epochs": args.epochs,
        "steps": steps,
        "tokens": tokens,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(tokens / train_seconds, 1),
        "validation_utterances": len(val_rows),
        "validation_accuracy": round(tuned, 4),
        "eval_seconds": round(eval_seconds, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
