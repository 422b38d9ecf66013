//! The IO side of server-to-server streams: one task per incoming stream
//! and one per outgoing (local domain, remote domain) stream, each driving
//! its sans-IO machine over an [`XmlConn`].

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use minidom::Element;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::dns::{ResolveError, Target};
use super::incoming::{self, DialbackOutcome, InMachine, InSettings, header_bytes};
use super::outgoing::{self, Failure, OutMachine, OutSettings, Phase};
use super::pkix::{PeerCert, PeerRole};
use super::{Control, IncomingGuard, S2s, ServerPolicy};
use crate::c2s::sm::SmSettings;
use crate::server::Server;
use crate::stream::{Socket, XmlConn};
use crate::xml::ns;

/// Stanzas taken from the queue per wake-up before writing.
const BATCH: usize = 256;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n.max(1))
}

/// A token bucket (bytes or stanzas per second).
struct Bucket {
    rate: f64,
    cap: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64, cap: u64) -> Bucket {
        let rate = rate.max(1) as f64;
        let cap = (cap.max(1) as f64).max(rate.min(cap.max(1) as f64));
        Bucket {
            rate,
            cap,
            tokens: cap,
            last: Instant::now(),
        }
    }

    /// Take `n` tokens; returns how long to wait until the bucket is no
    /// longer in debt (zero if it is not).
    fn take(&mut self, n: u64) -> Duration {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.cap) - n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

// ---------------------------------------------------------------------------
// Incoming streams

/// Serve one incoming server-to-server connection.
pub async fn serve_incoming(server: Server, tcp: TcpStream, peer: SocketAddr, direct_tls: bool) {
    let Some(s2s) = server.s2s() else { return };
    let cfg = &s2s.cfg;
    let (socket, secure) = if direct_tls {
        let acceptor = tokio_rustls::TlsAcceptor::from(s2s.server_tls[1].clone());
        match tokio::time::timeout(secs(cfg.auth_timeout_secs), acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => (Socket::Tls(Box::new(tls)), true),
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "s2s: incoming TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "s2s: incoming TLS handshake timed out");
                return;
            }
        }
    } else {
        (Socket::Plain(tcp), false)
    };
    let conn = XmlConn::new(socket, peer, cfg.max_stanza_bytes, ns::SERVER);
    let cert = if secure {
        s2s.verifier
            .check(&conn.socket().peer_certificates(), PeerRole::Client)
    } else {
        PeerCert::none()
    };
    let settings = InSettings {
        policy: Arc::new(ServerPolicy(server.clone())),
        secret: s2s.secret.clone(),
        require_tls: cfg.require_tls,
        secure_auth: cfg.secure_auth,
        dialback: cfg.dialback,
        starttls_available: !direct_tls,
        stream_management: cfg.stream_management,
        max_pending_dialback: 8,
    };
    let (verify_tx, verify_rx) = mpsc::channel(16);
    let now = Instant::now();
    let mut task = InTask {
        bytes: Bucket::new(cfg.max_bytes_per_sec, cfg.max_bytes_per_sec),
        stanzas: Bucket::new(cfg.max_stanzas_per_sec, cfg.max_stanza_burst),
        machine: InMachine::new(settings, secure, cert),
        server,
        s2s,
        conn,
        peer,
        verify_tx,
        verify_rx,
        guards: Vec::new(),
        started: now,
        last_activity: now,
        ending: false,
        resets: 0,
        received: 0,
    };
    task.run().await;
    task.conn.shutdown().await;
    tracing::debug!(%peer, remote = ?task.machine.claimed(), stanzas = task.received, "s2s: incoming stream closed");
}

struct InTask {
    server: Server,
    s2s: Arc<S2s>,
    conn: XmlConn,
    machine: InMachine,
    peer: SocketAddr,
    verify_tx: mpsc::Sender<(String, String, DialbackOutcome)>,
    verify_rx: mpsc::Receiver<(String, String, DialbackOutcome)>,
    guards: Vec<IncomingGuard>,
    started: Instant,
    last_activity: Instant,
    ending: bool,
    resets: u64,
    bytes: Bucket,
    stanzas: Bucket,
    received: u64,
}

