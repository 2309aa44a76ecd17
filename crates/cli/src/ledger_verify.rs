//! `agora ledger verify FILE`: a worker's statement (receipts, inclusion proofs, signed round roots) checked
//! offline against a coordinator key the user trusts. Never against the key the statement names: a
//! statement signed by a key it carries proves nothing, since anyone can sign one with a key of their own.

use crate::format::credits;
use agora_ledger::WorkerStatement;
use agora_protocol::WorkerId;
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::path::{Path, PathBuf};

/// Where a worker data directory keeps the coordinator key it pinned for a run:
/// `DATA_DIR/runs/RUN_ID/coordinator.key.pub`, holding the key's hex on one line (the worker writes it
/// when it first joins the run; `agora ledger verify --pinned DATA_DIR` reads it).
pub fn pinned_key_path(data_dir: &Path, run_id: &str) -> PathBuf {
    data_dir.join("runs").join(run_id).join("coordinator.key.pub")
}

/// Why `agora ledger verify` wants a key, and how to give it one.
const NO_TRUSTED_KEY: &str = "agora ledger verify needs a coordinator key to trust: the statement carries the key \
     that signed it, and a statement signed by a key it carries proves nothing (anyone can sign one). Pass \
     --coordinator-key HEX (the run's `coordinator_key` from GET /v1/run, obtained from a source you trust) or \
     --pinned DIR (a worker data directory: the key that worker pinned when it joined the run)";

/// The coordinator key a verification trusts, and where it came from (for the report).
#[derive(Debug, Clone, PartialEq)]
pub struct TrustedKey {
    pub key: WorkerId,
    /// `--coordinator-key`, or `--pinned PATH` with the file read.
    pub source: String,
}

/// The key to verify a statement of run `run_id` against: `--coordinator-key HEX`, or the one a worker
/// data directory pinned for that run (`--pinned DIR`). Neither is an error: see [`NO_TRUSTED_KEY`].
pub fn trusted_key(coordinator_key: Option<&str>, pinned: Option<&Path>, run_id: &str) -> Result<TrustedKey> {
    let parse = |hex: &str| hex.trim().parse::<WorkerId>().map_err(|e| anyhow!("{e}"));
    match (coordinator_key, pinned) {
        (Some(hex), None) => {
            Ok(TrustedKey { key: parse(hex).context("--coordinator-key")?, source: "--coordinator-key".into() })
        }
        (None, Some(dir)) => {
            // The run id comes from the statement, which is not trusted yet: only ever a plain name.
            ensure!(
                !run_id.is_empty() && run_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "the statement's run id {run_id:?} is not a run id; refusing to look it up under {}",
                dir.display()
            );
            let path = pinned_key_path(dir, run_id);
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "--pinned {}: cannot read {} (the coordinator key a worker pins when it joins run {run_id}: is \
                     this the data directory of a worker of that run?)",
                    dir.display(),
                    path.display()
                )
            })?;
            let key = parse(&text).with_context(|| format!("{}: not a coordinator key", path.display()))?;
            Ok(TrustedKey { key, source: format!("--pinned {}", path.display()) })
        }
        (Some(_), Some(_)) => bail!("--coordinator-key and --pinned: pass one of them"),
        (None, None) => bail!("{NO_TRUSTED_KEY}"),
    }
}

pub fn verify(file: &Path, coordinator_key: Option<&str>, pinned: Option<&Path>, json: bool) -> Result<()> {
    // Before reading anything: without a trusted key there is nothing to verify against.
    ensure!(coordinator_key.is_some() || pinned.is_some(), "{NO_TRUSTED_KEY}");
    let text = std::fs::read_to_string(file).with_context(|| format!("{}: cannot read", file.display()))?;
    let statement: WorkerStatement =
        serde_json::from_str(&text).with_context(|| format!("{}: not a worker statement", file.display()))?;
    let trusted = trusted_key(coordinator_key, pinned, &statement.run_id)?;
    let report = agora_ledger::verify_statement(&statement, Some(&trusted.key))
        .with_context(|| format!("{}: verification failed", file.display()))?;
    if json {
        let mut out = serde_json::to_value(&report)?;
        out["coordinator_key"] = trusted.key.hex().into();
        out["key_source"] = trusted.source.into();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "ok: {} receipts of worker {} in run {} verify against {} signed round roots; {} accepted, {} rejected; \
             balance {} credits; signed by coordinator {} (key from {})",
            report.receipts,
            statement.worker.short(),
            statement.run_id,
            report.rounds,
            report.accepted,
            report.rejected,
            credits(report.credits as i64),
            trusted.key.hex(),
            trusted.source
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_protocol::Identity;

    #[test]
    fn the_pinned_key_lives_in_the_run_directory() {
        assert_eq!(
            pinned_key_path(Path::new("/home/me/agora-worker"), "3fa4c2"),
            PathBuf::from("/home/me/agora-worker/runs/3fa4c2/coordinator.key.pub")
        );
    }

    #[test]
    fn a_key_comes_from_the_flag_or_the_pinned_file_never_from_the_statement() {
        let key = Identity::generate().unwrap().id();
        let err = trusted_key(None, None, "run").unwrap_err().to_string();
        assert!(
            err.contains("proves nothing") && err.contains("--coordinator-key") && err.contains("--pinned"),
            "{err}"
        );

        let flag = trusted_key(Some(&key.hex()), None, "run").unwrap();
        assert_eq!(flag, TrustedKey { key, source: "--coordinator-key".into() });
        assert!(trusted_key(Some("beef"), None, "run").is_err());

        let dir = tempfile::tempdir().unwrap();
        let err = format!("{:#}", trusted_key(None, Some(dir.path()), "run").unwrap_err());
        assert!(err.contains("runs/run/coordinator.key.pub"), "{err}");
        let path = pinned_key_path(dir.path(), "run");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, format!("{}\n", key.hex())).unwrap();
        let pinned = trusted_key(None, Some(dir.path()), "run").unwrap();
        assert_eq!(pinned.key, key);
        assert_eq!(pinned.source, format!("--pinned {}", path.display()));
        // The run id is the statement's, not yet trusted: no way out of DIR/runs.
        assert!(trusted_key(None, Some(dir.path()), "../../etc").is_err());
        assert!(trusted_key(Some(&key.hex()), Some(dir.path()), "run").is_err());
    }
}
