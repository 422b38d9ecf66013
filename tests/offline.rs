//! Offline messages (XEP-0160) end to end: stored with a XEP-0203 delay,
//! delivered exactly once and in order at the next available presence with
//! a non-negative priority, durable across a restart and a kill -9, limited
//! per user, and only for the message types and hints that call for it
//! (XEP-0334).

mod common;

use std::time::Duration;

use common::*;
use jid::BareJid;
use minidom::Element;
use starling::modules::offline::{OfflineOutcome, deliver_offline, store_offline};
use starling::storage::testing::TestDb;
use starling::storage::{OfflineStore, now_micros};
use starling::xml::ns;

fn delay_of(m: &Element) -> Option<&Element> {
    m.get_child("delay", ns::DELAY)
}

/// Check a delivered offline message: body, sender, delay from the server
/// with a stamp inside [from, to].
fn assert_offline(m: &Element, want_body: &str, from: &str, window: (i64, i64)) {
    assert_eq!(body(m).as_deref(), Some(want_body), "{m:?}");
    assert_eq!(m.attr("from"), Some(from));
    let d = delay_of(m).unwrap_or_else(|| panic!("no delay on {m:?}"));
    assert_eq!(d.attr("from"), Some("localhost"));
    let stamp = starling::stanza::parse_timestamp(d.attr("stamp").unwrap()).unwrap();
    assert!(
        stamp >= window.0 - 1000 && stamp <= window.1,
        "stamp {stamp} outside {window:?}"
    );
}

#[tokio::test]
async fn messages_to_an_offline_user_arrive_once_in_order_with_delay() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        srv.add_user("carol").await;
        let mut a = srv.online("alice", "phone").await;
        let mut c = srv.online("carol", "pc").await;
        let t0 = now_micros();
        // Interleaved from two senders, to the bare JID, to a resource that
        // is not connected, and of type normal.
        a.send(&chat("bob@localhost", "one")).await.unwrap();
        round_trip(&mut a).await;
        c.send(&chat("bob@localhost", "two")).await.unwrap();
        round_trip(&mut c).await;
        a.send(&chat("bob@localhost/gone", "three")).await.unwrap();
        round_trip(&mut a).await;
        a.send(&parse(
            "<message xmlns='jabber:client' to='bob@localhost' id='n4'><body>four</body></message>",
        ))
        .await
        .unwrap();
        round_trip(&mut a).await;
        let t1 = now_micros();
        // No error to the senders: the messages are stored.
        expect_no_message(&mut a, 200).await;
        expect_no_message(&mut c, 50).await;

        // Logged in but not yet available: nothing yet.
        let mut b = srv.login("bob", "laptop").await;
        expect_no_message(&mut b, 300).await;
        b.send_str("<presence/>").await.unwrap();
        let m1 = expect_message(&mut b).await;
        let m2 = expect_message(&mut b).await;
        let m3 = expect_message(&mut b).await;
        let m4 = expect_message(&mut b).await;
        assert_offline(&m1, "one", "alice@localhost/phone", (t0, t1));
        assert_offline(&m2, "two", "carol@localhost/pc", (t0, t1));
        assert_offline(&m3, "three", "alice@localhost/phone", (t0, t1));
        assert_eq!(m3.attr("to"), Some("bob@localhost/gone"));
        assert_offline(&m4, "four", "alice@localhost/phone", (t0, t1));
        assert_eq!(m4.attr("id"), Some("n4"));
        assert_eq!(m1.attr("type"), Some("chat"));
        assert_eq!(m4.attr("type"), None, "the type is kept as sent");
        expect_no_message(&mut b, 300).await;

        // Exactly once: another resource and a new login get nothing.
        let mut b2 = srv.online("bob", "phone").await;
        expect_no_message(&mut b2, 300).await;
        b.close().await.unwrap();
        b2.close().await.unwrap();
        let mut b3 = srv.online("bob", "laptop").await;
        expect_no_message(&mut b3, 300).await;
        let bare = BareJid::new("bob@localhost").unwrap();
        assert_eq!(
            srv.server()
                .store
                .count_offline(&bare.to_string(), 100)
                .await
                .unwrap(),
            0
        );
        // Online now: messages go straight through, without delay.
        a.send(&chat("bob@localhost", "live")).await.unwrap();
        let m = expect_message(&mut b3).await;
        assert_eq!(body(&m).as_deref(), Some("live"));
        assert!(delay_of(&m).is_none());
        srv.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn offline_messages_survive_a_server_restart() {
    for db in TestDb::all().await {
        eprintln!("-- backend {}", db.backend_name());
        let srv = TestServer::start_on(db.open().await, |_| {}).await;
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        let mut a = srv.online("alice", "a").await;
        for i in 0..5 {
            a.send(&chat("bob@localhost", &format!("m{i}")))
                .await
                .unwrap();
        }
        round_trip(&mut a).await;
        srv.shutdown().await;

        // A new server on the same database.
        let srv = TestServer::start_on(db.open().await, |_| {}).await;
        let mut b = srv.online("bob", "b").await;
        for i in 0..5 {
            let m = expect_message(&mut b).await;
            assert_eq!(body(&m), Some(format!("m{i}")));
            assert!(delay_of(&m).is_some());
        }
        expect_no_message(&mut b, 300).await;
        srv.shutdown().await;
    }
}

