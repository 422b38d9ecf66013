//! vCard-temp (XEP-0054) end to end: one's own vCard set and read back,
//! other users reading it through the bare JID, only the owner writing it,
//! the size limit, persistence across a restart; and XEP-0153 avatar hashes
//! in presence arriving untouched.

mod common;

use common::*;
use starling::storage::testing::TestDb;
use starling::xml::ns;

const VCARD: &str = "<vCard xmlns='vcard-temp'><FN>Alice Example</FN><NICKNAME>al</NICKNAME>\
    <EMAIL><INTERNET/><USERID>alice@example.org</USERID></EMAIL>\
    <PHOTO><TYPE>image/png</TYPE><BINVAL>iVBORw0KGgo=</BINVAL></PHOTO></vCard>";

fn set_iq(to: Option<&str>, vcard: &str) -> String {
    let to = to.map(|t| format!(" to='{t}'")).unwrap_or_default();
    format!("<iq xmlns='jabber:client' type='set'{to}>{vcard}</iq>")
}

fn get_iq(to: Option<&str>) -> String {
    let to = to.map(|t| format!(" to='{t}'")).unwrap_or_default();
    format!("<iq xmlns='jabber:client' type='get'{to}><vCard xmlns='vcard-temp'/></iq>")
}

fn fn_of(r: &minidom::Element) -> Option<String> {
    r.get_child("vCard", ns::VCARD)
        .and_then(|v| v.get_child("FN", ns::VCARD))
        .map(|f| f.text())
}

#[tokio::test]
async fn own_vcard_set_get_and_others_read_it() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        srv.add_user("carol").await;
        let mut a = srv.online("alice", "a").await;
        let mut b = srv.online("bob", "b").await;
        let mut c = srv.online("carol", "c").await;

        // None yet: an empty vCard for the owner (3.1) ...
        let r = iq(&mut a, &get_iq(None)).await;
        assert_eq!(r.attr("type"), Some("result"));
        let v = r.get_child("vCard", ns::VCARD).expect("an empty vCard");
        assert!(v.children().next().is_none());
        // ... and for others the same error as for a missing user (3.3).
        let r = iq(&mut b, &get_iq(Some("alice@localhost"))).await;
        assert_eq!(error_condition(&r).as_deref(), Some("service-unavailable"));
        let r = iq(&mut b, &get_iq(Some("nobody@localhost"))).await;
        assert_eq!(error_condition(&r).as_deref(), Some("service-unavailable"));

        // Set without 'to', and to one's own bare JID.
        let r = iq(&mut a, &set_iq(None, VCARD)).await;
        assert_eq!(r.attr("type"), Some("result"), "{r:?}");
        let r = iq(&mut a, &get_iq(None)).await;
        let got = r.get_child("vCard", ns::VCARD).unwrap();
        let want: minidom::Element = VCARD.parse().unwrap();
        assert_eq!(got, &want, "stored as sent");
        let r = iq(
            &mut a,
            &set_iq(
                Some("alice@localhost"),
                &VCARD.replace("Alice Example", "Alice E."),
            ),
        )
        .await;
        assert_eq!(r.attr("type"), Some("result"));

        // Bob and Carol read it through the bare JID; the answer comes from
        // the bare JID.
        for c in [&mut b, &mut c] {
            let r = iq(c, &get_iq(Some("alice@localhost"))).await;
            assert_eq!(r.attr("type"), Some("result"));
            assert_eq!(r.attr("from"), Some("alice@localhost"));
            assert_eq!(fn_of(&r).as_deref(), Some("Alice E."));
        }

        // Only the owner may set it (3.2).
        let r = iq(
            &mut b,
            &set_iq(
                Some("alice@localhost"),
                "<vCard xmlns='vcard-temp'><FN>Mallory</FN></vCard>",
            ),
        )
        .await;
        assert_eq!(error_condition(&r).as_deref(), Some("forbidden"));
        let r = iq(&mut c, &get_iq(Some("alice@localhost"))).await;
        assert_eq!(fn_of(&r).as_deref(), Some("Alice E."));

        // Bob's own vCard is separate.
        let r = iq(&mut b, &get_iq(None)).await;
        assert!(
            r.get_child("vCard", ns::VCARD)
                .unwrap()
                .children()
                .next()
                .is_none()
        );

        // An empty vCard removes it.
        let r = iq(&mut a, &set_iq(None, "<vCard xmlns='vcard-temp'/>")).await;
        assert_eq!(r.attr("type"), Some("result"));
        let r = iq(&mut b, &get_iq(Some("alice@localhost"))).await;
        assert_eq!(error_condition(&r).as_deref(), Some("service-unavailable"));

        // A wrong element in the namespace, and the server's own vCard.
        let r = iq(
            &mut a,
            "<iq xmlns='jabber:client' type='get'><VCARD xmlns='vcard-temp'/></iq>",
        )
        .await;
        assert_eq!(error_condition(&r).as_deref(), Some("bad-request"));
        let r = iq(&mut a, &get_iq(Some("localhost"))).await;
        assert_eq!(error_condition(&r).as_deref(), Some("service-unavailable"));
        srv.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn vcard_size_limit_and_persistence() {
    for db in TestDb::all().await {
        eprintln!("-- backend {}", db.backend_name());
        let srv = TestServer::start_on(db.open().await, |c| c.vcard.max_bytes = 2048).await;
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        let mut a = srv.online("alice", "a").await;
        let big = format!(
            "<vCard xmlns='vcard-temp'><FN>A</FN><PHOTO><BINVAL>{}</BINVAL></PHOTO></vCard>",
            "A".repeat(3000)
        );
        let r = iq(&mut a, &set_iq(None, &big)).await;
        assert_eq!(error_condition(&r).as_deref(), Some("not-acceptable"));
        let r = iq(&mut a, &set_iq(None, VCARD)).await;
        assert_eq!(r.attr("type"), Some("result"));
        srv.shutdown().await;

        let srv = TestServer::start_on(db.open().await, |_| {}).await;
        let mut b = srv.online("bob", "b").await;
        let r = iq(&mut b, &get_iq(Some("alice@localhost"))).await;
        assert_eq!(
            fn_of(&r).as_deref(),
            Some("Alice Example"),
            "kept across a restart"
        );
        srv.shutdown().await;
    }
}

/// XEP-0153: the avatar hash in presence is the client's business; the
/// server passes it on unmodified.
#[tokio::test]
async fn avatar_hash_in_presence_arrives_unmodified() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        let mut a = srv.online("alice", "a").await;
        let mut b = srv.online("bob", "b").await;
        let sent = "<presence xmlns='jabber:client' to='bob@localhost/b'><show>away</show>\
            <x xmlns='vcard-temp:x:update'><photo>01b87fcd030b72895ff8e88db57ec525450f000d</photo></x>\
            <c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='https://example.org' ver='abc='/></presence>";
        a.send_str(sent).await.unwrap();
        let p = expect(&mut b, "alice's presence", |e| {
            e.name() == "presence" && e.attr("from") == Some("alice@localhost/a")
        })
        .await;
        let mut want = parse(sent);
        starling::stanza::set_attr(&mut want, "from", "alice@localhost/a");
        assert_eq!(p, want, "unmodified apart from the stamped 'from'");
        let photo = p
            .get_child("x", ns::VCARD_UPDATE)
            .and_then(|x| x.get_child("photo", ns::VCARD_UPDATE))
            .map(|p| p.text());
        assert_eq!(
            photo.as_deref(),
            Some("01b87fcd030b72895ff8e88db57ec525450f000d")
        );
        srv.shutdown().await;
    })
    .await;
}
