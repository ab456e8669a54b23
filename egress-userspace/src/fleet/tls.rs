//! A client's etcd credentials: the fleet's CA, a client certificate and its key, each checked
//! before any connection so that an error names the file (the TLS handshake alone says only
//! "handshake failed").

use std::path::{Path, PathBuf};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject as _};

/// The files of one identity, as `egress fleet init` writes them in its directory.
pub const CA_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "client.crt";
pub const KEY_FILE: &str = "client.key";

/// Checked credentials, in PEM as the client takes them.
#[derive(Clone)]
pub struct Credentials {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// The certificate's common name: the etcd user it authenticates as.
    pub user: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("etcd TLS {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("etcd TLS {what} {path}: {detail}")]
    Content {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("etcd client certificate {path} expired at {not_after} (now {now})")]
    Expired {
        path: PathBuf,
        not_after: String,
        now: String,
    },
    #[error("etcd client certificate {path} is not valid before {not_before} (now {now})")]
    NotYetValid {
        path: PathBuf,
        not_before: String,
        now: String,
    },
    #[error("etcd client certificate {cert} is not signed by the CA in {ca} (another fleet's?)")]
    OtherCa { cert: PathBuf, ca: PathBuf },
    #[error("etcd client certificate {cert} was refused against the CA in {ca}: {detail}")]
    Refused {
        cert: PathBuf,
        ca: PathBuf,
        detail: String,
    },
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, CredentialError> {
    std::fs::read(path).map_err(|source| CredentialError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn when(t: UnixTime) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.as_secs());
    humantime::format_rfc3339_seconds(at).to_string()
}

impl Credentials {
    /// Reads and checks the three files: each readable PEM, the certificate signed by the CA,
    /// valid now, and usable for client authentication.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, CredentialError> {
        let ca_pem = read("CA file", ca)?;
        let cert_pem = read("certificate", cert)?;
        let key_pem = read("key", key)?;
        let content = |what, path: &Path, detail: String| CredentialError::Content {
            what,
            path: path.to_path_buf(),
            detail,
        };
        let cas: Vec<CertificateDer> = CertificateDer::pem_slice_iter(&ca_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| content("CA file", ca, format!("not PEM certificates: {e}")))?;
        if cas.is_empty() {
            return Err(content("CA file", ca, "holds no certificate".into()));
        }
        let chain: Vec<CertificateDer> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| content("certificate", cert, format!("not PEM: {e}")))?;
        let Some(leaf) = chain.first() else {
            return Err(content("certificate", cert, "holds no certificate".into()));
        };
        PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| content("key", key, format!("no PEM private key: {e}")))?;
        // The key must be the certificate's (a rotation half-done leaves them apart).
        if let Ok(pair) = rcgen::KeyPair::from_pem(&String::from_utf8_lossy(&key_pem)) {
            use rcgen::PublicKeyData as _;
            let spki = x509_parser::parse_x509_certificate(leaf.as_ref())
                .map(|(_, c)| c.tbs_certificate.subject_pki.raw.to_vec())
                .unwrap_or_default();
            if spki != pair.subject_public_key_info() {
                return Err(content(
                    "key",
                    key,
                    format!("is not the key of the certificate {}", cert.display()),
                ));
            }
        }
        let anchors = cas
            .iter()
            .map(|c| webpki::anchor_from_trusted_cert(c).map(|a| a.to_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| content("CA file", ca, format!("not a usable CA certificate: {e}")))?;
        let end = webpki::EndEntityCert::try_from(leaf)
            .map_err(|e| content("certificate", cert, format!("not a certificate: {e}")))?;
        let now = UnixTime::now();
        let verified = end.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &chain[1..],
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        );
        match verified {
            Ok(_) => {}
            Err(webpki::Error::CertExpired { not_after, .. }) => {
                return Err(CredentialError::Expired {
                    path: cert.to_path_buf(),
                    not_after: when(not_after),
                    now: when(now),
                });
            }
            Err(webpki::Error::CertNotValidYet { not_before, .. }) => {
                return Err(CredentialError::NotYetValid {
                    path: cert.to_path_buf(),
                    not_before: when(not_before),
                    now: when(now),
                });
            }
            // Another CA: unknown by name, or one of the same name with another key.
            Err(webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey) => {
                return Err(CredentialError::OtherCa {
                    cert: cert.to_path_buf(),
                    ca: ca.to_path_buf(),
                });
            }
            Err(e) => {
                return Err(CredentialError::Refused {
                    cert: cert.to_path_buf(),
                    ca: ca.to_path_buf(),
                    detail: format!("{e:?}"),
                });
            }
        }
        let user = common_name(leaf)
            .ok_or_else(|| content("certificate", cert, "has no common name (CN)".into()))?;
        Ok(Self {
            ca_pem,
            cert_pem,
            key_pem,
            user,
        })
    }
}

/// The subject's common name.
fn common_name(cert: &CertificateDer) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}
