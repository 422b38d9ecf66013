//! Server-to-server streams (federation, RFC 6120).
//!
//! - [`incoming`] and [`outgoing`]: the two sides of a stream as sans-IO
//!   state machines (TLS, SASL EXTERNAL per XEP-0178, Server Dialback per
//!   XEP-0220 with keys per XEP-0185, stream management per XEP-0198).
//! - [`connection`]: the IO drivers (one task per stream) over the shared
//!   [`crate::stream::XmlConn`].
//! - [`dns`]: SRV resolution (`_xmpps-server`, `_xmpp-server`, RFC 2782
//!   order, A/AAAA fallback), static overrides.
//! - [`pkix`]: peer certificate checks (RFC 6125 names, trust anchors).
//! - [`S2s`] (this file): the [`RemoteRouter`] the router hands remote
//!   stanzas to. One outgoing stream per (local domain, remote domain),
//!   reused, with a bounded queue; failures bounce queued stanzas with
//!   `remote-server-not-found` or `remote-server-timeout`.

pub mod connection;
pub mod dialback;
pub mod dns;
pub mod incoming;
pub mod outgoing;
pub mod pkix;
pub mod testca;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use minidom::Element;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::config::S2sConfig;
use crate::router::RemoteRouter;
use crate::server::{Server, StartError};
use crate::stanza::{self, StanzaError};
use crate::storage::SecretStore;
use crate::tls::TlsError;
use incoming::DialbackOutcome;

/// A request for an outgoing stream other than a stanza.
pub(crate) enum Control {
    /// XEP-0220 step 2: ask the authoritative server about a key.
    Verify {
        id: String,
        key: String,
        reply: oneshot::Sender<DialbackOutcome>,
    },
}

/// The handle of one outgoing stream task.
struct Route {
    id: u64,
    stanzas: mpsc::Sender<Element>,
    control: mpsc::Sender<Control>,
}

/// What an established outgoing stream negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    /// "EXTERNAL" or "dialback".
    pub method: &'static str,
    /// Connected with direct TLS (XEP-0368) rather than STARTTLS.
    pub direct_tls: bool,
    /// Stream management (XEP-0198) is on.
    pub sm: bool,
    pub peer: std::net::SocketAddr,
}

/// A remote domain that could not be reached, remembered for a while.
#[derive(Debug, Clone)]
pub struct Unreachable {
    pub until: Instant,
    pub condition: &'static str,
    pub reason: String,
}

/// Federation: outgoing stream management, incoming stream bookkeeping and
/// the shared TLS, DNS and dialback state.
pub struct S2s {
    pub cfg: S2sConfig,
    pub resolver: dns::Resolver,
    pub verifier: pkix::PeerVerifier,
    /// Dialback secret (XEP-0185).
    pub secret: Arc<Vec<u8>>,
    /// Server TLS configurations: STARTTLS, direct TLS (ALPN xmpp-server).
    pub server_tls: [Arc<rustls::ServerConfig>; 2],
    client_tls: Mutex<HashMap<(String, bool, bool), Arc<rustls::ClientConfig>>>,
    routes: Mutex<HashMap<(String, String), Route>>,
    unreachable: Mutex<HashMap<String, Unreachable>>,
    /// Remote domains that dropped the stream during SASL EXTERNAL: use
    /// dialback with them for a while.
    no_external: Mutex<HashMap<String, Instant>>,
    /// Authenticated incoming streams per remote domain.
    incoming: Mutex<HashMap<String, usize>>,
    /// Established outgoing streams.
    established: Mutex<HashMap<(String, String), StreamInfo>>,
    next_id: AtomicU64,
}

/// Counts one authenticated incoming stream of a remote domain.
pub struct IncomingGuard {
    s2s: Arc<S2s>,
    domain: String,
}

