//! Federation (server-to-server, RFC 6120) between Starling instances on
//! different domains in one process. Names resolve through a test DNS
//! server with real SRV records (tests/common/dns.rs) unless a test uses
//! static host overrides.

mod common;

use std::time::Duration;

use common::dns::TestDns;
use common::*;
use starling::config::Config;
use starling::xml::ns;

/// Federation settings for a test server on `domain`.
fn federate(cfg: &mut Config, domain: &str, dns: &TestDns) {
    cfg.server.domains = vec![domain.to_owned()];
    cfg.s2s.enabled = true;
    cfg.s2s.listen = vec!["127.0.0.1:0".parse().unwrap()];
    cfg.s2s.resolver = Some(dns.resolver());
    cfg.s2s.system_roots = false;
    cfg.s2s.dns_timeout_secs = 2;
    cfg.s2s.connect_timeout_secs = 2;
    cfg.s2s.auth_timeout_secs = 10;
    cfg.s2s.retry_after_secs = 1;
}

/// Two servers, a.test and b.test, published in the test DNS.
async fn pair(dns: &TestDns, f: impl Fn(&mut Config) + Copy) -> (TestServer, TestServer) {
    let a = TestServer::start_with(|c| {
        federate(c, "a.test", dns);
        f(c)
    })
    .await;
    let b = TestServer::start_with(|c| {
        federate(c, "b.test", dns);
        f(c)
    })
    .await;
    dns.server("a.test", s2s_port(&a));
    dns.server("b.test", s2s_port(&b));
    (a, b)
}

fn s2s_port(s: &TestServer) -> u16 {
    s.handle.as_ref().unwrap().s2s[0].port()
}

#[tokio::test]
async fn dialback_chat_both_ways() {
    let dns = TestDns::start().await;
    let (a, b) = pair(&dns, |_| {}).await;
    a.add_user("alice").await;
    b.add_user("bob").await;
    let mut alice = a.online("alice", "phone").await;
    let mut bob = b.online("bob", "laptop").await;

    alice
        .send(&chat("bob@b.test", "hello from a"))
        .await
        .unwrap();
    let m = expect_message(&mut bob).await;
    assert_eq!(body(&m).as_deref(), Some("hello from a"));
    assert_eq!(m.attr("from"), Some("alice@a.test/phone"));
    assert_eq!(m.attr("to"), Some("bob@b.test"));

    bob.send(&chat("alice@a.test/phone", "hello from b"))
        .await
        .unwrap();
    let m = expect_message(&mut alice).await;
    assert_eq!(body(&m).as_deref(), Some("hello from b"));
    assert_eq!(m.attr("from"), Some("bob@b.test/laptop"));

    // IQs are answered across: ping and version of the other server.
    let r = alice
        .iq(parse(
            "<iq xmlns='jabber:client' type='get' to='b.test' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>",
        ))
        .await
        .unwrap();
    assert_eq!(r.attr("type"), Some("result"));
    assert_eq!(r.attr("from"), Some("b.test"));
    let r = bob
        .iq(parse(
            "<iq xmlns='jabber:client' type='get' to='a.test' id='v1'><query xmlns='jabber:iq:version'/></iq>",
        ))
        .await
        .unwrap();
    assert_eq!(r.attr("type"), Some("result"));
    assert!(r.get_child("query", ns::VERSION).is_some());

    // One outgoing stream per direction, reused.
    let sa = a.server().s2s().unwrap();
    let sb = b.server().s2s().unwrap();
    assert_eq!(
        sa.outgoing_routes(),
        vec![("a.test".into(), "b.test".into())]
    );
    assert_eq!(
        sb.outgoing_routes(),
        vec![("b.test".into(), "a.test".into())]
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn unknown_domain_bounces_remote_server_not_found() {
    let dns = TestDns::start().await;
    let (a, _b) = pair(&dns, |_| {}).await;
    a.add_user("alice").await;
    let mut alice = a.online("alice", "r").await;
    alice
        .send(&chat("someone@nowhere.test", "anyone?"))
        .await
        .unwrap();
    let e = expect_message(&mut alice).await;
    assert_eq!(e.attr("type"), Some("error"));
    assert_eq!(
        starling::client::stanza_error_condition(&e).as_deref(),
        Some("remote-server-not-found")
    );
    let _ = Duration::from_secs(1);
}
