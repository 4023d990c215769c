//! The Elasticsearch / OpenSearch connection: the only place that talks HTTP to the sink.
//!
//! Built on the official `elasticsearch` crate's transport (connection pool, TLS, auth) with
//! raw request bodies, so bulk bodies are sent exactly as encoded. Requests carry plain
//! `application/json`, which Elasticsearch 7.x/8.x/9.x and OpenSearch 2.x all accept
//! (OpenSearch refuses Elasticsearch's `compatible-with` media types with 406).
//!
//! Every request goes through [`Elastic::request`], which also compresses bodies (when `gzip`
//! is on) and signs them for AWS ([`super::aws`]): the signature covers the bytes sent.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use elasticsearch::auth::{ClientCertificate, Credentials};
use elasticsearch::cert::{Certificate, CertificateValidation};
use elasticsearch::http::headers::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE};
use elasticsearch::http::transport::{
    MultiNodeConnectionPool, SingleNodeConnectionPool, Transport, TransportBuilder,
};
use elasticsearch::http::Method;
use elasticsearch::http::Url;

use super::aws::Signer;
use super::response::Answer;
use crate::config::{ElasticAuth, ElasticConfig};

/// Failures talking to Elasticsearch.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A URL in the configuration does not parse.
    #[error("failed to parse Elasticsearch URL `{url}`: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// Why it does not parse.
        reason: String,
    },
    /// A credential cannot be sent in an HTTP header.
    #[error("the Elasticsearch credentials hold characters an HTTP header cannot carry (check passwordFrom, apiKeyFrom or the aws keys for stray newlines or control characters)")]
    Credentials,
    /// The client could not be built (TLS settings, CA bundle).
    #[error("failed to build the Elasticsearch client")]
    Build(#[source] elasticsearch::Error),
    /// The request did not get an HTTP response (connection refused, timeout, TLS).
    #[error("failed to reach Elasticsearch")]
    Transport(#[source] elasticsearch::Error),
    /// Credentials were refused.
    #[error("Elasticsearch refused the credentials (HTTP {status}); check {check}: {body}")]
    Unauthorized {
        /// 401 or 403.
        status: u16,
        /// The settings to check.
        check: &'static str,
        /// Start of the response body (the server's reason; never a credential of ours).
        body: String,
    },
    /// A request could not be signed for AWS.
    #[error(transparent)]
    Aws(#[from] super::aws::Error),
    /// A request body could not be compressed.
    #[error("failed to gzip a request body")]
    Compress(#[source] std::io::Error),
    /// An unexpected HTTP status.
    #[error("Elasticsearch answered {operation} with HTTP {status}: {body}")]
    Status {
        /// What was attempted.
        operation: &'static str,
        /// HTTP status.
        status: u16,
        /// Start of the response body.
        body: String,
    },
}

impl Error {
    /// Whether Elasticsearch is out of reach rather than refusing: no HTTP answer (connection
    /// refused or reset, a timeout, a name that does not resolve yet), or an answer that says
    /// "not now" (429, 502, 503, 504: a proxy in front of it, a node still recovering). Waiting
    /// may help these; it cannot help a refusal (credentials, a bad index or pipeline, a TLS
    /// handshake that fails on a certificate).
    pub fn is_unreachable(&self) -> bool {
        match self {
            Self::Transport(e) => !failed_tls_handshake(e),
            Self::Status { status, .. } => matches!(status, 429 | 502 | 503 | 504),
            _ => false,
        }
    }
}

/// A TLS handshake that failed (an unknown CA, a refused client certificate): rustls reports it
/// as an I/O error of kind `InvalidData` somewhere in the chain.
fn failed_tls_handshake(e: &elasticsearch::Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(e) = next {
        if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidData) {
            return true;
        }
        next = e.source();
    }
    false
}

/// The `Authorization` header for basic or API key authentication, marked sensitive (kept out
/// of debug output).
///
/// # Errors
/// [`Error::Credentials`] when a credential holds characters no header may carry.
fn authorization(auth: &ElasticAuth) -> Result<Option<HeaderValue>, Error> {
    use base64::Engine as _;
    let text = match auth {
        ElasticAuth::None => return Ok(None),
        ElasticAuth::Basic { username, password } => {
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{username}:{}", password.0)))
        }
        ElasticAuth::ApiKey(key) => format!("ApiKey {}", key.0),
        // Signed per request instead.
        ElasticAuth::Aws(_) => return Ok(None),
    };
    let mut value = HeaderValue::from_str(&text).map_err(|_| Error::Credentials)?;
    value.set_sensitive(true);
    Ok(Some(value))
}

/// What the cluster says about itself on `GET /`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// `elasticsearch` or `opensearch`.
    pub distribution: String,
    /// Version number, e.g. `8.15.3`.
    pub version: String,
}

/// A connection to one Elasticsearch or OpenSearch cluster; cheap to clone.
#[derive(Clone, Debug)]
pub struct Elastic {
    transport: Transport,
    /// Compress request bodies (here, not in the transport, so a signature covers them).
    gzip: bool,
    /// The endpoint and its signer when requests are signed for AWS (one URL, by validation).
    aws: Option<(Url, Arc<Signer>)>,
}

/// The bulk response fields monsoon reads; the rest is filtered out server-side to save
/// bandwidth and parsing.
const BULK_FILTER: &str = "errors,items.*.status,items.*.error.type,items.*.error.reason";

impl Elastic {
    /// Build a client; no request is made.
    ///
    /// # Errors
    /// [`Error::Url`] or [`Error::Build`] for bad settings.
    pub fn new(config: &ElasticConfig) -> Result<Self, Error> {
        let aws = match &config.auth {
            ElasticAuth::Aws(auth) => {
                let url = config.urls.first().ok_or_else(|| Error::Url { url: String::new(), reason: "no URL".into() })?;
                Some((base_url(url)?, Arc::new(Signer::new(auth))))
            }
            _ => None,
        };
        let mut urls = Vec::new();
        for url in &config.urls {
            urls.push(Url::parse(url).map_err(|e| Error::Url {
                url: url.clone(),
                reason: e.to_string(),
            })?);
        }
        let builder = match urls.len() {
            1 => TransportBuilder::new(SingleNodeConnectionPool::new(urls.remove(0))),
            _ => TransportBuilder::new(MultiNodeConnectionPool::round_robin(urls, None)),
        };
        let mut builder = builder
            .timeout(config.request_timeout)
            .enable_meta_header(false)
            .disable_proxy();
        builder = match &config.client_identity {
            // The transport holds one credential: the certificate takes it, and basic or API
            // key authentication goes into every request's `Authorization` header instead.
            Some(pem) => {
                let builder = builder.auth(Credentials::Certificate(ClientCertificate::Pem(pem.0.clone().into_bytes())));
                match authorization(&config.auth)? {
                    Some(value) => builder.header(AUTHORIZATION, value),
                    None => builder,
                }
            }
            None => match &config.auth {
                ElasticAuth::None => builder,
                ElasticAuth::Basic { username, password } => {
                    builder.auth(Credentials::Basic(username.clone(), password.0.clone()))
                }
                ElasticAuth::ApiKey(key) => builder.auth(Credentials::EncodedApiKey(key.0.clone())),
                ElasticAuth::Aws(_) => builder,
            },
        };
        if let Some(pem) = &config.ca_pem {
            let cert = Certificate::from_pem(pem).map_err(Error::Build)?;
            builder = builder.cert_validation(CertificateValidation::Full(cert));
        }
        let transport = builder.build().map_err(|e| Error::Build(e.into()))?;
        Ok(Self { transport, gzip: config.gzip, aws })
    }

    /// The settings to check when credentials are refused.
    fn credentials_hint(&self) -> &'static str {
        match self.aws {
            Some(_) => "spec.elasticsearch.aws (region, service, the AWS credentials) and the access policy of the domain or collection",
            None => "username/passwordFrom or apiKeyFrom",
        }
    }

    fn unauthorized(&self, status: u16, body: &[u8]) -> Error {
        Error::Unauthorized {
            status,
            check: self.credentials_hint(),
            body: String::from_utf8_lossy(body).chars().take(300).collect(),
        }
    }

    /// Send one request: the single way out to the cluster. The body is gzipped when `gzip`
    /// is on, then, with `aws`, the request is signed over the exact URL, `content-type`,
    /// `content-encoding` and body bytes that are sent.
    async fn request(
        &self,
        method: Method,
        path: &str,
        query: Option<&[(&str, &str)]>,
        body: Option<Bytes>,
        timeout: Option<Duration>,
    ) -> Result<(u16, Bytes), Error> {
        let mut headers = HeaderMap::new();
        let body = match body {
            Some(plain) if self.gzip => {
                let mut encoder = flate2::write::GzEncoder::new(Vec::with_capacity(plain.len() / 4), flate2::Compression::default());
                encoder.write_all(&plain).map_err(Error::Compress)?;
                headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                Some(Bytes::from(encoder.finish().map_err(Error::Compress)?))
            }
            other => other,
        };
        let response = match &self.aws {
            None => self.transport.send(method, path, headers, query, body, timeout).await,
            Some((base, signer)) => {
                // The absolute URL as the transport will build it (joining an absolute URL
                // yields it unchanged), with the query encoded as reqwest would.
                let mut url = base.join(path.trim_start_matches('/')).map_err(|e| Error::Url { url: path.to_string(), reason: e.to_string() })?;
                if let Some(query) = query.filter(|q| !q.is_empty()) {
                    url.query_pairs_mut().extend_pairs(query.iter());
                }
                // The transport sends this content type on every request; sign it as sent.
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                let covered: Vec<(&str, &str)> = headers.iter().filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?))).collect();
                let signature = signer
                    .sign(method_name(method), url.as_str(), &covered, body.as_deref().unwrap_or_default())
                    .await?;
                for h in signature {
                    let mut value = HeaderValue::from_str(&h.value).map_err(|_| Error::Credentials)?;
                    value.set_sensitive(h.sensitive);
                    headers.insert(HeaderName::from_static(h.name), value);
                }
                self.transport.send(method, url.as_str(), headers, None::<&[(&str, &str)]>, body, timeout).await
            }
        };
        let response = response.map_err(Error::Transport)?;
        let status = response.status_code().as_u16();
        let bytes = response
            .bytes()
            .await
            .map_err(Error::Transport)?;
        Ok((status, bytes))
    }

    /// `GET /`: which server and version. Refused credentials are [`Error::Unauthorized`].
    ///
    /// # Errors
    /// Transport failures and unexpected statuses.
    pub async fn info(&self) -> Result<ServerInfo, Error> {
        let (status, body) = self
            .request(Method::Get, "/", None, None, Some(Duration::from_secs(10)))
            .await?;
        match status {
            200 => {}
            401 | 403 => return Err(self.unauthorized(status, &body)),
            _ => return Err(status_error("GET /", status, &body)),
        }
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let version = &v["version"];
        Ok(ServerInfo {
            distribution: version["distribution"]
                .as_str()
                .unwrap_or("elasticsearch")
                .to_string(),
            version: version["number"].as_str().unwrap_or("unknown").to_string(),
        })
    }

    /// `POST /_bulk` with an NDJSON body; returns the HTTP status and body, unread.
    ///
    /// # Errors
    /// [`Error::Transport`] when no response arrived.
    pub async fn bulk(&self, body: Vec<u8>) -> Result<(u16, Bytes), Error> {
        self.request(
            Method::Post,
            "/_bulk",
            Some(&[("filter_path", BULK_FILTER)]),
            Some(Bytes::from(body)),
            None,
        )
        .await
    }

    /// [`Elastic::bulk`], its answer read: `is_delete[i]` says whether action `i` of `body` is
    /// a delete. No answer is [`Answer::Again`].
    pub async fn bulk_answer(&self, body: Vec<u8>, is_delete: &[bool]) -> Answer {
        match self.bulk(body).await {
            Ok((status, response)) => super::response::answer(status, &response, is_delete),
            Err(e) => Answer::Again(crate::error_chain(&e)),
        }
    }

    /// Delete an index; a missing index is fine.
    ///
    /// # Errors
    /// Transport failures and unexpected statuses.
    pub async fn delete_index(&self, index: &str) -> Result<(), Error> {
        let path = format!("/{}", encode_path(index));
        let (status, body) = self.request(Method::Delete, &path, None, None, None).await?;
        match status {
            200..=299 | 404 => Ok(()),
            401 | 403 => Err(self.unauthorized(status, &body)),
            _ => Err(status_error("DELETE index", status, &body)),
        }
    }

    /// The largest `_version` among up to `sample` documents of the indexes `expression`
    /// matches (`a,b,shop.*`), and the index holding it; `None` when they hold no document.
    ///
    /// # Errors
    /// Transport failures, unexpected statuses, or a reply that does not read as a search.
    pub async fn largest_version(&self, expression: &str, sample: usize) -> Result<Option<(String, u64)>, Error> {
        let query = serde_json::json!({"size": sample, "version": true, "_source": false, "query": {"match_all": {}}});
        // Each name encoded, the list and wildcards kept as Elasticsearch reads them.
        let names: Vec<String> = expression.split(',').map(|n| encode_path(n).replace("%2A", "*")).collect();
        let path = format!("/{}/_search", names.join(","));
        let params = [("ignore_unavailable", "true"), ("allow_no_indices", "true")];
        let (status, body) = self.request(Method::Post, &path, Some(&params), Some(json_bytes(&query)), None).await?;
        match status {
            200 => {}
            404 => return Ok(None),
            _ => return Err(status_error("sample versions", status, &body)),
        }
        let page: serde_json::Value = serde_json::from_slice(&body).map_err(|_| status_error("read sampled versions", status, &body))?;
        let hits = page["hits"]["hits"].as_array().ok_or_else(|| status_error("read sampled versions", status, &body))?;
        Ok(hits
            .iter()
            .filter_map(|h| Some((h["_index"].as_str()?.to_string(), h["_version"].as_u64()?)))
            .max_by_key(|(_, v)| *v))
    }

    /// The location records with these ids (`GET /{index}/_mget`, real-time: it sees writes
    /// not yet refreshed). Records not found are absent from the map.
    ///
    /// # Errors
    /// Transport failures, unexpected statuses, or a reply that does not read as a multi-get
    /// (the caller retries: guessing "not found" would leave copies behind).
    pub async fn location_records(&self, index: &str, ids: &[&str]) -> Result<std::collections::HashMap<String, crate::sink::locations::Found>, Error> {
        use crate::sink::locations::{Found, Record};
        let mut out = std::collections::HashMap::new();
        if ids.is_empty() {
            return Ok(out);
        }
        let path = format!("/{}/_mget", encode_path(index));
        let body = serde_json::json!({ "ids": ids });
        let params = [("filter_path", "docs._id,docs._version,docs.found,docs._source,docs.error")];
        let (status, response) = self.request(Method::Post, &path, Some(&params), Some(json_bytes(&body)), None).await?;
        if status != 200 {
            return Err(status_error("read location records", status, &response));
        }
        let unreadable = || status_error("read location records", status, &response);
        let page: serde_json::Value = serde_json::from_slice(&response).map_err(|_| unreadable())?;
        let docs = page["docs"].as_array().ok_or_else(unreadable)?;
        for doc in docs {
            if doc.get("error").is_some() {
                return Err(status_error("read a location record", status, doc.to_string().as_bytes()));
            }
            if doc["found"].as_bool() != Some(true) {
                continue;
            }
            let (Some(id), Some(version)) = (doc["_id"].as_str(), doc["_version"].as_u64()) else {
                return Err(unreadable());
            };
            let record: Record = serde_json::from_value(doc["_source"].clone()).map_err(|_| unreadable())?;
            out.insert(id.to_string(), Found { version, record });
        }
        Ok(out)
    }

    /// The documents `(index, _id JSON literal, routing)` as they are now, for a
    /// read-modify-write (`POST /_mget`, real-time: it sees writes not yet refreshed): each
    /// found document's `_source` with its `_version`, in the order asked;
    /// `None` for a document (or index) that does not exist.
    ///
    /// # Errors
    /// Transport failures, unexpected statuses, or a reply that does not read as a multi-get
    /// (the caller retries: guessing "not found" would start a history over).
    pub async fn current_documents(&self, docs: &[(&str, &str, Option<&str>)]) -> Result<Vec<Option<crate::sink::patches::Current>>, Error> {
        if docs.is_empty() {
            return Ok(Vec::new());
        }
        let asked: Vec<serde_json::Value> = docs
            .iter()
            .map(|(index, id_json, routing)| {
                let id: serde_json::Value = serde_json::from_str(id_json).unwrap_or(serde_json::Value::Null);
                let mut d = serde_json::json!({"_index": index, "_id": id});
                if let Some(r) = routing {
                    d["routing"] = serde_json::Value::from(*r);
                }
                d
            })
            .collect();
        let body = serde_json::json!({ "docs": asked });
        let params = [("filter_path", "docs._version,docs.found,docs._source,docs.error.type,docs.error.reason")];
        let (status, response) = self.request(Method::Post, "/_mget", Some(&params), Some(json_bytes(&body)), None).await?;
        if status != 200 {
            return Err(status_error("read documents for their patch history", status, &response));
        }
        let unreadable = || status_error("read documents for their patch history", status, &response);
        let mut page: serde_json::Value = serde_json::from_slice(&response).map_err(|_| unreadable())?;
        let found = page["docs"].as_array_mut().filter(|d| d.len() == docs.len()).ok_or_else(unreadable)?;
        let mut out = Vec::with_capacity(found.len());
        for doc in found {
            if let Some(e) = doc.get("error") {
                // A missing index holds no document; any other error is retried.
                if e["type"] == "index_not_found_exception" {
                    out.push(None);
                    continue;
                }
                return Err(status_error("read a document for its patch history", status, doc.to_string().as_bytes()));
            }
            if doc["found"].as_bool() != Some(true) {
                out.push(None);
                continue;
            }
            let Some(version) = doc["_version"].as_u64() else {
                return Err(unreadable());
            };
            out.push(Some(crate::sink::patches::Current { version, source: doc["_source"].take() }));
        }
        Ok(out)
    }

    /// Create or replace ingest pipeline `name` with `body`.
    ///
    /// # Errors
    /// Transport failures and refusals (an `attachment` processor without the plugin: the
    /// server's reason is kept).
    pub async fn put_pipeline(&self, name: &str, body: &serde_json::Value) -> Result<(), Error> {
        let path = format!("/_ingest/pipeline/{}", encode_path(name));
        let (status, response) = self.request(Method::Put, &path, None, Some(json_bytes(body)), None).await?;
        match status {
            200..=299 => Ok(()),
            401 | 403 => Err(self.unauthorized(status, &response)),
            _ => Err(status_error("PUT ingest pipeline", status, &response)),
        }
    }

    /// Create `index` with `body` (settings/mappings) unless it exists.
    ///
    /// # Errors
    /// Transport failures and unexpected statuses.
    pub async fn create_index_if_missing(
        &self,
        index: &str,
        body: &serde_json::Value,
    ) -> Result<(), Error> {
        let path = format!("/{}", encode_path(index));
        let bytes = json_bytes(body);
        let (status, response) = self
            .request(Method::Put, &path, None, Some(bytes), None)
            .await?;
        let text = String::from_utf8_lossy(&response);
        match status {
            200..=299 => Ok(()),
            400 if text.contains("resource_already_exists_exception") => Ok(()),
            401 | 403 => Err(self.unauthorized(status, &response)),
            _ => Err(status_error("PUT index", status, &response)),
        }
    }
}

