//! Test certificates made with the machine's `openssl` command: a CA, a server certificate
//! for `127.0.0.1`/`localhost`, and a client certificate (certificate and key in one PEM, as
//! MongoDB's `tlsCertificateKeyFile` takes it). Valid for two days; made fresh per test.

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

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl").args(args).current_dir(dir).output().context("failed to run openssl")?;
    if !out.status.success() {
        bail!("openssl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Certs {
    /// Generate everything into `dir`.
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=monsoon test CA", "-keyout", "ca.key", "-out", "ca.pem"];
        ca.extend(ec);
        openssl(dir, &ca)?;
        for (name, cn, ext) in [
            ("server", "localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
            ("client", "monsoon", "extendedKeyUsage=clientAuth\n"),
        ] {
            let (key, csr, cert, extfile) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
            std::fs::write(dir.join(&extfile), ext)?;
            let subj = format!("/CN={cn}");
            let mut req = vec!["req", "-subj", subj.as_str(), "-keyout", key.as_str(), "-out", csr.as_str()];
            req.extend(ec);
            openssl(dir, &req)?;
            openssl(dir, &["x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-out", &cert, "-extfile", &extfile])?;
        }
        let client_pem = dir.join("client-with-key.pem");
        let mut both = std::fs::read(dir.join("client.pem"))?;
        both.extend(std::fs::read(dir.join("client.key"))?);
        std::fs::write(&client_pem, both)?;
        Ok(Self {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_pem,
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        })
    }
}
