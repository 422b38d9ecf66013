//! Configuration: a TOML file whose every key is optional. The defaults make
//! `cargo run` work on a fresh machine (domain `localhost`, STARTTLS on 5222,
//! direct TLS on 5223, SQLite under `data/`, a self-signed certificate
//! generated into `certs/`). See `starling.example.toml` for every key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[derive(Default)]
pub struct Config {
    pub server: ServerConfig,
    pub c2s: C2sConfig,
    pub tls: TlsConfig,
    pub database: DatabaseConfig,
    pub limits: LimitsConfig,
    pub auth: AuthConfig,
    pub sm: SmConfig,
    pub offline: OfflineConfig,
    pub vcard: VCardConfig,
    pub private_storage: PrivateStorageConfig,
    pub muc: MucConfig,
    pub archive: ArchiveConfig,
    pub s2s: S2sConfig,
}

/// Server-to-server streams (federation, RFC 6120).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S2sConfig {
    /// Federate at all. When off, stanzas to remote domains bounce with
    /// `remote-server-not-found` and no s2s port is opened.
    pub enabled: bool,
    /// Listeners for incoming streams with STARTTLS, usually port 5269.
    pub listen: Vec<SocketAddr>,
    /// Listeners for incoming streams with direct TLS (XEP-0368, ALPN
    /// `xmpp-server`), e.g. port 5270. Empty by default.
    pub direct_tls: Vec<SocketAddr>,
    /// Require TLS on every stream, incoming and outgoing (recommended).
    pub require_tls: bool,
    /// Refuse peers that cannot authenticate with a certificate valid for
    /// their domain (no Server Dialback-only peers).
    pub secure_auth: bool,
    /// Offer and use Server Dialback (XEP-0220) when certificates do not
    /// authenticate a peer.
    pub dialback: bool,
    /// Extra CA certificates (PEM) trusted for peers, besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Trust the system's root certificates for peers.
    pub system_roots: bool,
    /// If not empty, federate only with these remote domains.
    pub allow: Vec<String>,
    /// Never federate with these remote domains.
    pub deny: Vec<String>,
    /// DNS server to ask instead of the system's resolvers (`ip:port` or
    /// `ip`), for tests and split-horizon setups.
    pub resolver: Option<String>,
    /// Static addresses per remote domain, bypassing DNS:
    /// `{ "example.net" = ["192.0.2.1:5269"] }`. Prefix an address with
    /// `tls://` for direct TLS.
    pub hosts: std::collections::BTreeMap<String, Vec<String>>,
    /// Seconds for one DNS lookup.
    pub dns_timeout_secs: u64,
    /// Seconds for one TCP connection attempt.
    pub connect_timeout_secs: u64,
    /// Seconds a stream may take from connecting to being authenticated.
    pub auth_timeout_secs: u64,
    /// Seconds without traffic after which a stream is closed (it reopens
    /// on demand).
    pub idle_timeout_secs: u64,
    /// Seconds a remote domain that could not be reached stays marked as
    /// failed (stanzas to it bounce at once).
    pub retry_after_secs: u64,
    /// Stanzas queued per outgoing stream (while it is set up or busy).
    pub queue_length: usize,
    /// Largest stanza from a remote server, in bytes.
    pub max_stanza_bytes: usize,
    /// Incoming streams from one remote domain at the same time.
    pub max_streams_per_domain: usize,
    /// Incoming bytes per second per stream; a faster peer is slowed down
    /// (its socket is read less often).
    pub max_bytes_per_sec: u64,
    /// Stanzas per second a remote server may send on one stream on
    /// average...
    pub max_stanzas_per_sec: u64,
    /// ... with bursts of this many; beyond that the stream is closed with
    /// `policy-violation`.
    pub max_stanza_burst: u64,
    /// Stream management (XEP-0198) on server-to-server streams, so that
    /// stanzas lost with a broken connection are resent or bounced.
    pub stream_management: bool,
    /// Secret for dialback keys (XEP-0185). Empty: a random secret created
    /// once and kept in the database. Set it when several Starling nodes
    /// serve the same domains.
    pub dialback_secret: String,
}

