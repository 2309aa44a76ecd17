//! The HTTP face of the coordinator: routes, request authentication, body limits and error bodies.
//!
//! Every refusal is a 4xx with an [`agora_protocol::ErrorBody`] and bumps `agora_requests_rejected{reason}`.
//! Worker requests are signed (see `agora_protocol::identity`); reads of public state are not.

use crate::clock;
use crate::error::ApiError;
use crate::state::Coordinator;
use agora_protocol::{
    verify_signature, Hash32, Heartbeat, JoinRequest, SignedRequest, WorkResponse, WorkerId, HEADER_NONCE,
    HEADER_ROUND, HEADER_RUN, HEADER_SIGNATURE, HEADER_TIMESTAMP, HEADER_WORKER, PROTOCOL_VERSION,
};
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

type App = Arc<Coordinator>;

/// JSON request bodies (everything but pseudo-gradients) are small.
const JSON_LIMIT: u64 = 64 * 1024;
/// How long `POST /v1/work` holds a request open waiting for work.
const LONG_POLL: Duration = Duration::from_secs(20);
/// Accepted clock difference between a worker's signature timestamp and ours. Nonces are remembered for
/// twice as long, so a captured request is refused as stale or as a replay, never accepted.
pub const MAX_SKEW_MS: i64 = 2 * 60 * 1000;

pub fn router(app: App) -> Router {
    Router::new()
        .route("/v1/run", get(run_info))
        .route("/v1/join", post(join))
        .route("/v1/leave", post(leave))
        .route("/v1/work", post(work))
        .route("/v1/heartbeat", post(heartbeat))
        .route("/v1/rounds/{round}/delta", post(submit))
        .route("/v1/rounds/{round}/proof", post(proof))
        .route("/v1/rounds/{round}/receipt", get(receipt))
        .route("/v1/blobs/{hash}", get(blob))
        .route("/v1/leaderboard", get(leaderboard))
        .route("/v1/judgements", get(judgements))
        .route("/v1/ledger", get(ledger))
        .route("/v1/status", get(status))
        .route("/v1/contributions", get(contributions))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(|State(app): State<App>, uri: Uri| async move {
            reply::<()>(&app, Err(ApiError::not_found("no_such_endpoint", format!("no endpoint {uri}"))))
        })
        .method_not_allowed_fallback(|State(app): State<App>, method: Method, uri: Uri| async move {
            let message = format!("{method} is not allowed on {uri}");
            reply::<()>(&app, Err(ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", message)))
        })
        // Bodies are read (and limited) by the handlers themselves, so that a refusal is a JSON error.
        .layer(DefaultBodyLimit::disable())
        .with_state(app)
}

/// Turns a handler's result into a response, counting refusals.
fn reply<T: Serialize>(app: &Coordinator, result: Result<T, ApiError>) -> Response {
    match result {
        Ok(value) => Json(value).into_response(),
        Err(err) => {
            app.metrics.reject(err.code);
            log_refusal(&err);
            err.into_response()
        }
    }
}

/// Logs an error answer: a server error at error level, unless its detail was logged (with its incident
/// id) when it was made; a refusal at debug level.
fn log_refusal(err: &ApiError) {
    if err.is_logged() {
        return;
    }
    if err.status.is_server_error() {
        tracing::error!(code = err.code, "{}", err.message);
    } else {
        tracing::debug!(code = err.code, status = %err.status, "refused: {}", err.message);
    }
}

/// Refuses a signature timestamp more than [`MAX_SKEW_MS`] from `now_ms`. Any `u64` is either accepted or
/// refused as `stale_request`: the difference is taken without overflow.
fn check_clock(now_ms: u64, timestamp_ms: u64) -> Result<(), ApiError> {
    let skew = clock::skew_ms(now_ms, timestamp_ms);
    if skew <= MAX_SKEW_MS.unsigned_abs() {
        return Ok(());
    }
    let side = if timestamp_ms > now_ms { "ahead of" } else { "behind" };
    Err(ApiError::unauthorized(
        "stale_request",
        format!(
            "request timestamp is {:.0} s {side} the coordinator's clock (at most {} s): check the worker's clock",
            skew as f64 / 1000.0,
            MAX_SKEW_MS / 1000
        ),
    ))
}

async fn read_body(app: &Coordinator, headers: &HeaderMap, body: Body, limit: u64) -> Result<Bytes, ApiError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(limit));
    }
    let bytes = axum::body::to_bytes(body, limit as usize).await.map_err(|_| ApiError::too_large(limit))?;
    app.metrics.bytes_in.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
    Ok(bytes)
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, ApiError> {
    headers
        .get(name)
        .ok_or_else(|| {
            ApiError::unauthorized("unsigned", format!("missing header {name}: worker requests must be signed"))
        })?
        .to_str()
        .map_err(|_| ApiError::bad_request("bad_header", format!("header {name} is not ASCII")))
}

