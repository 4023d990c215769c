//! The connection-string check that validation runs before anything starts: the MongoDB
//! driver's own parser, so `monsoon validate`, the operator and `monsoon run` refuse what the
//! source would fail on, naming the field. It lives with the source, not in `crates/api` (the
//! types every crate shares), so that crate builds without the driver; validation receives it
//! as a [`monsoon_api::ConnectionStringCheck`].

use mongodb::error::ErrorKind;
use mongodb::options::ConnectionString;

/// Parse a connection string exactly as `monsoon run` and the workers will (the MongoDB
/// driver's own parser: options, their values, auth mechanisms and the credentials each
/// needs), without resolving `mongodb+srv` names or connecting. A
/// [`monsoon_api::ConnectionStringCheck`].
///
/// # Errors
/// What the driver refuses, with the fix where one is known. The message never repeats the
/// connection string (it may hold credentials when it came from a Secret or file).
pub fn check_connection_string(uri: &str) -> Result<(), String> {
    match ConnectionString::parse(uri) {
        Ok(_) => Ok(()),
        Err(e) => {
            let why = match &*e.kind {
                ErrorKind::InvalidArgument { message, .. } => message.clone(),
                _ => e.to_string(),
            };
            let why = why.replace(uri, "<connection string>");
            if why.contains("GSSAPI") {
                // Kerberos needs system libraries (libgssapi) the image does not carry.
                return Err("monsoon does not support Kerberos (`authMechanism=GSSAPI`); use SCRAM, X.509 (MONGODB-X509), MONGODB-AWS or MONGODB-OIDC".into());
            }
            Err(format!("the MongoDB driver refuses this connection string: {why}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_connection_string;

    const MINIMAL: &str = r#"
apiVersion: monsoon.dev/v1alpha1
kind: SyncPipeline
metadata:
  name: shop
spec:
  mongodb:
    uri: "mongodb://127.0.0.1:27017/?directConnection=true"
  elasticsearch:
    urls: ["http://127.0.0.1:9200"]
  namespaces: [shop.orders]
"#;

    fn with_uri(uri: &str) -> String {
        MINIMAL.replace("mongodb://127.0.0.1:27017/?directConnection=true", uri)
    }

    #[test]
    fn srv_and_aws_connection_strings_are_accepted_as_run_accepts_them() {
        for uri in [
            "mongodb+srv://cluster0.example.mongodb.net/?retryWrites=true&w=majority",
            "mongodb+srv://cluster0.example.mongodb.net/?authMechanism=MONGODB-AWS&authSource=%24external",
            "mongodb://db-0.db:27017/?replicaSet=rs0&tls=true&tlsCertificateKeyFile=/etc/tls/client.pem&authMechanism=MONGODB-X509",
        ] {
            let parsed = monsoon_api::parse_manifest(&with_uri(uri), check_connection_string);
            assert!(parsed.is_ok(), "{uri}: {:?}", parsed.err());
        }
    }

    #[test]
    fn a_connection_string_the_driver_refuses_is_refused_naming_the_field() {
        for (uri, says) in [
            ("mongodb://h:27017/?authMechanism=GSSAPI", "GSSAPI"),
            ("mongodb://h:27017/?replicaSet=rs0&wtimeoutMS=x", "wtimeoutms"),
            ("mongodb+srv://h.example.com:27017/", "port"),
        ] {
            let errs = match monsoon_api::parse_manifest(&with_uri(uri), check_connection_string) {
                Err(monsoon_api::ManifestError::Invalid(e)) => e,
                other => panic!("{uri}: expected Invalid, got {other:?}"),
            };
            assert_eq!(errs.len(), 1, "{uri}: {errs:?}");
            assert_eq!(errs[0].field, "spec.mongodb.uri");
            assert!(errs[0].message.to_lowercase().contains(&says.to_lowercase()), "{uri}: {}", errs[0].message);
        }
    }

    #[test]
    fn a_refusal_never_repeats_the_connection_string() {
        let uri = "mongodb://app@h:27017/?replicaSet=rs0&wtimeoutMS=x";
        let message = check_connection_string(uri).expect_err("a bad option value");
        assert!(!message.contains("app@"), "{message}");
    }
}