impl Default for S2sConfig {
    fn default() -> Self {
        S2sConfig {
            enabled: true,
            listen: vec!["0.0.0.0:5269".parse().expect("valid address")],
            direct_tls: Vec::new(),
            require_tls: true,
            secure_auth: false,
            dialback: true,
            ca_file: None,
            system_roots: true,
            allow: Vec::new(),
            deny: Vec::new(),
            resolver: None,
            hosts: Default::default(),
            dns_timeout_secs: 5,
            connect_timeout_secs: 10,
            auth_timeout_secs: 30,
            idle_timeout_secs: 600,
            retry_after_secs: 30,
            queue_length: 10_000,
            max_stanza_bytes: 512 * 1024,
            max_streams_per_domain: 4,
            max_bytes_per_sec: 4 * 1024 * 1024,
            max_stanzas_per_sec: 2_000,
            max_stanza_burst: 20_000,
            stream_management: true,
            dialback_secret: String::new(),
        }
    }
}

impl S2sConfig {
    /// May we federate with this remote domain?
    pub fn allows(&self, domain: &str) -> bool {
        let matches = |list: &[String]| {
            list.iter().any(|d| {
                d.eq_ignore_ascii_case(domain)
                    || d.strip_prefix("*.").is_some_and(|parent| {
                        domain.len() > parent.len() + 1
                            && domain[domain.len() - parent.len()..].eq_ignore_ascii_case(parent)
                            && domain.as_bytes()[domain.len() - parent.len() - 1] == b'.'
                    })
            })
        };
        !matches(&self.deny) && (self.allow.is_empty() || matches(&self.allow))
    }
}

/// Stream management (XEP-0198).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmConfig {
    /// Allow sessions to be resumed after the connection drops.
    pub resumption: bool,
    /// Seconds a dropped session waits for resumption by default.
    pub resume_timeout_secs: u32,
    /// The longest resumption timeout a client may ask for (`max`).
    pub max_resume_timeout_secs: u32,
    /// Ask the client for an ack after this many unacknowledged stanzas...
    pub ack_request_stanzas: u32,
    /// ... or this many seconds after the first unacknowledged one.
    pub ack_request_secs: u64,
    /// Seconds an ack request may stay unanswered before the connection is
    /// considered dead (the session then waits for resumption).
    pub ack_timeout_secs: u64,
    /// Most unacknowledged stanzas kept per session.
    pub max_unacked: usize,
}

impl Default for SmConfig {
    fn default() -> Self {
        SmConfig {
            resumption: true,
            resume_timeout_secs: 300,
            max_resume_timeout_secs: 3600,
            ack_request_stanzas: 5,
            ack_request_secs: 15,
            ack_timeout_secs: 60,
            max_unacked: 10_000,
        }
    }
}