impl InTask {
    async fn run(&mut self) {
        let cfg = self.s2s.cfg.clone();
        while !self.ending {
            let deadline = if self.machine.is_authenticated() {
                self.last_activity + secs(cfg.idle_timeout_secs)
            } else {
                self.started + secs(cfg.auth_timeout_secs)
            };
            tokio::select! {
                biased;
                _ = self.server.shutdown.cancelled() => {
                    let outs = self.machine.fail("system-shutdown", None);
                    self.perform(outs).await;
                    self.ending = true;
                }
                r = self.conn.read() => match r {
                    Ok(0) | Err(_) => {
                        tracing::debug!(peer = %self.peer, "s2s: incoming connection closed by peer");
                        self.ending = true;
                    }
                    Ok(n) => {
                        self.last_activity = Instant::now();
                        self.on_input().await;
                        // Shaping: a peer sending faster than allowed waits.
                        let wait = self.bytes.take(n as u64);
                        if !wait.is_zero() && !self.ending {
                            tokio::time::sleep(wait.min(Duration::from_secs(5))).await;
                        }
                    }
                },
                v = self.verify_rx.recv() => {
                    if let Some((local, remote, outcome)) = v {
                        let outs = self.machine.handle(incoming::Input::DialbackChecked { local, remote, outcome });
                        self.perform(outs).await;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    if !self.machine.is_authenticated() {
                        tracing::info!(peer = %self.peer, remote = ?self.machine.claimed(), "s2s: incoming stream not authenticated in time");
                        let outs = self.machine.fail("connection-timeout", None);
                        self.perform(outs).await;
                    } else {
                        tracing::debug!(peer = %self.peer, "s2s: idle incoming stream closed");
                        self.conn.send_close();
                    }
                    self.ending = true;
                }
            }
            if self.conn.flush().await.is_err() {
                self.ending = true;
            }
        }
    }

    async fn on_input(&mut self) {
        let (events, err) = self.conn.take_events();
        for ev in events {
            if self.ending {
                return;
            }
            let generation = self.resets;
            let outs = self.machine.handle(incoming::Input::Stream(ev));
            self.perform(outs).await;
            if generation != self.resets {
                return;
            }
        }
        if let Some(e) = err
            && !self.ending
        {
            tracing::info!(peer = %self.peer, remote = ?self.machine.claimed(), error = %e, "s2s: XML error on incoming stream");
            let outs = self.machine.fail(e.condition(), None);
            self.perform(outs).await;
        }
    }

    async fn perform(&mut self, outputs: Vec<incoming::Output>) {
        let mut queue: VecDeque<incoming::Output> = outputs.into();
        while let Some(out) = queue.pop_front() {
            use incoming::Output as O;
            match out {
                O::SendHeader {
                    id,
                    from,
                    to,
                    version,
                } => self.conn.send_bytes(&header_bytes(
                    from.as_deref(),
                    to.as_deref(),
                    Some(&id),
                    version,
                )),
                O::Send(el) => self.conn.send_element(&el),
                O::StartTls => {
                    self.resets += 1;
                    let cfg = self.s2s.server_tls[0].clone();
                    let timeout = secs(self.s2s.cfg.auth_timeout_secs);
                    match self.conn.starttls_server(cfg, timeout).await {
                        Ok(()) => {
                            let cert = self
                                .s2s
                                .verifier
                                .check(&self.conn.socket().peer_certificates(), PeerRole::Client);
                            tracing::debug!(peer = %self.peer, trusted = cert.chain_error.is_none(), names = %cert.names.describe(), "s2s: incoming TLS established");
                            queue
                                .extend(self.machine.handle(incoming::Input::TlsEstablished(cert)));
                        }
                        Err(e) => {
                            tracing::info!(peer = %self.peer, error = %e, "s2s: incoming STARTTLS failed");
                            self.ending = true;
                            return;
                        }
                    }
                }
                O::ResetStream => {
                    self.conn.reset();
                    self.resets += 1;
                }
                O::VerifyDialback {
                    local,
                    remote,
                    stream_id,
                    key,
                } => {
                    let (server, s2s, tx) = (
                        self.server.clone(),
                        self.s2s.clone(),
                        self.verify_tx.clone(),
                    );
                    tracing::debug!(%local, %remote, "s2s: verifying a dialback key with the authoritative server");
                    self.server.tasks.spawn(async move {
                        let outcome = s2s
                            .verify_dialback(&server, &local, &remote, &stream_id, &key)
                            .await;
                        let _ = tx.send((local, remote, outcome)).await;
                    });
                }
                O::Authenticated { remote, method } => match self.s2s.register_incoming(&remote) {
                    Some(g) => {
                        self.guards.push(g);
                        tracing::info!(peer = %self.peer, %remote, local = ?self.machine.local(), method, tls = self.conn.is_tls(), "s2s: incoming stream authenticated");
                    }
                    None => {
                        tracing::warn!(peer = %self.peer, %remote, "s2s: too many incoming streams from this domain");
                        queue.clear();
                        queue.extend(self.machine.fail(
                            "policy-violation",
                            Some("too many streams from your domain"),
                        ));
                    }
                },
                O::Stanza(el) => {
                    self.received += 1;
                    if !self.stanzas.take(1).is_zero() {
                        tracing::warn!(peer = %self.peer, remote = ?self.machine.claimed(), "s2s: stanza flood; cutting the stream off");
                        queue.clear();
                        queue.extend(
                            self.machine
                                .fail("policy-violation", Some("too many stanzas; slow down")),
                        );
                        continue;
                    }
                    self.server.route(el).await;
                }
                O::Bounce(el, err) => self.server.bounce(&el, err).await,
                O::StreamError { condition, text } => {
                    self.conn
                        .send_stream_error(condition, text.as_deref(), None);
                    self.ending = true;
                }
                O::CloseStream => {
                    self.conn.send_close();
                    self.ending = true;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Outgoing streams

/// How a stream ended.
enum End {
    Shutdown,
    /// Closed after being idle.
    Idle,
    /// Negotiation failed; give up.
    Failed(Failure),
    /// The peer dropped the stream while SASL EXTERNAL was in progress.
    ExternalDropped(String),
    /// The stream went away after being established (or while setting up).
    Lost {
        reason: String,
        progress: bool,
    },
    /// Diagnostics: the stream was established and closed.
    Probed(&'static str),
}

struct OutTask {
    server: Server,
    s2s: Arc<S2s>,
    local: String,
    remote: String,
    id: u64,
    rx: mpsc::Receiver<Element>,
    crx: mpsc::Receiver<Control>,
    rx_open: bool,
    /// Stanzas to send first (unacknowledged on a stream that died).
    carry: VecDeque<Element>,
    waiters: HashMap<String, Vec<oneshot::Sender<DialbackOutcome>>>,
    try_external: bool,
    /// Diagnostics mode: stop once established, and write a report.
    report: Option<Vec<String>>,
    /// The current connection is direct TLS.
    direct_tls: bool,
}

pub(crate) async fn run_outgoing(
    server: Server,
    s2s: Arc<S2s>,
    local: String,
    remote: String,
    id: u64,
    rx: mpsc::Receiver<Element>,
    crx: mpsc::Receiver<Control>,
) {
    let try_external = s2s.external_allowed(&remote);
    let mut t = OutTask {
        server,
        s2s,
        local,
        remote,
        id,
        rx,
        crx,
        rx_open: true,
        carry: VecDeque::new(),
        waiters: HashMap::new(),
        try_external,
        report: None,
        direct_tls: false,
    };
    t.run().await;
}

fn failure(condition: &'static str, reason: impl Into<String>) -> Failure {
    Failure {
        condition,
        reason: reason.into(),
    }
}

impl OutTask {
    fn note(&mut self, line: impl Into<String>) {
        let line = line.into();
        tracing::debug!(local = %self.local, remote = %self.remote, "{line}");
        if let Some(r) = self.report.as_mut() {
            r.push(line);
        }
    }

    async fn run(&mut self) {
        let mut losses = 0;
        loop {
            if self.server.shutdown.is_cancelled() {
                return self.shut_down().await;
            }
            let shutdown = self.server.shutdown.clone();
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return self.shut_down().await,
                c = self.connect() => c,
            };
            let (conn, secure, cert) = match connected {
                Ok(c) => c,
                Err(f) => return self.give_up(f).await,
            };
            match self.stream(conn, secure, cert).await {
                End::Shutdown => return self.shut_down().await,
                End::Idle => return self.retire().await,
                End::Probed(_) => return,
                End::Failed(f) => return self.give_up(f).await,
                End::ExternalDropped(reason) => {
                    if self.try_external {
                        tracing::info!(local = %self.local, remote = %self.remote, %reason, "s2s: the remote server dropped the stream during SASL EXTERNAL; retrying with dialback");
                        self.note(format!(
                            "EXTERNAL: stream dropped ({reason}); retrying with dialback"
                        ));
                        self.try_external = false;
                        self.s2s.avoid_external(&self.remote);
                        continue;
                    }
                    return self
                        .give_up(failure(
                            "remote-server-timeout",
                            format!("authentication failed: {reason}"),
                        ))
                        .await;
                }
                End::Lost { reason, progress } => {
                    if progress {
                        losses = 0;
                    } else {
                        losses += 1;
                    }
                    let pending =
                        !self.carry.is_empty() || !self.rx.is_empty() || !self.waiters.is_empty();
                    if !pending {
                        tracing::debug!(local = %self.local, remote = %self.remote, %reason, "s2s: outgoing stream ended");
                        return self.retire().await;
                    }
                    if losses >= 2 {
                        return self
                            .give_up(failure(
                                "remote-server-timeout",
                                format!("the stream to the remote server broke: {reason}"),
                            ))
                            .await;
                    }
                    tracing::info!(local = %self.local, remote = %self.remote, %reason, resend = self.carry.len(), "s2s: outgoing stream lost; reconnecting");
                }
            }
        }
    }

    /// Resolve and connect: the first target that accepts a connection.
    async fn connect(&mut self) -> Result<(XmlConn, bool, PeerCert), Failure> {
        let s2s = self.s2s.clone();
        let targets = match s2s.resolver.targets(&self.remote).await {
            Ok(t) => t,
            Err(e) => {
                let condition = match e {
                    ResolveError::NotFound(_) | ResolveError::NoService => {
                        "remote-server-not-found"
                    }
                    ResolveError::Temporary(_) => "remote-server-timeout",
                };
                self.note(format!("{e}"));
                return Err(failure(condition, e.to_string()));
            }
        };
        self.note(format!(
            "DNS: {}",
            targets
                .iter()
                .map(|t| format!(
                    "{}:{}{}",
                    t.host,
                    t.port,
                    if t.direct_tls { " (direct TLS)" } else { "" }
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let mut reasons = Vec::new();
        for target in &targets {
            let addrs = match s2s.resolver.addresses(target).await {
                Ok(a) if !a.is_empty() => a,
                Ok(_) => {
                    reasons.push(format!("{}: no address", target.host));
                    continue;
                }
                Err(e) => {
                    reasons.push(e);
                    continue;
                }
            };
            for ip in addrs {
                let addr = SocketAddr::new(ip, target.port);
                match self.connect_one(target, addr).await {
                    Ok(c) => {
                        self.direct_tls = target.direct_tls;
                        self.note(format!(
                            "connected to {addr} ({})",
                            if target.direct_tls {
                                "direct TLS"
                            } else {
                                "STARTTLS"
                            }
                        ));
                        return Ok(c);
                    }
                    Err(e) => {
                        self.note(format!("connect {addr}: {e}"));
                        reasons.push(format!("{addr}: {e}"));
                    }
                }
            }
        }
        Err(failure(
            "remote-server-timeout",
            format!("could not connect: {}", reasons.join("; ")),
        ))
    }

    async fn connect_one(
        &self,
        target: &Target,
        addr: SocketAddr,
    ) -> Result<(XmlConn, bool, PeerCert), String> {
        let cfg = &self.s2s.cfg;
        let tcp =
            match tokio::time::timeout(secs(cfg.connect_timeout_secs), TcpStream::connect(addr))
                .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("connection timed out".into()),
            };
        let _ = tcp.set_nodelay(true);
        if !target.direct_tls {
            let conn = XmlConn::new(Socket::Plain(tcp), addr, cfg.max_stanza_bytes, ns::SERVER);
            return Ok((conn, false, PeerCert::none()));
        }
        let tls = self
            .s2s
            .client_tls(&self.server, &self.local, true, self.try_external)
            .map_err(|e| e.to_string())?;
        let name = server_name(&self.remote)?;
        let connector = tokio_rustls::TlsConnector::from(tls);
        match tokio::time::timeout(secs(cfg.auth_timeout_secs), connector.connect(name, tcp)).await
        {
            Ok(Ok(s)) => {
                if s.get_ref().1.alpn_protocol() != Some(b"xmpp-server".as_slice()) {
                    tracing::debug!(%addr, "direct TLS peer did not confirm ALPN xmpp-server");
                }
                let conn = XmlConn::new(
                    Socket::ClientTls(Box::new(s)),
                    addr,
                    cfg.max_stanza_bytes,
                    ns::SERVER,
                );
                let cert = self
                    .s2s
                    .verifier
                    .check(&conn.socket().peer_certificates(), PeerRole::Server);
                Ok((conn, true, cert))
            }
            Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
            Err(_) => Err("TLS handshake timed out".into()),
        }
    }

    fn settings(&self) -> OutSettings {
        let cfg = &self.s2s.cfg;
        OutSettings {
            local: self.local.clone(),
            remote: self.remote.clone(),
            secret: self.s2s.secret.clone(),
            require_tls: cfg.require_tls,
            secure_auth: cfg.secure_auth,
            dialback: cfg.dialback,
            try_external: self.try_external,
            stream_management: cfg.stream_management,
            sm: SmSettings {
                resumption: false,
                default_timeout: 0,
                max_timeout: 0,
                request_after_stanzas: 32,
                request_after: Duration::from_millis(500),
                ack_timeout: secs(cfg.auth_timeout_secs),
                max_unacked: cfg.queue_length.max(16),
            },
        }
    }

    /// Run one connection from its header to its end.
    async fn stream(&mut self, mut conn: XmlConn, secure: bool, cert: PeerCert) -> End {
        let cfg = self.s2s.cfg.clone();
        let mut m = OutMachine::new(self.settings(), secure, cert);
        let negotiation_deadline = Instant::now() + secs(cfg.auth_timeout_secs);
        let mut last_activity = Instant::now();
        let mut resets = 0u64;
        let mut sent = 0u64;
        let start = m.start();
        if let Some(end) = self.perform(&mut conn, &mut m, start, &mut resets).await {
            return self.ended(&mut conn, &mut m, end).await;
        }
        if conn.flush().await.is_err() {
            let end = self.lost_end(&m, "write failed");
            return self.ended(&mut conn, &mut m, end).await;
        }
        loop {
            // Stanzas left from a broken stream go first.
            if m.is_established() {
                if self.report.is_some() {
                    let method = m.method();
                    self.note(format!("authenticated with {method}; closing"));
                    conn.send_close();
                    let _ = conn.flush().await;
                    conn.shutdown().await;
                    return End::Probed(method);
                }
                while m.can_send() {
                    let Some(s) = self.carry.pop_front() else {
                        break;
                    };
                    sent += 1;
                    let outs = m.handle(outgoing::Input::Stanza(s));
                    if let Some(end) = self.perform(&mut conn, &mut m, outs, &mut resets).await {
                        return self.ended(&mut conn, &mut m, end).await;
                    }
                }
            }
            let established = m.is_established();
            let deadline = if established {
                let idle = last_activity + secs(cfg.idle_timeout_secs);
                m.next_deadline().map_or(idle, |d| d.min(idle))
            } else {
                negotiation_deadline
            };
            let may_pull = established && m.can_send() && self.carry.is_empty() && self.rx_open;
            let mut outs = Vec::new();
            let mut end = None;
            tokio::select! {
                biased;
                _ = self.server.shutdown.cancelled() => {
                    conn.send_close();
                    let _ = conn.flush().await;
                    conn.shutdown().await;
                    let unacked = m.unacked();
                    if unacked > 0 {
                        tracing::info!(local = %self.local, remote = %self.remote, unacked, "s2s: shutdown with stanzas not yet acknowledged by the remote server");
                    }
                    self.fail_waiters(&mut m);
                    self.s2s.set_established(&self.local, &self.remote, None);
                    return End::Shutdown;
                }
                r = conn.read() => match r {
                    Ok(0) => end = Some(self.lost_end(&m, "the remote server closed the connection")),
                    Err(e) => end = Some(self.lost_end(&m, &format!("read error: {e}"))),
                    Ok(_) => {
                        last_activity = Instant::now();
                        let (events, err) = conn.take_events();
                        for ev in events {
                            let generation = resets;
                            let phase = m.phase();
                            let o = m.handle(outgoing::Input::Stream(ev));
                            if let Some(e) = self.perform_in(&mut conn, &mut m, o, &mut resets, phase).await {
                                end = Some(e);
                                break;
                            }
                            if generation != resets {
                                break;
                            }
                        }
                        if end.is_none() && let Some(e) = err {
                            tracing::info!(local = %self.local, remote = %self.remote, error = %e, "s2s: XML error on outgoing stream");
                            conn.send_stream_error(e.condition(), None, None);
                            end = Some(self.lost_end(&m, &format!("XML error from the remote server: {e}")));
                        }
                    }
                },
                c = self.crx.recv() => {
                    if let Some(Control::Verify { id, key, reply }) = c {
                        self.waiters.entry(id.clone()).or_default().push(reply);
                        outs = m.handle(outgoing::Input::Verify { id, key });
                    }
                }
                s = self.rx.recv(), if may_pull => match s {
                    Some(s) => {
                        last_activity = Instant::now();
                        sent += 1;
                        outs = m.handle(outgoing::Input::Stanza(s));
                        for _ in 0..BATCH {
                            if !m.can_send() {
                                break;
                            }
                            match self.rx.try_recv() {
                                Ok(s) => {
                                    sent += 1;
                                    outs.extend(m.handle(outgoing::Input::Stanza(s)));
                                }
                                Err(_) => break,
                            }
                        }
                        if self.rx.is_empty() {
                            outs.extend(m.handle(outgoing::Input::Drained));
                        }
                    }
                    None => self.rx_open = false,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    let now = Instant::now();
                    if !established {
                        end = Some(End::Failed(failure(
                            "remote-server-timeout",
                            format!("authentication did not complete within {} s", cfg.auth_timeout_secs),
                        )));
                        conn.send_stream_error("connection-timeout", None, None);
                    } else if now >= last_activity + secs(cfg.idle_timeout_secs) && m.unacked() == 0 {
                        tracing::debug!(local = %self.local, remote = %self.remote, "s2s: idle outgoing stream closed");
                        self.s2s.set_established(&self.local, &self.remote, None);
                        conn.send_close();
                        let _ = conn.flush().await;
                        conn.shutdown().await;
                        return End::Idle;
                    } else {
                        outs = m.handle(outgoing::Input::Tick);
                    }
                }
            }
            if end.is_none() {
                end = self.perform(&mut conn, &mut m, outs, &mut resets).await;
            }
            if end.is_none() && conn.flush().await.is_err() {
                end = Some(self.lost_end(&m, "write failed"));
            }
            if let Some(e) = end {
                // Progress: something was acknowledged (or, without stream
                // management, sent) on this stream.
                let acked = sent.saturating_sub(m.unacked() as u64);
                let e = match e {
                    End::Lost { reason, .. } => End::Lost {
                        reason,
                        progress: acked > 0,
                    },
                    other => other,
                };
                return self.ended(&mut conn, &mut m, e).await;
            }
        }
    }

    fn lost_end(&self, m: &OutMachine, reason: &str) -> End {
        match m.phase() {
            Phase::External => End::ExternalDropped(reason.to_owned()),
            Phase::Established => End::Lost {
                reason: reason.to_owned(),
                progress: false,
            },
            _ => End::Failed(failure(
                "remote-server-timeout",
                format!("{reason} during negotiation"),
            )),
        }
    }

    /// Wrap up a stream: keep its unacknowledged stanzas for a retry,
    /// answer pending verifications, close the socket.
    async fn ended(&mut self, conn: &mut XmlConn, m: &mut OutMachine, end: End) -> End {
        self.s2s.set_established(&self.local, &self.remote, None);
        let mut unacked = m.take_unacked();
        unacked.extend(self.carry.drain(..));
        self.carry = unacked.into();
        self.fail_waiters(m);
        let _ = conn.flush().await;
        conn.shutdown().await;
        end
    }

    fn fail_waiters(&mut self, m: &mut OutMachine) {
        let _ = m.take_verifies();
        for (_, ws) in self.waiters.drain() {
            for w in ws {
                let _ = w.send(DialbackOutcome::Error("remote-server-timeout"));
            }
        }
    }

    async fn perform(
        &mut self,
        conn: &mut XmlConn,
        m: &mut OutMachine,
        outs: Vec<outgoing::Output>,
        resets: &mut u64,
    ) -> Option<End> {
        let phase = m.phase();
        self.perform_in(conn, m, outs, resets, phase).await
    }

    /// Perform the machine's outputs; `phase` is where the negotiation
    /// stood before the input that produced them.
    async fn perform_in(
        &mut self,
        conn: &mut XmlConn,
        m: &mut OutMachine,
        outs: Vec<outgoing::Output>,
        resets: &mut u64,
        phase: Phase,
    ) -> Option<End> {
        use outgoing::Output as O;
        let mut queue: VecDeque<O> = outs.into();
        while let Some(out) = queue.pop_front() {
            match out {
                O::SendHeader => conn.send_bytes(&header_bytes(
                    Some(&self.local),
                    Some(&self.remote),
                    None,
                    true,
                )),
                O::Send(el) => conn.send_element(&el),
                O::StartTls => {
                    *resets += 1;
                    let cfg = match self.s2s.client_tls(
                        &self.server,
                        &self.local,
                        false,
                        self.try_external,
                    ) {
                        Ok(c) => c,
                        Err(e) => {
                            return Some(End::Failed(failure(
                                "remote-server-timeout",
                                e.to_string(),
                            )));
                        }
                    };
                    let name = match server_name(&self.remote) {
                        Ok(n) => n,
                        Err(e) => return Some(End::Failed(failure("remote-server-not-found", e))),
                    };
                    let timeout = secs(self.s2s.cfg.auth_timeout_secs);
                    if let Err(e) = conn.starttls_client(cfg, name, timeout).await {
                        self.note(format!("TLS: handshake failed: {e}"));
                        return Some(End::Failed(failure(
                            "remote-server-timeout",
                            format!("TLS handshake failed: {e}"),
                        )));
                    }
                    let cert = self
                        .s2s
                        .verifier
                        .check(&conn.socket().peer_certificates(), PeerRole::Server);
                    let verdict = match cert.valid_for(&self.remote) {
                        Ok(()) => "certificate valid".to_owned(),
                        Err(e) => e,
                    };
                    self.note(format!("TLS: established; {verdict}"));
                    queue.extend(m.handle(outgoing::Input::TlsEstablished(cert)));
                }
                O::ResetStream => {
                    conn.reset();
                    *resets += 1;
                }
                O::Established { method } => {
                    self.s2s.mark_reachable(&self.remote);
                    self.s2s.set_established(
                        &self.local,
                        &self.remote,
                        Some(super::StreamInfo {
                            method,
                            direct_tls: self.direct_tls,
                            sm: m.sm_enabled(),
                            peer: conn.peer(),
                        }),
                    );
                    tracing::info!(local = %self.local, remote = %self.remote, method, peer = %conn.peer(), tls = conn.is_tls(), "s2s: outgoing stream established");
                }
                O::VerifyResult { id, outcome } => {
                    if let Some(ws) = self.waiters.remove(&id) {
                        for w in ws {
                            let _ = w.send(outcome.clone());
                        }
                    }
                }
                O::Failed(f) => {
                    self.note(format!("authentication: {}", f.reason));
                    conn.send_close();
                    return Some(End::Failed(f));
                }
                O::StreamError { condition, text } => {
                    conn.send_stream_error(condition, text.as_deref(), None);
                    return Some(match phase {
                        Phase::Established => End::Lost {
                            reason: format!("we closed the stream: {condition}"),
                            progress: false,
                        },
                        _ => End::Failed(failure(
                            "remote-server-timeout",
                            format!("protocol error during negotiation: {condition}"),
                        )),
                    });
                }
                O::PeerClosed { error } => {
                    conn.send_close();
                    let why = match &error {
                        Some(c) => format!("the remote server closed the stream with <{c}/>"),
                        None => "the remote server closed the stream".to_owned(),
                    };
                    self.note(why.clone());
                    return Some(match phase {
                        Phase::External => End::ExternalDropped(why),
                        Phase::Established => End::Lost {
                            reason: why,
                            progress: false,
                        },
                        _ => {
                            let condition = match error.as_deref() {
                                Some("host-unknown") | Some("host-gone") => {
                                    "remote-server-not-found"
                                }
                                _ => "remote-server-timeout",
                            };
                            End::Failed(failure(condition, why))
                        }
                    });
                }
                O::Dead => {
                    return Some(End::Lost {
                        reason: "stream management acknowledgement overdue".into(),
                        progress: false,
                    });
                }
            }
        }
        None
    }

    /// Nothing more to do: forget the route; stanzas that raced in go to a
    /// new stream.
    async fn retire(&mut self) {
        self.s2s.remove_route(&self.local, &self.remote, self.id);
        self.rx.close();
        self.crx.close();
        let mut leftovers: Vec<Element> = self.carry.drain(..).collect();
        while let Ok(s) = self.rx.try_recv() {
            leftovers.push(s);
        }
        let controls = self.drain_controls();
        for s in leftovers {
            self.s2s
                .enqueue(&self.server, &self.local, &self.remote, s)
                .await;
        }
        for (id, key, reply) in controls {
            let outcome = self
                .s2s
                .verify_dialback(&self.server, &self.local, &self.remote, &id, &key)
                .await;
            let _ = reply.send(outcome);
        }
    }

    fn drain_controls(&mut self) -> Vec<(String, String, oneshot::Sender<DialbackOutcome>)> {
        let mut v = Vec::new();
        while let Ok(Control::Verify { id, key, reply }) = self.crx.try_recv() {
            v.push((id, key, reply));
        }
        v
    }

    /// The remote domain cannot be reached: bounce everything queued.
    async fn give_up(&mut self, f: Failure) {
        tracing::warn!(local = %self.local, remote = %self.remote, condition = f.condition, reason = %f.reason, "s2s: cannot deliver to the remote domain");
        self.note(format!("failed: {} ({})", f.reason, f.condition));
        if self.report.is_some() {
            return;
        }
        self.s2s
            .mark_unreachable(&self.remote, f.condition, &f.reason);
        self.s2s.remove_route(&self.local, &self.remote, self.id);
        self.rx.close();
        self.crx.close();
        let mut bounced = 0usize;
        let queued: Vec<Element> = self.carry.drain(..).collect();
        for s in queued {
            bounced += 1;
            S2s::bounce(&self.server, &s, f.condition, &f.reason).await;
        }
        while let Ok(s) = self.rx.try_recv() {
            bounced += 1;
            S2s::bounce(&self.server, &s, f.condition, &f.reason).await;
        }
        let verify_error = if f.condition == "remote-server-not-found" {
            "remote-server-not-found"
        } else {
            "remote-server-timeout"
        };
        for (_, _, reply) in self.drain_controls() {
            let _ = reply.send(DialbackOutcome::Error(verify_error));
        }
        for (_, ws) in self.waiters.drain() {
            for w in ws {
                let _ = w.send(DialbackOutcome::Error(verify_error));
            }
        }
        if bounced > 0 {
            tracing::info!(local = %self.local, remote = %self.remote, bounced, "s2s: queued stanzas bounced");
        }
    }

    /// The server stops: what is still queued cannot be delivered.
    async fn shut_down(&mut self) {
        self.s2s.remove_route(&self.local, &self.remote, self.id);
        self.rx.close();
        self.crx.close();
        let mut n = self.carry.len();
        self.carry.clear();
        while self.rx.try_recv().is_ok() {
            n += 1;
        }
        if n > 0 {
            tracing::warn!(local = %self.local, remote = %self.remote, stanzas = n, "s2s: stanzas still queued at shutdown were not delivered");
        }
        for (_, _, reply) in self.drain_controls() {
            let _ = reply.send(DialbackOutcome::Error("remote-server-timeout"));
        }
    }
}

fn server_name(domain: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(domain.to_owned())
        .map_err(|e| format!("invalid server name {domain}: {e}"))
}

/// Diagnose federation with `remote` from `local`: DNS, connection, TLS and
/// authentication, one line per step (`starling s2s-check`).
pub(crate) async fn diagnose(
    server: &Server,
    s2s: &Arc<S2s>,
    local: &str,
    remote: &str,
) -> Vec<String> {
    let mut lines = Vec::new();
    if !s2s.cfg.allows(remote) {
        lines.push(format!(
            "policy: {remote} is not allowed by s2s.allow/s2s.deny"
        ));
        return lines;
    }
    if let Some(u) = s2s.unreachable(remote) {
        lines.push(format!(
            "note: {remote} is marked unreachable: {}",
            u.reason
        ));
    }
    let (_tx, rx) = mpsc::channel(1);
    let (_ctx, crx) = mpsc::channel(1);
    let mut t = OutTask {
        server: server.clone(),
        s2s: s2s.clone(),
        local: local.to_owned(),
        remote: remote.to_owned(),
        id: 0,
        rx,
        crx,
        rx_open: false,
        carry: VecDeque::new(),
        waiters: HashMap::new(),
        try_external: true,
        report: Some(Vec::new()),
        direct_tls: false,
    };
    for _ in 0..2 {
        let conn = t.connect().await;
        match conn {
            Err(f) => {
                t.note(format!("result: FAILED ({})", f.condition));
                break;
            }
            Ok((conn, secure, cert)) => match t.stream(conn, secure, cert).await {
                End::Probed(method) => {
                    t.note(format!("result: OK ({method})"));
                    break;
                }
                End::ExternalDropped(reason) => {
                    t.note(format!(
                        "EXTERNAL: the stream was dropped ({reason}); trying dialback"
                    ));
                    t.try_external = false;
                }
                End::Failed(f) => {
                    t.note(format!("result: FAILED: {} ({})", f.reason, f.condition));
                    break;
                }
                End::Lost { reason, .. } => {
                    t.note(format!("result: FAILED: {reason}"));
                    break;
                }
                End::Idle | End::Shutdown => break,
            },
        }
    }
    lines.extend(t.report.take().unwrap_or_default());
    lines
}
