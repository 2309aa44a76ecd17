//! API errors: an HTTP status, a stable code and a message a person can act on.
//!
//! A refusal (4xx) tells the client what to fix. An internal error (500) tells it nothing of the
//! coordinator's insides (paths, SQL, database URLs): it gets an opaque incident id, and the log has the
//! error chain under that same id, logged once, when the error is made.

use agora_protocol::{ErrorBody, TensorError};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The code of an [`ApiError::internal`]: its detail is in the log, not in the message.
pub const INTERNAL: &str = "internal";

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
    pub fn too_large(limit: u64) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", format!("request body exceeds {limit} bytes"))
    }
    /// A 500 whose message is only an incident id; the error chain is logged (error level) with that id.
    pub fn internal(err: anyhow::Error) -> Self {
        let incident = incident_id();
        tracing::error!(incident = %incident, "internal error {incident}: {err:#}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            INTERNAL,
            format!("internal error {incident}; the coordinator's log has the detail"),
        )
    }
    /// Whether the detail of this error was logged when it was made (an [`ApiError::internal`]), so that
    /// whoever answers with it need not log it again.
    pub fn is_logged(&self) -> bool {
        self.code == INTERNAL && self.status == StatusCode::INTERNAL_SERVER_ERROR
    }
}

/// 64 random-looking bits in hex, distinct per call: a process-wide counter, the time, the process id
/// and std's randomly seeded hasher keys, hashed with blake3.
fn incident_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = blake3::Hasher::new();
    hasher.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    hasher.update(&nanos.to_le_bytes());
    hasher.update(&std::process::id().to_le_bytes());
    hasher.update(&std::collections::hash_map::RandomState::new().build_hasher().finish().to_le_bytes());
    hex::encode(&hasher.finalize().as_bytes()[..8])
}

impl From<anyhow::Error> for ApiError {
    fn from(err: anyhow::Error) -> Self {
        ApiError::internal(err)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        ApiError::internal(anyhow::Error::new(err).context("database"))
    }
}

impl From<TensorError> for ApiError {
    fn from(err: TensorError) -> Self {
        let status = if matches!(err, TensorError::Malformed(_)) {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        ApiError::new(status, err.code(), format!("pseudo-gradient rejected: {err}"))
    }
}

impl From<agora_diloco::codec::CodecError> for ApiError {
    fn from(err: agora_diloco::codec::CodecError) -> Self {
        let status = if err.is_malformed() { StatusCode::BAD_REQUEST } else { StatusCode::UNPROCESSABLE_ENTITY };
        ApiError::new(status, err.code(), format!("pseudo-gradient rejected: {err}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: self.code.to_string(), message: self.message };
        (self.status, axum::Json(body)).into_response()
    }
}

/// A tracing subscriber for tests that keeps every event (level and fields as text) of the current thread.
#[cfg(test)]
pub(crate) mod log_capture {
    use std::fmt::Write;
    use std::sync::{Arc, Mutex};
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Level, Metadata, Subscriber};

    #[derive(Clone, Default)]
    pub struct Capture(Arc<Mutex<Vec<(Level, String)>>>);

    impl Capture {
        /// Runs `f` with this thread's events captured; returns its result and the events.
        pub fn run<T>(f: impl FnOnce() -> T) -> (T, Vec<(Level, String)>) {
            let capture = Capture::default();
            let out = tracing::subscriber::with_default(capture.clone(), f);
            let events = capture.0.lock().unwrap().clone();
            (out, events)
        }
    }

    struct Text(String);
    impl Visit for Text {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            let _ = write!(self.0, "{}={:?} ", field.name(), value);
        }
    }

    impl Subscriber for Capture {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            let mut text = Text(String::new());
            event.record(&mut text);
            self.0.lock().unwrap().push((*event.metadata().level(), text.0));
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }
}

#[cfg(test)]
mod tests {
    use super::log_capture::Capture;
    use super::*;

    fn body_of(err: ApiError) -> (StatusCode, ErrorBody) {
        let response = err.into_response();
        let status = response.status();
        let bytes = bytes_of(response);
        (status, serde_json::from_slice(&bytes).expect("an ErrorBody"))
    }

    fn bytes_of(response: Response) -> Vec<u8> {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(axum::body::to_bytes(response.into_body(), usize::MAX)).unwrap().to_vec()
    }

    /// The incident id in a 500's message ("internal error <16 hex>; ...").
    fn incident_of(message: &str) -> String {
        let id = message.strip_prefix("internal error ").and_then(|m| m.split(';').next()).unwrap_or("");
        assert!(id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()), "no incident id in {message:?}");
        id.to_string()
    }

    #[test]
    fn internal_error_body_has_only_an_incident_id() {
        let (err, events) = Capture::run(|| {
            ApiError::internal(anyhow::anyhow!("secret detail").context("opening postgres://u:pw@db/x"))
        });
        assert!(err.is_logged());
        let (status, body) = body_of(err);
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body.error, "internal");
        assert!(!body.message.contains("secret detail"), "{}", body.message);
        assert!(!body.message.contains("pw"), "{}", body.message);
        let id = incident_of(&body.message);
        // Logged once, at error level, with the chain and the same id.
        assert_eq!(events.len(), 1, "{events:?}");
        let (level, text) = &events[0];
        assert_eq!(*level, tracing::Level::ERROR);
        assert!(text.contains(&id) && text.contains("secret detail") && text.contains("opening"), "{text}");
    }

    #[test]
    fn sqlx_errors_are_opaque_too() {
        let (err, _) = Capture::run(|| ApiError::from(sqlx::Error::Protocol("password=hunter2".into())));
        let (_, body) = body_of(err);
        assert!(!body.message.contains("hunter2"), "{}", body.message);
        incident_of(&body.message);
    }

    #[test]
    fn incident_ids_differ() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| incident_id()).collect();
        assert_eq!(ids.len(), 1000);
    }

    #[test]
    fn refusals_keep_their_message() {
        let err = ApiError::bad_request("bad_header", "X-Agora-Nonce must be hex");
        assert!(!err.is_logged());
        let (status, body) = body_of(err);
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body.message, "X-Agora-Nonce must be hex");
    }
}
