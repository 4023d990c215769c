//! From a validated `SyncPipeline` to the engine's configuration, resolving credentials.
//!
//! Standalone mode (`monsoon run`) reads secret values from environment variables and files;
//! Secret references need the operator and are refused here with a clear error.

use std::path::Path;
use std::time::Duration;

use monsoon_api::{
    DropPolicy, HistoryLostPolicy, NamespacePattern as ApiPattern, ValidatedPipeline, ValueFrom,
};
use monsoon_engine::config::{
    AwsAuth, AwsCredentials, BatchConfig, ElasticAuth, ElasticConfig, EngineConfig, HistoryLost, MongoConfig,
    NamespacePattern, Routing, Secret, StreamFrom,
};

/// A credential or setting that could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The environment variable is not set.
    #[error("{field}: environment variable `{name}` is not set")]
    EnvMissing {
        /// Field path.
        field: &'static str,
        /// Variable name.
        name: String,
    },
    /// The file cannot be read.
    #[error("{field}: failed to read file `{path}`")]
    File {
        /// Field path.
        field: &'static str,
        /// File path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Secret references need a cluster.
    #[error("{field}: `secretKeyRef` and `configMapKeyRef` are only available in a cluster (the operator wires them into worker pods); use `env` or `file` with `monsoon run`")]
    SecretRefStandalone {
        /// Field path.
        field: &'static str,
    },
}

fn resolve(from: &ValueFrom, field: &'static str) -> Result<String, Error> {
    if let Some(name) = &from.env {
        return std::env::var(name).map_err(|_| Error::EnvMissing {
            field,
            name: name.clone(),
        });
    }
    if let Some(path) = &from.file {
        let text = std::fs::read_to_string(path).map_err(|source| Error::File {
            field,
            path: path.clone(),
            source,
        })?;
        return Ok(text.trim_end_matches(['\n', '\r']).to_string());
    }
    Err(Error::SecretRefStandalone { field })
}

/// The scripts and filters with their sources read (inline, or from the file a ConfigMap is
/// mounted at in a worker pod).
fn scripts_config(spec: &monsoon_api::SyncPipelineSpec) -> Result<monsoon_script::Config, Error> {
    let sources = |list: &[monsoon_api::ScriptSpec], field: &'static str| -> Result<Vec<monsoon_script::ScriptSource>, Error> {
        list.iter()
            .map(|s| {
                let (source, origin) = match (&s.script, &s.script_from) {
                    (Some(text), _) => (text.clone(), None),
                    (None, Some(from)) => (resolve(from, field)?, from.file.clone().or_else(|| from.env.clone())),
                    (None, None) => (String::new(), None),
                };
                Ok(monsoon_script::ScriptSource { namespace: s.namespace.clone(), source, origin })
            })
            .collect()
    };
    let limits = spec.script_limits.clone().unwrap_or_default();
    Ok(monsoon_script::Config {
        scripts: sources(&spec.scripts, "spec.scripts[].scriptFrom")?,
        filters: sources(&spec.filters, "spec.filters[].scriptFrom")?,
        pipelines: Vec::new(),
        limits: monsoon_script::Limits {
            timeout: Duration::from_millis(limits.timeout_ms),
            memory_limit: (limits.memory_mib as usize) << 20,
            ..monsoon_script::Limits::default()
        },
        workers: limits.workers as usize,
    })
}

fn pattern(text: &str) -> NamespacePattern {
    // Validation already accepted every pattern; parse cannot fail here.
    match ApiPattern::parse(text) {
        Ok(p) => NamespacePattern {
            database: p.database,
            collection: p.collection,
        },
        Err(_) => NamespacePattern {
            database: text.to_string(),
            collection: None,
        },
    }
}

/// A client certificate followed by its key, as one PEM (what both the MongoDB driver and the
/// HTTP client read). Validation guarantees both or neither are set.
fn client_identity(
    cert: &Option<ValueFrom>,
    key: &Option<ValueFrom>,
    (field_cert, field_key): (&'static str, &'static str),
) -> Result<Option<Secret>, Error> {
    let (Some(cert), Some(key)) = (cert, key) else { return Ok(None) };
    let mut pem = resolve(cert, field_cert)?;
    pem.push('\n');
    pem.push_str(&resolve(key, field_key)?);
    pem.push('\n');
    Ok(Some(Secret(pem)))
}

/// Write `contents` to a new file in the temporary directory readable only by this user.
fn private_file(name: &str, contents: &str, field: &'static str) -> Result<String, Error> {
    use std::io::Write as _;
    let path = std::env::temp_dir().join(name);
    let io = |source| Error::File { field, path: path.display().to_string(), source };
    let _ = std::fs::remove_file(&path);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(&path).map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    Ok(path.display().to_string())
}

