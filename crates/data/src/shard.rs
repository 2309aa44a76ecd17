//! Token shards: a checksummed binary file of token ids, and [`prepare`], which tokenizes a
//! corpus into `train.shard` and `val.shard`.
//!
//! Layout (all integers little-endian), [`HEADER_LEN`] bytes of header then the payload:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0  | 8  | magic `b"AGORASHD"` |
//! | 8  | 4  | format version (u32, = 1) |
//! | 12 | 4  | dtype code (u32): 1 = u16 tokens, 2 = u32 tokens |
//! | 16 | 8  | token count (u64) |
//! | 24 | 32 | tokenizer hash ([`Tokenizer::hash`]) |
//! | 56 | 32 | content hash: BLAKE3 of the payload bytes exactly as stored |
//! | 88 | …  | payload: token count × dtype width bytes |
//!
//! u16 is used whenever every id fits (vocabulary size ≤ 65536), halving the file size.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::corpus;
use crate::tokenizer::Tokenizer;

/// File magic, the first 8 bytes of every shard.
pub const MAGIC: [u8; 8] = *b"AGORASHD";
/// The shard format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the fixed header in bytes.
pub const HEADER_LEN: usize = 88;
/// Default fraction of a corpus held out for validation by [`prepare`].
pub const DEFAULT_VAL_FRACTION: f64 = 0.1;

/// How token ids are stored in a shard's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    U16,
    U32,
}

impl Dtype {
    /// The narrowest dtype that holds every id of a vocabulary of `vocab_size` ids.
    pub fn for_vocab_size(vocab_size: usize) -> Dtype {
        if vocab_size <= 1 << 16 {
            Dtype::U16
        } else {
            Dtype::U32
        }
    }

    fn code(self) -> u32 {
        match self {
            Dtype::U16 => 1,
            Dtype::U32 => 2,
        }
    }

    fn from_code(code: u32) -> Option<Dtype> {
        match code {
            1 => Some(Dtype::U16),
            2 => Some(Dtype::U32),
            _ => None,
        }
    }

    /// Bytes per token.
    pub fn width(self) -> usize {
        match self {
            Dtype::U16 => 2,
            Dtype::U32 => 4,
        }
    }
}

/// A token shard held in memory.
#[derive(Clone, Debug)]
pub struct Shard {
    /// Hash of the tokenizer that produced the tokens ([`Tokenizer::hash`]).
    pub tokenizer_hash: [u8; 32],
    /// BLAKE3 of the payload as stored (so it depends on the dtype as well as the tokens).
    pub content_hash: [u8; 32],
    dtype: Dtype,
    tokens: Vec<u32>,
}

impl Shard {
    /// Builds an in-memory shard (what [`Shard::write`] then [`Shard::open`] would give).
    ///
    /// Fails if a token id is not below `vocab_size`.
    pub fn from_tokens(tokens: Vec<u32>, tokenizer_hash: [u8; 32], vocab_size: usize) -> Result<Shard> {
        let dtype = Dtype::for_vocab_size(vocab_size);
        check_ids(&tokens, vocab_size)?;
        let content_hash = *blake3::hash(&encode_payload(&tokens, dtype)).as_bytes();
        Ok(Shard { tokenizer_hash, content_hash, dtype, tokens })
    }

