"""The AdaLomo anchor of issue 34: lomo-optim's AdaLomo with PEFT + torch on the CPU, on a family
test model dequantized to f32 from its GGUF.

Two adapters on `qwen2-tiny` (LoRA r4, alpha 8 on all seven linear layers; DoRA the same, with
its magnitude vectors), started away from PEFT's zero B so that every tensor has a gradient at
the first step. Each is saved as a PEFT folder, then trained for five steps by lomo-optim's
AdaLomo (its fused update in the backward pass; weight decay on, the learning rate warmed up for
one step and decayed along a cosine over ten), each step on two 16-token sequences with every
position scored. Recorded: each step's loss, and every tensor after the fifth step (its norm,
and the values of a few). Tessera's test (`tests/adalomo_anchor.rs`) loads the folders, runs its
AdaLomo on the same data and checks the tensors, without torch.

    /tmp/torchenv/bin/python tests/anchors/lomo_adalomo.py
"""
import json
import math
import os

import torch

# lomo-optim keeps its state on CUDA; this CPU run keeps it where it is.
torch.Tensor.cuda = lambda self, *args, **kwargs: self
from lomo_optim import AdaLomo  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data", "families")
MODEL = "qwen2-tiny.gguf"
OUT = os.path.join(DATA, "adalomo")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FULL = ["layers.1.self_attn.q_proj.", "layers.0.mlp.down_proj.", "layers.1.self_attn.v_proj."]
STEPS = 5
LEARNING_RATE = 0.05
WARMUP, TOTAL = 1, 10
EPS_SCALE = 1e-2
WEIGHT_DECAY = 0.01
SEQUENCE = 16


def scheduled_rate(step):
    """Tessera's schedule (`train::optim::scheduled_rate`): linear warmup, then cosine to zero."""
    if step <= WARMUP:
        return LEARNING_RATE * step / max(WARMUP, 1)
    progress = min((step - WARMUP) / max(TOTAL - WARMUP, 1), 1.0)
    return LEARNING_RATE * 0.5 * (1.0 + math.cos(math.pi * progress))


def batches():
    """Five batches of two 16-token sequences, from the family's reference prompts."""
    refs = json.load(open(os.path.join(DATA, "qwen2-tiny.refs.json")))
    sequences = [(c["prompt_ids"] + c["greedy"])[:SEQUENCE] for c in refs["generation"]]
    return [[sequences[(2 * s) % len(sequences)], sequences[(2 * s + 1) % len(sequences)]] for s in range(STEPS)]


def adapter(use_dora):
    model = AutoModelForCausalLM.from_pretrained(DATA, gguf_file=MODEL, dtype=torch.float32, attn_implementation="eager")
    model.config.use_cache = False
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, use_dora=use_dora, init_lora_weights=False)
    model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def saved_name(name):
    return name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def save(model, folder):
    model.save_pretrained(folder, safe_serialization=True)
    config_path = os.path.join(folder, "adapter_config.json")
    config = json.load(open(config_path))
    config["base_model_name_or_path"] = MODEL
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    readme = os.path.join(folder, "README.md")
    if os.path.exists(readme):
        os.remove(readme)


def train(model):
    model.train()
    optimizer = AdaLomo(model, lr=LEARNING_RATE, eps=(1e-30, EPS_SCALE), weight_decay=WEIGHT_DECAY)
    losses = []
    for step, batch in enumerate(batches(), start=1):
        ids = torch.tensor(batch)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.fused_backward(loss, scheduled_rate(step))
        losses.append(loss.item())
    tensors = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            values = p.detach().flatten()
            entry = {"norm": values.norm().item(), "numel": values.numel()}
            if any(f in name for f in FULL):
                entry["values"] = values.tolist()
            tensors[saved_name(name)] = entry
    return {"losses": losses, "tensors": tensors}


def main():
    torch.manual_seed(0)
    anchors = {
        "model": MODEL,
        "batches": batches(),
        "learning_rate": LEARNING_RATE,
        "warmup_steps": WARMUP,
        "total_steps": TOTAL,
        "eps_scale": EPS_SCALE,
        "weight_decay": WEIGHT_DECAY,
        "torch": torch.__version__,
        "peft": __import__("peft").__version__,
        "cases": {},
    }
    for kind, use_dora in [("lora", False), ("dora", True)]:
        model = adapter(use_dora)
        save(model, os.path.join(OUT, kind))
        anchors["cases"][kind] = train(model)
        print(kind, "losses", anchors["cases"][kind]["losses"])
    with open(os.path.join(OUT, "anchors.json"), "w") as f:
        json.dump(anchors, f)


if __name__ == "__main__":
    main()