impl SmConfig {
    pub fn settings(&self) -> crate::c2s::sm::SmSettings {
        crate::c2s::sm::SmSettings {
            resumption: self.resumption,
            default_timeout: self.resume_timeout_secs.max(1),
            max_timeout: self
                .max_resume_timeout_secs
                .max(self.resume_timeout_secs)
                .max(1),
            request_after_stanzas: self.ack_request_stanzas.max(1),
            request_after: std::time::Duration::from_secs(self.ack_request_secs.max(1)),
            ack_timeout: std::time::Duration::from_secs(self.ack_timeout_secs.max(1)),
            max_unacked: self.max_unacked.max(16),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Local domains (virtual hosts) served.
    pub domains: Vec<String>,
    /// Directory for the SQLite database and other state.
    pub data_dir: PathBuf,
    /// JIDs with administrator rights (ad-hoc commands, announcements).
    pub admins: Vec<String>,
    /// How long to wait for streams to close on shutdown, in seconds.
    pub shutdown_grace_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct C2sConfig {
    /// Listeners with STARTTLS (RFC 6120), usually port 5222.
    pub starttls: Vec<SocketAddr>,
    /// Listeners with direct TLS (XEP-0368, ALPN `xmpp-client`), usually 5223.
    pub direct_tls: Vec<SocketAddr>,
    /// Require TLS before authentication (strongly recommended).
    pub require_tls: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Directory for certificates. For each domain without an explicit
    /// certificate, `<dir>/<domain>.crt` and `<dir>/<domain>.key` are used
    /// and generated (self-signed) if missing.
    pub cert_dir: PathBuf,
    /// Explicit certificate chain (PEM) and key for all domains.
    pub certificate: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Generate a self-signed certificate when none exists.
    pub generate_self_signed: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://path/to/file.db` or `postgres://user@host/db`. Empty means
    /// `sqlite://<data_dir>/starling.db`.
    pub url: String,
    pub max_connections: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest stanza (or other top-level element) in bytes.
    pub max_stanza_bytes: usize,
    /// Concurrent connections from one IP address.
    pub max_connections_per_ip: usize,
    /// Concurrent connections in total.
    pub max_connections: usize,
    /// Seconds a connection may take to authenticate and bind.
    pub unauthenticated_timeout_secs: u64,
    /// Seconds without any traffic after which a session is probed with a
    /// ping; it is closed if the ping is not answered within the same time.
    pub idle_timeout_secs: u64,
    /// Stanzas queued for one session before it is considered stuck.
    pub session_queue: usize,
    /// Resources one account may bind at the same time.
    pub max_resources_per_user: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// PBKDF2 iteration count for new passwords.
    pub scram_iterations: u32,
    /// Offer PLAIN (only ever over TLS).
    pub allow_plain: bool,
    /// Failed attempts (per IP and per account) before throttling.
    pub max_failures: u32,
    /// Window for counting failures, and how long throttling lasts, seconds.
    pub failure_window_secs: u64,
}

/// Offline messages (XEP-0160).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OfflineConfig {
    /// Messages stored per user while they are offline; further messages
    /// are bounced with `service-unavailable`. 0 switches offline storage
    /// off (and `msgoffline` is no longer advertised).
    pub max_per_user: usize,
}

/// vCard-temp (XEP-0054).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VCardConfig {
    /// Largest vCard (serialised XML, including an embedded photo) in bytes.
    pub max_bytes: usize,
}

/// Private XML storage (XEP-0049).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrivateStorageConfig {
    /// Largest data stored under one namespace (serialised XML) in bytes.
    pub max_bytes: usize,
    /// Namespaces one account may store data under.
    pub max_namespaces: usize,
}

impl Default for OfflineConfig {
    fn default() -> Self {
        OfflineConfig { max_per_user: 1000 }
    }
}

impl Default for VCardConfig {
    fn default() -> Self {
        VCardConfig {
            max_bytes: 128 * 1024,
        }
    }
}

impl Default for PrivateStorageConfig {
    fn default() -> Self {
        PrivateStorageConfig {
            max_bytes: 64 * 1024,
            max_namespaces: 64,
        }
    }
}