/// Checks run id, round, timestamp, signature and nonce; returns the signer. `must_be_known`: the worker
/// has joined. The nonce is recorded only once the signature verifies, so nobody can burn another's nonces.
async fn authenticate(
    app: &Coordinator,
    headers: &HeaderMap,
    method: &Method,
    path: &str,
    body: &[u8],
    must_be_known: bool,
) -> Result<WorkerId, ApiError> {
    let run = header_str(headers, HEADER_RUN)?;
    if run != app.run_id {
        return Err(ApiError::conflict("wrong_run", format!("this coordinator runs {}, not {run}", app.run_id)));
    }
    let worker: WorkerId = header_str(headers, HEADER_WORKER)?
        .parse()
        .map_err(|e| ApiError::bad_request("bad_worker_id", format!("{HEADER_WORKER}: {e}")))?;
    let timestamp_ms: u64 = header_str(headers, HEADER_TIMESTAMP)?
        .parse()
        .map_err(|_| ApiError::bad_request("bad_header", format!("{HEADER_TIMESTAMP} must be unix milliseconds")))?;
    let round: u64 = header_str(headers, HEADER_ROUND)?
        .parse()
        .ok()
        .filter(|&r: &u64| r <= i64::MAX as u64)
        .ok_or_else(|| ApiError::bad_request("bad_header", format!("{HEADER_ROUND} must be a round number")))?;
    let nonce = header_str(headers, HEADER_NONCE)?;
    if nonce.len() < 16 || nonce.len() > 64 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad_request("bad_header", format!("{HEADER_NONCE} must be 16 to 64 hex digits")));
    }
    check_clock(clock::now_ms(), timestamp_ms)?;
    let signature = header_str(headers, HEADER_SIGNATURE)?;
    let signed = SignedRequest { run_id: run, method: method.as_str(), path, round, timestamp_ms, nonce };
    verify_signature(&worker, &signed.signing_message(body), signature)
        .map_err(|e| ApiError::unauthorized("bad_signature", e.to_string()))?;
    let path_round = path.strip_prefix("/v1/rounds/").and_then(|p| p.split('/').next()).and_then(|r| r.parse().ok());
    if path_round.is_some_and(|r: u64| r != round) {
        return Err(ApiError::bad_request(
            "bad_round",
            format!("{HEADER_ROUND} is {round} but the path names another round"),
        ));
    }
    if must_be_known && !app.is_known(&worker) {
        return Err(ApiError::unauthorized(
            "unknown_worker",
            format!("worker {} has not joined this run: POST /v1/join first", worker.short()),
        ));
    }
    // `record_nonce` stores the timestamp `as i64`: safe, since `check_clock` passed it within MAX_SKEW_MS
    // of now (far below 2^63).
    app.record_nonce(&worker, nonce, timestamp_ms).await?;
    Ok(worker)
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request("malformed_json", format!("request body: {e}")))
}

async fn run_info(State(app): State<App>) -> Response {
    Json(app.info.clone()).into_response()
}

async fn join(State(app): State<App>, method: Method, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let body = read_body(&app, &headers, body, JSON_LIMIT).await?;
        let worker = authenticate(&app, &headers, &method, uri.path(), &body, false).await?;
        let request: JoinRequest = parse_json(&body)?;
        if request.protocol_version != PROTOCOL_VERSION {
            return Err(ApiError::conflict(
                "protocol_version",
                format!(
                    "this coordinator speaks protocol {PROTOCOL_VERSION}, the worker {}: upgrade agora",
                    request.protocol_version
                ),
            ));
        }
        if request.worker != worker {
            return Err(ApiError::bad_request("bad_worker_id", "the body's worker id differs from the signer"));
        }
        app.join(worker, &request.name).await
    }
    .await;
    reply(&app, result)
}

async fn leave(State(app): State<App>, method: Method, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let body = read_body(&app, &headers, body, JSON_LIMIT).await?;
        let worker = authenticate(&app, &headers, &method, uri.path(), &body, true).await?;
        app.leave(worker).await.map(|()| serde_json::json!({ "left": true }))
    }
    .await;
    reply(&app, result)
}

