//! Client streams end to end: login over STARTTLS and direct TLS with every
//! mechanism, resource binding, routing between sessions, stream errors for
//! bad input (and a normal client still working afterwards), limits,
//! graceful shutdown.

mod common;

use std::time::Duration;

use common::*;
use starling::client::{
    ChannelBindingType, ClientError, ClientEvent, Mechanism, TlsMode, XmppClient,
};
use starling::xml::ns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn login_with_every_mechanism_over_starttls_and_direct_tls() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        let mechs = [
            Mechanism::ScramSha256,
            Mechanism::ScramSha1,
            Mechanism::ScramSha256Plus(ChannelBindingType::TlsExporter),
            Mechanism::ScramSha1Plus(ChannelBindingType::TlsExporter),
            Mechanism::ScramSha256Plus(ChannelBindingType::TlsServerEndPoint),
            Mechanism::Plain,
        ];
        for tls in [TlsMode::StartTls, TlsMode::DirectTls] {
            for mech in mechs {
                let c = srv
                    .login_with("alice", "r1", tls, mech)
                    .await
                    .unwrap_or_else(|e| panic!("{tls:?} {mech:?}: {e}"));
                assert_eq!(c.jid.as_ref().unwrap().to_string(), "alice@localhost/r1");
                c.close().await.unwrap();
            }
        }
        srv.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn features_before_and_after_tls_and_auth() {
    let srv = TestServer::start().await;
    let mut raw = tokio::net::TcpStream::connect(srv.addr()).await.unwrap();
    raw.write_all(b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = String::new();
    while !got.contains("</stream:features>") {
        let n = raw.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got.push_str(std::str::from_utf8(&buf[..n]).unwrap());
    }
    assert!(
        got.contains("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>"),
        "{got}"
    );
    assert!(!got.contains("mechanisms"), "no SASL before TLS: {got}");

    let c = srv.connect().await;
    let f = c.features.clone().unwrap();
    let mechs: Vec<String> = f
        .get_child("mechanisms", ns::SASL)
        .unwrap()
        .children()
        .map(|m| m.text())
        .collect();
    assert!(mechs.contains(&"SCRAM-SHA-256-PLUS".to_string()));
    assert!(mechs.contains(&"SCRAM-SHA-1".to_string()));
    assert!(mechs.contains(&"PLAIN".to_string()));
    assert!(f.has_child("sasl-channel-binding", ns::SASL_CB));

    srv.add_user("bob").await;
    let mut o = srv.login_options("bob", "x");
    o.resource = None;
    let mut c = XmppClient::connect(o.addr, DOMAIN, TlsMode::StartTls)
        .await
        .unwrap();
    c.authenticate(
        "bob",
        &password("bob"),
        Mechanism::ScramSha256,
        &Default::default(),
    )
    .await
    .unwrap();
    let f = c.features.clone().unwrap();
    assert!(f.has_child("bind", ns::BIND));
    assert!(
        f.get_child("session", ns::SESSION)
            .unwrap()
            .has_child("optional", ns::SESSION)
    );
    assert!(f.has_child("c", ns::CAPS));
    let jid = c.bind(None).await.unwrap();
    assert!(
        jid.to_string().starts_with("bob@localhost/"),
        "server-generated resource: {jid}"
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn wrong_password_is_not_authorized_and_throttled() {
    let srv = TestServer::start_with(|c| c.auth.max_failures = 3).await;
    srv.add_user("alice").await;
    for _ in 0..2 {
        let mut o = srv.login_options("alice", "r");
        o.password = "wrong".into();
        match XmppClient::login(&o).await {
            Err(ClientError::AuthFailed(c)) => assert_eq!(c, "not-authorized"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("wrong password accepted"),
        }
    }
    // Unknown users fail the same way.
    let mut o = srv.login_options("nobody", "r");
    o.password = "x".into();
    assert!(
        matches!(XmppClient::login(&o).await, Err(ClientError::AuthFailed(c)) if c == "not-authorized")
    );
    // Now the IP is throttled, even with the right password.
    match XmppClient::login(&srv.login_options("alice", "r")).await {
        Err(ClientError::AuthFailed(c)) => assert_eq!(c, "temporary-auth-failure"),
        other => panic!("expected throttling, got {:?}", other.map(|_| ())),
    }
    srv.shutdown().await;

    // With the limit not reached, a good login after a bad one works.
    let srv = TestServer::start().await;
    srv.add_user("alice").await;
    let mut o = srv.login_options("alice", "r");
    o.password = "wrong".into();
    assert!(XmppClient::login(&o).await.is_err());
    srv.login("alice", "r").await;
    srv.shutdown().await;
}

#[tokio::test]
async fn messages_between_two_accounts() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        let mut a = srv.online("alice", "phone").await;
        let mut b = srv.online("bob", "desk").await;
        // To the full JID.
        a.send(&chat("bob@localhost/desk", "to full"))
            .await
            .unwrap();
        let m = expect_message(&mut b).await;
        assert_eq!(m.attr("from"), Some("alice@localhost/phone"));
        assert_eq!(m.attr("to"), Some("bob@localhost/desk"));
        assert_eq!(body(&m).as_deref(), Some("to full"));
        // To the bare JID.
        b.send(&chat("alice@localhost", "to bare")).await.unwrap();
        let m = expect_message(&mut a).await;
        assert_eq!(m.attr("from"), Some("bob@localhost/desk"));
        assert_eq!(body(&m).as_deref(), Some("to bare"));
        // Many in a row arrive in order.
        let msgs: Vec<_> = (0..200)
            .map(|i| chat("bob@localhost", &format!("n{i}")))
            .collect();
        a.send_all(&msgs).await.unwrap();
        for i in 0..200 {
            let m = expect_message(&mut b).await;
            assert_eq!(body(&m), Some(format!("n{i}")));
        }
        srv.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn bare_jid_messages_follow_priority() {
    let srv = TestServer::start().await;
    srv.add_user("alice").await;
    srv.add_user("bob").await;
    let mut a = srv.online("alice", "a").await;
    let mut hi = srv.login("bob", "hi").await;
    hi.send_str("<presence><priority>10</priority></presence>")
        .await
        .unwrap();
    let mut lo = srv.login("bob", "lo").await;
    lo.send_str("<presence><priority>1</priority></presence>")
        .await
        .unwrap();
    let mut neg = srv.login("bob", "neg").await;
    neg.send_str("<presence><priority>-1</priority></presence>")
        .await
        .unwrap();
    // Let the presences be processed.
    a.iq(parse(
        "<iq xmlns='jabber:client' type='get' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>",
    ))
    .await
    .unwrap();
    hi.iq(parse(
        "<iq xmlns='jabber:client' type='get' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>",
    ))
    .await
    .unwrap();
    lo.iq(parse(
        "<iq xmlns='jabber:client' type='get' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>",
    ))
    .await
    .unwrap();
    neg.iq(parse(
        "<iq xmlns='jabber:client' type='get' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>",
    ))
    .await
    .unwrap();
    a.send(&chat("bob@localhost", "x")).await.unwrap();
    let m = expect_message(&mut hi).await;
    assert_eq!(body(&m).as_deref(), Some("x"));
    expect_silence(&mut lo, 300).await;
    expect_silence(&mut neg, 100).await;
    // The negative-priority resource still gets messages to its full JID.
    a.send(&chat("bob@localhost/neg", "direct")).await.unwrap();
    assert_eq!(
        body(&expect_message(&mut neg).await).as_deref(),
        Some("direct")
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn stanza_errors_for_unknown_users_and_resources() {
    let srv = TestServer::start().await;
    srv.add_user("alice").await;
    srv.add_user("bob").await;
    let mut a = srv.online("alice", "a").await;
    // Unknown user: message bounced.
    a.send(&chat("nobody@localhost", "hi")).await.unwrap();
    let e = expect_message(&mut a).await;
    assert_eq!(e.attr("type"), Some("error"));
    assert_eq!(e.attr("from"), Some("nobody@localhost"));
    assert_eq!(
        starling::client::stanza_error_condition(&e).as_deref(),
        Some("service-unavailable")
    );
    // IQ to an unknown resource of an existing user.
    let r = a
        .iq(parse("<iq xmlns='jabber:client' type='get' to='bob@localhost/none'><query xmlns='jabber:iq:version'/></iq>"))
        .await
        .unwrap();
    assert_eq!(r.attr("type"), Some("error"));
    assert_eq!(
        starling::client::stanza_error_condition(&r).as_deref(),
        Some("service-unavailable")
    );
    // IQ to a bare JID is answered by the server: disco#info of the account.
    let r = a
        .iq(parse("<iq xmlns='jabber:client' type='get' to='bob@localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"))
        .await
        .unwrap();
    assert_eq!(r.attr("type"), Some("result"));
    let q = r.get_child("query", ns::DISCO_INFO).unwrap();
    let id = q.get_child("identity", ns::DISCO_INFO).unwrap();
    assert_eq!(
        (id.attr("category"), id.attr("type")),
        (Some("account"), Some("registered"))
    );
    // An unsupported namespace to the server: service-unavailable.
    let r = a
        .iq(parse("<iq xmlns='jabber:client' type='get' to='localhost'><query xmlns='urn:example:nothing'/></iq>"))
        .await
        .unwrap();
    assert_eq!(
        starling::client::stanza_error_condition(&r).as_deref(),
        Some("service-unavailable")
    );
    // Remote domains without federation.
    a.send(&chat("x@elsewhere.example", "hi")).await.unwrap();
    let e = expect_message(&mut a).await;
    assert_eq!(
        starling::client::stanza_error_condition(&e).as_deref(),
        Some("remote-server-not-found")
    );
    // Malformed 'to'.
    a.send_str("<message to='a@b@c' type='chat'><body>x</body></message>")
        .await
        .unwrap();
    let e = expect_message(&mut a).await;
    assert_eq!(
        starling::client::stanza_error_condition(&e).as_deref(),
        Some("jid-malformed")
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn server_queries_disco_ping_version_time() {
    let srv = TestServer::start().await;
    srv.add_user("alice").await;
    let mut a = srv.login("alice", "a").await;
    let r = a
        .iq(parse("<iq xmlns='jabber:client' type='get' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"))
        .await
        .unwrap();
    let q = r.get_child("query", ns::DISCO_INFO).unwrap();
    let features: Vec<&str> = q
        .children()
        .filter(|c| c.name() == "feature")
        .filter_map(|c| c.attr("var"))
        .collect();
    for f in [
        ns::DISCO_INFO,
        ns::DISCO_ITEMS,
        ns::PING,
        ns::VERSION,
        ns::TIME,
    ] {
        assert!(features.contains(&f), "missing {f} in {features:?}");
    }
    let r = a.iq(parse("<iq xmlns='jabber:client' type='get' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")).await.unwrap();
    assert_eq!(r.attr("type"), Some("result"));
    assert_eq!(r.attr("from"), Some("localhost"));
    let r = a.iq(parse("<iq xmlns='jabber:client' type='get' to='localhost'><query xmlns='jabber:iq:version'/></iq>")).await.unwrap();
    assert_eq!(
        r.get_child("query", ns::VERSION)
            .unwrap()
            .get_child("name", ns::VERSION)
            .unwrap()
            .text(),
        "Starling"
    );
    let r = a.iq(parse("<iq xmlns='jabber:client' type='get' to='localhost'><time xmlns='urn:xmpp:time'/></iq>")).await.unwrap();
    let utc = r
        .get_child("time", ns::TIME)
        .unwrap()
        .get_child("utc", ns::TIME)
        .unwrap()
        .text();
    assert!(starling::stanza::parse_timestamp(&utc).is_some(), "{utc}");
    // disco#info with no 'to' is about the account.
    let r = a.iq(parse("<iq xmlns='jabber:client' type='get'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")).await.unwrap();
    assert_eq!(r.attr("type"), Some("result"));
    srv.shutdown().await;
}

#[tokio::test]
async fn resource_conflict_new_session_wins() {
    let srv = TestServer::start().await;
    srv.add_user("alice").await;
    let mut old = srv.online("alice", "same").await;
    let mut new = srv.online("alice", "same").await;
    match old.recv().await {
        Err(ClientError::StreamError(c)) => assert_eq!(c, "conflict"),
        other => panic!("expected conflict, got {other:?}"),
    }
    new.iq(parse(
        "<iq xmlns='jabber:client' type='get' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>",
    ))
    .await
    .unwrap();
    srv.shutdown().await;
}

#[tokio::test]
async fn forged_from_is_invalid_from() {
    let srv = TestServer::start().await;
    srv.add_user("alice").await;
    srv.add_user("bob").await;
    let mut a = srv.online("alice", "a").await;
    a.send_str("<message from='bob@localhost/x' to='bob@localhost'><body>x</body></message>")
        .await
        .unwrap();
    match a.recv().await {
        Err(ClientError::StreamError(c)) => assert_eq!(c, "invalid-from"),
        other => panic!("{other:?}"),
    }
    srv.shutdown().await;
}

/// Send `payload` after login and expect the stream error `condition`; then
/// check that another client still works.
async fn bad_input_case(srv: &TestServer, payload: &[u8], condition: &str) {
    let mut c = srv.login("alice", "bad").await;
    c.send_raw(payload).await.unwrap();
    let got = loop {
        match c.recv_event().await {
            Ok(ClientEvent::Element(e)) if e.is("error", ns::STREAM) => {
                break starling::client::stream_error_condition(&e);
            }
            Ok(ClientEvent::Element(_)) => continue,
            Ok(ClientEvent::Closed) => break "closed without error".into(),
            Err(ClientError::Xml(_)) => break "client parse error".into(),
            Err(e) => break format!("{e}"),
        }
    };
    assert_eq!(
        got,
        condition,
        "payload {:?}",
        String::from_utf8_lossy(&payload[..payload.len().min(80)])
    );
    let mut ok = srv.login("alice", "good").await;
    let r = ok.iq(parse("<iq xmlns='jabber:client' type='get' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")).await.unwrap();
    assert_eq!(r.attr("type"), Some("result"));
    ok.close().await.unwrap();
}

#[tokio::test]
async fn bad_input_gets_the_right_stream_error() {
    let srv = TestServer::start_with(|c| c.limits.max_stanza_bytes = 4096).await;
    srv.add_user("alice").await;
    bad_input_case(&srv, b"<message><body>x</message>", "not-well-formed").await;
    bad_input_case(&srv, b"<!-- hello --><message/>", "restricted-xml").await;
    bad_input_case(&srv, b"<?php echo 1; ?>", "restricted-xml").await;
    bad_input_case(
        &srv,
        b"<message><body>&ent;</body></message>",
        "restricted-xml",
    )
    .await;
    bad_input_case(&srv, b"<x:message/>", "bad-namespace-prefix").await;
    bad_input_case(
        &srv,
        b"<message><body>\xff\xfe</body></message>",
        "not-well-formed",
    )
    .await;
    let big = format!(
        "<message to='bob@localhost'><body>{}</body></message>",
        "a".repeat(10_000)
    );
    bad_input_case(&srv, big.as_bytes(), "policy-violation").await;
    bad_input_case(&srv, b"<unknown xmlns='urn:x'/>", "unsupported-stanza-type").await;
    srv.shutdown().await;
}

#[tokio::test]
async fn bad_stream_headers() {
    let srv = TestServer::start().await;
    for (header, condition) in [
        (
            "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='unknown.example' version='1.0'>",
            "host-unknown",
        ),
        (
            "<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>",
            "invalid-namespace",
        ),
        (
            "<stream:stream xmlns='jabber:client' xmlns:stream='urn:wrong' to='localhost' version='1.0'>",
            "invalid-namespace",
        ),
        (
            "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost'>",
            "unsupported-version",
        ),
        (
            "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='2.0'>",
            "unsupported-version",
        ),
        (
            "<!DOCTYPE x><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>",
            "restricted-xml",
        ),
    ] {
        let mut raw = tokio::net::TcpStream::connect(srv.addr()).await.unwrap();
        raw.write_all(header.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut got)).await;
        let got = String::from_utf8_lossy(&got);
        assert!(
            got.contains(&format!(
                "<{condition} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
            )),
            "{header}: {got}"
        );
        assert!(got.ends_with("</stream:stream>"), "{got}");
    }
    srv.shutdown().await;
}

#[tokio::test]
async fn unauthenticated_connections_time_out() {
    let srv = TestServer::start_with(|c| c.limits.unauthenticated_timeout_secs = 1).await;
    let mut c = srv.connect().await;
    c.timeout = Duration::from_secs(5);
    match c.recv().await {
        Err(ClientError::StreamError(cond)) => assert_eq!(cond, "connection-timeout"),
        other => panic!("{other:?}"),
    }
    srv.shutdown().await;
}

#[tokio::test]
async fn idle_sessions_are_pinged_then_closed() {
    let srv = TestServer::start_with(|c| c.limits.idle_timeout_secs = 1).await;
    srv.add_user("alice").await;
    let mut c = srv.login("alice", "a").await;
    c.timeout = Duration::from_secs(5);
    let ping = c.recv().await.unwrap();
    assert!(ping.has_child("ping", ns::PING), "expected a ping");
    // Not answering: disconnected.
    match c.recv().await {
        Err(ClientError::StreamError(cond)) => assert_eq!(cond, "connection-timeout"),
        other => panic!("{other:?}"),
    }
    // Answering keeps the session.
    let mut c = srv.login("alice", "b").await;
    c.timeout = Duration::from_secs(5);
    for _ in 0..2 {
        let ping = c.recv().await.unwrap();
        let reply = starling::stanza::iq_result(&ping, None);
        c.send(&reply).await.unwrap();
    }
    srv.shutdown().await;
}

#[tokio::test]
async fn connections_per_ip_are_limited() {
    let srv = TestServer::start_with(|c| c.limits.max_connections_per_ip = 2).await;
    let _a = srv.connect().await;
    let _b = srv.connect().await;
    match XmppClient::connect(srv.addr(), DOMAIN, TlsMode::StartTls).await {
        Err(ClientError::StreamError(c)) => assert_eq!(c, "policy-violation"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("third connection accepted"),
    }
    drop(_a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    srv.connect().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_streams_with_system_shutdown() {
    let srv = TestServer::start().await;
    srv.add_user("alice").await;
    let mut c = srv.online("alice", "a").await;
    let stop = tokio::spawn(async move { srv.shutdown().await });
    match c.recv().await {
        Err(ClientError::StreamError(cond)) => assert_eq!(cond, "system-shutdown"),
        other => panic!("{other:?}"),
    }
    stop.await.unwrap();
}

#[tokio::test]
async fn client_close_is_answered() {
    let srv = TestServer::start().await;
    srv.add_user("alice").await;
    let c = srv.online("alice", "a").await;
    tokio::time::timeout(Duration::from_secs(5), c.close())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(srv.server().sessions.count(), 0);
    srv.shutdown().await;
}

#[tokio::test]
async fn plain_is_never_offered_without_tls() {
    let srv = TestServer::start_with(|c| c.c2s.require_tls = false).await;
    srv.add_user("alice").await;
    let c = XmppClient::connect(srv.addr(), DOMAIN, TlsMode::Plain)
        .await
        .unwrap();
    let mechs: Vec<String> = c
        .features
        .unwrap()
        .get_child("mechanisms", ns::SASL)
        .unwrap()
        .children()
        .map(|m| m.text())
        .collect();
    assert!(!mechs.contains(&"PLAIN".to_string()), "{mechs:?}");
    assert!(!mechs.iter().any(|m| m.ends_with("-PLUS")), "{mechs:?}");
    let c = srv
        .login_with("alice", "r", TlsMode::Plain, Mechanism::ScramSha256)
        .await
        .unwrap();
    c.close().await.unwrap();
    srv.shutdown().await;
}

#[tokio::test]
async fn users_managed_through_the_store_can_log_in() {
    use starling::storage::AccountStore;
    let srv = TestServer::start().await;
    srv.add_user("carol").await;
    srv.login("carol", "r").await;
    let creds = starling::auth::StoredCredentials::from_password("new", 4096).unwrap();
    srv.server()
        .store
        .set_credentials(DOMAIN, "carol", &creds)
        .await
        .unwrap();
    let mut o = srv.login_options("carol", "r2");
    assert!(XmppClient::login(&o).await.is_err());
    o.password = "new".into();
    XmppClient::login(&o).await.unwrap();
    srv.shutdown().await;
}
