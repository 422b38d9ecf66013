//! Multi-user chat (XEP-0045): moderator, admin and owner use cases, and
//! persistent rooms across a restart, on every store backend.

mod common;
mod muc_support;

use common::*;
use muc_support::*;
use starling::storage::testing;

#[tokio::test]
async fn kicking_occupants() {
    for_each_backend(|srv| async move {
        for u in ["alice", "bob", "carol", "dave"] {
            srv.add_user(u).await;
        }
        let mut alice = srv.online("alice", "a").await;
        let mut bob = srv.online("bob", "b").await;
        let mut carol = srv.online("carol", "c").await;
        let mut dave = srv.online("dave", "d").await;
        let r = room("kick");
        create_instant(&mut alice, &r, "alice").await;
        join(&mut bob, &r, "bob").await;
        join(&mut carol, &r, "carol").await;
        // A participant may not kick.
        assert_eq!(
            err_cond(&admin_set(&mut bob, &r, "<item nick='carol' role='none'/>").await),
            "forbidden"
        );
        // The owner kicks with a reason (8.2): 307, actor, reason.
        let res = admin_set(
            &mut alice,
            &r,
            "<item nick='bob' role='none'><reason>spam</reason></item>",
        )
        .await;
        assert_eq!(res.attr("type"), Some("result"));
        let own = unavailable_from(&mut bob, &format!("{r}/bob")).await;
        assert_eq!(codes(&own), vec![110, 307]);
        let it = item(&own);
        assert_eq!(it.attr("role"), Some("none"));
        assert_eq!(it.get_child("reason", MUC_USER).unwrap().text(), "spam");
        assert_eq!(
            it.get_child("actor", MUC_USER).unwrap().attr("nick"),
            Some("alice")
        );
        let seen = unavailable_from(&mut carol, &format!("{r}/bob")).await;
        assert_eq!(codes(&seen), vec![307]);
        // Kicked occupants are out: their messages are refused.
        bob.send(&groupchat(&r, "still here")).await.unwrap();
        assert_eq!(error_message(&mut bob, &r).await, "not-acceptable");
        // A moderator (no affiliation) may not kick an admin.
        let res = admin_set(
            &mut alice,
            &r,
            "<item affiliation='admin' jid='dave@localhost'/>",
        )
        .await;
        assert_eq!(res.attr("type"), Some("result"));
        join(&mut dave, &r, "dave").await;
        let res = admin_set(&mut alice, &r, "<item nick='carol' role='moderator'/>").await;
        assert_eq!(res.attr("type"), Some("result"));
        presence_with(&mut carol, &format!("{r}/carol"), "none", "moderator").await;
        assert_eq!(
            err_cond(&admin_set(&mut carol, &r, "<item nick='dave' role='none'/>").await),
            "not-allowed"
        );
        // ... nor revoke an admin's voice.
        assert_eq!(
            err_cond(&admin_set(&mut carol, &r, "<item nick='dave' role='visitor'/>").await),
            "not-allowed"
        );
        // Role and affiliation in one item: bad-request (IQ business rules).
        assert_eq!(
            err_cond(
                &admin_set(
                    &mut alice,
                    &r,
                    "<item nick='carol' role='none' affiliation='none'/>"
                )
                .await
            ),
            "bad-request"
        );
        // Kicking a nick that is not there.
        assert_eq!(
            err_cond(&admin_set(&mut alice, &r, "<item nick='ghost' role='none'/>").await),
            "item-not-found"
        );
    })
    .await;
}

