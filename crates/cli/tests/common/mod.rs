//! A real run on loopback for the integration tests: a coordinator process, worker processes, real
//! sockets, and the coordinator's public endpoints to watch them.
#![allow(dead_code)]

use agora_data::MarkovSource;
use agora_protocol::{Contribution, StatusReport};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const AGORA: &str = env!("CARGO_BIN_EXE_agora");

/// Tests that start processes run one at a time: they share two cores and time out on heartbeats.
pub static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The database backends to run a scenario against: SQLite always; PostgreSQL when
/// `AGORA_TEST_POSTGRES_URL` (e.g. `postgres://agora:agora@127.0.0.1:5432`) is set. Under CI it must be.
pub fn postgres_base() -> Option<String> {
    match std::env::var("AGORA_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url.trim_end_matches('/').to_string()),
        _ => {
            assert!(
                std::env::var("CI").is_err(),
                "CI must run the PostgreSQL suite: set AGORA_TEST_POSTGRES_URL (.ci/run starts PostgreSQL and sets it)"
            );
            eprintln!("AGORA_TEST_POSTGRES_URL is not set: skipping the PostgreSQL variant");
            None
        }
    }
}

/// A fresh database URL on the PostgreSQL server (the coordinator creates the database).
pub fn fresh_postgres_db(base: &str, name: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("{base}/agora_{name}_{}_{}", std::process::id(), nanos % 1_000_000_000)
}

pub struct RunSpec {
    pub rounds: u64,
    pub inner_steps: u64,
    pub min_workers: u64,
    pub deadline_secs: u64,
    pub heartbeat_timeout_secs: u64,
    /// More `[inner]` lines (e.g. `round_lr_power = 1.0`).
    pub inner: String,
    /// The body of a `[compression]` section (fp32 when empty).
    pub compression: String,
    /// The bodies of the `[trust]` and `[admission]` sections (defaults when empty).
    pub trust: String,
    pub admission: String,
}

impl Default for RunSpec {
    fn default() -> Self {
        RunSpec {
            rounds: 5,
            inner_steps: 10,
            min_workers: 1,
            deadline_secs: 120,
            heartbeat_timeout_secs: 8,
            inner: String::new(),
            compression: String::new(),
            trust: String::new(),
            admission: String::new(),
        }
    }
}

/// Writes a Markov corpus and a run file into `dir`; returns the run file.
pub fn write_run(dir: &Path, spec: &RunSpec) -> PathBuf {
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, MarkovSource::new(1).generate(40_000, 1)).unwrap();
    let run = dir.join("run.toml");
    std::fs::write(
        &run,
        format!(
            r#"seed = 3
[model]
preset = "tiny"
[data]
files = ["corpus.txt"]
vocab_size = 300
[inner]
steps = {}
batch_size = 4
seq_len = 32
lr = 3e-3
min_lr = 3e-4
warmup_steps = 5
{}
[rounds]
count = {}
min_workers = {}
deadline_secs = {}
heartbeat_timeout_secs = {}
[eval]
batches = 4
[compression]
{}
[trust]
{}
[admission]
{}
"#,
            spec.inner_steps,
            spec.inner,
            spec.rounds,
            spec.min_workers,
            spec.deadline_secs,
            spec.heartbeat_timeout_secs,
            spec.compression,
            spec.trust,
            spec.admission
        ),
    )
    .unwrap();
    run
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!("--- {} (last lines)\n{}", path.display(), lines[lines.len().saturating_sub(25)..].join("\n"))
}

/// A coordinator and its workers; every process is killed when this is dropped.
pub struct Cluster {
    pub dir: PathBuf,
    pub run_file: PathBuf,
    pub database: Option<String>,
    pub port: u16,
    pub url: String,
    pub coordinator: Option<Child>,
    pub coordinator_starts: usize,
    pub workers: Vec<(String, Child)>,
}

