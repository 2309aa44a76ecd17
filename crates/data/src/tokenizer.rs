//! Tokenizers: training byte-level BPE, loading/saving `tokenizer.json`, hashing, and exporting
//! files that Hugging Face `transformers` loads as a `PreTrainedTokenizerFast`.

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, TokenizerBuilder};

use crate::corpus;

/// The special token that ends (and, GPT-2 style, begins) documents in tokenizers we train.
pub const ENDOFTEXT: &str = "<|endoftext|>";

/// End-of-text candidates for tokenizers trained elsewhere, in order of preference.
const EOS_CANDIDATES: [&str; 4] = [ENDOFTEXT, "<|end_of_text|>", "</s>", "<eos>"];
/// Beginning-of-text candidates; if none is present the end-of-text token is used.
const BOS_CANDIDATES: [&str; 4] = [ENDOFTEXT, "<|begin_of_text|>", "<s>", "<bos>"];

/// Texts longer than this are split at safe line breaks and encoded in parallel (see
/// [`Tokenizer::encode`]).
const CHUNK_BYTES: usize = 1 << 15;

/// A text tokenizer (a loaded or trained Hugging Face `tokenizer.json`).
///
/// Special ids, the vocabulary size and the hash are computed once at construction; the wrapped
/// tokenizer is never mutated afterwards, so they stay valid.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_id: u32,
    bos_id: u32,
    vocab_size: usize,
    hash: [u8; 32],
    /// Whether splitting at `"\n"` between non-whitespace characters provably leaves the
    /// encoding unchanged (true for the byte-level BPE setup [`train_bpe`] produces).
    chunkable: bool,
}

fn tk_err(e: tokenizers::Error) -> anyhow::Error {
    anyhow!(e)
}