/// Build the engine configuration for `monsoon run`.
///
/// # Errors
/// [`Error`] naming the field whose value could not be resolved.
pub fn engine_config(p: &ValidatedPipeline) -> Result<EngineConfig, Error> {
    let spec = &p.spec;
    let uri = match (&spec.mongodb.uri, &spec.mongodb.uri_from) {
        (Some(uri), _) => uri.clone(),
        (None, Some(from)) => resolve(from, "spec.mongodb.uriFrom")?,
        (None, None) => String::new(),
    };
    let mongo_ca = match &spec.mongodb.ca_from {
        Some(ValueFrom { file: Some(path), .. }) => Some(path.clone()),
        Some(from) => {
            // A CA given by env: write it to a private temp file the driver can read.
            let pem = resolve(from, "spec.mongodb.caFrom")?;
            let path = std::env::temp_dir().join(format!("monsoon-{}-mongo-ca.pem", p.name));
            std::fs::write(&path, pem).map_err(|source| Error::File {
                field: "spec.mongodb.caFrom",
                path: path.display().to_string(),
                source,
            })?;
            Some(path.display().to_string())
        }
        None => None,
    };
    let mongo_client_pem = client_identity(
        &spec.mongodb.client_cert_from,
        &spec.mongodb.client_key_from,
        ("spec.mongodb.clientCertFrom", "spec.mongodb.clientKeyFrom"),
    )?;
    let mongo_client_file = match mongo_client_pem {
        // The driver reads a path: write the pair to a file only this user can read.
        Some(pem) => Some(private_file(&format!("monsoon-{}-mongo-client.pem", p.name), &pem.0, "spec.mongodb.clientCertFrom")?),
        None => None,
    };
    let es = &spec.elasticsearch;
    let auth = match (&es.username, &es.password_from, &es.api_key_from) {
        // Validation refuses `aws` with the other credentials.
        _ if es.aws.is_some() => aws_auth(es.aws.as_ref())?,
        (Some(user), Some(pw), _) => ElasticAuth::Basic {
            username: user.clone(),
            password: Secret(resolve(pw, "spec.elasticsearch.passwordFrom")?),
        },
        (_, _, Some(key)) => ElasticAuth::ApiKey(Secret(resolve(key, "spec.elasticsearch.apiKeyFrom")?)),
        _ => ElasticAuth::None,
    };
    let ca_pem = match &es.ca_from {
        Some(from) => Some(resolve(from, "spec.elasticsearch.caFrom")?.into_bytes()),
        None => None,
    };
    Ok(EngineConfig {
        name: p.name.clone(),
        mongodb: MongoConfig {
            uri: Secret(uri),
            ca_file: mongo_ca,
            client_cert_key_file: mongo_client_file,
            connect_timeout: Duration::from_secs(15),
        },
        elasticsearch: ElasticConfig {
            urls: es.urls.clone(),
            auth,
            ca_pem,
            client_identity: client_identity(
                &es.client_cert_from,
                &es.client_key_from,
                ("spec.elasticsearch.clientCertFrom", "spec.elasticsearch.clientKeyFrom"),
            )?,
            gzip: es.gzip,
            request_timeout: Duration::from_secs(60),
        },
        routing: Routing {
            include: spec.namespaces.iter().map(|n| pattern(n)).collect(),
            exclude: spec.exclude_namespaces.iter().map(|n| pattern(n)).collect(),
            // Validation compiled both already.
            include_regex: spec.namespace_regex.as_deref().and_then(|r| monsoon_api::namespace_regex(r).ok()),
            exclude_regex: spec.exclude_namespace_regex.as_deref().and_then(|r| monsoon_api::namespace_regex(r).ok()),
            // A mapping's fixed index is the namespace's index, as in `spec.indexes`.
            indexes: spec
                .indexes
                .clone()
                .into_iter()
                .chain(spec.mappings.iter().filter_map(|m| {
                    let fixed = monsoon_api::shape::IndexTemplate::parse(m.index.as_deref()?).ok()?;
                    Some((m.namespace.clone(), fixed.fixed()?.to_owned()))
                }))
                .collect(),
            snapshot_only: spec.snapshot_namespaces.iter().map(|n| pattern(n)).collect(),
        },
        snapshot: spec.snapshot,
        // The operator passes the `monsoon.dev/resnapshot` annotation's token; `monsoon run`
        // honours the same variable.
        resnapshot: std::env::var(monsoon_operator::workload::ENV_RESNAPSHOT).ok().filter(|t| !t.is_empty()),
        collection_streams: spec.mongodb.stream_scope == monsoon_api::StreamScope::Collection,
        snapshot_split: spec.snapshot_split.as_ref().map(|s| (s.ranges, s.min_documents)),
        shared_indexes: spec.shared_indexes.iter().cloned().collect(),
        files: spec.files.as_ref().map(|f| monsoon_engine::config::FilesConfig {
            namespaces: f.namespaces.clone(),
            max_file_size: f.max_file_size,
            pipeline: f.pipeline.clone(),
            create_pipeline: f.create_pipeline,
        }),
        stream_from: spec.stream_start.as_ref().map(|s| match s.timestamp {
            Some(t) => StreamFrom::Seconds(t),
            None => StreamFrom::Oldest,
        }),
        batch: BatchConfig {
            max_docs: spec.batch.max_docs as usize,
            max_bytes: spec.batch.max_bytes as usize,
            flush_interval: Duration::from_millis(spec.batch.flush_interval_ms),
            concurrency: spec.batch.concurrency as usize,
        },
        on_history_lost: match spec.on_history_lost {
            HistoryLostPolicy::Fail => HistoryLost::Fail,
            HistoryLostPolicy::Resnapshot => HistoryLost::Resnapshot,
        },
        delete_index_on_drop: spec.on_drop == DropPolicy::DeleteIndex,
        dead_letter_index: spec.dead_letter.index.clone(),
        checkpoint_interval: Duration::from_secs(1),
        shard: monsoon_engine::config::Shard::default(),
        mappings: spec.mappings.clone(),
        locations_index: monsoon_engine::sink::locations::DEFAULT_INDEX.into(),
        scripts: scripts_config(spec)?,
        time_machine: spec.time_machine.clone(),
        merge_patches: spec.merge_patches.clone(),
        relate: spec.relate.clone(),
    })
}

