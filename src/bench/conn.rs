//! One load-generator connection: log in like a client (STARTTLS, SCRAM,
//! bind, and with the `full` profile stream management, carbons, roster and
//! initial presence), then run a reader task and a writer task on the
//! socket. The reader answers what a real client must answer (stream
//! management `<r/>`, XEP-0199 pings, other IQs) and hands messages to the
//! scenario's [`Handler`]; the writer coalesces everything queued into one
//! write.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jid::FullJid;
use minidom::Element;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};

use crate::client::{ClientError, ClientSocket, KeyCache, Mechanism, TlsMode, XmppClient};
use crate::xml::{StreamEvent, StreamParser, ns, serialize_into};

/// The namespace of the generator's own payload (`<bench t='..' s='..'/>`),
/// which carries the send time (microseconds since the epoch) and a
/// sequence number.
pub const BENCH_NS: &str = "urn:xmpp:starling:bench:0";

/// Which SASL mechanism to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MechChoice {
    /// SCRAM-SHA-256 if offered, else SCRAM-SHA-1, else PLAIN.
    Auto,
    Fixed(Mechanism),
}

/// What to do after binding a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Initial presence only.
    Minimal,
    /// What mobile and desktop clients do at login: enable stream management
    /// (when offered), enable carbons, fetch the roster, send initial
    /// presence.
    Full,
}

impl std::str::FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "minimal" => Ok(Profile::Minimal),
            "full" => Ok(Profile::Full),
            _ => Err(format!("unknown profile {s:?} (minimal, full)")),
        }
    }
}

/// Where and how to connect.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub domain: String,
    pub tls: TlsMode,
    pub mechanism: MechChoice,
    pub keys: KeyCache,
    /// Limit for the whole login and for each read during it.
    pub timeout: Duration,
    /// Enable stream management when the server offers it.
    pub sm: bool,
    pub profile: Profile,
}

impl Target {
    pub fn new(addr: SocketAddr, domain: &str) -> Target {
        Target {
            addr,
            domain: domain.to_owned(),
            tls: TlsMode::StartTls,
            mechanism: MechChoice::Auto,
            keys: KeyCache::default(),
            timeout: Duration::from_secs(60),
            sm: true,
            profile: Profile::Full,
        }
    }
}

/// Receives what arrives on benchmark connections. Called on the reader
/// task: keep it short.
pub trait Handler: Send + Sync + 'static {
    /// A `<message/>` for connection `idx`.
    fn message(&self, _idx: usize, _msg: &Element) {}
    /// A `<presence/>` for connection `idx`.
    fn presence(&self, _idx: usize, _p: &Element) {}
    /// The stream of connection `idx` ended (`reason` empty when we closed it).
    fn closed(&self, _idx: usize, _reason: &str) {}
}

/// A handler that ignores everything.
pub struct Ignore;
impl Handler for Ignore {}

/// Counters and flags shared by a connection's tasks and its owner.
#[derive(Default)]
pub struct ConnState {
    /// Bytes handed to the writer and not yet written.
    pub queued_bytes: AtomicUsize,
    /// The stream is gone (either side ended it, or the socket failed).
    pub closed: AtomicBool,
    /// We asked to close the stream.
    pub closing: AtomicBool,
    /// Why the stream ended, if the server ended it.
    pub close_reason: Mutex<Option<String>>,
    pub sm_enabled: AtomicBool,
    pub acks_sent: AtomicU64,
    pub pings_answered: AtomicU64,
    pub stanzas_in: AtomicU64,
    pending_iqs: Mutex<HashMap<String, oneshot::Sender<Element>>>,
}

enum Out {
    Data(Vec<u8>),
    Close,
}

/// A logged-in connection.
pub struct Conn {
    pub idx: usize,
    pub jid: FullJid,
    /// The post-authentication `<stream:features/>`.
    pub features: Option<Element>,
    pub state: Arc<ConnState>,
    tx: mpsc::UnboundedSender<Out>,
    reader: tokio::task::JoinHandle<()>,
}

