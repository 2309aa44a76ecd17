"""Cross-checks agora's Llama against Hugging Face transformers (fp32, CPU).

  hf_logits.py check --checkpoint DIR --inputs FILE
      FILE is a safetensors file with `ids` (int64 [batch, seq]) and agora's `logits` for them. Loads DIR with
      LlamaForCausalLM.from_pretrained and fails unless the logits agree to --tolerance (max abs diff).
  hf_logits.py same --checkpoint DIR --other DIR2 --inputs FILE
      Loads both directories with LlamaForCausalLM.from_pretrained and fails unless their logits for the `ids`
      in FILE agree to --tolerance: how a grown model is checked against the one it was grown from.
  hf_logits.py make --checkpoint DIR --inputs FILE [--tied]
      Saves a random tiny LlamaForCausalLM to DIR with save_pretrained, and its logits for random ids to FILE,
      for agora to load and compare.
"""
import argparse
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM


def logits_of(checkpoint, ids):
    model = LlamaForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def check(args):
    data = load_file(args.inputs)
    diff = (logits_of(args.checkpoint, data["ids"]) - data["logits"]).abs().max().item()
    print(f"max abs logit difference agora vs transformers: {diff:.3e} (tolerance {args.tolerance:.0e})")
    if not diff <= args.tolerance:
        sys.exit(1)


def same(args):
    ids = load_file(args.inputs)["ids"]
    a, b = logits_of(args.checkpoint, ids), logits_of(args.other, ids)
    diff = (a - b).abs().max().item()
    print(f"max abs logit difference between the two checkpoints in transformers: {diff:.3e} "
          f"(tolerance {args.tolerance:.0e}; logits up to {a.abs().max().item():.2f})")
    if not diff <= args.tolerance:
        sys.exit(1)


def make(args):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=args.tied,
    )
    model = LlamaForCausalLM(config).eval()
    # Random init gives tiny-norm gains of exactly 1; perturb them so the test sees every weight.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(args.checkpoint, safe_serialization=True)
    ids = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.contiguous()
    save_file({"ids": ids, "logits": logits}, args.inputs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["check", "same", "make"])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--other")
    parser.add_argument("--tied", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    {"check": check, "same": same, "make": make}[args.mode](args)


if __name__ == "__main__":
    main()