impl Tokenizer {
    /// Loads a `tokenizer.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        let bytes = fs::read(path).with_context(|| format!("{}: cannot read tokenizer file", path.display()))?;
        Self::from_json_bytes(&bytes).with_context(|| format!("{}: invalid tokenizer", path.display()))
    }

    /// Parses the contents of a `tokenizer.json` file.
    ///
    /// End/beginning-of-text ids are resolved here: the end-of-text token is the first of
    /// `<|endoftext|>`, `<|end_of_text|>`, `</s>`, `<eos>` present in the vocabulary (an error if
    /// none is); the beginning-of-text token is the first of `<|endoftext|>`,
    /// `<|begin_of_text|>`, `<s>`, `<bos>`, falling back to the end-of-text token.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(tk_err).context("not a valid tokenizer.json")?;
        Self::from_inner(inner)
    }

    fn from_inner(inner: tokenizers::Tokenizer) -> Result<Tokenizer> {
        let find = |candidates: &[&str]| candidates.iter().find_map(|t| inner.token_to_id(t));
        let eos_id = find(&EOS_CANDIDATES)
            .ok_or_else(|| anyhow!("tokenizer has no end-of-text token (looked for {})", EOS_CANDIDATES.join(", ")))?;
        let bos_id = find(&BOS_CANDIDATES).unwrap_or(eos_id);
        // Ids index embedding rows, so the size that matters is one past the largest id (this also
        // counts special tokens, and any gaps in the id space).
        let vocab_size = inner.get_vocab(true).values().max().map_or(0, |&max| max as usize + 1);
        let canonical = inner.to_string(false).map_err(tk_err).context("cannot serialize tokenizer")?;
        let hash = *blake3::hash(canonical.as_bytes()).as_bytes();
        let chunkable = is_chunkable(&inner);
        Ok(Tokenizer { inner, eos_id, bos_id, vocab_size, hash, chunkable })
    }

    /// The tokenizer as pretty-printed `tokenizer.json` text.
    pub fn to_json_string(&self) -> String {
        self.inner.to_string(true).expect("a tokenizer that serialized at construction serializes again")
    }

    /// Writes the tokenizer as a pretty-printed `tokenizer.json` file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        fs::write(path, self.to_json_string()).with_context(|| format!("{}: cannot write tokenizer", path.display()))
    }

    /// Encodes `text` to token ids, adding no special tokens.
    ///
    /// Special tokens written literally in the text (e.g. `<|endoftext|>`) encode to their ids.
    /// Long texts are split at line breaks where that cannot change the result and the pieces
    /// are encoded in parallel.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if !self.chunkable || text.len() <= CHUNK_BYTES {
            return self.encode_piece(text);
        }
        let pieces = split_at_safe_newlines(text, CHUNK_BYTES);
        let encodings = self.inner.encode_batch_fast(pieces, false).map_err(tk_err)?;
        Ok(encodings.iter().flat_map(|e| e.get_ids().iter().copied()).collect())
    }

    /// Encodes several texts (in parallel); equivalent to calling [`Tokenizer::encode`] on each.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let mut pieces: Vec<&str> = Vec::new();
        let mut owner: Vec<usize> = Vec::new();
        for (i, text) in texts.iter().enumerate() {
            let split = if self.chunkable { split_at_safe_newlines(text, CHUNK_BYTES) } else { vec![*text] };
            owner.extend(std::iter::repeat_n(i, split.len()));
            pieces.extend(split);
        }
        let encodings = self.inner.encode_batch_fast(pieces, false).map_err(tk_err)?;
        let mut out = vec![Vec::new(); texts.len()];
        for (encoding, i) in encodings.iter().zip(owner) {
            out[i].extend_from_slice(encoding.get_ids());
        }
        Ok(out)
    }

    fn encode_piece(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode_fast(text, false).map_err(tk_err)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes token ids back to text (special tokens are kept in the output).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            bail!("token id {bad} is out of range for vocabulary size {}", self.vocab_size);
        }
        self.inner.decode(ids, false).map_err(tk_err)
    }

    /// Number of token ids: one past the largest id, special tokens included. Use it as the
    /// embedding table size.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Id of the end-of-text token, which also separates documents in token shards.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id of the beginning-of-text token (the same as [`Tokenizer::eos_id`] for tokenizers
    /// trained by [`train_bpe`]).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// BLAKE3 of the canonical (compact) serialization: equal for equal tokenizers regardless
    /// of how their `tokenizer.json` file was formatted.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    /// [`Tokenizer::hash`] as lowercase hex.
    pub fn hash_hex(&self) -> String {
        blake3::Hash::from(self.hash).to_hex().to_string()
    }

    /// The id of `token`, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string for `id`, if any.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The wrapped Hugging Face tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("eos_id", &self.eos_id)
            .field("bos_id", &self.bos_id)
            .field("hash", &self.hash_hex())
            .finish()
    }
}

/// Splitting at a `"\n"` whose neighbours are both non-whitespace cannot change a GPT-2 style
/// byte-level encoding: that newline is a pre-token of its own either way, and the regex has no
/// look-behind. It can change encodings with normalizers, other pre-tokenizers or added tokens
/// that strip whitespace, so those are encoded whole.
fn is_chunkable(tok: &tokenizers::Tokenizer) -> bool {
    let byte_level = matches!(
        tok.get_pre_tokenizer(),
        Some(PreTokenizerWrapper::ByteLevel(bl)) if bl.use_regex && !bl.add_prefix_space
    );
    let no_normalizer = tok.get_normalizer().is_none();
    let no_stripping = tok.get_added_tokens_decoder().values().all(|t| !t.lstrip && !t.rstrip);
    byte_level && no_normalizer && no_stripping
}

/// Splits `text` into pieces of roughly `target` bytes, cutting only right after a `"\n"` that
/// sits between two non-whitespace characters. Pieces concatenate back to `text`.
fn split_at_safe_newlines(text: &str, target: usize) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut pieces = Vec::new();
    let mut start = 0;
    while text.len() - start > target {
        let mut cut = None;
        let mut search = start + target;
        while let Some(rel) = bytes[search..].iter().position(|&b| b == b'\n') {
            let nl = search + rel;
            // `nl` and `nl + 1` are char boundaries because '\n' is a single-byte character.
            let before = text[start..nl].chars().next_back();
            let after = text[nl + 1..].chars().next();
            if matches!((before, after), (Some(b), Some(a)) if !b.is_whitespace() && !a.is_whitespace()) {
                cut = Some(nl + 1);
                break;
            }
            search = nl + 1;
        }
        let Some(cut) = cut else { break };
        pieces.push(&text[start..cut]);
        start = cut;
    }
    pieces.push(&text[start..]);
    pieces
}

