//! The topology config: the TOML format operators write, parsed into typed structs.
//!
//! Field names here are the user-facing format; keep them stable. Unknown keys are errors.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use ipnet::Ipv6Net;
use serde::{Deserialize, Serialize};

/// The config every command falls back to: the built-in lab's topology.
pub const DEFAULT_CONFIG: &str = include_str!("../default.toml");

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Default for `--server`.
    #[serde(default)]
    pub server: Option<String>,
    #[serde(default)]
    pub locations: Vec<Location>,
    #[serde(default)]
    pub datacenters: Vec<Datacenter>,
    #[serde(default)]
    pub servers: Vec<Server>,
    #[serde(default)]
    pub pools: Vec<Pool>,
    #[serde(default)]
    pub policies: Vec<Policy>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Location {
    pub name: String,
    pub latitude: f64,
    pub longitude: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Datacenter {
    pub name: String,
    pub location: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub name: String,
    /// Unique, 1..=65535; also the host part of the server's IPv6 pool addresses.
    pub id: u32,
    pub datacenter: String,
    /// IPv4 tunnel endpoint on the fabric.
    pub fabric: Ipv4Addr,
    /// Interface the programs attach to.
    pub uplink: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub name: String,
    /// Unique, 1..=1073741823; carried in the GRE key of tunnel packets (30 bits).
    pub id: u64,
    #[serde(default)]
    pub ipv6_prefix: Option<Ipv6Net>,
    #[serde(default)]
    pub ipv4: Vec<PoolAddress>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolAddress {
    pub address: Ipv4Addr,
    /// Port ranges of this address held by servers; empty = reserved.
    #[serde(default)]
    pub shares: Vec<Share>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Share {
    pub server: String,
    /// "first-last", inclusive.
    pub ports: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub pool: String,
    /// IPv4 and IPv6 prefixes (a bare address means a host route).
    pub destinations: Vec<String>,
    /// Tenant id the proxy sets with SO_MARK; 0 matches any mark.
    #[serde(default)]
    pub mark: u32,
}

/// A server's IPv6 address in a pool: the prefix's network address plus the server's id
/// (`2001:db8:7::/64`, id 11 → `2001:db8:7::b`).
pub fn server_ipv6(prefix: Ipv6Net, id: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(prefix.network()) + u128::from(id))
}

/// Why a config could not be read. Validation errors (a well-formed file with bad values) are
/// a separate kind so `validate` can give them their own exit code.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot parse config {path}: {message}")]
    Parse { path: String, message: String },
}

/// The path (`locations[0].latitude`) of the key whose value starts at byte `offset` of
/// `text`, from the table headers above it; None when it is not a `key = value` line.
fn field_at(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset)?;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = &text[line_start..];
    let line = line.split('\n').next().unwrap_or(line);
    // The key of the value the error is in: the last `key =` before it on its line (inside an
    // inline table, after the `{` or `,`).
    let upto = &line[..(offset - line_start).min(line.len())];
    let head = match upto.rfind('=') {
        Some(i) => &upto[..i],
        None => line.split_once('=')?.0,
    };
    let key = head.rsplit(['{', ',']).next().unwrap_or(head).trim();
    if key.is_empty() || key.starts_with('[') || key.starts_with('#') || key.contains(' ') {
        return None;
    }
    // An inline table on its own line inside a multi-line array (`shares = [` … `{ … },`):
    // the array's key and the element's index.
    let mut inline = None;
    if line.trim_start().starts_with('{') {
        let mut index = 0;
        for l in before[..line_start].lines().rev().map(str::trim) {
            if l.starts_with('[') {
                break;
            }
            if l.starts_with('{') {
                index += 1;
            } else if let Some((k, v)) = l.split_once('=')
                && v.trim() == "["
            {
                inline = Some(format!("{}[{index}].", k.trim()));
                break;
            }
        }
    }
    let key = format!("{}{key}", inline.unwrap_or_default());
    // Array-of-tables counts, by dotted name; a new `[[a]]` restarts the counts under it.
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut table = String::new();
    for line in before[..line_start].lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) {
            let name = name.trim().to_string();
            *counts.entry(name.clone()).or_default() += 1;
            counts.retain(|k, _| !k.starts_with(&format!("{name}.")));
            table = name;
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = name.trim().to_string();
        }
    }
    let mut path = String::new();
    let mut prefix = String::new();
    for part in table.split('.').filter(|p| !p.is_empty()) {
        prefix = if prefix.is_empty() {
            part.to_string()
        } else {
            format!("{prefix}.{part}")
        };
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(part);
        if let Some(n) = counts.get(&prefix) {
            path.push_str(&format!("[{}]", n - 1));
        }
    }
    Some(if path.is_empty() {
        key
    } else {
        format!("{path}.{key}")
    })
}

/// Largest config file read (a topology of 100,000 pools is about 20 MiB).
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;