impl Cluster {
    pub fn start(dir: &Path, spec: &RunSpec, database: Option<String>) -> Cluster {
        let run_file = write_run(dir, spec);
        let port = free_port();
        let mut cluster = Cluster {
            dir: dir.to_path_buf(),
            run_file,
            database,
            port,
            url: format!("http://127.0.0.1:{port}"),
            coordinator: None,
            coordinator_starts: 0,
            workers: Vec::new(),
        };
        cluster.start_coordinator();
        cluster
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    pub fn logs(&self) -> String {
        let mut out = tail(&self.log("coordinator"));
        for (name, _) in &self.workers {
            out += "\n";
            out += &tail(&self.log(name));
        }
        out
    }

    /// Starts (or restarts) the coordinator on the same port, directory and database.
    pub fn start_coordinator(&mut self) {
        self.coordinator_starts += 1;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log("coordinator")).unwrap();
        let mut cmd = Command::new(AGORA);
        cmd.args(["coordinator", "--run"])
            .arg(&self.run_file)
            .args(["--listen", &format!("127.0.0.1:{}", self.port), "--threads", "1", "--dir"])
            .arg(self.dir.join("coordinator"))
            .env("RUST_LOG", "agora=debug,info")
            .stdout(Stdio::piped())
            .stderr(log);
        if let Some(db) = &self.database {
            cmd.args(["--database", db]);
        }
        let mut child = cmd.spawn().expect("start the coordinator");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.contains("listening on"), "the coordinator did not start:\n{}", tail(&self.log("coordinator")));
        self.coordinator = Some(child);
    }

    pub fn kill_coordinator(&mut self) {
        let mut child = self.coordinator.take().expect("a running coordinator");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }

    pub fn start_worker(&mut self, name: &str) {
        self.start_worker_with(name, &self.dir.join("workers").join(name), &[]);
    }

    /// A worker keeping its identity and state in `data_dir`, with extra arguments (e.g. `--behaviour` in
    /// the adversarial build).
    pub fn start_worker_with(&mut self, name: &str, data_dir: &Path, extra: &[&str]) {
        let log = std::fs::File::create(self.log(name)).unwrap();
        let child = Command::new(AGORA)
            .args([
                "worker",
                "--coordinator",
                &self.url,
                "--threads",
                "1",
                "--json",
                "--patience-secs",
                "120",
                "--name",
                name,
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start a worker");
        self.workers.push((name.to_string(), child));
    }

    pub fn worker_pid(&self, name: &str) -> u32 {
        self.workers.iter().find(|(n, _)| n == name).expect("worker").1.id()
    }

    pub fn signal_worker(&self, name: &str, signal: &str) {
        let status =
            Command::new("kill").args([&format!("-{signal}"), &self.worker_pid(name).to_string()]).status().unwrap();
        assert!(status.success());
    }

    pub fn kill_worker(&mut self, name: &str) {
        let (_, child) = self.workers.iter_mut().find(|(n, _)| n == name).expect("worker");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn status(&self) -> Option<StatusReport> {
        let response = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
            .get(format!("{}/v1/status", self.url))
            .send()
            .ok()?;
        response.json().ok()
    }

    pub fn contributions(&self) -> Vec<Contribution> {
        reqwest::blocking::get(format!("{}/v1/contributions", self.url)).unwrap().json().unwrap()
    }

    pub fn metrics(&self) -> String {
        reqwest::blocking::get(format!("{}/metrics", self.url)).unwrap().text().unwrap()
    }

    /// Polls the status until `done` holds; fails with every log after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut done: impl FnMut(&StatusReport) -> bool) -> StatusReport {
        let started = Instant::now();
        loop {
            if let Some(report) = self.status() {
                if done(&report) {
                    return report;
                }
            }
            assert!(started.elapsed() < timeout, "timed out waiting for {what}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for every worker still running to exit successfully; returns their JSON summaries by name.
    pub fn finish_workers(&mut self, timeout: Duration) -> Vec<(String, serde_json::Value)> {
        let started = Instant::now();
        let mut summaries = Vec::new();
        let logs = self.logs();
        for (name, child) in &mut self.workers {
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    // A worker the test killed (by signal) has no summary.
                    if status.code().is_some() {
                        assert!(status.success(), "{name} failed: {status}\n{logs}");
                        let mut line = String::new();
                        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
                        let summary = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{name}: {e}: {line:?}"));
                        summaries.push((name.clone(), summary));
                    }
                    break;
                }
                assert!(started.elapsed() < timeout, "{name} did not exit\n{logs}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        summaries
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.workers {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(child) = &mut self.coordinator {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The invariants of a finished run's applied contributions: rounds 0..R each applied, no (round,
/// worker) twice, and no data unit trained twice within an epoch.
pub fn check_contributions(contributions: &[Contribution], rounds: u64) {
    let mut by_round = std::collections::BTreeMap::<u64, usize>::new();
    let mut seen_worker = std::collections::HashSet::new();
    let mut seen_unit = std::collections::HashSet::new();
    for c in contributions {
        *by_round.entry(c.round).or_default() += 1;
        assert!(seen_worker.insert((c.round, c.worker)), "worker {:?} applied twice in round {}", c.worker, c.round);
        assert!(!c.units.is_empty(), "round {} of {:?} names no data", c.round, c.worker);
        for &(epoch, unit) in &c.units {
            assert!(seen_unit.insert((epoch, unit)), "unit {unit} of epoch {epoch} applied twice");
        }
    }
    let applied: Vec<u64> = by_round.keys().copied().collect();
    assert_eq!(applied, (0..rounds).collect::<Vec<_>>(), "every round has applied contributions, no gaps");
}

impl Cluster {
    /// [`Cluster::start`] with `corpus` as the run's text instead of the standard Markov corpus.
    pub fn start_with_corpus(dir: &Path, spec: &RunSpec, corpus: &str, database: Option<String>) -> Cluster {
        let run_file = write_run(dir, spec);
        std::fs::write(dir.join("corpus.txt"), corpus).unwrap();
        let port = free_port();
        let mut cluster = Cluster {
            dir: dir.to_path_buf(),
            run_file,
            database,
            port,
            url: format!("http://127.0.0.1:{port}"),
            coordinator: None,
            coordinator_starts: 0,
            workers: Vec::new(),
        };
        cluster.start_coordinator();
        cluster
    }

    /// `GET /v1/judgements`: every judged upload with its verdict and score.
    pub fn judgements(&self) -> Vec<agora_protocol::JudgedSubmission> {
        reqwest::blocking::get(format!("{}/v1/judgements", self.url)).unwrap().json().unwrap()
    }
}