impl Drop for IncomingGuard {
    fn drop(&mut self) {
        let mut m = self.s2s.incoming.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.domain) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.domain);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl S2s {
    /// Set up federation for a server (TLS configurations, trust anchors,
    /// the dialback secret).
    pub async fn new(server: &Server) -> Result<Arc<S2s>, StartError> {
        let cfg = server.config.s2s.clone();
        let secret = if cfg.dialback_secret.is_empty() {
            server
                .store
                .get_or_create_secret("s2s-dialback", &crate::auth::random_bytes(32))
                .await?
        } else {
            cfg.dialback_secret.as_bytes().to_vec()
        };
        let verifier = pkix::PeerVerifier::load(cfg.ca_file.as_deref(), cfg.system_roots)?;
        let server_tls = [
            crate::tls::s2s_server_config(&server.certs, &[])?,
            crate::tls::s2s_server_config(&server.certs, &[b"xmpp-server"])?,
        ];
        tracing::debug!(
            anchors = verifier.anchor_count(),
            "s2s trust anchors loaded"
        );
        Ok(Arc::new(S2s {
            resolver: dns::Resolver::new(&cfg),
            verifier,
            secret: Arc::new(secret),
            server_tls,
            client_tls: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            unreachable: Mutex::new(HashMap::new()),
            no_external: Mutex::new(HashMap::new()),
            incoming: Mutex::new(HashMap::new()),
            established: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            cfg,
        }))
    }

    /// The TLS client configuration for streams from `local` (with ALPN
    /// `xmpp-server` for direct TLS; presenting our certificate or not).
    pub fn client_tls(
        &self,
        server: &Server,
        local: &str,
        direct: bool,
        present_cert: bool,
    ) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let key = (local.to_owned(), direct, present_cert);
        if let Some(c) = lock(&self.client_tls).get(&key) {
            return Ok(c.clone());
        }
        let alpn: &[&[u8]] = if direct { &[b"xmpp-server"] } else { &[] };
        let c = crate::tls::s2s_client_config_with(&server.certs, local, alpn, present_cert)?;
        lock(&self.client_tls).insert(key, c.clone());
        Ok(c)
    }

    fn retry_delay(&self) -> Duration {
        Duration::from_secs(self.cfg.retry_after_secs)
    }

    /// Is the remote domain marked as unreachable?
    pub fn unreachable(&self, remote: &str) -> Option<Unreachable> {
        let mut m = lock(&self.unreachable);
        match m.get(remote) {
            Some(u) if u.until > Instant::now() => Some(u.clone()),
            Some(_) => {
                m.remove(remote);
                None
            }
            None => None,
        }
    }

    pub(crate) fn mark_unreachable(&self, remote: &str, condition: &'static str, reason: &str) {
        if self.cfg.retry_after_secs == 0 {
            return;
        }
        lock(&self.unreachable).insert(
            remote.to_owned(),
            Unreachable {
                until: Instant::now() + self.retry_delay(),
                condition,
                reason: reason.to_owned(),
            },
        );
    }

    pub(crate) fn mark_reachable(&self, remote: &str) {
        lock(&self.unreachable).remove(remote);
    }

    pub(crate) fn external_allowed(&self, remote: &str) -> bool {
        let mut m = lock(&self.no_external);
        match m.get(remote) {
            Some(until) if *until > Instant::now() => false,
            Some(_) => {
                m.remove(remote);
                true
            }
            None => true,
        }
    }

    pub(crate) fn avoid_external(&self, remote: &str) {
        lock(&self.no_external).insert(
            remote.to_owned(),
            Instant::now() + Duration::from_secs(3600),
        );
    }

    /// Register an authenticated incoming stream; None if the remote domain
    /// has too many already.
    pub fn register_incoming(self: &Arc<Self>, domain: &str) -> Option<IncomingGuard> {
        let mut m = lock(&self.incoming);
        let n = m.entry(domain.to_owned()).or_insert(0);
        if *n >= self.cfg.max_streams_per_domain.max(1) {
            return None;
        }
        *n += 1;
        Some(IncomingGuard {
            s2s: self.clone(),
            domain: domain.to_owned(),
        })
    }

    /// Authenticated incoming streams per remote domain (for status).
    pub fn incoming_counts(&self) -> HashMap<String, usize> {
        lock(&self.incoming).clone()
    }

    /// The established outgoing stream for (local, remote), if any.
    pub fn outgoing_info(&self, local: &str, remote: &str) -> Option<StreamInfo> {
        lock(&self.established)
            .get(&(local.to_owned(), remote.to_owned()))
            .cloned()
    }

    pub(crate) fn set_established(&self, local: &str, remote: &str, info: Option<StreamInfo>) {
        let key = (local.to_owned(), remote.to_owned());
        let mut m = lock(&self.established);
        match info {
            Some(i) => {
                m.insert(key, i);
            }
            None => {
                m.remove(&key);
            }
        }
    }

    /// Outgoing streams by (local, remote) (for status).
    pub fn outgoing_routes(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> = lock(&self.routes).keys().cloned().collect();
        v.sort();
        v
    }

    /// The stream task for (local, remote): the existing one, or a new one.
    fn route(
        self: &Arc<Self>,
        server: &Server,
        local: &str,
        remote: &str,
    ) -> (u64, mpsc::Sender<Element>, mpsc::Sender<Control>) {
        let key = (local.to_owned(), remote.to_owned());
        let mut routes = lock(&self.routes);
        if let Some(r) = routes.get(&key)
            && !r.stanzas.is_closed()
        {
            return (r.id, r.stanzas.clone(), r.control.clone());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.cfg.queue_length.max(1));
        let (ctx, crx) = mpsc::channel(64);
        routes.insert(
            key,
            Route {
                id,
                stanzas: tx.clone(),
                control: ctx.clone(),
            },
        );
        drop(routes);
        let s2s = self.clone();
        let server = server.clone();
        let (local, remote) = (local.to_owned(), remote.to_owned());
        server.clone().tasks.spawn(async move {
            connection::run_outgoing(server, s2s, local, remote, id, rx, crx).await;
        });
        (id, tx, ctx)
    }

    /// Forget the route (local, remote) if it is still the task `id`.
    pub(crate) fn remove_route(&self, local: &str, remote: &str, id: u64) {
        let key = (local.to_owned(), remote.to_owned());
        let mut routes = lock(&self.routes);
        if routes.get(&key).is_some_and(|r| r.id == id) {
            routes.remove(&key);
        }
    }

    /// Bounce a stanza to its local sender (never for errors).
    pub(crate) async fn bounce(
        server: &Server,
        stanza: &Element,
        condition: &'static str,
        text: &str,
    ) {
        if stanza::is_error(stanza) {
            tracing::debug!("undeliverable error stanza to a remote domain dropped");
            return;
        }
        let mut err = StanzaError::new(condition);
        if !text.is_empty() {
            err = err.with_text(text);
        }
        server.bounce(stanza, err).await;
    }

    /// Queue a stanza for (local, remote).
    pub(crate) async fn enqueue(
        self: &Arc<Self>,
        server: &Server,
        local: &str,
        remote: &str,
        stanza: Element,
    ) {
        if let Some(u) = self.unreachable(remote) {
            tracing::debug!(%remote, reason = %u.reason, "remote domain marked unreachable; bouncing");
            return Self::bounce(server, &stanza, u.condition, &u.reason).await;
        }
        let mut stanza = stanza;
        for _ in 0..3 {
            let (id, tx, _) = self.route(server, local, remote);
            match tx.try_send(stanza) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Closed(s)) => {
                    self.remove_route(local, remote, id);
                    stanza = s;
                }
                Err(mpsc::error::TrySendError::Full(s)) => {
                    match tx.send_timeout(s, Duration::from_secs(3)).await {
                        Ok(()) => return,
                        Err(mpsc::error::SendTimeoutError::Timeout(s)) => {
                            tracing::warn!(%local, %remote, "s2s queue full; bouncing");
                            return Self::bounce(
                                server,
                                &s,
                                "resource-constraint",
                                "too many stanzas queued for the remote server",
                            )
                            .await;
                        }
                        Err(mpsc::error::SendTimeoutError::Closed(s)) => {
                            self.remove_route(local, remote, id);
                            stanza = s;
                        }
                    }
                }
            }
        }
        Self::bounce(
            server,
            &stanza,
            "internal-server-error",
            "no stream to the remote server",
        )
        .await;
    }

    /// As the receiving server, ask the authoritative server of `remote`
    /// whether `key` is valid for our stream `stream_id` (XEP-0220 step 2).
    pub async fn verify_dialback(
        self: &Arc<Self>,
        server: &Server,
        local: &str,
        remote: &str,
        stream_id: &str,
        key: &str,
    ) -> DialbackOutcome {
        if let Some(u) = self.unreachable(remote) {
            tracing::info!(%remote, reason = %u.reason, "cannot verify dialback: remote unreachable");
            return DialbackOutcome::Error(if u.condition == "remote-server-not-found" {
                "remote-server-not-found"
            } else {
                "remote-server-timeout"
            });
        }
        let (reply, rx) = oneshot::channel();
        let (_, _, control) = self.route(server, local, remote);
        let req = Control::Verify {
            id: stream_id.to_owned(),
            key: key.to_owned(),
            reply,
        };
        if control.try_send(req).is_err() {
            return DialbackOutcome::Error("resource-constraint");
        }
        let wait = Duration::from_secs(
            self.cfg.auth_timeout_secs + self.cfg.connect_timeout_secs + self.cfg.dns_timeout_secs,
        );
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(outcome)) => outcome,
            _ => DialbackOutcome::Error("remote-server-timeout"),
        }
    }

    /// Diagnose the connection to a remote domain step by step (DNS,
    /// connect, TLS, authentication) for `starling s2s-check`.
    pub async fn check(
        self: &Arc<Self>,
        server: &Server,
        local: &str,
        remote: &str,
    ) -> Vec<String> {
        connection::diagnose(server, self, local, remote).await
    }
}

