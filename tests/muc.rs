//! Multi-user chat (XEP-0045): the occupant use cases, with several real
//! clients against an in-process server, on every store backend.

mod common;
mod muc_support;

use common::*;
use muc_support::*;

#[tokio::test]
async fn service_and_room_discovery() {
    for_each_backend(|srv| async move {
        srv.add_user("alice").await;
        let mut alice = srv.online("alice", "a").await;
        // The server lists the service (XEP-0045 6.1).
        let items = iq_ok(
            &mut alice,
            "<iq xmlns='jabber:client' type='get' to='localhost'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>",
        )
        .await;
        let q = items.children().next().unwrap();
        assert!(q.children().any(|i| i.attr("jid") == Some(MUC)));
        // The service: identity conference/text and the MUC feature (6.2).
        let info = iq_ok(
            &mut alice,
            &format!("<iq xmlns='jabber:client' type='get' to='{MUC}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"),
        )
        .await;
        let q = info.children().next().unwrap();
        let id = q.children().find(|c| c.name() == "identity").unwrap();
        assert_eq!(id.attr("category"), Some("conference"));
        assert_eq!(id.attr("type"), Some("text"));
        let f = features(&mut alice, MUC).await;
        assert!(f.contains(&MUC_NS.to_string()));
        assert!(f.contains(&"urn:xmpp:occupant-id:0".to_string()));

        // A public and a hidden room; only the public one is listed (6.3).
        create_with(&mut alice, &room("lobby"), "alice", &[("muc#roomconfig_roomname", &["The Lobby"])]).await;
        create_with(&mut alice, &room("secret"), "alice", &[("muc#roomconfig_publicroom", &["0"])]).await;
        let items = iq_ok(
            &mut alice,
            &format!("<iq xmlns='jabber:client' type='get' to='{MUC}'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>"),
        )
        .await;
        let listed: Vec<(String, String)> = items
            .children()
            .next()
            .unwrap()
            .children()
            .filter(|i| i.name() == "item")
            .map(|i| (i.attr("jid").unwrap().to_owned(), i.attr("name").unwrap_or("").to_owned()))
            .collect();
        assert_eq!(listed, vec![(room("lobby"), "The Lobby".to_string())]);
        // RSM paging of the room list.
        let paged = iq_ok(
            &mut alice,
            &format!("<iq xmlns='jabber:client' type='get' to='{MUC}'><query xmlns='http://jabber.org/protocol/disco#items'>\
                      <set xmlns='http://jabber.org/protocol/rsm'><max>0</max></set></query></iq>"),
        )
        .await;
        let set = paged.children().next().unwrap().get_child("set", "http://jabber.org/protocol/rsm").unwrap();
        assert_eq!(set.get_child("count", "http://jabber.org/protocol/rsm").unwrap().text(), "1");

        // Room info: muc_* features, MUC extensions, the roominfo form (6.4).
        let f = features(&mut alice, &room("lobby")).await;
        for want in [
            "http://jabber.org/protocol/muc",
            "http://jabber.org/protocol/muc#stable_id",
            "http://jabber.org/protocol/muc#self-ping-optimization",
            "urn:xmpp:occupant-id:0",
            "urn:xmpp:mam:2",
            "urn:xmpp:sid:0",
            "muc_public",
            "muc_temporary",
            "muc_open",
            "muc_unmoderated",
            "muc_semianonymous",
            "muc_unsecured",
        ] {
            assert!(f.contains(&want.to_string()), "missing {want} in {f:?}");
        }
        let info = iq_ok(
            &mut alice,
            &format!("<iq xmlns='jabber:client' type='get' to='{}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", room("lobby")),
        )
        .await;
        let form = info.children().next().unwrap().get_child("x", "jabber:x:data").unwrap();
        let occupants = form
            .children()
            .find(|f| f.attr("var") == Some("muc#roominfo_occupants"))
            .unwrap();
        assert_eq!(occupants.children().next().unwrap().text(), "1");
        // Occupants are listed to occupants only.
        let items = iq_ok(
            &mut alice,
            &format!("<iq xmlns='jabber:client' type='get' to='{}'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>", room("lobby")),
        )
        .await;
        assert_eq!(items.children().next().unwrap().children().count(), 1);
        // A room that does not exist.
        assert_eq!(
            iq_err(
                &mut alice,
                &format!("<iq xmlns='jabber:client' type='get' to='{}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", room("nowhere")),
            )
            .await,
            "item-not-found"
        );
    })
    .await;
}

