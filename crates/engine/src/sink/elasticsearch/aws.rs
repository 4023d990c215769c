//! AWS Signature Version 4 for Amazon OpenSearch Service (`es`) and OpenSearch Serverless
//! (`aoss`): every request the [`Elastic`](super::Elastic) client sends is signed here, just
//! before it leaves, over the exact URL, headers and body bytes that go on the wire (a gzip
//! body is signed compressed).
//!
//! Credentials are static keys from the pipeline, or the default AWS credentials chain of
//! `aws-config` (environment, shared credentials file and profile, web identity = IRSA on EKS,
//! ECS container and EC2 instance metadata). Chain credentials are cached and fetched again
//! [`REFRESH_BEFORE_EXPIRY`] before they expire, so no request is signed with credentials
//! about to lapse. Neither the keys nor the signature are ever logged (`Debug` shows neither).

use std::fmt;
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::{error::CredentialsError, ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, PayloadChecksumKind, SignableBody, SignableRequest, SigningError, SigningSettings};
use aws_sigv4::sign::v4;
use tokio::sync::{Mutex, OnceCell};

use crate::config::{AwsAuth, AwsCredentials};

/// Fetch chain credentials again this long before they expire: a request signed now must
/// still be valid when the service checks it, and the chain (STS for web identity, instance
/// metadata) may take a while to answer. Credentials that arrive with less than twice this
/// left (instance metadata hands out the current set until shortly before it rotates) are
/// kept for half their remaining life instead, so the chain is not asked again on every
/// request.
pub const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(5 * 60);

/// Chain credentials without an expiry (environment variables, a shared credentials file)
/// are read again this often, so a rotated credentials file is picked up.
pub const REREAD_WITHOUT_EXPIRY: Duration = Duration::from_secs(5 * 60);

/// Failures signing a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The credentials chain found no usable credentials.
    #[error("failed to load AWS credentials for signing requests (spec.elasticsearch.aws: set accessKeyIdFrom/secretAccessKeyFrom, or give the worker credentials through the default AWS chain: environment, profile, IRSA, ECS or instance metadata)")]
    Credentials(#[source] CredentialsError),
    /// The signing parameters could not be assembled.
    #[error("failed to prepare AWS SigV4 signing parameters (spec.elasticsearch.aws)")]
    Params(#[source] v4::signing_params::BuildError),
    /// The request could not be signed (a URL or header aws-sigv4 cannot read).
    #[error("failed to sign the request with AWS SigV4 (spec.elasticsearch.aws)")]
    Sign(#[source] SigningError),
}

/// One header the signature adds (`authorization`, `x-amz-date`, `x-amz-security-token`,
/// `x-amz-content-sha256`).
#[derive(Clone, PartialEq, Eq)]
pub struct SignatureHeader {
    /// Lower-case header name.
    pub name: &'static str,
    /// Header value.
    pub value: String,
    /// Whether the value is a credential (kept out of debug output).
    pub sensitive: bool,
}

impl fmt::Debug for SignatureHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = if self.sensitive { "<redacted>" } else { self.value.as_str() };
        write!(f, "{}: {value}", self.name)
    }
}

/// Signs requests for one endpoint; shared by every clone of the client.
pub struct Signer {
    region: String,
    service: String,
    source: Source,
    /// The chain's current credentials and when they were fetched. A mutex (held across the
    /// fetch) so concurrent requests wait for one refresh instead of each starting one.
    cached: Mutex<Option<(Credentials, SystemTime)>>,
}

enum Source {
    Static(Credentials),
    /// Built on first use: building reads the profile files and the environment.
    Chain(OnceCell<SharedCredentialsProvider>),
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match self.source {
            Source::Static(_) => "static keys",
            Source::Chain(_) => "default credentials chain",
        };
        f.debug_struct("Signer").field("region", &self.region).field("service", &self.service).field("credentials", &source).finish()
    }
}

