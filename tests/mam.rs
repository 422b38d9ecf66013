//! Message archive (XEP-0313) with stanza ids (XEP-0359) and preferences
//! (XEP-0441), end to end over real client connections, on every backend:
//! both copies archived, stanza-id on delivery equal to the archive id,
//! forged stanza-ids removed, every filter and paging direction, paging while
//! messages arrive, preferences, retention expiry, errors.

mod common;

use std::time::Duration;

use common::*;
use minidom::Element;
use starling::client::{XmppClient, stanza_error_condition};
use starling::storage::{ArchiveStore, testing};
use starling::xml::ns;

/// One archived message as a query returned it.
#[derive(Debug, Clone)]
struct Item {
    id: String,
    stamp: String,
    msg: Element,
}

impl Item {
    fn body(&self) -> String {
        body(&self.msg).unwrap_or_default()
    }
}

#[derive(Debug)]
struct Answer {
    items: Vec<Item>,
    fin: Element,
}

impl Answer {
    fn bodies(&self) -> Vec<String> {
        self.items.iter().map(Item::body).collect()
    }
    fn complete(&self) -> bool {
        self.fin.attr("complete") == Some("true")
    }
    fn rsm(&self, child: &str) -> Option<Element> {
        self.fin
            .get_child("set", ns::RSM)
            .and_then(|s| s.get_child(child, ns::RSM))
            .cloned()
    }
    fn first(&self) -> Option<String> {
        self.rsm("first").map(|e| e.text())
    }
    fn last(&self) -> Option<String> {
        self.rsm("last").map(|e| e.text())
    }
    fn count(&self) -> Option<u64> {
        self.rsm("count").map(|e| e.text().parse().unwrap())
    }
}

fn next_qid() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("q{}", N.fetch_add(1, Ordering::Relaxed))
}

/// Send a MAM query (`inner` = the form, RSM and flags) in namespace `qns`
/// and collect the results up to the IQ result; Err(condition) on an error.
async fn query_ns(c: &mut XmppClient, qns: &str, inner: &str) -> Result<Answer, String> {
    let qid = next_qid();
    let iq_id = format!("iq-{qid}");
    let iq = parse(&format!(
        "<iq xmlns='jabber:client' type='set' id='{iq_id}'><query xmlns='{qns}' queryid='{qid}'>{inner}</query></iq>"
    ));
    c.send(&iq).await.unwrap();
    let own_bare = c.jid.as_ref().unwrap().to_bare().to_string();
    let mut items = Vec::new();
    loop {
        let e = expect(c, "archive results", |e| {
            (e.name() == "message"
                && e.get_child("result", qns)
                    .is_some_and(|r| r.attr("queryid") == Some(qid.as_str())))
                || (e.name() == "iq" && e.attr("id") == Some(iq_id.as_str()))
        })
        .await;
        if e.name() == "iq" {
            if e.attr("type") == Some("error") {
                return Err(stanza_error_condition(&e).unwrap_or_default());
            }
            assert_eq!(e.attr("type"), Some("result"));
            let fin = e
                .get_child("fin", qns)
                .expect("the IQ result carries <fin/>")
                .clone();
            return Ok(Answer { items, fin });
        }
        assert_eq!(
            e.attr("from"),
            Some(own_bare.as_str()),
            "results come from the archive"
        );
        let r = e.get_child("result", qns).unwrap();
        let fwd = r.get_child("forwarded", ns::FORWARD).unwrap();
        items.push(Item {
            id: r.attr("id").unwrap().to_owned(),
            stamp: fwd
                .get_child("delay", ns::DELAY)
                .unwrap()
                .attr("stamp")
                .unwrap()
                .to_owned(),
            msg: fwd.get_child("message", ns::CLIENT).unwrap().clone(),
        });
    }
}

async fn query(c: &mut XmppClient, inner: &str) -> Result<Answer, String> {
    query_ns(c, ns::MAM, inner).await
}

