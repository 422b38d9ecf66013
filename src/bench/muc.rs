//! Scenario 4: room fan-out (XEP-0045). One room with N occupants; a few of
//! them send groupchat messages at a stepped rate; every occupant gets each
//! message. Figures are in deliveries (messages times occupants): delivered
//! stanzas per second, latency from send to each reception, server CPU per
//! delivery. Skipped, with the reason, when the server has no MUC service.
//!
//! The room is configured (when the server's form has the fields) to
//! broadcast presence of moderators only, so that N joins cost N presences
//! and not N squared, and to allow N occupants.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use minidom::Element;
use serde_json::json;
use tokio::sync::{Semaphore, oneshot};

use super::conn::{Conn, Handler, close_all};
use super::fleet::{Common, find_muc_service, login_many, logins_json, probe};
use super::messaging::{RateSteps, Recorder, Sender, filler, run_step, step_up};
use crate::stanza::name;
use crate::xml::ns;

pub struct MucOptions {
    pub occupants: usize,
    pub first_user: usize,
    /// Occupants that send (round-robin).
    pub senders: usize,
    pub body_bytes: usize,
    pub login_deadline: Duration,
    /// For the joins (after the logins).
    pub join_deadline: Duration,
    /// Rates in deliveries per second.
    pub steps: RateSteps,
}

type JoinResult = Result<Vec<String>, String>;

/// Messages go to the shared recorder; room presences complete joins.
struct MucHandler {
    rec: Arc<Recorder>,
    room: String,
    joins: Mutex<HashMap<usize, oneshot::Sender<JoinResult>>>,
}

impl Handler for MucHandler {
    fn message(&self, _idx: usize, msg: &Element) {
        self.rec.record(msg);
    }
    fn presence(&self, idx: usize, p: &Element) {
        let Some(from) = p.attr("from") else { return };
        let bare = from.split('/').next().unwrap_or(from);
        if !bare.eq_ignore_ascii_case(&self.room) {
            return;
        }
        let result = if p.attr("type") == Some("error") {
            Err(crate::client::stanza_error_condition(p).unwrap_or_else(|| "error".into()))
        } else {
            let Some(x) = p.get_child("x", ns::MUC_USER) else {
                return;
            };
            let codes: Vec<String> = x
                .children()
                .filter(|c| c.name() == "status")
                .filter_map(|c| c.attr("code").map(str::to_owned))
                .collect();
            if !codes.iter().any(|c| c == "110") {
                return;
            }
            Ok(codes)
        };
        let waiter = self
            .joins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&idx);
        if let Some(w) = waiter {
            let _ = w.send(result);
        }
    }
    fn closed(&self, idx: usize, reason: &str) {
        self.rec.closed(idx, reason);
        let waiter = self
            .joins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&idx);
        if let Some(w) = waiter {
            let _ = w.send(Err(format!("closed: {reason}")));
        }
    }
}

async fn join(h: &MucHandler, conn: &Conn, nick: &str, timeout: Duration) -> JoinResult {
    let (tx, rx) = oneshot::channel();
    h.joins
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(conn.idx, tx);
    let presence = Element::builder("presence", ns::CLIENT)
        .attr(name("to"), format!("{}/{nick}", h.room))
        .append(
            Element::builder("x", ns::MUC)
                .append(
                    Element::builder("history", ns::MUC)
                        .attr(name("maxstanzas"), "0")
                        .build(),
                )
                .build(),
        )
        .build();
    if !conn.send(&presence) {
        return Err("connection closed".into());
    }
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err("no answer".into()),
        Err(_) => Err("timed out".into()),
    }
}

