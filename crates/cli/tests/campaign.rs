//! `agora campaign` over HTTP with real processes: three phases, each grown exactly from the last, the
//! best of each phase retained (the phase-1 cheater is not), workers that follow the phases or exit cleanly
//! when not retained, a call for proposals for phase two's recipe (two proposals measured by proxy runs,
//! the best adopted, one malformed proposal and other bad ones refused), and the campaign SIGKILLed during
//! a round, during a proxy run, between phases and with a growth left half-written — on SQLite and on
//! PostgreSQL.

mod common;

use agora_protocol::{CallState, CampaignInfo, CampaignState, Contribution, LedgerReport, ProposalBoard, RunInfo};
use common::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(600);

/// A phase's `[inner]` … `[eval]` sections (small rounds, so the whole campaign takes a few minutes).
fn phase_body(rounds: u64, min_workers: u64, trust: &str) -> String {
    format!(
        "[phase.inner]\nsteps = 6\nbatch_size = 4\nseq_len = 32\nwarmup_steps = 2\n\
         [phase.rounds]\ncount = {rounds}\nmin_workers = {min_workers}\ndeadline_secs = 120\nheartbeat_timeout_secs = 8\n\
         [phase.eval]\nbatches = 4\n[phase.trust]\n{trust}\n"
    )
}

