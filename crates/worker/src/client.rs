//! The worker's HTTP client: signed requests, JSON in and out, patient retries, and a verified blob cache.

use agora_protocol::{
    hash_bytes, new_nonce, ErrorBody, Hash32, Identity, SignedRequest, HEADER_NONCE, HEADER_ROUND, HEADER_RUN,
    HEADER_SIGNATURE, HEADER_TIMESTAMP, HEADER_WORKER,
};
use anyhow::{Context, Result};
use reqwest::blocking::{Client as Http, RequestBuilder};
use reqwest::{Method, StatusCode};
use serde::{de::DeserializeOwned, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug)]
pub enum CallError {
    /// The coordinator answered with a 4xx: retrying the same request would not help.
    Rejected { status: StatusCode, body: ErrorBody },
    /// Unreachable for longer than the patience, a 5xx that persisted, or an unreadable answer.
    Failed(anyhow::Error),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Rejected { status, body } => write!(f, "{status} {}: {}", body.error, body.message),
            CallError::Failed(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for CallError {}

impl From<anyhow::Error> for CallError {
    fn from(e: anyhow::Error) -> Self {
        CallError::Failed(e)
    }
}

#[derive(Clone)]
pub struct Client {
    base: String,
    http: Http,
    identity: Arc<Identity>,
    run_id: String,
    cache: PathBuf,
    patience: Duration,
    /// The open round as this worker last heard it; signed into every request that names no round.
    round: Arc<AtomicU64>,
}

/// The round a `/v1/rounds/{r}/...` path names.
pub fn path_round(path: &str) -> Option<u64> {
    path.strip_prefix("/v1/rounds/")?.split('/').next()?.parse().ok()
}

impl Client {
    pub fn new(base: &str, identity: Arc<Identity>, data_dir: &Path, patience: Duration) -> Result<Client> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            anyhow::bail!("--coordinator {base:?}: expected a URL like http://HOST:PORT");
        }
        let http = Http::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(300))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Client {
            base,
            http,
            identity,
            run_id: String::new(),
            cache: data_dir.join("blobs"),
            patience,
            round: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The same client, signing for `run_id`.
    pub fn for_run(&self, run_id: &str) -> Client {
        Client { run_id: run_id.to_string(), ..self.clone() }
    }

    /// Records the open round the coordinator last named (signed into later requests).
    pub fn set_round(&self, round: u64) {
        self.round.store(round, Ordering::Relaxed);
    }

    fn request(&self, method: Method, path: &str, body: Vec<u8>) -> RequestBuilder {
        let timestamp_ms = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_millis() as u64;
        let round = path_round(path).unwrap_or_else(|| self.round.load(Ordering::Relaxed));
        let nonce = new_nonce();
        let signed =
            SignedRequest { run_id: &self.run_id, method: method.as_str(), path, round, timestamp_ms, nonce: &nonce };
        let signature = self.identity.sign_request(&signed, &body);
        self.http
            .request(method, format!("{}{path}", self.base))
            .header(HEADER_RUN, &self.run_id)
            .header(HEADER_WORKER, self.identity.id().hex())
            .header(HEADER_ROUND, round.to_string())
            .header(HEADER_TIMESTAMP, timestamp_ms.to_string())
            .header(HEADER_NONCE, nonce)
            .header(HEADER_SIGNATURE, signature)
            .body(body)
    }

    /// Sends until an answer that is not a connection error or 5xx arrives (backing off from 0.2 s to
    /// 5 s), or until `patience` has passed without one.
    fn call(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        content_type: &str,
        patient: bool,
    ) -> Result<Vec<u8>, CallError> {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(200);
        loop {
            let outcome = self.request(method.clone(), path, body.clone()).header("content-type", content_type).send();
            let retry_reason = match outcome {
                Ok(response) => {
                    let status = response.status();
                    let bytes = response
                        .bytes()
                        .map_err(|e| CallError::Failed(anyhow::anyhow!("{path}: reading the answer: {e}")))?;
                    if status.is_success() {
                        return Ok(bytes.to_vec());
                    }
                    if status.is_client_error() {
                        let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| ErrorBody {
                            error: "http".into(),
                            message: String::from_utf8_lossy(&bytes).chars().take(300).collect(),
                        });
                        return Err(CallError::Rejected { status, body });
                    }
                    format!("{status}: {}", String::from_utf8_lossy(&bytes).chars().take(200).collect::<String>())
                }
                Err(e) => format!("{e}"),
            };
            if !patient || started.elapsed() > self.patience {
                return Err(CallError::Failed(anyhow::anyhow!(
                    "{method} {}{path}: {retry_reason} (gave up after {:.0}s)",
                    self.base,
                    started.elapsed().as_secs_f64()
                )));
            }
            tracing::warn!("{method} {path}: {retry_reason}; retrying in {:.1}s", backoff.as_secs_f64());
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    fn parse<T: DeserializeOwned>(path: &str, bytes: &[u8]) -> Result<T, CallError> {
        serde_json::from_slice(bytes).map_err(|e| CallError::Failed(anyhow::anyhow!("{path}: unexpected answer: {e}")))
    }

    pub fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, CallError> {
        let bytes = self.call(Method::GET, path, Vec::new(), "application/json", true)?;
        Self::parse(path, &bytes)
    }

    pub fn post_json<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T, CallError> {
        let body = serde_json::to_vec(body).map_err(|e| CallError::Failed(e.into()))?;
        let bytes = self.call(Method::POST, path, body, "application/json", true)?;
        Self::parse(path, &bytes)
    }

    /// One attempt, no retries (heartbeats).
    pub fn post_json_once<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T, CallError> {
        let body = serde_json::to_vec(body).map_err(|e| CallError::Failed(e.into()))?;
        let bytes = self.call(Method::POST, path, body, "application/json", false)?;
        Self::parse(path, &bytes)
    }

    pub fn post_bytes<T: DeserializeOwned>(&self, path: &str, body: Vec<u8>) -> Result<T, CallError> {
        let bytes = self.call(Method::POST, path, body, "application/octet-stream", true)?;
        Self::parse(path, &bytes)
    }

    /// A blob by hash, from the cache or the coordinator; checked against its hash either way.
    /// Returns the bytes and how many were downloaded (0 from the cache).
    pub fn blob(&self, hash: &Hash32) -> Result<(Vec<u8>, u64)> {
        let path = self.cache.join(hash.hex());
        if let Ok(bytes) = std::fs::read(&path) {
            if hash_bytes(&bytes) == *hash {
                return Ok((bytes, 0));
            }
            tracing::warn!(%hash, "cached blob is corrupt; downloading it again");
        }
        let bytes =
            self.call(Method::GET, &format!("/v1/blobs/{}", hash.hex()), Vec::new(), "application/json", true)?;
        if hash_bytes(&bytes) != *hash {
            anyhow::bail!(
                "blob {hash} from the coordinator does not match its hash (got {}): refusing it",
                hash_bytes(&bytes)
            );
        }
        std::fs::create_dir_all(&self.cache)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
        std::fs::rename(&tmp, &path)?;
        let n = bytes.len() as u64;
        Ok((bytes, n))
    }
}