async fn work(State(app): State<App>, method: Method, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let body = read_body(&app, &headers, body, JSON_LIMIT).await?;
        let worker = authenticate(&app, &headers, &method, uri.path(), &body, true).await?;
        let mut changes = app.subscribe();
        let until = tokio::time::Instant::now() + LONG_POLL;
        loop {
            let response = app.next_work(worker).await?;
            if !matches!(response, WorkResponse::Wait { .. }) {
                return Ok(response);
            }
            match tokio::time::timeout_at(until, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Ok(response),
            }
        }
    }
    .await;
    reply(&app, result)
}

async fn heartbeat(State(app): State<App>, method: Method, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let body = read_body(&app, &headers, body, JSON_LIMIT).await?;
        let worker = authenticate(&app, &headers, &method, uri.path(), &body, true).await?;
        let beat: Heartbeat = parse_json(&body)?;
        Ok(app.heartbeat(worker, &beat))
    }
    .await;
    reply(&app, result)
}

/// A round number from a client: the store keeps rounds as signed 64-bit integers, so anything above
/// `i64::MAX` is refused here rather than wrapping to a negative round.
fn parse_round(round: &str) -> Result<u64, ApiError> {
    round
        .parse::<u64>()
        .ok()
        .filter(|&r| r <= i64::MAX as u64)
        .ok_or_else(|| ApiError::bad_request("bad_round", format!("{round:?} is not a round number")))
}

/// Reads a binary upload of at most `limit` bytes and authenticates its (joined) sender.
async fn read_signed_upload(
    app: &Coordinator,
    headers: &HeaderMap,
    method: &Method,
    uri: &Uri,
    body: Body,
    limit: u64,
) -> Result<(WorkerId, Bytes), ApiError> {
    let body = read_body(app, headers, body, limit).await?;
    let worker = authenticate(app, headers, method, uri.path(), &body, true).await?;
    Ok((worker, body))
}

async fn submit(
    State(app): State<App>,
    Path(round): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        // Bounds how many uploads are in memory at once, whatever the number of workers.
        let _permit = app.delta_permits.acquire().await.map_err(|e| ApiError::internal(anyhow::anyhow!("{e}")))?;
        let (worker, body) = read_signed_upload(&app, &headers, &method, &uri, body, app.max_delta_bytes).await?;
        // The path is judged after the body is read: refusing first and closing the connection under a
        // client still writing its upload turns the error body into a broken pipe on the client's side.
        let round = parse_round(&round)?;
        let (app2, body2) = (app.clone(), body.clone());
        let checked = tokio::task::spawn_blocking(move || app2.check_delta(round, &body2))
            .await
            .map_err(|e| ApiError::internal(anyhow::anyhow!("decoder task failed: {e}")))?;
        let checked = match checked {
            Err(err) if err.code == "non_finite" => {
                app.reject_upload(worker, round, err.code).await?;
                return Err(err);
            }
            other => other?,
        };
        app.submit(worker, round, body, &checked).await
    }
    .await;
    reply(&app, result)
}

async fn proof(
    State(app): State<App>,
    Path(round): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let _permit = app.delta_permits.acquire().await.map_err(|e| ApiError::internal(anyhow::anyhow!("{e}")))?;
        let (worker, body) = read_signed_upload(&app, &headers, &method, &uri, body, app.max_proof_bytes()).await?;
        let round = parse_round(&round)?; // after the body, as in `submit`
        app.proof(worker, round, body).await
    }
    .await;
    reply(&app, result)
}

#[derive(serde::Deserialize)]
struct ReceiptQuery {
    worker: String,
}

/// A worker's verdict for a closed round. Receipts are public (they are in the round's signed root), so
/// the request need not be signed.
async fn receipt(
    State(app): State<App>,
    Path(round): Path<String>,
    axum::extract::Query(q): axum::extract::Query<ReceiptQuery>,
) -> Response {
    let result = async {
        let round = parse_round(&round)?;
        let worker: WorkerId = q
            .worker
            .parse()
            .map_err(|e| ApiError::bad_request("bad_worker_id", format!("worker={}: {e}", q.worker)))?;
        app.round_receipt(round, &worker).await
    }
    .await;
    reply(&app, result)
}

async fn judgements(State(app): State<App>) -> Response {
    let result = app.judgements().await;
    reply(&app, result)
}

async fn leaderboard(State(app): State<App>) -> Response {
    let result = app.leaderboard().await;
    reply(&app, result)
}

#[derive(serde::Deserialize)]
struct LedgerQuery {
    worker: Option<String>,
}

async fn ledger(State(app): State<App>, axum::extract::Query(q): axum::extract::Query<LedgerQuery>) -> Response {
    match q.worker {
        Some(w) => {
            let result = async {
                let worker: WorkerId =
                    w.parse().map_err(|e| ApiError::bad_request("bad_worker_id", format!("worker={w}: {e}")))?;
                app.worker_statement(&worker).await
            }
            .await;
            reply(&app, result)
        }
        None => {
            let result = app.ledger_report().await;
            reply(&app, result)
        }
    }
}