    /// Writes `tokens` as a shard file and returns the content hash.
    ///
    /// The file is written to a temporary name and renamed into place, so a crash never leaves
    /// a partial shard under `path`. Fails if a token id is not below `vocab_size`.
    pub fn write(path: &Path, tokens: &[u32], tokenizer_hash: [u8; 32], vocab_size: usize) -> Result<[u8; 32]> {
        let shard = Shard::from_tokens(tokens.to_vec(), tokenizer_hash, vocab_size)
            .with_context(|| format!("{}: cannot write shard", path.display()))?;
        let bytes = shard.to_bytes();
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(".tmp");
        let tmp = path.with_file_name(tmp_name);
        fs::write(&tmp, &bytes).with_context(|| format!("{}: cannot write shard", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("{}: cannot move shard into place from {}", path.display(), tmp.display()))?;
        Ok(shard.content_hash)
    }

    /// The shard file's bytes (header + payload), as [`Shard::write`] stores them.
    pub fn to_bytes(&self) -> Vec<u8> {
        let payload = encode_payload(&self.tokens, self.dtype);
        let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&self.dtype.code().to_le_bytes());
        bytes.extend_from_slice(&(self.tokens.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&self.tokenizer_hash);
        bytes.extend_from_slice(&self.content_hash);
        debug_assert_eq!(bytes.len(), HEADER_LEN);
        bytes.extend_from_slice(&payload);
        bytes
    }

    /// Parses and fully validates shard bytes (as [`Shard::open`] does for a file).
    pub fn from_bytes(bytes: &[u8]) -> Result<Shard> {
        Self::parse(bytes)
    }

    /// Reads and fully validates a shard: magic, version, dtype, payload length and content
    /// hash. Any corruption or truncation is an error `"<path>: shard is corrupt: ..."`.
    pub fn open(path: &Path) -> Result<Shard> {
        let bytes = fs::read(path).with_context(|| format!("{}: cannot read shard", path.display()))?;
        // One flat message, so it reads the same with `{}` and `{:#}`.
        Self::parse(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))
    }

    fn parse(bytes: &[u8]) -> Result<Shard> {
        if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            bail!("not an agora token shard (bad magic)");
        }
        if bytes.len() < HEADER_LEN {
            bail!("shard is corrupt: truncated header ({} of {HEADER_LEN} bytes)", bytes.len());
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let hash_at = |at: usize| -> [u8; 32] { bytes[at..at + 32].try_into().expect("32 bytes") };
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            bail!("unsupported shard format version {version} (this build reads version {FORMAT_VERSION})");
        }
        let dtype_code = u32_at(12);
        let Some(dtype) = Dtype::from_code(dtype_code) else {
            bail!("shard is corrupt: unknown dtype code {dtype_code}");
        };
        let count = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        let tokenizer_hash = hash_at(24);
        let content_hash = hash_at(56);

        let payload = &bytes[HEADER_LEN..];
        let expected = usize::try_from(count).ok().and_then(|n| n.checked_mul(dtype.width()));
        if expected != Some(payload.len()) {
            bail!(
                "shard is corrupt: header says {count} tokens ({} bytes) but the payload has {} bytes",
                count.saturating_mul(dtype.width() as u64),
                payload.len()
            );
        }
        if *blake3::hash(payload).as_bytes() != content_hash {
            bail!("shard is corrupt: content hash mismatch");
        }
        let tokens = match dtype {
            Dtype::U16 => payload.chunks_exact(2).map(|c| u32::from(u16::from_le_bytes([c[0], c[1]]))).collect(),
            Dtype::U32 => payload.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        };
        Ok(Shard { tokenizer_hash, content_hash, dtype, tokens })
    }

    /// The shards' tokens back to back, as one shard (a round that trains several data units). They must
    /// share a tokenizer and a storage width.
    pub fn concat(parts: &[Shard]) -> Result<Shard> {
        let first = parts.first().ok_or_else(|| anyhow!("no shards to concatenate"))?;
        if let Some(other) = parts.iter().find(|p| p.tokenizer_hash != first.tokenizer_hash || p.dtype != first.dtype) {
            bail!(
                "shards of different tokenizers or widths cannot be joined ({} {:?}, {} {:?})",
                first.tokenizer_hash_hex(),
                first.dtype,
                other.tokenizer_hash_hex(),
                other.dtype
            );
        }
        if parts.len() == 1 {
            return Ok(first.clone());
        }
        let tokens: Vec<u32> = parts.iter().flat_map(|p| p.tokens.iter().copied()).collect();
        let content_hash = *blake3::hash(&encode_payload(&tokens, first.dtype)).as_bytes();
        Ok(Shard { tokenizer_hash: first.tokenizer_hash, content_hash, dtype: first.dtype, tokens })
    }

    /// The token ids.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the shard holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// How the tokens are stored on disk.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The content hash as lowercase hex.
    pub fn content_hash_hex(&self) -> String {
        hex(&self.content_hash)
    }

    /// The tokenizer hash as lowercase hex.
    pub fn tokenizer_hash_hex(&self) -> String {
        hex(&self.tokenizer_hash)
    }
}

