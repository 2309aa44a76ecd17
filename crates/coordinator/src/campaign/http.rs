//! The campaign's HTTP face: `GET /v1/campaign`, and every other request answered by the phase being
//! served (its routes, signatures and refusals, unchanged).

use super::Campaign;
use agora_protocol::CampaignInfo;
use axum::extract::{Request, State};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use std::sync::Arc;
use tower::ServiceExt;

pub fn router(campaign: Arc<Campaign>) -> Router {
    Router::new().route("/v1/campaign", get(info)).fallback(dispatch).with_state(campaign)
}

async fn info(State(campaign): State<Arc<Campaign>>) -> Json<CampaignInfo> {
    Json(campaign.info().await)
}

async fn dispatch(State(campaign): State<Arc<Campaign>>, request: Request) -> Response {
    match campaign.current_router().oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}