#[tokio::test]
async fn create_join_talk_and_leave() {
    for_each_backend(|srv| async move {
        for u in ["alice", "bob", "carol"] {
            srv.add_user(u).await;
        }
        let mut alice = srv.online("alice", "a").await;
        let mut bob = srv.online("bob", "b").await;
        let mut carol = srv.online("carol", "c").await;
        let r = room("talk");
        // Creation: 201 + 110, owner and moderator (10.1.1).
        let p = join(&mut alice, &r, "Alice").await;
        assert_eq!(codes(&p), vec![110, 170, 201]);
        assert_eq!(aff_role(&p), ("owner".into(), "moderator".into()));
        assert_eq!(item(&p).attr("jid"), Some("alice@localhost/a"), "self-presence shows the own JID");
        // Locked until configured (7.2.10).
        assert_eq!(join_error(&mut bob, &r, "Bob", "").await, "item-not-found");
        configure(&mut alice, &r, &[]).await;

        // Bob enters: first Alice's presence, then his own (7.2.3), which
        // reflects the id of his join.
        bob.send_str(&format!("<presence id='join-1' to='{r}/Bob'><x xmlns='{MUC_NS}'/></presence>"))
            .await
            .unwrap();
        let first = expect(&mut bob, "presence", |e| e.name() == "presence").await;
        assert_eq!(first.attr("from"), Some(format!("{r}/Alice").as_str()));
        assert_eq!(aff_role(&first), ("owner".into(), "moderator".into()));
        assert!(item(&first).attr("jid").is_none(), "semi-anonymous: no real JID for participants");
        let own = expect(&mut bob, "presence", |e| e.name() == "presence").await;
        assert_eq!(own.attr("from"), Some(format!("{r}/Bob").as_str()));
        assert_eq!(codes(&own), vec![110, 170]);
        assert_eq!(own.attr("id"), Some("join-1"));
        assert_eq!(aff_role(&own), ("none".into(), "participant".into()));
        // Then the (empty) subject.
        let s = subject(&mut bob, &r).await;
        assert_eq!(s.get_child("subject", "jabber:client").unwrap().text(), "");
        // Alice (a moderator) sees Bob's real JID.
        let pb = presence_from(&mut alice, &format!("{r}/Bob")).await;
        assert_eq!(item(&pb).attr("jid"), Some("bob@localhost/b"));
        assert!(occupant_id(&pb).is_some());

        // A message to everyone, reflected with the same id (7.4).
        let mut m = groupchat(&r, "hello room");
        starling::stanza::set_attr(&mut m, "id", "m1");
        bob.send(&m).await.unwrap();
        for c in [&mut alice, &mut bob] {
            let got = expect_groupchat(c, "hello room").await;
            assert_eq!(got.attr("from"), Some(format!("{r}/Bob").as_str()));
            assert_eq!(got.attr("id"), Some("m1"));
            let sid = got.get_child("stanza-id", "urn:xmpp:sid:0").unwrap();
            assert_eq!(sid.attr("by"), Some(r.as_str()));
            assert_eq!(occupant_id(&got), occupant_id(&pb));
        }
        // A non-occupant cannot send to the room.
        carol.send(&groupchat(&r, "intruder")).await.unwrap();
        assert_eq!(error_message(&mut carol, &r).await, "not-acceptable");

        // Bob leaves with a status (7.14).
        bob.send_str(&format!("<presence to='{r}/Bob' type='unavailable'><status>bye</status></presence>"))
            .await
            .unwrap();
        let own = unavailable_from(&mut bob, &format!("{r}/Bob")).await;
        assert_eq!(codes(&own), vec![110]);
        let seen = unavailable_from(&mut alice, &format!("{r}/Bob")).await;
        assert_eq!(aff_role(&seen), ("none".into(), "none".into()));
        assert_eq!(seen.get_child("status", "jabber:client").unwrap().text(), "bye");
        assert!(codes(&seen).is_empty());
        // The last occupant leaves: the temporary room vanishes.
        alice.send_str(&format!("<presence to='{r}/Alice' type='unavailable'/>")).await.unwrap();
        unavailable_from(&mut alice, &format!("{r}/Alice")).await;
        let mut gone = false;
        for _ in 0..50 {
            let reply = alice
                .iq(parse(&format!(
                    "<iq xmlns='jabber:client' type='get' to='{r}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"
                )))
                .await
                .unwrap();
            if reply.attr("type") == Some("error") {
                assert_eq!(err_cond(&reply), "item-not-found");
                gone = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(gone, "temporary room destroyed when empty");
    })
    .await;
}

#[tokio::test]
async fn non_anonymous_rooms_show_jids() {
    for_each_backend(|srv| async move {
        for u in ["alice", "bob", "carol"] {
            srv.add_user(u).await;
        }
        let mut alice = srv.online("alice", "a").await;
        let mut bob = srv.online("bob", "b").await;
        let mut carol = srv.online("carol", "c").await;
        let r = room("open");
        create_with(
            &mut alice,
            &r,
            "alice",
            &[("muc#roomconfig_whois", &["anyone"])],
        )
        .await;
        let own = join(&mut bob, &r, "bob").await;
        assert!(codes(&own).contains(&100), "non-anonymous warning");
        send_join(&mut carol, &r, "carol", "").await;
        let seen_bob = presence_from(&mut carol, &format!("{r}/bob")).await;
        assert_eq!(item(&seen_bob).attr("jid"), Some("bob@localhost/b"));
        self_presence(&mut carol, &r, "carol").await;
        let seen_carol = presence_from(&mut bob, &format!("{r}/carol")).await;
        assert_eq!(item(&seen_carol).attr("jid"), Some("carol@localhost/c"));
        // Becoming semi-anonymous is announced with 173 (and 104).
        configure(&mut alice, &r, &[("muc#roomconfig_whois", &["moderators"])]).await;
        let notice = expect(&mut bob, "config notice", |e| {
            e.name() == "message" && codes(e).contains(&104)
        })
        .await;
        assert_eq!(notice.attr("from"), Some(r.as_str()));
        assert!(codes(&notice).contains(&173));
    })
    .await;
}

#[tokio::test]
async fn history_on_join() {
    for_each_backend(|srv| async move {
        for u in ["alice", "bob"] {
            srv.add_user(u).await;
        }
        let mut alice = srv.online("alice", "a").await;
        let r = room("hist");
        create_instant(&mut alice, &r, "alice").await;
        for i in 1..=5 {
            alice.send(&groupchat(&r, &format!("m{i}"))).await.unwrap();
            expect_groupchat(&mut alice, &format!("m{i}")).await;
        }
        // A chat state is reflected but not kept as history.
        alice
            .send_str(&format!("<message to='{r}' type='groupchat'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>"))
            .await
            .unwrap();
        alice
            .send_str(&format!("<message to='{r}' type='groupchat'><subject>Topic</subject></message>"))
            .await
            .unwrap();
        expect(&mut alice, "subject echo", |e| e.has_child("subject", "jabber:client")).await;

        let mut bob = srv.online("bob", "b1").await;
        send_join(&mut bob, &r, "bob", "<history maxstanzas='2'/>").await;
        self_presence(&mut bob, &r, "bob").await;
        // History (oldest first, delayed by the room), then the subject.
        let h1 = expect(&mut bob, "history", |e| e.name() == "message").await;
        let h2 = expect(&mut bob, "history", |e| e.name() == "message").await;
        let s = expect(&mut bob, "subject", |e| e.name() == "message").await;
        assert_eq!(body(&h1).as_deref(), Some("m4"));
        assert_eq!(body(&h2).as_deref(), Some("m5"));
        for h in [&h1, &h2] {
            let d = h.get_child("delay", "urn:xmpp:delay").unwrap();
            assert_eq!(d.attr("from"), Some(r.as_str()));
            assert!(d.attr("stamp").is_some());
            assert_eq!(h.attr("from"), Some(format!("{r}/alice").as_str()));
        }
        assert_eq!(s.get_child("subject", "jabber:client").unwrap().text(), "Topic");
        assert_eq!(s.attr("from"), Some(format!("{r}/alice").as_str()));
        assert!(s.has_child("delay", "urn:xmpp:delay"));

        // maxchars='0': no history; the subject still comes.
        let mut bob2 = srv.online("bob", "b2").await;
        send_join(&mut bob2, &r, "bob2", "<history maxchars='0'/>").await;
        self_presence(&mut bob2, &r, "bob2").await;
        let next = expect(&mut bob2, "subject", |e| e.name() == "message").await;
        assert!(next.has_child("subject", "jabber:client"));

        // Without the MUC <x/>: a join, but no history.
        let mut bob3 = srv.online("bob", "b3").await;
        bob3.send_str(&format!("<presence to='{r}/bob3'/>")).await.unwrap();
        self_presence(&mut bob3, &r, "bob3").await;
        let next = expect(&mut bob3, "subject", |e| e.name() == "message").await;
        assert!(next.has_child("subject", "jabber:client"), "no history without <x/>");

        // Default: everything up to the default count; 'since' filters by time.
        let mut bob4 = srv.online("bob", "b4").await;
        send_join(&mut bob4, &r, "bob4", "<history since='2999-01-01T00:00:00Z'/>").await;
        self_presence(&mut bob4, &r, "bob4").await;
        let next = expect(&mut bob4, "subject", |e| e.name() == "message").await;
        assert!(next.has_child("subject", "jabber:client"));
        let mut bob5 = srv.online("bob", "b5").await;
        send_join(&mut bob5, &r, "bob5", "").await;
        self_presence(&mut bob5, &r, "bob5").await;
        for i in 1..=5 {
            let h = expect(&mut bob5, "history", |e| e.name() == "message").await;
            assert_eq!(body(&h), Some(format!("m{i}")));
        }
    })
    .await;
}

#[tokio::test]
async fn subject_changes() {
    for_each_backend(|srv| async move {
        for u in ["alice", "bob"] {
            srv.add_user(u).await;
        }
        let mut alice = srv.online("alice", "a").await;
        let mut bob = srv.online("bob", "b").await;
        let r = room("topic");
        create_instant(&mut alice, &r, "alice").await;
        join(&mut bob, &r, "bob").await;
        // A participant may not change the subject by default.
        bob.send_str(&format!("<message to='{r}' type='groupchat'><subject>mine</subject></message>"))
            .await
            .unwrap();
        assert_eq!(error_message(&mut bob, &r).await, "forbidden");
        alice
            .send_str(&format!("<message to='{r}' type='groupchat' id='s1'><subject>Deploy at 5</subject></message>"))
            .await
            .unwrap();
        for c in [&mut alice, &mut bob] {
            let s = expect(c, "subject", |e| e.has_child("subject", "jabber:client")).await;
            assert_eq!(s.get_child("subject", "jabber:client").unwrap().text(), "Deploy at 5");
            assert_eq!(s.attr("from"), Some(format!("{r}/alice").as_str()));
        }
        // With muc#roomconfig_changesubject participants may.
        configure(&mut alice, &r, &[("muc#roomconfig_changesubject", &["1"])]).await;
        bob.send_str(&format!("<message to='{r}' type='groupchat'><subject>Bob's topic</subject></message>"))
            .await
            .unwrap();
        let s = expect(&mut alice, "subject", |e| {
            e.get_child("subject", "jabber:client").map(|s| s.text()) == Some("Bob's topic".into())
        })
        .await;
        assert_eq!(s.attr("from"), Some(format!("{r}/bob").as_str()));
        // A message with subject and body is a message, not a subject change.
        alice
            .send_str(&format!("<message to='{r}' type='groupchat'><subject>x</subject><body>both</body></message>"))
            .await
            .unwrap();
        expect_groupchat(&mut alice, "both").await;
        let info = iq_ok(
            &mut alice,
            &format!("<iq xmlns='jabber:client' type='get' to='{r}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"),
        )
        .await;
        let form = info.children().next().unwrap().get_child("x", "jabber:x:data").unwrap();
        let subj = form.children().find(|f| f.attr("var") == Some("muc#roominfo_subject")).unwrap();
        assert_eq!(subj.children().next().unwrap().text(), "Bob's topic");
    })
    .await;
}

#[tokio::test]
async fn nickname_changes() {
    for_each_backend(|srv| async move {
        for u in ["alice", "bob"] {
            srv.add_user(u).await;
        }
        let mut alice = srv.online("alice", "a").await;
        let mut bob = srv.online("bob", "b").await;
        let r = room("nicks");
        create_instant(&mut alice, &r, "alice").await;
        join(&mut bob, &r, "bob").await;
        // Taken nick: conflict.
        bob.send_str(&format!("<presence to='{r}/alice'/>"))
            .await
            .unwrap();
        let e = expect(&mut bob, "error", |e| e.attr("type") == Some("error")).await;
        assert_eq!(err_cond(&e), "conflict");
        // 303 then the new presence (7.6).
        bob.send_str(&format!("<presence to='{r}/robert'/>"))
            .await
            .unwrap();
        for (c, own) in [(&mut alice, false), (&mut bob, true)] {
            let u = unavailable_from(c, &format!("{r}/bob")).await;
            assert!(codes(&u).contains(&303));
            assert_eq!(codes(&u).contains(&110), own);
            assert_eq!(item(&u).attr("nick"), Some("robert"));
            let a = presence_from(c, &format!("{r}/robert")).await;
            assert_ne!(a.attr("type"), Some("unavailable"));
            assert_eq!(codes(&a).contains(&110), own);
        }
        bob.send(&groupchat(&r, "as robert")).await.unwrap();
        let m = expect_groupchat(&mut alice, "as robert").await;
        assert_eq!(m.attr("from"), Some(format!("{r}/robert").as_str()));
        // Presence updates are reflected.
        bob.send_str(&format!(
            "<presence to='{r}/robert'><show>away</show></presence>"
        ))
        .await
        .unwrap();
        let p = presence_from(&mut alice, &format!("{r}/robert")).await;
        assert_eq!(p.get_child("show", "jabber:client").unwrap().text(), "away");
    })
    .await;
}

#[tokio::test]
async fn private_messages() {
    for_each_backend(|srv| async move {
        for u in ["alice", "bob", "carol"] {
            srv.add_user(u).await;
        }
        let mut alice = srv.online("alice", "a").await;
        let mut bob = srv.online("bob", "b").await;
        let mut carol = srv.online("carol", "c").await;
        let r = room("pm");
        create_instant(&mut alice, &r, "alice").await;
        join(&mut bob, &r, "bob").await;
        bob.send_str(&format!(
            "<message to='{r}/alice' type='chat' id='p1'><body>psst</body></message>"
        ))
        .await
        .unwrap();
        let pm = expect(&mut alice, "pm", |e| body(e).as_deref() == Some("psst")).await;
        assert_eq!(pm.attr("from"), Some(format!("{r}/bob").as_str()));
        assert_eq!(pm.attr("type"), Some("chat"));
        assert_eq!(pm.attr("id"), Some("p1"));
        assert!(pm.has_child("x", MUC_USER));
        // groupchat to an occupant: bad-request.
        bob.send_str(&format!(
            "<message to='{r}/alice' type='groupchat'><body>x</body></message>"
        ))
        .await
        .unwrap();
        assert_eq!(
            error_message(&mut bob, &format!("{r}/alice")).await,
            "bad-request"
        );
        // No such occupant.
        bob.send_str(&format!(
            "<message to='{r}/nobody' type='chat'><body>x</body></message>"
        ))
        .await
        .unwrap();
        assert_eq!(
            error_message(&mut bob, &format!("{r}/nobody")).await,
            "item-not-found"
        );
        // Not an occupant.
        carol
            .send_str(&format!(
                "<message to='{r}/alice' type='chat'><body>x</body></message>"
            ))
            .await
            .unwrap();
        assert_eq!(
            error_message(&mut carol, &format!("{r}/alice")).await,
            "not-acceptable"
        );
        // Private messages switched off.
        configure(&mut alice, &r, &[("muc#roomconfig_allowpm", &["none"])]).await;
        bob.send_str(&format!(
            "<message to='{r}/alice' type='chat'><body>x</body></message>"
        ))
        .await
        .unwrap();
        assert_eq!(
            error_message(&mut bob, &format!("{r}/alice")).await,
            "forbidden"
        );
    })
    .await;
}

#[tokio::test]
async fn entry_rules() {
    for_each_backend(|srv| async move {
        for u in ["alice", "bob", "carol", "dave"] {
            srv.add_user(u).await;
        }
        let mut alice = srv.online("alice", "a").await;
        let mut bob = srv.online("bob", "b").await;
        let mut carol = srv.online("carol", "c").await;
        let mut dave = srv.online("dave", "d").await;
        // No nickname.
        bob.send_str(&format!("<presence to='{}'><x xmlns='{MUC_NS}'/></presence>", room("x"))).await.unwrap();
        let e = expect(&mut bob, "error", |e| e.attr("type") == Some("error")).await;
        assert_eq!(err_cond(&e), "jid-malformed");
        // Password-protected (7.2.5).
        let r = room("pw");
        create_with(
            &mut alice,
            &r,
            "alice",
            &[("muc#roomconfig_passwordprotectedroom", &["1"]), ("muc#roomconfig_roomsecret", &["s3cret"])],
        )
        .await;
        assert!(features(&mut bob, &r).await.contains(&"muc_passwordprotected".to_string()));
        assert_eq!(join_error(&mut bob, &r, "bob", "").await, "not-authorized");
        assert_eq!(join_error(&mut bob, &r, "bob", "<password>nope</password>").await, "not-authorized");
        join_with(&mut bob, &r, "bob", "<password>s3cret</password>").await;
        // Nickname in use (7.2.9).
        assert_eq!(join_error(&mut carol, &r, "bob", "<password>s3cret</password>").await, "conflict");
        // Max users (7.2.10): 2 occupants already, limit 2.
        configure(&mut alice, &r, &[("muc#roomconfig_maxusers", &["2"])]).await;
        assert_eq!(
            join_error(&mut carol, &r, "carol", "<password>s3cret</password>").await,
            "service-unavailable"
        );
        // Members-only (7.2.6) and banned users (7.2.7).
        let m = room("members");
        create_with(&mut alice, &m, "alice", &[("muc#roomconfig_membersonly", &["1"])]).await;
        assert_eq!(join_error(&mut carol, &m, "carol", "").await, "registration-required");
        let r2 = admin_set(&mut alice, &m, "<item affiliation='member' jid='carol@localhost'/><item affiliation='outcast' jid='dave@localhost'/>").await;
        assert_eq!(r2.attr("type"), Some("result"));
        join(&mut carol, &m, "carol").await;
        assert_eq!(join_error(&mut dave, &m, "dave", "").await, "forbidden");
        // Room creation restricted to local users is the default: fine here.
        // Invisible nicknames are refused.
        assert_eq!(join_error(&mut dave, &room("fresh"), "   ", "").await, "not-acceptable");
    })
    .await;
}

#[tokio::test]
async fn multi_session_nicks() {
    for_each_backend(|srv| async move {
        for u in ["alice", "bob"] {
            srv.add_user(u).await;
        }
        let mut phone = srv.online("alice", "phone").await;
        let mut laptop = srv.online("alice", "laptop").await;
        let mut bob = srv.online("bob", "b").await;
        let r = room("multi");
        create_instant(&mut bob, &r, "bob").await;
        join(&mut phone, &r, "alice").await;
        presence_from(&mut bob, &format!("{r}/alice")).await;
        // A second session of the same user with the same nick is let in
        // (7.2.9), and gets the roster and its self-presence.
        send_join(&mut laptop, &r, "alice", "").await;
        presence_from(&mut laptop, &format!("{r}/bob")).await;
        self_presence(&mut laptop, &r, "alice").await;
        // Another user may not take the nick.
        let mut bob2 = srv.online("bob", "b2").await;
        assert_eq!(join_error(&mut bob2, &r, "alice", "").await, "conflict");
        // Both sessions get room messages; the nick's messages are one occupant.
        bob.send(&groupchat(&r, "to both")).await.unwrap();
        expect_groupchat(&mut phone, "to both").await;
        expect_groupchat(&mut laptop, "to both").await;
        laptop.send(&groupchat(&r, "from laptop")).await.unwrap();
        let m = expect_groupchat(&mut bob, "from laptop").await;
        assert_eq!(m.attr("from"), Some(format!("{r}/alice").as_str()));
        // Private messages reach all sessions of the nick.
        bob.send_str(&format!(
            "<message to='{r}/alice' type='chat'><body>pm both</body></message>"
        ))
        .await
        .unwrap();
        expect(&mut phone, "pm", |e| body(e).as_deref() == Some("pm both")).await;
        expect(&mut laptop, "pm", |e| body(e).as_deref() == Some("pm both")).await;
        // One session leaves: it gets its unavailable, Bob sees Alice stay.
        phone
            .send_str(&format!("<presence to='{r}/alice' type='unavailable'/>"))
            .await
            .unwrap();
        let u = unavailable_from(&mut phone, &format!("{r}/alice")).await;
        assert!(codes(&u).contains(&110));
        bob.send(&groupchat(&r, "still there?")).await.unwrap();
        let mut seen_leave = false;
        loop {
            let e = expect(&mut bob, "traffic", |_| true).await;
            if e.attr("type") == Some("unavailable") {
                seen_leave = true;
            }
            if body(&e).as_deref() == Some("still there?") {
                break;
            }
        }
        assert!(!seen_leave, "the nick stays while a session remains");
        expect_groupchat(&mut laptop, "still there?").await;
        // The last session leaves: now everyone sees the occupant go.
        laptop
            .send_str(&format!("<presence to='{r}/alice' type='unavailable'/>"))
            .await
            .unwrap();
        unavailable_from(&mut bob, &format!("{r}/alice")).await;
    })
    .await;
}

#[tokio::test]
async fn self_ping_and_disconnects() {
    for_each_backend(|srv| async move {
        for u in ["alice", "bob"] {
            srv.add_user(u).await;
        }
        let mut alice = srv.online("alice", "a").await;
        let mut bob = srv.online("bob", "b").await;
        let r = room("ping");
        create_instant(&mut alice, &r, "alice").await;
        // XEP-0410: the room answers a joined occupant itself...
        iq_ok(&mut alice, &format!("<iq xmlns='jabber:client' type='get' to='{r}/alice'><ping xmlns='urn:xmpp:ping'/></iq>")).await;
        // ...and says not-acceptable to someone not joined.
        assert_eq!(
            iq_err(&mut bob, &format!("<iq xmlns='jabber:client' type='get' to='{r}/bob'><ping xmlns='urn:xmpp:ping'/></iq>")).await,
            "not-acceptable"
        );
        join(&mut bob, &r, "bob").await;
        // A ping to another occupant goes through to that client.
        let b2 = bob.jid.clone().unwrap();
        let _ = b2;
        alice
            .send_str(&format!("<iq type='get' id='pp' to='{r}/bob'><ping xmlns='urn:xmpp:ping'/></iq>"))
            .await
            .unwrap();
        let fwd = expect(&mut bob, "forwarded ping", |e| e.name() == "iq" && e.attr("type") == Some("get")).await;
        assert_eq!(fwd.attr("from"), Some(format!("{r}/alice").as_str()), "the sender is hidden behind its occupant JID");
        bob.send(&starling::stanza::iq_result(&fwd, None)).await.unwrap();
        let back = expect(&mut alice, "ping result", |e| e.attr("id") == Some("pp")).await;
        assert_eq!(back.attr("type"), Some("result"));
        assert_eq!(back.attr("from"), Some(format!("{r}/bob").as_str()));
        // Bob's connection drops: Alice sees him leave.
        drop(bob);
        let u = unavailable_from(&mut alice, &format!("{r}/bob")).await;
        assert_eq!(aff_role(&u).1, "none");
    })
    .await;
}

#[tokio::test]
async fn invitations() {
    for_each_backend(|srv| async move {
        for u in ["alice", "bob", "carol"] {
            srv.add_user(u).await;
        }
        let mut alice = srv.online("alice", "a").await;
        let mut bob = srv.online("bob", "b").await;
        let mut carol = srv.online("carol", "c").await;
        let r = room("inv");
        create_with(
            &mut alice,
            &r,
            "alice",
            &[("muc#roomconfig_passwordprotectedroom", &["1"]), ("muc#roomconfig_roomsecret", &["pw"])],
        )
        .await;
        // Mediated invitation (7.8.2): the room adds the inviter and password.
        alice
            .send_str(&format!(
                "<message to='{r}'><x xmlns='{MUC_USER}'><invite to='bob@localhost'><reason>standup</reason></invite></x></message>"
            ))
            .await
            .unwrap();
        let inv = expect(&mut bob, "invite", |e| e.has_child("x", MUC_USER)).await;
        assert_eq!(inv.attr("from"), Some(r.as_str()));
        let x = inv.get_child("x", MUC_USER).unwrap();
        let i = x.get_child("invite", MUC_USER).unwrap();
        assert_eq!(i.attr("from"), Some("alice@localhost"));
        assert_eq!(i.get_child("reason", MUC_USER).unwrap().text(), "standup");
        assert_eq!(x.get_child("password", MUC_USER).unwrap().text(), "pw");
        // Declining goes back to the inviter.
        bob.send_str(&format!(
            "<message to='{r}'><x xmlns='{MUC_USER}'><decline to='alice@localhost'><reason>busy</reason></decline></x></message>"
        ))
        .await
        .unwrap();
        let d = expect(&mut alice, "decline", |e| {
            e.get_child("x", MUC_USER).is_some_and(|x| x.has_child("decline", MUC_USER))
        })
        .await;
        let d = d.get_child("x", MUC_USER).unwrap().get_child("decline", MUC_USER).unwrap();
        assert_eq!(d.attr("from"), Some("bob@localhost"));
        // Inviting someone who does not exist.
        alice
            .send_str(&format!("<message to='{r}'><x xmlns='{MUC_USER}'><invite to='ghost@localhost'/></x></message>"))
            .await
            .unwrap();
        assert_eq!(error_message(&mut alice, &r).await, "item-not-found");
        // Only occupants invite.
        carol
            .send_str(&format!("<message to='{r}'><x xmlns='{MUC_USER}'><invite to='bob@localhost'/></x></message>"))
            .await
            .unwrap();
        assert_eq!(error_message(&mut carol, &r).await, "not-acceptable");
        // Direct invitation (XEP-0249): user to user, then a join with the password.
        alice
            .send_str(&format!(
                "<message to='carol@localhost'><x xmlns='jabber:x:conference' jid='{r}' password='pw' reason='come'/></message>"
            ))
            .await
            .unwrap();
        let di = expect(&mut carol, "direct invite", |e| e.has_child("x", "jabber:x:conference")).await;
        let x = di.get_child("x", "jabber:x:conference").unwrap();
        assert_eq!(x.attr("jid"), Some(r.as_str()));
        assert_eq!(di.attr("from"), Some("alice@localhost/a"));
        let pw = x.attr("password").unwrap().to_owned();
        join_with(&mut carol, &r, "carol", &format!("<password>{pw}</password>")).await;
        // In a members-only room only admins invite (unless allowed), and
        // an invitation makes the invitee a member.
        let m = room("club");
        create_with(&mut alice, &m, "alice", &[("muc#roomconfig_membersonly", &["1"])]).await;
        alice
            .send_str(&format!("<message to='{m}'><x xmlns='{MUC_USER}'><invite to='carol@localhost'/></x></message>"))
            .await
            .unwrap();
        expect(&mut carol, "invite", |e| e.attr("from") == Some(m.as_str())).await;
        join(&mut carol, &m, "carol").await;
        carol
            .send_str(&format!("<message to='{m}'><x xmlns='{MUC_USER}'><invite to='bob@localhost'/></x></message>"))
            .await
            .unwrap();
        assert_eq!(error_message(&mut carol, &m).await, "forbidden");
    })
    .await;
}

#[tokio::test]
async fn voice_in_moderated_rooms() {
    for_each_backend(|srv| async move {
        for u in ["alice", "bob"] {
            srv.add_user(u).await;
        }
        let mut alice = srv.online("alice", "a").await;
        let mut bob = srv.online("bob", "b").await;
        let r = room("stage");
        create_with(&mut alice, &r, "alice", &[("muc#roomconfig_moderatedroom", &["1"])]).await;
        let own = join(&mut bob, &r, "bob").await;
        assert_eq!(aff_role(&own).1, "visitor");
        bob.send(&groupchat(&r, "can I talk?")).await.unwrap();
        assert_eq!(error_message(&mut bob, &r).await, "forbidden");
        // Voice request (7.13) -> approval form to moderators (8.6).
        bob.send_str(&format!(
            "<message to='{r}'><x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#request</value></field>\
             <field var='muc#role' type='list-single'><value>participant</value></field></x></message>"
        ))
        .await
        .unwrap();
        let form = expect(&mut alice, "approval form", |e| e.has_child("x", "jabber:x:data")).await;
        assert_eq!(form.attr("from"), Some(r.as_str()));
        let x = form.get_child("x", "jabber:x:data").unwrap();
        let nick = x.children().find(|f| f.attr("var") == Some("muc#roomnick")).unwrap();
        assert_eq!(nick.children().next().unwrap().text(), "bob");
        // A second request right away is refused.
        bob.send_str(&format!(
            "<message to='{r}'><x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#request</value></field>\
             <field var='muc#role'><value>participant</value></field></x></message>"
        ))
        .await
        .unwrap();
        assert_eq!(error_message(&mut bob, &r).await, "policy-violation");
        alice
            .send_str(&format!(
                "<message to='{r}'><x xmlns='jabber:x:data' type='submit'>\
                 <field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#request</value></field>\
                 <field var='muc#role'><value>participant</value></field>\
                 <field var='muc#jid'><value>bob@localhost/b</value></field>\
                 <field var='muc#roomnick'><value>bob</value></field>\
                 <field var='muc#request_allow'><value>true</value></field></x></message>"
            ))
            .await
            .unwrap();
        let p = presence_from(&mut bob, &format!("{r}/bob")).await;
        assert_eq!(aff_role(&p).1, "participant");
        assert_eq!(item(&p).get_child("actor", MUC_USER).and_then(|a| a.attr("nick")), Some("alice"));
        bob.send(&groupchat(&r, "thanks")).await.unwrap();
        expect_groupchat(&mut alice, "thanks").await;
        // Revoking voice (8.4).
        let res = admin_set(&mut alice, &r, "<item nick='bob' role='visitor'><reason>quiet</reason></item>").await;
        assert_eq!(res.attr("type"), Some("result"));
        let p = presence_from(&mut bob, &format!("{r}/bob")).await;
        assert_eq!(aff_role(&p).1, "visitor");
        assert_eq!(item(&p).get_child("reason", MUC_USER).unwrap().text(), "quiet");
        // The voice list (8.5).
        let list = admin_list(&mut alice, &r, "role", "visitor").await;
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].attr("nick"), Some("bob"));
        assert_eq!(list[0].attr("jid"), Some("bob@localhost/b"));
    })
    .await;
}

