//! Shared integration-test support: a real Starling server started
//! in-process on 127.0.0.1:0 with its own temporary directory and store, and
//! logged-in clients speaking XMPP to it over TLS.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use minidom::Element;
use starling::auth::StoredCredentials;
use starling::client::{ClientEvent, LoginOptions, Mechanism, TlsMode, XmppClient};
use starling::config::Config;
use starling::server::{Server, ServerHandle};
use starling::storage::{AccountStore, Store, testing};

pub mod dns;

pub const DOMAIN: &str = "localhost";

pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

pub struct TestServer {
    pub handle: Option<ServerHandle>,
    pub dir: PathBuf,
    pub config: Config,
}

impl TestServer {
    /// A server on a fresh SQLite store.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A server on a fresh SQLite store, with config changes.
    pub async fn start_with(f: impl FnOnce(&mut Config)) -> Self {
        let store = testing::sqlite_store().await;
        Self::start_on(store, f).await
    }

    /// A server on the given store.
    pub async fn start_on(store: Store, f: impl FnOnce(&mut Config)) -> Self {
        init_tracing();
        let dir = testing::temp_dir("starling_it");
        let mut config = Config::for_tests(&dir);
        // Fast feedback for the unusual paths tests exercise.
        config.auth.scram_iterations = 4096;
        f(&mut config);
        let handle = Server::start_with_store(config.clone(), store)
            .await
            .expect("server starts");
        TestServer {
            handle: Some(handle),
            dir,
            config,
        }
    }

    pub fn server(&self) -> &Server {
        &self.handle.as_ref().expect("running").server
    }

    /// The first domain the server serves.
    pub fn domain(&self) -> &str {
        &self.config.server.domains[0]
    }

    pub fn addr(&self) -> SocketAddr {
        self.handle.as_ref().expect("running").c2s_starttls[0]
    }

    pub fn tls_addr(&self) -> SocketAddr {
        self.handle.as_ref().expect("running").c2s_direct_tls[0]
    }

    /// Create `user@<domain>` with password `pw-<user>`.
    pub async fn add_user(&self, user: &str) {
        let creds = StoredCredentials::from_password(&password(user), 4096).unwrap();
        assert!(
            self.server()
                .store
                .create_account(self.domain(), user, &creds)
                .await
                .unwrap(),
            "user {user} exists already"
        );
    }

    pub fn login_options(&self, user: &str, resource: &str) -> LoginOptions {
        let mut o = LoginOptions::new(self.addr(), self.domain(), user, &password(user));
        o.resource = Some(resource.to_owned());
        o
    }

    /// Log in over STARTTLS with SCRAM-SHA-256 and bind `resource`.
    pub async fn login(&self, user: &str, resource: &str) -> XmppClient {
        XmppClient::login(&self.login_options(user, resource))
            .await
            .unwrap_or_else(|e| panic!("login {user}/{resource}: {e}"))
    }

    /// Log in and send initial presence (and swallow the presence echo, if any).
    pub async fn online(&self, user: &str, resource: &str) -> XmppClient {
        let mut c = self.login(user, resource).await;
        c.send_str("<presence/>").await.unwrap();
        c
    }

    pub async fn login_with(
        &self,
        user: &str,
        resource: &str,
        tls: TlsMode,
        mech: Mechanism,
    ) -> Result<XmppClient, starling::client::ClientError> {
        let mut o = self.login_options(user, resource);
        o.tls = tls;
        if tls == TlsMode::DirectTls {
            o.addr = self.tls_addr();
        }
        o.mechanism = mech;
        XmppClient::login(&o).await
    }

    /// A raw connection: STARTTLS done, not authenticated.
    pub async fn connect(&self) -> XmppClient {
        XmppClient::connect(self.addr(), self.domain(), TlsMode::StartTls)
            .await
            .expect("connect")
    }

    pub async fn shutdown(mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }
}

pub fn password(user: &str) -> String {
    format!("pw-{user}")
}