/// How long the steps of one login took.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoginTimes {
    /// TCP connect, stream header, STARTTLS and TLS handshake.
    pub tls: Duration,
    /// SASL and the stream restart.
    pub auth: Duration,
    /// Resource binding.
    pub bind: Duration,
    /// Until the session is ready (profile answered).
    pub total: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("timed out")]
    Timeout,
    #[error("stream ended during login: {0}")]
    Ended(String),
}

impl LoginError {
    /// A short class for failure counts (`timeout`, `refused`, `auth`, ...).
    pub fn class(&self) -> String {
        match self {
            LoginError::Timeout | LoginError::Client(ClientError::Timeout) => "timeout".into(),
            LoginError::Client(ClientError::Io(e)) => match e.kind() {
                std::io::ErrorKind::ConnectionRefused => "refused".into(),
                std::io::ErrorKind::ConnectionReset => "reset".into(),
                std::io::ErrorKind::UnexpectedEof => "eof".into(),
                k => format!("io-{k:?}").to_lowercase(),
            },
            LoginError::Client(ClientError::AuthFailed(c)) => format!("auth-{c}"),
            LoginError::Client(ClientError::StreamError(c)) => format!("stream-error-{c}"),
            LoginError::Client(ClientError::Closed) => "closed".into(),
            LoginError::Client(ClientError::Xml(_)) => "xml".into(),
            LoginError::Client(ClientError::Protocol(_)) => "protocol".into(),
            LoginError::Ended(_) => "ended".into(),
        }
    }
}

/// Pick a SASL mechanism from the offered ones.
pub fn choose_mechanism(features: Option<&Element>, choice: MechChoice) -> Mechanism {
    if let MechChoice::Fixed(m) = choice {
        return m;
    }
    let offered: Vec<String> = features
        .and_then(|f| f.get_child("mechanisms", ns::SASL))
        .map(|m| m.children().map(|c| c.text()).collect())
        .unwrap_or_default();
    let has = |n: &str| offered.iter().any(|o| o == n);
    if has("SCRAM-SHA-256") {
        Mechanism::ScramSha256
    } else if has("SCRAM-SHA-1") {
        Mechanism::ScramSha1
    } else {
        Mechanism::Plain
    }
}

/// Log in `username` and start the connection's tasks.
pub async fn login(
    idx: usize,
    username: &str,
    password: &str,
    resource: &str,
    target: &Target,
    handler: Arc<dyn Handler>,
) -> Result<(Conn, LoginTimes), LoginError> {
    let start = Instant::now();
    let fut = login_inner(idx, username, password, resource, target, handler, start);
    match tokio::time::timeout(target.timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(LoginError::Timeout),
    }
}

async fn login_inner(
    idx: usize,
    username: &str,
    password: &str,
    resource: &str,
    target: &Target,
    handler: Arc<dyn Handler>,
    start: Instant,
) -> Result<(Conn, LoginTimes), LoginError> {
    let mut times = LoginTimes::default();
    let mut c =
        XmppClient::connect_with_timeout(target.addr, &target.domain, target.tls, target.timeout)
            .await?;
    times.tls = start.elapsed();
    let mech = choose_mechanism(c.features.as_ref(), target.mechanism);
    c.authenticate(username, password, mech, &target.keys)
        .await?;
    times.auth = start.elapsed() - times.tls;
    let jid = c.bind(Some(resource)).await?;
    times.bind = start.elapsed() - times.tls - times.auth;
    let features = c.features.clone();
    let sm_offered = features
        .as_ref()
        .map(|f| f.has_child("sm", ns::SM))
        .unwrap_or(false);
    let (socket, parser, queued) = c.into_parts();
    let (rd, wr) = tokio::io::split(socket);
    let state = Arc::new(ConnState::default());
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = oneshot::channel();

    // The login profile goes out in one write; the reader reports when
    // every answer is in.
    let mut batch = Vec::with_capacity(512);
    let mut expect = Expect::default();
    if target.profile == Profile::Full {
        if target.sm && sm_offered {
            batch.extend_from_slice(b"<enable xmlns='urn:xmpp:sm:3'/>");
            expect.sm = true;
        }
        batch.extend_from_slice(
            b"<iq type='set' id='bench-carbons'><enable xmlns='urn:xmpp:carbons:2'/></iq>\
              <iq type='get' id='bench-roster'><query xmlns='jabber:iq:roster'/></iq>",
        );
        expect.ids.push("bench-carbons".into());
        expect.ids.push("bench-roster".into());
    }
    batch.extend_from_slice(b"<presence/>");
    let need_wait = expect.sm || !expect.ids.is_empty();

    let reader_state = state.clone();
    let reader_tx = tx.clone();
    let reader = tokio::spawn(async move {
        let mut r = Reader {
            idx,
            rd,
            parser,
            state: reader_state,
            tx: reader_tx,
            handler,
            expect,
            ready: Some(ready_tx),
            h: 0,
        };
        r.run(queued).await;
    });
    tokio::spawn(writer(wr, rx, state.clone()));
    state.queued_bytes.fetch_add(batch.len(), Ordering::Relaxed);
    let _ = tx.send(Out::Data(batch));
    let conn = Conn {
        idx,
        jid,
        features,
        state,
        tx,
        reader,
    };
    if need_wait {
        match ready_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => return Err(LoginError::Ended(reason)),
            Err(_) => return Err(LoginError::Ended("reader stopped".into())),
        }
    }
    times.total = start.elapsed();
    Ok((conn, times))
}

