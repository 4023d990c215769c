//! The pipeline's HTTP endpoints: `/healthz`, `/readyz`, `/metrics`, `/stats`.
//!
//! `/healthz` fails when the pipeline failed or a loop stopped beating (restarting helps);
//! `/readyz` fails while MongoDB or Elasticsearch is unreachable or the pipeline backs off.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
pub use hyper::StatusCode;
use hyper::Response;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, Instrument};

use crate::metrics::{Health, Metrics};

/// What the endpoints read.
#[derive(Clone)]
pub struct Endpoints {
    /// Pipeline name.
    pub pipeline: String,
    /// Metrics.
    pub metrics: Metrics,
    /// Health.
    pub health: Arc<Health>,
}

/// Bind the listener (so a taken port is reported before the pipeline starts).
///
/// # Errors
/// The bind error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// A set of plain-text or JSON endpoints: the pipeline's, or the operator's.
pub trait Handler: Clone + Send + Sync + 'static {
    /// Status, content type and body for `path`.
    fn handle(&self, path: &str) -> (StatusCode, &'static str, String);
}

impl Handler for Endpoints {
    fn handle(&self, path: &str) -> (StatusCode, &'static str, String) {
        route(path, self)
    }
}

/// Serve until `shutdown` fires.
pub async fn serve<H: Handler>(listener: TcpListener, endpoints: H, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else { continue };
        let endpoints = endpoints.clone();
        tokio::spawn(
            async move {
                let service = service_fn(move |req| {
                    let endpoints = endpoints.clone();
                    async move {
                        let (status, content_type, body) = endpoints.handle(req.uri().path());
                        Ok::<_, Infallible>(respond(status, content_type, body))
                    }
                });
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!(error = %e, "http connection ended with an error");
                }
            }
            .instrument(tracing::debug_span!("http")),
        );
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    r
}

/// A probe answer: 200 `ok`, or 503 with the reason.
pub fn check(result: Result<(), String>) -> (StatusCode, &'static str, String) {
    match result {
        Ok(()) => (StatusCode::OK, "text/plain", "ok\n".into()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{reason}\n")),
    }
}

/// Content type of the Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4";

fn route(path: &str, e: &Endpoints) -> (StatusCode, &'static str, String) {
    match path {
        "/healthz" => check(e.health.live()),
        "/readyz" => check(e.health.ready()),
        "/metrics" => (StatusCode::OK, PROMETHEUS_TEXT, e.metrics.render()),
        "/stats" => (StatusCode::OK, "application/json", stats(e).to_string()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// The `/stats` document.
pub fn stats(e: &Endpoints) -> serde_json::Value {
    let m = &e.metrics;
    let h = &m.hot;
    serde_json::json!({
        "pipeline": e.pipeline,
        "phase": e.health.phase().as_str(),
        "failure": e.health.failure(),
        "live": e.health.live().is_ok(),
        "ready": e.health.ready().is_ok(),
        "snapshotDocuments": m.snapshot_docs.get(),
        "changesRead": h.upserts.get() + h.deletes.get(),
        "indexed": h.indexed.get(),
        "deleted": h.deleted.get(),
        "stale": h.stale.get(),
        "alreadyGone": h.already_gone.get(),
        "deadLettered": h.dead_lettered.get(),
        "retriedItems": m.retried_items.get(),
        "heldWrites": m.held_writes.get(),
        "inFlight": m.in_flight.get(),
        "checkpoints": m.checkpoints.get(),
        "lastCheckpointUnixSeconds": m.checkpoint_time.get(),
        "secondsSinceProgress": e.health.seconds_since_progress(),
        "streamReopens": m.stream_reopens.get(),
        "transformWaitingSeconds": e.health.transform_waiting_seconds(),
    })
}
