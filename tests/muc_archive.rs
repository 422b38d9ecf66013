//! Room archives (XEP-0313 on the room JID) and stanza-ids `by` the room,
//! on every store backend.

mod common;
mod muc_support;

use common::*;
use minidom::Element;
use muc_support::*;
use starling::client::XmppClient;

const MAM: &str = "urn:xmpp:mam:2";
const RSM: &str = "http://jabber.org/protocol/rsm";

/// Run a MAM query; return the result messages and the final IQ.
async fn query(c: &mut XmppClient, room: &str, inner: &str) -> (Vec<Element>, Element) {
    let qid = starling::stanza::new_id();
    c.send_str(&format!(
        "<iq type='set' id='q-{qid}' to='{room}'><query xmlns='{MAM}' queryid='{qid}'>{inner}</query></iq>"
    ))
    .await
    .unwrap();
    let id = format!("q-{qid}");
    let mut results = Vec::new();
    loop {
        let e = expect(c, "mam traffic", |e| {
            (e.name() == "iq" && e.attr("id") == Some(id.as_str()))
                || e.get_child("result", MAM)
                    .is_some_and(|r| r.attr("queryid") == Some(qid.as_str()))
        })
        .await;
        if e.name() == "iq" {
            return (results, e);
        }
        results.push(e);
    }
}

fn result_body(m: &Element) -> String {
    let fwd = m
        .get_child("result", MAM)
        .unwrap()
        .get_child("forwarded", "urn:xmpp:forward:0")
        .unwrap();
    body(fwd.get_child("message", "jabber:client").unwrap()).unwrap_or_default()
}

fn result_id(m: &Element) -> String {
    m.get_child("result", MAM)
        .unwrap()
        .attr("id")
        .unwrap()
        .to_owned()
}

fn fin(iq: &Element) -> &Element {
    iq.get_child("fin", MAM).unwrap()
}

fn form(fields: &[(&str, &str)]) -> String {
    let mut s = format!(
        "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>{MAM}</value></field>"
    );
    for (k, v) in fields {
        s.push_str(&format!("<field var='{k}'><value>{v}</value></field>"));
    }
    s.push_str("</x>");
    s
}