impl Conn {
    /// Queue bytes for the server unless more than `max_queued` bytes are
    /// still waiting (the server does not read: the caller counts that as
    /// not offered). False when not queued.
    pub fn send_bytes(&self, data: Vec<u8>, max_queued: usize) -> bool {
        if self.is_closed() {
            return false;
        }
        let q = self.state.queued_bytes.load(Ordering::Relaxed);
        if q > max_queued {
            return false;
        }
        self.state
            .queued_bytes
            .fetch_add(data.len(), Ordering::Relaxed);
        self.tx.send(Out::Data(data)).is_ok()
    }

    pub fn send(&self, el: &Element) -> bool {
        let mut out = Vec::with_capacity(256);
        serialize_into(&mut out, el, ns::CLIENT);
        self.send_bytes(out, usize::MAX)
    }

    /// Send an IQ and wait for its answer.
    pub async fn iq(&self, mut iq: Element, timeout: Duration) -> Result<Element, ClientError> {
        let id = match iq.attr("id") {
            Some(id) => id.to_owned(),
            None => {
                let id = crate::stanza::new_id();
                crate::stanza::set_attr(&mut iq, "id", id.clone());
                id
            }
        };
        let (tx, rx) = oneshot::channel();
        self.state
            .pending_iqs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), tx);
        if !self.send(&iq) {
            return Err(ClientError::Closed);
        }
        let r = tokio::time::timeout(timeout, rx).await;
        self.state
            .pending_iqs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        match r {
            Ok(Ok(e)) => Ok(e),
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.state.closed.load(Ordering::Relaxed) || self.state.closing.load(Ordering::Relaxed)
    }

    /// Close the stream; returns once the server closed too or `wait`
    /// passed.
    pub async fn close(self, wait: Duration) {
        self.state.closing.store(true, Ordering::Relaxed);
        let _ = self.tx.send(Out::Close);
        let mut reader = self.reader;
        if tokio::time::timeout(wait, &mut reader).await.is_err() {
            reader.abort();
        }
    }
}

/// Close many connections at once (bounded by `wait` overall).
pub async fn close_all(conns: Vec<Conn>, wait: Duration) {
    let mut set = tokio::task::JoinSet::new();
    for c in conns {
        set.spawn(c.close(wait));
    }
    let deadline = tokio::time::Instant::now() + wait + Duration::from_secs(1);
    while tokio::time::timeout_at(deadline, set.join_next())
        .await
        .ok()
        .flatten()
        .is_some()
    {}
    set.abort_all();
}

#[derive(Default)]
struct Expect {
    sm: bool,
    ids: Vec<String>,
}

impl Expect {
    fn done(&self) -> bool {
        !self.sm && self.ids.is_empty()
    }
}

