//! The task of one client session: it owns the transport, the sans-IO
//! [`C2sMachine`] and the session mailbox, and performs the machine's
//! outputs. With stream management the task outlives its transport: when
//! the socket dies it keeps the session (and queues what arrives) until the
//! client resumes on a new connection, whose transport moves into this task,
//! or until the resumption timeout, when everything unacknowledged goes back
//! to the router (other resources or offline storage). Writes are coalesced:
//! everything one wake-up produces goes out in one write.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use jid::{BareJid, FullJid};
use minidom::Element;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::machine::{C2sMachine, C2sSettings, Input, Output};
use super::sm::{Lookup, ResumeRefused, ResumeRequest};
use super::transport::{ClientTransport, Socket, TcpTransport};
use crate::auth::{AuthError, ChannelBindings};
use crate::server::{ListenerKind, Server};
use crate::sessions::{Session, SessionMsg};
use crate::stanza::{self, StanzaError};
use crate::storage::AccountStore;
use crate::xml::ns;

pub use super::transport::stream_error_bytes;

/// Mailbox messages handled per wake-up before writing.
const MAILBOX_BATCH: usize = 256;

/// Refuse a connection over the limits with a stream error.
pub async fn refuse(mut tcp: TcpStream, kind: ListenerKind) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if kind == ListenerKind::C2sStartTls {
        let mut buf = [0u8; 1024];
        let _ = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf)).await;
        let mut out =
            crate::xml::stream_header(ns::CLIENT, None, None, Some(&stanza::new_id()), "");
        out.extend(stream_error_bytes(
            "policy-violation",
            Some("too many connections"),
            None,
        ));
        let _ = tokio::time::timeout(Duration::from_secs(2), tcp.write_all(&out)).await;
    }
}

/// Serve one TCP client connection until its session ends.
pub async fn serve(server: Server, tcp: TcpStream, peer: SocketAddr, kind: ListenerKind) {
    let handshake_timeout =
        Duration::from_secs(server.config.limits.unauthenticated_timeout_secs.max(1));
    let max = server.config.limits.max_stanza_bytes;
    let (transport, secure, bindings) = match kind {
        ListenerKind::C2sDirectTls => {
            let acceptor = tokio_rustls::TlsAcceptor::from(server.c2s_direct_tls.clone());
            match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let b = crate::tls::channel_bindings(tls.get_ref().1, &server.certs);
                    (
                        TcpTransport::new(Socket::Tls(Box::new(tls)), peer, max),
                        true,
                        b,
                    )
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            }
        }
        _ => (
            TcpTransport::new(Socket::Plain(tcp), peer, max),
            false,
            ChannelBindings::default(),
        ),
    };
    let settings = server.c2s_settings(kind);
    serve_transport(server, Box::new(transport), settings, secure, bindings).await;
}

/// Serve a client stream over any transport (TCP, TLS, WebSocket).
pub async fn serve_transport(
    server: Server,
    transport: Box<dyn ClientTransport>,
    settings: Arc<C2sSettings>,
    secure: bool,
    bindings: ChannelBindings,
) {
    let now = Instant::now();
    let mut task = SessionTask {
        peer: transport.peer(),
        server,
        transport: Some(transport),
        machine: C2sMachine::new(settings, secure, bindings),
        session: None,
        mailbox: None,
        resume_rx: None,
        sm_id: None,
        resumable_until: None,
        ending: false,
        handed_over: false,
        started: now,
        last_rx: now,
        ping_sent: None,
        resets: 0,
    };
    task.run().await;
    task.finish().await;
}

