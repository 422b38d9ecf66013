//! The server: shared context, listeners, connection limits, graceful
//! shutdown. [`Server::start`] runs the whole server in-process, which is
//! what `starling serve` and the integration tests both use.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use minidom::Element;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::AuthThrottle;
use crate::config::Config;
use crate::modules::Modules;
use crate::router::{RemoteRouter, Service};
use crate::sessions::SessionTable;
use crate::storage::Store;
use crate::tls::CertStore;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Store(#[from] crate::storage::StoreError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
}

/// Everything connections and modules share.
pub struct ServerInner {
    pub config: Config,
    pub store: Store,
    pub sessions: SessionTable,
    pub modules: Modules,
    /// The message archive (user and room archives): ids, the batching
    /// writer, queries.
    pub archive: Arc<crate::modules::mam::archive::Archive>,
    pub certs: Arc<CertStore>,
    pub c2s_tls: Arc<rustls::ServerConfig>,
    pub c2s_direct_tls: Arc<rustls::ServerConfig>,
    pub throttle: AuthThrottle,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    pub connections: ConnectionLimiter,
    /// Resumable stream-management sessions by SM-ID.
    pub sm_registry: crate::c2s::sm::SmRegistry,
    services: RwLock<HashMap<String, Arc<dyn Service>>>,
    remote: RwLock<Option<Arc<dyn RemoteRouter>>>,
    pending_iqs: Mutex<HashMap<String, oneshot::Sender<Element>>>,
    c2s_settings: std::sync::OnceLock<[Arc<crate::c2s::C2sSettings>; 2]>,
    /// Federation, once started.
    s2s: std::sync::OnceLock<Arc<crate::s2s::S2s>>,
    /// Secret for deriving values that must be stable per server (fake SCRAM
    /// salts for unknown users).
    pub secret: Vec<u8>,
}

/// A cheap handle to the shared server context.
#[derive(Clone)]
pub struct Server(Arc<ServerInner>);

impl Deref for Server {
    type Target = ServerInner;
    fn deref(&self) -> &ServerInner {
        &self.0
    }
}

/// A running server, as returned by [`Server::start`].
pub struct ServerHandle {
    pub server: Server,
    /// Bound addresses of the STARTTLS client listeners.
    pub c2s_starttls: Vec<SocketAddr>,
    /// Bound addresses of the direct-TLS client listeners.
    pub c2s_direct_tls: Vec<SocketAddr>,
    /// Bound addresses of the server-to-server listeners (STARTTLS).
    pub s2s: Vec<SocketAddr>,
    /// Bound addresses of the server-to-server direct-TLS listeners.
    pub s2s_direct_tls: Vec<SocketAddr>,
}

impl ServerHandle {
    /// Stop accepting, close every stream (`system-shutdown`), wait for the
    /// connection tasks (bounded by `shutdown_grace_secs`), close the store.
    pub async fn shutdown(self) {
        self.server.stop().await;
    }
}

/// Counts connections in total and per IP address; a guard per connection.
#[derive(Debug, Default)]
pub struct ConnectionLimiter {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

pub struct ConnectionGuard<'a> {
    limiter: &'a ConnectionLimiter,
    ip: IpAddr,
}

impl ConnectionLimiter {
    pub fn try_acquire(
        &self,
        ip: IpAddr,
        max_total: usize,
        max_per_ip: usize,
    ) -> Option<ConnectionGuard<'_>> {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= max_per_ip || self.total.load(Ordering::Relaxed) >= max_total {
            if *n == 0 {
                per_ip.remove(&ip);
            }
            return None;
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(ConnectionGuard { limiter: self, ip })
    }

    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        let mut per_ip = self
            .limiter
            .per_ip
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
        self.limiter.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Which protocol a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    C2sStartTls,
    C2sDirectTls,
    /// Server-to-server, STARTTLS (port 5269).
    S2s,
    /// Server-to-server, direct TLS (XEP-0368, ALPN `xmpp-server`).
    S2sDirectTls,
}

impl ListenerKind {
    pub fn is_s2s(self) -> bool {
        matches!(self, ListenerKind::S2s | ListenerKind::S2sDirectTls)
    }
}

impl Server {
    /// Build the context without listening (used by the CLI for store work
    /// and by tests of modules).
    pub async fn build(config: Config) -> Result<Server, StartError> {
        config.validate()?;
        let store = Store::open(&config.database_url(), config.database.max_connections).await?;
        Self::build_with_store(config, store)
    }