struct Reader {
    idx: usize,
    rd: ReadHalf<ClientSocket>,
    parser: StreamParser,
    state: Arc<ConnState>,
    tx: mpsc::UnboundedSender<Out>,
    handler: Arc<dyn Handler>,
    expect: Expect,
    ready: Option<oneshot::Sender<Result<(), String>>>,
    /// Stanzas received since `<enabled/>` (XEP-0198 `h`).
    h: u32,
}

impl Reader {
    async fn run(&mut self, queued: VecDeque<Element>) {
        let mut reason = String::new();
        for el in queued {
            self.element(el);
        }
        let mut buf = Vec::with_capacity(4096);
        'outer: loop {
            while let Some(ev) = self.parser.next_event() {
                match ev {
                    StreamEvent::Element(e) if e.is("error", ns::STREAM) => {
                        reason =
                            format!("stream error {}", crate::client::stream_error_condition(&e));
                        break 'outer;
                    }
                    StreamEvent::Element(e) => self.element(e),
                    StreamEvent::Header(_) => {}
                    StreamEvent::End => break 'outer,
                }
            }
            buf.clear();
            match self.rd.read_buf(&mut buf).await {
                Ok(0) => {
                    if !self.state.closing.load(Ordering::Relaxed) {
                        reason = "connection closed by the server".into();
                    }
                    break;
                }
                Ok(_) => {
                    if let Err(e) = self.parser.feed(&buf) {
                        reason = format!("xml: {e}");
                        break;
                    }
                }
                Err(e) => {
                    if !self.state.closing.load(Ordering::Relaxed) {
                        reason = format!("io: {e}");
                    }
                    break;
                }
            }
            if buf.capacity() > 64 * 1024 {
                buf = Vec::with_capacity(4096);
            }
        }
        self.state.closed.store(true, Ordering::Relaxed);
        if reason.is_empty() && !self.state.closing.load(Ordering::Relaxed) {
            reason = "stream closed by the server".into();
        }
        if !reason.is_empty() {
            *self
                .state
                .close_reason
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
        }
        if let Some(r) = self.ready.take() {
            let _ = r.send(Err(if reason.is_empty() {
                "closed".into()
            } else {
                reason.clone()
            }));
        }
        self.state
            .pending_iqs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let _ = self.tx.send(Out::Close);
        self.handler.closed(self.idx, &reason);
    }

    fn out(&self, data: Vec<u8>) {
        self.state
            .queued_bytes
            .fetch_add(data.len(), Ordering::Relaxed);
        let _ = self.tx.send(Out::Data(data));
    }

    fn check_ready(&mut self) {
        if self.expect.done()
            && let Some(r) = self.ready.take()
        {
            let _ = r.send(Ok(()));
        }
    }

    fn element(&mut self, e: Element) {
        let ns_ = e.ns();
        if ns_ == ns::SM {
            match e.name() {
                "r" => {
                    self.out(format!("<a xmlns='urn:xmpp:sm:3' h='{}'/>", self.h).into_bytes());
                    self.state.acks_sent.fetch_add(1, Ordering::Relaxed);
                }
                "enabled" => {
                    self.h = 0;
                    self.state.sm_enabled.store(true, Ordering::Relaxed);
                    self.expect.sm = false;
                    self.check_ready();
                }
                "failed" => {
                    self.expect.sm = false;
                    self.check_ready();
                }
                _ => {}
            }
            return;
        }
        if ns_ != ns::CLIENT {
            return;
        }
        self.h = self.h.wrapping_add(1);
        self.state.stanzas_in.fetch_add(1, Ordering::Relaxed);
        match e.name() {
            "message" => self.handler.message(self.idx, &e),
            "presence" => self.handler.presence(self.idx, &e),
            "iq" => self.iq(e),
            _ => {}
        }
    }

    fn iq(&mut self, e: Element) {
        let typ = e.attr("type").unwrap_or("");
        let id = e.attr("id").unwrap_or("").to_owned();
        match typ {
            "result" | "error" => {
                if let Some(pos) = self.expect.ids.iter().position(|i| *i == id) {
                    self.expect.ids.remove(pos);
                    self.check_ready();
                    return;
                }
                let waiter = self
                    .state
                    .pending_iqs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                if let Some(w) = waiter {
                    let _ = w.send(e);
                }
            }
            "get" | "set" => {
                // Pings (XEP-0199) and roster pushes (RFC 6121 2.1.6) get a
                // result; anything else service-unavailable, as a client
                // without that feature answers.
                let answer = if e.has_child("ping", ns::PING) || e.has_child("query", ns::ROSTER) {
                    if e.has_child("ping", ns::PING) {
                        self.state.pings_answered.fetch_add(1, Ordering::Relaxed);
                    }
                    crate::stanza::iq_result(&e, None)
                } else {
                    match crate::stanza::error_reply(
                        &e,
                        &crate::stanza::StanzaError::service_unavailable(),
                    ) {
                        Some(r) => r,
                        None => return,
                    }
                };
                let mut out = Vec::with_capacity(128);
                serialize_into(&mut out, &answer, ns::CLIENT);
                self.out(out);
            }
            _ => {}
        }
    }
}