/// A submitted query form with these fields (repeated vars give several
/// values).
fn form(fields: &[(&str, &str)]) -> String {
    let mut s = String::from(
        "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:2</value></field>",
    );
    let mut i = 0;
    while i < fields.len() {
        let var = fields[i].0;
        s.push_str(&format!("<field var='{var}'>"));
        while i < fields.len() && fields[i].0 == var {
            s.push_str(&format!("<value>{}</value>", fields[i].1));
            i += 1;
        }
        s.push_str("</field>");
    }
    s.push_str("</x>");
    s
}

fn rsm(max: usize, extra: &str) -> String {
    format!("<set xmlns='http://jabber.org/protocol/rsm'><max>{max}</max>{extra}</set>")
}

/// Send `n` numbered chats (`prefix` 1..=n) from `from` to `to` and wait
/// until the recipient `rcpt` has them all.
async fn send_numbered(
    from: &mut XmppClient,
    rcpt: &mut XmppClient,
    to: &str,
    prefix: &str,
    n: usize,
) {
    for i in 1..=n {
        from.send(&chat(to, &format!("{prefix}{i}"))).await.unwrap();
    }
    for i in 1..=n {
        let want = format!("{prefix}{i}");
        expect(rcpt, &want, |e| body(e).as_deref() == Some(want.as_str())).await;
    }
}