async fn blob(
    State(app): State<App>,
    Path(hash): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let hash: Hash32 = hash.parse().map_err(|e| ApiError::bad_request("bad_hash", format!("blob name: {e}")))?;
        // Blobs are public (content-addressed); a signed request is attributed to its worker's byte count.
        let worker = if headers.contains_key(HEADER_WORKER) {
            Some(authenticate(&app, &headers, &method, uri.path(), b"", true).await?)
        } else {
            None
        };
        app.blob(&hash, worker).await
    }
    .await;
    match result {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response(),
        Err(err) => reply::<()>(&app, Err(err)),
    }
}

async fn status(State(app): State<App>) -> Response {
    let result = app.status().await;
    reply(&app, result)
}

async fn contributions(State(app): State<App>) -> Response {
    let result = app.contributions().await;
    reply(&app, result)
}

async fn metrics(State(app): State<App>) -> Response {
    let gauges = app.gauges().await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render(&gauges)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::log_capture::Capture;

    #[test]
    fn any_timestamp_is_accepted_in_the_window_or_refused_as_stale() {
        let now = clock::now_ms();
        let window = MAX_SKEW_MS.unsigned_abs();
        for ts in [now, now - window, now + window, now - 1, now + 1] {
            assert!(check_clock(now, ts).is_ok(), "{ts} is within {window} ms of {now}");
        }
        let far = [0, 1, now - window - 1, now + window + 1, 1 << 63, (1 << 63) - 1, (1 << 63) + 1, u64::MAX];
        for ts in far {
            let err = check_clock(now, ts).expect_err("outside the window");
            assert_eq!(err.code, "stale_request", "{ts}");
            assert_eq!(err.status, StatusCode::UNAUTHORIZED);
        }
        // Whatever our own clock says.
        for now in [0, u64::MAX, 1 << 63] {
            assert!(check_clock(now, now).is_ok());
            assert_eq!(check_clock(now, now.wrapping_add(window + 1)).unwrap_err().code, "stale_request");
        }
        assert!(check_clock(now, now + 3 * window).unwrap_err().message.contains("ahead of"));
        assert!(check_clock(now, now - 3 * window).unwrap_err().message.contains("behind"));
    }

    #[test]
    fn an_internal_error_is_logged_once_with_its_id() {
        let (err, events) = Capture::run(|| {
            let err = ApiError::internal(anyhow::anyhow!("secret detail"));
            log_refusal(&err);
            err
        });
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(events[0].1.contains("secret detail"));
        let id = err.message.strip_prefix("internal error ").and_then(|m| m.split(';').next()).unwrap();
        assert!(events[0].1.contains(id), "{events:?}");
    }

    #[test]
    fn other_server_errors_are_still_logged() {
        let (_, events) = Capture::run(|| {
            log_refusal(&ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", "try again"));
            log_refusal(&ApiError::bad_request("bad_header", "nope"));
        });
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0].0, tracing::Level::ERROR);
        assert_eq!(events[1].0, tracing::Level::DEBUG);
    }

    #[test]
    fn rounds_beyond_the_store_are_refused() {
        assert_eq!(parse_round("7").unwrap(), 7);
        assert_eq!(parse_round(&(i64::MAX as u64).to_string()).unwrap(), i64::MAX as u64);
        for bad in [(i64::MAX as u64 + 1).to_string(), u64::MAX.to_string(), "-1".into(), "x".into()] {
            assert_eq!(parse_round(&bad).unwrap_err().code, "bad_round", "{bad}");
        }
    }

    proptest::proptest! {
        /// Any pair of clocks: the check never panics or wraps, and accepts exactly the timestamps within
        /// the window of ours (computed here in i128, where nothing overflows).
        #[test]
        fn the_clock_check_is_exact_for_any_timestamps(
            now in proptest::num::u64::ANY,
            far in proptest::num::u64::ANY,
            near in -2 * MAX_SKEW_MS..2 * MAX_SKEW_MS,
        ) {
            for ts in [far, now.wrapping_add_signed(near)] {
                let within = (i128::from(now) - i128::from(ts)).abs() <= i128::from(MAX_SKEW_MS);
                proptest::prop_assert_eq!(check_clock(now, ts).is_ok(), within);
                proptest::prop_assert_eq!(crate::clock::skew_ms(now, ts), crate::clock::skew_ms(ts, now));
            }
        }
    }
}