async fn writer(
    mut wr: WriteHalf<ClientSocket>,
    mut rx: mpsc::UnboundedReceiver<Out>,
    state: Arc<ConnState>,
) {
    let mut buf: Vec<u8> = Vec::new();
    'outer: while let Some(first) = rx.recv().await {
        let mut close = false;
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Out::Data(d) => {
                    if buf.is_empty() {
                        buf = d;
                    } else {
                        buf.extend_from_slice(&d);
                    }
                }
                Out::Close => {
                    close = true;
                    break;
                }
            }
            if buf.len() >= 64 * 1024 {
                break;
            }
            next = rx.try_recv().ok();
        }
        if !buf.is_empty() {
            let n = buf.len();
            let r = async {
                wr.write_all(&buf).await?;
                wr.flush().await
            }
            .await;
            state.queued_bytes.fetch_sub(n, Ordering::Relaxed);
            buf.clear();
            if buf.capacity() > 64 * 1024 {
                buf = Vec::new();
            }
            if r.is_err() {
                state.closed.store(true, Ordering::Relaxed);
                break 'outer;
            }
        }
        if close {
            state.closed.store(true, Ordering::Relaxed);
            let _ = wr.write_all(b"</stream:stream>").await;
            let _ = wr.flush().await;
            let _ = wr.shutdown().await;
            break;
        }
    }
}

/// The generator's payload: `<bench xmlns=BENCH_NS t='send time us' s='seq'/>`.
pub fn bench_payload(el: &Element) -> Option<(u64, u64)> {
    let b = el.get_child("bench", BENCH_NS)?;
    let t = b.attr("t")?.parse().ok()?;
    let s = b.attr("s").and_then(|s| s.parse().ok()).unwrap_or(0);
    Some((t, s))
}

/// Microseconds since the Unix epoch (comparable across the generator's
/// processes on one machine).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mechanism_choice() {
        let f: Element = "<features xmlns='http://etherx.jabber.org/streams'><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>PLAIN</mechanism><mechanism>SCRAM-SHA-1</mechanism></mechanisms></features>".parse().unwrap();
        assert_eq!(
            choose_mechanism(Some(&f), MechChoice::Auto),
            Mechanism::ScramSha1
        );
        let f2: Element = "<features xmlns='http://etherx.jabber.org/streams'><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-1</mechanism><mechanism>SCRAM-SHA-256</mechanism></mechanisms></features>".parse().unwrap();
        assert_eq!(
            choose_mechanism(Some(&f2), MechChoice::Auto),
            Mechanism::ScramSha256
        );
        assert_eq!(
            choose_mechanism(Some(&f2), MechChoice::Fixed(Mechanism::Plain)),
            Mechanism::Plain
        );
    }

    #[test]
    fn payload_roundtrip() {
        let m: Element = format!(
            "<message xmlns='jabber:client'><body>x</body><bench xmlns='{BENCH_NS}' t='123' s='7'/></message>"
        )
        .parse()
        .unwrap();
        assert_eq!(bench_payload(&m), Some((123, 7)));
        let m2: Element = "<message xmlns='jabber:client'><body>x</body></message>"
            .parse()
            .unwrap();
        assert_eq!(bench_payload(&m2), None);
    }
}
