"""Loads an agora training checkpoint with transformers (model + tokenizer) and decodes greedily.

  hf_checkpoint.py --checkpoint DIR --prompt TEXT --max-new-tokens N
Prints {"prompt_ids": [...], "completion_ids": [...], "text": ...} as JSON.
"""
import argparse
import json

import torch
from transformers import AutoTokenizer, LlamaForCausalLM


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    model = LlamaForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    completion = out[0, ids.shape[1]:].tolist()
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    print(json.dumps({"prompt_ids": ids[0].tolist(), "completion_ids": completion, "text": text}))


if __name__ == "__main__":
    main()
