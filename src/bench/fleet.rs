//! Logging in many benchmark users at once, with bounded concurrency, and
//! probing what the server offers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use minidom::Element;
use tokio::sync::Semaphore;

use super::conn::{self, Conn, Handler, Target};
use super::stats::{Samples, Summary};
use super::users::username;
use crate::xml::ns;

/// What every scenario needs.
#[derive(Clone)]
pub struct Common {
    pub target: Target,
    /// Users are `<prefix><n>`.
    pub prefix: String,
    pub password: String,
    /// Logins in flight at once.
    pub concurrency: usize,
    /// The server's PID, for its CPU time and memory.
    pub server_pid: Option<u32>,
    /// Resource for every session.
    pub resource: String,
}

/// The outcome of logging in a set of users.
pub struct Logins {
    /// Connected sessions, by user index.
    pub conns: Vec<Conn>,
    /// Login latency (connect to session ready), microseconds.
    pub latency: Samples,
    /// Connect + TLS part of the latency.
    pub tls_latency: Samples,
    pub failures: BTreeMap<String, u64>,
    pub first_error: Option<String>,
    pub wall: Duration,
}

impl Logins {
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }
}

/// Log in the users with the given indexes (at most `concurrency` at a
/// time); give up on what is not done by `deadline`.
pub async fn login_many(
    common: &Common,
    users: impl IntoIterator<Item = usize>,
    handler: Arc<dyn Handler>,
    deadline: Duration,
) -> Logins {
    let sem = Arc::new(Semaphore::new(common.concurrency.max(1)));
    let mut set = tokio::task::JoinSet::new();
    let start = Instant::now();
    for idx in users {
        let sem = sem.clone();
        let handler = handler.clone();
        let c = common.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.ok()?;
            let user = username(&c.prefix, idx);
            Some(conn::login(idx, &user, &c.password, &c.resource, &c.target, handler).await)
        });
    }
    let mut out = Logins {
        conns: Vec::new(),
        latency: Samples::new(),
        tls_latency: Samples::new(),
        failures: BTreeMap::new(),
        first_error: None,
        wall: Duration::ZERO,
    };
    let end = tokio::time::Instant::now() + deadline;
    loop {
        match tokio::time::timeout_at(end, set.join_next()).await {
            Ok(Some(Ok(Some(Ok((conn, times)))))) => {
                out.latency.push(times.total.as_micros() as u64);
                out.tls_latency.push(times.tls.as_micros() as u64);
                out.conns.push(conn);
            }
            Ok(Some(Ok(Some(Err(e))))) => {
                *out.failures.entry(e.class()).or_default() += 1;
                if out.first_error.is_none() {
                    out.first_error = Some(e.to_string());
                }
            }
            Ok(Some(_)) => {
                *out.failures.entry("task".into()).or_default() += 1;
            }
            Ok(None) => break,
            Err(_) => {
                let left = set.len() as u64;
                *out.failures.entry("deadline".into()).or_default() += left;
                set.abort_all();
                break;
            }
        }
    }
    out.wall = start.elapsed();
    out.conns.sort_by_key(|c| c.idx);
    out
}

/// Latency summary of a login run, with the failures.
pub fn logins_json(l: &mut Logins) -> serde_json::Value {
    let lat: Summary = l.latency.summary();
    let tls: Summary = l.tls_latency.summary();
    serde_json::json!({
        "ok": l.conns.len(),
        "failed": l.failed(),
        "failures": l.failures,
        "first_error": l.first_error,
        "wall_s": l.wall.as_secs_f64(),
        "latency": lat,
        "tls_latency": tls,
    })
}

/// What the server says about itself: software version (XEP-0092), disco
/// features of the server and of the account (XEP-0030), whether it offers
/// stream management, and its MUC service if any.
pub async fn probe(conn: &Conn, domain: &str) -> serde_json::Value {
    let t = Duration::from_secs(10);
    let mut software = None;
    let mut version = None;
    if let Ok(r) = conn.iq(iq_get(domain, "query", ns::VERSION), t).await
        && let Some(q) = r.get_child("query", ns::VERSION)
    {
        software = q.get_child("name", ns::VERSION).map(|e| e.text());
        version = q.get_child("version", ns::VERSION).map(|e| e.text());
    }
    let server_features = disco_features(conn, domain, t).await;
    let account_features = disco_features(conn, &conn.jid.to_bare().to_string(), t).await;
    let has =
        |f: &str| server_features.iter().any(|x| x == f) || account_features.iter().any(|x| x == f);
    let sm = conn
        .features
        .as_ref()
        .map(|f| f.has_child("sm", ns::SM))
        .unwrap_or(false);
    let muc = find_muc_service(conn, domain).await;
    serde_json::json!({
        "software": software,
        "version": version,
        "sm": sm,
        "sm_enabled": conn.state.sm_enabled.load(std::sync::atomic::Ordering::Relaxed),
        "mam": has(ns::MAM),
        "carbons": has(ns::CARBONS),
        "offline": has(ns::OFFLINE),
        "muc_service": muc,
        "server_features": server_features,
        "account_features": account_features,
    })
}

pub fn iq_get(to: &str, child: &str, child_ns: &str) -> Element {
    Element::builder("iq", ns::CLIENT)
        .attr(crate::stanza::name("type"), "get")
        .attr(crate::stanza::name("to"), to)
        .append(Element::builder(child, child_ns).build())
        .build()
}

async fn disco_features(conn: &Conn, to: &str, t: Duration) -> Vec<String> {
    match conn.iq(iq_get(to, "query", ns::DISCO_INFO), t).await {
        Ok(r) => r
            .get_child("query", ns::DISCO_INFO)
            .map(|q| {
                q.children()
                    .filter(|c| c.name() == "feature")
                    .filter_map(|c| c.attr("var").map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// The first disco item of the server that is a text conference service.
pub async fn find_muc_service(conn: &Conn, domain: &str) -> Option<String> {
    let t = Duration::from_secs(10);
    let items = conn
        .iq(iq_get(domain, "query", ns::DISCO_ITEMS), t)
        .await
        .ok()?;
    let q = items.get_child("query", ns::DISCO_ITEMS)?;
    for item in q.children().filter(|c| c.name() == "item") {
        let Some(jid) = item.attr("jid") else {
            continue;
        };
        let Ok(info) = conn.iq(iq_get(jid, "query", ns::DISCO_INFO), t).await else {
            continue;
        };
        let is_muc = info
            .get_child("query", ns::DISCO_INFO)
            .map(|q| {
                q.children().any(|c| {
                    (c.name() == "identity"
                        && c.attr("category") == Some("conference")
                        && c.attr("type") == Some("text"))
                        || (c.name() == "feature" && c.attr("var") == Some(ns::MUC))
                })
            })
            .unwrap_or(false);
        if is_muc {
            return Some(jid.to_owned());
        }
    }
    None
}
