//! `agora bench aggregate`: the coordinator's side of a round, alone. For each codec and number of
//! submitters, payloads of a model's size are made one at a time (as workers would send them), then parsed,
//! validated and added to one [`Accumulator`] exactly as the coordinator does with each upload; the table
//! gives the decode-and-accumulate throughput and the process's peak memory, which must not grow with the
//! number of submitters.
//!
//! `--coordinator` measures the real thing instead: an `agora coordinator` process (tiny model, one round)
//! and N simulated workers, each its own signed identity, that join, take their unit and upload their
//! payloads all at once over loopback HTTP; the table gives the coordinator's resident memory before the
//! uploads and its peak until the round has closed (`/proc/PID/status`), and the longest a `GET /v1/status`
//! waited meanwhile. Without `--verify` the run streams the uploads into one sum; with it the coordinator
//! judges the round (`[trust] verify = true`, no spot checks), reading the stored payloads back one tensor
//! at a time, so its peak must not grow with the submitters beyond one tensor of each.

use super::compression::parse_codec;
use crate::children::Children;
use crate::format::human_bytes;
use agora_diloco::codec::{self, Accumulator, Expected};
use agora_diloco::tensors::param_specs;
use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Args, Clone)]
pub struct AggregateArgs {
    /// Model whose pseudo-gradients are aggregated.
    #[arg(long, default_value = "small")]
    pub preset: String,
    /// Numbers of submitters, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4,64")]
    pub submitters: Vec<usize>,
    /// Codecs, as for `agora bench compression`.
    #[arg(long, value_delimiter = ',', default_value = "none,bf16,int8,int4,topk:2/64:2bit,dct:2/64:2bit")]
    pub codecs: Vec<String>,
    /// Measure an `agora coordinator` process receiving the uploads over HTTP (model: `tiny`).
    #[arg(long)]
    pub coordinator: bool,
    /// With `--coordinator`: the run judges its round (verification on, no spot checks).
    #[arg(long)]
    pub verify: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Row {
    codec: String,
    submitters: usize,
    payload_bytes: u64,
    decode_seconds: f64,
    wire_mb_per_s: f64,
    fp32_mb_per_s: f64,
    peak_rss_bytes: Option<u64>,
    rss_before_bytes: Option<u64>,
}

/// `VmHWM` (peak resident set) and `VmRSS` of this process, in bytes.
fn memory() -> (Option<u64>, Option<u64>) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Resets the peak resident set to the current one (Linux ≥ 4.0); false where that is not possible.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A deterministic pseudo-gradient-like tensor: small values, a few larger ones.
fn fill(data: &mut [f32], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for v in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let u = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        *v = u * u * u * 1e-2;
    }
}

pub fn aggregate(a: AggregateArgs) -> Result<()> {
    if a.coordinator {
        return coordinator_memory(&a);
    }
    let model = agora_model::preset(&a.preset, None)?;
    let specs = param_specs(&model);
    let parameters: usize = specs.iter().map(|s| s.shape.iter().product::<usize>()).sum();
    let fp32 = 4 * parameters as u64;
    let can_reset = reset_peak();
    let mut rows = Vec::new();
    let mut delta: Vec<Vec<f32>> = specs.iter().map(|s| vec![0f32; s.shape.iter().product()]).collect();
    let metadata = BTreeMap::from([("agora.round".to_string(), "0".to_string())]);
    for spec in &a.codecs {
        let config = parse_codec(spec)?;
        anyhow::ensure!(config.fragments == 1, "{spec}: aggregate one whole model (no fragments)");
        for &n in &a.submitters {
            let expected = Expected { config: &config, fragment: 0, specs: &specs };
            let (_, rss_before) = memory();
            reset_peak();
            let mut sum = Accumulator::new(config, specs.clone());
            let (mut decode, mut payload_bytes) = (Duration::ZERO, 0u64);
            for worker in 0..n {
                for (i, d) in delta.iter_mut().enumerate() {
                    fill(d, (worker * 1000 + i) as u64);
                }
                let (payload, _) = codec::compress(&config, 0, &specs, &delta, None, &metadata);
                payload_bytes += payload.len() as u64;
                let started = Instant::now();
                sum.add(&codec::parse(&payload, expected).context("a generated payload")?);
                decode += started.elapsed();
            }
            let started = Instant::now();
            let mean = sum.mean();
            decode += started.elapsed();
            drop(mean);
            let (peak, _) = memory();
            let secs = decode.as_secs_f64();
            let row = Row {
                codec: config.describe(),
                submitters: n,
                payload_bytes: payload_bytes / n as u64,
                decode_seconds: secs,
                wire_mb_per_s: payload_bytes as f64 / 1e6 / secs,
                fp32_mb_per_s: (fp32 * n as u64) as f64 / 1e6 / secs,
                peak_rss_bytes: peak.filter(|_| can_reset),
                rss_before_bytes: rss_before,
            };
            tracing::info!(
                "{} × {n}: {:.2}s, {:.0} MB/s of payload, {:.0} MB/s fp32-equivalent",
                row.codec,
                secs,
                row.wire_mb_per_s,
                row.fp32_mb_per_s
            );
            rows.push(row);
        }
    }
    if a.json {
        println!("{}", serde_json::json!({ "preset": a.preset, "parameters": parameters, "rows": rows }));
        return Ok(());
    }
    println!(
        "`{}` ({:.1}M parameters, {} as fp32). One thread. Each payload is parsed (checksum, every length, every \
         value checked) and added to one fp32 sum; the mean (and for DCT the inverse transform) ends the round. \
         Peak RSS is this process's high-water mark during the aggregation ({}).",
        a.preset,
        parameters as f64 / 1e6,
        human_bytes(fp32),
        if can_reset { "reset before each row" } else { "could not be reset: not shown" }
    );
    println!();
    println!("| codec | submitters | payload | decode + accumulate | payload MB/s | fp32-equivalent MB/s | peak RSS |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.2}s | {:.0} | {:.0} | {} |",
            r.codec,
            r.submitters,
            human_bytes(r.payload_bytes),
            r.decode_seconds,
            r.wire_mb_per_s,
            r.fp32_mb_per_s,
            r.peak_rss_bytes.map_or("—".to_string(), human_bytes)
        );
    }
    Ok(())
}