#[tokio::test]
async fn full_queue_bounces_service_unavailable_with_text() {
    for db in TestDb::all().await {
        eprintln!("-- backend {}", db.backend_name());
        let srv = TestServer::start_on(db.open().await, |c| c.offline.max_per_user = 3).await;
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        let mut a = srv.online("alice", "a").await;
        for i in 0..3 {
            a.send(&chat("bob@localhost", &format!("m{i}")))
                .await
                .unwrap();
        }
        let mut over = chat("bob@localhost", "too many");
        starling::stanza::set_attr(&mut over, "id", "over");
        a.send(&over).await.unwrap();
        let e = expect_message(&mut a).await;
        assert_eq!(e.attr("type"), Some("error"));
        assert_eq!(e.attr("id"), Some("over"));
        assert_eq!(e.attr("from"), Some("bob@localhost"));
        assert_eq!(error_condition(&e).as_deref(), Some("service-unavailable"));
        let text = e
            .get_child("error", ns::CLIENT)
            .and_then(|x| x.get_child("text", ns::STANZA_ERRORS))
            .map(|t| t.text())
            .unwrap_or_default();
        assert!(text.contains("full"), "{text}");
        assert_eq!(
            body(&e).as_deref(),
            Some("too many"),
            "the original comes back"
        );

        let mut b = srv.online("bob", "b").await;
        for i in 0..3 {
            assert_eq!(body(&expect_message(&mut b).await), Some(format!("m{i}")));
        }
        expect_no_message(&mut b, 300).await;
        // Delivered, so there is room again.
        b.close().await.unwrap();
        round_trip(&mut a).await;
        a.send(&chat("bob@localhost", "room again")).await.unwrap();
        expect_no_message(&mut a, 300).await;
        srv.shutdown().await;
    }
}

