//! Where to connect for a remote domain (RFC 6120 section 3.2 with XEP-0368):
//! `_xmpps-server._tcp` (direct TLS) and `_xmpp-server._tcp` (STARTTLS) SRV
//! records, mixed and ordered by priority and weight (RFC 2782); a lone `.`
//! target means "no such service"; without any SRV record, the domain's own
//! A/AAAA addresses on port 5269. Static per-domain addresses from the
//! configuration bypass DNS.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use rand::Rng;

use crate::config::S2sConfig;

/// The default port of server-to-server streams.
pub const DEFAULT_PORT: u16 = 5269;

/// One place to try: a host name (or address) and port, and whether TLS
/// starts at once (XEP-0368) or with STARTTLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub direct_tls: bool,
    /// Known addresses (static configuration); empty: resolve `host`.
    pub addrs: Vec<IpAddr>,
}

/// An SRV record as far as ordering is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    pub target: String,
    pub direct_tls: bool,
}

/// Why a domain has no place to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveError {
    /// The domain does not exist (NXDOMAIN for SRV and addresses).
    NotFound(String),
    /// The domain says it offers no XMPP server service (`.` target).
    NoService,
    /// DNS failed (timeout, SERVFAIL, no resolver configured).
    Temporary(String),
}

impl std::fmt::Display for ResolveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResolveError::NotFound(d) => write!(f, "DNS: {d} does not exist"),
            ResolveError::NoService => {
                write!(
                    f,
                    "DNS: the domain publishes no XMPP server service ('.' SRV target)"
                )
            }
            ResolveError::Temporary(e) => write!(f, "DNS: {e}"),
        }
    }
}

/// Order SRV records as RFC 2782 says: ascending priority; within one
/// priority a weighted random order (records of weight 0 have a small
/// chance to come first). `xmpp-` and `xmpps-` records are mixed
/// (XEP-0368 section 3).
pub fn order_srv(mut records: Vec<Srv>, rng: &mut impl Rng) -> Vec<Srv> {
    records.sort_by_key(|r| r.priority);
    let mut out = Vec::with_capacity(records.len());
    let mut i = 0;
    while i < records.len() {
        let prio = records[i].priority;
        let mut j = i;
        while j < records.len() && records[j].priority == prio {
            j += 1;
        }
        // Weight-0 records first in the unordered list (RFC 2782).
        let mut group: Vec<Srv> = records[i..j].to_vec();
        group.sort_by_key(|r| r.weight != 0);
        while !group.is_empty() {
            let total: u32 = group.iter().map(|r| r.weight as u32).sum();
            let pick = rng.random_range(0..=total);
            let mut running = 0u32;
            let mut chosen = group.len() - 1;
            for (k, r) in group.iter().enumerate() {
                running += r.weight as u32;
                if running >= pick {
                    chosen = k;
                    break;
                }
            }
            out.push(group.remove(chosen));
        }
        i = j;
    }
    out
}

/// `ip` or `ip:port` (port 53 by default).
pub fn parse_nameserver(s: &str) -> Option<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Some(a);
    }
    s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53))
}

/// `ip:port` or `tls://ip:port` (direct TLS).
pub fn parse_static_target(s: &str) -> Option<(SocketAddr, bool)> {
    match s.strip_prefix("tls://") {
        Some(rest) => rest.parse().ok().map(|a| (a, true)),
        None => s.parse().ok().map(|a| (a, false)),
    }
}

/// The result of one SRV query.
enum SrvAnswer {
    Records(Vec<Srv>),
    /// A single record with target `.`.
    Dot,
    /// NXDOMAIN or no SRV records.
    None {
        nxdomain: bool,
    },
    Failed(String),
}

/// Resolves remote domains for outgoing streams.
pub struct Resolver {
    dns: Result<TokioResolver, String>,
    statics: HashMap<String, Vec<Target>>,
}

impl Resolver {
    pub fn new(cfg: &S2sConfig) -> Resolver {
        let mut statics = HashMap::new();
        for (domain, addrs) in &cfg.hosts {
            let targets = addrs
                .iter()
                .filter_map(|a| parse_static_target(a))
                .map(|(addr, direct_tls)| Target {
                    host: addr.ip().to_string(),
                    port: addr.port(),
                    direct_tls,
                    addrs: vec![addr.ip()],
                })
                .collect();
            statics.insert(domain.to_ascii_lowercase(), targets);
        }
        Resolver {
            dns: build_resolver(cfg),
            statics,
        }
    }

