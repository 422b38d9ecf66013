//! A small XMPP client: connect (STARTTLS, direct TLS or plaintext), SASL
//! (SCRAM-SHA-1/256 with or without channel binding, PLAIN), bind, then send
//! and receive elements. Used by the integration tests, the `starling-bench`
//! load generator and `starling send`. It speaks the same wire protocol any
//! client does and shares only the XML layer with the server.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use jid::FullJid;
use minidom::Element;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::auth::ScramHash;
use crate::stanza::name;
use crate::xml::{StreamEvent, StreamParser, ns, serialize_into};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("xml: {0}")]
    Xml(#[from] crate::xml::XmlError),
    #[error("timed out")]
    Timeout,
    #[error("stream closed")]
    Closed,
    #[error("stream error: {0}")]
    StreamError(String),
    #[error("authentication failed: {0}")]
    AuthFailed(String),
    #[error("protocol: {0}")]
    Protocol(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    StartTls,
    DirectTls,
    /// No TLS at all (servers that allow it, and negative tests).
    Plain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    ScramSha256,
    ScramSha1,
    ScramSha256Plus(ChannelBindingType),
    ScramSha1Plus(ChannelBindingType),
    Plain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelBindingType {
    TlsExporter,
    TlsServerEndPoint,
}

impl ChannelBindingType {
    fn name(self) -> &'static str {
        match self {
            ChannelBindingType::TlsExporter => "tls-exporter",
            ChannelBindingType::TlsServerEndPoint => "tls-server-end-point",
        }
    }
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::ScramSha1 => "SCRAM-SHA-1",
            Mechanism::ScramSha256Plus(_) => "SCRAM-SHA-256-PLUS",
            Mechanism::ScramSha1Plus(_) => "SCRAM-SHA-1-PLUS",
            Mechanism::Plain => "PLAIN",
        }
    }
}

/// Salted passwords computed before, keyed by (password, salt, iterations,
/// hash), so that a load generator does not spend its CPU on PBKDF2.
#[derive(Default, Clone)]
pub struct KeyCache(Arc<Mutex<HashMap<KeyCacheKey, Vec<u8>>>>);

/// (password, salt, iterations, is SHA-256)
type KeyCacheKey = (String, Vec<u8>, u32, bool);

/// One salted password of a [`KeyCache`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyCacheEntry {
    pub password: String,
    pub salt: Vec<u8>,
    pub iterations: u32,
    /// SHA-256 (else SHA-1).
    pub sha256: bool,
    pub salted: Vec<u8>,
}

impl KeyCache {
    /// Every cached entry. Used to persist the cache between benchmark runs.
    pub fn entries(&self) -> Vec<KeyCacheEntry> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|((password, salt, iterations, sha256), v)| KeyCacheEntry {
                password: password.clone(),
                salt: salt.clone(),
                iterations: *iterations,
                sha256: *sha256,
                salted: v.clone(),
            })
            .collect()
    }

    /// Add an entry computed before (see [`KeyCache::entries`]).
    pub fn insert(&self, e: KeyCacheEntry) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((e.password, e.salt, e.iterations, e.sha256), e.salted);
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn salted(&self, hash: ScramHash, password: &str, salt: &[u8], iterations: u32) -> Vec<u8> {
        let key = (
            password.to_owned(),
            salt.to_vec(),
            iterations,
            hash == ScramHash::Sha256,
        );
        if let Some(v) = self.0.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return v.clone();
        }
        let v = hash.salted_password(password.as_bytes(), salt, iterations);
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, v.clone());
        v
    }
}

/// Accepts any server certificate (tests and benchmarks against
/// self-signed certificates only).
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS client configuration that trusts any certificate.
pub fn insecure_tls_config(alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let provider = crate::tls::crypto_provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

pub enum ClientSocket {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Upgrading,
}

impl AsyncRead for ClientSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientSocket::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientSocket::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            ClientSocket::Upgrading => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }
}

impl AsyncWrite for ClientSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ClientSocket::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientSocket::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            ClientSocket::Upgrading => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientSocket::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientSocket::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            ClientSocket::Upgrading => Poll::Ready(Ok(())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientSocket::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientSocket::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            ClientSocket::Upgrading => Poll::Ready(Ok(())),
        }
    }
}

