//! Private XML storage (XEP-0049) end to end: per account and namespace,
//! readable and writable only by the owner's resources, reserved namespaces
//! refused, size and namespace limits, durable across a restart.

mod common;

use common::*;
use minidom::Element;
use starling::storage::testing::TestDb;
use starling::xml::ns;

const BOOKMARKS: &str = "<storage xmlns='storage:bookmarks'>\
    <conference name='Council' autojoin='true' jid='council@muc.localhost'><nick>alice</nick></conference>\
    </storage>";

fn private_iq(typ: &str, to: Option<&str>, content: &str) -> String {
    let to = to.map(|t| format!(" to='{t}'")).unwrap_or_default();
    format!(
        "<iq xmlns='jabber:client' type='{typ}'{to}><query xmlns='jabber:iq:private'>{content}</query></iq>"
    )
}

fn query_children(r: &Element) -> Vec<Element> {
    r.get_child("query", ns::PRIVATE)
        .unwrap_or_else(|| panic!("no query in {r:?}"))
        .children()
        .cloned()
        .collect()
}

#[tokio::test]
async fn owner_stores_and_reads_per_namespace() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        let mut a1 = srv.online("alice", "a1").await;
        let mut a2 = srv.online("alice", "a2").await;
        let mut b = srv.online("bob", "b").await;

        // Nothing stored: the requested element comes back empty.
        let r = iq(
            &mut a1,
            &private_iq("get", None, "<storage xmlns='storage:bookmarks'/>"),
        )
        .await;
        assert_eq!(r.attr("type"), Some("result"));
        assert_eq!(
            query_children(&r),
            vec![parse("<storage xmlns='storage:bookmarks'/>")]
        );

        let r = iq(&mut a1, &private_iq("set", None, BOOKMARKS)).await;
        assert_eq!(r.attr("type"), Some("result"), "{r:?}");
        // Another resource of the owner reads it, also via the bare JID.
        for to in [None, Some("alice@localhost")] {
            let r = iq(
                &mut a2,
                &private_iq("get", to, "<storage xmlns='storage:bookmarks'/>"),
            )
            .await;
            assert_eq!(query_children(&r), vec![parse(BOOKMARKS)]);
        }
        // Two namespaces in one set, two elements of one namespace kept together.
        let r = iq(
            &mut a2,
            &private_iq(
                "set",
                None,
                "<exodus xmlns='exodus:prefs'><defaultnick>Hamlet</defaultnick></exodus>\
                 <note xmlns='storage:rosternotes' jid='x@y'>one</note>\
                 <note xmlns='storage:rosternotes' jid='z@y'>two</note>",
            ),
        )
        .await;
        assert_eq!(r.attr("type"), Some("result"));
        let r = iq(
            &mut a1,
            &private_iq("get", None, "<note xmlns='storage:rosternotes'/>"),
        )
        .await;
        let notes = query_children(&r);
        assert_eq!(notes.len(), 2);
        assert_eq!(notes[1].text(), "two");
        let r = iq(
            &mut a1,
            &private_iq("get", None, "<exodus xmlns='exodus:prefs'/>"),
        )
        .await;
        assert_eq!(
            query_children(&r)[0]
                .get_child("defaultnick", "exodus:prefs")
                .unwrap()
                .text(),
            "Hamlet"
        );
        // Replacing a namespace leaves the others.
        let r = iq(
            &mut a1,
            &private_iq("set", None, "<exodus xmlns='exodus:prefs'/>"),
        )
        .await;
        assert_eq!(r.attr("type"), Some("result"));
        let r = iq(
            &mut a2,
            &private_iq("get", None, "<storage xmlns='storage:bookmarks'/>"),
        )
        .await;
        assert_eq!(query_children(&r), vec![parse(BOOKMARKS)]);

        // Bob: his own storage is empty; Alice's is forbidden both ways.
        let r = iq(
            &mut b,
            &private_iq("get", None, "<storage xmlns='storage:bookmarks'/>"),
        )
        .await;
        assert_eq!(
            query_children(&r),
            vec![parse("<storage xmlns='storage:bookmarks'/>")]
        );
        for typ in ["get", "set"] {
            let r = iq(&mut b, &private_iq(typ, Some("alice@localhost"), BOOKMARKS)).await;
            assert_eq!(error_condition(&r).as_deref(), Some("forbidden"), "{typ}");
        }
        let r = iq(
            &mut a1,
            &private_iq("get", None, "<storage xmlns='storage:bookmarks'/>"),
        )
        .await;
        assert_eq!(
            query_children(&r),
            vec![parse(BOOKMARKS)],
            "unchanged by bob"
        );
        srv.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn bad_requests_get_the_xep_errors() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        let mut a = srv.online("alice", "a").await;
        let cases = [
            // No child element.
            (private_iq("get", None, ""), "not-acceptable"),
            (private_iq("set", None, ""), "not-acceptable"),
            // Reserved namespaces.
            (
                private_iq(
                    "set",
                    None,
                    "<message xmlns='jabber:client'><body>x</body></message>",
                ),
                "not-acceptable",
            ),
            (
                private_iq("set", None, "<iq xmlns='jabber:server'/>"),
                "not-acceptable",
            ),
            (
                private_iq("get", None, "<query xmlns='jabber:iq:private'/>"),
                "not-acceptable",
            ),
            // More than one namespace in a get.
            (
                private_iq("get", None, "<a xmlns='a:ns'/><b xmlns='b:ns'/>"),
                "bad-request",
            ),
            // To the server.
            (
                private_iq("get", Some("localhost"), "<a xmlns='a:ns'/>"),
                "forbidden",
            ),
        ];
        for (xml, cond) in cases {
            let r = iq(&mut a, &xml).await;
            assert_eq!(error_condition(&r).as_deref(), Some(cond), "{xml}");
        }
        srv.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn limits_and_persistence() {
    for db in TestDb::all().await {
        eprintln!("-- backend {}", db.backend_name());
        let srv = TestServer::start_on(db.open().await, |c| {
            c.private_storage.max_bytes = 1024;
            c.private_storage.max_namespaces = 2;
        })
        .await;
        srv.add_user("alice").await;
        let mut a = srv.online("alice", "a").await;
        let big = format!("<big xmlns='big:ns'>{}</big>", "x".repeat(2000));
        let r = iq(&mut a, &private_iq("set", None, &big)).await;
        assert_eq!(error_condition(&r).as_deref(), Some("not-acceptable"));
        for n in ["one:ns", "two:ns"] {
            let r = iq(
                &mut a,
                &private_iq("set", None, &format!("<d xmlns='{n}'>{n}</d>")),
            )
            .await;
            assert_eq!(r.attr("type"), Some("result"));
        }
        let r = iq(&mut a, &private_iq("set", None, "<d xmlns='three:ns'/>")).await;
        assert_eq!(error_condition(&r).as_deref(), Some("policy-violation"));
        // Replacing an existing namespace is still fine.
        let r = iq(&mut a, &private_iq("set", None, "<d xmlns='two:ns'>2</d>")).await;
        assert_eq!(r.attr("type"), Some("result"));
        srv.shutdown().await;

        let srv = TestServer::start_on(db.open().await, |_| {}).await;
        let mut a = srv.online("alice", "a").await;
        let r = iq(&mut a, &private_iq("get", None, "<d xmlns='two:ns'/>")).await;
        assert_eq!(query_children(&r)[0].text(), "2");
        let r = iq(&mut a, &private_iq("get", None, "<d xmlns='one:ns'/>")).await;
        assert_eq!(query_children(&r)[0].text(), "one:ns");
        srv.shutdown().await;
    }
}
