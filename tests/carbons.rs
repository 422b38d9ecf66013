//! Message Carbons (XEP-0280) end to end with several resources: enabling
//! and disabling, `sent` and `received` copies wrapped per XEP-0297, only
//! to carbons-enabled resources that did not get the message, the
//! eligibility rules of section 6, and `<private/>` / `<no-copy/>`.

mod common;

use common::*;
use minidom::Element;
use starling::client::XmppClient;
use starling::xml::ns;

async fn enable(c: &mut XmppClient) {
    let r = iq(
        c,
        "<iq xmlns='jabber:client' type='set'><enable xmlns='urn:xmpp:carbons:2'/></iq>",
    )
    .await;
    assert_eq!(r.attr("type"), Some("result"), "enable: {r:?}");
}

async fn online_with_priority(srv: &TestServer, user: &str, res: &str, prio: i32) -> XmppClient {
    let mut c = srv.login(user, res).await;
    c.send_str(&format!("<presence><priority>{prio}</priority></presence>"))
        .await
        .unwrap();
    round_trip(&mut c).await;
    c
}

/// The forwarded message inside a carbon copy, checking the wrapper.
fn unwrap_copy<'a>(copy: &'a Element, kind: &str, user: &str, to: &str) -> &'a Element {
    assert_eq!(
        copy.attr("from"),
        Some(user),
        "copies come from the bare JID"
    );
    assert_eq!(copy.attr("to"), Some(to));
    copy.get_child(kind, ns::CARBONS)
        .unwrap_or_else(|| panic!("no <{kind}/> in {copy:?}"))
        .get_child("forwarded", ns::FORWARD)
        .expect("forwarded")
        .get_child("message", ns::CLIENT)
        .expect("forwarded message")
}

fn is_copy(e: &Element) -> bool {
    e.name() == "message"
        && (e.has_child("sent", ns::CARBONS) || e.has_child("received", ns::CARBONS))
}