/// `spec.elasticsearch.aws`: static keys read now (from env or file), or the default chain.
fn aws_auth(aws: Option<&monsoon_api::AwsSigning>) -> Result<ElasticAuth, Error> {
    let Some(aws) = aws else {
        return Ok(ElasticAuth::None);
    };
    let credentials = match (&aws.access_key_id_from, &aws.secret_access_key_from) {
        (Some(id), Some(secret)) => AwsCredentials::Static {
            access_key_id: Secret(resolve(id, "spec.elasticsearch.aws.accessKeyIdFrom")?),
            secret_access_key: Secret(resolve(secret, "spec.elasticsearch.aws.secretAccessKeyFrom")?),
            session_token: match &aws.session_token_from {
                Some(token) => Some(Secret(resolve(token, "spec.elasticsearch.aws.sessionTokenFrom")?)),
                None => None,
            },
        },
        _ => AwsCredentials::DefaultChain,
    };
    Ok(ElasticAuth::Aws(AwsAuth {
        region: aws.region.clone(),
        service: aws.service.signing_name().to_string(),
        credentials,
    }))
}

/// Read and validate a pipeline file.
///
/// # Errors
/// A message naming the file and, for invalid pipelines, every field at fault.
pub fn load_pipeline(path: &Path) -> anyhow::Result<ValidatedPipeline> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("failed to read {}: {e}", path.display()))?;
    monsoon_api::parse_manifest(&text, monsoon_engine::check_connection_string).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(extra: &str) -> ValidatedPipeline {
        let yaml = format!(
            "apiVersion: monsoon.dev/v1alpha1\nkind: SyncPipeline\nmetadata: {{name: t}}\nspec:\n  mongodb:\n    uriFrom: {{env: MONSOON_TEST_URI_{extra}}}\n  elasticsearch:\n    urls: [\"http://h:9200\"]\n  namespaces: [\"a.b\", \"c.*\"]\n  excludeNamespaces: [\"c.x\"]\n"
        );
        monsoon_api::parse_manifest(&yaml, monsoon_engine::check_connection_string).expect("valid")
    }

    #[test]
    fn uri_comes_from_the_environment_and_routing_follows_the_spec() {
        std::env::set_var("MONSOON_TEST_URI_A", "mongodb://u:p@h/");
        let cfg = engine_config(&pipeline("A")).expect("config");
        assert_eq!(cfg.mongodb.uri.0, "mongodb://u:p@h/");
        assert!(cfg.routing.includes("a", "b"));
        assert!(cfg.routing.includes("c", "y"));
        assert!(!cfg.routing.includes("c", "x"));
        assert!(!cfg.routing.includes("a", "z"));
    }

    /// `monsoon validate` (this function) refuses what the MongoDB driver would, naming the
    /// file, the field and the fix, though the types crate carries no driver.
    #[test]
    fn validate_refuses_a_connection_string_the_driver_refuses() {
        let dir = std::env::temp_dir().join(format!("monsoon-validate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("kerberos.yaml");
        let yaml = "apiVersion: monsoon.dev/v1alpha1\nkind: SyncPipeline\nmetadata: {name: t}\nspec:\n  mongodb:\n    uri: \"mongodb://h:27017/?authMechanism=GSSAPI\"\n  elasticsearch:\n    urls: [\"http://h:9200\"]\n  namespaces: [\"a.b\"]\n";
        std::fs::write(&file, yaml).expect("write");
        let text = load_pipeline(&file).expect_err("refused").to_string();
        std::fs::remove_dir_all(&dir).expect("cleanup");
        assert!(text.contains("kerberos.yaml") && text.contains("spec.mongodb.uri") && text.contains("Kerberos"), "{text}");
    }

    #[test]
    fn missing_environment_variable_names_field_and_variable() {
        let err = engine_config(&pipeline("MISSING")).expect_err("missing");
        let text = err.to_string();
        assert!(text.contains("spec.mongodb.uriFrom") && text.contains("MONSOON_TEST_URI_MISSING"), "{text}");
    }
}
