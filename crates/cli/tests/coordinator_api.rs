//! The coordinator's HTTP API under bad input: every refusal is a 4xx with a JSON error body and a
//! counter, and none of them disturbs the run (a valid pseudo-gradient afterwards still closes the round).

mod common;

use agora_diloco::codec::{self, Codec, CompressionConfig};
use agora_diloco::tensors::param_specs;
use agora_model::LlamaConfig;
use agora_protocol::messages::delta_meta;
use agora_protocol::*;
use common::*;
use reqwest::blocking::{Client, RequestBuilder};
use reqwest::StatusCode;
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

struct Api {
    http: Client,
    url: String,
    run_id: String,
    identity: Identity,
}

impl Api {
    fn signed(&self, method: &str, path: &str, body: Vec<u8>) -> RequestBuilder {
        self.signed_as(&self.identity, &self.run_id, method, path, body.clone(), &body)
    }

    /// A request whose signature covers `signed_body` (which may differ from the body sent).
    fn signed_as(
        &self,
        id: &Identity,
        run: &str,
        method: &str,
        path: &str,
        body: Vec<u8>,
        signed_body: &[u8],
    ) -> RequestBuilder {
        let ts = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        let round = path.strip_prefix("/v1/rounds/").and_then(|p| p.split('/').next()?.parse().ok()).unwrap_or(0);
        self.raw_signed(id, id, run, method, path, round, ts, &new_nonce(), body, signed_body)
    }

    /// Everything chosen by the caller: `signer` signs, `claimed` is the worker the headers name.
    #[allow(clippy::too_many_arguments)]
    fn raw_signed(
        &self,
        signer: &Identity,
        claimed: &Identity,
        run: &str,
        method: &str,
        path: &str,
        round: u64,
        timestamp_ms: u64,
        nonce: &str,
        body: Vec<u8>,
        signed_body: &[u8],
    ) -> RequestBuilder {
        let signed = SignedRequest { run_id: run, method, path, round, timestamp_ms, nonce };
        let sig = signer.sign_request(&signed, signed_body);
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        self.http
            .request(m, format!("{}{path}", self.url))
            .header(HEADER_RUN, run)
            .header(HEADER_WORKER, claimed.id().hex())
            .header(HEADER_ROUND, round.to_string())
            .header(HEADER_TIMESTAMP, timestamp_ms.to_string())
            .header(HEADER_NONCE, nonce)
            .header(HEADER_SIGNATURE, sig)
            .body(body)
    }
}

/// Sends, expects `status` and error `code`, returns nothing.
fn refused(request: RequestBuilder, status: StatusCode, code: &str) {
    let response = request.send().unwrap();
    assert_eq!(response.status(), status, "expected {status} {code}");
    let body: ErrorBody = response.json().unwrap_or_else(|e| panic!("{code}: the error body is not JSON: {e}"));
    assert_eq!(body.error, code, "{}", body.message);
    assert!(!body.message.is_empty());
}