impl Elastic {
    /// Delete every document of `index` whose version is below `below`, with a delete that
    /// itself carries version `below - 1` (`external_gte`): a document re-indexed meanwhile
    /// with a newer version answers 409 and stays. Returns how many were deleted. A missing
    /// index has nothing to sweep.
    ///
    /// # Errors
    /// Transport failures and unexpected statuses; the sweep is idempotent, so the caller
    /// retries it whole.
    pub async fn sweep(&self, index: &str, below: u64, owns: impl Fn(&str) -> bool) -> Result<u64, Error> {
        if below == 0 {
            return Ok(0);
        }
        let query = serde_json::json!({"size": 1000, "version": true, "_source": false, "sort": ["_doc"]});
        self.delete_page_by_page(index, &query, |hits, bulk| {
            let mut actions = 0;
            for hit in hits {
                let (Some(id), Some(version)) = (hit["_id"].as_str(), hit["_version"].as_u64()) else {
                    continue;
                };
                if version >= below || !owns(id) {
                    continue;
                }
                let id_json = serde_json::Value::String(id.to_string()).to_string();
                versioned_delete(bulk, index, &id_json, hit["_routing"].as_str(), below - 1);
                actions += 1;
            }
            actions
        })
        .await
    }

    /// The sweep of documents whose location is recorded ([`crate::sink::locations::swept`]):
    /// delete, in `locations_index`'s records of `pipeline` (of one namespace, for a drop),
    /// every copy of the documents this shard owns that were not written since (versioned
    /// `below - 1`), then the records. Returns how many deletes were done.
    ///
    /// # Errors
    /// As [`Elastic::sweep`]; idempotent, retried whole by the caller.
    pub async fn sweep_located(&self, locations_index: &str, pipeline: &str, below: u64, scope: &crate::sink::locations::Scope<'_>) -> Result<u64, Error> {
        use crate::sink::locations::Record;
        if below == 0 {
            return Ok(0);
        }
        let query = serde_json::json!({"size": 1000, "version": true, "sort": ["_doc"]});
        let mut ownerless = 0;
        let deleted = self
            .delete_page_by_page(locations_index, &query, |hits, bulk| {
                let records: Vec<(String, u64, Record)> = hits
                    .iter()
                    .filter_map(|h| {
                        let record = serde_json::from_value(h["_source"].clone()).ok()?;
                        Some((h["_id"].as_str()?.to_string(), h["_version"].as_u64()?, record))
                    })
                    .collect();
                let (swept, hashed) = crate::sink::locations::swept(&records, pipeline, below, scope);
                ownerless += hashed;
                let mut actions = 0;
                for s in swept {
                    for place in &s.places {
                        versioned_delete(bulk, &place.index, &place.id, place.routing.as_deref(), below - 1);
                        actions += 1;
                    }
                    let record_id = serde_json::Value::String(s.record_id).to_string();
                    versioned_delete(bulk, locations_index, &record_id, None, below - 1);
                    actions += 1;
                }
                actions
            })
            .await?;
        if ownerless > 0 {
            tracing::warn!(records = ownerless, "location records with hashed ids (MongoDB _ids over ~500 bytes) name no shard; their documents are left to the index sweep");
        }
        Ok(deleted)
    }

