//! Issue 11's fixes across real processes on loopback: more workers than data units never train a unit
//! twice in a round (so no honest upload is judged a copy of another), an identity that takes work and
//! never delivers neither holds rounds open for the deadline nor keeps getting work, and small uploads
//! cannot get honest ones refused. Built with the `adversary` feature (the `tiny` workers).
#![cfg(feature = "adversary")]

mod common;

use agora_coordinator::core::liveness::NoShowPolicy;
use agora_data::{prepare, train_bpe, MarkovSource, Shard};
use agora_diloco::unit_order;
use agora_protocol::*;
use common::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What `write_run` puts in every run file.
const SEED: u64 = 3;
const VOCAB: usize = 300;
const BATCH: usize = 4;
const SEQ: usize = 32;
const VAL_FRACTION: f64 = 0.1;

/// A Markov corpus that the coordinator cuts into exactly `units` units of `inner_steps` · B windows:
/// tokenized here the way the coordinator will (same tokenizer training, same split), with the word
/// count adjusted until the count is right.
fn corpus_of_units(scratch: &Path, units: usize, inner_steps: u64) -> String {
    let per_unit = inner_steps as usize * BATCH;
    let mut words = 3000usize;
    for attempt in 0..30 {
        let text = MarkovSource::new(1).generate(words, 1);
        let dir = scratch.join(format!("probe-{attempt}"));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("corpus.txt");
        std::fs::write(&file, &text).unwrap();
        let tokenizer = train_bpe(std::slice::from_ref(&file), VOCAB).unwrap();
        let report = prepare(std::slice::from_ref(&file), &tokenizer, &dir, VAL_FRACTION).unwrap();
        let windows = Shard::open(&report.train_path).unwrap().len().saturating_sub(1) / SEQ;
        let got = windows as f64 / per_unit as f64;
        if got.floor() as usize == units {
            return text;
        }
        // Aim for the middle of the interval [units, units + 1).
        words = ((words as f64) * (units as f64 + 0.5) / got.max(0.1)).round() as usize;
    }
    panic!("no corpus of exactly {units} units found");
}

/// `key=value` fields of the coordinator's log lines whose message is `message`.
fn log_events(log: &str, message: &str) -> Vec<HashMap<String, String>> {
    log.lines()
        .filter(|line| line.split_whitespace().any(|w| w == message))
        .map(|line| {
            line.split_whitespace()
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                .collect()
        })
        .collect()
}

fn names(report: &StatusReport) -> HashMap<WorkerId, String> {
    report.workers.iter().map(|w| (w.id, w.name.clone())).collect()
}

