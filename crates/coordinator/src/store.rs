//! The store's edges: opening the database (SQLite or PostgreSQL, one schema), typed column readers, and
//! the few writes several concerns share (reputation, releasing a round's unfinished assignments).

use crate::error::ApiError;
use crate::redact::{redact_error, redact_url};
use crate::state::*;
use agora_protocol::*;
use anyhow::{Context, Result};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

pub(crate) fn hash_col(row: &AnyRow, col: &str) -> Result<Hash32> {
    let s: String = row.try_get(col)?;
    s.parse().map_err(|e| anyhow::anyhow!("database column {col} holds {s:?}, not a hash: {e}"))
}

pub(crate) fn worker_col(row: &AnyRow, col: &str) -> Result<WorkerId> {
    let s: String = row.try_get(col)?;
    s.parse().map_err(|e| anyhow::anyhow!("database column {col} holds {s:?}, not a worker id: {e}"))
}

pub(crate) fn hex_digest(d: &[u8; 32]) -> String {
    Hash32(*d).hex()
}

/// Applies a judgement to an identity's reputation (created at 0 on its first judgement).
pub(crate) async fn update_reputation(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    worker: &WorkerId,
    outcome: agora_verify::Outcome,
    alpha: f64,
    accepted: bool,
) -> Result<(), ApiError> {
    let old: f64 = sqlx::query("SELECT rating FROM reputation WHERE worker = $1")
        .bind(worker.hex())
        .fetch_optional(&mut **tx)
        .await?
        .map(|r| r.try_get("rating"))
        .transpose()?
        .unwrap_or(0.0);
    let rating = agora_verify::update_rating(old, outcome, alpha);
    let (a, r) = if accepted { (1i64, 0i64) } else { (0, 1) };
    sqlx::query(
        "INSERT INTO reputation (worker, rating, accepted, rejected, updated_ms) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (worker) DO UPDATE SET rating = excluded.rating, accepted = reputation.accepted + excluded.accepted, \
         rejected = reputation.rejected + excluded.rejected, updated_ms = excluded.updated_ms",
    )
    .bind(worker.hex())
    .bind(rating)
    .bind(a)
    .bind(r)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Sets the work-queue state of every data unit held by the assignments of `round` (one worker's, or
/// all; those in `held_state`, or in any state): `pending` puts the units back for whoever asks next, `done`
/// retires them for their epoch.
pub(crate) async fn set_queue_state(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    state: &str,
    round: u64,
    worker: Option<&WorkerId>,
    held_state: Option<&str>,
) -> Result<(), ApiError> {
    sqlx::query(
        "UPDATE work_queue SET state = $3 WHERE EXISTS (SELECT 1 FROM assignments a JOIN assignment_units u \
         ON u.round = a.round AND u.worker = a.worker WHERE a.round = $1 AND ($2 = '' OR a.worker = $2) \
         AND ($4 = '' OR a.state = $4) AND u.epoch = work_queue.epoch AND u.position = work_queue.position)",
    )
    .bind(round as i64)
    .bind(worker.map(|w| w.hex()).unwrap_or_default())
    .bind(state)
    .bind(held_state.unwrap_or_default())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Releases the `training` assignments of `round` (one worker's, or all) and puts their units back in
/// the queue for whoever asks next. Returns how many were released.
pub(crate) async fn release_training(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    round: u64,
    worker: Option<&WorkerId>,
) -> Result<u64, ApiError> {
    set_queue_state(tx, "pending", round, worker, Some("training")).await?;
    let released = sqlx::query(
        "UPDATE assignments SET state = 'released' WHERE round = $1 AND state = 'training' AND ($2 = '' OR worker = $2)",
    )
    .bind(round as i64)
    .bind(worker.map(|w| w.hex()).unwrap_or_default())
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(released)
}

/// Binding an optional `f64` (a nullable `DOUBLE PRECISION` column) the way PostgreSQL can take it.
///
/// sqlx 0.8.6's `Any` driver maps a NULL `f64` to a NULL `f32` (`sqlx-core` `any/arguments.rs`), so a
/// statement first run on a connection with a NULL there is prepared with a `real` (float4) parameter,
/// and every later real `f64` sent to that cached statement is refused: "incorrect binary data format in
/// bind parameter N". A NULL `f32` maps to a NULL `f64` in the same table, so this binds that one.
pub(crate) trait BindF64 {
    fn bind_f64(self, value: Option<f64>) -> Self;
}

impl<'q> BindF64 for sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    fn bind_f64(self, value: Option<f64>) -> Self {
        match value {
            Some(v) => self.bind(v),
            None => self.bind(None::<f32>),
        }
    }
}

pub(crate) async fn connect(url: &str) -> Result<AnyPool> {
    sqlx::any::install_default_drivers();
    let sqlite = url.starts_with("sqlite:");
    // A PostgreSQL URL may carry a password: neither logs nor errors show it (sqlx errors may echo it).
    let shown = redact_url(url);
    use sqlx::migrate::MigrateDatabase;
    if !sqlx::Any::database_exists(url).await.unwrap_or(false) {
        tracing::info!("creating database {shown}");
        sqlx::Any::create_database(url)
            .await
            .map_err(|e| redact_error(e, url))
            .with_context(|| format!("cannot create the database {shown}"))?;
    }
    let pool = AnyPoolOptions::new()
        // SQLite has one writer anyway; one connection also keeps `:memory:` databases whole.
        .max_connections(if sqlite { 1 } else { 8 })
        .connect(url)
        .await
        .map_err(|e| redact_error(e, url))
        .with_context(|| format!("cannot open the database {shown}"))?;
    sqlx::migrate!("./migrations")
        .run(&pool)
        .await
        .map_err(|e| redact_error(e, url))
        .with_context(|| format!("cannot apply the schema migrations to {shown}"))?;
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NULL first, then a value, into a nullable DOUBLE PRECISION column through one cached statement
    /// (one connection): [`BindF64`] works on SQLite and PostgreSQL, and binding the NULL as sqlx's own
    /// `Option<f64>` fails on PostgreSQL (the bug it works around; run when `AGORA_TEST_POSTGRES_URL` is
    /// set, as CI does).
    #[tokio::test]
    async fn a_null_float_then_a_value_binds_on_every_backend() {
        sqlx::any::install_default_drivers();
        let mut urls = vec!["sqlite::memory:".to_string()];
        match std::env::var("AGORA_TEST_POSTGRES_URL") {
            Ok(base) if !base.is_empty() => {
                let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
                urls.push(format!("{}/agora_bindf64_{}", base.trim_end_matches('/'), nanos % 1_000_000_000));
            }
            _ => assert!(std::env::var("CI").is_err(), "CI must run this against PostgreSQL (AGORA_TEST_POSTGRES_URL)"),
        }
        for url in urls {
            use sqlx::migrate::MigrateDatabase;
            if !url.starts_with("sqlite") {
                sqlx::Any::create_database(&url).await.unwrap();
            }
            let db = AnyPoolOptions::new().max_connections(1).connect(&url).await.unwrap();
            for table in ["a", "b"] {
                sqlx::query(&format!("CREATE TABLE {table} (k BIGINT, v DOUBLE PRECISION)"))
                    .execute(&db)
                    .await
                    .unwrap();
            }
            for (k, v) in [(1i64, None), (2, Some(0.5)), (3, None), (4, Some(-2.25))] {
                sqlx::query("INSERT INTO a (k, v) VALUES ($1, $2)").bind(k).bind_f64(v).execute(&db).await.unwrap();
            }
            let rows = sqlx::query("SELECT v FROM a ORDER BY k").fetch_all(&db).await.unwrap();
            let read: Vec<Option<f64>> = rows.iter().map(|r| r.try_get("v").unwrap()).collect();
            assert_eq!(read, vec![None, Some(0.5), None, Some(-2.25)], "{url}");
            if !url.starts_with("sqlite") {
                sqlx::query("INSERT INTO b (k, v) VALUES ($1, $2)")
                    .bind(1i64)
                    .bind(None::<f64>)
                    .execute(&db)
                    .await
                    .unwrap();
                let plain = sqlx::query("INSERT INTO b (k, v) VALUES ($1, $2)")
                    .bind(2i64)
                    .bind(Some(0.5f64))
                    .execute(&db)
                    .await;
                assert!(plain.is_err(), "sqlx's own NULL f64 no longer poisons the statement: BindF64 may go");
                db.close().await;
                sqlx::Any::drop_database(&url).await.unwrap();
            }
        }
    }
}