    /// Scroll `index` with `query` and, page by page, send the deletes `plan` writes into a bulk
    /// body (returning how many), reading every item's outcome. Returns how many were deleted.
    async fn delete_page_by_page(&self, index: &str, query: &serde_json::Value, mut plan: impl FnMut(&[serde_json::Value], &mut Vec<u8>) -> usize) -> Result<u64, Error> {
        // Search sees only what was refreshed (every second by default): without this, the
        // documents written in the last second before a drop or a sweep (acknowledged, but not
        // yet searchable) would escape it and stay for good.
        let (status, body) = self.request(Method::Post, &format!("/{}/_refresh", encode_path(index)), None, None, None).await?;
        if !matches!(status, 200 | 404) {
            return Err(status_error("refresh before a sweep", status, &body));
        }
        let path = format!("/{}/_search", encode_path(index));
        let (status, mut body) = self
            .request(Method::Post, &path, Some(&[("scroll", "2m")]), Some(json_bytes(query)), None)
            .await?;
        match status {
            200 => {}
            404 => return Ok(0),
            _ => return Err(status_error("scroll search", status, &body)),
        }
        let mut deleted = 0;
        let mut scroll_id = String::new();
        loop {
            // A page that does not read as one is an error, never "no more hits": ending the
            // sweep early would leave the documents deleted during the gap in the index.
            let unreadable = |why: &str| Error::Status {
                operation: "read sweep page",
                status: 200,
                body: format!("{why}: {}", String::from_utf8_lossy(&body[..body.len().min(300)])),
            };
            let page: serde_json::Value = serde_json::from_slice(&body).map_err(|_| unreadable("not JSON"))?;
            if let Some(id) = page["_scroll_id"].as_str() {
                scroll_id = id.to_string();
            }
            let hits = page["hits"]["hits"].as_array().cloned().ok_or_else(|| unreadable("no hits.hits array"))?;
            if hits.is_empty() {
                break;
            }
            let mut bulk = Vec::new();
            let actions = plan(&hits, &mut bulk);
            if actions > 0 {
                deleted += self.sweep_bulk(bulk, actions).await?;
            }
            let next = serde_json::json!({"scroll": "2m", "scroll_id": scroll_id});
            let (status, next_body) = self
                .request(Method::Post, "/_search/scroll", None, Some(json_bytes(&next)), None)
                .await?;
            if status != 200 {
                return Err(status_error("scroll", status, &next_body));
            }
            body = next_body;
        }
        if !scroll_id.is_empty() {
            let clear = serde_json::json!({"scroll_id": [scroll_id]});
            let _ = self
                .request(Method::Delete, "/_search/scroll", None, Some(json_bytes(&clear)), None)
                .await;
        }
        Ok(deleted)
    }

