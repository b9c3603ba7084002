//! The daemon's optional config file (`/etc/natmap/config.toml`).
//!
//! Without it the daemon behaves exactly as without auto-discovery. Every
//! value is parsed into a type while the file is read, so an unknown key or
//! a bad value is reported with its line by the TOML parser.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use crate::model::{HostIp, ParseError};

/// Default config path.
pub const DEFAULT_PATH: &str = "/etc/natmap/config.toml";

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[auto_discover]`.
    #[serde(default)]
    pub auto_discover: AutoDiscover,
    /// `[relay]`: bounds of the loopback relay.
    #[serde(default)]
    pub relay: RelayConfig,
    /// `metrics_listen = "ADDR:PORT"`: serve Prometheus metrics there (read
    /// at start; the daemon's `--metrics-listen` wins). Off when absent.
    #[serde(default)]
    pub metrics_listen: Option<MetricsListen>,
    /// `backend = "iptables" | "nftables"`: the firewall driver (read at
    /// start; the daemon's `--backend` wins). iptables when absent.
    #[serde(default)]
    pub backend: Option<crate::firewall::Backend>,
    /// `[nftables]`: the marks of the nftables backend (read at start).
    #[serde(default)]
    pub nftables: NftablesConfig,
}

/// `[nftables]`: how the nftables backend marks what it translates, so
/// Docker's firewall lets it through (see `firewall::nftables::marks`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NftablesConfig {
    /// `ct_mark = "VALUE[/MASK]"`: the connection mark of translated
    /// connections, accepted in `DOCKER-USER` (Docker ≤ 28).
    #[serde(default)]
    pub ct_mark: Option<crate::firewall::nftables::marks::Mark>,
    /// `fwmark = "VALUE[/MASK]"` or `"off"`: the packet mark of their
    /// forwarded packets (`dockerd --bridge-accept-fwmark`, Docker 29+).
    #[serde(default)]
    pub fwmark: Option<FwMark>,
}

/// `fwmark`: a mark, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct FwMark(pub Option<crate::firewall::nftables::marks::Mark>);

impl TryFrom<String> for FwMark {
    type Error = ParseError;
    fn try_from(s: String) -> Result<FwMark, ParseError> {
        if s == "off" {
            return Ok(FwMark(None));
        }
        s.parse().map(|m| FwMark(Some(m))).map_err(|_| {
            ParseError::new(
                "fwmark",
                &s,
                "VALUE[/MASK] (e.g. 0x10000000/0x10000000) or off",
            )
        })
    }
}

impl NftablesConfig {
    /// The marks, defaults where not given.
    pub fn marks(&self) -> crate::firewall::nftables::marks::Marks {
        let default = crate::firewall::nftables::marks::Marks::default();
        crate::firewall::nftables::marks::Marks {
            ct: self.ct_mark.unwrap_or(default.ct),
            fw: self.fwmark.map_or(default.fw, |f| f.0),
        }
    }
}

/// Where `/metrics` is served: an address and a non-zero port, e.g.
/// `127.0.0.1:9477` or `[::1]:9477`. Any address is accepted because it is
/// only ever given explicitly; the daemon warns when it is not loopback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct MetricsListen(pub std::net::SocketAddr);

impl MetricsListen {
    /// Parses `s`, naming `field` (the flag or key) in the error.
    pub fn parse_field(field: &str, s: &str) -> Result<MetricsListen, ParseError> {
        const FORM: &str = "ADDR:PORT with a port 1-65535, e.g. 127.0.0.1:9477 or [::1]:9477";
        match s.parse::<std::net::SocketAddr>() {
            Ok(addr) if addr.port() != 0 => Ok(MetricsListen(addr)),
            _ => Err(ParseError::new(field, s, FORM)),
        }
    }
}

impl TryFrom<String> for MetricsListen {
    type Error = ParseError;
    fn try_from(s: String) -> Result<MetricsListen, ParseError> {
        MetricsListen::parse_field("metrics_listen", &s)
    }
}

/// `[relay]`: the loopback relay's bounds (read at start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// A relayed TCP connection idle this long is closed (seconds, ≥ 1).
    #[serde(default = "RelayConfig::default_idle")]
    pub idle_timeout_secs: std::num::NonZeroU64,
    /// Relayed TCP connections and UDP clients at once, across all rules (≥ 1).
    #[serde(default = "RelayConfig::default_max")]
    pub max_connections: std::num::NonZeroUsize,
}

impl RelayConfig {
    fn default_idle() -> std::num::NonZeroU64 {
        std::num::NonZeroU64::new(300).expect("non-zero")
    }

    fn default_max() -> std::num::NonZeroUsize {
        std::num::NonZeroUsize::new(1024).expect("non-zero")
    }

    /// The relay's limits.
    pub fn limits(&self) -> crate::daemon::relay::RelayLimits {
        crate::daemon::relay::RelayLimits {
            idle_timeout: std::time::Duration::from_secs(self.idle_timeout_secs.get()),
            max_connections: self.max_connections.get(),
        }
    }
}

impl Default for RelayConfig {
    fn default() -> RelayConfig {
        RelayConfig {
            idle_timeout_secs: RelayConfig::default_idle(),
            max_connections: RelayConfig::default_max(),
        }
    }
}

/// `[auto_discover]`: label-driven mappings from Docker engines.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoDiscover {
    /// Off unless set.
    #[serde(default)]
    pub enabled: bool,
    /// The container label holding mapping specs.
    #[serde(default)]
    pub label: Label,
    /// Remote mappings install no MASQUERADE, so services see the client's
    /// address (the service node must route replies back: `policy-route`).
    #[serde(default)]
    pub preserve_src_ip: bool,
    /// Engines to watch; the local socket when empty.
    #[serde(default)]
    pub engines: Vec<EngineConfig>,
}

impl AutoDiscover {
    /// The engines to watch (the local socket when none is listed).
    pub fn effective_engines(&self) -> Vec<EngineConfig> {
        if self.engines.is_empty() {
            vec![EngineConfig {
                name: "local".parse().expect("valid name"),
                endpoint: Endpoint::Unix(PathBuf::from(crate::docker::DEFAULT_SOCKET)),
                host_ip: None,
            }]
        } else {
            self.engines.clone()
        }
    }
}

/// One Docker engine.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// A short name, shown in `ls`.
    pub name: EngineName,
    /// `unix:///var/run/docker.sock` or `tcp://HOST:PORT`.
    pub endpoint: Endpoint,
    /// For a remote engine: the address this host uses to reach that node.
    /// An engine with `host_ip` is remote: its mappings go to
    /// `host_ip:<published port>`.
    #[serde(default)]
    pub host_ip: Option<HostIp>,
}

