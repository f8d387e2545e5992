"""The training anchor of issue 5: PEFT + torch on the CPU, the model dequantized to f32.

LoRA r16 (alpha 32) on all seven linear targets of Gemma 3 270M, AdamW, batch 4 x 128 tokens
with every position scored, as `tessera bench train` runs it. Prints tok/s per timed step, the
median, and peak RSS. Not part of the test suite: it needs torch, which the tests do not.

    python3 -m venv /tmp/peft && /tmp/peft/bin/pip install torch transformers peft gguf accelerate
    /tmp/peft/bin/python tests/anchors/peft_train.py [--model PATH] [--steps 4] [--threads 2]
"""
import argparse
import os
import resource
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.expanduser("~/.cache/tessera/models/gemma-3-270m-q4_k_m.gguf"))
    parser.add_argument("--steps", type=int, default=4, help="timed steps, after one untimed")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(args.model), gguf_file=os.path.basename(args.model), dtype=torch.float32
    )
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    rates = []
    for step in range(args.steps + 1):
        ids = torch.randint(0, model.config.vocab_size, (4, 128), generator=generator)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds = time.perf_counter() - start
        print(f"step {step}: 512 tokens, loss {loss.item():.3f}, {seconds:.2f} s", flush=True)
        if step > 0:
            rates.append(512 / seconds)
    print(f"| PEFT + torch f32, r16 b4x128, all scored | {statistics.median(rates):.2f} tok/s | {', '.join(f'{r:.2f}' for r in rates)} |")
    print(f"| peak RSS | {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB | |")


if __name__ == "__main__":
    main()
