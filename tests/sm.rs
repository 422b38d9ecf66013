//! Stream management (XEP-0198) end to end: acks, server requests,
//! resumption with retransmission of exactly the unacked stanzas, failures,
//! expiry handing messages back to the router, dead-socket detection, and
//! Client State Indication (XEP-0352).

mod common;

use std::time::Duration;

use common::*;
use minidom::Element;
use rand::Rng;
use starling::client::{ClientError, KeyCache, Mechanism, TlsMode, XmppClient};
use starling::xml::ns;

async fn enable(c: &mut XmppClient, resume: bool) -> Element {
    let req = if resume {
        "<enable xmlns='urn:xmpp:sm:3' resume='true'/>"
    } else {
        "<enable xmlns='urn:xmpp:sm:3'/>"
    };
    c.send_str(req).await.unwrap();
    expect(c, "enabled", |e| {
        e.ns() == ns::SM && (e.name() == "enabled" || e.name() == "failed")
    })
    .await
}

fn is_sm(e: &Element, name: &str) -> bool {
    e.ns() == ns::SM && e.name() == name
}

/// Receive stanzas on an SM stream, answering `<r/>` with our count.
struct SmReader {
    handled: u32,
    bodies: Vec<String>,
}

impl SmReader {
    async fn next_message(&mut self, c: &mut XmppClient) -> Result<Element, ClientError> {
        loop {
            let e = c.recv().await?;
            if is_sm(&e, "r") {
                c.send_str(&format!("<a xmlns='urn:xmpp:sm:3' h='{}'/>", self.handled))
                    .await?;
                continue;
            }
            if e.ns() == ns::SM {
                continue;
            }
            self.handled = self.handled.wrapping_add(1);
            if e.name() == "message" {
                if let Some(b) = body(&e) {
                    self.bodies.push(b);
                }
                return Ok(e);
            }
        }
    }
}

/// Log in and try to resume `previd` with `h`.
async fn resume(srv: &TestServer, user: &str, previd: &str, h: u32) -> (XmppClient, Element) {
    let mut c = XmppClient::connect(srv.addr(), DOMAIN, TlsMode::StartTls)
        .await
        .unwrap();
    c.authenticate(
        user,
        &password(user),
        Mechanism::ScramSha256,
        &KeyCache::default(),
    )
    .await
    .unwrap();
    let f = c.features.clone().unwrap();
    assert!(f.has_child("sm", ns::SM), "sm feature after authentication");
    c.send_str(&format!(
        "<resume xmlns='urn:xmpp:sm:3' previd='{previd}' h='{h}'/>"
    ))
    .await
    .unwrap();
    let answer = expect(&mut c, "resumed or failed", |e| {
        e.ns() == ns::SM && (e.name() == "resumed" || e.name() == "failed")
    })
    .await;
    (c, answer)
}