/// What [`XmppClient::recv_event`] returns.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    Element(Element),
    /// The server closed its stream (`</stream:stream>`) or the socket.
    Closed,
}

/// Options for [`XmppClient::login`].
#[derive(Clone)]
pub struct LoginOptions {
    pub addr: SocketAddr,
    pub domain: String,
    pub username: String,
    pub password: String,
    pub resource: Option<String>,
    pub tls: TlsMode,
    pub mechanism: Mechanism,
    pub keys: KeyCache,
    pub timeout: Duration,
}

impl LoginOptions {
    pub fn new(addr: SocketAddr, domain: &str, username: &str, password: &str) -> Self {
        LoginOptions {
            addr,
            domain: domain.to_owned(),
            username: username.to_owned(),
            password: password.to_owned(),
            resource: None,
            tls: TlsMode::StartTls,
            mechanism: Mechanism::ScramSha256,
            keys: KeyCache::default(),
            timeout: Duration::from_secs(10),
        }
    }
}

pub struct XmppClient {
    pub socket: ClientSocket,
    parser: StreamParser,
    rbuf: Vec<u8>,
    queue: VecDeque<Element>,
    pub domain: String,
    /// The last `<stream:features/>` received.
    pub features: Option<Element>,
    pub jid: Option<FullJid>,
    pub stream_id: Option<String>,
    closed: bool,
    pub timeout: Duration,
}

impl XmppClient {
    /// Open a TCP connection and a stream; with STARTTLS/direct TLS, return
    /// once the stream is encrypted and its features are known.
    pub async fn connect(
        addr: SocketAddr,
        domain: &str,
        tls: TlsMode,
    ) -> Result<Self, ClientError> {
        Self::connect_with_timeout(addr, domain, tls, Duration::from_secs(10)).await
    }

    /// [`XmppClient::connect`] with the given timeout for each read (a
    /// loaded server may take longer than the default 10 s to answer).
    pub async fn connect_with_timeout(
        addr: SocketAddr,
        domain: &str,
        tls: TlsMode,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        let socket = match tls {
            TlsMode::DirectTls => {
                ClientSocket::Tls(Box::new(tls_connect(tcp, domain, &[b"xmpp-client"]).await?))
            }
            _ => ClientSocket::Plain(tcp),
        };
        let mut c = XmppClient {
            socket,
            parser: StreamParser::new(16 * 1024 * 1024),
            rbuf: Vec::with_capacity(8192),
            queue: VecDeque::new(),
            domain: domain.to_owned(),
            features: None,
            jid: None,
            stream_id: None,
            closed: false,
            timeout,
        };
        c.open_stream().await?;
        if tls == TlsMode::StartTls {
            c.starttls().await?;
        }
        Ok(c)
    }

