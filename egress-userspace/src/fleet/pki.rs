//! `egress fleet init`'s certificates: the fleet's CA, one certificate for the etcd members
//! (server and peer), and one client identity per role. Each identity is a directory holding
//! `ca.crt`, `client.crt` and `client.key`, what `--etcd-tls DIR` takes.
//!
//! The CA is made once and reused: its subject is fixed, so a CA key read back from `ca.key`
//! signs certificates that chain to the `ca.crt` written at first.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::tls::{CA_FILE, CERT_FILE, KEY_FILE};

pub const CA_KEY_FILE: &str = "ca.key";
/// The etcd members' certificate and key, in `<ca dir>/member/`.
pub const MEMBER_DIR: &str = "member";
pub const MEMBER_CERT: &str = "member.crt";
pub const MEMBER_KEY: &str = "member.key";

/// The etcd users (certificate common names) and where their identities live.
pub const ROOT_USER: &str = "root";
pub const PUBLISHER_USER: &str = "egress-publisher";
pub const READER_USER: &str = "egress-reader";

pub fn agent_user(server: &str) -> String {
    format!("egress-agent-{server}")
}

/// Directory of an identity under the CA directory.
pub fn identity_dir(ca_dir: &Path, user: &str) -> PathBuf {
    match user.strip_prefix("egress-agent-") {
        Some(server) => ca_dir.join("agents").join(server),
        None => ca_dir.join(user.strip_prefix("egress-").unwrap_or(user)),
    }
}

/// Every identity of a fleet of `servers`.
pub fn users(servers: &[String]) -> Vec<String> {
    let mut u = vec![
        ROOT_USER.to_string(),
        PUBLISHER_USER.to_string(),
        READER_USER.to_string(),
    ];
    u.extend(servers.iter().map(|s| agent_user(s)));
    u
}

const CA_NAME: &str = "egress fleet CA";

fn ca_params(days: u32) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, CA_NAME);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    valid_for(&mut p, 0, days);
    p
}

/// Validity from `from_days` (may be negative: an expired certificate for tests) for `days`.
fn valid_for(p: &mut CertificateParams, from_days: i64, days: u32) {
    let now = super::unix_now() as i64;
    let at = |d: i64| {
        time::OffsetDateTime::from_unix_timestamp(now + d * 86_400)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    };
    // A little slack before now: clocks across a fleet differ.
    p.not_before = at(from_days) - time::Duration::hours(1);
    p.not_after = at(from_days + i64::from(days));
}

/// The CA of `dir`: read back, or made when absent (or `renew`).
/// The CA directory holds every identity's key: only its owner may enter it. Ship each server
/// only its own `agents/<server>/`.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", dir.display()))
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    pub created: bool,
}

pub fn ca(dir: &Path, renew: bool) -> anyhow::Result<Ca> {
    let cert = dir.join(CA_FILE);
    let key = dir.join(CA_KEY_FILE);
    if cert.exists() && !renew {
        let pem = std::fs::read_to_string(&key)
            .with_context(|| format!("reading the CA key {}", key.display()))?;
        let kp = KeyPair::from_pem(&pem)
            .with_context(|| format!("{}: not a PEM private key", key.display()))?;
        let ca_pem = std::fs::read_to_string(&cert)
            .with_context(|| format!("reading the CA certificate {}", cert.display()))?;
        return Ok(Ca {
            issuer: Issuer::new(ca_params(3650), kp),
            ca_pem,
            created: false,
        });
    }
    create_private_dir(dir)?;
    let kp = KeyPair::generate()?;
    let params = ca_params(3650);
    let c = params.self_signed(&kp)?;
    write_private(&key, &kp.serialize_pem())?;
    write_public(&cert, &c.pem())?;
    Ok(Ca {
        issuer: Issuer::new(params, kp),
        ca_pem: c.pem(),
        created: true,
    })
}

/// Writes a file whole: a temporary file beside it (created with `mode`), then renamed over it,
/// so that a reader never sees half a certificate or key.
fn write_file(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    write_file(path, text, 0o600)
}

fn write_public(path: &Path, text: &str) -> anyhow::Result<()> {
    write_file(path, text, 0o644)
}

impl Ca {
    /// Issues a client certificate for `user` into its identity directory (with a copy of the
    /// CA), valid from `from_days` for `days`.
    pub fn issue_client(
        &self,
        ca_dir: &Path,
        user: &str,
        from_days: i64,
        days: u32,
    ) -> anyhow::Result<PathBuf> {
        let dir = identity_dir(ca_dir, user);
        self.issue_into(&dir, user, from_days, days)?;
        Ok(dir)
    }

    /// A client identity `user` in `dir`.
    pub fn issue_into(
        &self,
        dir: &Path,
        user: &str,
        from_days: i64,
        days: u32,
    ) -> anyhow::Result<()> {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, user);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        valid_for(&mut p, from_days, days);
        let kp = KeyPair::generate()?;
        let c = p.signed_by(&kp, &self.issuer)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_public(&dir.join(CA_FILE), &self.ca_pem)?;
        write_private(&dir.join(KEY_FILE), &kp.serialize_pem())?;
        write_public(&dir.join(CERT_FILE), &c.pem())?;
        Ok(())
    }

    /// The members' certificate: server and client (peer) use, for every member address.
    pub fn issue_member(&self, ca_dir: &Path, hosts: &[IpAddr], days: u32) -> anyhow::Result<()> {
        let dir = ca_dir.join(MEMBER_DIR);
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, "egress etcd member");
        p.subject_alt_names = hosts.iter().map(|h| SanType::IpAddress(*h)).collect();
        p.subject_alt_names
            .push(SanType::DnsName("localhost".try_into()?));
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        valid_for(&mut p, 0, days);
        let kp = KeyPair::generate()?;
        let c = p.signed_by(&kp, &self.issuer)?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        write_public(&dir.join(CA_FILE), &self.ca_pem)?;
        write_private(&dir.join(MEMBER_KEY), &kp.serialize_pem())?;
        write_public(&dir.join(MEMBER_CERT), &c.pem())?;
        Ok(())
    }
}