/// `VmHWM` and `VmRSS` of another process, in bytes.
fn process_memory(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("/proc/PID/status (Linux only)")?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}

#[derive(Serialize)]
struct ProcessRow {
    codec: String,
    submitters: usize,
    payload_bytes: u64,
    rss_before_uploads: u64,
    peak_rss: u64,
    upload_to_close_seconds: f64,
    /// The longest `GET /v1/status` from the first upload until the round had closed.
    longest_status_ms: f64,
}

fn coordinator_memory(a: &AggregateArgs) -> Result<()> {
    use agora_protocol::messages::delta_meta;
    use agora_protocol::{
        Identity, JoinRequest, RunInfo, StatusReport, SubmitResponse, WorkResponse, PROTOCOL_VERSION,
    };
    use agora_worker::Client;
    use std::io::BufRead;
    use std::sync::Arc;

    let mut rows = Vec::new();
    for spec in &a.codecs {
        let config = parse_codec(spec)?;
        anyhow::ensure!(config.fragments == 1, "{spec}: aggregate one whole model (no fragments)");
        for &n in &a.submitters {
            let dir = tempfile::tempdir()?;
            std::fs::write(dir.path().join("corpus.txt"), agora_data::MarkovSource::new(1).generate(60_000, 1))?;
            let compression = toml::to_string(&config)?;
            std::fs::write(
                dir.path().join("run.toml"),
                format!(
                    "[model]\npreset = \"tiny\"\n[data]\nfiles = [\"corpus.txt\"]\nvocab_size = 300\n\
                     [inner]\nsteps = 1\nbatch_size = 1\nseq_len = 16\nwarmup_steps = 1\n\
                     [rounds]\ncount = 1\nmin_workers = {n}\ndeadline_secs = 600\nheartbeat_timeout_secs = 600\n\
                     [eval]\nbatches = 1\n[trust]\n{trust}\n[compression]\n{compression}",
                    trust = if a.verify { "verify = true\nsegments = 0\nspot_check = 0.0" } else { "verify = false" },
                ),
            )?;
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            // Killed when the measurement ends, however it ends.
            let mut procs = Children::new();
            let coordinator = procs.push(
                "coordinator",
                std::process::Command::new(std::env::current_exe()?)
                    .args(["coordinator", "--run"])
                    .arg(dir.path().join("run.toml"))
                    .args(["--listen", &format!("127.0.0.1:{port}"), "--threads", "1", "--dir"])
                    .arg(dir.path().join("coordinator"))
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::fs::File::create(dir.path().join("coordinator.log"))?)
                    .spawn()
                    .context("start agora coordinator")?,
            );
            let mut line = String::new();
            std::io::BufReader::new(coordinator.stdout.take().expect("piped")).read_line(&mut line)?;
            anyhow::ensure!(line.contains("listening on"), "the coordinator did not start: {line}");
            let pid = coordinator.id();
            let url = format!("http://127.0.0.1:{port}");
            let patience = Duration::from_secs(60);
            let probe = Client::new(&url, Arc::new(Identity::generate()?), dir.path(), patience)?;
            let info: RunInfo = probe.get_json("/v1/run")?;
            let specs = param_specs(&agora_model::LlamaConfig::from_json_str(&serde_json::to_string(&info.model)?)?);
            // Join every worker and take its assignment; build its payload before any upload starts.
            let mut uploads = Vec::with_capacity(n);
            let mut delta: Vec<Vec<f32>> = specs.iter().map(|s| vec![0f32; s.shape.iter().product()]).collect();
            // Judged uploads share a direction (as honest ones do), so that each reaches the loss measurement
            // and the aggregate instead of being refused as off-consensus.
            let common: Vec<Vec<f32>> = specs
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let mut c = vec![0f32; s.shape.iter().product()];
                    fill(&mut c, 7_000_000 + i as u64);
                    c
                })
                .collect();
            for worker in 0..n {
                let identity = Arc::new(Identity::generate()?);
                let client = Client::new(&url, identity.clone(), dir.path(), patience)?.for_run(&info.run_id);
                let join = JoinRequest {
                    protocol_version: PROTOCOL_VERSION,
                    worker: identity.id(),
                    name: format!("sim{worker}"),
                };
                client.post_json::<serde_json::Value>("/v1/join", &join)?;
                let WorkResponse::Assignment(work) = client.post_json("/v1/work", &serde_json::json!({}))? else {
                    anyhow::bail!("simulated worker {worker} got no assignment");
                };
                for (i, d) in delta.iter_mut().enumerate() {
                    fill(d, (worker * 1000 + i) as u64);
                    if a.verify {
                        d.iter_mut().zip(&common[i]).for_each(|(v, c)| *v = 0.5 * *v + *c);
                    }
                }
                let metadata = BTreeMap::from([
                    (delta_meta::ROUND.to_string(), "0".to_string()),
                    (delta_meta::UNIT.to_string(), agora_protocol::unit_list(&work.units)),
                    (delta_meta::BASE.to_string(), work.global_hash.hex()),
                ]);
                uploads.push((client, codec::compress(&config, 0, &specs, &delta, None, &metadata).0));
            }
            let payload_bytes = uploads[0].1.len() as u64;
            std::thread::sleep(Duration::from_millis(300));
            let (_, rss_before) = process_memory(pid)?;
            let started = Instant::now();
            // Someone watching the run: the longest `GET /v1/status` while the uploads land and the round
            // closes.
            let closed = std::sync::atomic::AtomicBool::new(false);
            let longest = std::sync::Mutex::new(0f64);
            std::thread::scope(|scope| -> Result<()> {
                scope.spawn(|| {
                    while !closed.load(std::sync::atomic::Ordering::Relaxed) {
                        let t = Instant::now();
                        let status: Result<StatusReport> =
                            probe.get_json("/v1/status").map_err(|e| anyhow::anyhow!("{e}"));
                        let ms = t.elapsed().as_secs_f64() * 1000.0;
                        let mut l = longest.lock().expect("longest lock");
                        *l = l.max(ms);
                        if status.is_ok_and(|s| s.round >= 1) {
                            closed.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        drop(l);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                });
                let handles: Vec<_> = uploads
                    .into_iter()
                    .map(|(client, payload)| {
                        scope.spawn(move || client.post_bytes::<SubmitResponse>("/v1/rounds/0/delta", payload))
                    })
                    .collect();
                let mut result = Ok(());
                for h in handles {
                    let r = h
                        .join()
                        .map_err(|_| anyhow::anyhow!("an upload thread panicked"))
                        .and_then(|r| r.map_err(|e| anyhow::anyhow!("upload: {e}")));
                    if let Err(e) = r {
                        result = Err(e);
                    }
                }
                while result.is_ok() && !closed.load(std::sync::atomic::Ordering::Relaxed) {
                    if started.elapsed() > Duration::from_secs(300) {
                        result = Err(anyhow::anyhow!("the round did not close"));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                closed.store(true, std::sync::atomic::Ordering::Relaxed);
                result
            })?;
            let longest_status_ms = *longest.lock().expect("longest lock");
            let seconds = started.elapsed().as_secs_f64();
            let (peak, _) = process_memory(pid)?;
            let row = ProcessRow {
                codec: config.describe(),
                submitters: n,
                payload_bytes,
                rss_before_uploads: rss_before,
                peak_rss: peak,
                upload_to_close_seconds: seconds,
                longest_status_ms,
            };
            tracing::info!(
                "coordinator, {} × {n}: RSS {} before the uploads, peak {} ({:.1}s to close the round)",
                row.codec,
                human_bytes(rss_before),
                human_bytes(peak),
                seconds
            );
            rows.push(row);
        }
    }
    if a.json {
        println!("{}", serde_json::json!({ "preset": "tiny", "coordinator": true, "verify": a.verify, "rows": rows }));
        return Ok(());
    }
    let fp32 = 4 * param_specs(&agora_model::preset("tiny", Some(300))?)
        .iter()
        .map(|s| s.shape.iter().product::<usize>() as u64)
        .sum::<u64>();
    println!(
        "An `agora coordinator` process (`tiny`, vocab 300: {} per fp32 pseudo-gradient) and N simulated workers that \
         upload at once over loopback HTTP; peak is the coordinator's VmHWM until the round closed{}.",
        human_bytes(fp32),
        if a.verify { "; the round is judged (verification on, no spot checks)" } else { "" }
    );
    println!();
    println!("| codec | submitters | payload | coordinator RSS before | coordinator peak | all N payloads | upload → round closed | longest GET /v1/status |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.1}s | {:.0} ms |",
            r.codec,
            r.submitters,
            human_bytes(r.payload_bytes),
            human_bytes(r.rss_before_uploads),
            human_bytes(r.peak_rss),
            human_bytes(r.payload_bytes * r.submitters as u64),
            r.upload_to_close_seconds,
            r.longest_status_ms
        );
    }
    Ok(())
}