    pub fn build_with_store(config: Config, store: Store) -> Result<Server, StartError> {
        let certs = CertStore::new(&config.tls, &config.server.domains)?;
        let c2s_tls = crate::tls::server_config(&certs, &[])?;
        let c2s_direct_tls = crate::tls::server_config(&certs, &[b"xmpp-client"])?;
        let modules = Modules::standard(&config);
        let throttle = AuthThrottle::new(
            config.auth.max_failures,
            Duration::from_secs(config.auth.failure_window_secs),
        );
        let archive = Arc::new(crate::modules::mam::archive::Archive::new(
            store.clone(),
            &config.archive,
        ));
        Ok(Server(Arc::new(ServerInner {
            archive,
            store,
            sessions: SessionTable::new(),
            modules,
            certs,
            c2s_tls,
            c2s_direct_tls,
            throttle,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            connections: ConnectionLimiter::default(),
            sm_registry: Default::default(),
            services: RwLock::new(HashMap::new()),
            remote: RwLock::new(None),
            pending_iqs: Mutex::new(HashMap::new()),
            c2s_settings: std::sync::OnceLock::new(),
            s2s: std::sync::OnceLock::new(),
            secret: crate::auth::random_bytes(32),
            config,
        })))
    }

    /// Open the store, bind every listener, start the modules.
    pub async fn start(config: Config) -> Result<ServerHandle, StartError> {
        let server = Self::build(config).await?;
        server.start_listening().await
    }

    /// Start with an already opened store (tests share one per backend).
    pub async fn start_with_store(
        config: Config,
        store: Store,
    ) -> Result<ServerHandle, StartError> {
        let server = Self::build_with_store(config, store)?;
        server.start_listening().await
    }

    async fn start_listening(self) -> Result<ServerHandle, StartError> {
        self.archive
            .start(&self.tasks, self.shutdown.clone())
            .await?;
        for m in self.modules.iter() {
            m.start(&self);
        }
        let mut handle = ServerHandle {
            server: self.clone(),
            c2s_starttls: Vec::new(),
            c2s_direct_tls: Vec::new(),
            s2s: Vec::new(),
            s2s_direct_tls: Vec::new(),
        };
        if self.config.s2s.enabled {
            let s2s = crate::s2s::S2s::new(&self).await?;
            let _ = self.s2s.set(s2s.clone());
            self.set_remote_router(s2s);
            for addr in self.config.s2s.listen.clone() {
                let local = self.listen(addr, ListenerKind::S2s).await?;
                handle.s2s.push(local);
            }
            for addr in self.config.s2s.direct_tls.clone() {
                let local = self.listen(addr, ListenerKind::S2sDirectTls).await?;
                handle.s2s_direct_tls.push(local);
            }
        }
        for addr in self.config.c2s.starttls.clone() {
            let local = self.listen(addr, ListenerKind::C2sStartTls).await?;
            handle.c2s_starttls.push(local);
        }
        for addr in self.config.c2s.direct_tls.clone() {
            let local = self.listen(addr, ListenerKind::C2sDirectTls).await?;
            handle.c2s_direct_tls.push(local);
        }
        tracing::info!(
            domains = ?self.config.server.domains,
            starttls = ?handle.c2s_starttls,
            direct_tls = ?handle.c2s_direct_tls,
            s2s = ?handle.s2s,
            s2s_direct_tls = ?handle.s2s_direct_tls,
            store = self.store.backend_name(),
            "Starling started"
        );
        Ok(handle)
    }

    async fn listen(&self, addr: SocketAddr, kind: ListenerKind) -> Result<SocketAddr, StartError> {
        let listener = bind_listener(addr).map_err(|e| StartError::Listen(addr, e))?;
        let local = listener
            .local_addr()
            .map_err(|e| StartError::Listen(addr, e))?;
        let server = self.clone();
        self.tasks
            .spawn(async move { server.accept_loop(listener, kind).await });
        Ok(local)
    }

