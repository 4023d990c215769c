//! Connection options: MongoDB and Elasticsearch addresses, credentials, CA files, and bulk
//! batching. Credentials and environment placeholders become environment variable references
//! where the pipeline format has one (`uriFrom`, `passwordFrom`); where it has none (URLs,
//! user names, file paths) a placeholder is refused, naming the option and the fix.

use monsoon_api::{AwsService, AwsSigning, ElasticsearchSink, MongoSource, SyncPipelineSpec, ValueFrom};
use toml::Table;

use super::{boolean, integer, string, strings, Error, Notes};

/// Environment variable the converted pipeline reads a credential-bearing MongoDB URI from.
pub const ENV_MONGODB_URI: &str = "MONSOON_MONGODB_URI";
/// Environment variable the converted pipeline reads the Elasticsearch password from.
pub const ENV_ES_PASSWORD: &str = "MONSOON_ES_PASSWORD";
/// Environment variables the converted pipeline reads `[aws-connect]`'s static keys from.
pub const ENV_AWS_ACCESS_KEY_ID: &str = "MONSOON_AWS_ACCESS_KEY_ID";
/// See [`ENV_AWS_ACCESS_KEY_ID`].
pub const ENV_AWS_SECRET_ACCESS_KEY: &str = "MONSOON_AWS_SECRET_ACCESS_KEY";

/// Connection and batching options into `spec`.
pub(super) fn convert(table: &Table, spec: &mut SyncPipelineSpec, notes: &mut Notes) -> Result<(), Error> {
    mongodb(table, spec, notes)?;
    elasticsearch(table, spec, notes)?;
    aws(table, spec, notes)?;
    batching(table, spec, notes)
}

fn env(name: &str) -> ValueFrom {
    ValueFrom { env: Some(name.into()), ..ValueFrom::default() }
}

fn file(path: String) -> ValueFrom {
    ValueFrom { file: Some(path), ..ValueFrom::default() }
}