#[tokio::test]
async fn only_storable_messages_are_stored() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        let mut a = srv.online("alice", "a").await;
        // Not stored, no error: headline, error, pure chat state.
        a.send_str("<message to='bob@localhost' type='headline'><body>news</body></message>")
            .await
            .unwrap();
        a.send_str("<message to='bob@localhost' type='error' id='e1'><body>err</body><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>")
            .await
            .unwrap();
        a.send_str("<message to='bob@localhost' type='chat'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>")
            .await
            .unwrap();
        round_trip(&mut a).await;
        expect_no_message(&mut a, 200).await;
        // Groupchat to a user: service-unavailable (RFC 6121 8.5.2.2.1).
        a.send_str("<message to='bob@localhost' type='groupchat' id='g'><body>gc</body></message>")
            .await
            .unwrap();
        let e = expect_message(&mut a).await;
        assert_eq!(e.attr("id"), Some("g"));
        assert_eq!(error_condition(&e).as_deref(), Some("service-unavailable"));
        // <no-store/>: not stored, and the sender learns it was not delivered.
        a.send_str("<message to='bob@localhost' type='chat' id='ns'><body>ephemeral</body><no-store xmlns='urn:xmpp:hints'/></message>")
            .await
            .unwrap();
        let e = expect_message(&mut a).await;
        assert_eq!(e.attr("id"), Some("ns"));
        assert_eq!(error_condition(&e).as_deref(), Some("service-unavailable"));
        // Stored: a headline with <store/>, a receipt without a body, and
        // a message with origin-id and stanza-id, which are kept.
        a.send_str("<message to='bob@localhost' type='headline'><body>keep me</body><store xmlns='urn:xmpp:hints'/></message>")
            .await
            .unwrap();
        a.send_str("<message to='bob@localhost' type='chat' id='r'><received xmlns='urn:xmpp:receipts' id='abc'/></message>")
            .await
            .unwrap();
        a.send_str("<message to='bob@localhost' type='chat' id='ids'><body>with ids</body><origin-id xmlns='urn:xmpp:sid:0' id='o-1'/><active xmlns='http://jabber.org/protocol/chatstates'/></message>")
            .await
            .unwrap();
        round_trip(&mut a).await;
        expect_no_message(&mut a, 200).await;

        let mut b = srv.online("bob", "b").await;
        let m = expect_message(&mut b).await;
        assert_eq!(body(&m).as_deref(), Some("keep me"));
        assert_eq!(m.attr("type"), Some("headline"));
        let m = expect_message(&mut b).await;
        assert_eq!(m.attr("id"), Some("r"));
        assert_eq!(
            m.get_child("received", "urn:xmpp:receipts").and_then(|r| r.attr("id")),
            Some("abc")
        );
        let m = expect_message(&mut b).await;
        assert_eq!(m.attr("id"), Some("ids"));
        assert_eq!(
            m.get_child("origin-id", ns::SID).and_then(|o| o.attr("id")),
            Some("o-1")
        );
        assert!(m.has_child("active", "http://jabber.org/protocol/chatstates"));
        assert!(delay_of(&m).is_some());
        expect_no_message(&mut b, 300).await;
        srv.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn negative_priority_waits_until_priority_is_non_negative() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        let mut a = srv.online("alice", "a").await;
        a.send(&chat("bob@localhost", "before")).await.unwrap();
        round_trip(&mut a).await;
        let mut b = srv.login("bob", "b").await;
        b.send_str("<presence><priority>-1</priority></presence>")
            .await
            .unwrap();
        round_trip(&mut b).await;
        expect_no_message(&mut b, 300).await;
        // Still no non-negative resource: stored too.
        a.send(&chat("bob@localhost", "during")).await.unwrap();
        round_trip(&mut a).await;
        expect_no_message(&mut b, 200).await;
        expect_no_message(&mut a, 50).await;
        b.send_str("<presence><priority>0</priority></presence>")
            .await
            .unwrap();
        assert_eq!(
            body(&expect_message(&mut b).await).as_deref(),
            Some("before")
        );
        assert_eq!(
            body(&expect_message(&mut b).await).as_deref(),
            Some("during")
        );
        // A later presence update delivers nothing twice.
        b.send_str("<presence><show>away</show></presence>")
            .await
            .unwrap();
        expect_no_message(&mut b, 300).await;
        srv.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn two_resources_coming_online_together_get_each_message_once() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        let mut a = srv.online("alice", "a").await;
        let n = 60;
        let msgs: Vec<_> = (0..n)
            .map(|i| chat("bob@localhost", &format!("m{i}")))
            .collect();
        a.send_all(&msgs).await.unwrap();
        round_trip(&mut a).await;
        let mut b1 = srv.login("bob", "one").await;
        let mut b2 = srv.login("bob", "two").await;
        let (r1, r2) = tokio::join!(b1.send_str("<presence/>"), b2.send_str("<presence/>"));
        r1.unwrap();
        r2.unwrap();
        let mut got = Vec::new();
        for c in [&mut b1, &mut b2] {
            c.timeout = Duration::from_millis(700);
            while let Ok(m) = c.recv_matching(|e| e.name() == "message").await {
                got.push(body(&m).unwrap());
            }
        }
        // Each once, and in order within the one resource that got them.
        let want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
        let mut sorted = got.clone();
        sorted.sort_by_key(|s| s[1..].parse::<u32>().unwrap());
        assert_eq!(sorted, want);
        assert_eq!(got, want, "delivered in order");
        srv.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn store_api_and_messages_that_cannot_be_handed_over_stay_stored() {
    for_each_backend(|srv| async move {
        srv.add_user("bob").await;
        let server = srv.server();
        let bare = BareJid::new("bob@localhost").unwrap();
        let m = parse(
            "<message xmlns='jabber:client' from='x@localhost/r' to='bob@localhost' type='chat' id='api'><body>via api</body><stanza-id xmlns='urn:xmpp:sid:0' by='bob@localhost' id='s-1'/></message>",
        );
        assert_eq!(store_offline(server, &bare, &m).await, OfflineOutcome::Stored);
        let head = parse("<message xmlns='jabber:client' to='bob@localhost' type='headline'><body>h</body></message>");
        assert_eq!(store_offline(server, &bare, &head).await, OfflineOutcome::Discarded);
        let ns_ = parse("<message xmlns='jabber:client' to='bob@localhost' type='chat'><body>h</body><no-store xmlns='urn:xmpp:hints'/></message>");
        assert_eq!(store_offline(server, &bare, &ns_).await, OfflineOutcome::Refused);

        // A session whose mailbox is gone: nothing is handed over, nothing
        // is deleted.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        drop(rx);
        let (dead, _) = server
            .sessions
            .bind(bare.with_resource_str("dead").unwrap(), tx, None);
        assert_eq!(deliver_offline(server, &dead).await, 0);
        server.sessions.unbind(&dead);
        assert_eq!(
            server.store.count_offline("bob@localhost", 10).await.unwrap(),
            1
        );

        let mut b = srv.online("bob", "b").await;
        let got = expect_message(&mut b).await;
        assert_eq!(body(&got).as_deref(), Some("via api"));
        assert_eq!(
            got.get_child("stanza-id", ns::SID).and_then(|s| s.attr("id")),
            Some("s-1"),
            "stanza-id kept"
        );
        assert_eq!(
            got.children().filter(|c| c.is("delay", ns::DELAY)).count(),
            1
        );
        srv.shutdown().await;
    })
    .await;
}