impl Signer {
    /// A signer for `auth`; no credential is fetched yet.
    pub fn new(auth: &AwsAuth) -> Self {
        let source = match &auth.credentials {
            AwsCredentials::Static { access_key_id, secret_access_key, session_token } => Source::Static(Credentials::new(
                access_key_id.0.clone(),
                secret_access_key.0.clone(),
                session_token.as_ref().map(|t| t.0.clone()),
                None,
                "monsoon pipeline",
            )),
            AwsCredentials::DefaultChain => Source::Chain(OnceCell::new()),
        };
        Self {
            region: auth.region.clone(),
            service: auth.service.clone(),
            source,
            cached: Mutex::new(None),
        }
    }

    /// The headers that sign `method url` with `headers` (those to cover besides `host`, which
    /// is taken from the URL) and `body`, with credentials valid now.
    ///
    /// # Errors
    /// [`Error::Credentials`] when the chain has none; [`Error::Sign`] for a request
    /// aws-sigv4 cannot read.
    pub async fn sign(&self, method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Result<Vec<SignatureHeader>, Error> {
        let credentials = self.credentials().await?;
        sign_request(&credentials, &self.region, &self.service, SystemTime::now(), method, url, headers, body)
    }

    async fn credentials(&self) -> Result<Credentials, Error> {
        let cell = match &self.source {
            Source::Static(credentials) => return Ok(credentials.clone()),
            Source::Chain(cell) => cell,
        };
        let mut cached = self.cached.lock().await;
        let now = SystemTime::now();
        if let Some((credentials, fetched)) = cached.as_ref() {
            if fresh(credentials, *fetched, now) {
                return Ok(credentials.clone());
            }
        }
        let provider = cell.get_or_init(|| default_chain(self.region.clone())).await;
        match provider.provide_credentials().await {
            Ok(credentials) => {
                tracing::debug!(expires = ?credentials.expiry(), "AWS credentials loaded from the default chain");
                *cached = Some((credentials.clone(), now));
                Ok(credentials)
            }
            // Refreshed early: the current ones still work until they expire.
            Err(e) => match cached.as_ref() {
                Some((credentials, _)) if credentials.expiry().is_none_or(|at| at > now) => {
                    tracing::warn!(error = %crate::error_chain(&e), "failed to refresh AWS credentials; signing with the current ones until they expire");
                    Ok(credentials.clone())
                }
                _ => Err(Error::Credentials(e)),
            },
        }
    }
}

async fn default_chain(region: String) -> SharedCredentialsProvider {
    let chain = aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
        .region(aws_config::Region::new(region))
        .build()
        .await;
    SharedCredentialsProvider::new(chain)
}

/// Whether credentials fetched at `fetched` may still sign at `now`: until
/// [`REFRESH_BEFORE_EXPIRY`] (or half the life they had left when fetched, if less) before
/// they expire.
fn fresh(credentials: &Credentials, fetched: SystemTime, now: SystemTime) -> bool {
    match credentials.expiry() {
        Some(expiry) => {
            let life = expiry.duration_since(fetched).unwrap_or_default();
            now + REFRESH_BEFORE_EXPIRY.min(life / 2) < expiry
        }
        None => now < fetched + REREAD_WITHOUT_EXPIRY,
    }
}

/// Sign one request at `time` (pure: no I/O). `url` is the absolute, already-encoded URL as
/// sent; the canonical path is encoded once more (double encoding, as OpenSearch Service
/// expects); `aoss` also gets `x-amz-content-sha256`, which Serverless requires.
///
/// # Errors
/// [`Error::Params`] or [`Error::Sign`].
#[allow(clippy::too_many_arguments)]
pub fn sign_request(
    credentials: &Credentials,
    region: &str,
    service: &str,
    time: SystemTime,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Vec<SignatureHeader>, Error> {
    let mut settings = SigningSettings::default();
    if service == "aoss" {
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    }
    let identity = credentials.clone().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(Error::Params)?
        .into();
    let request = SignableRequest::new(method, url, headers.iter().copied(), SignableBody::Bytes(body)).map_err(Error::Sign)?;
    let (instructions, _signature) = sign(request, &params).map_err(Error::Sign)?.into_parts();
    let (headers, _params) = instructions.into_parts();
    Ok(headers
        .into_iter()
        .map(|h| SignatureHeader {
            name: h.name(),
            value: h.value().to_string(),
            sensitive: h.sensitive() || h.name() == "authorization",
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(unix_seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(unix_seconds)
    }

    /// AWS's documented example (Signature Version 4 test suite, `get-vanilla`): the same
    /// keys, date, region and service give the published signature.
    #[test]
    fn signs_the_documented_aws_example() {
        let credentials = Credentials::new("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None, None, "test");
        // 2015-08-30T12:36:00Z
        let headers = sign_request(&credentials, "us-east-1", "service", at(1_440_938_160), "GET", "https://example.amazonaws.com/", &[], b"").expect("signed");
        let auth = headers.iter().find(|h| h.name == "authorization").expect("authorization");
        assert_eq!(
            auth.value,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
        assert!(auth.sensitive);
        assert!(headers.iter().any(|h| h.name == "x-amz-date" && h.value == "20150830T123600Z"), "{headers:?}");
        assert!(!format!("{headers:?}").contains("Signature="), "the signature stays out of debug output");
    }

    /// A bulk request to OpenSearch Serverless with a session token, compared with what
    /// botocore's `SigV4Auth` computes for the same request (the vector below was produced
    /// with botocore 1.44.18; `crates/testkit/py/sigv4_proxy.py` checks live requests the
    /// same way).
    #[test]
    fn signs_an_aoss_bulk_with_a_session_token_as_botocore_does() {
        let credentials = Credentials::new("AKIDTEST", "test-secret-key", Some("test-session-token".into()), None, "test");
        let body = b"{\"index\":{\"_index\":\"shop.orders\",\"_id\":\"1\"}}\n{\"n\":1}\n";
        let headers = sign_request(
            &credentials,
            "eu-west-1",
            "aoss",
            at(1_767_225_600), // 2026-01-01T00:00:00Z
            "POST",
            "http://127.0.0.1:9200/_bulk?filter_path=errors%2Citems.*.status",
            &[("content-type", "application/json")],
            body,
        )
        .expect("signed");
        let get = |name: &str| headers.iter().find(|h| h.name == name).map(|h| h.value.clone()).unwrap_or_default();
        assert_eq!(get("x-amz-content-sha256"), BOTOCORE_BODY_SHA256);
        assert_eq!(get("x-amz-security-token"), "test-session-token");
        assert_eq!(get("authorization"), BOTOCORE_AOSS_AUTHORIZATION);
    }

    const BOTOCORE_BODY_SHA256: &str = "a68fe547d2405144b6c09064cbbb91215c969441789134cd0536b41474d96b55";
    const BOTOCORE_AOSS_AUTHORIZATION: &str = "AWS4-HMAC-SHA256 Credential=AKIDTEST/20260101/eu-west-1/aoss/aws4_request, SignedHeaders=content-type;host;x-amz-content-sha256;x-amz-date;x-amz-security-token, Signature=a6e718785c31d6e2f3ee0a91a269bbbcd5ee32eb3dae49f0941298accb80ab6f";

    #[test]
    fn chain_credentials_are_refreshed_before_they_expire() {
        let now = at(1_767_225_600);
        let expiring = |secs: u64| Credentials::new("a", "b", Some("t".into()), Some(now + Duration::from_secs(secs)), "test");
        assert!(fresh(&expiring(3600), now, now), "an hour left: keep");
        let later = |secs: u64| now + Duration::from_secs(secs);
        assert!(fresh(&expiring(3600), now, later(3299)));
        assert!(!fresh(&expiring(3600), now, later(3300)), "five minutes left: fetch new ones first");
        // Fetched with four minutes left: kept for two, not fetched again on every request.
        assert!(fresh(&expiring(240), now, later(119)));
        assert!(!fresh(&expiring(240), now, later(120)));
        assert!(!fresh(&expiring(0), now, now), "expired");
        let forever = Credentials::new("a", "b", None, None, "test");
        assert!(fresh(&forever, now, now + Duration::from_secs(60)));
        assert!(!fresh(&forever, now, now + REREAD_WITHOUT_EXPIRY), "a credentials file is read again");
    }
}