impl EngineConfig {
    /// Whether the engine's containers live on another node.
    pub fn is_remote(&self) -> bool {
        self.host_ip.is_some()
    }
}

/// An engine's name: letters, digits, `_ . -`, 1-64 characters.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct EngineName(String);

impl EngineName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for EngineName {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<EngineName, ParseError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if ok {
            Ok(EngineName(s.to_owned()))
        } else {
            Err(ParseError::new(
                "engine name",
                s,
                "1-64 letters, digits, _ . - (e.g. local, node2)",
            ))
        }
    }
}

impl TryFrom<String> for EngineName {
    type Error = ParseError;
    fn try_from(s: String) -> Result<EngineName, ParseError> {
        s.parse()
    }
}

impl fmt::Display for EngineName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where an engine's API is.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Endpoint {
    /// A Unix socket path.
    Unix(PathBuf),
    /// `host:port` over plain HTTP (a TLS-less engine: keep it on a private link).
    Tcp(String),
}

impl FromStr for Endpoint {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Endpoint, ParseError> {
        const FORM: &str = "unix:///path/to/docker.sock or tcp://HOST:PORT";
        if let Some(path) = s.strip_prefix("unix://") {
            if path.starts_with('/') && !path.contains('\0') {
                return Ok(Endpoint::Unix(PathBuf::from(path)));
            }
        } else if let Some(addr) = s.strip_prefix("tcp://") {
            let ok = addr.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            }) && addr
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
            if ok {
                return Ok(Endpoint::Tcp(addr.to_owned()));
            }
        }
        Err(ParseError::new("endpoint", s, FORM))
    }
}