/// The variable a value names when it is nothing but a reference to one: `${NAME}` (any
/// case), or `$NAME` in upper case (the convention; `$ecret` may well be a password).
fn env_reference(value: &str) -> Option<&str> {
    let name = match value.strip_prefix("${") {
        Some(rest) => rest.strip_suffix('}')?,
        None => value.strip_prefix('$').filter(|n| n.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'))?,
    };
    let valid = name.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_') && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    valid.then_some(name)
}

/// The first placeholder in a value, as published configurations write them: `<mongodb-url>`,
/// `${VAR}`, `$VAR` (upper case), `*elastic-host*`.
pub(super) fn placeholder(value: &str) -> Option<&str> {
    for (i, c) in value.char_indices() {
        let rest = &value[i..];
        let found = match c {
            '<' => rest.find('>').filter(|&end| end > 1).map(|end| &rest[..=end]),
            '$' if rest.starts_with("${") => rest.find('}').filter(|&end| end > 2).map(|end| &rest[..=end]),
            '$' => {
                let name = &rest[1..];
                let len = name.bytes().take_while(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'_').count();
                let starts = name.bytes().next().is_some_and(|b| b.is_ascii_uppercase() || b == b'_');
                starts.then(|| &rest[..=len])
            }
            '*' => {
                let len = rest[1..].bytes().take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')).count();
                (len > 0 && rest[1 + len..].starts_with('*')).then(|| &rest[..len + 2])
            }
            _ => None,
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

/// Refuse a placeholder in an option the pipeline reads literally.
fn literal(option: &str, value: &str, what: &str) -> Result<(), Error> {
    match placeholder(value) {
        Some(p) => Err(Error::unusable(option, format!("`{p}` is a placeholder, and monsoon reads {what} as written (no environment variables there): write the real value"))),
        None => Ok(()),
    }
}

/// Whether a connection string carries a password (`user:password@`).
fn has_password(uri: &str) -> bool {
    let rest = uri.split_once("://").map_or(uri, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    authority.rsplit_once('@').is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

fn mongodb(table: &Table, spec: &mut SyncPipelineSpec, notes: &mut Notes) -> Result<(), Error> {
    const OPTION: &str = "mongo-url";
    let uri = string(table, OPTION)?.unwrap_or_else(|| "mongodb://localhost:27017".into());
    spec.mongodb = if let Some(var) = env_reference(&uri) {
        notes.add(OPTION, format!("read from environment variable {var} (`{uri}` in the file); set it when running monsoon (in a cluster, use `uriFrom.secretKeyRef`)"));
        MongoSource { uri_from: Some(env(var)), ..MongoSource::default() }
    } else if let Some(p) = placeholder(&uri) {
        notes.add(OPTION, format!("holds the placeholder `{p}`, so it is not copied: set environment variable {ENV_MONGODB_URI} to the whole connection string, filled in (in a cluster, use `uriFrom.secretKeyRef`)"));
        MongoSource { uri_from: Some(env(ENV_MONGODB_URI)), ..MongoSource::default() }
    } else if has_password(&uri) {
        notes.add(OPTION, format!("holds a password, so it is not copied: set environment variable {ENV_MONGODB_URI} to it (in a cluster, use `uriFrom.secretKeyRef`)"));
        MongoSource { uri_from: Some(env(ENV_MONGODB_URI)), ..MongoSource::default() }
    } else if !(uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://")) {
        return Err(Error::unusable(OPTION, "is not a MongoDB connection string: write `mongodb://host:27017` (or `mongodb+srv://...`)"));
    } else {
        monsoon_engine::check_connection_string(&uri).map_err(|m| Error::unusable(OPTION, m))?;
        MongoSource { uri: Some(uri), ..MongoSource::default() }
    };
    if let Some(pem) = string(table, "mongo-pem-file")? {
        literal("mongo-pem-file", &pem, "file paths")?;
        spec.mongodb.ca_from = Some(file(pem));
    }
    if boolean(table, "mongo-validate-pem-file")? == Some(false) {
        notes.add("mongo-validate-pem-file", "monsoon verifies MongoDB's certificate; to relax host name checks add `tlsAllowInvalidHostnames=true` to the connection string");
    }
    Ok(())
}

/// An Elasticsearch URL with its user name and password taken out.
struct Url {
    url: String,
    user: Option<String>,
    password: Option<String>,
}

/// Split `https://user:pass@host:9200/path` into the URL without credentials and them.
fn split_credentials(url: &str) -> Url {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return Url { url: url.to_string(), user: None, password: None };
    };
    let (user, password) = match userinfo.split_once(':') {
        Some((u, p)) => (u, Some(percent_decode(p))),
        None => (userinfo, None),
    };
    let prefix = if scheme.is_empty() { String::new() } else { format!("{scheme}://") };
    Url { url: format!("{prefix}{host}{path}"), user: (!user.is_empty()).then(|| percent_decode(user)), password }
}

/// `%40` → `@`: URL user info is percent-encoded.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn elasticsearch(table: &Table, spec: &mut SyncPipelineSpec, notes: &mut Notes) -> Result<(), Error> {
    const URLS: &str = "elasticsearch-urls";
    let mut urls = strings(table, URLS)?;
    if urls.is_empty() {
        urls.push("http://localhost:9200".into());
    }
    let mut user = string(table, "elasticsearch-user")?;
    if let Some(u) = &user {
        if env_reference(u).is_some() || placeholder(u).is_some() {
            return Err(Error::unusable("elasticsearch-user", "is a placeholder, and monsoon reads the user name as written (only the password comes from the environment): write the user name"));
        }
    }
    let mut password = string(table, "elasticsearch-password")?.map(|p| (p, "elasticsearch-password"));
    let mut plain = Vec::with_capacity(urls.len());
    for raw in &urls {
        let Url { url, user: url_user, password: url_password } = split_credentials(raw);
        if let Some(u) = url_user {
            if env_reference(&u).is_some() || placeholder(&u).is_some() {
                return Err(Error::unusable(URLS, format!("the user name in `{url}` is a placeholder, and monsoon reads the user name as written: write it into `elasticsearch-user` and leave the URL without credentials")));
            }
            match &user {
                Some(other) if *other != u => {
                    return Err(Error::unusable(URLS, format!("`{url}` names user `{u}`, another URL or `elasticsearch-user` names `{other}`: monsoon uses one user for the cluster; keep one")));
                }
                _ => user = Some(u),
            }
            notes.add(URLS, format!("the credentials in `{url}` are moved out of the URL: `username` and `passwordFrom`"));
        }
        if let Some(p) = url_password {
            password = Some((p, URLS));
        }
        literal(URLS, &url, "Elasticsearch URLs")?;
        let url = if url.contains("://") {
            url
        } else {
            notes.add(URLS, format!("`{url}` has no scheme; using `http://{url}` (as Monstache's client did)"));
            format!("http://{url}")
        };
        plain.push(url);
    }
    spec.elasticsearch = ElasticsearchSink { urls: plain, ..ElasticsearchSink::default() };
    match (user, password) {
        (Some(user), Some((password, from))) => {
            let var = env_reference(&password).unwrap_or(ENV_ES_PASSWORD);
            spec.elasticsearch.username = Some(user);
            spec.elasticsearch.password_from = Some(env(var));
            notes.add(from, format!("never copied: set environment variable {var} to the password (in a cluster, use `passwordFrom.secretKeyRef`)"));
        }
        (Some(user), None) => {
            // Monstache then sends the user with an empty password; monsoon needs a source.
            spec.elasticsearch.username = Some(user);
            spec.elasticsearch.password_from = Some(env(ENV_ES_PASSWORD));
            notes.add("elasticsearch-user", format!("has no password in the configuration: set environment variable {ENV_ES_PASSWORD} to it"));
        }
        (None, Some((_, from))) => notes.add(from, "ignored: no user name is set (`elasticsearch-user`)"),
        (None, None) => {}
    }
    if let Some(pem) = string(table, "elasticsearch-pem-file")? {
        literal("elasticsearch-pem-file", &pem, "file paths")?;
        spec.elasticsearch.ca_from = Some(file(pem));
    }
    if boolean(table, "elasticsearch-validate-pem-file")? == Some(false) {
        notes.add("elasticsearch-validate-pem-file", "monsoon always verifies Elasticsearch's certificate; give its CA with `elasticsearch.caFrom`");
    }
    spec.elasticsearch.gzip = boolean(table, "gzip")?.unwrap_or(false);
    Ok(())
}

/// `[aws-connect]`: SigV4 signing (`spec.elasticsearch.aws`). Static keys become environment
/// references (never copied); Monstache's other strategies (file, environment, endpoint,
/// chained) are all covered by the default AWS credentials chain, with notes on how to point
/// it at a profile or credentials file.
fn aws(table: &Table, spec: &mut SyncPipelineSpec, notes: &mut Notes) -> Result<(), Error> {
    const AWS: &str = "[aws-connect]";
    let Some(value) = table.get("aws-connect") else { return Ok(()) };
    let aws = value.as_table().ok_or(Error::Type { option: AWS.into(), expected: "a table ([aws-connect])" })?;
    let option = |key: &str| format!("{AWS}.{key}");
    let text = |key: &str| string(aws, key).map_err(|_| Error::Type { option: option(key), expected: "a string" });
    let access_key = text("access-key")?.filter(|k| !k.is_empty());
    let secret_key = text("secret-key")?.filter(|k| !k.is_empty());
    let strategy = match aws.get("strategy") {
        None => 0,
        Some(toml::Value::Integer(n)) => *n,
        Some(_) => return Err(Error::Type { option: option("strategy"), expected: "an integer (0 static, 1 file, 2 environment, 3 endpoint, 4 chained)" }),
    };
    // Monstache signs only with static keys given, or another strategy chosen.
    if strategy == 0 && access_key.is_none() && secret_key.is_none() {
        notes.add(AWS, "ignored: no `access-key`/`secret-key` and `strategy` 0 (static), so Monstache did not sign requests either");
        return Ok(());
    }
    let region = text("region")?.filter(|r| !r.is_empty()).ok_or_else(|| {
        Error::unusable(option("region"), "is required to sign requests: the AWS region of the domain, e.g. `us-east-1`")
    })?;
    literal(&option("region"), &region, "the region")?;
    let mut signing = AwsSigning { region, service: AwsService::Es, ..AwsSigning::default() };
    if spec.elasticsearch.urls.iter().any(|u| u.contains(".aoss.amazonaws.com")) {
        signing.service = AwsService::Aoss;
        notes.add(AWS, "the URL is an OpenSearch Serverless collection: requests are signed for service `aoss`");
    }
    match strategy {
        0 => {
            let (Some(id), Some(secret)) = (access_key, secret_key) else {
                return Err(Error::unusable(AWS, "must include both `access-key` and `secret-key` (or neither, with another `strategy`)"));
            };
            for (key, value, default, field) in [
                ("access-key", id, ENV_AWS_ACCESS_KEY_ID, &mut signing.access_key_id_from),
                ("secret-key", secret, ENV_AWS_SECRET_ACCESS_KEY, &mut signing.secret_access_key_from),
            ] {
                let var = env_reference(&value).unwrap_or(default);
                *field = Some(env(var));
                notes.add(option(key), format!("never copied: set environment variable {var} to it (in a cluster, use a Secret: `aws.{}From.secretKeyRef`; on EKS, IRSA needs no keys at all)", if key == "access-key" { "accessKeyId" } else { "secretAccessKey" }));
            }
        }
        1..=4 => {
            let what = match strategy {
                1 => "the shared credentials file",
                2 => "the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN)",
                3 => "the ECS container or EC2 instance metadata endpoint",
                _ => "the chain of environment, files and metadata endpoints",
            };
            notes.add(option("strategy"), format!("{strategy}: credentials from {what}, through the default AWS credentials chain (which also covers web identity: IRSA on EKS)"));
            for key in ["access-key", "secret-key"] {
                if aws.contains_key(key) {
                    notes.add(option(key), format!("ignored: `strategy` {strategy} does not use static keys"));
                }
            }
        }
        other => return Err(Error::unusable(option("strategy"), format!("{other} is not a Monstache strategy: use 0 (static), 1 (file), 2 (environment), 3 (endpoint) or 4 (chained)"))),
    }
    if let Some(profile) = text("profile")?.filter(|p| !p.is_empty()) {
        notes.add(option("profile"), format!("set environment variable AWS_PROFILE={profile} for monsoon (the default chain reads it)"));
    }
    if let Some(file) = text("credentials-file")?.filter(|f| !f.is_empty()) {
        notes.add(option("credentials-file"), format!("set environment variable AWS_SHARED_CREDENTIALS_FILE={file} for monsoon (the default chain reads it)"));
    }
    for key in ["watch-credentials", "credentials-watch-dir", "force-expire"] {
        if aws.contains_key(key) {
            notes.add(option(key), "not needed: credentials from the default chain are refreshed 5 minutes before they expire, and ones without an expiry (a credentials file) are read again every 5 minutes");
        }
    }
    const KNOWN: &[&str] = &["access-key", "secret-key", "region", "strategy", "profile", "credentials-file", "watch-credentials", "credentials-watch-dir", "force-expire"];
    for key in aws.keys().filter(|k| !KNOWN.contains(&k.as_str())) {
        notes.add(option(key), "not a Monstache option monsoon knows; ignored");
    }
    let es = &mut spec.elasticsearch;
    if es.username.is_some() {
        es.username = None;
        es.password_from = None;
        notes.0.retain(|n| !matches!(n.option.as_str(), "elasticsearch-user" | "elasticsearch-password"));
        notes.add("elasticsearch-user", "ignored: requests are signed with AWS credentials ([aws-connect]), which replace basic authentication (fine-grained access control maps the IAM identity to users)");
    }
    es.aws = Some(signing);
    Ok(())
}

fn batching(table: &Table, spec: &mut SyncPipelineSpec, notes: &mut Notes) -> Result<(), Error> {
    if let Some(n) = integer(table, "elasticsearch-max-docs")? {
        spec.batch.max_docs = u32::try_from(n.clamp(1, 100_000)).unwrap_or(1000);
    }
    if let Some(n) = integer(table, "elasticsearch-max-bytes")? {
        let clamped = n.clamp(64 * 1024, 100 * 1024 * 1024);
        if clamped != n {
            notes.add("elasticsearch-max-bytes", format!("{n} is outside 64 KiB–100 MiB; using {clamped}"));
        }
        spec.batch.max_bytes = u64::try_from(clamped).unwrap_or(8 << 20);
    }
    if let Some(n) = integer(table, "elasticsearch-max-seconds")? {
        let ms = n.saturating_mul(1000).clamp(1, 60_000);
        spec.batch.flush_interval_ms = u64::try_from(ms).unwrap_or(100);
    }
    if let Some(n) = integer(table, "elasticsearch-max-conns")? {
        spec.batch.concurrency = u32::try_from(n.clamp(1, 64)).unwrap_or(4);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_as_published_configurations_write_them() {
        assert_eq!(placeholder("<mongodb-url>"), Some("<mongodb-url>"));
        assert_eq!(placeholder("mongodb://admin:$MONGOPASSWORD@db:27017"), Some("$MONGOPASSWORD"));
        assert_eq!(placeholder("https://${ES_HOST}:9200"), Some("${ES_HOST}"));
        assert_eq!(placeholder("http://*elastic-host*:9200"), Some("*elastic-host*"));
        assert_eq!(placeholder("mongodb://db-0:27017/?replicaSet=rs0"), None);
        assert_eq!(placeholder("pa$sword"), None, "a lower-case `$` word is text");
        assert_eq!(env_reference("${ES_PASSWORD}"), Some("ES_PASSWORD"));
        assert_eq!(env_reference("$MONGO_URL"), Some("MONGO_URL"));
        assert_eq!(env_reference("$ecret"), None);
        assert_eq!(env_reference("mongodb://$X@h"), None);
    }

    #[test]
    fn credentials_are_split_out_of_urls() {
        let u = split_credentials("https://elastic:p%40ss@es.example:9200/prefix");
        assert_eq!((u.url.as_str(), u.user.as_deref(), u.password.as_deref()), ("https://es.example:9200/prefix", Some("elastic"), Some("p@ss")));
        let u = split_credentials("http://es:9200");
        assert_eq!((u.url.as_str(), u.user, u.password), ("http://es:9200", None, None));
    }
}
