//! Data pipeline for agora: everything between raw text and the token ids a trainer consumes.
//!
//! This crate owns:
//! - [`tokenizer`]: byte-level BPE training, loading/saving `tokenizer.json`, a canonical tokenizer
//!   hash, and writing Hugging Face compatible tokenizer files;
//! - [`corpus`]: reading documents from `.txt`, `.jsonl` and `.parquet` files (or directories);
//! - [`shard`]: a checksummed binary format for tokenized data and `prepare`, which turns a corpus
//!   into train/validation shards;
//! - [`sampling`]: deterministic batch sampling, a pure function of (seed, shard, step, ...), so a
//!   resumed or replicated run sees exactly the same batches;
//! - [`synthetic`]: a Markov-chain corpus with a known entropy rate, so the demo needs no external
//!   data and training loss has a known floor.
//!
//! It deliberately knows nothing about tensors, models or networking: its outputs are plain
//! `u32` token ids and files, which keeps it free of libtorch and cheap to build and test.

pub mod corpus;
pub mod sampling;
pub mod shard;
pub mod synthetic;
pub mod tokenizer;

pub use corpus::read_documents;
pub use sampling::{batch_offsets, batch_tokens, eval_offsets};
pub use shard::{prepare, PrepareReport, Shard, Split};
pub use synthetic::MarkovSource;
pub use tokenizer::{train_bpe, write_hf_tokenizer_files, Tokenizer, ENDOFTEXT};