/// Trains a byte-level BPE tokenizer (GPT-2 style) on the documents of `files`.
///
/// Inputs are read with [`corpus::read_documents`], so `.txt`, `.jsonl`, `.parquet` and
/// directories all work. The vocabulary starts with `<|endoftext|>` (id 0) and all 256 byte
/// symbols, so any text encodes; merges are learned until `vocab_size` ids exist (or no pair
/// repeats). The result is deterministic: the same corpus and size give identical
/// `tokenizer.json` bytes.
pub fn train_bpe(files: &[PathBuf], vocab_size: usize) -> Result<Tokenizer> {
    let min_size = ByteLevel::alphabet().len() + 1;
    if vocab_size < min_size {
        bail!(
            "vocab size {vocab_size} is too small: byte-level BPE needs at least {min_size} (256 bytes + {ENDOFTEXT})"
        );
    }
    if vocab_size > u32::MAX as usize {
        bail!("vocab size {vocab_size} does not fit in 32-bit token ids");
    }
    let docs = corpus::read_all_documents(files)?;

    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(0)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(ENDOFTEXT, true)])
        .initial_alphabet(alphabet)
        .build();
    let mut tok = TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(tk_err)
        .context("cannot build tokenizer pipeline")?;
    tok.train(&mut trainer, docs.iter()).map_err(tk_err).context("BPE training failed")?;
    let tok = Tokenizer::from_inner(tok.into())?;
    debug_assert_eq!(tok.eos_id(), 0, "special tokens are added before the alphabet");
    Ok(tok)
}

/// Writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` into `dir`
/// (created if needed), so that `transformers.AutoTokenizer.from_pretrained(dir)` loads a
/// `PreTrainedTokenizerFast` whose encodings match [`Tokenizer::encode`].
///
/// No BOS/EOS is added on encode, and decoding does not "clean up" spaces, so Python and Rust
/// agree exactly in both directions.
pub fn write_hf_tokenizer_files(tok: &Tokenizer, dir: &Path, model_max_length: usize) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("{}: cannot create directory", dir.display()))?;
    let token = |id: u32| tok.id_to_token(id).ok_or_else(|| anyhow!("tokenizer has no token for special id {id}"));
    let eos = token(tok.eos_id())?;
    let bos = token(tok.bos_id())?;

    let mut added: Vec<_> = tok.inner.get_added_tokens_decoder().into_iter().collect();
    added.sort_by_key(|(id, _)| *id);
    let added_tokens_decoder: serde_json::Map<String, serde_json::Value> = added
        .into_iter()
        .map(|(id, t)| {
            let entry = json!({
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            });
            (id.to_string(), entry)
        })
        .collect();
    let config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": bos,
        "eos_token": eos,
        "add_bos_token": false,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": model_max_length,
    });
    let special_tokens_map = json!({ "bos_token": bos, "eos_token": eos });

    tok.save(dir.join("tokenizer.json"))?;
    write_json(&dir.join("tokenizer_config.json"), &config)?;
    write_json(&dir.join("special_tokens_map.json"), &special_tokens_map)?;
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).context("cannot serialize JSON")?;
    text.push('\n');
    fs::write(path, text).with_context(|| format!("{}: cannot write", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_only_cuts_between_non_whitespace() {
        let text = "ab\ncd\n\nef\n gh\nij";
        let pieces = split_at_safe_newlines(text, 1);
        assert_eq!(pieces.concat(), text);
        assert_eq!(pieces, vec!["ab\n", "cd\n\nef\n gh\n", "ij"]);
    }

    #[test]
    fn tokenizer_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
    }

    #[test]
    fn split_keeps_short_text_whole() {
        assert_eq!(split_at_safe_newlines("short\ntext", 100), vec!["short\ntext"]);
        assert_eq!(split_at_safe_newlines("", 1), vec![""]);
    }
}