    /// Connect, authenticate and bind.
    pub async fn login(o: &LoginOptions) -> Result<Self, ClientError> {
        let fut = async {
            let mut c = XmppClient::connect(o.addr, &o.domain, o.tls).await?;
            c.timeout = o.timeout;
            c.authenticate(&o.username, &o.password, o.mechanism, &o.keys)
                .await?;
            c.bind(o.resource.as_deref()).await?;
            Ok(c)
        };
        tokio::time::timeout(o.timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    /// Send our stream header and read the server's header and features.
    pub async fn open_stream(&mut self) -> Result<Element, ClientError> {
        self.parser = StreamParser::new(16 * 1024 * 1024);
        let header = format!(
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
             xmlns:stream='http://etherx.jabber.org/streams' to='{}' version='1.0' xml:lang='en'>",
            self.domain
        );
        self.send_raw(header.as_bytes()).await?;
        loop {
            match self.next_stream_event().await? {
                StreamEvent::Header(h) => self.stream_id = h.id,
                StreamEvent::Element(e) if e.is("features", ns::STREAM) => {
                    self.features = Some(e.clone());
                    return Ok(e);
                }
                StreamEvent::Element(e) if e.is("error", ns::STREAM) => {
                    return Err(ClientError::StreamError(stream_error_condition(&e)));
                }
                StreamEvent::Element(e) => self.queue.push_back(e),
                StreamEvent::End => return Err(ClientError::Closed),
            }
        }
    }

    async fn starttls(&mut self) -> Result<(), ClientError> {
        let offered = self
            .features
            .as_ref()
            .map(|f| f.has_child("starttls", ns::TLS))
            .unwrap_or(false);
        if !offered {
            return Err(ClientError::Protocol("STARTTLS not offered".into()));
        }
        self.send_raw(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            .await?;
        let e = self.recv().await?;
        if !e.is("proceed", ns::TLS) {
            return Err(ClientError::Protocol(format!(
                "STARTTLS refused: {}",
                e.name()
            )));
        }
        let ClientSocket::Plain(tcp) = std::mem::replace(&mut self.socket, ClientSocket::Upgrading)
        else {
            return Err(ClientError::Protocol("already TLS".into()));
        };
        self.socket = ClientSocket::Tls(Box::new(tls_connect(tcp, &self.domain, &[]).await?));
        self.open_stream().await?;
        Ok(())
    }

    /// Channel-binding data of this connection (for -PLUS mechanisms).
    pub fn channel_binding(&self, t: ChannelBindingType) -> Option<Vec<u8>> {
        let ClientSocket::Tls(tls) = &self.socket else {
            return None;
        };
        let conn = tls.get_ref().1;
        match t {
            ChannelBindingType::TlsExporter => {
                let mut out = [0u8; 32];
                conn.export_keying_material(&mut out, b"EXPORTER-Channel-Binding", None)
                    .ok()?;
                Some(out.to_vec())
            }
            ChannelBindingType::TlsServerEndPoint => {
                let cert = conn.peer_certificates()?.first()?;
                Some(crate::tls::end_point_hash(cert))
            }
        }
    }

    /// SASL authentication followed by the stream restart.
    pub async fn authenticate(
        &mut self,
        username: &str,
        password: &str,
        mech: Mechanism,
        keys: &KeyCache,
    ) -> Result<(), ClientError> {
        match mech {
            Mechanism::Plain => {
                let msg = format!("\0{username}\0{password}");
                self.send_raw(
                    format!(
                        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{}</auth>",
                        B64.encode(msg)
                    )
                    .as_bytes(),
                )
                .await?;
                let e = self.recv().await?;
                if !e.is("success", ns::SASL) {
                    return Err(ClientError::AuthFailed(sasl_condition(&e)));
                }
            }
            _ => self.scram(username, password, mech, keys).await?,
        }
        self.open_stream().await?;
        Ok(())
    }

    async fn scram(
        &mut self,
        username: &str,
        password: &str,
        mech: Mechanism,
        keys: &KeyCache,
    ) -> Result<(), ClientError> {
        let (hash, cb) = match mech {
            Mechanism::ScramSha256 => (ScramHash::Sha256, None),
            Mechanism::ScramSha1 => (ScramHash::Sha1, None),
            Mechanism::ScramSha256Plus(t) => (ScramHash::Sha256, Some(t)),
            Mechanism::ScramSha1Plus(t) => (ScramHash::Sha1, Some(t)),
            Mechanism::Plain => unreachable!("handled by the caller"),
        };
        let gs2 = match cb {
            Some(t) => format!("p={},,", t.name()),
            None => "n,,".to_owned(),
        };
        let cnonce = crate::auth::random_nonce();
        let user = username.replace('=', "=3D").replace(',', "=2C");
        let first_bare = format!("n={user},r={cnonce}");
        self.send_raw(
            format!(
                "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='{}'>{}</auth>",
                mech.name(),
                B64.encode(format!("{gs2}{first_bare}"))
            )
            .as_bytes(),
        )
        .await?;
        let e = self.recv().await?;
        if !e.is("challenge", ns::SASL) {
            return Err(ClientError::AuthFailed(sasl_condition(&e)));
        }
        let sf = String::from_utf8(
            B64.decode(e.text().trim())
                .map_err(|_| ClientError::Protocol("bad base64".into()))?,
        )
        .map_err(|_| ClientError::Protocol("bad utf-8".into()))?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for part in sf.split(',') {
            if let Some(v) = part.strip_prefix("r=") {
                nonce = Some(v.to_owned());
            } else if let Some(v) = part.strip_prefix("s=") {
                salt = B64.decode(v).ok();
            } else if let Some(v) = part.strip_prefix("i=") {
                iterations = v.parse::<u32>().ok();
            }
        }
        let (Some(nonce), Some(salt), Some(iterations)) = (nonce, salt, iterations) else {
            return Err(ClientError::Protocol(format!("bad server-first {sf}")));
        };
        if !nonce.starts_with(&cnonce) {
            return Err(ClientError::Protocol(
                "server nonce does not extend ours".into(),
            ));
        }
        let mut cbind = gs2.into_bytes();
        if let Some(t) = cb {
            let data = self
                .channel_binding(t)
                .ok_or_else(|| ClientError::Protocol("no channel binding data".into()))?;
            cbind.extend_from_slice(&data);
        }
        let without_proof = format!("c={},r={nonce}", B64.encode(&cbind));
        let auth_message = format!("{first_bare},{sf},{without_proof}");
        let salted = keys.salted(hash, password, &salt, iterations);
        let client_key = hash.hmac(&salted, b"Client Key");
        let stored_key = hash.hash(&client_key);
        let signature = hash.hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature)
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = hash.hmac(&salted, b"Server Key");
        let expected_v = B64.encode(hash.hmac(&server_key, auth_message.as_bytes()));
        self.send_raw(
            format!(
                "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
                B64.encode(format!("{without_proof},p={}", B64.encode(proof)))
            )
            .as_bytes(),
        )
        .await?;
        let e = self.recv().await?;
        if !e.is("success", ns::SASL) {
            return Err(ClientError::AuthFailed(sasl_condition(&e)));
        }
        let v =
            String::from_utf8(B64.decode(e.text().trim()).unwrap_or_default()).unwrap_or_default();
        if v.strip_prefix("v=") != Some(expected_v.as_str()) {
            return Err(ClientError::Protocol("server signature mismatch".into()));
        }
        Ok(())
    }

    /// Bind a resource (None: the server picks one).
    pub async fn bind(&mut self, resource: Option<&str>) -> Result<FullJid, ClientError> {
        let mut bind = Element::builder("bind", ns::BIND);
        if let Some(r) = resource {
            bind = bind.append(Element::builder("resource", ns::BIND).append(r).build());
        }
        let iq = Element::builder("iq", ns::CLIENT)
            .attr(name("type"), "set")
            .attr(name("id"), "bind-1")
            .append(bind.build())
            .build();
        let reply = self.iq(iq).await?;
        let jid = reply
            .get_child("bind", ns::BIND)
            .and_then(|b| b.get_child("jid", ns::BIND))
            .map(|j| j.text())
            .ok_or_else(|| {
                ClientError::Protocol(format!(
                    "bind failed: {}",
                    crate::xml::writer::to_string(&reply)
                ))
            })?;
        let jid = FullJid::new(&jid).map_err(|_| ClientError::Protocol("bad bound JID".into()))?;
        self.jid = Some(jid.clone());
        Ok(jid)
    }

    pub async fn send_raw(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.socket.write_all(data).await?;
        self.socket.flush().await?;
        Ok(())
    }

    pub async fn send(&mut self, el: &Element) -> Result<(), ClientError> {
        let mut out = Vec::with_capacity(256);
        serialize_into(&mut out, el, ns::CLIENT);
        self.send_raw(&out).await
    }

    /// Send several elements in one write.
    pub async fn send_all(&mut self, els: &[Element]) -> Result<(), ClientError> {
        let mut out = Vec::with_capacity(256 * els.len());
        for el in els {
            serialize_into(&mut out, el, ns::CLIENT);
        }
        self.send_raw(&out).await
    }

    /// Send a string of XML (for tests).
    pub async fn send_str(&mut self, xml: &str) -> Result<(), ClientError> {
        self.send_raw(xml.as_bytes()).await
    }

    async fn next_stream_event(&mut self) -> Result<StreamEvent, ClientError> {
        loop {
            if let Some(ev) = self.parser.next_event() {
                return Ok(ev);
            }
            if self.closed {
                return Err(ClientError::Closed);
            }
            self.rbuf.clear();
            let n = tokio::time::timeout(self.timeout, self.socket.read_buf(&mut self.rbuf))
                .await
                .map_err(|_| ClientError::Timeout)??;
            if n == 0 {
                self.closed = true;
                return Ok(StreamEvent::End);
            }
            let data = std::mem::take(&mut self.rbuf);
            let r = self.parser.feed(&data);
            self.rbuf = data;
            r?;
        }
    }

    /// The next element or the end of the stream.
    pub async fn recv_event(&mut self) -> Result<ClientEvent, ClientError> {
        if let Some(e) = self.queue.pop_front() {
            return Ok(ClientEvent::Element(e));
        }
        loop {
            match self.next_stream_event().await {
                Ok(StreamEvent::Element(e)) => return Ok(ClientEvent::Element(e)),
                Ok(StreamEvent::End) | Err(ClientError::Closed) => return Ok(ClientEvent::Closed),
                Ok(StreamEvent::Header(_)) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The next element; a stream error or close is an error.
    pub async fn recv(&mut self) -> Result<Element, ClientError> {
        match self.recv_event().await? {
            ClientEvent::Element(e) if e.is("error", ns::STREAM) => {
                Err(ClientError::StreamError(stream_error_condition(&e)))
            }
            ClientEvent::Element(e) => Ok(e),
            ClientEvent::Closed => Err(ClientError::Closed),
        }
    }

    /// Wait for an element matching `pred`, keeping the others queued.
    pub async fn recv_matching(
        &mut self,
        pred: impl Fn(&Element) -> bool,
    ) -> Result<Element, ClientError> {
        if let Some(pos) = self.queue.iter().position(&pred) {
            return Ok(self.queue.remove(pos).expect("position is valid"));
        }
        let mut skipped = Vec::new();
        let result = loop {
            match self.next_stream_event().await {
                Ok(StreamEvent::Element(e)) if pred(&e) => break Ok(e),
                Ok(StreamEvent::Element(e)) if e.is("error", ns::STREAM) => {
                    break Err(ClientError::StreamError(stream_error_condition(&e)));
                }
                Ok(StreamEvent::Element(e)) => skipped.push(e),
                Ok(StreamEvent::Header(_)) => continue,
                Ok(StreamEvent::End) => break Err(ClientError::Closed),
                Err(e) => break Err(e),
            }
        };
        self.queue.extend(skipped);
        result
    }

    /// Send an IQ and wait for the result or error with its id.
    pub async fn iq(&mut self, mut iq: Element) -> Result<Element, ClientError> {
        let id = match iq.attr("id") {
            Some(id) => id.to_owned(),
            None => {
                let id = crate::stanza::new_id();
                crate::stanza::set_attr(&mut iq, "id", id.clone());
                id
            }
        };
        self.send(&iq).await?;
        self.recv_matching(|e| {
            e.name() == "iq"
                && e.attr("id") == Some(id.as_str())
                && matches!(e.attr("type"), Some("result") | Some("error"))
        })
        .await
    }

    /// Take the stream apart after negotiation, for a driver that reads and
    /// writes on its own (the load generator): the socket, the parser with
    /// whatever it has buffered, and the elements received but not consumed.
    pub fn into_parts(self) -> (ClientSocket, StreamParser, VecDeque<Element>) {
        (self.socket, self.parser, self.queue)
    }

    /// Close our stream and wait for the server's close.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.send_raw(b"</stream:stream>").await?;
        loop {
            match self.recv_event().await {
                Ok(ClientEvent::Closed) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        let _ = self.socket.shutdown().await;
        Ok(())
    }
}

async fn tls_connect(
    tcp: TcpStream,
    domain: &str,
    alpn: &[&[u8]],
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ClientError> {
    let connector = tokio_rustls::TlsConnector::from(insecure_tls_config(alpn));
    let name = ServerName::try_from(domain.to_owned())
        .map_err(|_| ClientError::Protocol(format!("bad server name {domain}")))?;
    Ok(connector.connect(name, tcp).await?)
}

/// The condition of a `<stream:error/>`.
pub fn stream_error_condition(e: &Element) -> String {
    e.children()
        .find(|c| c.ns() == ns::STREAM_ERRORS && c.name() != "text")
        .map(|c| c.name().to_owned())
        .unwrap_or_default()
}

fn sasl_condition(e: &Element) -> String {
    if e.is("error", ns::STREAM) {
        return format!("stream error {}", stream_error_condition(e));
    }
    e.children()
        .find(|c| c.name() != "text")
        .map(|c| c.name().to_owned())
        .unwrap_or_else(|| e.name().to_owned())
}

/// The condition of a stanza error, if the stanza is one.
pub fn stanza_error_condition(e: &Element) -> Option<String> {
    let err = e.children().find(|c| c.name() == "error")?;
    err.children()
        .find(|c| c.ns() == ns::STANZA_ERRORS && c.name() != "text")
        .map(|c| c.name().to_owned())
}