/// Reads a config file's text: a regular file only (a FIFO would block the reader, a device
/// such as /dev/zero never ends), opened without blocking, and at most [`MAX_CONFIG_BYTES`].
pub fn read_text(path: &Path) -> Result<String, ConfigError> {
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
    let fail = |source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(fail)?;
    let meta = file.metadata().map_err(fail)?;
    if !meta.is_file() {
        return Err(fail(std::io::Error::other("not a regular file")));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(fail(std::io::Error::other(format!(
            "{} bytes, more than the {MAX_CONFIG_BYTES} a config may have",
            meta.len()
        ))));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(fail)?;
    String::from_utf8(bytes).map_err(|e| ConfigError::Parse {
        path: path.display().to_string(),
        message: format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
    })
}

impl Config {
    /// Parses TOML text; `origin` names the source in error messages.
    /// Errors name the field path (`servers[0].fabric`) when the value, not the syntax, is bad.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        // Most texts are good: read without tracking the field path (about 15 % of the time,
        // which every agent of a fleet spends on every publish), and again with it to name
        // the field only when the text is refused.
        if let Ok(config) = toml::from_str(text) {
            return Ok(config);
        }
        let error = |field: String, inner: toml::de::Error| {
            // A value the TOML reader itself refuses (bad syntax, a number out of range) comes
            // without the field's path: find it from where the error is.
            let at = inner.span().and_then(|s| {
                // An unterminated value is reported where the next line starts: the value
                // is then the last one of the line before.
                field_at(text, s.start).or_else(|| {
                    let end = text[..s.start].trim_end().len();
                    field_at(text, end.checked_sub(1)?)
                })
            });
            let field = match at {
                Some(at) if field == "." => at,
                _ => field,
            };
            let inner = inner.to_string();
            let inner = inner.trim_end();
            ConfigError::Parse {
                path: origin.to_string(),
                message: if field == "." {
                    inner.to_string()
                } else {
                    format!("{field}: {inner}")
                },
            }
        };
        let de = toml::Deserializer::parse(text).map_err(|e| error(".".into(), e))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            error(field, e.into_inner())
        })
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_text(path)?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The embedded default config.
    pub fn embedded() -> Self {
        Self::parse(DEFAULT_CONFIG, "<embedded default>").expect("embedded default config parses")
    }

    /// The server named `name`, or the config's default server.
    pub fn select_server(&self, name: Option<&str>) -> Result<&Server, SelectError> {
        let name = name
            .or(self.server.as_deref())
            .ok_or(SelectError::NoServer)?;
        self.servers
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| SelectError::Unknown {
                name: name.to_string(),
                known: self.servers.iter().map(|s| s.name.clone()).collect(),
            })
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SelectError {
    #[error("no server given: pass --server NAME or set `server = \"...\"` in the config")]
    NoServer,
    #[error("server {name:?} is not in the config (servers: {})", known.join(", "))]
    Unknown { name: String, known: Vec<String> },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses_and_has_servers() {
        let c = Config::embedded();
        assert!(c.servers.len() >= 3, "default lab has several servers");
    }

    #[test]
    fn server_ipv6_adds_id_to_network() {
        let p: Ipv6Net = "2001:db8:7::/64".parse().unwrap();
        assert_eq!(
            server_ipv6(p, 11),
            "2001:db8:7::b".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = Config::parse("bogus = 1\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
        assert!(err.contains("t.toml"), "{err}");
    }

    #[test]
    fn select_server_uses_default_and_reports_unknown() {
        let c = Config::parse(
            r#"
server = "a"
[[servers]]
name = "a"
id = 1
datacenter = "d"
fabric = "10.50.0.1"
uplink = "eth0"
"#,
            "t",
        )
        .unwrap();
        assert_eq!(c.select_server(None).unwrap().name, "a");
        assert_eq!(
            c.select_server(Some("b")).unwrap_err(),
            SelectError::Unknown {
                name: "b".into(),
                known: vec!["a".into()]
            }
        );
        let mut c2 = c.clone();
        c2.server = None;
        assert_eq!(c2.select_server(None).unwrap_err(), SelectError::NoServer);
    }
}

#[cfg(test)]
mod field_tests {
    use super::*;

    #[test]
    fn values_the_toml_reader_refuses_are_named_by_their_field() {
        let cases = [
            (
                "latitude = 50.11",
                "latitude = 1e400",
                "locations[0].latitude",
            ),
            ("id = 12\n", "id = 123456789012345678901\n", "servers[1].id"),
            ("id = 7\n", "id = 99999999999999999999\n", "pools[0].id"),
        ];
        for (from, to, field) in cases {
            assert!(DEFAULT_CONFIG.contains(from), "{from}");
            let text = DEFAULT_CONFIG.replacen(from, to, 1);
            let err = Config::parse(&text, "t").unwrap_err().to_string();
            assert!(err.contains(&format!("t: {field}: ")), "{field}: {err}");
        }
    }
}