#[async_trait]
impl RemoteRouter for S2s {
    async fn send(&self, server: &Server, stanza: Element) {
        let Some(s2s) = server.s2s() else {
            return Self::bounce(
                server,
                &stanza,
                "remote-server-not-found",
                "federation is off",
            )
            .await;
        };
        let to = stanza::jid_attr(&stanza, "to").ok().flatten();
        let from = stanza::jid_attr(&stanza, "from").ok().flatten();
        let (Some(to), Some(from)) = (to, from) else {
            tracing::debug!("stanza to a remote domain without valid from/to dropped");
            return;
        };
        let remote = to.domain().as_str().to_owned();
        let local = from.domain().as_str().to_owned();
        if !server.is_local_host(&local) {
            tracing::warn!(%local, %remote, "stanza from a non-local domain to a remote domain dropped");
            return;
        }
        if !self.cfg.allows(&remote) {
            return Self::bounce(
                server,
                &stanza,
                "not-allowed",
                "federation with this domain is not allowed",
            )
            .await;
        }
        s2s.enqueue(server, &local, &remote, stanza).await;
    }
}

/// The [`incoming::Policy`] of a running server.
pub struct ServerPolicy(pub Server);

impl incoming::Policy for ServerPolicy {
    fn is_local_host(&self, domain: &str) -> bool {
        self.0.is_local_host(domain)
    }
    fn allows_remote(&self, domain: &str) -> bool {
        !self.0.is_local_host(domain) && self.0.config.s2s.allows(domain)
    }
}

impl Server {
    /// A domain we serve: a configured domain or a local service's domain.
    pub fn is_local_host(&self, domain: &str) -> bool {
        self.config.is_local_domain(domain) || self.service(domain).is_some()
    }
}