/// `tiny` (vocabulary 300) with `layers` layers, as a Hugging Face config.json.
fn deeper_tiny(dir: &Path, layers: usize) -> PathBuf {
    let mut config = agora_model::preset("tiny", Some(300)).unwrap();
    config.num_hidden_layers = layers;
    let path = dir.join(format!("tiny{layers}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&config.to_hf_json()).unwrap()).unwrap();
    path
}

fn write_campaign(dir: &Path) -> PathBuf {
    std::fs::write(dir.join("corpus.txt"), agora_data::MarkovSource::new(1).generate(40_000, 1)).unwrap();
    deeper_tiny(dir, 6);
    deeper_tiny(dir, 8);
    let text = format!(
        "name = \"three phases\"\nseed = 3\n[data]\nfiles = [\"corpus.txt\"]\nvocab_size = 300\n\n\
         [[phase]]\nname = \"one\"\n[phase.model]\npreset = \"tiny\"\n{}\n\
         [[phase]]\nname = \"two\"\nretain = 3\n[phase.growth]\nmethod = \"depth\"\nouter_momentum = \"carry\"\n\
         [phase.model]\nconfig = \"tiny6.json\"\n\
         [phase.research]\nproxy_tokens = 1536\nclose_after_secs = 3\nreward = 1000000\n{}\n\
         [[phase]]\nname = \"three\"\nretain = 2\n[phase.growth]\nmethod = \"depth\"\n\
         [phase.model]\nconfig = \"tiny8.json\"\n{}",
        // Phase one spot-checks every upload (the cheater must rank last); the later phases judge as usual.
        phase_body(2, 4, "spot_check = 1.0"),
        // Each later phase's round waits for every identity it retains (min_workers = retain): with one
        // round, a retained worker slowed by a restart would otherwise find the phase already finished.
        phase_body(1, 3, ""),
        phase_body(1, 2, "")
    );
    let path = dir.join("campaign.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The campaign process and its workers; everything is killed when dropped.
struct Campaign {
    dir: PathBuf,
    file: PathBuf,
    database: Option<String>,
    port: u16,
    url: String,
    process: Option<Child>,
    workers: Vec<(String, Child)>,
}

impl Campaign {
    fn start(dir: &Path, database: Option<String>) -> Campaign {
        let port = free_port();
        let mut campaign = Campaign {
            dir: dir.to_path_buf(),
            file: write_campaign(dir),
            database,
            port,
            url: format!("http://127.0.0.1:{port}"),
            process: None,
            workers: Vec::new(),
        };
        campaign.start_process();
        campaign
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    fn logs(&self) -> String {
        let mut out = tail(&self.log("campaign"));
        for (name, _) in &self.workers {
            out += "\n";
            out += &tail(&self.log(name));
        }
        out
    }

    fn start_process(&mut self) {
        self.start_process_in(self.dir.join("state"));
    }

    /// Starts (or restarts) the campaign with `--dir` spelled `state_dir` (the same directory however named).
    fn start_process_in(&mut self, state_dir: PathBuf) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log("campaign")).unwrap();
        let mut cmd = Command::new(AGORA);
        cmd.args(["campaign", "--file"])
            .arg(&self.file)
            .args(["--listen", &format!("127.0.0.1:{}", self.port), "--threads", "1", "--dir"])
            .arg(state_dir)
            .env("RUST_LOG", "agora=debug,info")
            .stdout(Stdio::piped())
            .stderr(log);
        if let Some(db) = &self.database {
            cmd.args(["--database", db]);
        }
        let mut child = cmd.spawn().expect("start the campaign");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.contains("listening on"), "the campaign did not start:\n{}", tail(&self.log("campaign")));
        self.process = Some(child);
    }

    fn kill(&mut self) {
        let mut child = self.process.take().expect("a running campaign");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }

    fn start_worker(&mut self, name: &str, extra: &[&str]) {
        let log = std::fs::File::create(self.log(name)).unwrap();
        let child = Command::new(AGORA)
            .args(["worker", "--coordinator", &self.url, "--threads", "1", "--json", "--patience-secs", "120"])
            .args(["--name", name, "--data-dir"])
            .arg(self.dir.join("workers").join(name))
            .args(extra)
            .env("RUST_LOG", "agora=debug,info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start a worker");
        self.workers.push((name.to_string(), child));
    }

    /// `agora propose` as a researcher would run it: success, and stdout or stderr.
    fn propose(&self, researcher: &str, patch: &str) -> (bool, String) {
        let file = self.dir.join(format!("{researcher}.toml"));
        std::fs::write(&file, patch).unwrap();
        let out = Command::new(AGORA)
            .args(["propose", &self.url, "--phase", "2", "--name", researcher, "--json", "--file"])
            .arg(&file)
            .arg("--data-dir")
            .arg(self.dir.join("researchers").join(researcher))
            .output()
            .unwrap();
        let text = if out.status.success() { &out.stdout } else { &out.stderr };
        (out.status.success(), String::from_utf8_lossy(text).into_owned())
    }

    fn info(&self) -> Option<CampaignInfo> {
        let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
        client.get(format!("{}/v1/campaign", self.url)).send().ok()?.json().ok()
    }

    fn wait_for(&self, what: &str, mut done: impl FnMut(&CampaignInfo) -> bool) -> CampaignInfo {
        let started = Instant::now();
        loop {
            if let Some(info) = self.info() {
                if done(&info) {
                    return info;
                }
            }
            assert!(started.elapsed() < LONG, "timed out waiting for {what}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET /v1/campaign/phases/K/PATH` (K from 1).
    fn phase_get<T: serde::de::DeserializeOwned>(&self, phase: usize, path: &str) -> T {
        let url = format!("{}/v1/campaign/phases/{phase}{path}", self.url);
        let response = reqwest::blocking::get(&url).unwrap();
        assert!(response.status().is_success(), "{url}: {}", response.status());
        response.json().unwrap()
    }

    /// Every worker's exit status and stdout lines (one JSON object per run, then a refusal if any).
    fn finish_workers(&mut self) -> Vec<(String, bool, Vec<serde_json::Value>)> {
        let started = Instant::now();
        let mut out = Vec::new();
        let logs = self.logs();
        for (name, child) in &mut self.workers {
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break status;
                }
                assert!(started.elapsed() < LONG, "{name} did not exit\n{logs}");
                std::thread::sleep(Duration::from_millis(50));
            };
            let lines: Vec<serde_json::Value> = BufReader::new(child.stdout.take().unwrap())
                .lines()
                .map(|l| serde_json::from_str(&l.unwrap()).unwrap_or_else(|e| panic!("{name}: {e}")))
                .collect();
            out.push((name.clone(), status.success(), lines));
        }
        out
    }
}

impl Drop for Campaign {
    fn drop(&mut self) {
        for (_, child) in &mut self.workers {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(child) = &mut self.process {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn three_phases(database: Option<String>) {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut c = Campaign::start(dir.path(), database);
    let honest = ["h0", "h1", "h2", "h3"];
    for name in honest {
        c.start_worker(name, &[]);
    }
    c.start_worker("flip", &["--behaviour", "sign-flip"]);

    // The call for phase two's recipe is open while phase one trains: two proposals, then refusals.
    let (ok, out) = c.propose("ada", "[inner]\nlr = 6e-3\n");
    assert!(ok && out.contains("\"id\":1"), "{out}");
    let (ok, out) = c.propose("bob", "[inner]\nlr = 1e-3\n");
    assert!(ok && out.contains("\"id\":2"), "{out}");
    let (ok, out) = c.propose("mallory", "[rounds]\ntokens = 5\n");
    assert!(!ok && out.contains("400") && out.contains("disallowed_field"), "a malformed proposal: {out}");
    let (ok, out) = c.propose("ada", "[inner]\nlr = 5e-3\n");
    assert!(!ok && out.contains("409") && out.contains("already_proposed"), "{out}");
    let (ok, out) = c.propose("carol", "[inner]\nlr = 6e-3\n");
    assert!(!ok && out.contains("duplicate_recipe"), "the same recipe twice: {out}");
    let board: ProposalBoard =
        reqwest::blocking::get(format!("{}/v1/campaign/proposals", c.url)).unwrap().json().unwrap();
    let mut unsigned = serde_json::json!({ "proposal": {
        "campaign": "three phases", "call": board.calls[0].host_run, "phase": 2,
        "researcher": agora_protocol::Identity::generate().unwrap().id(), "name": "eve", "patch": "[outer]\nlr = 0.5\n" }});
    let post = |body: &serde_json::Value| {
        reqwest::blocking::Client::new().post(format!("{}/v1/campaign/proposals", c.url)).json(body).send().unwrap()
    };
    assert_eq!(post(&unsigned).status(), 401, "unsigned");
    unsigned["signature"] = "00".repeat(64).into();
    assert_eq!(post(&unsigned).status(), 401, "a signature that does not verify");

    // SIGKILL during phase one's rounds, and restart.
    c.wait_for("phase one's first round", |i| i.phases[0].rounds >= 1);
    c.kill();
    c.start_process();
    // SIGKILL once phase two is open, and restart with a growth of phase three left half-written (what a
    // kill during growth leaves: the `.partial` directory, never the final one).
    // SIGKILL while a proxy run of the call trains, and restart: it resumes, nothing is measured twice.
    c.wait_for("a proxy run", |i| i.state == CampaignState::Research);
    c.kill();
    c.start_process();
    c.wait_for("phase two to open", |i| i.current == 1 && i.state == CampaignState::Running);
    c.kill();
    let partial = dir.path().join("state/grown/phase-3.partial");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("model.safetensors"), b"half a file").unwrap();
    // The same directory by another name: the phases' run ids do not depend on how it is spelled.
    let spelled_otherwise = dir.path().join("workers").join("..").join("state");
    c.start_process_in(spelled_otherwise);

    let info = c.wait_for("the campaign to finish", |i| i.state == CampaignState::Finished);
    let results = c.finish_workers();
    let logs = c.logs();
    assert_eq!(info.current, 2);
    assert!(!partial.exists(), "the half-written growth was discarded and redone");

    // Every phase ran its rounds, and each started exactly where the one before ended (exact growth).
    let rounds: Vec<u64> = info.phases.iter().map(|p| p.rounds).collect();
    assert_eq!(rounds, vec![2, 1, 1], "{info:?}");
    for k in 1..3 {
        let (before, after) = (info.phases[k - 1].val_loss.unwrap(), info.phases[k].initial_val_loss.unwrap());
        assert!((before - after).abs() < 1e-5, "phase {} starts at {after}, phase {k} ended at {before}", k + 1);
        let (small, large) = (info.phases[k - 1].parameters.unwrap(), info.phases[k].parameters.unwrap());
        assert!(large > small, "phase {} grew: {small} → {large}", k + 1);
    }
    assert!(info.phases[2].val_loss.unwrap() < info.phases[0].initial_val_loss.unwrap());

    // Retention: phase two admits three of phase one's honest workers, never the cheater; phase three two
    // of phase two's.
    let joined = |k: usize| -> Vec<String> { info.phases[k].workers.clone() };
    assert_eq!(joined(0).len(), 5, "{:?}", joined(0));
    assert_eq!(joined(1).len(), 3, "{:?}", joined(1));
    assert!(joined(1).iter().all(|w| honest.contains(&w.as_str())), "a cheater was retained: {:?}", joined(1));
    assert_eq!(joined(2).len(), 2);
    assert!(joined(2).iter().all(|w| joined(1).contains(w)), "{:?} ⊄ {:?}", joined(2), joined(1));

    // The call: settled, every entry measured by its proxy run, the best adopted for phase two.
    let board: ProposalBoard =
        reqwest::blocking::get(format!("{}/v1/campaign/proposals", c.url)).unwrap().json().unwrap();
    let call = &board.calls[0];
    assert_eq!((call.phase, call.state), (2, CallState::Settled), "{board:?}");
    assert_eq!(call.entries.len(), 3, "the file's recipe and two proposals: {board:?}");
    let ranks: Vec<u64> = call.entries.iter().map(|e| e.rank.unwrap()).collect();
    assert_eq!(ranks, vec![1, 2, 3], "ranked best first");
    let losses: Vec<f64> = call.entries.iter().map(|e| e.val_loss.expect("every proxy measured")).collect();
    assert!(losses.windows(2).all(|w| w[0] <= w[1]), "{losses:?}");
    let proxies: std::collections::HashSet<&String> =
        call.entries.iter().map(|e| e.proxy_run.as_ref().unwrap()).collect();
    assert_eq!(proxies.len(), 3, "a proxy run per entry");
    let best = &call.entries[0];
    assert!(best.adopted && call.adopted == Some(best.id));
    let baseline = call.entries.iter().find(|e| e.id == 0).unwrap();
    let paid: u64 = call.entries.iter().map(|e| e.credits).sum();
    for e in call.entries.iter().filter(|e| e.id > 0) {
        let receipt: agora_ledger::SignedResearchReceipt = serde_json::from_value(e.receipt.clone().unwrap()).unwrap();
        receipt.verify(&info.coordinator_key).unwrap();
        assert_eq!((receipt.receipt.credits, receipt.receipt.adopted), (e.credits, e.adopted));
        assert_eq!(
            e.credits > 0,
            e.val_loss.unwrap() < baseline.val_loss.unwrap(),
            "only gains over the file's recipe pay"
        );
        assert!(e.retained, "without a later call's retain, every measured researcher is retained");
    }
    assert!(paid == 0 || paid == call.reward, "the reward is paid in full or not at all: {paid}");
    // Phase two trained with the adopted recipe (the entries patch the inner learning rate).
    let one: RunInfo = c.phase_get(1, "/v1/run");
    let two: RunInfo = c.phase_get(2, "/v1/run");
    let expected = match best.id {
        0 => one.inner["lr"].as_f64().unwrap(),
        1 => 6e-3,
        _ => 1e-3,
    };
    assert_eq!(two.inner["lr"].as_f64().unwrap(), expected, "phase two opened with entry {}'s recipe", best.id);
    // The researchers' credits are postings in the hosting phase's ledger.
    let host: LedgerReport = c.phase_get(1, "/v1/ledger");
    let researchers: i64 = host.balances.iter().filter(|b| b.0.starts_with("researcher:")).map(|b| b.1).sum();
    assert_eq!(researchers, paid as i64);
    // After the call: too late.
    let (ok, out) = c.propose("dave", "[inner]\nlr = 2e-3\n");
    assert!(!ok && out.contains("call_closed"), "{out}");

    // Every worker exits cleanly: the retained ones after the last phase, the others with the reason.
    let phase_runs: Vec<String> = info.phases.iter().map(|p| p.run_id.clone().unwrap()).collect();
    for (name, success, lines) in &results {
        assert!(success, "{name} failed\n{logs}");
        let runs = lines
            .iter()
            .filter(|l| l.get("run_id").and_then(|r| r.as_str()).is_some_and(|r| phase_runs.iter().any(|p| p == r)))
            .count();
        let expected = (0..3).take_while(|&k| joined(k).contains(name)).count();
        assert_eq!(runs, expected, "{name} took part in {runs} phases: {lines:?}");
        let refusal = lines.iter().find_map(|l| l.get("not_retained")).and_then(|n| n.as_str());
        if expected < 3 {
            let phase = ["one", "two", "three"][expected];
            let refusal = refusal.unwrap_or_else(|| panic!("{name} has no refusal: {lines:?}"));
            assert!(refusal.contains(&format!("phase {phase:?}")) && refusal.contains("by reputation"), "{refusal}");
        } else {
            assert!(refusal.is_none(), "{name}: {refusal:?}");
        }
    }

    // Each phase keeps its own run, contributions and balanced ledger, readable after it has finished,
    // all signed by the campaign's one key.
    for (k, phase) in info.phases.iter().enumerate() {
        let run: RunInfo = c.phase_get(k + 1, "/v1/run");
        assert_eq!(Some(&run.run_id), phase.run_id.as_ref());
        assert_eq!(run.coordinator_key, info.coordinator_key, "phase {} is signed by the campaign's key", k + 1);
        let contributions: Vec<Contribution> = c.phase_get(k + 1, "/v1/contributions");
        check_contributions(&contributions, phase.rounds);
        let ledger: LedgerReport = c.phase_get(k + 1, "/v1/ledger");
        assert_eq!(ledger.balances.iter().map(|b| b.1).sum::<i64>(), 0, "phase {} ledger", k + 1);
        assert_eq!(ledger.roots.len() as u64, phase.rounds, "a signed root per round of phase {}", k + 1);
    }
    let missing = reqwest::blocking::get(format!("{}/v1/campaign/phases/4/v1/run", c.url)).unwrap();
    assert_eq!(missing.status(), 404);
    // A finished phase is read-only: nobody joins or uploads to it through its reads.
    let client = reqwest::blocking::Client::new();
    let join = client.post(format!("{}/v1/campaign/phases/1/v1/join", c.url)).body("{}").send().unwrap();
    assert_eq!(join.status(), 405, "a past phase's writes are not served");
}

#[test]
fn three_phases_sqlite() {
    three_phases(None);
}

#[test]
fn three_phases_postgres() {
    if let Some(base) = postgres_base() {
        three_phases(Some(fresh_postgres_db(&base, "campaign")));
    }
}

/// `agora demo --phases 3`: a three-phase campaign on loopback ends with a summary per phase, each grown
/// phase starting at its predecessor's final loss, and fewer workers retained each phase.
#[test]
fn demo_runs_a_three_phase_campaign() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(&corpus, agora_data::MarkovSource::new(1).generate(40_000, 1)).unwrap();
    let out = Command::new(AGORA)
        .args(["demo", "--phases", "3", "--workers", "4", "--rounds", "6", "--inner-steps", "4", "--batch-size", "4"])
        .args(["--seq-len", "32", "--json", "--data"])
        .arg(&corpus)
        .arg("--out")
        .arg(dir.path().join("demo"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let phases = summary["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 3, "{summary}");
    let workers: Vec<Vec<String>> = phases
        .iter()
        .map(|p| p["workers"].as_array().unwrap().iter().map(|w| w.as_str().unwrap().to_string()).collect())
        .collect();
    let counts: Vec<usize> = workers.iter().map(Vec::len).collect();
    assert_eq!(counts, vec![4, 3, 2], "the best 3 of 4 retained, then the best 2 of those");
    for k in 1..3 {
        assert!(workers[k].iter().all(|w| workers[k - 1].contains(w)), "{:?} ⊄ {:?}", workers[k], workers[k - 1]);
    }
    for k in 1..3 {
        let (before, after) =
            (phases[k - 1]["final_val_loss"].as_f64().unwrap(), phases[k]["initial_val_loss"].as_f64().unwrap());
        assert!((before - after).abs() < 1e-5, "phase {} starts at {after}, its predecessor ended at {before}", k + 1);
        assert!(phases[k]["parameters"].as_u64() > phases[k - 1]["parameters"].as_u64());
        assert!(!phases[k]["grown_by"].as_array().unwrap().is_empty());
        assert_eq!(phases[k]["rounds"], 2);
    }
    assert!(stderr.contains("growing into the next phase"), "the live view shows the phase changes: {stderr}");
    // One call for phase 2's recipe: the file's recipe and three proposals, each measured, the best adopted.
    let call = &summary["proposals"]["calls"][0];
    assert_eq!((call["phase"].as_u64(), call["state"].as_str()), (Some(2), Some("settled")), "{summary}");
    let entries = call["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 4);
    assert!(entries.iter().all(|e| e["val_loss"].as_f64().is_some()), "every proxy run measured: {call}");
    let adopted = entries.iter().find(|e| e["adopted"] == true).unwrap();
    assert_eq!(adopted["rank"], 1);
    let recipe = phases[1]["recipe"].as_str().unwrap();
    match adopted["id"].as_u64().unwrap() {
        0 => assert!(recipe.contains("the campaign file's"), "{recipe}"),
        id => {
            assert!(recipe.starts_with(&format!("proposal {id} by {}", adopted["name"].as_str().unwrap())), "{recipe}")
        }
    }
    assert!(stderr.contains("call for proposals — proxy run"), "the live view shows the proxy runs: {stderr}");
}
