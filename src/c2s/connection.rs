//! The IO driver of a client connection: owns the socket, the parser and the
//! mailbox, feeds the sans-IO [`C2sMachine`] and performs its outputs.
//! Writes are coalesced: everything produced by one wake-up (a read, or a
//! drained mailbox) goes out in one write.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use jid::{BareJid, FullJid};
use minidom::Element;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::machine::{C2sMachine, Input, Output};
use crate::auth::{AuthError, ChannelBindings};
use crate::server::{ListenerKind, Server};
use crate::sessions::{Session, SessionMsg};
use crate::stanza::{self, StanzaError};
use crate::storage::AccountStore;
use crate::xml::{StreamParser, ns, serialize_into, stream_header};

/// Plain TCP or TLS over TCP.
pub enum Socket {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Transient state during the STARTTLS upgrade.
    Upgrading,
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Socket::Upgrading => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Socket::Upgrading => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_flush(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Socket::Upgrading => Poll::Ready(Ok(())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Socket::Upgrading => Poll::Ready(Ok(())),
        }
    }
}

/// How long one write may stall before the peer is considered gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Mailbox messages handled per wake-up before writing.
const MAILBOX_BATCH: usize = 256;

/// The stream error element and the stream close, as bytes.
pub fn stream_error_bytes(condition: &str, text: Option<&str>) -> Vec<u8> {
    let mut b = Element::builder("error", ns::STREAM)
        .append(Element::builder(condition, ns::STREAM_ERRORS).build());
    if let Some(t) = text {
        b = b.append(
            Element::builder("text", ns::STREAM_ERRORS)
                .append(t)
                .build(),
        );
    }
    let mut out = Vec::with_capacity(160);
    serialize_into(&mut out, &b.build(), ns::CLIENT);
    out.extend_from_slice(b"</stream:stream>");
    out
}

/// Refuse a connection over the limits with a stream error.
pub async fn refuse(mut tcp: TcpStream, kind: ListenerKind) {
    if kind == ListenerKind::C2sStartTls {
        let mut buf = [0u8; 1024];
        let _ = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf)).await;
        let mut out = stream_header(ns::CLIENT, None, None, Some(&stanza::new_id()), "");
        out.extend(stream_error_bytes(
            "policy-violation",
            Some("too many connections"),
        ));
        let _ = tokio::time::timeout(Duration::from_secs(2), tcp.write_all(&out)).await;
    }
}

