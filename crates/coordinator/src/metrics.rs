//! Counters and gauges, rendered in the Prometheus text format at `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub struct Metrics {
    pub uploads_received: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Time spent re-running spot-checked segments, and judging rounds (decoding, similarity, scoring), ms.
    pub spot_check_ms: AtomicU64,
    pub judge_ms: AtomicU64,
    /// Rejected requests by error code (late submissions are `round_closed`).
    rejected: Mutex<BTreeMap<String, u64>>,
}

/// Values read from the run's state when the page is rendered.
pub struct Gauges {
    pub round: u64,
    pub rounds_closed: u64,
    pub active_workers: u64,
    pub train_loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub finished: bool,
}

impl Metrics {
    pub fn reject(&self, code: &str) {
        *self.rejected.lock().expect("metrics lock").entry(code.to_string()).or_default() += 1;
    }

    pub fn rejected(&self) -> BTreeMap<String, u64> {
        self.rejected.lock().expect("metrics lock").clone()
    }

    /// Restores counters persisted by an earlier process.
    pub fn restore(&self, counters: &[(String, u64)]) {
        let mut rejected = self.rejected.lock().expect("metrics lock");
        for (name, value) in counters {
            match name.strip_prefix("rejected.") {
                Some(code) => {
                    rejected.insert(code.to_string(), *value);
                }
                None => match name.as_str() {
                    "uploads_received" => self.uploads_received.store(*value, Ordering::Relaxed),
                    "bytes_in" => self.bytes_in.store(*value, Ordering::Relaxed),
                    "bytes_out" => self.bytes_out.store(*value, Ordering::Relaxed),
                    "spot_check_ms" => self.spot_check_ms.store(*value, Ordering::Relaxed),
                    "judge_ms" => self.judge_ms.store(*value, Ordering::Relaxed),
                    _ => {}
                },
            }
        }
    }

    /// Everything worth persisting, as (name, value).
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let mut out = vec![
            ("uploads_received".to_string(), self.uploads_received.load(Ordering::Relaxed)),
            ("bytes_in".to_string(), self.bytes_in.load(Ordering::Relaxed)),
            ("bytes_out".to_string(), self.bytes_out.load(Ordering::Relaxed)),
            ("spot_check_ms".to_string(), self.spot_check_ms.load(Ordering::Relaxed)),
            ("judge_ms".to_string(), self.judge_ms.load(Ordering::Relaxed)),
        ];
        out.extend(self.rejected().into_iter().map(|(code, v)| (format!("rejected.{code}"), v)));
        out
    }

    pub fn render(&self, g: &Gauges) -> String {
        let mut s = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, String)>| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in lines {
                let _ = writeln!(s, "{name}{labels} {value}");
            }
        };
        let plain = |v: String| vec![(String::new(), v)];
        metric("agora_round", "gauge", "The round open now.", plain(g.round.to_string()));
        metric("agora_rounds_closed_total", "counter", "Outer steps committed.", plain(g.rounds_closed.to_string()));
        metric(
            "agora_run_finished",
            "gauge",
            "1 once the last round has closed.",
            plain(u8::from(g.finished).to_string()),
        );
        metric("agora_active_workers", "gauge", "Workers not dropped.", plain(g.active_workers.to_string()));
        metric(
            "agora_uploads_received_total",
            "counter",
            "Pseudo-gradient uploads received and stored (judged at the round's close).",
            plain(self.uploads_received.load(Ordering::Relaxed).to_string()),
        );
        let rejected = self.rejected();
        let total: u64 = rejected.values().sum();
        metric("agora_requests_rejected_total", "counter", "Requests refused, all reasons.", plain(total.to_string()));
        metric(
            "agora_requests_rejected",
            "counter",
            "Requests refused, by error code (round_closed counts late submissions).",
            rejected.into_iter().map(|(code, v)| (format!("{{reason=\"{code}\"}}"), v.to_string())).collect(),
        );
        metric(
            "agora_bytes_in_total",
            "counter",
            "Request body bytes received.",
            plain(self.bytes_in.load(Ordering::Relaxed).to_string()),
        );
        metric(
            "agora_bytes_out_total",
            "counter",
            "Blob bytes served.",
            plain(self.bytes_out.load(Ordering::Relaxed).to_string()),
        );
        metric(
            "agora_verify_seconds_total",
            "counter",
            "Time spent verifying contributions, by stage.",
            vec![
                (
                    "{stage=\"spot_check\"}".into(),
                    format!("{:.3}", self.spot_check_ms.load(Ordering::Relaxed) as f64 / 1e3),
                ),
                ("{stage=\"judge\"}".into(), format!("{:.3}", self.judge_ms.load(Ordering::Relaxed) as f64 / 1e3)),
            ],
        );
        if let Some(v) = g.train_loss {
            metric(
                "agora_train_loss",
                "gauge",
                "Mean inner training loss of the last closed round.",
                plain(v.to_string()),
            );
        }
        if let Some(v) = g.val_loss {
            metric(
                "agora_val_loss",
                "gauge",
                "Validation loss of the latest evaluated global weights.",
                plain(v.to_string()),
            );
        }
        s
    }
}