    /// Where to connect for `domain`, in order.
    pub async fn targets(&self, domain: &str) -> Result<Vec<Target>, ResolveError> {
        if let Some(t) = self.statics.get(&domain.to_ascii_lowercase()) {
            return Ok(t.clone());
        }
        let dns = self
            .dns
            .as_ref()
            .map_err(|e| ResolveError::Temporary(e.clone()))?;
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        let (tls_name, plain_name) = (
            format!("_xmpps-server._tcp.{fqdn}"),
            format!("_xmpp-server._tcp.{fqdn}"),
        );
        let (tls, plain) = tokio::join!(srv(dns, &tls_name, true), srv(dns, &plain_name, false));
        let mut records = Vec::new();
        let mut no_service = false;
        let mut nxdomain = true;
        let mut failure = None;
        for (answer, direct) in [(tls, true), (plain, false)] {
            match answer {
                SrvAnswer::Records(r) => {
                    nxdomain = false;
                    records.extend(r)
                }
                // `.` for xmpps- only means "no direct TLS" (XEP-0368).
                SrvAnswer::Dot => {
                    nxdomain = false;
                    if !direct {
                        no_service = true;
                    }
                }
                SrvAnswer::None { nxdomain: nx } => nxdomain &= nx,
                SrvAnswer::Failed(e) => {
                    nxdomain = false;
                    failure = Some(e)
                }
            }
        }
        if !records.is_empty() {
            let ordered = order_srv(records, &mut rand::rng());
            return Ok(ordered
                .into_iter()
                .map(|r| Target {
                    host: r.target,
                    port: r.port,
                    direct_tls: r.direct_tls,
                    addrs: Vec::new(),
                })
                .collect());
        }
        if no_service {
            return Err(ResolveError::NoService);
        }
        // No SRV records: the domain itself on the default port (RFC 6120
        // section 3.2.2), if it has addresses.
        match dns.lookup_ip(fqdn.as_str()).await {
            Ok(ips) => {
                let addrs: Vec<IpAddr> = ips.iter().collect();
                if addrs.is_empty() {
                    return Err(ResolveError::NotFound(domain.to_owned()));
                }
                Ok(vec![Target {
                    host: domain.to_owned(),
                    port: DEFAULT_PORT,
                    direct_tls: false,
                    addrs,
                }])
            }
            Err(e) if e.is_no_records_found() => {
                if let Some(f) = failure {
                    Err(ResolveError::Temporary(f))
                } else if nxdomain || e.is_nx_domain() {
                    Err(ResolveError::NotFound(domain.to_owned()))
                } else {
                    Err(ResolveError::NotFound(format!(
                        "{domain} (no SRV, A or AAAA records)"
                    )))
                }
            }
            Err(e) => Err(ResolveError::Temporary(e.to_string())),
        }
    }

    /// The addresses of a target host.
    pub async fn addresses(&self, target: &Target) -> Result<Vec<IpAddr>, String> {
        if !target.addrs.is_empty() {
            return Ok(target.addrs.clone());
        }
        if let Ok(ip) = target.host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let dns = self.dns.as_ref().map_err(|e| e.clone())?;
        let fqdn = format!("{}.", target.host.trim_end_matches('.'));
        match dns.lookup_ip(fqdn.as_str()).await {
            Ok(ips) => Ok(ips.iter().collect()),
            Err(e) => Err(format!("DNS: no address for {}: {e}", target.host)),
        }
    }
}

async fn srv(dns: &TokioResolver, name: &str, direct_tls: bool) -> SrvAnswer {
    match dns.lookup(name, RecordType::SRV).await {
        Ok(lookup) => {
            let mut out = Vec::new();
            let mut dot = false;
            for r in lookup.answers() {
                if let RData::SRV(s) = &r.data {
                    let target = s.target.to_utf8();
                    let target = target.trim_end_matches('.');
                    if target.is_empty() {
                        dot = true;
                        continue;
                    }
                    out.push(Srv {
                        priority: s.priority,
                        weight: s.weight,
                        port: s.port,
                        target: target.to_owned(),
                        direct_tls,
                    });
                }
            }
            if out.is_empty() && dot {
                SrvAnswer::Dot
            } else if out.is_empty() {
                SrvAnswer::None { nxdomain: false }
            } else {
                SrvAnswer::Records(out)
            }
        }
        Err(e) => no_records(&e),
    }
}