/// 6 honest workers, 4 data units (1.5 × as many workers as units), int8 pseudo-gradients, verification
/// on. Every round trains each unit exactly once (min_workers = 4: a round waits for all four), the two
/// workers left over wait, and no honest upload is refused (before the fix, the later of two workers on
/// the same unit computed the same Δ and was judged a copy).
#[test]
fn workers_outnumbering_units_never_share_a_unit() {
    let _serial = serial();
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (units, rounds, inner_steps) = (4usize, 4u64, 6u64);
    let corpus = corpus_of_units(&dir.path().join("probe"), units, inner_steps);
    let corpus_secs = started.elapsed().as_secs_f64();
    let spec = RunSpec {
        rounds,
        inner_steps,
        min_workers: units as u64,
        compression: "codec = \"int8\"".into(),
        ..RunSpec::default()
    };
    let mut cluster = Cluster::start_with_corpus(dir.path(), &spec, &corpus, None);
    let log = std::fs::read_to_string(cluster.log("coordinator")).unwrap();
    let cut = log_events(&log, "units");
    assert!(
        cut.iter().any(|e| e.get("units").map(String::as_str) == Some("4")),
        "the coordinator did not cut 4 units:\n{}",
        cluster.logs()
    );
    let workers = ["w0", "w1", "w2", "w3", "w4", "w5"];
    for name in workers {
        cluster.start_worker(name);
    }

    // Watch the open round: the units held (training or submitted) are distinct at every instant.
    let mut held: BTreeMap<u64, BTreeSet<(String, u64, u64)>> = BTreeMap::new();
    let mut opened: BTreeMap<u64, f64> = BTreeMap::new();
    let report = cluster.wait_for("the run to finish", Duration::from_secs(240), |r| {
        opened.entry(r.round).or_insert_with(|| started.elapsed().as_secs_f64());
        let holding: Vec<&WorkerStatus> = r
            .workers
            .iter()
            .filter(|w| w.assignment.is_some() && (w.state == "training" || w.state == "submitted"))
            .collect();
        let units_now: BTreeSet<u64> = holding.iter().map(|w| w.assignment.unwrap().1).collect();
        assert_eq!(units_now.len(), holding.len(), "round {}: a unit held twice at once: {:?}", r.round, r.workers);
        for w in holding {
            let (epoch, unit) = w.assignment.unwrap();
            held.entry(r.round).or_default().insert((w.name.clone(), epoch, unit));
        }
        r.finished
    });
    cluster.finish_workers(Duration::from_secs(60));
    let elapsed = started.elapsed();
    assert_eq!(report.round, rounds);
    let names = names(&report);

    // Seen live: never two workers on one unit in a round.
    for (round, holders) in &held {
        let units_held: Vec<u64> = holders.iter().map(|h| h.2).collect();
        let distinct: BTreeSet<u64> = units_held.iter().copied().collect();
        assert_eq!(units_held.len(), distinct.len(), "round {round}: {holders:?}");
    }
    // Every assignment the coordinator made: within a round, distinct units, handed out in the epoch's
    // order (round r is epoch r: four workers a round take all four units).
    let log = std::fs::read_to_string(cluster.log("coordinator")).unwrap();
    let mut assigned: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    for e in log_events(&log, "assigned") {
        let field = |k: &str| e.get(k).and_then(|v| v.parse::<u64>().ok());
        if let (Some(round), Some(unit), Some(epoch)) = (field("round"), field("unit"), field("epoch")) {
            assigned.entry(round).or_default().push((epoch, unit));
        }
    }
    assert_eq!(assigned.keys().copied().collect::<Vec<_>>(), (0..rounds).collect::<Vec<_>>(), "{assigned:?}");
    for (&round, list) in &assigned {
        let expected: Vec<(u64, u64)> = unit_order(SEED, round, units).into_iter().map(|u| (round, u)).collect();
        assert_eq!(list, &expected, "round {round}: assignments in the order of epoch {round}");
    }

    // No honest upload refused: every judgement is `accepted`.
    let judgements = cluster.judgements();
    assert_eq!(judgements.len() as u64, rounds * units as u64, "{judgements:?}");
    let refused: Vec<String> = judgements
        .iter()
        .filter(|j| j.verdict != "accepted")
        .map(|j| {
            format!(
                "round {} {}: {} (score {:.3}, similarity {:?})",
                j.round, names[&j.worker], j.verdict, j.score, j.similarity
            )
        })
        .collect();
    assert!(refused.is_empty(), "honest uploads refused:\n{}\n{}", refused.join("\n"), cluster.logs());

    // Applied: per round distinct units; per epoch distinct (epoch, unit) pairs covering every unit.
    let contributions = cluster.contributions();
    check_contributions(&contributions, rounds);
    let mut per_round: BTreeMap<u64, BTreeSet<(u64, u64)>> = BTreeMap::new();
    for c in &contributions {
        for &(epoch, unit) in &c.units {
            assert!(
                per_round.entry(c.round).or_default().insert((epoch, unit)),
                "round {}: unit {unit} twice",
                c.round
            );
        }
    }
    for (&round, pairs) in &per_round {
        let expected: BTreeSet<(u64, u64)> = (0..units as u64).map(|u| (round, u)).collect();
        assert_eq!(pairs, &expected, "round {round} applies epoch {round}'s four units");
    }
    for h in &report.history[..rounds as usize] {
        assert_eq!(h.contributions, units as u64, "round {}", h.round);
    }
    // Reported, not asserted: who got work (nothing promises every worker a turn).
    let worked: BTreeSet<&str> = held.values().flatten().map(|h| h.0.as_str()).collect();
    eprintln!(
        "workers_outnumbering_units: {:.1}s ({corpus_secs:.1}s finding the corpus, rounds opened at {opened:.1?} s); \
         workers that trained: {worked:?}",
        elapsed.as_secs_f64()
    );
}

