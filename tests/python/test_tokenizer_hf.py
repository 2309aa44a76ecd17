"""Checks that a tokenizer exported by agora loads in Hugging Face `transformers` and agrees
with the Rust encoder.

The directory named by AGORA_TOKENIZER_DIR must hold the files written by
`agora_data::write_hf_tokenizer_files` plus an `expected.json`:

    {"texts": [...], "ids": [[...], ...], "eos_id": 0, "vocab_size": 512, "model_max_length": 256}

where `ids[i]` is the Rust encoding of `texts[i]`. The Rust test
`cargo test -p agora-data --test hf_tokenizer` writes such a directory and runs this file.

Runs under pytest or as a plain script (`python tests/python/test_tokenizer_hf.py`).
"""

import json
import os
import sys
from pathlib import Path

ENDOFTEXT = "<|endoftext|>"


def _load():
    directory = os.environ.get("AGORA_TOKENIZER_DIR")
    if not directory:
        raise RuntimeError(
            "set AGORA_TOKENIZER_DIR to a directory written by the Rust test "
            "(cargo test -p agora-data --test hf_tokenizer)"
        )
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    expected = json.loads((Path(directory) / "expected.json").read_text(encoding="utf-8"))
    tok = AutoTokenizer.from_pretrained(directory)
    assert isinstance(tok, PreTrainedTokenizerFast), f"loaded {type(tok).__name__}"
    return tok, expected


def test_special_tokens():
    tok, expected = _load()
    assert tok.eos_token == ENDOFTEXT, tok.eos_token
    assert tok.bos_token == ENDOFTEXT, tok.bos_token
    assert tok.eos_token_id == expected["eos_id"]
    assert tok.bos_token_id == expected["eos_id"]
    assert len(tok) == expected["vocab_size"], (len(tok), expected["vocab_size"])
    assert tok.model_max_length == expected["model_max_length"]


def test_encodings_match_rust():
    tok, expected = _load()
    assert len(expected["texts"]) == len(expected["ids"]) > 0
    for text, ids in zip(expected["texts"], expected["ids"]):
        got = tok.encode(text, add_special_tokens=False)
        assert got == ids, f"{text!r}: transformers {got} != rust {ids}"
        # The default call must not add BOS/EOS either: training data has none.
        got = tok(text)["input_ids"]
        assert got == ids, f"{text!r}: transformers (default call) {got} != rust {ids}"


def test_decode_round_trip():
    tok, expected = _load()
    for text, ids in zip(expected["texts"], expected["ids"]):
        decoded = tok.decode(ids)
        assert decoded == text, f"decode mismatch: {decoded!r} != {text!r}"


def _main():
    tests = [test_special_tokens, test_encodings_match_rust, test_decode_round_trip]
    failed = 0
    for test in tests:
        try:
            test()
        except Exception as e:  # report every failure, then exit non-zero
            failed += 1
            print(f"FAIL {test.__name__}: {type(e).__name__}: {e}", file=sys.stderr)
        else:
            print(f"ok   {test.__name__}")
    print(f"{len(tests) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main())
