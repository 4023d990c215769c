//! An HTTP proxy in front of the Elasticsearch stand-in, for what the stand-in itself does not
//! do: it refuses request bodies over a size limit with 413, as Elasticsearch does past
//! `http.max_content_length` (default 100 MiB) and Amazon OpenSearch Service past its
//! instance type's limit (10 MiB on small instances); it can serve HTTPS and require a client
//! certificate (mutual TLS, as Elasticsearch's PKI realm or a TLS-terminating gateway does);
//! and it counts gzip-compressed requests. Everything else is forwarded unchanged (bodies and
//! their `Content-Encoding` included) to the real server behind it.

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
    gzipped: Arc<AtomicU64>,
    https: bool,
}

/// HTTPS settings of the proxy: its certificate and key, and the CA its clients' certificates
/// must chain to (PEM files).
pub struct MutualTls<'a> {
    /// Server certificate.
    pub cert: &'a std::path::Path,
    /// Server key.
    pub key: &'a std::path::Path,
    /// CA of the client certificates it requires.
    pub client_ca: &'a std::path::Path,
}

fn server_config(tls: &MutualTls<'_>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    crate::init_crypto();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(tls.cert)?.collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(tls.key)?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(tls.client_ca)? {
        roots.add(ca?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build()?;
    let config = rustls::ServerConfig::builder().with_client_cert_verifier(verifier).with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

impl LimitProxy {
    /// Proxy to `upstream` (a base URL), answering 413 to bodies over `max_body` bytes. Runs
    /// on its own thread, so tests that block their runtime do not stall it.
    pub fn start(upstream: &str, max_body: usize) -> anyhow::Result<Self> {
        Self::start_with(upstream, max_body, None)
    }

    /// [`LimitProxy::start`], serving HTTPS that requires a client certificate when `tls` is
    /// given (a handshake without one fails, so no request reaches Elasticsearch).
    pub fn start_with(upstream: &str, max_body: usize, tls: Option<MutualTls<'_>>) -> anyhow::Result<Self> {
        let acceptor = tls.as_ref().map(server_config).transpose()?.map(tokio_rustls::TlsAcceptor::from);
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let refused = Arc::new(AtomicU64::new(0));
        let gzipped = Arc::new(AtomicU64::new(0));
        let state = Arc::new(State {
            upstream: upstream.trim_end_matches('/').to_string(),
            max_body,
            client: reqwest::Client::new(),
            refused: refused.clone(),
            gzipped: gzipped.clone(),
        });
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::Builder::new()
            .name("limit-proxy".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
                    while let Ok((stream, _)) = listener.accept().await {
                        let (state, acceptor) = (state.clone(), acceptor.clone());
                        tokio::spawn(async move {
                            let service = service_fn(move |req| {
                                let state = state.clone();
                                async move { Ok::<_, Infallible>(state.handle(req).await) }
                            });
                            match acceptor {
                                Some(acceptor) => {
                                    if let Ok(tls) = acceptor.accept(stream).await {
                                        let _ = http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
                                    }
                                }
                                None => {
                                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                                }
                            }
                        });
                    }
                });
            })
            .context("spawn proxy thread")?;
        Ok(Self { addr, refused, gzipped, https: tls.is_some() })
    }

    /// The proxy's base URL.
    pub fn url(&self) -> String {
        // The test certificate names 127.0.0.1 as well as localhost.
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Requests whose body came gzip-compressed.
    pub fn gzipped(&self) -> u64 {
        self.gzipped.load(Ordering::Relaxed)
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
    gzipped: Arc<AtomicU64>,
}

impl State {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        if parts.headers.get(hyper::header::CONTENT_ENCODING).is_some_and(|v| v == "gzip") {
            self.gzipped.fetch_add(1, Ordering::Relaxed);
        }
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