#[tokio::test]
async fn occupant_ids_are_stable() {
    for_each_backend(|srv| async move {
        for u in ["alice", "bob"] {
            srv.add_user(u).await;
        }
        let mut alice = srv.online("alice", "a").await;
        let mut bob = srv.online("bob", "b").await;
        let r = room("ids");
        create_with(
            &mut alice,
            &r,
            "alice",
            &[("muc#roomconfig_persistentroom", &["1"])],
        )
        .await;
        join(&mut bob, &r, "bob").await;
        let p1 = presence_from(&mut alice, &format!("{r}/bob")).await;
        let id1 = occupant_id(&p1).unwrap();
        // Client-supplied occupant-id and stanza-id are replaced.
        bob.send_str(&format!(
            "<message to='{r}' type='groupchat'><body>spoof</body>\
             <occupant-id xmlns='urn:xmpp:occupant-id:0' id='fake'/>\
             <stanza-id xmlns='urn:xmpp:sid:0' id='fake' by='{r}'/></message>"
        ))
        .await
        .unwrap();
        let m = expect_groupchat(&mut alice, "spoof").await;
        assert_eq!(
            m.children().filter(|c| c.name() == "occupant-id").count(),
            1
        );
        assert_eq!(occupant_id(&m).unwrap(), id1);
        let sids: Vec<_> = m.children().filter(|c| c.name() == "stanza-id").collect();
        assert_eq!(sids.len(), 1);
        assert_ne!(sids[0].attr("id"), Some("fake"));
        // Same user, another nick, later: the same id.
        bob.send_str(&format!("<presence to='{r}/bob' type='unavailable'/>"))
            .await
            .unwrap();
        unavailable_from(&mut alice, &format!("{r}/bob")).await;
        join(&mut bob, &r, "robert").await;
        let p2 = presence_from(&mut alice, &format!("{r}/robert")).await;
        assert_eq!(occupant_id(&p2).unwrap(), id1);
        // Another user: another id.
        let own = presence_from(&mut bob, &format!("{r}/alice")).await;
        assert_ne!(occupant_id(&own).unwrap(), id1);
    })
    .await;
}