#[tokio::test]
async fn acks_and_server_requests() {
    let srv = TestServer::start().await;
    srv.add_user("alice").await;
    srv.add_user("bob").await;
    let mut a = srv.online("alice", "a").await;
    let mut b = srv.online("bob", "b").await;
    let enabled = enable(&mut b, false).await;
    assert!(is_sm(&enabled, "enabled"));
    assert_eq!(enabled.attr("resume"), None);
    // Stanzas from the client are counted.
    for _ in 0..3 {
        b.send_str("<presence/>").await.unwrap();
    }
    b.send_str("<r xmlns='urn:xmpp:sm:3'/>").await.unwrap();
    let ack = expect(&mut b, "a", |e| is_sm(e, "a")).await;
    assert_eq!(ack.attr("h"), Some("3"));
    // After 5 stanzas to the client, the server asks for an ack.
    for i in 0..5 {
        a.send(&chat("bob@localhost/b", &format!("m{i}")))
            .await
            .unwrap();
    }
    let mut got = 0;
    loop {
        let e = recv(&mut b).await;
        if e.name() == "message" {
            got += 1;
        } else if is_sm(&e, "r") {
            break;
        }
    }
    assert_eq!(got, 5);
    b.send_str("<a xmlns='urn:xmpp:sm:3' h='5'/>")
        .await
        .unwrap();
    // Acknowledging more than was sent ends the stream.
    b.send_str("<a xmlns='urn:xmpp:sm:3' h='9'/>")
        .await
        .unwrap();
    let err = loop {
        match b.recv_event().await.unwrap() {
            starling::client::ClientEvent::Element(e) if e.is("error", ns::STREAM) => break e,
            starling::client::ClientEvent::Element(_) => continue,
            starling::client::ClientEvent::Closed => panic!("closed without a stream error"),
        }
    };
    assert!(err.has_child("undefined-condition", ns::STREAM_ERRORS));
    let too_high = err.get_child("handled-count-too-high", ns::SM).unwrap();
    assert_eq!(
        (too_high.attr("h"), too_high.attr("send-count")),
        (Some("9"), Some("5"))
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn enable_out_of_order_fails() {
    let srv = TestServer::start().await;
    srv.add_user("alice").await;
    let mut c = XmppClient::connect(srv.addr(), DOMAIN, TlsMode::StartTls)
        .await
        .unwrap();
    c.authenticate(
        "alice",
        &password("alice"),
        Mechanism::ScramSha256,
        &KeyCache::default(),
    )
    .await
    .unwrap();
    c.send_str("<enable xmlns='urn:xmpp:sm:3'/>").await.unwrap();
    let f = recv(&mut c).await;
    assert!(is_sm(&f, "failed") && f.has_child("unexpected-request", ns::STANZA_ERRORS));
    c.bind(Some("r")).await.unwrap();
    assert!(is_sm(&enable(&mut c, true).await, "enabled"));
    let f = enable(&mut c, true).await;
    assert!(is_sm(&f, "failed"), "a second enable fails");
    // Without SM, <r/> fails.
    let mut d = srv.login("alice", "d").await;
    d.send_str("<r xmlns='urn:xmpp:sm:3'/>").await.unwrap();
    assert!(is_sm(&recv(&mut d).await, "failed"));
    srv.shutdown().await;
}

#[tokio::test]
async fn resume_failures() {
    let srv = TestServer::start().await;
    srv.add_user("alice").await;
    srv.add_user("bob").await;
    let (mut c, answer) = resume(&srv, "alice", "no-such-id", 0).await;
    assert!(is_sm(&answer, "failed") && answer.has_child("item-not-found", ns::STANZA_ERRORS));
    // The client may bind after a failed resumption.
    c.bind(Some("fresh")).await.unwrap();
    // Another user's SM-ID looks unknown.
    let mut b = srv.online("bob", "b").await;
    let enabled = enable(&mut b, true).await;
    let id = enabled.attr("id").unwrap().to_owned();
    let (_c, answer) = resume(&srv, "alice", &id, 0).await;
    assert!(answer.has_child("item-not-found", ns::STANZA_ERRORS));
    // Bob's session is untouched by that attempt.
    b.iq(parse(
        "<iq xmlns='jabber:client' type='get' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>",
    ))
    .await
    .unwrap();
    // An h larger than what was sent: failed, nothing re-sent.
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut c, answer) = resume(&srv, "bob", &id, 7).await;
    assert!(is_sm(&answer, "failed"), "{answer:?}");
    expect_silence(&mut c, 300).await;
    // ... and the old session is gone: resuming again is item-not-found (with h).
    let (_c, answer) = resume(&srv, "bob", &id, 0).await;
    assert!(answer.has_child("item-not-found", ns::STANZA_ERRORS));
    assert!(answer.attr("h").is_some(), "a tombstone tells the final h");
    srv.shutdown().await;
}

/// Bursts of 1,000 messages with the socket cut at random points and the
/// session resumed each time: every message arrives exactly once, in order.
#[tokio::test]
async fn resumption_under_bursts_delivers_exactly_once_in_order() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        let mut a = srv.online("alice", "a").await;
        let mut b = srv.online("bob", "b").await;
        let enabled = enable(&mut b, true).await;
        let id = enabled.attr("id").unwrap().to_owned();
        assert_eq!(enabled.attr("resume"), Some("true"));
        let total = 1000usize;
        let sender = tokio::spawn(async move {
            for chunk in (0..total).collect::<Vec<_>>().chunks(50) {
                let msgs: Vec<_> = chunk
                    .iter()
                    .map(|i| chat("bob@localhost/b", &format!("{i}")))
                    .collect();
                a.send_all(&msgs).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            a
        });
        let mut reader = SmReader {
            handled: 0,
            bodies: Vec::new(),
        };
        let mut rng = rand::rng();
        let mut cuts = 0;
        while reader.bodies.len() < total {
            let cut_after = rng.random_range(1..250);
            let mut n = 0;
            while n < cut_after && reader.bodies.len() < total {
                reader.next_message(&mut b).await.unwrap();
                n += 1;
            }
            if reader.bodies.len() >= total {
                break;
            }
            // Cut the socket without closing the stream, then resume.
            drop(b);
            cuts += 1;
            let (nb, answer) = resume(&srv, "bob", &id, reader.handled).await;
            assert!(is_sm(&answer, "resumed"), "resume failed: {answer:?}");
            b = nb;
        }
        let expected: Vec<String> = (0..total).map(|i| i.to_string()).collect();
        assert_eq!(reader.bodies, expected, "after {cuts} cuts");
        expect_silence(&mut b, 300).await;
        let _a = sender.await.unwrap();
        srv.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn resumed_session_keeps_state_and_old_socket_gets_conflict() {
    let srv = TestServer::start().await;
    srv.add_user("alice").await;
    srv.add_user("bob").await;
    let mut a = srv.online("alice", "a").await;
    let mut b = srv.online("bob", "b").await;
    b.send_str("<presence><priority>7</priority></presence>")
        .await
        .unwrap();
    let id = enable(&mut b, true).await.attr("id").unwrap().to_owned();
    // Resume while the old connection is still open (the client thinks it
    // is dead, the server does not): the old one gets <conflict/>.
    let (mut nb, answer) = resume(&srv, "bob", &id, 0).await;
    assert!(is_sm(&answer, "resumed"));
    match b.recv().await {
        Err(ClientError::StreamError(c)) => assert_eq!(c, "conflict"),
        other => panic!("{other:?}"),
    }
    // Still available with its priority: bare-JID messages arrive.
    let session = srv
        .server()
        .sessions
        .get(&"bob@localhost/b".parse().unwrap())
        .unwrap();
    assert!(session.is_available());
    assert_eq!(session.priority(), 7);
    a.send(&chat("bob@localhost", "after resume"))
        .await
        .unwrap();
    let mut reader = SmReader {
        handled: 0,
        bodies: Vec::new(),
    };
    reader.next_message(&mut nb).await.unwrap();
    assert_eq!(reader.bodies, vec!["after resume".to_string()]);
    srv.shutdown().await;
}

#[tokio::test]
async fn expired_session_hands_unacked_messages_to_other_resources() {
    let srv = TestServer::start_with(|c| {
        c.sm.resume_timeout_secs = 1;
        c.sm.max_resume_timeout_secs = 1;
    })
    .await;
    srv.add_user("alice").await;
    srv.add_user("bob").await;
    let mut a = srv.online("alice", "a").await;
    let mut phone = srv.online("bob", "phone").await;
    let id = enable(&mut phone, true)
        .await
        .attr("id")
        .unwrap()
        .to_owned();
    let mut desk = srv.login("bob", "desk").await;
    desk.send_str("<presence><priority>-1</priority></presence>")
        .await
        .unwrap();
    // Messages reach the phone but are never acked.
    for i in 0..10 {
        a.send(&chat("bob@localhost/phone", &format!("p{i}")))
            .await
            .unwrap();
    }
    for _ in 0..10 {
        expect_message(&mut phone).await;
    }
    drop(phone);
    // After the resumption timeout they are rerouted by the RFC 6121
    // bare-JID rules (the phone's full JID is gone): the desk resource, now
    // with a non-negative priority, gets them.
    desk.send_str("<presence><priority>1</priority></presence>")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(body(&expect_message(&mut desk).await).unwrap());
    }
    assert_eq!(got, (0..10).map(|i| format!("p{i}")).collect::<Vec<_>>());
    // The SM-ID is gone, with a tombstone h.
    let (_c, answer) = resume(&srv, "bob", &id, 0).await;
    assert!(answer.has_child("item-not-found", ns::STANZA_ERRORS));
    expect_silence(&mut a, 200).await;
    srv.shutdown().await;
}

#[tokio::test]
async fn unanswered_ack_request_detects_a_dead_socket() {
    let srv = TestServer::start_with(|c| {
        c.sm.ack_timeout_secs = 1;
        c.sm.ack_request_stanzas = 1;
    })
    .await;
    srv.add_user("alice").await;
    srv.add_user("bob").await;
    let mut a = srv.online("alice", "a").await;
    let mut b = srv.online("bob", "b").await;
    let id = enable(&mut b, true).await.attr("id").unwrap().to_owned();
    a.send(&chat("bob@localhost/b", "one")).await.unwrap();
    // Bob's client reads but never answers <r/> (as if the socket were
    // half-open): after the ack timeout the server drops the transport.
    let m = expect_message(&mut b).await;
    assert_eq!(body(&m).as_deref(), Some("one"));
    b.timeout = Duration::from_secs(5);
    loop {
        match b.recv_event().await {
            Ok(starling::client::ClientEvent::Closed) | Err(_) => break,
            Ok(_) => continue,
        }
    }
    // Messages sent meanwhile wait in the session...
    a.send(&chat("bob@localhost/b", "two")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ... and arrive on resumption, with the unacked first one.
    let (mut nb, answer) = resume(&srv, "bob", &id, 0).await;
    assert!(is_sm(&answer, "resumed"));
    let mut reader = SmReader {
        handled: 0,
        bodies: Vec::new(),
    };
    reader.next_message(&mut nb).await.unwrap();
    reader.next_message(&mut nb).await.unwrap();
    assert_eq!(reader.bodies, vec!["one".to_string(), "two".to_string()]);
    srv.shutdown().await;
}

#[tokio::test]
async fn client_state_indication_holds_presence_not_messages() {
    let srv = TestServer::start().await;
    srv.add_user("alice").await;
    srv.add_user("bob").await;
    let mut a = srv.online("alice", "a").await;
    let mut b = srv.online("bob", "b").await;
    b.send_str("<inactive xmlns='urn:xmpp:csi:0'/>")
        .await
        .unwrap();
    // Directed presence updates from alice are held, keeping the latest.
    a.send_str("<presence to='bob@localhost/b'><show>away</show></presence>")
        .await
        .unwrap();
    a.send_str("<presence to='bob@localhost/b'><show>dnd</show></presence>")
        .await
        .unwrap();
    expect_silence(&mut b, 300).await;
    // A message goes at once, after the held presence.
    a.send(&chat("bob@localhost/b", "urgent")).await.unwrap();
    let p = recv(&mut b).await;
    assert_eq!(p.name(), "presence");
    assert_eq!(p.get_child("show", ns::CLIENT).unwrap().text(), "dnd");
    let m = recv(&mut b).await;
    assert_eq!(body(&m).as_deref(), Some("urgent"));
    a.send_str("<presence to='bob@localhost/b'><show>xa</show></presence>")
        .await
        .unwrap();
    expect_silence(&mut b, 300).await;
    b.send_str("<active xmlns='urn:xmpp:csi:0'/>")
        .await
        .unwrap();
    let p = recv(&mut b).await;
    assert_eq!(p.get_child("show", ns::CLIENT).unwrap().text(), "xa");
    // Now presence passes at once.
    a.send_str("<presence to='bob@localhost/b'/>")
        .await
        .unwrap();
    assert_eq!(recv(&mut b).await.name(), "presence");
    srv.shutdown().await;
}

#[tokio::test]
async fn stream_features_offer_sm_and_csi_after_auth_only() {
    let srv = TestServer::start().await;
    srv.add_user("alice").await;
    let c = srv.connect().await;
    let f = c.features.clone().unwrap();
    assert!(!f.has_child("sm", ns::SM));
    let mut c = XmppClient::connect(srv.addr(), DOMAIN, TlsMode::StartTls)
        .await
        .unwrap();
    c.authenticate(
        "alice",
        &password("alice"),
        Mechanism::ScramSha256,
        &KeyCache::default(),
    )
    .await
    .unwrap();
    let f = c.features.clone().unwrap();
    assert!(f.has_child("sm", ns::SM));
    assert!(f.has_child("csi", ns::CSI));
    srv.shutdown().await;
}