impl TryFrom<String> for Endpoint {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Endpoint, ParseError> {
        s.parse()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

/// A Docker label key: `natmap.ports` by default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Label(pub String);

impl Default for Label {
    fn default() -> Label {
        Label("natmap.ports".into())
    }
}

impl TryFrom<String> for Label {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Label, ParseError> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
        if ok {
            Ok(Label(s))
        } else {
            Err(ParseError::new(
                "label",
                &s,
                "a Docker label key such as natmap.ports",
            ))
        }
    }
}

impl Config {
    /// Reads the config. A missing file at the default path means "no
    /// config"; a missing file the operator named is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Config::default())
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        Config::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses and checks a config text.
    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config =
            toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        // Checks across keys come after parsing; they name the line of the
        // key inside the engine's `[[auto_discover.engines]]` block.
        let lines: Vec<&str> = text.lines().collect();
        let headers: Vec<usize> = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.trim_start().starts_with("[[auto_discover.engines]]"))
            .map(|(n, _)| n)
            .collect();
        let at = |i: usize, key: &str| -> String {
            let Some(&start) = headers.get(i) else {
                return String::new();
            };
            let end = headers.get(i + 1).copied().unwrap_or(lines.len());
            let found = (start..end).find(|&n| {
                let l = lines[n].trim_start();
                l.strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            });
            format!(" at line {}", found.unwrap_or(start) + 1)
        };
        let engines = &config.auto_discover.engines;
        for (i, e) in engines.iter().enumerate() {
            if engines[..i].iter().any(|o| o.name == e.name) {
                return Err(format!(
                    "auto_discover.engines[{i}].name{}: engine name {:?} is used twice",
                    at(i, "name"),
                    e.name.as_str()
                ));
            }
            if matches!(e.endpoint, Endpoint::Tcp(_)) && e.host_ip.is_none() {
                return Err(format!(
                    "auto_discover.engines[{i}].endpoint{} (engine {}): a tcp:// engine is on another node: set host_ip to the address this host reaches it by",
                    at(i, "endpoint"),
                    e.name
                ));
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nftables_marks_are_read_with_defaults() {
        use crate::firewall::nftables::marks::{Mark, Marks};
        assert_eq!(
            Config::parse("").unwrap().nftables.marks(),
            Marks::default()
        );
        let c = Config::parse("[nftables]\nct_mark = \"0x2/0x2\"\nfwmark = \"off\"\n").unwrap();
        assert_eq!(
            c.nftables.marks(),
            Marks {
                ct: Mark::new(2, 2),
                fw: None
            }
        );
        let c = Config::parse("[nftables]\nfwmark = \"0x40\"\n").unwrap();
        assert_eq!(c.nftables.marks().fw, Some(Mark::new(0x40, u32::MAX)));
        let err = Config::parse("[nftables]\nct_mark = \"0x3/0x1\"\n").unwrap_err();
        assert!(err.contains("ct_mark") || err.contains("VALUE"), "{err}");
    }

    #[test]
    fn the_backend_is_read_and_checked() {
        let c = Config::parse("backend = \"nftables\"\n").unwrap();
        assert_eq!(c.backend, Some(crate::firewall::Backend::Nftables));
        assert_eq!(Config::parse("").unwrap().backend, None);
        let err = Config::parse("backend = \"pf\"\n").unwrap_err();
        assert!(
            err.contains("iptables") || err.contains("nftables"),
            "{err}"
        );
    }

    #[test]
    fn a_full_config_parses() {
        let c = Config::parse(
            r#"
[auto_discover]
enabled = true
label = "natmap.ports"
preserve_src_ip = true

[[auto_discover.engines]]
name = "local"
endpoint = "unix:///var/run/docker.sock"

[[auto_discover.engines]]
name = "node2"
endpoint = "tcp://10.0.0.5:2375"
host_ip = "10.0.0.5"
"#,
        )
        .unwrap();
        assert!(c.auto_discover.enabled && c.auto_discover.preserve_src_ip);
        assert_eq!(c.auto_discover.engines.len(), 2);
        assert!(c.auto_discover.engines[1].is_remote());
        assert_eq!(Config::parse("").unwrap(), Config::default());
        let m = Config::parse("metrics_listen = \"[::1]:9477\"\n").unwrap();
        assert_eq!(
            m.metrics_listen.map(|m| m.0),
            Some("[::1]:9477".parse().unwrap())
        );
        assert_eq!(
            Config::default().auto_discover.effective_engines()[0]
                .name
                .as_str(),
            "local"
        );
    }

    #[test]
    fn every_bad_key_or_value_names_itself_and_its_line() {
        let cases = [
            ("[auto_discover]\nenabeld = true\n", "enabeld"),
            ("[auto_discover]\nenabled = \"yes\"\n", "line 2"),
            ("[auto_discover]\nlabel = \"\"\n", "label"),
            ("[auto_discover]\n\n[[auto_discover.engines]]\nname = \"a\"\nendpoint = \"http://x:1\"\n", "line 5"),
            ("[auto_discover]\n[[auto_discover.engines]]\nname = \"a\"\nendpoint = \"tcp://x:1\"\nhost_ip = \"10.0.0.300\"\n", "line 5"),
            ("[auto_discover]\n[[auto_discover.engines]]\nname = \"a\"\nendpoint = \"tcp://x:1\"\n", "host_ip"),
            ("[auto_discover]\n[[auto_discover.engines]]\nname = \"a\"\nendpoint = \"unix:///a\"\n[[auto_discover.engines]]\nname = \"a\"\nendpoint = \"unix:///b\"\n", "used twice"),
            ("[other]\n", "other"),
            ("metrics_listen = \"localhost:9477\"\n", "metrics_listen"),
            ("metrics_listen = \"127.0.0.1:0\"\n", "ADDR:PORT"),
            ("metrics_listen = 9477\n", "line 1"),
        ];
        for (text, needle) in cases {
            let err = Config::parse(text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
