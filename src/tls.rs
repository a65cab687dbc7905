//! TLS configurations from PEM files, with errors a user can act on: the listening side
//! (`--tls-cert`/`--tls-key`) and the upstream side (system roots, `--upstream-ca`,
//! `--upstream-insecure`). Both speak TLS 1.2 and 1.3 only and offer ALPN `http/1.1`.
//!
//! The crypto provider is *ring*: it builds with a C compiler alone (aws-lc-rs would need cmake).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, ring};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// A TLS file or setting that cannot be used; each names the flag and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {}: {error}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{flag} {}: not a valid PEM file: {error}", path.display())]
    Pem {
        flag: &'static str,
        path: PathBuf,
        error: rustls::pki_types::pem::Error,
    },
    #[error("{flag} {}: no certificate in it (expected PEM blocks of BEGIN CERTIFICATE)", path.display())]
    NoCertificate { flag: &'static str, path: PathBuf },
    #[error(
        "--tls-key {}: no private key in it ({error}); expected a PEM PKCS#8, RSA or EC private key",
        path.display()
    )]
    NoKey {
        path: PathBuf,
        error: rustls::pki_types::pem::Error,
    },
    #[error("--tls-key {} does not belong to the certificate in --tls-cert {}", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("--tls-key {}: {error}", path.display())]
    Key { path: PathBuf, error: rustls::Error },
    #[error("--upstream-ca {}: unusable certificate: {error}", path.display())]
    UnusableCa { path: PathBuf, error: rustls::Error },
    #[error("--upstream: {name} cannot be checked against a certificate: {error}")]
    ServerName {
        name: String,
        error: rustls::pki_types::InvalidDnsNameError,
    },
    #[error("TLS setup: {0}")]
    Setup(rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// Every certificate in a PEM file; an error names the flag, the file and the problem.
fn certificates(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = std::fs::read(path).map_err(|error| TlsError::Read {
        flag,
        path: path.to_owned(),
        error,
    })?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Pem {
            flag,
            path: path.to_owned(),
            error,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            flag,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The server side: a certificate chain and its private key (PKCS#8, PKCS#1 RSA or SEC1 EC).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates("--tls-cert", cert)?;
    let key_bytes = std::fs::read(key).map_err(|error| TlsError::Read {
        flag: "--tls-key",
        path: key.to_owned(),
        error,
    })?;
    let private = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|error| TlsError::NoKey {
        path: key.to_owned(),
        error,
    })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(TlsError::Setup)?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                key: key.to_owned(),
                cert: cert.to_owned(),
            },
            error => TlsError::Key {
                path: key.to_owned(),
                error,
            },
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// How the upstream's certificate is checked.
pub enum Trust<'a> {
    /// The system's roots, plus a private CA when given.
    Verify { extra_ca: Option<&'a Path> },
    /// Accept any certificate (`--upstream-insecure`).
    Insecure,
}

/// The client side, for `--upstream https://...`.
pub fn client_config(trust: Trust<'_>) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(TlsError::Setup)?;
    let mut config = match trust {
        Trust::Verify { extra_ca } => {
            let mut roots = RootCertStore::empty();
            // Unreadable system roots are not fatal: a private CA may be all that is needed.
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if let Some(path) = extra_ca {
                for cert in certificates("--upstream-ca", path)? {
                    roots.add(cert).map_err(|error| TlsError::UnusableCa {
                        path: path.to_owned(),
                        error,
                    })?;
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(
                ring::default_provider().signature_verification_algorithms,
            )))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The name the upstream's certificate must carry, and the SNI sent (none for an IP address).
pub fn server_name(host: &crate::config::Host) -> Result<ServerName<'static>, TlsError> {
    match host {
        crate::config::Host::Ip(ip) => Ok(ServerName::IpAddress((*ip).into())),
        crate::config::Host::Name(name) => {
            ServerName::try_from(name.clone()).map_err(|error| TlsError::ServerName {
                name: name.clone(),
                error,
            })
        }
    }
}

/// `--upstream-insecure`: any certificate is accepted, but the handshake signatures are still
/// checked, so the connection is at least encrypted to whoever holds the key it presented.
#[derive(Debug)]
struct AcceptAnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// A connection, plain or TLS: a client's to the shim, or the shim's to an https upstream.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A connection of either kind; one allocation per connection buys one type for both.
pub type Stream = Box<dyn Io>;

/// Why a TLS handshake with the upstream failed, in words, from the error tokio-rustls returns.
pub fn describe_upstream_failure(err: &std::io::Error, name: &str) -> (bool, String) {
    let rustls_error = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::InvalidCertificate(why)) => {
            let reason = match why {
                rustls::CertificateError::UnknownIssuer => {
                    "it is signed by a CA glance-shim does not trust".to_owned()
                }
                rustls::CertificateError::Expired
                | rustls::CertificateError::ExpiredContext { .. } => "it has expired".to_owned(),
                rustls::CertificateError::NotValidYet
                | rustls::CertificateError::NotValidYetContext { .. } => {
                    "it is not valid yet".to_owned()
                }
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. } => {
                    format!("it is not issued for {name}")
                }
                other => format!("{other:?}"),
            };
            (
                true,
                format!("the upstream's TLS certificate is not trusted for {name}: {reason}"),
            )
        }
        Some(other) => (
            false,
            format!("TLS handshake with the upstream ({name}) failed: {other}"),
        ),
        None => (
            false,
            format!(
                "TLS handshake with the upstream ({name}) failed: {err} (does it speak https?)"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn tempdir() -> std::path::PathBuf {
        use std::hash::{BuildHasher, RandomState};
        let dir = std::env::temp_dir().join(format!(
            "glance-shim-tls-{}",
            RandomState::new().hash_one(0u8)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn good_pairs_of_every_key_kind_load() {
        let dir = tempdir();
        // EC and Ed25519 keys in PKCS#8 (SEC1 EC and PKCS#1 RSA below).
        for alg in [&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_ED25519] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            let c = write(&dir, "c.pem", &cert.pem());
            let k = write(&dir, "k.pem", &key.serialize_pem());
            server_config(&c, &k).unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        }
        // RSA: ring cannot make RSA keys, openssl can (in PKCS#8 for rcgen, PKCS#1 for the shim).
        let pkcs8 = dir.join("rsa8.pem");
        let pkcs1 = dir.join("rsa1.pem");
        let ok =
            |cmd: &mut std::process::Command| cmd.status().map(|s| s.success()).unwrap_or(false);
        assert!(
            ok(std::process::Command::new("openssl")
                .args(["genrsa", "-out"])
                .arg(&pkcs8)
                .arg("2048")),
            "openssl is needed to make an RSA test key"
        );
        assert!(ok(std::process::Command::new("openssl")
            .args(["rsa", "-traditional", "-in"])
            .arg(&pkcs8)
            .arg("-out")
            .arg(&pkcs1)));
        let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&pkcs8).unwrap()).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let c = write(&dir, "rsa-cert.pem", &cert.pem());
        assert!(
            std::fs::read_to_string(&pkcs1)
                .unwrap()
                .contains("BEGIN RSA PRIVATE KEY")
        );
        server_config(&c, &pkcs1).unwrap();
        server_config(&c, &pkcs8).unwrap();

        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&ec)
            .unwrap();
        let ec8 = write(&dir, "ec8.pem", &ec.serialize_pem());
        let sec1 = dir.join("sec1.pem");
        assert!(ok(std::process::Command::new("openssl")
            .args(["ec", "-in"])
            .arg(&ec8)
            .arg("-out")
            .arg(&sec1)));
        assert!(
            std::fs::read_to_string(&sec1)
                .unwrap()
                .contains("BEGIN EC PRIVATE KEY")
        );
        server_config(&write(&dir, "ec-cert.pem", &cert.pem()), &sec1).unwrap();
    }

    #[test]
    fn bad_files_name_the_flag_the_file_and_the_problem() {
        let dir = tempdir();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let c = write(&dir, "c.pem", &cert.pem());
        let k = write(&dir, "k.pem", &key.serialize_pem());
        let k2 = write(&dir, "other.pem", &other.serialize_pem());
        let junk = write(&dir, "junk.pem", "hello\n");

        let e = server_config(&dir.join("missing.pem"), &k)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--tls-cert ") && e.contains("missing.pem") && e.contains("No such file"),
            "{e}"
        );
        let e = server_config(&junk, &k).unwrap_err().to_string();
        assert!(
            e.starts_with("--tls-cert ") && e.contains("no certificate"),
            "{e}"
        );
        let e = server_config(&c, &junk).unwrap_err().to_string();
        assert!(
            e.starts_with("--tls-key ") && e.contains("no private key"),
            "{e}"
        );
        let e = server_config(&c, &c).unwrap_err().to_string();
        assert!(
            e.starts_with("--tls-key ") && e.contains("no private key"),
            "a certificate is not a key: {e}"
        );
        let e = server_config(&c, &k2).unwrap_err().to_string();
        assert!(e.contains("does not belong to the certificate"), "{e}");
        let e = client_config(Trust::Verify {
            extra_ca: Some(&junk),
        })
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.starts_with("--upstream-ca ") && e.contains("no certificate"),
            "{e}"
        );
        assert!(client_config(Trust::Verify { extra_ca: Some(&c) }).is_ok());
        assert!(client_config(Trust::Insecure).is_ok());
    }
}
