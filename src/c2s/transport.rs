//! Client transports: the byte-level side of a client stream. The session
//! task drives a [`ClientTransport`] and does not care whether it is TCP,
//! TLS or (later) WebSocket; a resumed session (XEP-0198) takes over the
//! transport of the connection that resumed it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use minidom::Element;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::auth::ChannelBindings;
use crate::tls::CertStore;
use crate::xml::{StreamEvent, StreamParser, XmlError, ns, serialize_into, stream_header};

/// How long one write may stall before the peer is considered gone.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

#[async_trait]
pub trait ClientTransport: Send {
    /// Wait for more input (cancel-safe). `Ok(false)` at the end of input.
    async fn read(&mut self) -> std::io::Result<bool>;
    /// The stream events parsed from the input so far, and the XML error
    /// that stopped parsing, if any.
    fn take_events(&mut self) -> (Vec<StreamEvent>, Option<XmlError>);
    /// Queue our stream header.
    fn send_header(&mut self, id: &str, from: &str);
    /// Queue an element.
    fn send_element(&mut self, el: &Element);
    /// Queue a stream error and the end of the stream.
    fn send_stream_error(&mut self, condition: &str, text: Option<&str>, app: Option<&Element>);
    /// Queue the end of the stream.
    fn send_close(&mut self);
    /// Bytes queued and not yet written.
    fn pending(&self) -> usize;
    /// Write everything queued.
    async fn flush(&mut self) -> std::io::Result<()>;
    /// Upgrade to TLS after `<proceed/>` (flushed first). None if this
    /// transport cannot or the handshake fails.
    async fn starttls(
        &mut self,
        _config: Arc<rustls::ServerConfig>,
        _certs: &CertStore,
        _timeout: Duration,
    ) -> Option<ChannelBindings> {
        None
    }
    /// Start a new stream (after TLS or SASL): a fresh parser.
    fn reset(&mut self);
    /// Close the connection (after flushing).
    async fn shutdown(&mut self);
    fn peer(&self) -> SocketAddr;
    /// "tcp", "tls" or "websocket" (for logs and metrics).
    fn kind(&self) -> &'static str;
}

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

/// XMPP over TCP, with or without TLS.
pub struct TcpTransport {
    socket: Socket,
    peer: SocketAddr,
    parser: StreamParser,
    max_stanza: usize,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    eof: bool,
}

impl TcpTransport {
    pub fn new(socket: Socket, peer: SocketAddr, max_stanza: usize) -> Self {
        TcpTransport {
            socket,
            peer,
            parser: StreamParser::new(max_stanza),
            max_stanza,
            rbuf: BytesMut::new(),
            wbuf: Vec::new(),
            eof: false,
        }
    }
}

#[async_trait]
impl ClientTransport for TcpTransport {
    async fn read(&mut self) -> std::io::Result<bool> {
        if self.eof {
            return Ok(false);
        }
        if self.rbuf.capacity() < 4096 {
            self.rbuf.reserve(4096);
        }
        let n = self.socket.read_buf(&mut self.rbuf).await?;
        if n == 0 {
            self.eof = true;
        }
        Ok(n > 0)
    }

    fn take_events(&mut self) -> (Vec<StreamEvent>, Option<XmlError>) {
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

    fn send_header(&mut self, id: &str, from: &str) {
        self.wbuf
            .extend(stream_header(ns::CLIENT, Some(from), None, Some(id), ""));
    }

    fn send_element(&mut self, el: &Element) {
        serialize_into(&mut self.wbuf, el, ns::CLIENT);
    }

    fn send_stream_error(&mut self, condition: &str, text: Option<&str>, app: Option<&Element>) {
        self.wbuf.extend(stream_error_bytes(condition, text, app));
    }

    fn send_close(&mut self) {
        self.wbuf.extend_from_slice(b"</stream:stream>");
    }

    fn pending(&self) -> usize {
        self.wbuf.len()
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

    async fn starttls(
        &mut self,
        config: Arc<rustls::ServerConfig>,
        certs: &CertStore,
        timeout: Duration,
    ) -> Option<ChannelBindings> {
        if self.flush().await.is_err() {
            return None;
        }
        let Socket::Plain(tcp) = std::mem::replace(&mut self.socket, Socket::Upgrading) else {
            return None;
        };
        // Anything the client pipelined after <starttls/> is discarded.
        self.rbuf.clear();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => {
                let b = crate::tls::channel_bindings(tls.get_ref().1, certs);
                self.socket = Socket::Tls(Box::new(tls));
                self.reset();
                Some(b)
            }
            Ok(Err(e)) => {
                tracing::debug!(peer = %self.peer, error = %e, "STARTTLS handshake failed");
                None
            }
            Err(_) => None,
        }
    }

    fn reset(&mut self) {
        self.parser = StreamParser::new(self.max_stanza);
    }

    async fn shutdown(&mut self) {
        let _ = self.flush().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.socket.shutdown()).await;
    }

    fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn kind(&self) -> &'static str {
        match self.socket {
            Socket::Tls(_) => "tls",
            _ => "tcp",
        }
    }
}