struct SessionTask {
    server: Server,
    peer: SocketAddr,
    /// None while the session waits for resumption.
    transport: Option<Box<dyn ClientTransport>>,
    machine: C2sMachine,
    session: Option<Arc<Session>>,
    mailbox: Option<mpsc::Receiver<SessionMsg>>,
    resume_rx: Option<mpsc::Receiver<ResumeRequest>>,
    sm_id: Option<String>,
    /// Set while the transport is gone and the session is kept.
    resumable_until: Option<Instant>,
    /// The session is over: leave the loop.
    ending: bool,
    /// This connection's transport went to a resumed session.
    handed_over: bool,
    started: Instant,
    last_rx: Instant,
    ping_sent: Option<Instant>,
    /// Incremented at every stream restart (STARTTLS, SASL success).
    resets: u64,
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn read_opt(t: &mut Option<Box<dyn ClientTransport>>) -> std::io::Result<bool> {
    match t {
        Some(t) => t.read().await,
        None => std::future::pending().await,
    }
}

async fn killed(session: &Option<Arc<Session>>) {
    match session {
        Some(s) => s.kill.cancelled().await,
        None => std::future::pending().await,
    }
}

/// What of a session's undelivered stanzas goes back to the router when it
/// ends: messages a user must not lose and IQ requests (which then get an
/// error). Presence, results, carbon copies, archive results and group chat
/// messages are state the client fetches again.
fn reroutable(el: &Element) -> bool {
    match el.name() {
        "iq" => matches!(el.attr("type"), Some("get") | Some("set")),
        "message" => {
            matches!(el.attr("type"), None | Some("chat") | Some("normal"))
                && !el
                    .children()
                    .any(|c| c.ns() == ns::CARBONS || c.ns() == ns::MAM)
        }
        _ => false,
    }
}

impl SessionTask {
    fn next_deadline(&self) -> Instant {
        let limits = &self.server.config.limits;
        let far = Instant::now() + Duration::from_secs(3600);
        if let Some(t) = self.resumable_until {
            return t;
        }
        if !self.machine.is_established() {
            return self.started + Duration::from_secs(limits.unauthenticated_timeout_secs.max(1));
        }
        let idle = Duration::from_secs(limits.idle_timeout_secs.max(1));
        let idle_deadline = match self.ping_sent {
            Some(t) => t + idle,
            None => self.last_rx + idle,
        };
        let sm = self.machine.next_deadline().unwrap_or(far);
        idle_deadline.min(sm)
    }

    async fn run(&mut self) {
        while !self.ending {
            let deadline = self.next_deadline();
            tokio::select! {
                biased;
                _ = self.server.shutdown.cancelled() => {
                    self.stream_error("system-shutdown", None).await;
                    self.ending = true;
                }
                _ = killed(&self.session) => {
                    self.stream_error("policy-violation", Some("too many stanzas queued for this client")).await;
                    self.ending = true;
                }
                req = recv_opt(&mut self.resume_rx) => {
                    if let Some(req) = req {
                        self.take_over(req).await;
                    }
                }
                r = read_opt(&mut self.transport) => match r {
                    Ok(true) => {
                        self.last_rx = Instant::now();
                        self.ping_sent = None;
                        self.on_input().await;
                    }
                    Ok(false) | Err(_) => {
                        tracing::debug!(peer = %self.peer, "connection closed by peer");
                        self.transport_lost();
                    }
                },
                msg = recv_opt(&mut self.mailbox) => {
                    if let Some(m) = msg {
                        self.on_mailbox(m).await;
                        for _ in 0..MAILBOX_BATCH {
                            match self.mailbox.as_mut().map(|rx| rx.try_recv()) {
                                Some(Ok(m)) => self.on_mailbox(m).await,
                                _ => break,
                            }
                        }
                    }
                },
                _ = tokio::time::sleep_until(deadline) => self.on_timer().await,
            }
            self.flush().await;
        }
    }

    async fn flush(&mut self) {
        if let Some(t) = self.transport.as_mut()
            && t.pending() > 0
            && t.flush().await.is_err()
        {
            tracing::debug!(peer = %self.peer, "write failed");
            self.transport_lost();
        }
    }

    /// The socket is gone: hibernate a resumable session, end the others.
    fn transport_lost(&mut self) {
        self.transport = None;
        if self.ending || self.session.is_none() {
            self.ending = true;
            return;
        }
        match self.machine.resumable() {
            Some((_, max)) => {
                tracing::info!(peer = %self.peer, jid = ?self.machine.jid().map(|j| j.to_string()), max, "transport lost; session waits for resumption");
                self.resumable_until = Some(Instant::now() + Duration::from_secs(max as u64));
            }
            None => self.ending = true,
        }
    }

