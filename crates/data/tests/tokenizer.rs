mod common;

use std::time::Instant;

use agora_data::tokenizer::{train_bpe, Tokenizer, ENDOFTEXT};
use common::{msg, shakespeare_excerpt, tinyshakespeare, tinyshakespeare_text};

#[test]
fn training_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = shakespeare_excerpt(dir.path(), 200_000);
    let a = train_bpe(std::slice::from_ref(&corpus), 512).unwrap();
    let b = train_bpe(std::slice::from_ref(&corpus), 512).unwrap();
    assert_eq!(a.to_json_string(), b.to_json_string());
    assert_eq!(a.hash(), b.hash());
    let c = train_bpe(&[corpus], 400).unwrap();
    assert_ne!(a.hash(), c.hash(), "different vocab sizes give different tokenizers");
}

#[test]
fn trained_tokenizer_shape() {
    let started = Instant::now();
    let tok = train_bpe(&[tinyshakespeare()], 512).unwrap();
    eprintln!("train_bpe(tinyshakespeare, 512): {:.2?}", started.elapsed());
    assert_eq!(tok.vocab_size(), 512);
    assert_eq!(tok.eos_id(), 0);
    assert_eq!(tok.bos_id(), 0);
    assert_eq!(tok.token_to_id(ENDOFTEXT), Some(0));
    // Every byte is in the alphabet, so text the corpus never saw still encodes and round-trips.
    for text in ["naïve café ☃ 日本語 🙂", "\t\r\n  \u{0}", "<|endoftext|>", ""] {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }
    assert_eq!(tok.encode("a<|endoftext|>b").unwrap()[1], 0, "special token is recognized");
}

#[test]
fn round_trip_on_tinyshakespeare_and_chunked_encoding_matches() {
    let tok = train_bpe(&[tinyshakespeare()], 512).unwrap();
    let text = tinyshakespeare_text();

    let started = Instant::now();
    let ids = tok.encode(&text).unwrap();
    let elapsed = started.elapsed();
    eprintln!("encode {} bytes -> {} tokens: {elapsed:.2?}", text.len(), ids.len());
    assert!(elapsed.as_secs_f64() < 5.0, "encoding 1.1 MB took {elapsed:.2?}");
    assert!(ids.len() * 10 < text.len() * 6, "BPE compresses: {} tokens", ids.len());
    assert_eq!(tok.decode(&ids).unwrap(), text);

    // The parallel line-chunked path must give exactly what one whole-text encoding gives.
    let started = Instant::now();
    let whole = tok.inner().encode_fast(text.as_str(), false).unwrap();
    eprintln!("unchunked encode: {:.2?}", started.elapsed());
    assert_eq!(ids, whole.get_ids());
}

#[test]
fn hash_ignores_file_formatting_and_survives_save_load() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = shakespeare_excerpt(dir.path(), 50_000);
    let tok = train_bpe(&[corpus], 300).unwrap();

    let pretty = dir.path().join("pretty.json");
    tok.save(&pretty).unwrap();
    let compact = dir.path().join("compact.json");
    let value: serde_json::Value = serde_json::from_str(&tok.to_json_string()).unwrap();
    std::fs::write(&compact, serde_json::to_string(&value).unwrap()).unwrap();

    let a = Tokenizer::from_file(&pretty).unwrap();
    let b = Tokenizer::from_file(&compact).unwrap();
    assert_eq!(a.hash(), tok.hash());
    assert_eq!(b.hash(), tok.hash());
    assert_eq!(a.hash_hex().len(), 64);
    let sample = "To be, or not to be: that is the question.";
    assert_eq!(a.encode(sample).unwrap(), tok.encode(sample).unwrap());
    let from_bytes = Tokenizer::from_json_bytes(tok.to_json_string().as_bytes()).unwrap();
    assert_eq!(from_bytes.hash(), tok.hash());
}

#[test]
fn trains_from_jsonl_and_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let text = tinyshakespeare_text();
    let paragraphs: Vec<&str> = text[..100_000].split("\n\n").collect();
    let jsonl = dir.path().join("c.jsonl");
    let lines: Vec<String> = paragraphs.iter().map(|p| serde_json::json!({ "text": p }).to_string()).collect();
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let parquet = dir.path().join("c.parquet");
    let values: Vec<Option<&str>> = paragraphs.iter().map(|p| Some(*p)).collect();
    common::write_parquet(&parquet, "text", &values, 3);

    let a = train_bpe(&[jsonl], 400).unwrap();
    let b = train_bpe(&[parquet], 400).unwrap();
    assert_eq!(a.hash(), b.hash(), "same documents, same tokenizer, whatever the container");
}

#[test]
fn errors_are_actionable() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.json");
    let e = msg(Tokenizer::from_file(&missing).unwrap_err());
    assert!(e.contains("nope.json") && e.contains("cannot read"), "{e}");

    let corrupt = dir.path().join("corrupt.json");
    std::fs::write(&corrupt, "{ not json").unwrap();
    let e = msg(Tokenizer::from_file(&corrupt).unwrap_err());
    assert!(e.contains("corrupt.json") && e.contains("not a valid tokenizer.json"), "{e}");

    let e = msg(train_bpe(&[tinyshakespeare()], 100).unwrap_err());
    assert!(e.contains("too small"), "{e}");

    // A valid tokenizer.json without any end-of-text token is rejected with the rule spelled out.
    let corpus = shakespeare_excerpt(dir.path(), 20_000);
    let tok = train_bpe(&[corpus], 300).unwrap();
    let renamed = tok.to_json_string().replace(ENDOFTEXT, "<|custom|>");
    let e = msg(Tokenizer::from_json_bytes(renamed.as_bytes()).unwrap_err());
    assert!(e.contains("no end-of-text token"), "{e}");
    // ...but the documented fallbacks are honoured.
    let llama_like = tok.to_json_string().replace(ENDOFTEXT, "</s>");
    let t = Tokenizer::from_json_bytes(llama_like.as_bytes()).unwrap();
    assert_eq!((t.eos_id(), t.bos_id()), (0, 0));

    let e = msg(tok.decode(&[0, 1, 100_000]).unwrap_err());
    assert!(e.contains("100000") && e.contains("out of range"), "{e}");
}
