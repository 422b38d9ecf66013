//! The byte side of an XML stream, shared by client streams (c2s) and
//! server-to-server streams (s2s): the socket (plain TCP, or TLS as server or
//! as client), the incremental parser, and coalesced writes with a timeout.
//! Both sides keep their protocol logic in sans-IO state machines and drive
//! an [`XmlConn`].

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use minidom::Element;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::xml::{StreamEvent, StreamParser, XmlError, ns, serialize_into};

/// How long one write may stall before the peer is considered gone.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Plain TCP, or TLS over TCP (we accepted it, or we initiated it).
pub enum Socket {
    Plain(TcpStream),
    /// TLS where we are the server (c2s, incoming s2s).
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// TLS where we are the client (outgoing s2s).
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// Transient state during the STARTTLS upgrade.
    Upgrading,
}

impl Socket {
    pub fn is_tls(&self) -> bool {
        matches!(self, Socket::Tls(_) | Socket::ClientTls(_))
    }

    /// The certificate chain the peer presented (end entity first).
    pub fn peer_certificates(&self) -> Vec<CertificateDer<'static>> {
        let certs = match self {
            Socket::Tls(s) => s.get_ref().1.peer_certificates(),
            Socket::ClientTls(s) => s.get_ref().1.peer_certificates(),
            _ => None,
        };
        certs
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default()
    }

    /// The ALPN protocol agreed in the TLS handshake.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        match self {
            Socket::Tls(s) => s.get_ref().1.alpn_protocol().map(|p| p.to_vec()),
            Socket::ClientTls(s) => s.get_ref().1.alpn_protocol().map(|p| p.to_vec()),
            _ => None,
        }
    }

    /// The SNI name a TLS client asked for (server side only).
    pub fn sni(&self) -> Option<String> {
        match self {
            Socket::Tls(s) => s.get_ref().1.server_name().map(str::to_owned),
            _ => None,
        }
    }
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
            Socket::ClientTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
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
            Socket::ClientTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Socket::Upgrading => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_flush(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Socket::ClientTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Socket::Upgrading => Poll::Ready(Ok(())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Socket::ClientTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Socket::Upgrading => Poll::Ready(Ok(())),
        }
    }
}

/// The stream error element and the stream close, as bytes.
pub fn stream_error_bytes(condition: &str, text: Option<&str>, app: Option<&Element>) -> Vec<u8> {
    let mut b = Element::builder("error", ns::STREAM)
        .append(Element::builder(condition, ns::STREAM_ERRORS).build());
    if let Some(t) = text {
        b = b.append(
            Element::builder("text", ns::STREAM_ERRORS)
                .append(t)
                .build(),
        );
    }
    if let Some(a) = app {
        b = b.append(a.clone());
    }
    let mut out = Vec::with_capacity(160);
    serialize_into(&mut out, &b.build(), ns::CLIENT);
    out.extend_from_slice(b"</stream:stream>");
    out
}

/// An XML stream over a [`Socket`]: reads feed the parser, writes are
/// queued and go out in one flush.
pub struct XmlConn {
    socket: Socket,
    peer: SocketAddr,
    parser: StreamParser,
    max_stanza: usize,
    /// The default namespace of the stream (`jabber:client` or
    /// `jabber:server`); elements are written for it. In a `jabber:server`
    /// stream the parser hands stanzas out as `jabber:client`, the namespace
    /// stanzas have inside the server.
    content_ns: &'static str,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    eof: bool,
}

impl XmlConn {
    pub fn new(
        socket: Socket,
        peer: SocketAddr,
        max_stanza: usize,
        content_ns: &'static str,
    ) -> Self {
        XmlConn {
            socket,
            peer,
            parser: Self::parser_for(max_stanza, content_ns),
            max_stanza,
            content_ns,
            rbuf: BytesMut::new(),
            wbuf: Vec::new(),
            eof: false,
        }
    }

    fn parser_for(max_stanza: usize, content_ns: &str) -> StreamParser {
        let p = StreamParser::new(max_stanza);
        if content_ns == ns::SERVER {
            p.server_stanzas_as_client()
        } else {
            p
        }
    }