    async fn stream_error(&mut self, condition: &'static str, text: Option<&str>) {
        let outs = self.machine.fail(condition, text);
        self.perform(outs).await;
        self.ending = true;
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
        if let Some(until) = self.resumable_until {
            if now >= until {
                tracing::info!(jid = ?self.machine.jid().map(|j| j.to_string()), "resumption timeout: session ends");
                self.ending = true;
            }
            return;
        }
        if !self.machine.is_established() {
            tracing::debug!(peer = %self.peer, "not authenticated in time");
            return self.stream_error("connection-timeout", None).await;
        }
        let outs = self.machine.handle(Input::Tick);
        self.perform(outs).await;
        if self.transport.is_none() || self.ending {
            return;
        }
        let idle = Duration::from_secs(self.server.config.limits.idle_timeout_secs.max(1));
        match self.ping_sent {
            Some(t) if now >= t + idle => {
                tracing::debug!(peer = %self.peer, "keepalive ping not answered");
                if self.machine.resumable().is_some() {
                    // Half-open connection: keep the session for resumption.
                    self.transport_lost();
                } else {
                    self.stream_error("connection-timeout", None).await;
                }
            }
            None if now >= self.last_rx + idle => {
                // XEP-0199: probe an idle client.
                if let (Some(jid), Some(domain), Some(t)) = (
                    self.machine.jid(),
                    self.machine.domain(),
                    self.transport.as_mut(),
                ) {
                    let ping = stanza::build(
                        "iq",
                        Some(domain),
                        Some(&jid.to_string()),
                        Some("get"),
                        Some(&format!("ping-{}", stanza::new_id())),
                    )
                    .append(Element::builder("ping", ns::PING).build())
                    .build();
                    t.send_element(&ping);
                }
                self.ping_sent = Some(now);
            }
            _ => {}
        }
    }

    async fn on_mailbox(&mut self, msg: SessionMsg) {
        match msg {
            SessionMsg::Stanza(el) => {
                let outs = self.machine.handle(Input::Deliver(el));
                self.perform(outs).await;
            }
            SessionMsg::Close { condition, text } => {
                self.stream_error(condition, text.as_deref()).await;
            }
        }
    }

    async fn on_input(&mut self) {
        let Some(t) = self.transport.as_mut() else {
            return;
        };
        let (events, err) = t.take_events();
        for ev in events {
            if self.ending || self.transport.is_none() {
                return;
            }
            let generation = self.resets;
            self.process(Input::Stream(ev)).await;
            if generation != self.resets {
                // The stream restarted (STARTTLS, SASL): anything the client
                // pipelined past that point is discarded.
                return;
            }
        }
        if let Some(e) = err
            && !self.ending
        {
            tracing::debug!(peer = %self.peer, error = %e, "XML error");
            self.stream_error(e.condition(), None).await;
        }
    }

    async fn process(&mut self, input: Input) {
        let outs = self.machine.handle(input);
        self.perform(outs).await;
    }

