//! Exports a trained tokenizer in Hugging Face format and checks, with Python `transformers`,
//! that it loads and encodes exactly like the Rust side (tests/python/test_tokenizer_hf.py).

mod common;

use std::path::PathBuf;
use std::process::Command;

use agora_data::tokenizer::{train_bpe, write_hf_tokenizer_files};

fn python() -> PathBuf {
    let path = match std::env::var_os("AGORA_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => {
            let home = std::env::var_os("HOME").expect("HOME is set");
            PathBuf::from(home).join(".cache/agora/venv/bin/python")
        }
    };
    assert!(
        path.exists(),
        "Python with transformers not found at {} (set AGORA_PYTHON, or run scripts/setup.sh --test)",
        path.display()
    );
    path
}

#[test]
fn transformers_loads_exported_tokenizer_and_agrees() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let corpus = common::shakespeare_excerpt(dir.path(), 100_000);
    let tok = train_bpe(&[corpus], 512).unwrap();
    let out = dir.path().join("hf");
    write_hf_tokenizer_files(&tok, &out, 256).unwrap();

    let texts = [
        "First Citizen:\nBefore we proceed any further, hear me speak.",
        "  leading spaces, trailing spaces  ",
        "naïve café ☃ 日本語 🙂 — “quotes”",
        "line one\r\nline two\n\n\ttabbed",
        "end of one document<|endoftext|>start of the next",
        "don't, can't, I'll, we've 12345 3.14",
        "",
    ];
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t).unwrap()).collect();
    let expected = serde_json::json!({
        "texts": texts,
        "ids": ids,
        "eos_id": tok.eos_id(),
        "vocab_size": tok.vocab_size(),
        "model_max_length": 256,
    });
    std::fs::write(out.join("expected.json"), expected.to_string()).unwrap();

    let script = std::path::PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()),
    )
    .join("../../tests/python/test_tokenizer_hf.py")
    .to_string_lossy()
    .into_owned();
    let script = script.as_str();
    let has_pytest = Command::new(&python).args(["-c", "import pytest"]).output().is_ok_and(|o| o.status.success());
    let mut cmd = Command::new(&python);
    if has_pytest {
        cmd.args(["-m", "pytest", "-q", "-p", "no:cacheprovider", script]);
    } else {
        cmd.arg(script);
    }
    let output = cmd
        .env("AGORA_TOKENIZER_DIR", &out)
        .env("TOKENIZERS_PARALLELISM", "false")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{} failed ({}):\n{stdout}\n{stderr}", script, output.status);
    eprintln!("{stdout}");
}