    /// Send a sweep's deletes; every item must end deleted, stale (409: written since) or
    /// already gone.
    async fn sweep_bulk(&self, bulk: Vec<u8>, actions: usize) -> Result<u64, Error> {
        let (status, response) = self.bulk(bulk).await?;
        if status != 200 {
            return Err(status_error("sweep bulk", status, &response));
        }
        let outcomes = super::response::classify_response(&response, &vec![true; actions])
            .map_err(|e| Error::Status { operation: "sweep bulk", status, body: e.to_string() })?;
        let mut deleted = 0;
        for outcome in outcomes {
            match outcome {
                super::response::ItemOutcome::Done => deleted += 1,
                o if o.is_success() => {}
                other => {
                    return Err(Error::Status {
                        operation: "sweep delete",
                        status,
                        body: format!("{other:?}"),
                    })
                }
            }
        }
        Ok(deleted)
    }
}

/// Append a delete of `index`/`id_json` (a JSON string literal) with `version`
/// (`external_gte`: anything written at that version or later stays).
fn versioned_delete(bulk: &mut Vec<u8>, index: &str, id_json: &str, routing: Option<&str>, version: u64) {
    bulk.extend_from_slice(b"{\"delete\":{\"_index\":");
    super::request::write_json_str(index, bulk);
    bulk.extend_from_slice(b",\"_id\":");
    bulk.extend_from_slice(id_json.as_bytes());
    if let Some(routing) = routing {
        bulk.extend_from_slice(b",\"routing\":");
        super::request::write_json_str(routing, bulk);
    }
    bulk.extend_from_slice(format!(",\"version\":{version},\"version_type\":\"external_gte\"}}}}\n").as_bytes());
}