#[tokio::test]
async fn banning_and_the_ban_list() {
    for_each_backend(|srv| async move {
        for u in ["alice", "bob", "carol"] {
            srv.add_user(u).await;
        }
        let mut alice = srv.online("alice", "a").await;
        let mut bob = srv.online("bob", "b").await;
        let mut carol = srv.online("carol", "c").await;
        let r = room("ban");
        create_instant(&mut alice, &r, "alice").await;
        join(&mut bob, &r, "bob").await;
        join(&mut carol, &r, "carol").await;
        // Banning oneself: conflict (9.1).
        assert_eq!(
            err_cond(&admin_set(&mut alice, &r, "<item affiliation='outcast' jid='alice@localhost'/>").await),
            "conflict"
        );
        let res = admin_set(
            &mut alice,
            &r,
            "<item affiliation='outcast' jid='bob@localhost'><reason>trolling</reason></item>",
        )
        .await;
        assert_eq!(res.attr("type"), Some("result"));
        let own = unavailable_from(&mut bob, &format!("{r}/bob")).await;
        assert_eq!(codes(&own), vec![110, 301]);
        assert_eq!(aff_role(&own), ("outcast".into(), "none".into()));
        assert_eq!(item(&own).get_child("reason", MUC_USER).unwrap().text(), "trolling");
        let seen = unavailable_from(&mut carol, &format!("{r}/bob")).await;
        assert_eq!(codes(&seen), vec![301]);
        assert_eq!(join_error(&mut bob, &r, "bob", "").await, "forbidden");
        // The ban list (9.2): admins only.
        let list = admin_list(&mut alice, &r, "affiliation", "outcast").await;
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].attr("jid"), Some("bob@localhost"));
        assert_eq!(list[0].get_child("reason", MUC_ADMIN).unwrap().text(), "trolling");
        assert_eq!(
            iq_err(
                &mut carol,
                &format!("<iq xmlns='jabber:client' type='get' to='{r}'><query xmlns='{MUC_ADMIN}'><item affiliation='outcast'/></query></iq>")
            )
            .await,
            "forbidden"
        );
        // A domain ban covers everyone of that domain.
        let res = admin_set(&mut alice, &r, "<item affiliation='outcast' jid='evil.example'/>").await;
        assert_eq!(res.attr("type"), Some("result"));
        // Lifting the ban.
        let res = admin_set(&mut alice, &r, "<item affiliation='none' jid='bob@localhost'/>").await;
        assert_eq!(res.attr("type"), Some("result"));
        join(&mut bob, &r, "bob").await;
        assert_eq!(admin_list(&mut alice, &r, "affiliation", "outcast").await.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn membership_and_members_only_rooms() {
    for_each_backend(|srv| async move {
        for u in ["alice", "bob", "carol"] {
            srv.add_user(u).await;
        }
        let mut alice = srv.online("alice", "a").await;
        let mut bob = srv.online("bob", "b").await;
        let mut carol = srv.online("carol", "c").await;
        let r = room("team");
        create_instant(&mut alice, &r, "alice").await;
        join(&mut bob, &r, "bob").await;
        join(&mut carol, &r, "carol").await;
        // Granting membership (9.3) updates the occupant's presence.
        let res = admin_set(
            &mut alice,
            &r,
            "<item affiliation='member' jid='bob@localhost' nick='bobby'/>",
        )
        .await;
        assert_eq!(res.attr("type"), Some("result"));
        presence_with(&mut carol, &format!("{r}/bob"), "member", "participant").await;
        let members = admin_list(&mut alice, &r, "affiliation", "member").await;
        assert_eq!(members.len(), 1);
        assert_eq!(members[0].attr("jid"), Some("bob@localhost"));
        assert_eq!(members[0].attr("nick"), Some("bobby"));
        // The room becomes members-only: Carol (no affiliation) is removed with 322.
        configure(&mut alice, &r, &[("muc#roomconfig_membersonly", &["1"])]).await;
        let own = unavailable_from(&mut carol, &format!("{r}/carol")).await;
        assert!(codes(&own).contains(&322));
        let seen = unavailable_from(&mut bob, &format!("{r}/carol")).await;
        assert!(codes(&seen).contains(&322));
        assert_eq!(
            join_error(&mut carol, &r, "carol", "").await,
            "registration-required"
        );
        // Revoking membership in a members-only room removes with 321 (9.4).
        let res = admin_set(
            &mut alice,
            &r,
            "<item affiliation='none' jid='bob@localhost'/>",
        )
        .await;
        assert_eq!(res.attr("type"), Some("result"));
        let own = unavailable_from(&mut bob, &format!("{r}/bob")).await;
        assert!(codes(&own).contains(&321));
        assert!(
            admin_list(&mut alice, &r, "affiliation", "member")
                .await
                .is_empty()
        );
        // A member added while away gets an invitation (9.5).
        let res = admin_set(
            &mut alice,
            &r,
            "<item affiliation='member' jid='carol@localhost'/>",
        )
        .await;
        assert_eq!(res.attr("type"), Some("result"));
        let inv = expect(&mut carol, "invitation", |e| {
            e.get_child("x", MUC_USER)
                .is_some_and(|x| x.has_child("invite", MUC_USER))
        })
        .await;
        assert_eq!(inv.attr("from"), Some(r.as_str()));
        join(&mut carol, &r, "carol").await;
    })
    .await;
}

#[tokio::test]
async fn admins_and_owners() {
    for_each_backend(|srv| async move {
        for u in ["alice", "bob", "carol"] {
            srv.add_user(u).await;
        }
        let mut alice = srv.online("alice", "a").await;
        let mut bob = srv.online("bob", "b").await;
        let mut carol = srv.online("carol", "c").await;
        let r = room("staff");
        create_instant(&mut alice, &r, "alice").await;
        join(&mut bob, &r, "bob").await;
        join(&mut carol, &r, "carol").await;
        // Admin status (10.6) makes a moderator.
        let res = admin_set(&mut alice, &r, "<item affiliation='admin' jid='bob@localhost'/>").await;
        assert_eq!(res.attr("type"), Some("result"));
        presence_with(&mut carol, &format!("{r}/bob"), "admin", "moderator").await;
        // A new moderator of a semi-anonymous room sees real JIDs.
        let from = format!("{r}/carol");
        let seen = expect(&mut bob, "carol with jid", |e| {
            e.attr("from") == Some(from.as_str())
                && e.get_child("x", MUC_USER)
                    .and_then(|x| x.get_child("item", MUC_USER))
                    .is_some_and(|i| i.attr("jid").is_some())
        })
        .await;
        assert_eq!(item(&seen).attr("jid"), Some("carol@localhost/c"));
        // Admins manage members and moderators (9.6)...
        let res = admin_set(&mut bob, &r, "<item nick='carol' role='moderator'/>").await;
        assert_eq!(res.attr("type"), Some("result"));
        let res = admin_set(&mut bob, &r, "<item nick='carol' role='participant'/>").await;
        assert_eq!(res.attr("type"), Some("result"));
        // ... but not owners or admins (10.3, 10.7).
        assert_eq!(
            err_cond(&admin_set(&mut bob, &r, "<item affiliation='none' jid='alice@localhost'/>").await),
            "not-allowed"
        );
        assert_eq!(
            err_cond(&admin_set(&mut bob, &r, "<item affiliation='admin' jid='carol@localhost'/>").await),
            "not-allowed"
        );
        assert_eq!(
            err_cond(&admin_set(&mut bob, &r, "<item nick='alice' role='participant'/>").await),
            "not-allowed"
        );
        // Owner lists.
        let owners = admin_list(&mut alice, &r, "affiliation", "owner").await;
        assert_eq!(owners.len(), 1);
        let admins = admin_list(&mut bob, &r, "affiliation", "admin").await;
        assert_eq!(admins[0].attr("jid"), Some("bob@localhost"));
        // The last owner may not step down (10.4); with a second owner she may.
        assert_eq!(
            err_cond(&admin_set(&mut alice, &r, "<item affiliation='admin' jid='alice@localhost'/>").await),
            "conflict"
        );
        let res = admin_set(&mut alice, &r, "<item affiliation='owner' jid='carol@localhost'/>").await;
        assert_eq!(res.attr("type"), Some("result"));
        presence_with(&mut bob, &format!("{r}/carol"), "owner", "moderator").await;
        let res = admin_set(&mut alice, &r, "<item affiliation='member' jid='alice@localhost'/>").await;
        assert_eq!(res.attr("type"), Some("result"));
        presence_with(&mut carol, &format!("{r}/alice"), "member", "participant").await;
        // Now Alice may not configure the room.
        assert_eq!(
            iq_err(&mut alice, &format!("<iq xmlns='jabber:client' type='get' to='{r}'><query xmlns='{MUC_OWNER}'/></iq>")).await,
            "forbidden"
        );
    })
    .await;
}

#[tokio::test]
async fn room_configuration() {
    for_each_backend(|srv| async move {
        for u in ["alice", "bob"] {
            srv.add_user(u).await;
        }
        let mut alice = srv.online("alice", "a").await;
        let mut bob = srv.online("bob", "b").await;
        let r = room("conf");
        // A reserved room (10.1.3): the form first, then the submission.
        let p = join(&mut alice, &r, "alice").await;
        assert!(codes(&p).contains(&201));
        let form = iq_ok(&mut alice, &format!("<iq xmlns='jabber:client' type='get' to='{r}'><query xmlns='{MUC_OWNER}'/></iq>")).await;
        let x = form.get_child("query", MUC_OWNER).unwrap().get_child("x", "jabber:x:data").unwrap();
        assert_eq!(x.attr("type"), Some("form"));
        let vars: Vec<&str> = x.children().filter_map(|f| f.attr("var")).collect();
        for want in [
            "FORM_TYPE",
            "muc#roomconfig_roomname",
            "muc#roomconfig_roomdesc",
            "muc#roomconfig_persistentroom",
            "muc#roomconfig_publicroom",
            "muc#roomconfig_membersonly",
            "muc#roomconfig_moderatedroom",
            "muc#roomconfig_passwordprotectedroom",
            "muc#roomconfig_roomsecret",
            "muc#roomconfig_whois",
            "muc#roomconfig_maxusers",
            "muc#roomconfig_changesubject",
            "muc#roomconfig_allowinvites",
            "muc#roomconfig_allowpm",
            "muc#roomconfig_presencebroadcast",
            "muc#roomconfig_getmemberlist",
            "muc#roomconfig_enablearchiving",
            "muc#maxhistoryfetch",
            "muc#roomconfig_roomowners",
            "muc#roomconfig_roomadmins",
        ] {
            assert!(vars.contains(&want), "form lacks {want}");
        }
        // Invalid: a password-protected room without a password.
        let e = try_configure(&mut alice, &r, &[("muc#roomconfig_passwordprotectedroom", &["1"])]).await;
        assert_eq!(err_cond(&e), "not-acceptable");
        configure(
            &mut alice,
            &r,
            &[
                ("muc#roomconfig_roomname", &["Config Room"]),
                ("muc#roomconfig_roomdesc", &["Where settings live"]),
                ("muc#roomconfig_persistentroom", &["1"]),
                ("muc#roomconfig_moderatedroom", &["1"]),
                ("muc#roomconfig_whois", &["anyone"]),
                ("muc#roomconfig_roomadmins", &["bob@localhost"]),
            ],
        )
        .await;
        let f = features(&mut bob, &r).await;
        for want in ["muc_persistent", "muc_moderated", "muc_nonanonymous", "muc_public"] {
            assert!(f.contains(&want.to_string()), "{want} in {f:?}");
        }
        // Non-owners may not see or submit the form (10.2).
        assert_eq!(
            iq_err(&mut bob, &format!("<iq xmlns='jabber:client' type='get' to='{r}'><query xmlns='{MUC_OWNER}'/></iq>")).await,
            "forbidden"
        );
        let own = join(&mut bob, &r, "bob").await;
        assert_eq!(aff_role(&own), ("admin".into(), "moderator".into()));
        // Changes are announced (10.2.1): 104, plus 171 when archiving stops.
        configure(&mut alice, &r, &[("muc#roomconfig_enablearchiving", &["0"])]).await;
        let notice = expect(&mut bob, "notice", |e| e.name() == "message" && codes(e).contains(&104)).await;
        assert_eq!(codes(&notice), vec![104, 171]);
        // The subsequent form shows the current values.
        let form = iq_ok(&mut alice, &format!("<iq xmlns='jabber:client' type='get' to='{r}'><query xmlns='{MUC_OWNER}'/></iq>")).await;
        let x = form.get_child("query", MUC_OWNER).unwrap().get_child("x", "jabber:x:data").unwrap();
        let value = |var: &str| {
            x.children()
                .find(|f| f.attr("var") == Some(var))
                .and_then(|f| f.children().next())
                .map(|v| v.text())
        };
        assert_eq!(value("muc#roomconfig_roomname").as_deref(), Some("Config Room"));
        assert_eq!(value("muc#roomconfig_persistentroom").as_deref(), Some("1"));
        assert_eq!(value("muc#roomconfig_enablearchiving").as_deref(), Some("0"));
        assert_eq!(value("muc#roomconfig_roomadmins").as_deref(), Some("bob@localhost"));
        // Cancelling a later configuration changes nothing.
        iq_ok(
            &mut alice,
            &format!("<iq xmlns='jabber:client' type='set' to='{r}'><query xmlns='{MUC_OWNER}'><x xmlns='jabber:x:data' type='cancel'/></query></iq>"),
        )
        .await;
        assert!(features(&mut bob, &r).await.contains(&"muc_persistent".to_string()));
        // Cancelling the initial configuration destroys the room (10.1.3).
        let r2 = room("cancelled");
        join(&mut alice, &r2, "alice").await;
        iq_ok(
            &mut alice,
            &format!("<iq xmlns='jabber:client' type='set' to='{r2}'><query xmlns='{MUC_OWNER}'><x xmlns='jabber:x:data' type='cancel'/></query></iq>"),
        )
        .await;
        let u = unavailable_from(&mut alice, &format!("{r2}/alice")).await;
        assert!(u.get_child("x", MUC_USER).unwrap().has_child("destroy", MUC_USER));
    })
    .await;
}

#[tokio::test]
async fn destroying_a_room() {
    for_each_backend(|srv| async move {
        for u in ["alice", "bob"] {
            srv.add_user(u).await;
        }
        let mut alice = srv.online("alice", "a").await;
        let mut bob = srv.online("bob", "b").await;
        let r = room("doomed");
        create_with(&mut alice, &r, "alice", &[("muc#roomconfig_persistentroom", &["1"])]).await;
        join(&mut bob, &r, "bob").await;
        assert_eq!(
            iq_err(&mut bob, &format!("<iq xmlns='jabber:client' type='set' to='{r}'><query xmlns='{MUC_OWNER}'><destroy/></query></iq>")).await,
            "forbidden"
        );
        iq_ok(
            &mut alice,
            &format!(
                "<iq xmlns='jabber:client' type='set' to='{r}'><query xmlns='{MUC_OWNER}'>\
                 <destroy jid='{}'><reason>moved</reason><password>pw</password></destroy></query></iq>",
                room("newhome")
            ),
        )
        .await;
        for (c, nick) in [(&mut bob, "bob"), (&mut alice, "alice")] {
            let u = unavailable_from(c, &format!("{r}/{nick}")).await;
            let d = u.get_child("x", MUC_USER).unwrap().get_child("destroy", MUC_USER).unwrap();
            assert_eq!(d.attr("jid"), Some(room("newhome").as_str()));
            assert_eq!(d.get_child("reason", MUC_USER).unwrap().text(), "moved");
            assert_eq!(d.get_child("password", MUC_USER).unwrap().text(), "pw");
        }
        // Only one unavailable each: nobody sees the others leave.
        let alice_jid = format!("{r}/alice");
        assert!(
            !drain(&mut bob, 200)
                .await
                .iter()
                .any(|e| e.attr("from") == Some(alice_jid.as_str()) && e.attr("type") == Some("unavailable")),
            "no separate unavailable for other occupants"
        );
        assert_eq!(
            iq_err(&mut bob, &format!("<iq xmlns='jabber:client' type='get' to='{r}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")).await,
            "item-not-found"
        );
        // A fresh room may take the name.
        let p = join(&mut bob, &r, "bob").await;
        assert!(codes(&p).contains(&201));
    })
    .await;
}

#[tokio::test]
async fn nickname_registration() {
    for_each_backend(|srv| async move {
        for u in ["alice", "bob", "carol"] {
            srv.add_user(u).await;
        }
        let mut alice = srv.online("alice", "a").await;
        let mut bob = srv.online("bob", "b").await;
        let mut carol = srv.online("carol", "c").await;
        let r = room("reg");
        create_instant(&mut alice, &r, "alice").await;
        // The registration form (7.10).
        let form = iq_ok(&mut bob, &format!("<iq xmlns='jabber:client' type='get' to='{r}'><query xmlns='jabber:iq:register'/></iq>")).await;
        let q = form.get_child("query", "jabber:iq:register").unwrap();
        assert!(q.get_child("x", "jabber:x:data").is_some());
        // No reserved nick yet (7.12).
        let ru = iq_ok(
            &mut bob,
            &format!("<iq xmlns='jabber:client' type='get' to='{r}'><query xmlns='http://jabber.org/protocol/disco#info' node='x-roomuser-item'/></iq>"),
        )
        .await;
        assert!(ru.get_child("query", "http://jabber.org/protocol/disco#info").unwrap().get_child("identity", "http://jabber.org/protocol/disco#info").is_none());
        iq_ok(
            &mut bob,
            &format!(
                "<iq xmlns='jabber:client' type='set' to='{r}'><query xmlns='jabber:iq:register'>\
                 <x xmlns='jabber:x:data' type='submit'>\
                 <field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#register</value></field>\
                 <field var='muc#register_roomnick'><value>Bobby</value></field></x></query></iq>"
            ),
        )
        .await;
        let ru = iq_ok(
            &mut bob,
            &format!("<iq xmlns='jabber:client' type='get' to='{r}'><query xmlns='http://jabber.org/protocol/disco#info' node='x-roomuser-item'/></iq>"),
        )
        .await;
        let id = ru
            .get_child("query", "http://jabber.org/protocol/disco#info")
            .unwrap()
            .get_child("identity", "http://jabber.org/protocol/disco#info")
            .unwrap();
        assert_eq!(id.attr("name"), Some("Bobby"));
        let reg = iq_ok(&mut bob, &format!("<iq xmlns='jabber:client' type='get' to='{r}'><query xmlns='jabber:iq:register'/></iq>")).await;
        let q = reg.get_child("query", "jabber:iq:register").unwrap();
        assert!(q.has_child("registered", "jabber:iq:register"));
        assert_eq!(q.get_child("username", "jabber:iq:register").unwrap().text(), "Bobby");
        // Bob is a member now; the nick is his alone.
        let own = join(&mut bob, &r, "Bobby").await;
        assert_eq!(aff_role(&own).0, "member");
        bob.send_str(&format!("<presence to='{r}/Bobby' type='unavailable'/>")).await.unwrap();
        unavailable_from(&mut bob, &format!("{r}/Bobby")).await;
        assert_eq!(join_error(&mut carol, &r, "Bobby", "").await, "conflict");
        // Registering a taken nick: conflict.
        assert_eq!(
            iq_err(
                &mut carol,
                &format!(
                    "<iq xmlns='jabber:client' type='set' to='{r}'><query xmlns='jabber:iq:register'>\
                     <x xmlns='jabber:x:data' type='submit'><field var='muc#register_roomnick'><value>Bobby</value></field></x></query></iq>"
                ),
            )
            .await,
            "conflict"
        );
        // Unregistering.
        iq_ok(&mut bob, &format!("<iq xmlns='jabber:client' type='set' to='{r}'><query xmlns='jabber:iq:register'><remove/></query></iq>")).await;
        join(&mut carol, &r, "Bobby").await;
    })
    .await;
}

#[tokio::test]
async fn persistent_rooms_survive_a_restart() {
    let mut stores = vec![testing::sqlite_store().await];
    if let Some(pg) = testing::pg_schema().await {
        stores.push(
            starling::storage::Store::open_with(&pg.0, 4, Some(&pg.1))
                .await
                .unwrap(),
        );
    }
    for store in stores {
        eprintln!("-- backend {}", store.backend_name());
        let srv = TestServer::start_on(store.clone(), |_| {}).await;
        for u in ["alice", "bob", "carol"] {
            srv.add_user(u).await;
        }
        let r = room("keep");
        {
            let mut alice = srv.online("alice", "a").await;
            let mut bob = srv.online("bob", "b").await;
            create_with(
                &mut alice,
                &r,
                "alice",
                &[
                    ("muc#roomconfig_persistentroom", &["1"]),
                    ("muc#roomconfig_roomname", &["Keeper"]),
                    ("muc#roomconfig_membersonly", &["1"]),
                ],
            )
            .await;
            let res = admin_set(&mut alice, &r, "<item affiliation='member' jid='bob@localhost' nick='bob'/><item affiliation='outcast' jid='carol@localhost'/>").await;
            assert_eq!(res.attr("type"), Some("result"));
            alice
                .send_str(&format!(
                    "<message to='{r}' type='groupchat'><subject>kept topic</subject></message>"
                ))
                .await
                .unwrap();
            subject(&mut alice, &r).await;
            alice.send(&groupchat(&r, "remember me")).await.unwrap();
            expect_groupchat(&mut alice, "remember me").await;
            // Everyone leaves; the room stays.
            alice
                .send_str(&format!("<presence to='{r}/alice' type='unavailable'/>"))
                .await
                .unwrap();
            unavailable_from(&mut alice, &format!("{r}/alice")).await;
            let info = features(&mut bob, &r).await;
            assert!(info.contains(&"muc_persistent".to_string()));
        }
        // Stop the server without closing the store, start a new one on it.
        let handle = {
            let mut srv = srv;
            srv.handle.take().unwrap()
        };
        handle.server.shutdown.cancel();
        handle.server.tasks.close();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(3),
            handle.server.tasks.wait(),
        )
        .await;
        let srv = TestServer::start_on(store.clone(), |_| {}).await;
        let mut bob = srv.online("bob", "b").await;
        let mut carol = srv.online("carol", "c").await;
        // Listed from the store before anyone loads it.
        let items = iq_ok(
            &mut bob,
            &format!("<iq xmlns='jabber:client' type='get' to='{MUC}'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>"),
        )
        .await;
        let listed: Vec<&str> = items
            .children()
            .next()
            .unwrap()
            .children()
            .filter_map(|i| i.attr("name"))
            .collect();
        assert_eq!(listed, vec!["Keeper"]);
        // Configuration, affiliations, subject and history are back.
        send_join(&mut bob, &r, "bob", "").await;
        let own = self_presence(&mut bob, &r, "bob").await;
        assert_eq!(aff_role(&own), ("member".into(), "participant".into()));
        assert!(!codes(&own).contains(&201), "not created again");
        let h = expect_groupchat(&mut bob, "remember me").await;
        assert!(h.has_child("delay", "urn:xmpp:delay"));
        let s = subject(&mut bob, &r).await;
        assert_eq!(
            s.get_child("subject", "jabber:client").unwrap().text(),
            "kept topic"
        );
        assert_eq!(join_error(&mut carol, &r, "carol", "").await, "forbidden");
        let f = features(&mut bob, &r).await;
        assert!(f.contains(&"muc_membersonly".to_string()));
        srv.shutdown().await;
    }
}
