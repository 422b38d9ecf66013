//! Client transports: the byte-level side of a client stream. The session
//! task drives a [`ClientTransport`] and does not care whether it is TCP,
//! TLS or (later) WebSocket; a resumed session (XEP-0198) takes over the
//! transport of the connection that resumed it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use minidom::Element;

use crate::auth::ChannelBindings;
use crate::stream::XmlConn;
use crate::tls::CertStore;
use crate::xml::{StreamEvent, XmlError, ns, stream_header};

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

pub use crate::stream::{Socket, WRITE_TIMEOUT, stream_error_bytes};

/// XMPP over TCP, with or without TLS.
pub struct TcpTransport {
    conn: XmlConn,
}

impl TcpTransport {
    pub fn new(socket: Socket, peer: SocketAddr, max_stanza: usize) -> Self {
        TcpTransport {
            conn: XmlConn::new(socket, peer, max_stanza, ns::CLIENT),
        }
    }
}

#[async_trait]
impl ClientTransport for TcpTransport {
    async fn read(&mut self) -> std::io::Result<bool> {
        Ok(self.conn.read().await? > 0)
    }

    fn take_events(&mut self) -> (Vec<StreamEvent>, Option<XmlError>) {
        self.conn.take_events()
    }

    fn send_header(&mut self, id: &str, from: &str) {
        self.conn
            .send_bytes(&stream_header(ns::CLIENT, Some(from), None, Some(id), ""));
    }

    fn send_element(&mut self, el: &Element) {
        self.conn.send_element(el);
    }

    fn send_stream_error(&mut self, condition: &str, text: Option<&str>, app: Option<&Element>) {
        self.conn.send_stream_error(condition, text, app);
    }

    fn send_close(&mut self) {
        self.conn.send_close();
    }

    fn pending(&self) -> usize {
        self.conn.pending()
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.conn.flush().await
    }

    async fn starttls(
        &mut self,
        config: Arc<rustls::ServerConfig>,
        certs: &CertStore,
        timeout: Duration,
    ) -> Option<ChannelBindings> {
        match self.conn.starttls_server(config, timeout).await {
            Ok(()) => match self.conn.socket() {
                Socket::Tls(tls) => Some(crate::tls::channel_bindings(tls.get_ref().1, certs)),
                _ => None,
            },
            Err(e) => {
                tracing::debug!(peer = %self.conn.peer(), error = %e, "STARTTLS handshake failed");
                None
            }
        }
    }

    fn reset(&mut self) {
        self.conn.reset();
    }

    async fn shutdown(&mut self) {
        self.conn.shutdown().await;
    }

    fn peer(&self) -> SocketAddr {
        self.conn.peer()
    }

    fn kind(&self) -> &'static str {
        self.conn.kind()
    }
}