/// A signed client that joins, takes work, heartbeats every 0.5 s and never uploads. Records the kind
/// of every `/v1/work` answer by round.
struct Idle {
    id: WorkerId,
    /// (round, got an assignment) for every answer.
    answers: Arc<Mutex<Vec<(u64, bool)>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

fn signed(
    http: &reqwest::blocking::Client,
    url: &str,
    identity: &Identity,
    run_id: &str,
    round: u64,
    path: &str,
    body: Vec<u8>,
) -> reqwest::blocking::RequestBuilder {
    let timestamp_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    let nonce = new_nonce();
    let request = SignedRequest { run_id, method: "POST", path, round, timestamp_ms, nonce: &nonce };
    let signature = identity.sign_request(&request, &body);
    http.post(format!("{url}{path}"))
        .header("content-type", "application/json")
        .header(HEADER_RUN, run_id)
        .header(HEADER_WORKER, identity.id().hex())
        .header(HEADER_ROUND, round.to_string())
        .header(HEADER_TIMESTAMP, timestamp_ms.to_string())
        .header(HEADER_NONCE, nonce)
        .header(HEADER_SIGNATURE, signature)
        .body(body)
}

impl Idle {
    fn start(url: &str) -> Idle {
        let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let info: RunInfo = http.get(format!("{url}/v1/run")).send().unwrap().json().unwrap();
        let identity = Arc::new(Identity::generate().unwrap());
        let join = JoinRequest { protocol_version: PROTOCOL_VERSION, worker: identity.id(), name: "idle".into() };
        let response = signed(&http, url, &identity, &info.run_id, 0, "/v1/join", serde_json::to_vec(&join).unwrap())
            .send()
            .unwrap();
        assert!(response.status().is_success(), "join: {}", response.text().unwrap());
        let answers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        // The round it holds work in (u64::MAX: none), for the heartbeats.
        let holding = Arc::new(AtomicU64::new(u64::MAX));
        let open = Arc::new(AtomicU64::new(0));
        let work = {
            let (http, url, identity, run_id) = (http.clone(), url.to_string(), identity.clone(), info.run_id.clone());
            let (answers, stop, holding, open) = (answers.clone(), stop.clone(), holding.clone(), open.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let round = open.load(Ordering::Relaxed);
                    let sent = signed(&http, &url, &identity, &run_id, round, "/v1/work", b"{}".to_vec()).send();
                    let Ok(response) = sent else {
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    };
                    assert!(response.status().is_success(), "work: {}", response.text().unwrap_or_default());
                    match response.json::<WorkResponse>().unwrap() {
                        WorkResponse::Assignment(a) => {
                            open.store(a.round, Ordering::Relaxed);
                            holding.store(a.round, Ordering::Relaxed);
                            answers.lock().unwrap().push((a.round, true));
                            std::thread::sleep(Duration::from_millis(500));
                        }
                        WorkResponse::Wait { round, .. } => {
                            open.store(round, Ordering::Relaxed);
                            holding.store(u64::MAX, Ordering::Relaxed);
                            answers.lock().unwrap().push((round, false));
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        WorkResponse::Finished { .. } => break,
                        WorkResponse::Ahead(a) => panic!("this run does not overlap, yet: {a:?}"),
                    }
                }
            })
        };
        let beats = {
            let (http, url, identity, run_id) = (http.clone(), url.to_string(), identity.clone(), info.run_id.clone());
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let round = holding.load(Ordering::Relaxed);
                    let beat = Heartbeat { round: (round != u64::MAX).then_some(round), step: 0, loss: None };
                    let body = serde_json::to_vec(&beat).unwrap();
                    let sent =
                        signed(&http, &url, &identity, &run_id, open.load(Ordering::Relaxed), "/v1/heartbeat", body);
                    if let Ok(response) = sent.send() {
                        if let Ok(r) = response.json::<HeartbeatResponse>() {
                            if r.finished {
                                break;
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
        };
        Idle { id: identity.id(), answers, threads: vec![work, beats], stop }
    }

    fn finish(mut self) -> Vec<(u64, bool)> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().expect("the idle client's threads");
        }
        std::mem::take(&mut *self.answers.lock().unwrap())
    }
}

/// 2 honest workers and one identity that takes work, heartbeats and never uploads, with the default
/// 600 s deadline. Each round closes once both honest workers have uploaded and the grace has passed
/// (before the fix every round waited for the deadline), and after two no-shows in a row the idle
/// identity is benched: it is told to wait through the rounds `NoShowPolicy` says.
#[test]
fn an_idle_identity_does_not_stall_the_run() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let rounds = 5;
    let spec = RunSpec { rounds, inner_steps: 6, min_workers: 2, deadline_secs: 600, ..RunSpec::default() };
    let started = Instant::now();
    let mut cluster = Cluster::start(dir.path(), &spec, None);
    let idle = Idle::start(&cluster.url);
    let idle_id = idle.id;
    cluster.start_worker("a");
    cluster.start_worker("b");
    // Per round: whether the idle identity was seen holding work, and seen alive (heartbeating) without.
    let mut seen: BTreeMap<u64, (bool, bool)> = BTreeMap::new();
    let report = cluster.wait_for("the run to finish", Duration::from_secs(240), |r| {
        if let Some(w) = r.workers.iter().find(|w| w.id == idle_id) {
            let entry = seen.entry(r.round).or_default();
            if w.assignment.is_some() {
                entry.0 = true;
            } else if w.last_seen_ms_ago < 2000 && !r.finished {
                entry.1 = true;
            }
        }
        r.finished
    });
    let elapsed = started.elapsed();
    let answers = idle.finish();
    cluster.finish_workers(Duration::from_secs(60));
    assert_eq!(report.round, rounds);
    assert!(
        elapsed < Duration::from_secs(90),
        "{rounds} rounds took {:.0}s\n{}",
        elapsed.as_secs_f64(),
        cluster.logs()
    );
    for h in &report.history[..rounds as usize] {
        assert_eq!(h.contributions, 2, "round {}: both honest workers applied", h.round);
    }