fn json_bytes(value: &serde_json::Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

fn status_error(operation: &'static str, status: u16, body: &[u8]) -> Error {
    let text = String::from_utf8_lossy(body);
    Error::Status {
        operation,
        status,
        body: text.chars().take(300).collect(),
    }
}

/// The endpoint URL as the transport's connection holds it: its path ends with `/`, so
/// request paths join below it.
fn base_url(url: &str) -> Result<Url, Error> {
    let mut parsed = Url::parse(url).map_err(|e| Error::Url { url: url.to_string(), reason: e.to_string() })?;
    if !parsed.path().ends_with('/') {
        let path = format!("{}/", parsed.path());
        parsed.set_path(&path);
    }
    Ok(parsed)
}

fn method_name(method: Method) -> &'static str {
    match method {
        Method::Get => "GET",
        Method::Put => "PUT",
        Method::Post => "POST",
        Method::Delete => "DELETE",
        Method::Head => "HEAD",
    }
}

/// Percent-encode an index name for a URL path.
fn encode_path(index: &str) -> String {
    let mut out = String::with_capacity(index.len());
    for b in index.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_names_are_path_encoded() {
        assert_eq!(encode_path("shop.orders"), "shop.orders");
        assert_eq!(encode_path("a+b%"), "a%2Bb%25");
    }
}