/// Serve one client connection until it closes.
pub async fn serve(server: Server, tcp: TcpStream, peer: SocketAddr, kind: ListenerKind) {
    let handshake_timeout =
        Duration::from_secs(server.config.limits.unauthenticated_timeout_secs.max(1));
    let (socket, secure, bindings) = match kind {
        ListenerKind::C2sDirectTls => {
            let acceptor = tokio_rustls::TlsAcceptor::from(server.c2s_direct_tls.clone());
            match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let b = crate::tls::channel_bindings(tls.get_ref().1, &server.certs);
                    (Socket::Tls(Box::new(tls)), true, b)
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
        ListenerKind::C2sStartTls => (Socket::Plain(tcp), false, ChannelBindings::default()),
    };
    let machine = C2sMachine::new(server.c2s_settings(kind), secure, bindings);
    let mut conn = Connection {
        parser: StreamParser::new(server.config.limits.max_stanza_bytes),
        server,
        socket,
        peer,
        machine,
        rbuf: BytesMut::with_capacity(4096),
        wbuf: Vec::new(),
        session: None,
        mailbox: None,
        closing: false,
        started: Instant::now(),
        last_rx: Instant::now(),
        ping_sent: None,
        resets: 0,
    };
    conn.run().await;
    conn.finish().await;
}

struct Connection {
    server: Server,
    socket: Socket,
    peer: SocketAddr,
    parser: StreamParser,
    machine: C2sMachine,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    session: Option<Arc<Session>>,
    mailbox: Option<mpsc::Receiver<SessionMsg>>,
    closing: bool,
    started: Instant,
    last_rx: Instant,
    ping_sent: Option<Instant>,
    /// Incremented at every stream reset (STARTTLS, SASL success).
    resets: u64,
}

async fn recv_opt(rx: &mut Option<mpsc::Receiver<SessionMsg>>) -> Option<SessionMsg> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn killed(session: &Option<Arc<Session>>) {
    match session {
        Some(s) => s.kill.cancelled().await,
        None => std::future::pending().await,
    }
}

impl Connection {
    fn next_deadline(&self) -> Instant {
        let limits = &self.server.config.limits;
        if !self.machine.is_established() {
            return self.started + Duration::from_secs(limits.unauthenticated_timeout_secs.max(1));
        }
        let idle = Duration::from_secs(limits.idle_timeout_secs.max(1));
        match self.ping_sent {
            Some(t) => t + idle,
            None => self.last_rx + idle,
        }
    }

    async fn run(&mut self) {
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                biased;
                _ = self.server.shutdown.cancelled() => {
                    self.stream_error("system-shutdown", None);
                }
                _ = killed(&self.session) => {
                    self.stream_error("policy-violation", Some("too many stanzas queued for this client"));
                }
                r = self.socket.read_buf(&mut self.rbuf) => match r {
                    Ok(0) | Err(_) => {
                        tracing::debug!(peer = %self.peer, "connection closed by peer");
                        return;
                    }
                    Ok(_) => {
                        self.last_rx = Instant::now();
                        self.ping_sent = None;
                        self.on_bytes().await;
                    }
                },
                msg = recv_opt(&mut self.mailbox) => {
                    if let Some(m) = msg {
                        self.on_mailbox(m);
                        for _ in 0..MAILBOX_BATCH {
                            match self.mailbox.as_mut().map(|rx| rx.try_recv()) {
                                Some(Ok(m)) => self.on_mailbox(m),
                                _ => break,
                            }
                        }
                    }
                },
                _ = tokio::time::sleep_until(deadline) => self.on_timer(),
            }
            if self.flush().await.is_err() {
                return;
            }
            if self.closing {
                return;
            }
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let res = tokio::time::timeout(WRITE_TIMEOUT, async {
            self.socket.write_all(&self.wbuf).await?;
            self.socket.flush().await
        })
        .await;
        self.wbuf.clear();
        if self.wbuf.capacity() > 64 * 1024 {
            self.wbuf = Vec::new();
        }
        match res {
            Ok(r) => r,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    fn stream_error(&mut self, condition: &'static str, text: Option<&str>) {
        let outs = self.machine.fail(condition, text);
        for o in outs {
            match o {
                Output::SendHeader { id, from } => self.write_header(&id, &from),
                Output::StreamError { condition, text } => {
                    self.wbuf
                        .extend(stream_error_bytes(condition, text.as_deref()));
                    self.closing = true;
                }
                _ => {}
            }
        }
        self.closing = true;
    }

    fn write_header(&mut self, id: &str, from: &str) {
        self.wbuf
            .extend(stream_header(ns::CLIENT, Some(from), None, Some(id), ""));
    }

    fn on_timer(&mut self) {
        if !self.machine.is_established() {
            tracing::debug!(peer = %self.peer, "not authenticated in time");
            return self.stream_error("connection-timeout", None);
        }
        if self.ping_sent.is_some() {
            tracing::debug!(peer = %self.peer, "keepalive ping not answered");
            return self.stream_error("connection-timeout", None);
        }
        // XEP-0199: probe an idle client.
        if let (Some(jid), Some(domain)) = (self.machine.jid(), self.machine.domain()) {
            let ping = stanza::build(
                "iq",
                Some(domain),
                Some(&jid.to_string()),
                Some("get"),
                Some(&format!("ping-{}", stanza::new_id())),
            )
            .append(Element::builder("ping", ns::PING).build())
            .build();
            serialize_into(&mut self.wbuf, &ping, ns::CLIENT);
        }
        self.ping_sent = Some(Instant::now());
    }

    fn on_mailbox(&mut self, msg: SessionMsg) {
        match msg {
            SessionMsg::Stanza(el) => serialize_into(&mut self.wbuf, &el, ns::CLIENT),
            SessionMsg::Close { condition, text } => self.stream_error(condition, text.as_deref()),
        }
    }

    async fn on_bytes(&mut self) {
        let fed = self.parser.feed(&self.rbuf);
        self.rbuf.clear();
        if self.rbuf.capacity() > 64 * 1024 {
            self.rbuf = BytesMut::with_capacity(4096);
        }
        // Events parsed before an error still count.
        let mut events = Vec::new();
        while let Some(ev) = self.parser.next_event() {
            events.push(ev);
        }
        for ev in events {
            if self.closing {
                return;
            }
            let generation = self.resets;
            self.process(Input::Stream(ev)).await;
            if generation != self.resets {
                // The stream was reset (STARTTLS, SASL): anything the client
                // pipelined after that point is discarded.
                return;
            }
        }
        if let Err(e) = fed {
            tracing::debug!(peer = %self.peer, error = %e, "XML error");
            self.stream_error(e.condition(), None);
        }
    }

    async fn process(&mut self, input: Input) {
        let mut queue = std::collections::VecDeque::from([input]);
        while let Some(input) = queue.pop_front() {
            let outputs = self.machine.handle(input);
            for out in outputs {
                match out {
                    Output::SendHeader { id, from } => self.write_header(&id, &from),
                    Output::Send(el) => serialize_into(&mut self.wbuf, &el, ns::CLIENT),
                    Output::StartTls => match self.starttls().await {
                        Some(b) => queue.push_back(Input::TlsEstablished(b)),
                        None => {
                            self.closing = true;
                            return;
                        }
                    },
                    Output::ResetStream => self.reset_parser(),
                    Output::LookupCredentials { domain, username } => {
                        queue.push_back(Input::Credentials(self.lookup(&domain, &username).await));
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
                        let r = self.bind(user, resource).await;
                        queue.push_back(Input::Bound(r));
                    }
                    Output::Stanza(el) => {
                        // Write what is pending first so that replies keep order.
                        if let Some(s) = self.session.clone() {
                            self.server.handle_client_stanza(&s, el).await;
                        }
                    }
                    Output::StreamError { condition, text } => {
                        self.wbuf
                            .extend(stream_error_bytes(condition, text.as_deref()));
                        self.closing = true;
                    }
                    Output::CloseStream => {
                        self.wbuf.extend_from_slice(b"</stream:stream>");
                        self.closing = true;
                    }
                }
            }
        }
    }

    fn reset_parser(&mut self) {
        self.parser = StreamParser::new(self.server.config.limits.max_stanza_bytes);
        self.resets += 1;
    }

    async fn starttls(&mut self) -> Option<ChannelBindings> {
        if self.flush().await.is_err() {
            return None;
        }
        let Socket::Plain(tcp) = std::mem::replace(&mut self.socket, Socket::Upgrading) else {
            return None;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(self.server.c2s_tls.clone());
        let timeout = Duration::from_secs(
            self.server
                .config
                .limits
                .unauthenticated_timeout_secs
                .max(1),
        );
        match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => {
                let b = crate::tls::channel_bindings(tls.get_ref().1, &self.server.certs);
                self.socket = Socket::Tls(Box::new(tls));
                self.reset_parser();
                Some(b)
            }
            Ok(Err(e)) => {
                tracing::debug!(peer = %self.peer, error = %e, "STARTTLS handshake failed");
                None
            }
            Err(_) => None,
        }
    }

    async fn lookup(
        &self,
        domain: &str,
        username: &str,
    ) -> Result<Option<crate::auth::StoredCredentials>, AuthError> {
        if !self.server.throttle.allowed(self.peer.ip(), Some(username)) {
            tracing::info!(peer = %self.peer, user = %username, "authentication throttled");
            return Err(AuthError::Throttled);
        }
        self.server
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

    /// After the loop: flush what is left, unbind, hand undelivered stanzas
    /// back to the router (other resources or offline storage), close.
    async fn finish(&mut self) {
        let _ = self.flush().await;
        if let Some(session) = self.session.take() {
            session
                .closing
                .store(true, std::sync::atomic::Ordering::Relaxed);
            self.server.sessions.unbind(&session);
            if let Some(mut rx) = self.mailbox.take() {
                rx.close();
                while let Ok(msg) = rx.try_recv() {
                    if let SessionMsg::Stanza(el) = msg {
                        self.server.route(el).await;
                    }
                }
            }
            for m in self.server.modules.iter() {
                m.on_session_closed(&self.server, &session).await;
            }
            tracing::info!(jid = %session.jid, "session ended");
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.socket.shutdown()).await;
    }
}