/// Run `f` against a server on every available backend (SQLite always,
/// PostgreSQL when STARLING_TEST_DATABASE_URL is set).
pub async fn for_each_backend<F, Fut>(f: F)
where
    F: Fn(TestServer) -> Fut,
    Fut: Future<Output = ()>,
{
    for store in testing::stores().await {
        let backend = store.backend_name();
        eprintln!("-- backend {backend}");
        let srv = TestServer::start_on(store, |_| {}).await;
        f(srv).await;
    }
}

pub fn parse(xml: &str) -> Element {
    xml.parse()
        .unwrap_or_else(|e| panic!("bad test XML {xml}: {e}"))
}

pub fn chat(to: &str, body: &str) -> Element {
    parse(&format!(
        "<message xmlns='jabber:client' to='{to}' type='chat'><body>{body}</body></message>"
    ))
}

/// Receive the next element, failing the test on timeout or close.
pub async fn recv(c: &mut XmppClient) -> Element {
    c.recv().await.unwrap_or_else(|e| panic!("recv: {e}"))
}

/// Wait for a stanza matching `pred` (others stay queued).
pub async fn expect(c: &mut XmppClient, what: &str, pred: impl Fn(&Element) -> bool) -> Element {
    c.recv_matching(pred)
        .await
        .unwrap_or_else(|e| panic!("waiting for {what}: {e}"))
}

pub async fn expect_message(c: &mut XmppClient) -> Element {
    expect(c, "a message", |e| e.name() == "message").await
}

/// Assert that nothing arrives within `ms` milliseconds.
pub async fn expect_silence(c: &mut XmppClient, ms: u64) {
    let old = c.timeout;
    c.timeout = Duration::from_millis(ms);
    match c.recv_event().await {
        Err(starling::client::ClientError::Timeout) => {}
        Ok(ClientEvent::Element(e)) => {
            panic!("unexpected: {}", starling::xml::writer::to_string(&e))
        }
        other => panic!("unexpected: {other:?}"),
    }
    c.timeout = old;
}

/// Assert that nothing matching `pred` arrives within `ms` milliseconds
/// (other stanzas are consumed and ignored).
pub async fn expect_none(c: &mut XmppClient, ms: u64, what: &str, pred: impl Fn(&Element) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
    let old = c.timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        c.timeout = left;
        match c.recv_event().await {
            Err(starling::client::ClientError::Timeout) => break,
            Ok(ClientEvent::Element(e)) if pred(&e) => {
                panic!(
                    "unexpected {what}: {}",
                    starling::xml::writer::to_string(&e)
                )
            }
            Ok(ClientEvent::Element(_)) => continue,
            other => panic!("unexpected: {other:?}"),
        }
    }
    c.timeout = old;
}

/// No message arrives within `ms` milliseconds (presence is ignored).
pub async fn expect_no_message(c: &mut XmppClient, ms: u64) {
    expect_none(c, ms, "message", |e| e.name() == "message").await
}

pub fn body(e: &Element) -> Option<String> {
    e.get_child("body", "jabber:client").map(|b| b.text())
}

/// Round trip a ping to the server: everything the client sent before has
/// been processed when this returns (a session's stanzas are handled in
/// order).
pub async fn round_trip(c: &mut XmppClient) {
    let r = c
        .iq(parse(
            "<iq xmlns='jabber:client' type='get' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>",
        ))
        .await
        .unwrap_or_else(|e| panic!("ping: {e}"));
    assert_eq!(r.attr("type"), Some("result"), "ping answered");
}

/// An IQ from a string; fails the test on timeout or close.
pub async fn iq(c: &mut XmppClient, xml: &str) -> Element {
    c.iq(parse(xml))
        .await
        .unwrap_or_else(|e| panic!("iq {xml}: {e}"))
}

/// The stanza error condition, if `e` is an error.
pub fn error_condition(e: &Element) -> Option<String> {
    starling::client::stanza_error_condition(e)
}
