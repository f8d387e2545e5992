"""The DPO anchor of issue 36: TRL's DPOTrainer loss, rewards and LoRA gradients for a few
preference pairs on a family test model, its weights dequantized to f32 from the GGUF.

The job continues an adapter, as Tessera's DPO does: a PEFT LoRA (r4, alpha 8, all seven linear
targets, B drawn at random) is the version it starts from, which DPOTrainer copies as its
reference (the "ref" adapter); the policy is that adapter moved on by a second random step, as
after some training, so that the rewards are not zero. The pairs are token ids (prompt, chosen,
rejected), so that no tokenizer or chat template stands between the two implementations.
Writes both adapters (PEFT files, `reference/` and `policy/`) and `trl_dpo.json` (inputs, TRL's
metrics, and for each LoRA tensor the gradient's norm and sampled entries) under
tests/data/dpo_anchor/, which the Rust test `tests/dpo_anchor.rs` reads. Needs torch, transformers, peft, trl and gguf:

    /tmp/torchenv/bin/python tests/anchors/trl_dpo.py
"""
import json
import os
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "data", "families", "qwen2-tiny.gguf")
OUT = os.path.join(ROOT, "data", "dpo_anchor")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BETA = 0.1
SAMPLES = 8


def check_reference_copied(model):
    """DPOTrainer keeps the starting adapter as "ref": the reference the rewards are taken against."""
    if "ref" not in model.peft_config:
        raise SystemExit("DPOTrainer made no `ref` adapter: this TRL takes another reference")


def pairs(vocab, generator):
    """Three pairs of random token ids: a prompt and two different answers."""
    draw = lambda n: torch.randint(10, vocab, (n,), generator=generator).tolist()
    return [
        {"prompt": draw(p), "chosen": draw(c), "rejected": draw(r)}
        for p, c, r in [(7, 5, 4), (9, 3, 6), (5, 6, 6)]
    ]


def batch(cases):
    """TRL's layout: every chosen sequence, then every rejected one, right-padded."""
    rows = [(c["prompt"], c["chosen"]) for c in cases] + [(c["prompt"], c["rejected"]) for c in cases]
    width = max(len(p) + len(a) for p, a in rows)
    ids, attention, completion = [], [], []
    for prompt, answer in rows:
        pad = width - len(prompt) - len(answer)
        ids.append(prompt + answer + [0] * pad)
        attention.append([1] * (len(prompt) + len(answer)) + [0] * pad)
        completion.append([0] * len(prompt) + [1] * len(answer) + [0] * pad)
    tensor = lambda rows: torch.tensor(rows, dtype=torch.long)
    return {"input_ids": tensor(ids), "attention_mask": tensor(attention), "completion_mask": tensor(completion)}


def sampled(gradient):
    """The norm, and entries at evenly spaced flat indices plus the largest in magnitude."""
    flat = gradient.flatten()
    indices = [int(i) for i in torch.linspace(0, flat.numel() - 1, SAMPLES).round().long()]
    indices.append(int(flat.abs().argmax()))
    return {"norm": flat.norm().item(), "indices": indices, "values": [flat[i].item() for i in indices]}


def save(model, folder):
    model.save_pretrained(folder, selected_adapters=["default"])
    os.remove(os.path.join(folder, "README.md"))  # PEFT's model card: nothing the test reads


def randomize_b(model, generator, scale):
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name and ".default." in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def main():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(MODEL), gguf_file=os.path.basename(MODEL), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(MODEL), gguf_file=os.path.basename(MODEL))
    # The GGUF's weights are dequantized to f32 on loading; only the marker stays, and it would
    # stop the Trainer.
    model.is_quantized, model.hf_quantizer = False, None
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(1)
    randomize_b(model, generator, 0.05)
    save(model, os.path.join(OUT, "reference"))
    cases = pairs(model.config.vocab_size, generator)

    with tempfile.TemporaryDirectory() as scratch:
        args = DPOConfig(output_dir=scratch, beta=BETA, precompute_ref_log_probs=False, report_to=[], use_cpu=True, per_device_train_batch_size=len(cases))
        placeholder = Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})
        trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=placeholder, processing_class=tokenizer)
        check_reference_copied(model)
        randomize_b(model, generator, 0.02)
        save(model, os.path.join(OUT, "policy"))
        model.train()
        loss = trainer._compute_loss(trainer.model, batch(cases), return_outputs=False)
        loss.backward()
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith(("rewards/", "logps/"))}

    gradients = {
        name.replace(".default", ""): sampled(parameter.grad)
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and ".default." in name
    }
    result = {
        "model": "tests/data/families/qwen2-tiny.gguf",
        "adapters": "tests/data/dpo_anchor/{reference,policy} (PEFT, r4, alpha 8)",
        "beta": BETA,
        "pairs": cases,
        "loss": loss.item(),
        "metrics": metrics,
        "gradients": gradients,
        "versions": {"torch": torch.__version__, "trl": __import__("trl").__version__, "peft": __import__("peft").__version__, "transformers": __import__("transformers").__version__},
    }
    with open(os.path.join(OUT, "trl_dpo.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"loss {loss.item():.6f}", json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