/// Writes `head` on a raw connection and returns what comes back (the server closes it).
fn raw_request(url: &str, head: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(url.trim_start_matches("http://")).unwrap();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
            break;
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

fn api_refuses_bad_input(database: Option<String>) {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    // Input validation only: the zero pseudo-gradients sent here would (rightly) earn nothing if judged.
    let spec =
        RunSpec { rounds: 3, inner_steps: 2, min_workers: 1, trust: "verify = false".into(), ..RunSpec::default() };
    let cluster = Cluster::start(dir.path(), &spec, database);
    let http = Client::new();
    let info: RunInfo = http.get(format!("{}/v1/run", cluster.url)).send().unwrap().json().unwrap();
    let api =
        Api { http, url: cluster.url.clone(), run_id: info.run_id.clone(), identity: Identity::generate().unwrap() };
    let specs = param_specs(&LlamaConfig::from_json_str(&info.model.to_string()).unwrap());

    // Authentication and membership.
    refused(api.http.post(format!("{}/v1/work", api.url)).body("{}"), StatusCode::UNAUTHORIZED, "unsigned");
    refused(
        api.signed_as(&api.identity, "not-this-run", "POST", "/v1/work", b"{}".to_vec(), b"{}"),
        StatusCode::CONFLICT,
        "wrong_run",
    );
    refused(
        api.signed_as(&api.identity, &api.run_id, "POST", "/v1/work", b"{}".to_vec(), b"{ }"),
        StatusCode::UNAUTHORIZED,
        "bad_signature",
    );
    refused(api.signed("POST", "/v1/work", b"{}".to_vec()), StatusCode::UNAUTHORIZED, "unknown_worker");
    refused(api.signed("POST", "/v1/join", b"{not json".to_vec()), StatusCode::BAD_REQUEST, "malformed_json");
    let impostor = JoinRequest {
        protocol_version: PROTOCOL_VERSION,
        worker: Identity::generate().unwrap().id(),
        name: "x".into(),
    };
    refused(
        api.signed("POST", "/v1/join", serde_json::to_vec(&impostor).unwrap()),
        StatusCode::BAD_REQUEST,
        "bad_worker_id",
    );
    let join = JoinRequest { protocol_version: PROTOCOL_VERSION, worker: api.identity.id(), name: "prober".into() };
    let old = JoinRequest { protocol_version: 0, ..join.clone() };
    refused(
        api.signed("POST", "/v1/join", serde_json::to_vec(&old).unwrap()),
        StatusCode::CONFLICT,
        "protocol_version",
    );
    let joined = api.signed("POST", "/v1/join", serde_json::to_vec(&join).unwrap()).send().unwrap();
    assert_eq!(joined.status(), StatusCode::OK);

    // Forged, replayed and stale requests.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    let forger = Identity::generate().unwrap();
    refused(
        api.raw_signed(
            &forger,
            &api.identity,
            &api.run_id,
            "POST",
            "/v1/work",
            0,
            now,
            &new_nonce(),
            b"{}".to_vec(),
            b"{}",
        ),
        StatusCode::UNAUTHORIZED,
        "bad_signature",
    );
    let nonce = new_nonce();
    let once = || {
        api.raw_signed(
            &api.identity,
            &api.identity,
            &api.run_id,
            "POST",
            "/v1/heartbeat",
            0,
            now,
            &nonce,
            b"{\"round\":null,\"step\":0,\"loss\":null}".to_vec(),
            b"{\"round\":null,\"step\":0,\"loss\":null}",
        )
    };
    assert_eq!(once().send().unwrap().status(), StatusCode::OK);
    refused(once(), StatusCode::UNAUTHORIZED, "replayed_request");
    let hour_ago = now - 3_600_000;
    refused(
        api.raw_signed(
            &api.identity,
            &api.identity,
            &api.run_id,
            "POST",
            "/v1/work",
            0,
            hour_ago,
            &new_nonce(),
            b"{}".to_vec(),
            b"{}",
        ),
        StatusCode::UNAUTHORIZED,
        "stale_request",
    );
    refused(
        api.raw_signed(
            &api.identity,
            &api.identity,
            &api.run_id,
            "POST",
            "/v1/work",
            0,
            now,
            "xyz",
            b"{}".to_vec(),
            b"{}",
        ),
        StatusCode::BAD_REQUEST,
        "bad_header",
    );
    refused(
        api.signed("POST", "/v1/heartbeat", b"{\"round\":\"x\"}".to_vec()),
        StatusCode::BAD_REQUEST,
        "malformed_json",
    );

    let work: WorkResponse = api.signed("POST", "/v1/work", b"{}".to_vec()).send().unwrap().json().unwrap();
    let WorkResponse::Assignment(assignment) = work else { panic!("expected an assignment, got {work:?}") };
    assert_eq!(assignment.round, 0);
    let meta = BTreeMap::from([
        (delta_meta::ROUND.to_string(), "0".to_string()),
        (delta_meta::UNIT.to_string(), unit_list(&assignment.units)),
        (delta_meta::BASE.to_string(), assignment.global_hash.hex()),
        (delta_meta::TRAIN_LOSS.to_string(), "5.0".to_string()),
    ]);
    let zeros: Vec<NamedTensor> = specs
        .iter()
        .map(|s| NamedTensor {
            name: s.name.clone(),
            shape: s.shape.clone(),
            data: vec![0.0; s.shape.iter().product()],
        })
        .collect();
    // The run file leaves [compression] at its default: fp32 values in agora's payload format.
    let fp32 = CompressionConfig::default();
    let encode = |config: &CompressionConfig, tensors: &[NamedTensor], meta: &BTreeMap<String, String>| {
        let specs: Vec<TensorSpec> = tensors.iter().map(|t| t.spec()).collect();
        let data: Vec<Vec<f32>> = tensors.iter().map(|t| t.data.clone()).collect();
        codec::compress(config, 0, &specs, &data, None, meta).0
    };
    let delta = |tensors: &[NamedTensor], meta: &BTreeMap<String, String>| encode(&fp32, tensors, meta);
    let path = "/v1/rounds/0/delta";

    // Bad pseudo-gradients.
    refused(api.signed("POST", "/v1/rounds/7/delta", delta(&zeros, &meta)), StatusCode::CONFLICT, "wrong_round");
    refused(api.signed("POST", "/v1/rounds/x/delta", delta(&zeros, &meta)), StatusCode::BAD_REQUEST, "bad_round");
    // The signed round must be the path's.
    refused(
        api.raw_signed(
            &api.identity,
            &api.identity,
            &api.run_id,
            "POST",
            "/v1/rounds/0/delta",
            5,
            now,
            &new_nonce(),
            delta(&zeros, &meta),
            &delta(&zeros, &meta),
        ),
        StatusCode::BAD_REQUEST,
        "bad_round",
    );
    // The refusal comes as soon as the headers announce too much, before any of the body is read.
    let answer = raw_request(
        &api.url,
        &format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n", info.max_delta_bytes + 1),
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"error\":\"body_too_large\""), "{answer}");
    refused(
        api.signed("POST", path, b"definitely not a pseudo-gradient".to_vec()),
        StatusCode::BAD_REQUEST,
        "malformed_delta",
    );
    let mut wrong_shape = zeros.clone();
    let matrix = wrong_shape.iter_mut().find(|t| t.shape.len() == 2).expect("the model has matrices");
    matrix.shape = vec![matrix.data.len()];
    refused(api.signed("POST", path, delta(&wrong_shape, &meta)), StatusCode::UNPROCESSABLE_ENTITY, "shape_mismatch");
    refused(api.signed("POST", path, delta(&zeros[1..], &meta)), StatusCode::UNPROCESSABLE_ENTITY, "shape_mismatch");
    let mut nan = zeros.clone();
    nan[2].data[0] = f32::NAN;
    refused(api.signed("POST", path, delta(&nan, &meta)), StatusCode::UNPROCESSABLE_ENTITY, "non_finite");
    let mut inf = zeros.clone();
    inf[0].data[3] = f32::INFINITY;
    refused(api.signed("POST", path, delta(&inf, &meta)), StatusCode::UNPROCESSABLE_ENTITY, "non_finite");
    let int8 = CompressionConfig { codec: Codec::Int8, ..fp32 };
    refused(api.signed("POST", path, encode(&int8, &zeros, &meta)), StatusCode::UNPROCESSABLE_ENTITY, "wrong_codec");
    let mut corrupted = delta(&zeros, &meta);
    let middle = corrupted.len() / 2;
    corrupted[middle] ^= 0x10;
    refused(api.signed("POST", path, corrupted), StatusCode::BAD_REQUEST, "malformed_delta");
    refused(
        api.signed("POST", path, delta(&zeros, &BTreeMap::new())),
        StatusCode::UNPROCESSABLE_ENTITY,
        "wrong_metadata",
    );
    let mut stale = meta.clone();
    stale.insert(delta_meta::BASE.into(), hash_bytes(b"other weights").hex());
    refused(api.signed("POST", path, delta(&zeros, &stale)), StatusCode::UNPROCESSABLE_ENTITY, "wrong_metadata");
    // Data it was not assigned: one more unit than its assignment lists.
    let mut other_units = meta.clone();
    other_units.insert(delta_meta::UNIT.into(), format!("{},{}", unit_list(&assignment.units), u64::MAX));
    refused(api.signed("POST", path, delta(&zeros, &other_units)), StatusCode::UNPROCESSABLE_ENTITY, "wrong_metadata");
    let stranger = Identity::generate().unwrap();
    refused(
        api.signed_as(&stranger, &api.run_id, "POST", path, delta(&zeros, &meta), &delta(&zeros, &meta)),
        StatusCode::UNAUTHORIZED,
        "unknown_worker",
    );

    // Other endpoints.
    refused(api.http.get(format!("{}/v1/nothing", api.url)), StatusCode::NOT_FOUND, "no_such_endpoint");
    refused(api.http.delete(format!("{}/v1/status", api.url)), StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    refused(api.http.get(format!("{}/v1/blobs/xyz", api.url)), StatusCode::BAD_REQUEST, "bad_hash");
    refused(
        api.http.get(format!("{}/v1/blobs/{}", api.url, hash_bytes(b"nope").hex())),
        StatusCode::NOT_FOUND,
        "unknown_blob",
    );

    // None of that changed the run: a valid pseudo-gradient is accepted (once) and closes round 0.
    let ok: SubmitResponse = api.signed("POST", path, delta(&zeros, &meta)).send().unwrap().json().unwrap();
    assert!(ok.newly_received);
    let report = cluster.wait_for("round 0 to close", std::time::Duration::from_secs(60), |r| r.round == 1);
    assert_eq!(report.history[0].contributions, 1);
    // The same upload again (a retry whose answer was lost) is still "accepted", not applied twice.
    let again: SubmitResponse = api.signed("POST", path, delta(&zeros, &meta)).send().unwrap().json().unwrap();
    assert_eq!((again.newly_received, again.delta_hash), (false, ok.delta_hash));
    // A worker whose round closed without it is refused: too late.
    let late = Identity::generate().unwrap();
    let late_join = JoinRequest { protocol_version: PROTOCOL_VERSION, worker: late.id(), name: "late".into() };
    let body = serde_json::to_vec(&late_join).unwrap();
    assert!(api
        .signed_as(&late, &api.run_id, "POST", "/v1/join", body.clone(), &body)
        .send()
        .unwrap()
        .status()
        .is_success());
    refused(
        api.signed_as(&late, &api.run_id, "POST", path, delta(&zeros, &meta), &delta(&zeros, &meta)),
        StatusCode::CONFLICT,
        "round_closed",
    );
    assert_eq!(cluster.contributions().len(), 1);

    let metrics = cluster.metrics();
    for code in [
        "unsigned",
        "wrong_run",
        "bad_signature",
        "replayed_request",
        "stale_request",
        "unknown_worker",
        "malformed_json",
        "bad_worker_id",
        "protocol_version",
        "wrong_round",
        "bad_round",
        "body_too_large",
        "malformed_delta",
        "shape_mismatch",
        "non_finite",
        "wrong_codec",
        "wrong_metadata",
        "no_such_endpoint",
        "bad_hash",
        "unknown_blob",
        "round_closed",
    ] {
        assert!(
            metrics.contains(&format!("agora_requests_rejected{{reason=\"{code}\"}}")),
            "no counter for {code}:\n{metrics}"
        );
    }
    assert!(metrics.contains("agora_requests_rejected{reason=\"shape_mismatch\"} 2"), "{metrics}");
    assert!(metrics.contains("agora_requests_rejected{reason=\"non_finite\"} 2"), "{metrics}");
    let log = std::fs::read_to_string(cluster.log("coordinator")).unwrap();
    assert!(!log.contains("panicked"), "the coordinator panicked:\n{log}");
}

#[test]
fn api_refuses_bad_input_sqlite() {
    api_refuses_bad_input(None);
}

#[test]
fn api_refuses_bad_input_postgres() {
    if let Some(base) = postgres_base() {
        api_refuses_bad_input(Some(fresh_postgres_db(&base, "api")));
    }
}

/// `agora status` reads a live coordinator, as a table and as JSON.
#[test]
fn status_command_reports_the_run() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), &RunSpec::default(), None);
    let out = std::process::Command::new(AGORA).args(["status", &cluster.url, "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: StatusReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report.round, report.rounds, report.finished), (0, 5, false));
    assert!(report.history[0].val_loss.unwrap() > 5.0, "untrained loss is near ln(300)");
    let out = std::process::Command::new(AGORA).args(["status", &cluster.url]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(&format!("run {}", report.run_id)) && text.contains("round 0/5"), "{text}");
    let out = std::process::Command::new(AGORA).args(["status", "http://127.0.0.1:9"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}

/// `[admission] policy = "allowlist"`: listed keys join; anyone else gets 403 `not_admitted`, saying why.
#[test]
fn allowlist_admits_only_its_keys() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let member = Identity::generate().unwrap();
    let spec = RunSpec {
        admission: format!("policy = \"allowlist\"\nallowlist = [\"{}\"]", member.id().hex()),
        ..RunSpec::default()
    };
    let cluster = Cluster::start(dir.path(), &spec, None);
    let http = Client::new();
    let info: RunInfo = http.get(format!("{}/v1/run", cluster.url)).send().unwrap().json().unwrap();
    let api = Api { http, url: cluster.url.clone(), run_id: info.run_id.clone(), identity: member };
    let join = |id: &Identity| {
        let body =
            serde_json::to_vec(&JoinRequest { protocol_version: PROTOCOL_VERSION, worker: id.id(), name: "x".into() })
                .unwrap();
        api.signed_as(id, &api.run_id, "POST", "/v1/join", body.clone(), &body)
    };
    assert_eq!(join(&api.identity).send().unwrap().status(), StatusCode::OK);
    let outsider = Identity::generate().unwrap();
    let response = join(&outsider).send().unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body: ErrorBody = response.json().unwrap();
    assert_eq!(body.error, "not_admitted");
    assert!(body.message.contains("allowlist"), "{}", body.message);
}

/// A joined prober of `cluster`'s run.
fn joined_api(cluster: &Cluster, info: &RunInfo, name: &str) -> Api {
    let api = Api {
        http: Client::new(),
        url: cluster.url.clone(),
        run_id: info.run_id.clone(),
        identity: Identity::generate().unwrap(),
    };
    let join = JoinRequest { protocol_version: PROTOCOL_VERSION, worker: api.identity.id(), name: name.into() };
    assert_eq!(
        api.signed("POST", "/v1/join", serde_json::to_vec(&join).unwrap()).send().unwrap().status(),
        StatusCode::OK
    );
    api
}

fn work(api: &Api) -> WorkResponse {
    api.signed("POST", "/v1/work", b"{}".to_vec()).send().unwrap().json().unwrap()
}

/// Uploads a zero pseudo-gradient (fp32, one fragment) for `a`.
fn upload_zeros(api: &Api, info: &RunInfo, a: &Assignment) {
    let specs = param_specs(&LlamaConfig::from_json_str(&info.model.to_string()).unwrap());
    let meta = BTreeMap::from([
        (delta_meta::ROUND.to_string(), a.round.to_string()),
        (delta_meta::UNIT.to_string(), unit_list(&a.units)),
        (delta_meta::BASE.to_string(), a.global_hash.hex()),
        (delta_meta::TRAIN_LOSS.to_string(), "5.0".to_string()),
    ]);
    let zeros: Vec<Vec<f32>> = specs.iter().map(|s| vec![0.0; s.shape.iter().product()]).collect();
    let payload = codec::compress(&CompressionConfig::default(), 0, &specs, &zeros, None, &meta).0;
    let path = format!("/v1/rounds/{}/delta", a.round);
    let response = api.signed("POST", &path, payload).send().unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().unwrap());
}

fn assignment(w: WorkResponse) -> Assignment {
    match w {
        WorkResponse::Assignment(a) => a,
        other => panic!("expected an assignment, got {other:?}"),
    }
}

/// An assignment without its deadline (which moves with the clock while the run starts up).
fn job(a: &Assignment) -> (u64, Hash32, Vec<DataUnit>) {
    (a.round, a.global_hash, a.units.clone())
}

fn ahead(w: WorkResponse) -> AheadAssignment {
    match w {
        WorkResponse::Ahead(a) => a,
        other => panic!("expected the next round ahead, got {other:?}"),
    }
}

/// Streaming DiLoCo's overlap over HTTP: the next round is handed out early only to a worker whose upload
/// for the open round is in, once (asking again waits for the round to open), never a unit another worker
/// holds in that round, and never past the run's last planned round; once the round opens, the early job
/// is the worker's assignment (same unit). Without overlap an uploaded worker waits.
#[test]
fn overlap_hands_the_next_round_only_to_a_worker_that_uploaded() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let spec = RunSpec {
        rounds: 2,
        inner_steps: 4,
        min_workers: 3,
        // The probers send no heartbeats: they must not be dropped as silent meanwhile.
        heartbeat_timeout_secs: 120,
        trust: "verify = false".into(),
        compression: "overlap_steps = 2".into(),
        ..RunSpec::default()
    };
    let cluster = Cluster::start(dir.path(), &spec, None);
    let info: RunInfo = Client::new().get(format!("{}/v1/run", cluster.url)).send().unwrap().json().unwrap();
    let (a, b, c) =
        (joined_api(&cluster, &info, "a"), joined_api(&cluster, &info, "b"), joined_api(&cluster, &info, "c"));

    let a0 = assignment(work(&a));
    let b0 = assignment(work(&b));
    assert_eq!(job(&assignment(work(&a))), job(&a0), "not uploaded yet: the open round's job, not the next one");
    upload_zeros(&a, &info, &a0);
    let a1 = ahead(work(&a));
    assert_eq!((a1.round, a1.first_step, a1.inner_steps), (1, 4, 4));
    // Asking again waits for round 1 to open (a long poll of up to 20 s, ended by any change).
    let again = work(&a);
    assert!(matches!(again, WorkResponse::Wait { round: 0, .. }), "the early job is handed out once: {again:?}");
    assert_eq!(job(&assignment(work(&b))), job(&b0), "b has not uploaded: no early job for it");
    upload_zeros(&b, &info, &b0);
    let b1 = ahead(work(&b));
    assert_ne!(b1.units, a1.units, "a unit is never held by two workers in one round");
    // c joins late: round 0 is still open (3 uploads needed), so it trains round 0 like anyone.
    let c0 = assignment(work(&c));
    upload_zeros(&c, &info, &c0);
    cluster.wait_for("round 0 to close", std::time::Duration::from_secs(60), |r| r.round == 1);
    let a1_open = assignment(work(&a));
    assert_eq!((a1_open.round, &a1_open.units), (1, &a1.units));
    upload_zeros(&a, &info, &a1_open);
    // Round 1 is the last planned one: nothing ahead of it.
    assert!(matches!(work(&a), WorkResponse::Wait { round: 1, .. }), "no round after the last one");
    drop(cluster);

    let dir = tempfile::tempdir().unwrap();
    let spec =
        RunSpec { rounds: 2, inner_steps: 4, min_workers: 2, trust: "verify = false".into(), ..RunSpec::default() };
    let cluster = Cluster::start(dir.path(), &spec, None);
    let info: RunInfo = Client::new().get(format!("{}/v1/run", cluster.url)).send().unwrap().json().unwrap();
    let a = joined_api(&cluster, &info, "a");
    let a0 = assignment(work(&a));
    upload_zeros(&a, &info, &a0);
    assert!(matches!(work(&a), WorkResponse::Wait { round: 0, .. }), "without overlap an uploaded worker waits");
}

/// A run file whose overlap cannot work is refused before the run starts.
#[test]
fn overlap_settings_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    for (compression, why) in [
        ("overlap_steps = 4", "τ must fall inside the round of 4 steps"),
        ("overlap_steps = 2\nmerge = 1.0", "α = 1 never takes the global weights in"),
        ("codec = \"int8\"\nerror_feedback = true\noverlap_steps = 2", "overlap with error feedback"),
    ] {
        let spec = RunSpec { inner_steps: 4, compression: compression.into(), ..RunSpec::default() };
        let run = write_run(dir.path(), &spec);
        let err = agora_coordinator::RunFile::load(&run).unwrap_err();
        assert!(format!("{err:#}").contains("overlap") || format!("{err:#}").contains("merge"), "{why}: {err:#}");
    }
}
