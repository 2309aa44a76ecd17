mod common;

use std::path::Path;
use std::time::Instant;

use agora_data::shard::{prepare, Dtype, Shard, Split, HEADER_LEN};
use agora_data::tokenizer::train_bpe;
use common::{msg, shakespeare_excerpt, tinyshakespeare};

const TOK_HASH: [u8; 32] = [7; 32];

fn write_and_open(dir: &Path, tokens: &[u32], vocab_size: usize) -> Shard {
    let path = dir.join("t.shard");
    let hash = Shard::write(&path, tokens, TOK_HASH, vocab_size).unwrap();
    let shard = Shard::open(&path).unwrap();
    assert_eq!(shard.content_hash, hash);
    shard
}

#[test]
fn round_trip_u16_and_u32() {
    let dir = tempfile::tempdir().unwrap();
    let small: Vec<u32> = (0..1000).map(|i| (i * 37) % 65536).collect();
    let shard = write_and_open(dir.path(), &small, 65536);
    assert_eq!(shard.dtype(), Dtype::U16);
    assert_eq!(shard.tokens(), small.as_slice());
    assert_eq!(shard.len(), 1000);
    assert_eq!(shard.tokenizer_hash, TOK_HASH);
    assert_eq!(std::fs::metadata(dir.path().join("t.shard")).unwrap().len(), (HEADER_LEN + 2000) as u64);

    let large: Vec<u32> = vec![0, 65536, 100_000, 3];
    let shard = write_and_open(dir.path(), &large, 100_001);
    assert_eq!(shard.dtype(), Dtype::U32);
    assert_eq!(shard.tokens(), large.as_slice());
    assert_eq!(shard.content_hash_hex().len(), 64);

    let empty = write_and_open(dir.path(), &[], 10);
    assert!(empty.is_empty());

    let in_memory = Shard::from_tokens(large.clone(), TOK_HASH, 100_001).unwrap();
    assert_eq!(in_memory.content_hash, shard.content_hash);
}

#[test]
fn rejects_ids_outside_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    let e = msg(Shard::write(&dir.path().join("x.shard"), &[1, 2, 70_000], TOK_HASH, 65536).unwrap_err());
    assert!(e.contains("x.shard") && e.contains("id 70000"), "{e}");
    assert!(!dir.path().join("x.shard").exists());
}

#[test]
fn detects_corruption_and_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let tokens: Vec<u32> = (0..500).collect();
    let path = dir.path().join("t.shard");
    Shard::write(&path, &tokens, TOK_HASH, 1000).unwrap();
    let good = std::fs::read(&path).unwrap();
    let open_err = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        msg(Shard::open(&path).unwrap_err())
    };

    let mut flipped = good.clone();
    flipped[HEADER_LEN + 123] ^= 0x01;
    assert_eq!(open_err(&flipped), format!("{}: shard is corrupt: content hash mismatch", path.display()));

    let mut bad_hash = good.clone();
    bad_hash[60] ^= 0x80; // inside the stored content hash
    assert!(open_err(&bad_hash).ends_with("shard is corrupt: content hash mismatch"));

    let e = open_err(&good[..good.len() - 1]);
    assert!(e.starts_with(&path.display().to_string()) && e.contains("shard is corrupt"), "{e}");
    let e = open_err(&good[..40]);
    assert!(e.contains("shard is corrupt: truncated header"), "{e}");
    let e = open_err(&[good.as_slice(), &[0, 0]].concat());
    assert!(e.contains("shard is corrupt"), "{e}");

    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    assert!(open_err(&bad_magic).contains("not an agora token shard"));
    let mut bad_version = good.clone();
    bad_version[8] = 9;
    assert!(open_err(&bad_version).contains("unsupported shard format version 9"));
    let mut bad_dtype = good.clone();
    bad_dtype[12] = 7;
    assert!(open_err(&bad_dtype).contains("unknown dtype code 7"));
    let mut huge_count = good.clone();
    huge_count[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(open_err(&huge_count).contains("shard is corrupt"));

    std::fs::write(&path, &good).unwrap();
    assert_eq!(Shard::open(&path).unwrap().tokens(), tokens.as_slice());
    let e = msg(Shard::open(&dir.path().join("none.shard")).unwrap_err());
    assert!(e.contains("none.shard") && e.contains("cannot read shard"), "{e}");
}