/// Who may create rooms on the MUC service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoomCreation {
    /// Any JID, local or remote.
    Anyone,
    /// Users of the local domains.
    Local,
    /// Only the server administrators (`server.admins`).
    Admins,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MucConfig {
    /// Run the multi-user chat service (XEP-0045).
    pub enabled: bool,
    /// The service lives at `<subdomain>.<domain>` for every local domain.
    pub subdomain: String,
    /// Name shown in service discovery.
    pub name: String,
    /// Who may create rooms: "anyone", "local" or "admins".
    pub room_creation: RoomCreation,
    /// Rooms one user may own (persistent rooms plus live temporary ones).
    pub max_rooms_per_user: usize,
    /// Rooms one user (bare JID) may be joined to at once.
    pub max_joined_rooms_per_user: usize,
    /// Default `muc#roomconfig_maxusers` of new rooms, and the highest value
    /// an owner may choose.
    pub default_max_users: u32,
    pub max_users_limit: u32,
    /// New rooms are persistent / public / archived unless configured otherwise.
    pub persistent_by_default: bool,
    pub public_by_default: bool,
    pub archive_by_default: bool,
    /// History sent on join when the client asks for none in particular, and
    /// the most it may ask for (`muc#maxhistoryfetch`).
    pub default_history: usize,
    pub max_history: usize,
    /// New rooms stay locked until their creator configures them (or accepts
    /// the default configuration); after this many seconds an unconfigured
    /// room takes the default configuration.
    pub lock_new_rooms: bool,
    pub lock_timeout_secs: u64,
    /// Seconds a persistent room without occupants stays loaded in memory.
    pub idle_unload_secs: u64,
    /// Stanzas queued for one room before senders get `resource-constraint`.
    pub room_queue: usize,
    /// Messages per second (and burst) one room accepts from all occupants.
    pub room_rate: f64,
    pub room_burst: f64,
    /// Messages per second (and burst) one occupant may send to a room
    /// (groupchat, private messages, invitations, voice requests).
    pub occupant_rate: f64,
    pub occupant_burst: f64,
    /// Longest nickname, subject, room name/description, in characters.
    pub max_nick_chars: usize,
    pub max_subject_chars: usize,
    pub max_description_chars: usize,
    /// Entries in a room's affiliation lists (owners, admins, members, outcasts).
    pub max_affiliations: usize,
    /// Rooms returned by one disco#items query on the service.
    pub max_listed_rooms: usize,
}

impl Default for MucConfig {
    fn default() -> Self {
        MucConfig {
            enabled: true,
            subdomain: "conference".into(),
            name: "Chatrooms".into(),
            room_creation: RoomCreation::Local,
            max_rooms_per_user: 100,
            max_joined_rooms_per_user: 1000,
            default_max_users: 200,
            max_users_limit: 10_000,
            persistent_by_default: false,
            public_by_default: true,
            archive_by_default: true,
            default_history: 20,
            max_history: 50,
            lock_new_rooms: true,
            lock_timeout_secs: 300,
            idle_unload_secs: 600,
            room_queue: 1024,
            room_rate: 200.0,
            room_burst: 400.0,
            occupant_rate: 5.0,
            occupant_burst: 20.0,
            max_nick_chars: 64,
            max_subject_chars: 1024,
            max_description_chars: 1024,
            max_affiliations: 10_000,
            max_listed_rooms: 500,
        }
    }
}

/// Message archive (XEP-0313): what is kept, for how long, and the limits
/// of the writer and of queries.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArchiveConfig {
    /// Archive users' 1:1 messages and answer `urn:xmpp:mam:2` queries.
    pub enabled: bool,
    /// Archiving default for users who set no preference: `always`,
    /// `never` or `roster` (treated as `always` until the roster exists).
    pub default_mode: String,
    /// How long messages are kept unless a user has their own setting:
    /// `forever`, or a number with a unit: `90d`, `12h`, `30m`, `45s`.
    pub retention: String,
    /// Seconds between two runs of the expiry task.
    pub expiry_interval_secs: u64,
    /// Largest page a query may ask for (RSM `max` is capped to this).
    pub max_page: usize,
    /// Page size when a query gives no RSM `max`.
    pub default_page: usize,
    /// Messages waiting for the archive writer before senders wait
    /// (backpressure).
    pub queue: usize,
    /// Most messages written in one transaction.
    pub batch_max: usize,
    /// An RSM count request (`max` 0) is answered with a count when the
    /// result set has at most this many messages.
    pub count_limit: usize,
    /// Users whose preferences are kept in memory.
    pub prefs_cache: usize,
    /// Most JIDs in a user's always + never lists.
    pub max_prefs_jids: usize,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            enabled: true,
            default_mode: "always".into(),
            retention: "forever".into(),
            expiry_interval_secs: 3600,
            max_page: 250,
            default_page: 50,
            queue: 8192,
            batch_max: 512,
            count_limit: 10_000,
            prefs_cache: 10_000,
            max_prefs_jids: 1000,
        }
    }
}