#[tokio::test]
async fn rate_limits_give_clear_errors() {
    let srv = TestServer::start_with(|c| {
        c.muc.occupant_rate = 0.01;
        c.muc.occupant_burst = 3.0;
    })
    .await;
    srv.add_user("alice").await;
    let mut alice = srv.online("alice", "a").await;
    let r = room("fast");
    create_instant(&mut alice, &r, "alice").await;
    for i in 0..3 {
        alice.send(&groupchat(&r, &format!("ok{i}"))).await.unwrap();
        expect_groupchat(&mut alice, &format!("ok{i}")).await;
    }
    alice.send(&groupchat(&r, "too fast")).await.unwrap();
    let e = expect(&mut alice, "error", |e| e.attr("type") == Some("error")).await;
    assert_eq!(err_cond(&e), "policy-violation");
    let err = e.get_child("error", "jabber:client").unwrap();
    assert_eq!(err.attr("type"), Some("wait"));
    assert!(
        err.get_child("text", "urn:ietf:params:xml:ns:xmpp-stanzas")
            .unwrap()
            .text()
            .contains("too fast")
    );
    srv.shutdown().await;

    // The room-wide limit.
    let srv = TestServer::start_with(|c| {
        c.muc.room_rate = 0.01;
        c.muc.room_burst = 2.0;
    })
    .await;
    srv.add_user("alice").await;
    srv.add_user("bob").await;
    let mut alice = srv.online("alice", "a").await;
    let mut bob = srv.online("bob", "b").await;
    create_instant(&mut alice, &r, "alice").await;
    join(&mut bob, &r, "bob").await;
    alice.send(&groupchat(&r, "one")).await.unwrap();
    expect_groupchat(&mut bob, "one").await;
    alice.send(&groupchat(&r, "two")).await.unwrap();
    expect_groupchat(&mut bob, "two").await;
    bob.send(&groupchat(&r, "three")).await.unwrap();
    let e = expect(&mut bob, "error", |e| e.attr("type") == Some("error")).await;
    assert_eq!(err_cond(&e), "resource-constraint");
    srv.shutdown().await;
}