#[tokio::test]
async fn room_archive_queries() {
    for_each_backend(|srv| async move {
        for u in ["alice", "bob", "carol"] {
            srv.add_user(u).await;
        }
        let mut alice = srv.online("alice", "a").await;
        let mut bob = srv.online("bob", "b").await;
        let mut carol = srv.online("carol", "c").await;
        let r = room("log");
        create_instant(&mut alice, &r, "alice").await;
        join(&mut bob, &r, "bob").await;
        let mut sids = Vec::new();
        for i in 1..=5 {
            let (c, who) = if i % 2 == 0 {
                (&mut bob, "bob")
            } else {
                (&mut alice, "alice")
            };
            c.send(&groupchat(&r, &format!("msg {i}"))).await.unwrap();
            let m = expect_groupchat(c, &format!("msg {i}")).await;
            let sid = m.get_child("stanza-id", "urn:xmpp:sid:0").unwrap();
            assert_eq!(sid.attr("by"), Some(r.as_str()));
            sids.push((sid.attr("id").unwrap().to_owned(), who));
        }
        // Private messages are not archived by the room.
        bob.send_str(&format!(
            "<message to='{r}/alice' type='chat'><body>private</body></message>"
        ))
        .await
        .unwrap();
        expect(&mut alice, "pm", |e| body(e).as_deref() == Some("private")).await;

        // The whole archive, in order, ids equal to the stanza-ids.
        let (res, iq) = query(&mut carol, &r, "").await;
        assert_eq!(iq.attr("type"), Some("result"));
        assert_eq!(
            res.iter().map(result_body).collect::<Vec<_>>(),
            (1..=5).map(|i| format!("msg {i}")).collect::<Vec<_>>()
        );
        assert_eq!(
            res.iter().map(result_id).collect::<Vec<_>>(),
            sids.iter().map(|s| s.0.clone()).collect::<Vec<_>>()
        );
        assert_eq!(fin(&iq).attr("complete"), Some("true"));
        let first = &res[0];
        assert_eq!(first.attr("from"), Some(r.as_str()));
        let fwd = first
            .get_child("result", MAM)
            .unwrap()
            .get_child("forwarded", "urn:xmpp:forward:0")
            .unwrap();
        assert!(
            fwd.get_child("delay", "urn:xmpp:delay")
                .unwrap()
                .attr("stamp")
                .is_some()
        );
        let m = fwd.get_child("message", "jabber:client").unwrap();
        assert_eq!(m.attr("from"), Some(format!("{r}/alice").as_str()));
        assert_eq!(m.attr("type"), Some("groupchat"));
        assert!(
            m.get_child("occupant-id", "urn:xmpp:occupant-id:0")
                .is_some()
        );
        // Semi-anonymous room: no real JID for a non-moderator...
        assert!(m.get_child("x", MUC_USER).is_none());
        // ...but the owner sees it.
        let (res, _) = query(&mut alice, &r, "").await;
        let fwd = res[1]
            .get_child("result", MAM)
            .unwrap()
            .get_child("forwarded", "urn:xmpp:forward:0")
            .unwrap();
        let x = fwd
            .get_child("message", "jabber:client")
            .unwrap()
            .get_child("x", MUC_USER)
            .unwrap();
        assert_eq!(
            x.get_child("item", MUC_USER).unwrap().attr("jid"),
            Some("bob@localhost/b")
        );

        // RSM paging: two at a time, then after the last.
        let (res, iq) = query(
            &mut carol,
            &r,
            &format!("<set xmlns='{RSM}'><max>2</max></set>"),
        )
        .await;
        assert_eq!(
            res.iter().map(result_body).collect::<Vec<_>>(),
            vec!["msg 1", "msg 2"]
        );
        assert_ne!(fin(&iq).attr("complete"), Some("true"));
        let set = fin(&iq).get_child("set", RSM).unwrap();
        let last = set.get_child("last", RSM).unwrap().text();
        assert_eq!(set.get_child("first", RSM).unwrap().text(), sids[0].0);
        let (res, _) = query(
            &mut carol,
            &r,
            &format!("<set xmlns='{RSM}'><max>2</max><after>{last}</after></set>"),
        )
        .await;
        assert_eq!(
            res.iter().map(result_body).collect::<Vec<_>>(),
            vec!["msg 3", "msg 4"]
        );
        // The last page, and flipped.
        let (res, iq) = query(
            &mut carol,
            &r,
            &format!("<set xmlns='{RSM}'><max>2</max><before/></set>"),
        )
        .await;
        assert_eq!(
            res.iter().map(result_body).collect::<Vec<_>>(),
            vec!["msg 4", "msg 5"]
        );
        assert_ne!(fin(&iq).attr("complete"), Some("true"));
        let (res, _) = query(
            &mut carol,
            &r,
            &format!(
                "<set xmlns='{RSM}'><max>2</max><before>{}</before></set><flip-page/>",
                sids[2].0
            ),
        )
        .await;
        assert_eq!(
            res.iter().map(result_body).collect::<Vec<_>>(),
            vec!["msg 2", "msg 1"]
        );
        // Filters: by occupant, by ids, after-id.
        let (res, _) = query(&mut carol, &r, &form(&[("with", &format!("{r}/bob"))])).await;
        assert_eq!(
            res.iter().map(result_body).collect::<Vec<_>>(),
            vec!["msg 2", "msg 4"]
        );
        let (res, _) = query(&mut carol, &r, &form(&[("after-id", &sids[3].0)])).await;
        assert_eq!(
            res.iter().map(result_body).collect::<Vec<_>>(),
            vec!["msg 5"]
        );
        // 'with' matches occupant JIDs (the publisher), never real JIDs: a
        // real JID reveals nothing.
        let (res, iq) = query(&mut carol, &r, &form(&[("with", "bob@localhost")])).await;
        assert_eq!(iq.attr("type"), Some("result"));
        assert!(res.is_empty());
        let (res, _) = query(&mut carol, &r, &form(&[("with", &r)])).await;
        assert_eq!(res.len(), 5);
        // Unknown ids: item-not-found; unknown fields: feature-not-implemented.
        let (_, iq) = query(
            &mut carol,
            &r,
            &format!("<set xmlns='{RSM}'><after>12345</after></set>"),
        )
        .await;
        assert_eq!(err_cond(&iq), "item-not-found");
        let (_, iq) = query(&mut carol, &r, &form(&[("full-text-search", "x")])).await;
        assert_eq!(err_cond(&iq), "feature-not-implemented");
        // The form and the metadata.
        let f = iq_ok(
            &mut carol,
            &format!("<iq xmlns='jabber:client' type='get' to='{r}'><query xmlns='{MAM}'/></iq>"),
        )
        .await;
        assert!(
            f.get_child("query", MAM)
                .unwrap()
                .has_child("x", "jabber:x:data")
        );
        let md = iq_ok(
            &mut carol,
            &format!(
                "<iq xmlns='jabber:client' type='get' to='{r}'><metadata xmlns='{MAM}'/></iq>"
            ),
        )
        .await;
        let md = md.get_child("metadata", MAM).unwrap();
        assert_eq!(
            md.get_child("start", MAM).unwrap().attr("id"),
            Some(sids[0].0.as_str())
        );
        assert_eq!(
            md.get_child("end", MAM).unwrap().attr("id"),
            Some(sids[4].0.as_str())
        );

        // Members-only rooms: only members read the archive.
        configure(&mut alice, &r, &[("muc#roomconfig_membersonly", &["1"])]).await;
        let (_, iq) = query(&mut carol, &r, "").await;
        assert_eq!(err_cond(&iq), "forbidden");
        let res = admin_set(
            &mut alice,
            &r,
            "<item affiliation='member' jid='carol@localhost'/>",
        )
        .await;
        assert_eq!(res.attr("type"), Some("result"));
        let (res, _) = query(&mut carol, &r, "").await;
        assert_eq!(res.len(), 5);
        // Banned users never.
        let res = admin_set(
            &mut alice,
            &r,
            "<item affiliation='outcast' jid='carol@localhost'/>",
        )
        .await;
        assert_eq!(res.attr("type"), Some("result"));
        let (_, iq) = query(&mut carol, &r, "").await;
        assert_eq!(err_cond(&iq), "forbidden");
        // Without archiving, no MAM.
        configure(
            &mut alice,
            &r,
            &[("muc#roomconfig_enablearchiving", &["0"])],
        )
        .await;
        let (_, iq) = query(&mut alice, &r, "").await;
        assert_eq!(err_cond(&iq), "service-unavailable");
        alice.send(&groupchat(&r, "unlogged")).await.unwrap();
        let m = expect_groupchat(&mut alice, "unlogged").await;
        assert!(
            m.get_child("stanza-id", "urn:xmpp:sid:0").is_none(),
            "no stanza-id without an archive"
        );
        assert!(!features(&mut alice, &r).await.contains(&MAM.to_string()));
    })
    .await;
}

