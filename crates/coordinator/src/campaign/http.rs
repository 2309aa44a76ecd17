//! The campaign's HTTP face: `GET /v1/campaign`; the research track's `POST /v1/campaign/proposals` (a
//! signed proposal) and `GET /v1/campaign/proposals` (the board); `GET /v1/campaign/phases/K/PATH` answered by phase K's
//! public reads (`K` from 1; its status, leaderboard, ledger, receipts and blobs stay readable after it
//! has finished); and every other request answered by the phase it names in `x-agora-run` (a worker
//! settling a finished phase) or else by the phase being served (its routes, signatures and refusals,
//! unchanged).

use super::Campaign;
use crate::error::ApiError;
use agora_protocol::{CampaignInfo, ProposalAccepted, ProposalBoard, SignedProposal};
use axum::extract::Path;
use axum::extract::{Request, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::sync::Arc;
use tower::ServiceExt;

pub fn router(campaign: Arc<Campaign>) -> Router {
    Router::new()
        .route("/v1/campaign", get(info))
        .route("/v1/campaign/proposals", get(proposals).post(propose))
        .route("/v1/campaign/phases/{phase}/{*path}", get(phase_read))
        .fallback(dispatch)
        .with_state(campaign)
}

async fn phase_read(
    State(campaign): State<Arc<Campaign>>,
    Path((phase, path)): Path<(usize, String)>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let Some(router) = phase.checked_sub(1).and_then(|k| campaign.phase_router(k)) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_such_phase",
            format!("phase {phase} has not been opened (phases count from 1)"),
        ));
    };
    let query = request.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
    *request.uri_mut() = format!("/{path}{query}")
        .parse::<Uri>()
        .map_err(|e| ApiError::bad_request("bad_path", format!("{path}: {e}")))?;
    match router.oneshot(request).await {
        Ok(response) => Ok(response),
        Err(never) => match never {},
    }
}

async fn proposals(State(campaign): State<Arc<Campaign>>) -> Result<Json<ProposalBoard>, ApiError> {
    Ok(Json(campaign.board().await?))
}

/// A proposal: JSON [`SignedProposal`]; 201 when it is in the call.
async fn propose(
    State(campaign): State<Arc<Campaign>>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<ProposalAccepted>), ApiError> {
    let signed: SignedProposal = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("bad_json", format!("the body is not a signed proposal: {e}")))?;
    Ok((StatusCode::CREATED, Json(campaign.propose(signed).await?)))
}

async fn info(State(campaign): State<Arc<Campaign>>) -> Json<CampaignInfo> {
    Json(campaign.info().await)
}

async fn dispatch(State(campaign): State<Arc<Campaign>>, request: Request) -> Response {
    let run = request.headers().get(agora_protocol::HEADER_RUN).and_then(|v| v.to_str().ok());
    let Some(router) = campaign.router_for(run) else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "preparing",
            "the campaign is preparing its next run (a growth, or a call for proposals): retry",
        )
        .into_response();
    };
    match router.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}