    // Which rounds the idle identity gets work in: every round until two no-shows in a row, then none
    // for a bench that doubles with every further no-show (NoShowPolicy::benched_until).
    let policy = NoShowPolicy::default();
    let (mut expected, mut no_shows, mut until) = (BTreeSet::new(), 0, 0);
    for round in 0..rounds {
        if round >= until {
            expected.insert(round);
            no_shows += 1;
            until = policy.benched_until(round, no_shows);
        }
    }
    let benched: BTreeSet<u64> = (0..rounds).filter(|r| !expected.contains(r)).collect();
    assert!(!benched.is_empty(), "{rounds} rounds are enough to bench it");
    // What the idle client was answered (a benched identity's request long-polls: `wait` until it gets
    // work again) ...
    let held: BTreeSet<u64> = answers.iter().filter(|a| a.1).map(|a| a.0).collect();
    let waited: BTreeSet<u64> = answers.iter().filter(|a| !a.1).map(|a| a.0).collect();
    eprintln!(
        "an_idle_identity: {:.1}s; idle held work in rounds {held:?} (expected {expected:?}), answered wait in \
         {waited:?}; seen per round (holding, alive without work): {seen:?}",
        elapsed.as_secs_f64()
    );
    assert_eq!(held, expected, "rounds the idle client got work in ({answers:?})");
    // ... what the coordinator assigned ...
    let log = std::fs::read_to_string(cluster.log("coordinator")).unwrap();
    let assigned: BTreeSet<u64> = log_events(&log, "assigned")
        .iter()
        .filter(|e| e.get("worker") == Some(&idle_id.short()))
        .filter_map(|e| e.get("round")?.parse().ok())
        .collect();
    assert_eq!(assigned, expected, "rounds the coordinator assigned the idle identity work in");
    assert_eq!(log_events(&log, "no-show:").len(), expected.len(), "one no-show per round it held work in");
    // ... and what the status showed: through its bench it was alive (heartbeating) and held nothing.
    for r in &benched {
        assert_eq!(seen.get(r), Some(&(false, true)), "round {r}: the benched identity ({seen:?})");
    }
    // It delivered nothing, so nothing of it was judged or applied.
    assert!(cluster.judgements().iter().all(|j| j.worker != idle_id));
    assert!(cluster.contributions().iter().all(|c| c.worker != idle_id));
}

/// 2 honest workers and 2 that send 0.05 × their Δ, spot checks off (the score rule is under test).
/// With the upper-median references the tiny uploads neither get an honest upload refused as `norm`
/// nor are paid as if they had helped (issue 11, finding 2).
#[test]
fn two_tiny_uploads_of_four_get_no_honest_upload_refused() {
    let _serial = serial();
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let rounds = 4;
    let spec =
        RunSpec { rounds, inner_steps: 8, min_workers: 4, trust: "spot_check = 0.0".into(), ..RunSpec::default() };
    let mut cluster = Cluster::start(dir.path(), &spec, None);
    for name in ["h0", "h1"] {
        cluster.start_worker(name);
    }
    for name in ["t0", "t1"] {
        let data_dir = cluster.dir.join("workers").join(name);
        cluster.start_worker_with(name, &data_dir, &["--behaviour", "tiny"]);
    }
    let report = cluster.wait_for("the run to finish", Duration::from_secs(240), |r| r.finished);
    cluster.finish_workers(Duration::from_secs(60));
    assert_eq!(report.round, rounds);
    let names = names(&report);
    let judgements = cluster.judgements();
    assert_eq!(judgements.len() as u64, 4 * rounds, "{judgements:?}");
    let mut tiny_scores = Vec::new();
    for j in &judgements {
        let name = &names[&j.worker];
        if name.starts_with('h') {
            assert_eq!(j.verdict, "accepted", "round {}: honest {name} refused: {j:?}\n{}", j.round, cluster.logs());
        } else {
            assert!(j.verdict == "accepted" || j.verdict == "zero_score", "round {}: {name}: {j:?}", j.round);
            tiny_scores.push(j.score);
        }
    }
    assert_eq!(tiny_scores.len() as u64, 2 * rounds);
    let max_tiny = tiny_scores.iter().copied().fold(0.0, f64::max);
    let honest_scores: Vec<f64> =
        judgements.iter().filter(|j| names[&j.worker].starts_with('h')).map(|j| j.score).collect();
    eprintln!(
        "two_tiny_uploads: {:.1}s; tiny scores {tiny_scores:.3?}, honest scores {honest_scores:.3?}",
        started.elapsed().as_secs_f64()
    );
    assert!(max_tiny < 0.2, "the tiny uploads scored up to {max_tiny:.3}: {judgements:?}");
}