/// Lowercase hex of a 32-byte hash.
pub fn hex(hash: &[u8; 32]) -> String {
    blake3::Hash::from(*hash).to_hex().to_string()
}

fn check_ids(tokens: &[u32], vocab_size: usize) -> Result<()> {
    if let Some((i, id)) = tokens.iter().enumerate().find(|(_, &id)| id as usize >= vocab_size) {
        bail!("token {i} has id {id}, not below the vocabulary size {vocab_size}");
    }
    Ok(())
}

fn encode_payload(tokens: &[u32], dtype: Dtype) -> Vec<u8> {
    let mut out = Vec::with_capacity(tokens.len() * dtype.width());
    match dtype {
        Dtype::U16 => {
            for &t in tokens {
                let t = u16::try_from(t).expect("ids were checked against a vocabulary that fits u16");
                out.extend_from_slice(&t.to_le_bytes());
            }
        }
        Dtype::U32 => {
            for &t in tokens {
                out.extend_from_slice(&t.to_le_bytes());
            }
        }
    }
    out
}

/// What [`prepare`] wrote.
#[derive(Clone, Debug)]
pub struct PrepareReport {
    pub train_path: PathBuf,
    pub val_path: PathBuf,
    pub train_tokens: usize,
    pub val_tokens: usize,
    pub train_content_hash: [u8; 32],
    pub val_content_hash: [u8; 32],
    pub tokenizer_hash: [u8; 32],
    /// Documents read from the inputs (after dropping empty ones).
    pub documents: usize,
    /// How the held-out split was made.
    pub split: Split,
}

/// How [`prepare`] divided the corpus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Split {
    /// A single document was cut at `byte` (just after a newline where possible).
    Text { byte: usize, text_len: usize },
    /// The last `val_documents` documents were held out.
    Documents { train_documents: usize, val_documents: usize },
}

/// Tokenizes the documents of `inputs` and writes `out_dir/train.shard` and `out_dir/val.shard`.
///
/// The validation split is the *end* of the corpus: with several documents, the last
/// `val_fraction` of them (rounded, at least one on each side); with a single document (e.g. one
/// `.txt` file), its text is cut at the `1 - val_fraction` byte position moved forward to just
/// after the next newline. Within a shard, documents are separated by the end-of-text id.
pub fn prepare(inputs: &[PathBuf], tok: &Tokenizer, out_dir: &Path, val_fraction: f64) -> Result<PrepareReport> {
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        bail!("validation fraction must be strictly between 0 and 1, got {val_fraction}");
    }
    let docs = corpus::read_all_documents(inputs)?;
    let (train_docs, val_docs, split): (Vec<&str>, Vec<&str>, Split) = if docs.len() == 1 {
        let text = docs[0].as_str();
        let byte = split_text_at(text, 1.0 - val_fraction);
        let (train, val) = text.split_at(byte);
        if train.trim().is_empty() || val.trim().is_empty() {
            bail!(
                "corpus is too small to split into train and validation parts ({} bytes in one document)",
                text.len()
            );
        }
        (vec![train], vec![val], Split::Text { byte, text_len: text.len() })
    } else {
        let n = docs.len();
        let val_n = ((n as f64 * val_fraction).round() as usize).clamp(1, n - 1);
        let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
        let (train, val) = refs.split_at(n - val_n);
        let split = Split::Documents { train_documents: n - val_n, val_documents: val_n };
        (train.to_vec(), val.to_vec(), split)
    };

    fs::create_dir_all(out_dir).with_context(|| format!("{}: cannot create directory", out_dir.display()))?;
    let started = std::time::Instant::now();
    let train_tokens = tokenize_joined(tok, &train_docs)?;
    let val_tokens = tokenize_joined(tok, &val_docs)?;
    tracing::info!(
        train_tokens = train_tokens.len(),
        val_tokens = val_tokens.len(),
        secs = started.elapsed().as_secs_f64(),
        "tokenized corpus"
    );

    let train_path = out_dir.join("train.shard");
    let val_path = out_dir.join("val.shard");
    let train_content_hash = Shard::write(&train_path, &train_tokens, tok.hash(), tok.vocab_size())?;
    let val_content_hash = Shard::write(&val_path, &val_tokens, tok.hash(), tok.vocab_size())?;
    Ok(PrepareReport {
        train_path,
        val_path,
        train_tokens: train_tokens.len(),
        val_tokens: val_tokens.len(),
        train_content_hash,
        val_content_hash,
        tokenizer_hash: tok.hash(),
        documents: docs.len(),
        split,
    })
}