/// The real binary, killed with SIGKILL after the sender's next stanza was
/// answered: the messages are in the database.
#[tokio::test]
async fn offline_messages_survive_kill_9() {
    for db in TestDb::all().await {
        eprintln!("-- backend {}", db.backend_name());
        let dir = starling::storage::testing::temp_dir("starling_kill");
        let url = match &db.pg_schema {
            Some(schema) => format!("{}?options[search_path]={schema}", db.url),
            None => db.url.clone(),
        };
        let port = free_port();
        let tls_port = free_port();
        let config = dir.join("starling.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\ndomains = ['localhost']\ndata_dir = '{d}/data'\n\
                 [c2s]\nstarttls = ['127.0.0.1:{port}']\ndirect_tls = ['127.0.0.1:{tls_port}']\n\
                 [tls]\ncert_dir = '{d}/certs'\n[database]\nurl = '{url}'\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let bin = env!("CARGO_BIN_EXE_starling");
        for user in ["alice", "bob"] {
            let out = std::process::Command::new(bin)
                .args(["--config", config.to_str().unwrap(), "user", "add", user])
                .args(["--password", &password(user)])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let login = |user: &str| {
            let mut o = starling::client::LoginOptions::new(addr, DOMAIN, user, &password(user));
            o.resource = Some("r".into());
            o
        };

        let mut server = spawn_server(bin, &config, addr).await;
        let mut a = starling::client::XmppClient::login(&login("alice"))
            .await
            .unwrap();
        a.send_str("<presence/>").await.unwrap();
        for i in 0..3 {
            a.send(&chat("bob@localhost", &format!("k{i}")))
                .await
                .unwrap();
        }
        round_trip(&mut a).await;
        server.kill().await.unwrap(); // SIGKILL
        drop(a);

        let mut server = spawn_server(bin, &config, addr).await;
        let mut b = starling::client::XmppClient::login(&login("bob"))
            .await
            .unwrap();
        b.send_str("<presence/>").await.unwrap();
        for i in 0..3 {
            assert_eq!(body(&expect_message(&mut b).await), Some(format!("k{i}")));
        }
        expect_no_message(&mut b, 300).await;
        server.kill().await.unwrap();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn spawn_server(
    bin: &str,
    config: &std::path::Path,
    addr: std::net::SocketAddr,
) -> tokio::process::Child {
    let child = tokio::process::Command::new(bin)
        .args(["--config", config.to_str().unwrap(), "serve"])
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server did not start on {addr}");
}

/// More stored messages than the session's mailbox holds: delivery waits
/// for the session to drain its mailbox instead of stalling it.
#[tokio::test]
async fn more_offline_messages_than_the_mailbox_holds() {
    let srv = TestServer::start_with(|c| c.limits.session_queue = 16).await;
    srv.add_user("alice").await;
    srv.add_user("bob").await;
    let mut a = srv.online("alice", "a").await;
    let n = 300;
    let msgs: Vec<_> = (0..n)
        .map(|i| chat("bob@localhost", &format!("m{i}")))
        .collect();
    a.send_all(&msgs).await.unwrap();
    round_trip(&mut a).await;
    expect_no_message(&mut a, 100).await;
    let mut b = srv.online("bob", "b").await;
    for i in 0..n {
        let m = expect_message(&mut b).await;
        assert_eq!(body(&m), Some(format!("m{i}")));
    }
    // Still connected and served.
    round_trip(&mut b).await;
    // The last page is deleted right after it was handed over.
    let mut left = -1;
    for _ in 0..100 {
        left = srv
            .server()
            .store
            .count_offline("bob@localhost", 1000)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left, 0);
    expect_no_message(&mut b, 200).await;
    srv.shutdown().await;
}

/// Offline storage and the archive agree: the stored message carries the
/// recipient's archive stanza-id (XEP-0359), so a client that fetches both
/// can deduplicate (CLIENTS.md).
#[tokio::test]
async fn offline_message_carries_the_archive_stanza_id() {
    for db in TestDb::all().await {
        eprintln!("-- backend {}", db.backend_name());
        let srv = TestServer::start_on(db.open().await, |c| c.archive.enabled = true).await;
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        let mut a = srv.online("alice", "a").await;
        a.send(&chat("bob@localhost", "archived and offline"))
            .await
            .unwrap();
        round_trip(&mut a).await;
        let mut b = srv.online("bob", "b").await;
        let m = expect_message(&mut b).await;
        assert_eq!(body(&m).as_deref(), Some("archived and offline"));
        let sids: Vec<&Element> = m
            .children()
            .filter(|c| c.is("stanza-id", ns::SID) && c.attr("by") == Some("bob@localhost"))
            .collect();
        assert_eq!(sids.len(), 1, "one stanza-id by bob's archive: {m:?}");
        let sid = sids[0].attr("id").unwrap().to_owned();
        // The same id in bob's archive.
        b.send_str("<iq type='set' id='mam1'><query xmlns='urn:xmpp:mam:2' queryid='q1'/></iq>")
            .await
            .unwrap();
        let r = expect(&mut b, "an archive result", |e| {
            e.get_child("result", ns::MAM)
                .is_some_and(|r| r.attr("queryid") == Some("q1"))
        })
        .await;
        assert_eq!(
            r.get_child("result", ns::MAM).and_then(|r| r.attr("id")),
            Some(sid.as_str())
        );
        srv.shutdown().await;
    }
}
