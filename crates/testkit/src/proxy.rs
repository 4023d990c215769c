//! An HTTP proxy in front of the Elasticsearch stand-in that refuses request bodies over a
//! size limit with 413, as Elasticsearch does past `http.max_content_length` (default
//! 100 MiB) and Amazon OpenSearch Service past its instance type's limit (10 MiB on small
//! instances). Everything else is forwarded unchanged to the real server behind it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

/// A running proxy; stops with the test process.
pub struct LimitProxy {
    addr: SocketAddr,
    refused: Arc<AtomicU64>,
}

impl LimitProxy {
    /// Proxy to `upstream` (a base URL), answering 413 to bodies over `max_body` bytes. Runs
    /// on its own thread, so tests that block their runtime do not stall it.
    pub fn start(upstream: &str, max_body: usize) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let refused = Arc::new(AtomicU64::new(0));
        let state = Arc::new(State {
            upstream: upstream.trim_end_matches('/').to_string(),
            max_body,
            client: reqwest::Client::new(),
            refused: refused.clone(),
        });
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::Builder::new()
            .name("limit-proxy".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
                    while let Ok((stream, _)) = listener.accept().await {
                        let state = state.clone();
                        tokio::spawn(async move {
                            let service = service_fn(move |req| {
                                let state = state.clone();
                                async move { Ok::<_, Infallible>(state.handle(req).await) }
                            });
                            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                        });
                    }
                });
            })
            .context("spawn proxy thread")?;
        Ok(Self { addr, refused })
    }

    /// The proxy's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests refused with 413 so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

struct State {
    upstream: String,
    max_body: usize,
    client: reqwest::Client,
    refused: Arc<AtomicU64>,
}

impl State {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return reply(StatusCode::BAD_REQUEST, Bytes::new(), None),
        };
        if body.len() > self.max_body {
            self.refused.fetch_add(1, Ordering::Relaxed);
            // Elasticsearch answers an over-long body with a bare 413 before reading it.
            return reply(StatusCode::PAYLOAD_TOO_LARGE, Bytes::new(), None);
        }
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut forward = self.client.request(parts.method.clone(), format!("{}{path}", self.upstream)).body(body);
        for (name, value) in &parts.headers {
            if name != hyper::header::HOST && name != hyper::header::CONTENT_LENGTH {
                forward = forward.header(name, value);
            }
        }
        match forward.send().await {
            Ok(resp) => {
                let status = resp.status();
                let content_type = resp.headers().get(hyper::header::CONTENT_TYPE).cloned();
                let bytes = resp.bytes().await.unwrap_or_default();
                reply(status, bytes, content_type)
            }
            Err(_) => reply(StatusCode::BAD_GATEWAY, Bytes::new(), None),
        }
    }
}

fn reply(status: StatusCode, body: Bytes, content_type: Option<hyper::header::HeaderValue>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    if let Some(ct) = content_type {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, ct);
    }
    resp
}