/// Fill the room configuration form: allow `occupants`, broadcast presence
/// of moderators only, not persistent, not moderated, open. Only fields the
/// server's form has are submitted. Returns the submitted form and what was
/// set.
pub fn fill_room_form(form: &Element, occupants: usize) -> (Element, serde_json::Value) {
    let mut submit = Element::builder("x", ns::DATA_FORMS).attr(name("type"), "submit");
    let mut set = serde_json::Map::new();
    let field = |var: &str, values: &[String]| -> Element {
        let mut f = Element::builder("field", ns::DATA_FORMS).attr(name("var"), var);
        for v in values {
            f = f.append(
                Element::builder("value", ns::DATA_FORMS)
                    .append(v.as_str())
                    .build(),
            );
        }
        f.build()
    };
    for f in form.children().filter(|c| c.name() == "field") {
        let Some(var) = f.attr("var") else { continue };
        let options: Vec<String> = f
            .children()
            .filter(|c| c.name() == "option")
            .filter_map(|o| o.get_child("value", ns::DATA_FORMS).map(|v| v.text()))
            .collect();
        let value: Option<Vec<String>> = match var {
            "FORM_TYPE" => Some(vec!["http://jabber.org/protocol/muc#roomconfig".into()]),
            "muc#roomconfig_maxusers" => {
                if options.is_empty() {
                    Some(vec![(occupants + 10).to_string()])
                } else {
                    let mut nums: Vec<u64> =
                        options.iter().filter_map(|o| o.parse().ok()).collect();
                    nums.sort_unstable();
                    let pick = nums
                        .iter()
                        .find(|n| **n as usize > occupants)
                        .or(nums.last())
                        .map(|n| n.to_string());
                    match (pick, options.iter().find(|o| *o == "none" || *o == "0")) {
                        (Some(p), _) if p.parse::<usize>().unwrap_or(0) > occupants => {
                            Some(vec![p])
                        }
                        (_, Some(unlimited)) => Some(vec![unlimited.clone()]),
                        (Some(p), None) => Some(vec![p]),
                        (None, None) => None,
                    }
                }
            }
            "muc#roomconfig_presencebroadcast" => Some(vec!["moderator".into()]),
            "muc#roomconfig_persistentroom"
            | "muc#roomconfig_moderatedroom"
            | "muc#roomconfig_membersonly"
            | "muc#roomconfig_passwordprotectedroom"
            | "muc#roomconfig_publicroom" => Some(vec!["0".into()]),
            _ => None,
        };
        if let Some(v) = value {
            if var != "FORM_TYPE" {
                set.insert(var.to_owned(), json!(v));
            }
            submit = submit.append(field(var, &v));
        }
    }
    (submit.build(), serde_json::Value::Object(set))
}

async fn configure(conn: &Conn, room: &str, occupants: usize) -> Result<serde_json::Value, String> {
    let t = Duration::from_secs(30);
    let get = super::fleet::iq_get(room, "query", ns::MUC_OWNER);
    let reply = conn.iq(get, t).await.map_err(|e| e.to_string())?;
    let form = reply
        .get_child("query", ns::MUC_OWNER)
        .and_then(|q| q.get_child("x", ns::DATA_FORMS))
        .ok_or_else(|| "no configuration form".to_string())?;
    let (submit, set) = fill_room_form(form, occupants);
    let iq = Element::builder("iq", ns::CLIENT)
        .attr(name("type"), "set")
        .attr(name("to"), room)
        .append(
            Element::builder("query", ns::MUC_OWNER)
                .append(submit)
                .build(),
        )
        .build();
    let r = conn.iq(iq, t).await.map_err(|e| e.to_string())?;
    if r.attr("type") != Some("result") {
        return Err(format!(
            "configuration refused: {}",
            crate::client::stanza_error_condition(&r).unwrap_or_default()
        ));
    }
    Ok(set)
}