    async fn perform(&mut self, outputs: Vec<Output>) {
        let mut queue: VecDeque<Output> = outputs.into();
        while let Some(out) = queue.pop_front() {
            let mut next: Option<Input> = None;
            match out {
                Output::SendHeader { id, from } => {
                    if let Some(t) = self.transport.as_mut() {
                        t.send_header(&id, &from);
                    }
                }
                Output::Send(el) => {
                    if let Some(t) = self.transport.as_mut() {
                        t.send_element(&el);
                    }
                }
                Output::StartTls => {
                    let cfg = self.server.c2s_tls.clone();
                    let timeout = Duration::from_secs(
                        self.server
                            .config
                            .limits
                            .unauthenticated_timeout_secs
                            .max(1),
                    );
                    let b = match self.transport.as_mut() {
                        Some(t) => t.starttls(cfg, &self.server.certs, timeout).await,
                        None => None,
                    };
                    self.resets += 1;
                    match b {
                        Some(b) => next = Some(Input::TlsEstablished(b)),
                        None => {
                            self.ending = true;
                            self.transport = None;
                            return;
                        }
                    }
                }
                Output::ResetStream => {
                    if let Some(t) = self.transport.as_mut() {
                        t.reset();
                    }
                    self.resets += 1;
                }
                Output::LookupCredentials { domain, username } => {
                    next = Some(Input::Credentials(self.lookup(&domain, &username).await));
                }
                Output::AuthSucceeded {
                    username,
                    mechanism,
                } => {
                    self.server
                        .throttle
                        .record_success(self.peer.ip(), &username);
                    tracing::info!(peer = %self.peer, user = %username, mechanism, "authenticated");
                }
                Output::AuthFailed {
                    username,
                    mechanism,
                } => {
                    self.server
                        .throttle
                        .record_failure(self.peer.ip(), username.as_deref());
                    tracing::info!(peer = %self.peer, user = ?username, mechanism, "authentication failed");
                }
                Output::Bind { user, resource } => {
                    next = Some(Input::Bound(self.bind(user, resource).await));
                }
                Output::Stanza(el) => {
                    if let Some(s) = self.session.clone() {
                        self.server.handle_client_stanza(&s, el).await;
                    }
                }
                Output::StreamError {
                    condition,
                    text,
                    app,
                } => {
                    if let Some(t) = self.transport.as_mut() {
                        t.send_stream_error(condition, text.as_deref(), app.as_ref());
                    }
                    self.ending = true;
                }
                Output::CloseStream => {
                    if let Some(t) = self.transport.as_mut() {
                        t.send_close();
                    }
                    self.ending = true;
                }
                Output::SmEnabled { id, max } => {
                    if let (Some(id), Some(user)) = (id, self.machine.authenticated().cloned()) {
                        let (tx, rx) = mpsc::channel(1);
                        self.server.sm_registry.register(&id, user, tx);
                        self.resume_rx = Some(rx);
                        tracing::debug!(peer = %self.peer, max, "stream management enabled with resumption");
                        self.sm_id = Some(id);
                    }
                }
                Output::Resume { previd, h } => match self.resume_elsewhere(previd, h).await {
                    Some(input) => next = Some(input),
                    None => return,
                },
                Output::TransportDead => {
                    tracing::info!(peer = %self.peer, "stream management ack overdue; transport considered dead");
                    self.transport_lost();
                }
                Output::Overflow => {
                    let outs = self
                        .machine
                        .fail("policy-violation", Some("too many unacknowledged stanzas"));
                    queue.extend(outs);
                    self.ending = true;
                }
            }
            if let Some(input) = next {
                queue.extend(self.machine.handle(input));
            }
        }
    }

    /// This connection asks to resume another session: hand our transport to
    /// that session's task. Returns the input for our machine when it fails;
    /// None when the transport moved (this task ends).
    async fn resume_elsewhere(&mut self, previd: String, h: u32) -> Option<Input> {
        let user = self.machine.authenticated().cloned()?;
        let failed = |condition, h| Some(Input::ResumeFailed { condition, h });
        let tx = match self.server.sm_registry.lookup(&previd, &user) {
            Lookup::Unknown => return failed("item-not-found", None),
            Lookup::Expired(h) => return failed("item-not-found", Some(h)),
            Lookup::Live(tx) => tx,
        };
        let mut transport = self.transport.take()?;
        let _ = transport.flush().await;
        let (reply_tx, reply_rx) = oneshot::channel();
        let req = ResumeRequest {
            user,
            h,
            transport,
            secure: self.machine.is_secure(),
            reply: reply_tx,
        };
        if let Err(e) = tx.send(req).await {
            self.transport = Some(e.0.transport);
            return failed("item-not-found", None);
        }
        match tokio::time::timeout(Duration::from_secs(10), reply_rx).await {
            Ok(Ok(Ok(()))) => {
                self.handed_over = true;
                self.ending = true;
                None
            }
            Ok(Ok(Err(refused))) => {
                self.transport = Some(refused.transport);
                failed(refused.condition, refused.h)
            }
            _ => {
                // The old task went away with our transport.
                self.handed_over = true;
                self.ending = true;
                None
            }
        }
    }

