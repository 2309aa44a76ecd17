//! Worker identities: an ed25519 key pair kept in the worker's data directory; the public key is the id.
//!
//! A request is signed over (run id, method, path, round, timestamp, nonce, blake3 of the body), so a
//! captured signature cannot be moved to another run, endpoint, round or body, and the coordinator refuses
//! one it has seen (the nonce) or one from too far in the past (the timestamp).

use crate::hash::parse_hex32;
use anyhow::{bail, Context, Result};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// A worker's public key, its identity everywhere in the system.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerId(pub [u8; 32]);

impl WorkerId {
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
    /// The first 8 hex digits, for logs and tables.
    pub fn short(&self) -> String {
        self.hex()[..8].to_string()
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WorkerId({})", self.short())
    }
}

impl FromStr for WorkerId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bytes = parse_hex32(s)?;
        VerifyingKey::from_bytes(&bytes).map_err(|_| "not an ed25519 public key".to_string())?;
        Ok(WorkerId(bytes))
    }
}

impl Serialize for WorkerId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de> Deserialize<'de> for WorkerId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A worker's key pair.
pub struct Identity {
    key: SigningKey,
}

impl Identity {
    pub fn generate() -> Result<Self> {
        let mut secret = [0u8; 32];
        getrandom::getrandom(&mut secret)
            .map_err(|e| anyhow::anyhow!("no OS randomness for a new identity key: {e}"))?;
        Ok(Identity { key: SigningKey::from_bytes(&secret) })
    }

    pub fn from_secret(secret: [u8; 32]) -> Self {
        Identity { key: SigningKey::from_bytes(&secret) }
    }

    /// Loads the key at `path`, or creates it (mode 0600) if the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        if path.exists() {
            let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
            let secret = parse_hex32(text.trim())
                .map_err(|e| anyhow::anyhow!("{}: not an agora identity key ({e})", path.display()))?;
            return Ok(Self::from_secret(secret));
        }
        let identity = Self::generate()?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        }
        let tmp = path.with_extension("tmp");
        {
            use std::io::Write;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
            file.write_all(hex::encode(identity.key.to_bytes()).as_bytes())?;
            file.write_all(b"\n")?;
            file.sync_all()?;
        }
        std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))?;
        Ok(identity)
    }

    pub fn id(&self) -> WorkerId {
        WorkerId(self.key.verifying_key().to_bytes())
    }

    pub fn sign(&self, message: &[u8; 32]) -> String {
        hex::encode(self.key.sign(message).to_bytes())
    }

    /// A pseudo-random function keyed by this identity's secret: values others cannot predict (the
    /// coordinator's spot-check choices and scoring batches) but that it can recompute after a restart.
    pub fn keyed_hash(&self, context: &str, data: &[u8]) -> [u8; 32] {
        let key = blake3::derive_key(context, &self.key.to_bytes());
        *blake3::keyed_hash(&key, data).as_bytes()
    }

    /// The signature header of a request.
    pub fn sign_request(&self, request: &SignedRequest<'_>, body: &[u8]) -> String {
        self.sign(&request.signing_message(body))
    }
}

/// What a request signature covers besides the body; each field travels in its own header.
#[derive(Debug, Clone, Copy)]
pub struct SignedRequest<'a> {
    pub run_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    /// The round the request concerns: the path's round for uploads, else the open round as the worker
    /// last heard it (0 before it knows).
    pub round: u64,
    pub timestamp_ms: u64,
    /// Fresh random hex per request: the coordinator refuses a nonce it has already seen.
    pub nonce: &'a str,
}

impl SignedRequest<'_> {
    /// The 32 bytes a request signature covers.
    pub fn signing_message(&self, body: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("agora-protocol v3 request signature");
        for part in [self.run_id, self.method, self.path, self.nonce] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.update(&self.round.to_le_bytes());
        h.update(&self.timestamp_ms.to_le_bytes());
        h.update(blake3::hash(body).as_bytes());
        *h.finalize().as_bytes()
    }
}

/// A fresh request nonce: 16 random bytes as hex.
pub fn new_nonce() -> String {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).expect("OS randomness for a request nonce");
    hex::encode(bytes)
}

/// Checks a hex signature by `worker` over `message`.
pub fn verify_signature(worker: &WorkerId, message: &[u8; 32], signature_hex: &str) -> Result<()> {
    let key = VerifyingKey::from_bytes(&worker.0).map_err(|_| anyhow::anyhow!("worker id is not an ed25519 key"))?;
    let mut bytes = [0u8; 64];
    if signature_hex.len() != 128 || hex::decode_to_slice(signature_hex, &mut bytes).is_err() {
        bail!("signature must be 128 hex digits");
    }
    key.verify(message, &Signature::from_bytes(&bytes)).map_err(|_| anyhow::anyhow!("signature does not verify"))
}
