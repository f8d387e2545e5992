"""The DoRA and IA³ anchor of issue 35: PEFT + torch on the CPU, on a family test model
dequantized to f32 from its GGUF.

Builds a small DoRA adapter (r4, alpha 8, all seven linear layers, magnitudes moved off their
initial norms) and an IA³ adapter (k, v and down, scales moved off 1) with PEFT, saves both as PEFT
folders, and records for each, on one prompt: the log-softmax at every position (the next token's
and the top 5), then one training step's loss (mean next-token cross-entropy over the prompt) and
its gradients (every tensor's norm, the values of a few). Tessera's tests (`tests/delta_anchors.rs`)
load the folders and check their forward and gradients against this file, without torch.

    /tmp/torchenv/bin/python tests/anchors/peft_delta.py
"""
import json
import os

import torch
from peft import IA3Config, LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data", "families")
MODEL = "qwen2-tiny.gguf"
OUT = os.path.join(DATA, "delta")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Gradients recorded in full (the rest by their norms).
FULL = ["layers.1.self_attn.q_proj.", "layers.2.mlp.down_proj.", "layers.0.self_attn.v_proj.", "layers.1.self_attn.k_proj."]


def base_model():
    model = AutoModelForCausalLM.from_pretrained(DATA, gguf_file=MODEL, dtype=torch.float32, attn_implementation="eager")
    model.config.use_cache = False
    return model


def prompt_ids():
    refs = json.load(open(os.path.join(DATA, "qwen2-tiny.refs.json")))
    case = refs["generation"][0]
    return (case["prompt_ids"] + case["greedy"])[:24]


def dora(model):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, use_dora=True, init_lora_weights=False)
    model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
            elif "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
        # Magnitudes start at ‖W + s·B·A‖ (DoRA is then LoRA): move them so that they matter.
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
    return model


def ia3(model):
    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=True)
    model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=generator))
    return model


def saved_name(name):
    """A parameter's name as PEFT saves it: without the adapter's name (and the magnitude without
    `.weight`)."""
    return name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def record(model, ids, folder):
    model.save_pretrained(folder, safe_serialization=True)
    # The config names the base by the file it came from, not where it lay on this machine.
    config_path = os.path.join(folder, "adapter_config.json")
    config = json.load(open(config_path))
    config["base_model_name_or_path"] = MODEL
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    model.train()
    x = torch.tensor([ids])
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    logprobs = torch.log_softmax(out.logits[0].detach(), dim=-1)
    positions = []
    for i in range(len(ids)):
        top = torch.topk(logprobs[i], 5)
        positions.append({
            "next": ids[i + 1] if i + 1 < len(ids) else None,
            "next_logprob": logprobs[i, ids[i + 1]].item() if i + 1 < len(ids) else None,
            "top": [[int(t), float(v)] for v, t in zip(top.values, top.indices)],
        })
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad.detach().flatten()
            entry = {"norm": g.norm().item(), "numel": g.numel()}
            if any(f in name for f in FULL):
                entry["values"] = g.tolist()
            grads[saved_name(name)] = entry
    return {"positions": positions, "loss": out.loss.item(), "grads": grads}


def main():
    torch.manual_seed(0)
    ids = prompt_ids()
    anchors = {"model": MODEL, "prompt_ids": ids, "peft": __import__("peft").__version__, "torch": torch.__version__, "cases": {}}
    for kind, build in [("dora", dora), ("ia3", ia3)]:
        model = build(base_model())
        anchors["cases"][kind] = record(model, ids, os.path.join(OUT, kind))
        print(kind, "loss", anchors["cases"][kind]["loss"])
    with open(os.path.join(OUT, "anchors.json"), "w") as f:
        json.dump(anchors, f)
    # PEFT writes a README beside each adapter; the folders hold only what Tessera reads.
    for kind in anchors["cases"]:
        readme = os.path.join(OUT, kind, "README.md")
        if os.path.exists(readme):
            os.remove(readme)


if __name__ == "__main__":
    main()