#[tokio::test]
async fn subject_changes_are_archived_but_not_history() {
    for_each_backend(|srv| async move {
        for u in ["alice", "bob"] {
            srv.add_user(u).await;
        }
        let mut alice = srv.online("alice", "a").await;
        let r = room("subj");
        create_instant(&mut alice, &r, "alice").await;
        alice.send(&groupchat(&r, "before")).await.unwrap();
        expect_groupchat(&mut alice, "before").await;
        alice
            .send_str(&format!(
                "<message to='{r}' type='groupchat'><subject>new topic</subject></message>"
            ))
            .await
            .unwrap();
        let s = expect(&mut alice, "subject", |e| {
            e.has_child("subject", "jabber:client")
        })
        .await;
        assert!(s.get_child("stanza-id", "urn:xmpp:sid:0").is_some());
        let (res, _) = query(&mut alice, &r, "").await;
        assert_eq!(res.len(), 2);
        let mut bob = srv.online("bob", "b").await;
        send_join(&mut bob, &r, "bob", "").await;
        self_presence(&mut bob, &r, "bob").await;
        let h = expect(&mut bob, "history", |e| e.name() == "message").await;
        assert_eq!(body(&h).as_deref(), Some("before"));
        let s = expect(&mut bob, "subject", |e| e.name() == "message").await;
        assert_eq!(
            s.get_child("subject", "jabber:client").unwrap().text(),
            "new topic"
        );
    })
    .await;
}

#[tokio::test]
async fn destroyed_and_vanished_rooms_lose_their_archive() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        let mut alice = srv.online("alice", "a").await;
        let r = room("gone");
        // A temporary room: its archive goes with its last occupant.
        create_instant(&mut alice, &r, "alice").await;
        alice.send(&groupchat(&r, "temporary words")).await.unwrap();
        expect_groupchat(&mut alice, "temporary words").await;
        let (res, _) = query(&mut alice, &r, "").await;
        assert_eq!(res.len(), 1);
        alice.send_str(&format!("<presence to='{r}/alice' type='unavailable'/>")).await.unwrap();
        unavailable_from(&mut alice, &format!("{r}/alice")).await;
        // A new room of the same name starts empty.
        create_with(&mut alice, &r, "alice", &[("muc#roomconfig_persistentroom", &["1"])]).await;
        let (res, iq) = query(&mut alice, &r, "").await;
        assert!(res.is_empty(), "old archive gone");
        assert_eq!(fin(&iq).attr("complete"), Some("true"));
        alice.send(&groupchat(&r, "persistent words")).await.unwrap();
        expect_groupchat(&mut alice, "persistent words").await;
        // Destroying a persistent room deletes its archive too.
        iq_ok(
            &mut alice,
            &format!("<iq xmlns='jabber:client' type='set' to='{r}'><query xmlns='{MUC_OWNER}'><destroy/></query></iq>"),
        )
        .await;
        unavailable_from(&mut alice, &format!("{r}/alice")).await;
        create_instant(&mut alice, &r, "alice").await;
        let (res, _) = query(&mut alice, &r, "").await;
        assert!(res.is_empty(), "destroyed room's archive gone");
    })
    .await;
}
