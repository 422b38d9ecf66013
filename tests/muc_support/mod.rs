//! Helpers for the MUC integration tests (tests/muc*.rs).
#![allow(dead_code)]

use minidom::Element;
use starling::client::{XmppClient, stanza_error_condition};

use crate::common::{expect, parse};

pub const MUC: &str = "conference.localhost";
pub const MUC_NS: &str = "http://jabber.org/protocol/muc";
pub const MUC_USER: &str = "http://jabber.org/protocol/muc#user";
pub const MUC_ADMIN: &str = "http://jabber.org/protocol/muc#admin";
pub const MUC_OWNER: &str = "http://jabber.org/protocol/muc#owner";

pub fn room(name: &str) -> String {
    format!("{name}@{MUC}")
}

/// The status codes of a MUC presence or message.
pub fn codes(e: &Element) -> Vec<u16> {
    let mut v: Vec<u16> = e
        .get_child("x", MUC_USER)
        .map(|x| {
            x.children()
                .filter(|c| c.is("status", MUC_USER))
                .filter_map(|c| c.attr("code").and_then(|s| s.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// The muc#user item of a presence.
pub fn item(e: &Element) -> Element {
    e.get_child("x", MUC_USER)
        .and_then(|x| x.get_child("item", MUC_USER))
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no muc#user item in {}",
                starling::xml::writer::to_string(e)
            )
        })
}

pub fn aff_role(e: &Element) -> (String, String) {
    let i = item(e);
    (
        i.attr("affiliation").unwrap_or_default().to_owned(),
        i.attr("role").unwrap_or_default().to_owned(),
    )
}

pub fn occupant_id(e: &Element) -> Option<String> {
    e.get_child("occupant-id", "urn:xmpp:occupant-id:0")
        .and_then(|o| o.attr("id"))
        .map(str::to_owned)
}

pub fn err_cond(e: &Element) -> String {
    stanza_error_condition(e).unwrap_or_default()
}

/// Send a join presence (with the MUC `<x/>` and extra children for it).
pub async fn send_join(c: &mut XmppClient, room: &str, nick: &str, x_children: &str) {
    c.send_str(&format!(
        "<presence to='{room}/{nick}'><x xmlns='{MUC_NS}'>{x_children}</x></presence>"
    ))
    .await
    .unwrap();
}

/// Wait for our self-presence from `room/nick` (status 110).
pub async fn self_presence(c: &mut XmppClient, room: &str, nick: &str) -> Element {
    let from = format!("{room}/{nick}");
    expect(c, "self-presence", |e| {
        e.name() == "presence" && e.attr("from") == Some(from.as_str()) && codes(e).contains(&110)
    })
    .await
}

/// Join and return the self-presence; the subject that follows is
/// consumed too.
pub async fn join(c: &mut XmppClient, room: &str, nick: &str) -> Element {
    join_with(c, room, nick, "").await
}

pub async fn join_with(c: &mut XmppClient, room: &str, nick: &str, x_children: &str) -> Element {
    send_join(c, room, nick, x_children).await;
    let p = expect(c, "join result", |e| {
        e.name() == "presence"
            && e.attr("from") == Some(format!("{room}/{nick}").as_str())
            && (codes(e).contains(&110) || e.attr("type") == Some("error"))
    })
    .await;
    assert_ne!(
        p.attr("type"),
        Some("error"),
        "join {room}/{nick} failed: {}",
        starling::xml::writer::to_string(&p)
    );
    subject(c, room).await;
    p
}

/// A join that must fail: the error condition.
pub async fn join_error(c: &mut XmppClient, room: &str, nick: &str, x_children: &str) -> String {
    send_join(c, room, nick, x_children).await;
    let p = expect(c, "join error", |e| {
        e.name() == "presence"
            && e.attr("from") == Some(format!("{room}/{nick}").as_str())
            && e.attr("type") == Some("error")
    })
    .await;
    let err = p
        .get_child("error", "jabber:client")
        .expect("error element");
    assert_eq!(err.attr("by"), Some(room), "MUC errors carry 'by'");
    err_cond(&p)
}

/// Wait for the subject message of a room.
pub async fn subject(c: &mut XmppClient, room: &str) -> Element {
    expect(c, "subject", |e| {
        e.name() == "message"
            && e.attr("type") == Some("groupchat")
            && e.attr("from").is_some_and(|f| f.starts_with(room))
            && e.has_child("subject", "jabber:client")
            && !e.has_child("body", "jabber:client")
    })
    .await
}

/// Create a room as an instant room (default configuration).
pub async fn create_instant(c: &mut XmppClient, room: &str, nick: &str) -> Element {
    let p = join(c, room, nick).await;
    assert!(codes(&p).contains(&201), "room {room} was new");
    configure(c, room, &[]).await;
    p
}

/// Create a room with configuration fields.
pub async fn create_with(c: &mut XmppClient, room: &str, nick: &str, fields: &[(&str, &[&str])]) {
    let p = join(c, room, nick).await;
    assert!(codes(&p).contains(&201), "room {room} was new");
    configure(c, room, fields).await;
}

pub fn config_form(fields: &[(&str, &[&str])]) -> String {
    let mut s = String::new();
    if !fields.is_empty() {
        s.push_str("<field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#roomconfig</value></field>");
    }
    for (var, vals) in fields {
        s.push_str(&format!("<field var='{var}'>"));
        for v in *vals {
            s.push_str(&format!("<value>{v}</value>"));
        }
        s.push_str("</field>");
    }
    s
}

/// Submit the configuration form; panics on error.
pub async fn configure(c: &mut XmppClient, room: &str, fields: &[(&str, &[&str])]) {
    let r = try_configure(c, room, fields).await;
    assert_eq!(
        r.attr("type"),
        Some("result"),
        "configure: {}",
        starling::xml::writer::to_string(&r)
    );
}

pub async fn try_configure(c: &mut XmppClient, room: &str, fields: &[(&str, &[&str])]) -> Element {
    let iq = parse(&format!(
        "<iq xmlns='jabber:client' type='set' to='{room}'><query xmlns='{MUC_OWNER}'>\
         <x xmlns='jabber:x:data' type='submit'>{}</x></query></iq>",
        config_form(fields)
    ));
    c.iq(iq).await.unwrap()
}

/// An IQ that must succeed.
pub async fn iq_ok(c: &mut XmppClient, xml: &str) -> Element {
    let r = c.iq(parse(xml)).await.unwrap();
    assert_eq!(
        r.attr("type"),
        Some("result"),
        "{xml} -> {}",
        starling::xml::writer::to_string(&r)
    );
    r
}

/// An IQ that must fail: its condition.
pub async fn iq_err(c: &mut XmppClient, xml: &str) -> String {
    let r = c.iq(parse(xml)).await.unwrap();
    assert_eq!(
        r.attr("type"),
        Some("error"),
        "{xml} -> {}",
        starling::xml::writer::to_string(&r)
    );
    err_cond(&r)
}

pub fn groupchat(room: &str, body: &str) -> Element {
    parse(&format!(
        "<message xmlns='jabber:client' to='{room}' type='groupchat'><body>{body}</body></message>"
    ))
}

/// Wait for a groupchat message with this body.
pub async fn expect_groupchat(c: &mut XmppClient, body: &str) -> Element {
    expect(c, &format!("groupchat '{body}'"), |e| {
        e.name() == "message"
            && e.attr("type") == Some("groupchat")
            && crate::common::body(e).as_deref() == Some(body)
    })
    .await
}

/// Wait for presence from an occupant JID.
pub async fn presence_from(c: &mut XmppClient, from: &str) -> Element {
    expect(c, &format!("presence from {from}"), |e| {
        e.name() == "presence" && e.attr("from") == Some(from)
    })
    .await
}

/// Wait for an unavailable presence from an occupant JID.
pub async fn unavailable_from(c: &mut XmppClient, from: &str) -> Element {
    expect(c, &format!("unavailable from {from}"), |e| {
        e.name() == "presence"
            && e.attr("from") == Some(from)
            && e.attr("type") == Some("unavailable")
    })
    .await
}

/// Wait for an error message from `from`.
pub async fn error_message(c: &mut XmppClient, from: &str) -> String {
    let m = expect(c, "error message", |e| {
        e.name() == "message" && e.attr("type") == Some("error") && e.attr("from") == Some(from)
    })
    .await;
    err_cond(&m)
}

/// disco#info features of an entity.
pub async fn features(c: &mut XmppClient, jid: &str) -> Vec<String> {
    let r = iq_ok(
        c,
        &format!(
            "<iq xmlns='jabber:client' type='get' to='{jid}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"
        ),
    )
    .await;
    r.get_child("query", "http://jabber.org/protocol/disco#info")
        .unwrap()
        .children()
        .filter(|c| c.name() == "feature")
        .filter_map(|c| c.attr("var").map(str::to_owned))
        .collect()
}

/// Send an admin IQ set with items.
pub async fn admin_set(c: &mut XmppClient, room: &str, items: &str) -> Element {
    c.iq(parse(&format!(
        "<iq xmlns='jabber:client' type='set' to='{room}'><query xmlns='{MUC_ADMIN}'>{items}</query></iq>"
    )))
    .await
    .unwrap()
}

/// An admin list: (jid, affiliation, nick, role) per item.
pub async fn admin_list(c: &mut XmppClient, room: &str, attr: &str, value: &str) -> Vec<Element> {
    let r = iq_ok(
        c,
        &format!(
            "<iq xmlns='jabber:client' type='get' to='{room}'><query xmlns='{MUC_ADMIN}'><item {attr}='{value}'/></query></iq>"
        ),
    )
    .await;
    r.get_child("query", MUC_ADMIN)
        .unwrap()
        .children()
        .cloned()
        .collect()
}

/// Wait for a presence from `from` with this affiliation and role.
pub async fn presence_with(c: &mut XmppClient, from: &str, aff: &str, role: &str) -> Element {
    expect(c, &format!("presence from {from} as {aff}/{role}"), |e| {
        e.name() == "presence"
            && e.attr("from") == Some(from)
            && e.get_child("x", MUC_USER)
                .and_then(|x| x.get_child("item", MUC_USER))
                .is_some_and(|i| i.attr("affiliation") == Some(aff) && i.attr("role") == Some(role))
    })
    .await
}

/// Everything that arrives within `ms` milliseconds (queued ones first).
pub async fn drain(c: &mut XmppClient, ms: u64) -> Vec<Element> {
    let old = c.timeout;
    c.timeout = std::time::Duration::from_millis(ms);
    let mut out = Vec::new();
    while let Ok(starling::client::ClientEvent::Element(e)) = c.recv_event().await {
        out.push(e);
    }
    c.timeout = old;
    out
}