    /// A new connection resumes this session: take its transport.
    async fn take_over(&mut self, req: ResumeRequest) {
        let own = self.session.as_ref().map(|s| s.bare());
        if own.as_ref() != Some(&req.user) {
            let _ = req.reply.send(Err(ResumeRefused {
                transport: req.transport,
                condition: "item-not-found",
                h: None,
            }));
            return;
        }
        match self.machine.resume_here(req.h, req.secure) {
            Err((condition, h)) => {
                tracing::info!(jid = ?self.machine.jid().map(|j| j.to_string()), condition, "resumption refused; the old session ends");
                let _ = req.reply.send(Err(ResumeRefused {
                    transport: req.transport,
                    condition,
                    h,
                }));
                self.ending = true;
            }
            Ok(outs) => {
                if let Some(mut old) = self.transport.take() {
                    old.send_stream_error(
                        "conflict",
                        Some("the session was resumed on another connection"),
                        None,
                    );
                    tokio::spawn(async move { old.shutdown().await });
                }
                self.peer = req.transport.peer();
                self.transport = Some(req.transport);
                self.resumable_until = None;
                self.last_rx = Instant::now();
                self.ping_sent = None;
                self.perform(outs).await;
                let _ = req.reply.send(Ok(()));
                tracing::info!(peer = %self.peer, jid = ?self.machine.jid().map(|j| j.to_string()), "session resumed");
            }
        }
    }

    async fn lookup(
        &mut self,
        domain: &str,
        username: &str,
    ) -> Result<Option<crate::auth::StoredCredentials>, AuthError> {
        if !self.server.throttle.allowed(self.peer.ip(), Some(username)) {
            tracing::info!(peer = %self.peer, user = %username, "authentication throttled");
            return Err(AuthError::Throttled);
        }
        let server = self.server.clone();
        server
            .store
            .get_credentials(domain, username)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "credential lookup failed");
                AuthError::Throttled
            })
    }

    async fn bind(
        &mut self,
        user: BareJid,
        resource: Option<String>,
    ) -> Result<FullJid, StanzaError> {
        let limits = &self.server.config.limits;
        let resource = resource.unwrap_or_else(|| format!("starling-{}", &stanza::new_id()[..10]));
        let full = user
            .with_resource_str(&resource)
            .map_err(|_| StanzaError::bad_request().with_text("invalid resource"))?;
        let replacing = self.server.sessions.get(&full).is_some();
        if !replacing && self.server.sessions.resource_count(&user) >= limits.max_resources_per_user
        {
            return Err(StanzaError::resource_constraint().with_text("too many resources bound"));
        }
        let (tx, rx) = mpsc::channel(limits.session_queue.max(16));
        let (session, replaced) = self.server.sessions.bind(full.clone(), tx, Some(self.peer));
        if let Some(old) = replaced {
            tracing::info!(jid = %full, "resource conflict: replacing the old session");
            let close = SessionMsg::Close {
                condition: "conflict",
                text: Some("replaced by a new connection".into()),
            };
            if old.tx.try_send(close).is_err() {
                old.kill.cancel();
            }
        }
        self.session = Some(session.clone());
        self.mailbox = Some(rx);
        for m in self.server.modules.iter() {
            m.on_session_bound(&self.server, &session).await;
        }
        tracing::info!(peer = %self.peer, jid = %full, "resource bound");
        Ok(full)
    }

    /// The session is over: unbind, hand everything unacknowledged or
    /// undelivered back to the router (other resources, offline storage, or
    /// an error to the sender), close the transport.
    async fn finish(&mut self) {
        if self.handed_over {
            return;
        }
        self.flush().await;
        if let Some(session) = self.session.take() {
            session
                .closing
                .store(true, std::sync::atomic::Ordering::Relaxed);
            self.server.sessions.unbind(&session);
            if let Some(id) = self.sm_id.take() {
                self.server
                    .sm_registry
                    .retire(&id, self.machine.sm_inbound().unwrap_or(0));
            }
            self.resume_rx = None;
            let mut leftovers = self.machine.take_unacked();
            if let Some(mut rx) = self.mailbox.take() {
                rx.close();
                while let Ok(msg) = rx.try_recv() {
                    if let SessionMsg::Stanza(el) = msg {
                        leftovers.push(el);
                    }
                }
            }
            let mut rerouted = 0usize;
            for el in leftovers {
                if reroutable(&el) {
                    rerouted += 1;
                    self.server.route(el).await;
                }
            }
            for m in self.server.modules.iter() {
                m.on_session_closed(&self.server, &session).await;
            }
            tracing::info!(jid = %session.jid, rerouted, "session ended");
        }
        if let Some(mut t) = self.transport.take() {
            t.shutdown().await;
        }
    }
}