#[tokio::test]
async fn enable_disable_and_errors() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        let mut a = srv.online("alice", "a").await;
        enable(&mut a).await;
        enable(&mut a).await; // repeated enable is no error (10.1)
        let r = iq(&mut a, "<iq xmlns='jabber:client' type='set'><disable xmlns='urn:xmpp:carbons:2'/></iq>").await;
        assert_eq!(r.attr("type"), Some("result"));
        let r = iq(&mut a, "<iq xmlns='jabber:client' type='set'><disable xmlns='urn:xmpp:carbons:2'/></iq>").await;
        assert_eq!(r.attr("type"), Some("result"));
        let r = iq(&mut a, "<iq xmlns='jabber:client' type='get'><enable xmlns='urn:xmpp:carbons:2'/></iq>").await;
        assert_eq!(error_condition(&r).as_deref(), Some("bad-request"));
        let r = iq(&mut a, "<iq xmlns='jabber:client' type='set'><bogus xmlns='urn:xmpp:carbons:2'/></iq>").await;
        assert_eq!(error_condition(&r).as_deref(), Some("bad-request"));
        // Someone else's carbons cannot be switched.
        let r = iq(&mut a, "<iq xmlns='jabber:client' type='set' to='bob@localhost'><enable xmlns='urn:xmpp:carbons:2'/></iq>").await;
        assert_eq!(error_condition(&r).as_deref(), Some("not-allowed"));
        // Advertised by the server.
        let r = iq(&mut a, "<iq xmlns='jabber:client' type='get' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>").await;
        let q = r.get_child("query", ns::DISCO_INFO).unwrap();
        assert!(
            q.children().any(|f| f.attr("var") == Some(ns::CARBONS)),
            "{q:?}"
        );
        srv.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn received_copies_go_to_other_enabled_resources_only() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        let mut a = srv.online("alice", "a").await;
        let mut b1 = online_with_priority(&srv, "bob", "b1", 5).await;
        let mut b2 = online_with_priority(&srv, "bob", "b2", 0).await;
        let mut b3 = online_with_priority(&srv, "bob", "b3", 0).await;
        let mut b4 = online_with_priority(&srv, "bob", "b4", -1).await;
        enable(&mut b1).await;
        enable(&mut b2).await;
        enable(&mut b4).await;
        // b3 has carbons off.

        // To a full JID: the other enabled resources get a copy.
        let mut m = chat("bob@localhost/b3", "to b3");
        starling::stanza::set_attr(&mut m, "id", "m1");
        a.send(&m).await.unwrap();
        let orig = expect_message(&mut b3).await;
        assert_eq!(body(&orig).as_deref(), Some("to b3"));
        for (c, res) in [(&mut b1, "b1"), (&mut b2, "b2"), (&mut b4, "b4")] {
            let copy = expect_message(c).await;
            let inner = unwrap_copy(
                &copy,
                "received",
                "bob@localhost",
                &format!("bob@localhost/{res}"),
            );
            assert_eq!(copy.attr("type"), Some("chat"));
            assert_eq!(inner.attr("from"), Some("alice@localhost/a"));
            assert_eq!(inner.attr("to"), Some("bob@localhost/b3"));
            assert_eq!(inner.attr("id"), Some("m1"));
            assert_eq!(body(inner).as_deref(), Some("to b3"));
        }
        // To the bare JID: b1 (highest priority) gets it; enabled b2 and
        // b4 (negative priority) get copies; b3 nothing.
        a.send(&chat("bob@localhost", "to bare")).await.unwrap();
        assert_eq!(
            body(&expect_message(&mut b1).await).as_deref(),
            Some("to bare")
        );
        for (c, res) in [(&mut b2, "b2"), (&mut b4, "b4")] {
            let copy = expect_message(c).await;
            let inner = unwrap_copy(
                &copy,
                "received",
                "bob@localhost",
                &format!("bob@localhost/{res}"),
            );
            assert_eq!(body(inner).as_deref(), Some("to bare"));
        }
        expect_no_message(&mut b3, 300).await;
        expect_no_message(&mut b1, 50).await;
        // The sender gets no copy (alice has no other resource) and no error.
        expect_no_message(&mut a, 50).await;
        srv.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn sent_copies_go_to_the_senders_other_enabled_resources() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        let mut a1 = srv.online("alice", "a1").await;
        let mut a2 = srv.online("alice", "a2").await;
        let mut a3 = srv.online("alice", "a3").await;
        let mut b = srv.online("bob", "b").await;
        enable(&mut a1).await;
        enable(&mut a2).await;
        // a3 has carbons off.
        let mut m = chat("bob@localhost", "hello bob");
        starling::stanza::set_attr(&mut m, "id", "s1");
        a1.send(&m).await.unwrap();
        let got = expect_message(&mut b).await;
        assert_eq!(body(&got).as_deref(), Some("hello bob"));
        let copy = expect_message(&mut a2).await;
        let inner = unwrap_copy(&copy, "sent", "alice@localhost", "alice@localhost/a2");
        assert_eq!(inner.attr("from"), Some("alice@localhost/a1"));
        assert_eq!(inner.attr("to"), Some("bob@localhost"));
        assert_eq!(inner.attr("id"), Some("s1"));
        assert_eq!(body(inner).as_deref(), Some("hello bob"));
        // Not to the sending resource, not to a resource without carbons.
        expect_no_message(&mut a1, 300).await;
        expect_no_message(&mut a3, 50).await;
        // Sent copies go out also when the sender has carbons off.
        a3.send(&chat("bob@localhost", "from a3")).await.unwrap();
        expect_message(&mut b).await;
        for (c, res) in [(&mut a1, "a1"), (&mut a2, "a2")] {
            let copy = expect_message(c).await;
            let inner = unwrap_copy(
                &copy,
                "sent",
                "alice@localhost",
                &format!("alice@localhost/{res}"),
            );
            assert_eq!(body(inner).as_deref(), Some("from a3"));
        }
        // Disabled: no more copies.
        let r = iq(
            &mut a2,
            "<iq xmlns='jabber:client' type='set'><disable xmlns='urn:xmpp:carbons:2'/></iq>",
        )
        .await;
        assert_eq!(r.attr("type"), Some("result"));
        a1.send(&chat("bob@localhost", "after disable"))
            .await
            .unwrap();
        expect_message(&mut b).await;
        expect_no_message(&mut a2, 300).await;
        // Replies from bob: a1 (same priority as a2, a3) gets it directly,
        // so do a2 and a3: all available resources share the top priority.
        b.send(&chat("alice@localhost", "reply")).await.unwrap();
        for c in [&mut a1, &mut a2, &mut a3] {
            let m = expect_message(c).await;
            assert_eq!(body(&m).as_deref(), Some("reply"));
            assert!(!is_copy(&m), "delivered resources get no copy");
        }
        srv.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn private_and_no_copy_prevent_copies() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        let mut a1 = srv.online("alice", "a1").await;
        let mut a2 = srv.online("alice", "a2").await;
        let mut b1 = online_with_priority(&srv, "bob", "b1", 1).await;
        let mut b2 = online_with_priority(&srv, "bob", "b2", 0).await;
        for c in [&mut a1, &mut a2, &mut b1, &mut b2] {
            enable(c).await;
        }
        for payload in [
            "<private xmlns='urn:xmpp:carbons:2'/><no-copy xmlns='urn:xmpp:hints'/>",
            "<private xmlns='urn:xmpp:carbons:2'/>",
            "<no-copy xmlns='urn:xmpp:hints'/>",
        ] {
            a1.send_str(&format!(
                "<message to='bob@localhost/b1' type='chat'><body>secret</body>{payload}</message>"
            ))
            .await
            .unwrap();
            let m = expect_message(&mut b1).await;
            assert_eq!(body(&m).as_deref(), Some("secret"));
            // The elements stay in the delivered message (XEP-0280 1.0.1
            // no longer asks servers to strip <private/>).
            assert_eq!(
                m.has_child("private", ns::CARBONS),
                payload.contains("private")
            );
        }
        expect_no_message(&mut a2, 300).await;
        expect_no_message(&mut b2, 50).await;
        expect_no_message(&mut a1, 50).await;
        srv.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn only_eligible_messages_are_copied() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        let mut a1 = srv.online("alice", "a1").await;
        let mut a2 = srv.online("alice", "a2").await;
        let mut b1 = online_with_priority(&srv, "bob", "b1", 1).await;
        let mut b2 = online_with_priority(&srv, "bob", "b2", 0).await;
        enable(&mut a2).await;
        enable(&mut b2).await;
        let cases = [
            // (stanza to bob's b1, copied?)
            ("<message to='bob@localhost/b1' type='normal' id='c1'><body>n</body></message>", true),
            ("<message to='bob@localhost/b1' id='c2'><subject>no body</subject></message>", false),
            ("<message to='bob@localhost/b1' type='headline' id='c3'><body>news</body></message>", false),
            ("<message to='bob@localhost/b1' type='groupchat' id='c4'><body>gc</body></message>", false),
            ("<message to='bob@localhost/b1' type='chat' id='c5'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>", true),
            ("<message to='bob@localhost/b1' id='c6'><received xmlns='urn:xmpp:receipts' id='x'/></message>", true),
            ("<message to='bob@localhost/b1' id='c7'><displayed xmlns='urn:xmpp:chat-markers:0' id='x'/></message>", true),
            ("<message to='bob@localhost/b1' id='c8'><x xmlns='jabber:x:conference' jid='room@muc.localhost'/></message>", true),
        ];
        for (xml, copied) in cases {
            a1.send_str(xml).await.unwrap();
            let m = expect_message(&mut b1).await;
            let id = m.attr("id").unwrap().to_owned();
            assert!(xml.contains(&format!("id='{id}'")), "in order");
            if copied {
                for (c, kind) in [(&mut a2, "sent"), (&mut b2, "received")] {
                    let copy = expect_message(c).await;
                    let inner = copy
                        .get_child(kind, ns::CARBONS)
                        .and_then(|s| s.get_child("forwarded", ns::FORWARD))
                        .and_then(|f| f.get_child("message", ns::CLIENT))
                        .unwrap_or_else(|| panic!("{kind} copy of {xml}: {copy:?}"));
                    assert_eq!(inner.attr("id"), Some(id.as_str()));
                }
            } else {
                expect_no_message(&mut a2, 150).await;
                expect_no_message(&mut b2, 50).await;
            }
        }
        // A private message from a room occupant (with muc#user) is not
        // copied to the recipient's other resources: the room sends it to
        // every joined resource itself.
        a1.send_str("<message to='bob@localhost/b1' type='chat' id='pm'><body>pm</body><x xmlns='http://jabber.org/protocol/muc#user'/></message>")
            .await
            .unwrap();
        assert_eq!(expect_message(&mut b1).await.attr("id"), Some("pm"));
        let sent = expect_message(&mut a2).await;
        assert!(sent.has_child("sent", ns::CARBONS), "sent PMs are copied");
        expect_no_message(&mut b2, 300).await;
        srv.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn messages_to_oneself_are_copied_once() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        let mut a1 = online_with_priority(&srv, "alice", "a1", 0).await;
        let mut a2 = online_with_priority(&srv, "alice", "a2", 5).await;
        let mut a3 = online_with_priority(&srv, "alice", "a3", 0).await;
        for c in [&mut a1, &mut a2, &mut a3] {
            enable(c).await;
        }
        a1.send(&chat("alice@localhost", "note to self"))
            .await
            .unwrap();
        let m = expect_message(&mut a2).await;
        assert_eq!(body(&m).as_deref(), Some("note to self"));
        assert!(!is_copy(&m));
        let copy = expect_message(&mut a3).await;
        let inner = unwrap_copy(&copy, "received", "alice@localhost", "alice@localhost/a3");
        assert_eq!(body(inner).as_deref(), Some("note to self"));
        expect_no_message(&mut a3, 300).await;
        expect_no_message(&mut a1, 50).await;
        expect_no_message(&mut a2, 50).await;
        srv.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn negative_priority_resources_get_copies_of_messages_stored_offline() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        let mut a = srv.online("alice", "a").await;
        let mut neg = online_with_priority(&srv, "bob", "neg", -1).await;
        let mut off = online_with_priority(&srv, "bob", "nocarbons", -5).await;
        enable(&mut neg).await;
        a.send(&chat("bob@localhost", "while away")).await.unwrap();
        let copy = expect_message(&mut neg).await;
        let inner = unwrap_copy(&copy, "received", "bob@localhost", "bob@localhost/neg");
        assert_eq!(body(inner).as_deref(), Some("while away"));
        expect_no_message(&mut off, 200).await;
        expect_no_message(&mut a, 50).await; // stored, no error
        // And it is still delivered from offline storage at the next login.
        let mut b = srv.online("bob", "desk").await;
        let m = expect_message(&mut b).await;
        assert_eq!(body(&m).as_deref(), Some("while away"));
        assert!(m.has_child("delay", ns::DELAY));
        srv.shutdown().await;
    })
    .await;
}