/// The byte index at which to cut `text` so roughly `fraction` of it comes first: the
/// `fraction` position moved forward to just after the next newline (or to the next character
/// boundary if no newline follows).
fn split_text_at(text: &str, fraction: f64) -> usize {
    let target = ((text.len() as f64 * fraction) as usize).min(text.len());
    match text.as_bytes()[target..].iter().position(|&b| b == b'\n') {
        Some(rel) => target + rel + 1,
        None => (target..=text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len()),
    }
}

fn tokenize_joined(tok: &Tokenizer, docs: &[&str]) -> Result<Vec<u32>> {
    let encoded = tok.encode_batch(docs).context("tokenizing corpus")?;
    let total = encoded.iter().map(Vec::len).sum::<usize>() + docs.len().saturating_sub(1);
    let mut out = Vec::with_capacity(total);
    for (i, ids) in encoded.into_iter().enumerate() {
        if i > 0 {
            out.push(tok.eos_id());
        }
        out.extend(ids);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_split_moves_to_next_newline() {
        let text = "aaaa\nbbbb\ncccc\ndddd\n";
        // 0.5 * 20 = byte 10 ('c'), the next newline is at 14, so cut after it.
        assert_eq!(split_text_at(text, 0.5), 15);
        assert_eq!(split_text_at("no newline here", 0.5), 7);
        assert_eq!(split_text_at("ééééé", 0.5), 6);
    }

    #[test]
    fn shards_concatenate_as_if_written_whole() {
        let t = [7u8; 32];
        let a = Shard::from_tokens(vec![1, 2, 3], t, 300).unwrap();
        let b = Shard::from_tokens(vec![4, 5], t, 300).unwrap();
        let joined = Shard::concat(&[a.clone(), b]).unwrap();
        let whole = Shard::from_tokens(vec![1, 2, 3, 4, 5], t, 300).unwrap();
        assert_eq!((joined.tokens(), joined.content_hash), (whole.tokens(), whole.content_hash));
        assert_eq!(Shard::concat(std::slice::from_ref(&a)).unwrap().content_hash, a.content_hash);
        assert!(Shard::concat(&[]).is_err());
        let other_tokenizer = Shard::from_tokens(vec![4], [8u8; 32], 300).unwrap();
        assert!(Shard::concat(&[a.clone(), other_tokenizer]).is_err());
        let wide = Shard::from_tokens(vec![4], t, 70_000).unwrap();
        assert!(Shard::concat(&[a, wide]).is_err(), "u16 and u32 shards do not mix");
    }
}