    async fn accept_loop(self, listener: TcpListener, kind: ListenerKind) {
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let server = self.clone();
            self.tasks.spawn(async move {
                let limits = &server.config.limits;
                let Some(_guard) = server.connections.try_acquire(
                    peer.ip(),
                    limits.max_connections,
                    limits.max_connections_per_ip,
                ) else {
                    tracing::info!(%peer, "connection limit reached; refusing");
                    if !kind.is_s2s() {
                        crate::c2s::refuse(stream, kind).await;
                    }
                    return;
                };
                match kind {
                    ListenerKind::S2s => {
                        crate::s2s::connection::serve_incoming(server.clone(), stream, peer, false)
                            .await
                    }
                    ListenerKind::S2sDirectTls => {
                        crate::s2s::connection::serve_incoming(server.clone(), stream, peer, true)
                            .await
                    }
                    _ => crate::c2s::serve(server.clone(), stream, peer, kind).await,
                }
            });
        }
    }

    /// Initiate shutdown and wait for it to complete.
    pub async fn stop(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        let grace = Duration::from_secs(self.config.server.shutdown_grace_secs.max(1));
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some connections did not close within the grace period");
        }
        self.store.close().await;
        tracing::info!("Starling stopped");
    }

    /// Register a local service (e.g. MUC) under its own domain.
    pub fn register_service(&self, domain: &str, service: Arc<dyn Service>) {
        self.services
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(domain.to_owned(), service);
    }

    pub fn service(&self, domain: &str) -> Option<Arc<dyn Service>> {
        self.services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(domain)
            .cloned()
    }

    /// Services below `domain` for disco#items: (jid, name).
    pub fn service_items(&self, domain: &str) -> Vec<(String, String)> {
        let suffix = format!(".{domain}");
        let services = self.services.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(String, String)> = services
            .iter()
            .filter(|(d, _)| d.ends_with(&suffix))
            .map(|(d, s)| (d.clone(), s.label()))
            .collect();
        v.sort();
        v
    }

    pub fn set_remote_router(&self, r: Arc<dyn RemoteRouter>) {
        *self.remote.write().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }

    /// Federation, if enabled and started.
    pub fn s2s(&self) -> Option<Arc<crate::s2s::S2s>> {
        self.s2s.get().cloned()
    }

    pub fn remote_router(&self) -> Option<Arc<dyn RemoteRouter>> {
        self.remote
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Send an IQ from the server and get a future for its answer (result or
    /// error) routed back to the server. The IQ needs `id`, `from`, `to`.
    pub async fn send_iq(&self, iq: Element) -> oneshot::Receiver<Element> {
        let (tx, rx) = oneshot::channel();
        if let Some(id) = iq.attr("id") {
            self.pending_iqs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.to_owned(), tx);
        }
        self.route(iq).await;
        rx
    }

    pub(crate) fn resolve_pending_iq(&self, reply: Element) {
        let Some(id) = reply.attr("id") else { return };
        let waiter = self
            .pending_iqs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some(tx) = waiter {
            let _ = tx.send(reply);
        }
    }

    /// Settings of client streams on a listener of this kind.
    pub fn c2s_settings(&self, kind: ListenerKind) -> Arc<crate::c2s::C2sSettings> {
        let pair = self.c2s_settings.get_or_init(|| {
            let mut features = self.modules.stream_features();
            features.push(minidom::Element::builder("sm", crate::xml::ns::SM).build());
            features.push(minidom::Element::builder("csi", crate::xml::ns::CSI).build());
            features.push(crate::modules::disco::caps_element(self));
            let base = crate::c2s::C2sSettings {
                domains: self.config.server.domains.clone(),
                require_tls: self.config.c2s.require_tls,
                allow_plain: self.config.auth.allow_plain,
                starttls_available: true,
                max_auth_failures: self.config.auth.max_failures.max(1),
                post_auth_features: features,
                fake_salt_seed: self.secret.clone(),
                sm: self.config.sm.settings(),
            };
            let direct = crate::c2s::C2sSettings {
                starttls_available: false,
                ..base.clone()
            };
            [Arc::new(base), Arc::new(direct)]
        });
        match kind {
            ListenerKind::C2sDirectTls | ListenerKind::S2sDirectTls => pair[1].clone(),
            _ => pair[0].clone(),
        }
    }

    /// Is this JID a configured administrator?
    pub fn is_admin(&self, jid: &jid::Jid) -> bool {
        let bare = jid.to_bare();
        self.config
            .server
            .admins
            .iter()
            .any(|a| jid::BareJid::new(a).map(|a| a == bare).unwrap_or(false))
    }
}

/// Bind with SO_REUSEADDR and a large backlog (login storms).
fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}