/// Parse a retention setting: `forever` (None) or `<n><unit>` with unit
/// `d`, `h`, `m` or `s`, in seconds.
pub fn parse_retention(s: &str) -> Result<Option<u64>, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("forever") {
        return Ok(None);
    }
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let mult: u64 = match unit {
        "d" => 86_400,
        "h" => 3600,
        "m" => 60,
        "s" => 1,
        _ => {
            return Err(format!(
                "retention {s:?}: use forever or a number with d, h, m or s"
            ));
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("retention {s:?}: use forever or a number with d, h, m or s"))?;
    if n == 0 {
        return Err(format!("retention {s:?}: must be positive (or forever)"));
    }
    n.checked_mul(mult)
        .filter(|v| *v <= i64::MAX as u64 / 1_000_000)
        .map(Some)
        .ok_or_else(|| format!("retention {s:?} is too large"))
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            domains: vec!["localhost".into()],
            data_dir: PathBuf::from("data"),
            admins: Vec::new(),
            shutdown_grace_secs: 5,
        }
    }
}

impl Default for C2sConfig {
    fn default() -> Self {
        C2sConfig {
            starttls: vec!["0.0.0.0:5222".parse().expect("valid address")],
            direct_tls: vec!["0.0.0.0:5223".parse().expect("valid address")],
            require_tls: true,
        }
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_dir: PathBuf::from("certs"),
            certificate: None,
            key: None,
            generate_self_signed: true,
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: String::new(),
            max_connections: 8,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_stanza_bytes: 256 * 1024,
            max_connections_per_ip: 100,
            max_connections: 19_000,
            unauthenticated_timeout_secs: 60,
            idle_timeout_secs: 300,
            session_queue: 2048,
            max_resources_per_user: 32,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            scram_iterations: 4096,
            allow_plain: true,
            max_failures: 5,
            failure_window_secs: 60,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("invalid configuration in {0}: {1}")]
    Parse(PathBuf, toml::de::Error),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl MucConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(format!("muc.{m}")));
        if self.subdomain.is_empty()
            || jid::BareJid::new(&format!("{}.example.org", self.subdomain))
                .map(|j| j.node().is_some())
                .unwrap_or(true)
        {
            return bad("subdomain must be a valid DNS label");
        }
        if self.default_max_users == 0 || self.default_max_users > self.max_users_limit {
            return bad("default_max_users must be between 1 and max_users_limit");
        }
        if self.default_history > self.max_history {
            return bad("default_history must not exceed max_history");
        }
        if self.room_queue < 16 {
            return bad("room_queue must be at least 16");
        }
        if !(self.room_rate > 0.0 && self.occupant_rate > 0.0)
            || self.room_burst < 1.0
            || self.occupant_burst < 1.0
        {
            return bad("rates must be positive and bursts at least 1");
        }
        if self.max_nick_chars == 0 || self.max_listed_rooms == 0 {
            return bad("max_nick_chars and max_listed_rooms must be positive");
        }
        Ok(())
    }
}