fn stanza_id_by(m: &Element, by: &str) -> Vec<String> {
    m.children()
        .filter(|c| c.is("stanza-id", ns::SID) && c.attr("by") == Some(by))
        .map(|c| c.attr("id").unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn both_copies_archived_and_stanza_id_equals_archive_id() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        let mut alice = srv.online("alice", "phone").await;
        let mut bob = srv.online("bob", "laptop").await;
        let mut m = chat("bob@localhost", "hello bob");
        starling::stanza::set_attr(&mut m, "id", "m1");
        m.append_child(parse("<origin-id xmlns='urn:xmpp:sid:0' id='origin-1'/>"));
        alice.send(&m).await.unwrap();
        let got = expect_message(&mut bob).await;
        assert_eq!(body(&got).as_deref(), Some("hello bob"));
        let sid = stanza_id_by(&got, "bob@localhost");
        assert_eq!(sid.len(), 1, "one stanza-id by the recipient: {got:?}");
        assert!(got.has_child("origin-id", ns::SID), "origin-id is kept");

        // Queried right after delivery, the archive already has it, under
        // the same id.
        let a = query(&mut bob, "").await.unwrap();
        assert_eq!(a.bodies(), vec!["hello bob"]);
        assert_eq!(a.items[0].id, sid[0]);
        let fwd = &a.items[0].msg;
        assert_eq!(fwd.attr("from"), Some("alice@localhost/phone"));
        assert_eq!(fwd.attr("to"), Some("bob@localhost"));
        assert_eq!(fwd.attr("id"), Some("m1"));
        assert!(fwd.has_child("origin-id", ns::SID));
        assert!(a.complete());
        assert_eq!(a.count(), Some(1));
        assert_eq!(a.rsm("first").unwrap().attr("index"), Some("0"));
        let stamp = starling::stanza::parse_timestamp(&a.items[0].stamp).unwrap();
        assert!((starling::storage::now_micros() - stamp).abs() < 60_000_000);

        // The sender's copy is in the sender's archive, without a stanza-id
        // leaking to the recipient.
        let a = query(&mut alice, "").await.unwrap();
        assert_eq!(a.bodies(), vec!["hello bob"]);
        assert_eq!(a.items[0].msg.attr("to"), Some("bob@localhost"));
        assert_ne!(a.items[0].id, sid[0]);
        assert!(stanza_id_by(&got, "alice@localhost").is_empty());

        // The reply, the other way round.
        bob.send(&chat("alice@localhost/phone", "hi alice"))
            .await
            .unwrap();
        let got = expect_message(&mut alice).await;
        let sid = stanza_id_by(&got, "alice@localhost");
        let a = query(&mut alice, "").await.unwrap();
        assert_eq!(a.bodies(), vec!["hello bob", "hi alice"]);
        assert_eq!(a.items[1].id, sid[0]);
        srv.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn forged_stanza_ids_are_stripped() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        let mut alice = srv.online("alice", "r").await;
        let mut bob = srv.online("bob", "r").await;
        let m = parse(
            "<message xmlns='jabber:client' to='bob@localhost' type='chat'><body>trust me</body>\
             <stanza-id xmlns='urn:xmpp:sid:0' by='bob@localhost' id='forged-bob'/>\
             <stanza-id xmlns='urn:xmpp:sid:0' by='alice@localhost' id='forged-alice'/>\
             <stanza-id xmlns='urn:xmpp:sid:0' by='localhost' id='forged-server'/>\
             <stanza-id xmlns='urn:xmpp:sid:0' by='room@conference.example.org' id='foreign'/>\
             <origin-id xmlns='urn:xmpp:sid:0' id='o-1'/></message>",
        );
        alice.send(&m).await.unwrap();
        let got = expect_message(&mut bob).await;
        let ids: Vec<(String, String)> = got
            .children()
            .filter(|c| c.is("stanza-id", ns::SID))
            .map(|c| {
                (
                    c.attr("by").unwrap().to_owned(),
                    c.attr("id").unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert_eq!(
            ids[0],
            ("room@conference.example.org".into(), "foreign".into())
        );
        assert_eq!(ids[1].0, "bob@localhost");
        assert_ne!(ids[1].1, "forged-bob");
        assert_eq!(
            got.get_child("origin-id", ns::SID).unwrap().attr("id"),
            Some("o-1")
        );
        let a = query(&mut bob, "").await.unwrap();
        assert_eq!(a.items[0].id, ids[1].1);
        // The archived copy has no forged ids either.
        assert!(stanza_id_by(&a.items[0].msg, "bob@localhost").is_empty());
        srv.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn paging_forward_backward_last_page_and_flip() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        let mut alice = srv.online("alice", "r").await;
        let mut bob = srv.online("bob", "r").await;
        send_numbered(&mut alice, &mut bob, "bob@localhost", "m", 25).await;
        let nums = |a: &Answer| -> Vec<usize> {
            a.bodies().iter().map(|b| b[1..].parse().unwrap()).collect()
        };

        // Forward with RSM after.
        let p1 = query(&mut bob, &rsm(10, "")).await.unwrap();
        assert_eq!(nums(&p1), (1..=10).collect::<Vec<_>>());
        assert!(!p1.complete());
        assert_eq!(p1.first(), Some(p1.items[0].id.clone()));
        assert_eq!(p1.last(), Some(p1.items[9].id.clone()));
        assert_eq!(p1.rsm("first").unwrap().attr("index"), Some("0"));
        let p2 = query(
            &mut bob,
            &rsm(10, &format!("<after>{}</after>", p1.last().unwrap())),
        )
        .await
        .unwrap();
        assert_eq!(nums(&p2), (11..=20).collect::<Vec<_>>());
        assert!(!p2.complete());
        assert_eq!(p2.rsm("first").unwrap().attr("index"), None);
        let p3 = query(
            &mut bob,
            &rsm(10, &format!("<after>{}</after>", p2.last().unwrap())),
        )
        .await
        .unwrap();
        assert_eq!(nums(&p3), (21..=25).collect::<Vec<_>>());
        assert!(p3.complete());
        let p4 = query(
            &mut bob,
            &rsm(10, &format!("<after>{}</after>", p3.last().unwrap())),
        )
        .await
        .unwrap();
        assert!(p4.items.is_empty() && p4.complete() && p4.first().is_none());

        // Backward from the end with an empty <before/>, then RSM before.
        let b1 = query(&mut bob, &rsm(10, "<before/>")).await.unwrap();
        assert_eq!(nums(&b1), (16..=25).collect::<Vec<_>>());
        assert!(!b1.complete());
        let b2 = query(
            &mut bob,
            &rsm(10, &format!("<before>{}</before>", b1.first().unwrap())),
        )
        .await
        .unwrap();
        assert_eq!(nums(&b2), (6..=15).collect::<Vec<_>>());
        assert!(!b2.complete());
        let b3 = query(
            &mut bob,
            &rsm(10, &format!("<before>{}</before>", b2.first().unwrap())),
        )
        .await
        .unwrap();
        assert_eq!(nums(&b3), (1..=5).collect::<Vec<_>>());
        assert!(b3.complete(), "reached the start of the archive");
        assert_eq!(b3.rsm("first").unwrap().attr("index"), Some("0"));

        // The whole archive in one page: complete, with a count.
        let all = query(&mut bob, &rsm(100, "<before/>")).await.unwrap();
        assert_eq!(nums(&all), (1..=25).collect::<Vec<_>>());
        assert!(all.complete());
        assert_eq!(all.count(), Some(25));

        // flip-page: the same page, newest first; first/last unchanged.
        let f = query(&mut bob, &format!("{}<flip-page/>", rsm(10, "<before/>")))
            .await
            .unwrap();
        assert_eq!(nums(&f), (16..=25).rev().collect::<Vec<_>>());
        assert_eq!(f.first(), b1.first());
        assert_eq!(f.last(), b1.last());
        let f = query(
            &mut bob,
            &format!(
                "{}<flip-page/>",
                rsm(3, &format!("<after>{}</after>", p1.last().unwrap()))
            ),
        )
        .await
        .unwrap();
        assert_eq!(nums(&f), vec![13, 12, 11]);

        // Server maximum: a huge max is capped, without a max the default.
        let big = query(&mut bob, &rsm(100_000, "")).await.unwrap();
        assert_eq!(big.items.len(), 25);
        // RSM item count.
        let c = query(&mut bob, &rsm(0, "")).await.unwrap();
        assert!(c.items.is_empty());
        assert_eq!(c.count(), Some(25));
        srv.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn every_filter() {
    for_each_backend(|srv| async move {
        for u in ["alice", "bob", "carol"] {
            srv.add_user(u).await;
        }
        let mut alice = srv.online("alice", "r").await;
        let mut bob = srv.online("bob", "r").await;
        let mut bob2 = srv.online("bob", "other").await;
        let mut carol = srv.online("carol", "r").await;
        // alice's archive: b1 (to bob), c1 (to carol), b2 (to bob/other),
        // c2, from-b (from bob/r), self (to herself).
        alice.send(&chat("bob@localhost/r", "b1")).await.unwrap();
        expect_message(&mut bob).await;
        alice.send(&chat("carol@localhost", "c1")).await.unwrap();
        expect_message(&mut carol).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        let t_mid = starling::stanza::format_timestamp(starling::storage::now_micros());
        tokio::time::sleep(Duration::from_millis(30)).await;
        alice
            .send(&chat("bob@localhost/other", "b2"))
            .await
            .unwrap();
        expect_message(&mut bob2).await;
        alice.send(&chat("carol@localhost", "c2")).await.unwrap();
        expect_message(&mut carol).await;
        bob.send(&chat("alice@localhost", "from-b")).await.unwrap();
        expect_message(&mut alice).await;
        alice.send(&chat("alice@localhost", "self")).await.unwrap();
        expect(&mut alice, "self message", |e| {
            body(e).as_deref() == Some("self")
        })
        .await;

        let all = query(&mut alice, "").await.unwrap();
        assert_eq!(all.bodies(), ["b1", "c1", "b2", "c2", "from-b", "self"]);
        let id = |b: &str| all.items.iter().find(|i| i.body() == b).unwrap().id.clone();

        // with: bare matches every resource and both directions.
        let a = query(&mut alice, &form(&[("with", "bob@localhost")]))
            .await
            .unwrap();
        assert_eq!(a.bodies(), ["b1", "b2", "from-b"]);
        assert!(a.complete());
        // with: a full JID matches that resource only.
        let a = query(&mut alice, &form(&[("with", "bob@localhost/other")]))
            .await
            .unwrap();
        assert_eq!(a.bodies(), ["b2"]);
        let a = query(&mut alice, &form(&[("with", "bob@localhost/r")]))
            .await
            .unwrap();
        assert_eq!(a.bodies(), ["b1", "from-b"]);
        // with: one's own JID gives the messages to oneself only.
        let a = query(&mut alice, &form(&[("with", "alice@localhost")]))
            .await
            .unwrap();
        assert_eq!(a.bodies(), ["self"]);
        let a = query(&mut alice, &form(&[("with", "nobody@localhost")]))
            .await
            .unwrap();
        assert!(a.items.is_empty() && a.complete());

        // start / end (inclusive) by the delay stamps.
        let a = query(&mut alice, &form(&[("start", &t_mid)]))
            .await
            .unwrap();
        assert_eq!(a.bodies(), ["b2", "c2", "from-b", "self"]);
        let a = query(&mut alice, &form(&[("end", &t_mid)])).await.unwrap();
        assert_eq!(a.bodies(), ["b1", "c1"]);
        let b2_stamp = all.items[2].stamp.clone();
        let a = query(
            &mut alice,
            &form(&[("start", &b2_stamp), ("end", &b2_stamp)]),
        )
        .await
        .unwrap();
        // Everything stamped in that millisecond (at least b2).
        let same_ms: Vec<String> = all
            .items
            .iter()
            .filter(|i| i.stamp == b2_stamp)
            .map(Item::body)
            .collect();
        assert!(same_ms.contains(&"b2".to_string()));
        assert_eq!(a.bodies(), same_ms);
        let a = query(
            &mut alice,
            &form(&[
                ("start", "2000-01-01T00:00:00Z"),
                ("end", "2000-01-02T00:00:00Z"),
            ]),
        )
        .await
        .unwrap();
        assert!(a.items.is_empty());
        // with + start combined, with paging.
        let a = query(
            &mut alice,
            &format!(
                "{}{}",
                form(&[("with", "bob@localhost"), ("start", &t_mid)]),
                rsm(1, "")
            ),
        )
        .await
        .unwrap();
        assert_eq!(a.bodies(), ["b2"]);
        assert!(!a.complete());
        let a = query(
            &mut alice,
            &format!(
                "{}{}",
                form(&[("with", "bob@localhost"), ("start", &t_mid)]),
                rsm(1, &format!("<after>{}</after>", a.last().unwrap()))
            ),
        )
        .await
        .unwrap();
        assert_eq!(a.bodies(), ["from-b"]);
        assert!(a.complete());

        // after-id / before-id (exclusive), alone and together.
        let a = query(&mut alice, &form(&[("after-id", &id("c2"))]))
            .await
            .unwrap();
        assert_eq!(a.bodies(), ["from-b", "self"]);
        let a = query(&mut alice, &form(&[("before-id", &id("c1"))]))
            .await
            .unwrap();
        assert_eq!(a.bodies(), ["b1"]);
        let a = query(
            &mut alice,
            &form(&[("after-id", &id("b1")), ("before-id", &id("from-b"))]),
        )
        .await
        .unwrap();
        assert_eq!(a.bodies(), ["c1", "b2", "c2"]);
        // before-id does not mean paging backwards: the first page comes.
        let a = query(
            &mut alice,
            &format!("{}{}", form(&[("before-id", &id("self"))]), rsm(2, "")),
        )
        .await
        .unwrap();
        assert_eq!(a.bodies(), ["b1", "c1"]);

        // ids: exactly those, in archive order.
        let a = query(&mut alice, &form(&[("ids", &id("c2")), ("ids", &id("b1"))]))
            .await
            .unwrap();
        assert_eq!(a.bodies(), ["b1", "c2"]);
        assert!(a.complete());
        let a = query(
            &mut alice,
            &form(&[
                ("ids", &id("c2")),
                ("ids", &id("b1")),
                ("with", "carol@localhost"),
            ]),
        )
        .await
        .unwrap();
        assert_eq!(a.bodies(), ["c2"]);

        // Unknown ids anywhere: item-not-found.
        let other = query(&mut bob, "").await.unwrap().items[0].id.clone();
        let mut forged_tag = id("b1");
        forged_tag.replace_range(19..20, if forged_tag.ends_with('0') { "1" } else { "0" });
        for bad in ["nonsense", other.as_str(), forged_tag.as_str()] {
            for inner in [
                form(&[("after-id", bad)]),
                form(&[("before-id", bad)]),
                form(&[("ids", &id("b1")), ("ids", bad)]),
                rsm(5, &format!("<after>{bad}</after>")),
                rsm(5, &format!("<before>{bad}</before>")),
            ] {
                assert_eq!(
                    query(&mut alice, &inner).await.unwrap_err(),
                    "item-not-found",
                    "{inner}"
                );
            }
        }
        // Bad forms.
        assert_eq!(
            query(&mut alice, &form(&[("start", "last tuesday")]))
                .await
                .unwrap_err(),
            "bad-request"
        );
        assert_eq!(
            query(&mut alice, &form(&[("{urn:example}fulltext", "x")]))
                .await
                .unwrap_err(),
            "feature-not-implemented"
        );
        let a = query(&mut alice, &form(&[("include-groupchat", "false")]))
            .await
            .unwrap();
        assert_eq!(a.items.len(), 6);
        srv.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn archive_receiving_messages_while_being_paged() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        let mut alice = srv.online("alice", "r").await;
        let mut bob = srv.online("bob", "r").await;
        send_numbered(&mut alice, &mut bob, "bob@localhost", "m", 10).await;
        let mut seen: Vec<String> = Vec::new();
        let mut ids: Vec<String> = Vec::new();
        let mut after: Option<String> = None;
        let mut sent = 10;
        loop {
            let extra = after
                .as_ref()
                .map(|a| format!("<after>{a}</after>"))
                .unwrap_or_default();
            let page = query(&mut bob, &rsm(4, &extra)).await.unwrap();
            seen.extend(page.bodies());
            ids.extend(page.items.iter().map(|i| i.id.clone()));
            if let Some(l) = page.last() {
                after = Some(l);
            }
            // Three new messages arrive between pages, until 25.
            if sent < 25 {
                for _ in 0..3 {
                    sent += 1;
                    alice
                        .send(&chat("bob@localhost", &format!("m{sent}")))
                        .await
                        .unwrap();
                    let want = format!("m{sent}");
                    expect(&mut bob, &want, |e| {
                        body(e).as_deref() == Some(want.as_str())
                    })
                    .await;
                }
            } else if page.complete() {
                break;
            }
        }
        let want: Vec<String> = (1..=25).map(|i| format!("m{i}")).collect();
        assert_eq!(seen, want, "every message once, in order");
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, ids, "ids are unique and sort like the archive");
        srv.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn preferences_decide_what_is_archived() {
    for_each_backend(|srv| async move {
        for u in ["alice", "bob", "carol"] {
            srv.add_user(u).await;
        }
        let mut alice = srv.online("alice", "r").await;
        let mut bob = srv.online("bob", "r").await;
        let mut carol = srv.online("carol", "r").await;

        let get = parse("<iq xmlns='jabber:client' type='get'><prefs xmlns='urn:xmpp:mam:2'/></iq>");
        let r = bob.iq(get.clone()).await.unwrap();
        let p = r.get_child("prefs", ns::MAM).unwrap();
        assert_eq!(p.attr("default"), Some("always"));

        // bob: archive nothing, except with carol.
        let set = parse(
            "<iq xmlns='jabber:client' type='set'><prefs xmlns='urn:xmpp:mam:2' default='never'>\
             <always><jid>carol@localhost</jid></always><never/></prefs></iq>",
        );
        let r = bob.iq(set).await.unwrap();
        assert_eq!(r.attr("type"), Some("result"));
        let p = r.get_child("prefs", ns::MAM).unwrap();
        assert_eq!(p.attr("default"), Some("never"));
        let r = bob.iq(get.clone()).await.unwrap();
        let p = r.get_child("prefs", ns::MAM).unwrap();
        assert_eq!(p.attr("default"), Some("never"));
        let always: Vec<String> = p
            .get_child("always", ns::MAM)
            .unwrap()
            .children()
            .map(|j| j.text())
            .collect();
        assert_eq!(always, ["carol@localhost"]);

        alice.send(&chat("bob@localhost", "not kept")).await.unwrap();
        let got = expect_message(&mut bob).await;
        assert!(stanza_id_by(&got, "bob@localhost").is_empty(), "not archived: no stanza-id");
        carol.send(&chat("bob@localhost", "kept")).await.unwrap();
        let got = expect_message(&mut bob).await;
        assert_eq!(stanza_id_by(&got, "bob@localhost").len(), 1);
        bob.send(&chat("alice@localhost", "reply not kept")).await.unwrap();
        expect_message(&mut alice).await;
        let a = query(&mut bob, "").await.unwrap();
        assert_eq!(a.bodies(), ["kept"]);
        // alice's own archive follows alice's preferences (default always).
        let a = query(&mut alice, "").await.unwrap();
        assert_eq!(a.bodies(), ["not kept", "reply not kept"]);

        // A full JID in the never list excludes that resource only.
        let set = parse(
            "<iq xmlns='jabber:client' type='set'><prefs xmlns='urn:xmpp:mam:2' default='always'>\
             <always/><never><jid>carol@localhost/r</jid></never></prefs></iq>",
        );
        assert_eq!(bob.iq(set).await.unwrap().attr("type"), Some("result"));
        carol.send(&chat("bob@localhost", "from carol/r")).await.unwrap();
        expect_message(&mut bob).await;
        alice.send(&chat("bob@localhost", "from alice")).await.unwrap();
        expect_message(&mut bob).await;
        let a = query(&mut bob, "").await.unwrap();
        assert_eq!(a.bodies(), ["kept", "from alice"]);

        // Bad preferences.
        let bad = parse("<iq xmlns='jabber:client' type='set'><prefs xmlns='urn:xmpp:mam:2' default='sometimes'/></iq>");
        let r = bob.iq(bad).await.unwrap();
        assert_eq!(stanza_error_condition(&r).as_deref(), Some("bad-request"));
        srv.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn what_is_and_is_not_archived() {
    let srv = TestServer::start().await;
    srv.add_user("alice").await;
    srv.add_user("bob").await;
    let mut alice = srv.online("alice", "r").await;
    let mut bob = srv.online("bob", "r").await;
    let sends = [
        "<message xmlns='jabber:client' to='bob@localhost' type='chat'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>",
        "<message xmlns='jabber:client' to='bob@localhost' type='chat'><received xmlns='urn:xmpp:receipts' id='x'/></message>",
        "<message xmlns='jabber:client' to='bob@localhost' type='headline'><body>news</body></message>",
        "<message xmlns='jabber:client' to='bob@localhost' type='chat'><body>secret</body><no-permanent-store xmlns='urn:xmpp:hints'/></message>",
        "<message xmlns='jabber:client' to='bob@localhost' type='chat'><displayed xmlns='urn:xmpp:chat-markers:0' id='x'/></message>",
        "<message xmlns='jabber:client' to='bob@localhost'><body>normal</body></message>",
    ];
    for s in sends {
        alice.send(&parse(s)).await.unwrap();
    }
    for _ in 0..sends.len() {
        expect_message(&mut bob).await;
    }
    let a = query(&mut bob, "").await.unwrap();
    assert_eq!(a.items.len(), 2, "{:?}", a.items);
    assert!(a.items[0].msg.has_child("displayed", ns::CHAT_MARKERS));
    assert_eq!(a.items[1].body(), "normal");
    srv.shutdown().await;
}

#[tokio::test]
async fn form_metadata_disco_access_and_mam1() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        let mut alice = srv.online("alice", "r").await;
        let mut bob = srv.online("bob", "r").await;

        let r = alice
            .iq(parse("<iq xmlns='jabber:client' type='get'><query xmlns='urn:xmpp:mam:2'/></iq>"))
            .await
            .unwrap();
        let x = r
            .get_child("query", ns::MAM)
            .and_then(|q| q.get_child("x", ns::DATA_FORMS))
            .unwrap();
        assert_eq!(x.attr("type"), Some("form"));
        let vars: Vec<&str> = x.children().filter_map(|f| f.attr("var")).collect();
        for v in ["FORM_TYPE", "with", "start", "end", "before-id", "after-id", "ids"] {
            assert!(vars.contains(&v), "{v} in {vars:?}");
        }

        // Empty archive metadata, then with messages.
        let meta = parse("<iq xmlns='jabber:client' type='get'><metadata xmlns='urn:xmpp:mam:2'/></iq>");
        let r = alice.iq(meta.clone()).await.unwrap();
        assert_eq!(r.get_child("metadata", ns::MAM).unwrap().children().count(), 0);
        send_numbered(&mut alice, &mut bob, "bob@localhost", "x", 3).await;
        let r = alice.iq(meta).await.unwrap();
        let m = r.get_child("metadata", ns::MAM).unwrap();
        let all = query(&mut alice, "").await.unwrap();
        assert_eq!(m.get_child("start", ns::MAM).unwrap().attr("id"), Some(all.items[0].id.as_str()));
        assert_eq!(m.get_child("end", ns::MAM).unwrap().attr("id"), Some(all.items[2].id.as_str()));
        assert_eq!(
            m.get_child("end", ns::MAM).unwrap().attr("timestamp"),
            Some(all.items[2].stamp.as_str())
        );

        // Features on the account.
        let r = alice
            .iq(parse("<iq xmlns='jabber:client' type='get' to='alice@localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"))
            .await
            .unwrap();
        let feats: Vec<String> = r
            .get_child("query", ns::DISCO_INFO)
            .unwrap()
            .children()
            .filter_map(|f| f.attr("var").map(str::to_owned))
            .collect();
        for f in ["urn:xmpp:mam:2", "urn:xmpp:mam:2#extended", "urn:xmpp:sid:0", "urn:xmpp:mam:1"] {
            assert!(feats.iter().any(|x| x == f), "{f} in {feats:?}");
        }

        // Someone else's archive is forbidden; the server has none.
        let r = alice
            .iq(parse("<iq xmlns='jabber:client' type='set' to='bob@localhost'><query xmlns='urn:xmpp:mam:2'/></iq>"))
            .await
            .unwrap();
        assert_eq!(stanza_error_condition(&r).as_deref(), Some("forbidden"));
        let r = alice
            .iq(parse("<iq xmlns='jabber:client' type='set' to='localhost'><query xmlns='urn:xmpp:mam:2'/></iq>"))
            .await
            .unwrap();
        assert_eq!(stanza_error_condition(&r).as_deref(), Some("service-unavailable"));

        // mam:1 answers in its own namespace.
        let a = query_ns(&mut alice, ns::MAM1, &rsm(2, "")).await.unwrap();
        assert_eq!(a.bodies(), ["x1", "x2"]);
        assert!(!a.complete());
        srv.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn retention_expires_old_messages() {
    for store in testing::stores().await {
        eprintln!("-- backend {}", store.backend_name());
        let srv = TestServer::start_on(store, |cfg| {
            cfg.archive.retention = "2s".into();
            cfg.archive.expiry_interval_secs = 1;
        })
        .await;
        srv.add_user("alice").await;
        srv.add_user("bob").await;
        // alice keeps her history forever; bob has the server default.
        srv.server()
            .store
            .set_archive_retention("alice@localhost", Some(0))
            .await
            .unwrap();
        let mut alice = srv.online("alice", "r").await;
        let mut bob = srv.online("bob", "r").await;
        send_numbered(&mut alice, &mut bob, "bob@localhost", "old", 3).await;
        assert_eq!(query(&mut bob, "").await.unwrap().items.len(), 3);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let a = query(&mut bob, "").await.unwrap();
            if a.items.is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "bob's messages never expired"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // A new message is kept while the old ones are gone.
        send_numbered(&mut alice, &mut bob, "bob@localhost", "new", 1).await;
        assert_eq!(query(&mut bob, "").await.unwrap().bodies(), ["new1"]);
        assert_eq!(query(&mut alice, "").await.unwrap().items.len(), 4);
        srv.shutdown().await;
    }
}
