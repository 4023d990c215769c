//! Test certificates made with the machine's `openssl` command: a CA, a server certificate
//! for `127.0.0.1`/`localhost`, and a client certificate (certificate and key in one PEM, as
//! MongoDB's `tlsCertificateKeyFile` takes it). Valid for two days; made fresh per test.
//! [`Ca`] issues certificates with any subject and extensions (the control plane's serving
//! and client certificates, `crate::control_plane`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// Paths of the generated files.
pub struct Certs {
    /// CA certificate (PEM).
    pub ca: PathBuf,
    /// Server certificate (PEM).
    pub server_cert: PathBuf,
    /// Server key (PEM).
    pub server_key: PathBuf,
    /// Client certificate followed by its key (PEM).
    pub client_pem: PathBuf,
    /// Client certificate alone (PEM).
    pub client_cert: PathBuf,
    /// Client key alone (PEM).
    pub client_key: PathBuf,
}

/// Run `openssl args...` in `dir`; fails with its standard error.
pub fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl").args(args).current_dir(dir).output().context("failed to run openssl")?;
    if !out.status.success() {
        bail!("openssl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Elliptic-curve keys (P-256): quick to make, and every client here takes them.
const EC_KEY: [&str; 5] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];

/// A certificate authority whose files live in one directory, issuing certificates there.
pub struct Ca {
    dir: PathBuf,
    name: String,
    /// CA certificate (PEM).
    pub cert: PathBuf,
    /// CA key (PEM).
    pub key: PathBuf,
}

impl Ca {
    /// Make `<dir>/<name>.pem` and `<dir>/<name>.key`, a self-signed CA with `subject`
    /// (openssl's `/CN=.../O=...` form).
    pub fn new(dir: &Path, name: &str, subject: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let (key, cert) = (format!("{name}.key"), format!("{name}.pem"));
        let mut args = vec!["req", "-x509", "-days", "2", "-subj", subject, "-keyout", &key, "-out", &cert];
        args.extend(EC_KEY);
        openssl(dir, &args)?;
        Ok(Self { dir: dir.to_path_buf(), name: name.to_string(), cert: dir.join(cert), key: dir.join(key) })
    }

    /// Issue `<name>.pem` and `<name>.key` in the CA's directory for `subject` with
    /// `extensions` (lines of an openssl extension file, e.g.
    /// `subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n`); returns (cert, key).
    pub fn issue(&self, name: &str, subject: &str, extensions: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let dir = &self.dir;
        let (key, csr, cert, extfile) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
        std::fs::write(dir.join(&extfile), extensions)?;
        let mut req = vec!["req", "-subj", subject, "-keyout", key.as_str(), "-out", csr.as_str()];
        req.extend(EC_KEY);
        openssl(dir, &req)?;
        // openssl runs in the CA's directory: name its files relative to it.
        let (ca_cert, ca_key) = (format!("{}.pem", self.name), format!("{}.key", self.name));
        openssl(dir, &["x509", "-req", "-in", &csr, "-CA", &ca_cert, "-CAkey", &ca_key, "-CAcreateserial", "-days", "2", "-out", &cert, "-extfile", &extfile])?;
        Ok((dir.join(cert), dir.join(key)))
    }
}

impl Certs {
    /// Generate everything into `dir`.
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        let ca = Ca::new(dir, "ca", "/CN=monsoon test CA")?;
        let (server_cert, server_key) = ca.issue("server", "/CN=localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")?;
        let (client_cert, client_key) = ca.issue("client", "/CN=monsoon", "extendedKeyUsage=clientAuth\n")?;
        let client_pem = dir.join("client-with-key.pem");
        let mut both = std::fs::read(&client_cert)?;
        both.extend(std::fs::read(&client_key)?);
        std::fs::write(&client_pem, both)?;
        Ok(Self { ca: ca.cert, server_cert, server_key, client_pem, client_cert, client_key })
    }
}