pub async fn room_fanout(common: &Common, o: &MucOptions) -> serde_json::Value {
    let rec = Arc::new(Recorder::default());
    // The room name is known before the logins so that the handler can
    // recognise its presences.
    let probe_login = login_many(
        common,
        o.first_user..o.first_user + 1,
        Arc::new(super::conn::Ignore),
        o.login_deadline,
    )
    .await;
    let Some(first) = probe_login.conns.first() else {
        return json!({"scenario": "muc", "occupants": o.occupants,
            "error": format!("cannot log in: {:?}", probe_login.first_error)});
    };
    let server = probe(first, &common.target.domain).await;
    let service = find_muc_service(first, &common.target.domain).await;
    close_all(probe_login.conns, Duration::from_secs(5)).await;
    let Some(service) = service else {
        eprintln!("muc: skipped: the server offers no MUC service");
        return json!({
            "scenario": "muc",
            "occupants": o.occupants,
            "skipped": "the server offers no MUC service (no disco item with a conference identity)",
            "server": server,
        });
    };
    let room = format!(
        "bench{}x{}@{service}",
        std::process::id(),
        super::conn::now_us() % 1_000_000_000
    );
    let handler = Arc::new(MucHandler {
        rec: rec.clone(),
        room: room.clone(),
        joins: Mutex::new(HashMap::new()),
    });
    let mut l = login_many(
        common,
        o.first_user..o.first_user + o.occupants,
        handler.clone(),
        o.login_deadline,
    )
    .await;
    let logins = logins_json(&mut l);
    let mut config = serde_json::Value::Null;
    let mut joined: Vec<&Conn> = Vec::new();
    let mut join_failures: HashMap<String, u64> = HashMap::new();
    let join_start = Instant::now();
    if let Some(owner) = l.conns.first() {
        match join(
            &handler,
            owner,
            &format!("n{}", owner.idx),
            Duration::from_secs(30),
        )
        .await
        {
            Ok(codes) => {
                if codes.iter().any(|c| c == "201") {
                    config = match configure(owner, &room, o.occupants).await {
                        Ok(set) => set,
                        Err(e) => json!({"error": e}),
                    };
                }
                joined.push(owner);
            }
            Err(e) => {
                *join_failures.entry(e).or_default() += 1;
            }
        }
    }
    if !joined.is_empty() {
        let sem = Arc::new(Semaphore::new(common.concurrency.max(1)));
        let deadline = o.join_deadline;
        let results = futures::future::join_all(l.conns.iter().skip(1).map(|c| {
            let sem = sem.clone();
            let handler = handler.clone();
            async move {
                let _p = sem.acquire_owned().await.ok();
                (c, join(&handler, c, &format!("n{}", c.idx), deadline).await)
            }
        }));
        let results = tokio::time::timeout(deadline + Duration::from_secs(5), results)
            .await
            .unwrap_or_default();
        for (c, r) in results {
            match r {
                Ok(_) => joined.push(c),
                Err(e) => *join_failures.entry(e).or_default() += 1,
            }
        }
    }
    let join_wall = join_start.elapsed().as_secs_f64();
    eprintln!(
        "muc: {} of {} occupants joined {room} in {join_wall:.1} s",
        joined.len(),
        o.occupants
    );
    let body = filler(o.body_bytes);
    let fanout = joined.len() as u64;
    let senders: Vec<Sender> = joined
        .iter()
        .take(o.senders.max(1))
        .map(|c| Sender {
            conn: c,
            head: format!("<message to='{room}' type='groupchat'"),
        })
        .collect();
    let result = if fanout < 2 {
        json!({"error": "fewer than two occupants joined"})
    } else {
        let seq = std::sync::atomic::AtomicU64::new(0);
        let (senders, rec, body, seq, steps) = (&senders, &rec, &body, &seq, &o.steps);
        let pid = common.server_pid;
        step_up(steps, |step_no, rate| async move {
            // `rate` is in deliveries per second.
            run_step(
                senders,
                rec,
                step_no,
                rate / fanout as f64,
                fanout,
                body,
                steps,
                pid,
                seq,
            )
            .await
        })
        .await
    };
    let closed = rec.closed.load(Ordering::Relaxed);
    let first_error = rec
        .first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    drop(senders);
    drop(joined);
    close_all(std::mem::take(&mut l.conns), Duration::from_secs(10)).await;
    json!({
        "scenario": "muc",
        "occupants": o.occupants,
        "senders": o.senders,
        "service": service,
        "room": room,
        "room_config": config,
        "logins": logins,
        "joined": fanout,
        "join_failures": join_failures,
        "join_wall_s": join_wall,
        "result": result,
        "connections_lost": closed,
        "first_error": first_error,
        "server": server,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_form_is_filled_with_what_the_server_has() {
        let form: Element = "<x xmlns='jabber:x:data' type='form'>\
            <field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/muc#roomconfig</value></field>\
            <field var='muc#roomconfig_maxusers' type='list-single'><value>200</value>\
              <option><value>100</value></option><option><value>200</value></option>\
              <option><value>500</value></option><option><value>5000</value></option></field>\
            <field var='muc#roomconfig_presencebroadcast' type='list-multi'>\
              <value>moderator</value><value>participant</value><value>visitor</value></field>\
            <field var='muc#roomconfig_roomname' type='text-single'/>\
            <field var='muc#roomconfig_persistentroom' type='boolean'><value>1</value></field>\
            </x>"
            .parse()
            .unwrap();
        let (submit, set) = fill_room_form(&form, 2000);
        assert_eq!(submit.attr("type"), Some("submit"));
        assert_eq!(set["muc#roomconfig_maxusers"], json!(["5000"]));
        assert_eq!(
            set["muc#roomconfig_presencebroadcast"],
            json!(["moderator"])
        );
        assert_eq!(set["muc#roomconfig_persistentroom"], json!(["0"]));
        assert!(set.get("muc#roomconfig_roomname").is_none());
        assert_eq!(submit.children().count(), 4);

        let (_, set2) = fill_room_form(&form, 200);
        assert_eq!(set2["muc#roomconfig_maxusers"], json!(["500"]));

        let text: Element = "<x xmlns='jabber:x:data' type='form'>\
            <field var='muc#roomconfig_maxusers' type='text-single'/></x>"
            .parse()
            .unwrap();
        let (_, set3) = fill_room_form(&text, 2000);
        assert_eq!(set3["muc#roomconfig_maxusers"], json!(["2010"]));
    }
}
