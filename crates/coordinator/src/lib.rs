//! agora-coordinator: owns a DiLoCo run and serves it over HTTP.
//!
//! Owns: the run file, campaigns (phases served one after another, each grown from the last), membership (join, heartbeats, drops, no-shows), rounds and when they close, data
//! assignment (units, epochs, reassignment), validation of uploads against the run's codec, spot checks,
//! judging and settling a round (receipts, vesting credits, reputations), the round's running sum (one
//! model-sized buffer however many workers), the outer step and its atomic commit, durable state (sqlx:
//! SQLite by default, PostgreSQL by URL, one schema), content-addressed blobs (object_store), status and
//! Prometheus metrics.
//! Must not know about: how a worker trains (it only sees pseudo-gradients), terminals or processes.
//!
//! The shape: `core` makes every decision (which unit to whom, when a round closes, who is benched, how
//! credits vest) as pure functions of what the store holds and the time, with the judge's rules in
//! `agora_verify::rules`; the other modules read the store, call the core, and write what it decided.

mod assignment;
pub mod blobs;
pub mod campaign;
pub mod clock;
mod close;
pub mod core;
pub mod error;
pub mod http;
mod membership;
pub mod metrics;
pub mod prepare;
mod proofs;
pub mod redact;
pub mod run_file;
mod settlement;
pub mod state;
mod store;
pub mod trust;
mod uploads;
mod views;

pub use campaign::{Campaign, CampaignOptions};
pub use run_file::RunFile;
pub use state::{Coordinator, Options};

use anyhow::{Context, Result};
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

/// The periodic duties (drops, deadlines, round closes) of the coordinator `serving` returns, every 250 ms.
fn spawn_duties(serving: impl Fn() -> Arc<Coordinator> + Send + 'static) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_millis(250));
        loop {
            interval.tick().await;
            if let Err(e) = serving().tick().await {
                tracing::error!("periodic duties failed: {}", e.message);
            }
        }
    })
}

/// Serves `app` on `listener` until `shutdown` resolves, with the periodic duties (drops, deadlines)
/// running beside it.
pub async fn serve(
    app: Arc<Coordinator>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let ticker = {
        let app = app.clone();
        spawn_duties(move || app.clone())
    };
    let result = axum::serve(listener, http::router(app)).with_graceful_shutdown(shutdown).await.context("HTTP server");
    ticker.abort();
    result
}

/// Serves a campaign on `listener` until `shutdown` resolves: the phase being served answers the API, the
/// periodic duties run for it, and [`Campaign::drive`] moves through the phases. A failure to move on
/// (a phase that cannot be grown or opened) stops the server with that error.
pub async fn serve_campaign(
    campaign: Arc<Campaign>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let ticker = {
        let campaign = campaign.clone();
        spawn_duties(move || campaign.served())
    };
    let mut driver = tokio::spawn(campaign.clone().drive());
    let server = axum::serve(listener, campaign::router(campaign)).with_graceful_shutdown(shutdown).into_future();
    tokio::pin!(server);
    let mut driven = false;
    let result = loop {
        tokio::select! {
            served = &mut server => break served.context("HTTP server"),
            done = &mut driver, if !driven => match done.context("the campaign task")? {
                Err(e) => break Err(e.context("the campaign cannot go on")),
                // The last phase is finished: its results stay served until shutdown.
                Ok(()) => driven = true,
            },
        }
    };
    ticker.abort();
    driver.abort();
    result
}