    /// Wait for more input (cancel-safe). `Ok(0)` at the end of input,
    /// otherwise the number of bytes read.
    pub async fn read(&mut self) -> std::io::Result<usize> {
        if self.eof {
            return Ok(0);
        }
        if self.rbuf.capacity() < 4096 {
            self.rbuf.reserve(4096);
        }
        let n = self.socket.read_buf(&mut self.rbuf).await?;
        if n == 0 {
            self.eof = true;
        }
        Ok(n)
    }

    /// The stream events parsed from the input so far, and the XML error
    /// that stopped parsing, if any.
    pub fn take_events(&mut self) -> (Vec<StreamEvent>, Option<XmlError>) {
        let err = if self.rbuf.is_empty() {
            None
        } else {
            self.parser.feed(&self.rbuf).err()
        };
        self.rbuf.clear();
        // Idle connections keep no large buffers.
        if self.rbuf.capacity() > 64 * 1024 {
            self.rbuf = BytesMut::new();
        }
        let mut events = Vec::new();
        while let Some(ev) = self.parser.next_event() {
            events.push(ev);
        }
        (events, err)
    }

    /// Queue raw bytes (a stream header).
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.wbuf.extend_from_slice(bytes);
    }

    /// Queue an element.
    pub fn send_element(&mut self, el: &Element) {
        serialize_into(&mut self.wbuf, el, self.content_ns);
    }

    /// Queue a stream error and the end of the stream.
    pub fn send_stream_error(
        &mut self,
        condition: &str,
        text: Option<&str>,
        app: Option<&Element>,
    ) {
        self.wbuf.extend(stream_error_bytes(condition, text, app));
    }

    /// Queue the end of the stream.
    pub fn send_close(&mut self) {
        self.wbuf.extend_from_slice(b"</stream:stream>");
    }

    /// Bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.wbuf.len()
    }

    /// Write everything queued.
    pub async fn flush(&mut self) -> std::io::Result<()> {
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

    /// Upgrade to TLS as the server, after `<proceed/>` (which is flushed
    /// first). Anything the peer pipelined after `<starttls/>` is discarded.
    pub async fn starttls_server(
        &mut self,
        config: Arc<rustls::ServerConfig>,
        timeout: Duration,
    ) -> Result<(), String> {
        self.flush().await.map_err(|e| e.to_string())?;
        let Socket::Plain(tcp) = std::mem::replace(&mut self.socket, Socket::Upgrading) else {
            return Err("not a plain TCP stream".into());
        };
        self.rbuf.clear();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => {
                self.socket = Socket::Tls(Box::new(tls));
                self.reset();
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("TLS handshake timed out".into()),
        }
    }

    /// Upgrade to TLS as the client, after receiving `<proceed/>`.
    pub async fn starttls_client(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
        timeout: Duration,
    ) -> Result<(), String> {
        self.flush().await.map_err(|e| e.to_string())?;
        let Socket::Plain(tcp) = std::mem::replace(&mut self.socket, Socket::Upgrading) else {
            return Err("not a plain TCP stream".into());
        };
        self.rbuf.clear();
        let connector = tokio_rustls::TlsConnector::from(config);
        match tokio::time::timeout(timeout, connector.connect(server_name, tcp)).await {
            Ok(Ok(tls)) => {
                self.socket = Socket::ClientTls(Box::new(tls));
                self.reset();
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("TLS handshake timed out".into()),
        }
    }

    /// Start a new stream (after TLS or SASL): a fresh parser.
    pub fn reset(&mut self) {
        self.parser = Self::parser_for(self.max_stanza, self.content_ns);
    }

    /// Close the connection (after flushing).
    pub async fn shutdown(&mut self) {
        let _ = self.flush().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.socket.shutdown()).await;
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub fn socket(&self) -> &Socket {
        &self.socket
    }

    pub fn is_tls(&self) -> bool {
        self.socket.is_tls()
    }

    /// "tcp" or "tls" (for logs and metrics).
    pub fn kind(&self) -> &'static str {
        if self.socket.is_tls() { "tls" } else { "tcp" }
    }
}