fn no_records(e: &NetError) -> SrvAnswer {
    if e.is_no_records_found() {
        SrvAnswer::None {
            nxdomain: e.is_nx_domain(),
        }
    } else {
        SrvAnswer::Failed(e.to_string())
    }
}

fn build_resolver(cfg: &S2sConfig) -> Result<TokioResolver, String> {
    let timeout = Duration::from_secs(cfg.dns_timeout_secs.max(1));
    let mut builder = match cfg.resolver.as_deref().and_then(parse_nameserver) {
        Some(addr) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), vec![ns]),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio()
            .map_err(|e| format!("no usable system DNS configuration: {e}"))?,
    };
    let opts = builder.options_mut();
    opts.timeout = timeout;
    opts.attempts = 2;
    builder.build().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn srv(priority: u16, weight: u16, target: &str) -> Srv {
        Srv {
            priority,
            weight,
            port: 5269,
            target: target.into(),
            direct_tls: false,
        }
    }

    #[test]
    fn priorities_come_in_ascending_order() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..50 {
            let out = order_srv(
                vec![
                    srv(20, 0, "c"),
                    srv(10, 5, "a"),
                    srv(30, 1, "d"),
                    srv(10, 5, "b"),
                ],
                &mut rng,
            );
            let prios: Vec<u16> = out.iter().map(|r| r.priority).collect();
            assert_eq!(prios, vec![10, 10, 20, 30]);
            assert_eq!(out[2].target, "c");
            assert_eq!(out[3].target, "d");
        }
    }

    #[test]
    fn weights_share_the_first_place_proportionally() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut first = HashMap::new();
        let n = 20_000;
        for _ in 0..n {
            let out = order_srv(
                vec![srv(0, 10, "light"), srv(0, 30, "heavy"), srv(0, 0, "zero")],
                &mut rng,
            );
            assert_eq!(out.len(), 3);
            *first.entry(out[0].target.clone()).or_insert(0usize) += 1;
        }
        let heavy = first["heavy"] as f64 / n as f64;
        let light = first["light"] as f64 / n as f64;
        let zero = *first.get("zero").unwrap_or(&0) as f64 / n as f64;
        // Expected 30/41, 10/41 and 1/41 (the zero-weight record wins only
        // when the random pick is 0).
        assert!((heavy - 30.0 / 41.0).abs() < 0.03, "heavy {heavy}");
        assert!((light - 10.0 / 41.0).abs() < 0.03, "light {light}");
        assert!(zero < 0.05, "zero {zero}");
    }

    #[test]
    fn all_zero_weights_are_all_tried() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let out = order_srv(
            vec![srv(0, 0, "a"), srv(0, 0, "b"), srv(0, 0, "c")],
            &mut rng,
        );
        let mut t: Vec<String> = out.into_iter().map(|r| r.target).collect();
        t.sort();
        assert_eq!(t, vec!["a", "b", "c"]);
    }

    #[test]
    fn direct_tls_and_starttls_records_mix() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut tls = srv(5, 1, "tls");
        tls.direct_tls = true;
        let out = order_srv(vec![srv(10, 1, "plain"), tls], &mut rng);
        assert!(out[0].direct_tls);
        assert_eq!(out[1].target, "plain");
    }

    #[test]
    fn static_targets_and_nameservers_parse() {
        assert_eq!(
            parse_static_target("tls://127.0.0.1:5270"),
            Some(("127.0.0.1:5270".parse().unwrap(), true))
        );
        assert_eq!(
            parse_static_target("[::1]:5269"),
            Some(("[::1]:5269".parse().unwrap(), false))
        );
        assert_eq!(parse_static_target("example.org:5269"), None);
        assert_eq!(
            parse_nameserver("127.0.0.53"),
            Some("127.0.0.53:53".parse().unwrap())
        );
        assert_eq!(
            parse_nameserver("127.0.0.1:5353"),
            Some("127.0.0.1:5353".parse().unwrap())
        );
        assert_eq!(parse_nameserver("dns.example"), None);
    }
}