#[test]
fn prepare_tinyshakespeare_holds_out_the_last_tenth() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = tinyshakespeare();
    let text = common::tinyshakespeare_text();
    let tok = train_bpe(std::slice::from_ref(&corpus), 512).unwrap();

    let started = Instant::now();
    let report = prepare(std::slice::from_ref(&corpus), &tok, dir.path(), 0.1).unwrap();
    eprintln!("prepare(tinyshakespeare): {:.2?}, {report:?}", started.elapsed());

    let Split::Text { byte, text_len } = report.split else { panic!("expected a text split") };
    assert_eq!(text_len, text.len());
    assert!(byte >= text.len() * 9 / 10 && byte < text.len() * 9 / 10 + 200, "cut at {byte}");
    assert_eq!(&text[byte - 1..byte], "\n", "cut right after a newline");

    let train = Shard::open(&report.train_path).unwrap();
    let val = Shard::open(&report.val_path).unwrap();
    assert_eq!((train.len(), val.len()), (report.train_tokens, report.val_tokens));
    assert_eq!(train.tokenizer_hash, tok.hash());
    assert_eq!(val.content_hash, report.val_content_hash);
    assert_eq!(tok.decode(train.tokens()).unwrap(), text[..byte]);
    assert_eq!(tok.decode(val.tokens()).unwrap(), text[byte..]);
    let frac = val.len() as f64 / (train.len() + val.len()) as f64;
    assert!((0.08..0.12).contains(&frac), "validation fraction {frac}");
}

#[test]
fn prepare_multi_document_corpus_splits_by_document() {
    let dir = tempfile::tempdir().unwrap();
    let excerpt = shakespeare_excerpt(dir.path(), 30_000);
    let tok = train_bpe(&[excerpt], 300).unwrap();
    let jsonl = dir.path().join("docs.jsonl");
    let docs: Vec<String> = (0..20).map(|i| format!("document number {i}.")).collect();
    let lines: Vec<String> = docs.iter().map(|d| serde_json::json!({ "text": d }).to_string()).collect();
    std::fs::write(&jsonl, lines.join("\n")).unwrap();

    let out = dir.path().join("out");
    let report = prepare(&[jsonl], &tok, &out, 0.1).unwrap();
    assert_eq!(report.split, Split::Documents { train_documents: 18, val_documents: 2 });
    let eos = tok.decode(&[tok.eos_id()]).unwrap();
    let train = Shard::open(&report.train_path).unwrap();
    let val = Shard::open(&report.val_path).unwrap();
    assert_eq!(tok.decode(train.tokens()).unwrap(), docs[..18].join(&eos));
    assert_eq!(tok.decode(val.tokens()).unwrap(), docs[18..].join(&eos));

    let e = msg(prepare(&[dir.path().join("docs.jsonl")], &tok, &out, 1.5).unwrap_err());
    assert!(e.contains("between 0 and 1"), "{e}");
    let tiny = dir.path().join("tiny.txt");
    std::fs::write(&tiny, "one line\n").unwrap();
    let e = msg(prepare(&[tiny], &tok, &out, 0.1).unwrap_err());
    assert!(e.contains("too small to split"), "{e}");
}

mod untrusted_bytes {
    use agora_data::Shard;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, .. ProptestConfig::default() })]
        /// Shards arrive from the network as blobs: any corruption is an error, never a panic or a
        /// silently different token list.
        #[test]
        fn corrupted_shard_bytes_fail_cleanly(tokens in proptest::collection::vec(0u32..300, 1..200), index in any::<usize>(), value in any::<u8>(), cut in any::<bool>()) {
            let shard = Shard::from_tokens(tokens.clone(), [7; 32], 300).unwrap();
            let mut bytes = shard.to_bytes();
            let parsed = Shard::from_bytes(&bytes).unwrap();
            prop_assert_eq!(parsed.tokens(), &tokens[..]);
            let i = index % bytes.len();
            if cut { bytes.truncate(i) } else { bytes[i] = value }
            if let Ok(parsed) = Shard::from_bytes(&bytes) {
                // Only a change that leaves the payload intact (or a no-op) may parse.
                prop_assert_eq!(parsed.tokens(), &tokens[..]);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Shard::from_bytes(&bytes);
        }
    }
}