impl Config {
    /// Load a TOML file; missing keys take their defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        let cfg: Config =
            toml::from_str(&text).map_err(|e| ConfigError::Parse(path.to_owned(), e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse(PathBuf::from("<string>"), e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.server.domains.is_empty() {
            return Err(ConfigError::Invalid("server.domains is empty".into()));
        }
        for d in &self.server.domains {
            if jid::BareJid::new(d)
                .map(|j| j.node().is_some())
                .unwrap_or(true)
            {
                return Err(ConfigError::Invalid(format!("invalid domain {d:?}")));
            }
        }
        for a in &self.server.admins {
            if jid::BareJid::new(a).is_err() {
                return Err(ConfigError::Invalid(format!("invalid admin JID {a:?}")));
            }
        }
        if self.limits.max_stanza_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "limits.max_stanza_bytes must be at least 1024".into(),
            ));
        }
        if self.auth.scram_iterations < 4096 {
            return Err(ConfigError::Invalid(
                "auth.scram_iterations must be at least 4096".into(),
            ));
        }
        if self.vcard.max_bytes < 256 {
            return Err(ConfigError::Invalid(
                "vcard.max_bytes must be at least 256".into(),
            ));
        }
        if self.private_storage.max_bytes < 256 || self.private_storage.max_namespaces == 0 {
            return Err(ConfigError::Invalid(
                "private_storage.max_bytes must be at least 256 and max_namespaces at least 1"
                    .into(),
            ));
        }
        self.muc.validate()?;
        let a = &self.archive;
        if !matches!(a.default_mode.as_str(), "always" | "never" | "roster") {
            return Err(ConfigError::Invalid(
                "archive.default_mode must be always, never or roster".into(),
            ));
        }
        parse_retention(&a.retention).map_err(|e| ConfigError::Invalid(format!("archive.{e}")))?;
        if a.max_page == 0 || a.default_page == 0 || a.default_page > a.max_page {
            return Err(ConfigError::Invalid(
                "archive.default_page must be between 1 and archive.max_page".into(),
            ));
        }
        if a.queue == 0 || a.batch_max == 0 || a.expiry_interval_secs == 0 {
            return Err(ConfigError::Invalid(
                "archive.queue, archive.batch_max and archive.expiry_interval_secs must be positive"
                    .into(),
            ));
        }
        if self.s2s.max_stanza_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "s2s.max_stanza_bytes must be at least 1024".into(),
            ));
        }
        if let Some(r) = &self.s2s.resolver
            && crate::s2s::dns::parse_nameserver(r).is_none()
        {
            return Err(ConfigError::Invalid(format!(
                "s2s.resolver {r:?} is not an IP address or ip:port"
            )));
        }
        for (domain, addrs) in &self.s2s.hosts {
            for a in addrs {
                if crate::s2s::dns::parse_static_target(a).is_none() {
                    return Err(ConfigError::Invalid(format!(
                        "s2s.hosts.{domain:?}: {a:?} is not ip:port or tls://ip:port"
                    )));
                }
            }
        }
        if self.tls.certificate.is_some() != self.tls.key.is_some() {
            return Err(ConfigError::Invalid(
                "tls.certificate and tls.key go together".into(),
            ));
        }
        Ok(())
    }

    /// The MUC service domains, one per local domain (empty when disabled).
    pub fn muc_domains(&self) -> Vec<String> {
        if !self.muc.enabled {
            return Vec::new();
        }
        self.server
            .domains
            .iter()
            .map(|d| format!("{}.{d}", self.muc.subdomain))
            .collect()
    }

    /// The database URL, with the SQLite default filled in.
    pub fn database_url(&self) -> String {
        if self.database.url.is_empty() {
            format!(
                "sqlite://{}",
                self.server.data_dir.join("starling.db").display()
            )
        } else {
            self.database.url.clone()
        }
    }

    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.server.domains.iter().any(|d| d == domain)
    }

    /// A configuration for tests: one domain, listeners on 127.0.0.1:0,
    /// certificates and data in `dir`, in-memory-friendly limits.
    pub fn for_tests(dir: &Path) -> Config {
        let mut cfg = Config::default();
        cfg.server.data_dir = dir.join("data");
        cfg.tls.cert_dir = dir.join("certs");
        cfg.c2s.starttls = vec!["127.0.0.1:0".parse().expect("valid address")];
        cfg.c2s.direct_tls = vec!["127.0.0.1:0".parse().expect("valid address")];
        cfg.server.shutdown_grace_secs = 2;
        // Hermetic tests: no federation unless a test turns it on (with its
        // own resolver or static hosts).
        cfg.s2s.enabled = false;
        cfg.s2s.listen = vec!["127.0.0.1:0".parse().expect("valid address")];
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.server.domains, vec!["localhost".to_string()]);
        assert_eq!(c.limits.max_stanza_bytes, 262_144);
        assert_eq!(c.database_url(), "sqlite://data/starling.db");
        assert_eq!(c.c2s.starttls[0].port(), 5222);
        assert_eq!(c.c2s.direct_tls[0].port(), 5223);
    }

    #[test]
    fn overrides_and_validation() {
        let c = Config::from_toml(
            "[server]\ndomains = ['example.org', 'example.net']\n[database]\nurl = 'postgres://x@y/z'\n",
        )
        .unwrap();
        assert!(c.is_local_domain("example.net"));
        assert_eq!(c.database_url(), "postgres://x@y/z");
        assert!(Config::from_toml("[server]\ndomains = []").is_err());
        assert!(Config::from_toml("[server]\ndomains = ['a@b']").is_err());
        assert!(Config::from_toml("[server]\nbogus = 1").is_err());
        assert!(Config::from_toml("[auth]\nscram_iterations = 10").is_err());
        assert!(Config::from_toml("[archive]\nretention = '3 weeks'").is_err());
        assert!(Config::from_toml("[archive]\ndefault_mode = 'sometimes'").is_err());
        let c = Config::from_toml("[archive]\nretention = '30d'\nmax_page = 100").unwrap();
        assert_eq!(parse_retention(&c.archive.retention), Ok(Some(30 * 86_400)));
        assert_eq!(parse_retention("forever"), Ok(None));
        assert_eq!(parse_retention("90s"), Ok(Some(90)));
        assert!(parse_retention("0d").is_err());
        assert!(Config::from_toml("[muc]\nsubdomain = 'a@b'").is_err());
        assert!(Config::from_toml("[muc]\ndefault_history = 100").is_err());
        let m = Config::from_toml("[muc]\nsubdomain = 'rooms'\nroom_creation = 'anyone'").unwrap();
        assert_eq!(m.muc_domains(), vec!["rooms.localhost".to_string()]);
        assert_eq!(m.muc.room_creation, RoomCreation::Anyone);
    }

    #[test]
    fn s2s_allow_and_deny_lists() {
        let mut c = S2sConfig::default();
        assert!(c.allows("example.net"));
        c.deny = vec!["bad.example".into(), "*.evil.example".into()];
        assert!(!c.allows("bad.example"));
        assert!(!c.allows("BAD.example"));
        assert!(!c.allows("x.evil.example"));
        assert!(c.allows("evil.example"));
        assert!(c.allows("notevil.example"));
        c.allow = vec!["friend.example".into()];
        assert!(c.allows("friend.example"));
        assert!(!c.allows("example.net"));
        assert!(Config::from_toml("[s2s]\nresolver = 'nonsense'").is_err());
        assert!(Config::from_toml("[s2s]\nresolver = '127.0.0.1:5353'").is_ok());
        assert!(Config::from_toml("[s2s.hosts]\n'b.test' = ['tls://127.0.0.1:5270']").is_ok());
        assert!(Config::from_toml("[s2s.hosts]\n'b.test' = ['localhost']").is_err());
    }

    #[test]
    fn example_file_parses() {
        let text = include_str!("../starling.example.toml");
        Config::from_toml(text).expect("starling.example.toml must stay valid");
    }
}
