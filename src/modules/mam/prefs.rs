//! Archiving preferences (XEP-0441, `<prefs/>` in the `urn:xmpp:mam:2`
//! namespace) and what a user archive stores (XEP-0313 section 7.1.1).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jid::Jid;
use minidom::Element;

use crate::stanza::{StanzaError, name};
use crate::storage::archive::StoredPrefs;
use crate::xml::ns;

/// The `default` of the preferences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Always,
    Never,
    /// Archive only contacts in the roster. Until the roster exists this
    /// archives like `Always` (see `Prefs::allows`).
    Roster,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "always" => Some(Mode::Always),
            "never" => Some(Mode::Never),
            "roster" => Some(Mode::Roster),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Always => "always",
            Mode::Never => "never",
            Mode::Roster => "roster",
        }
    }
}

/// A user's effective preferences.
#[derive(Debug, Clone, PartialEq)]
pub struct Prefs {
    pub default: Mode,
    pub always: Vec<Jid>,
    pub never: Vec<Jid>,
}

fn matches(list: &[Jid], other: &Jid) -> bool {
    list.iter().any(|j| {
        if j.resource().is_some() {
            j == other
        } else {
            j.node() == other.node() && j.domain() == other.domain()
        }
    })
}

impl Prefs {
    /// The stored preferences, or the server default.
    pub fn from_stored(stored: Option<&StoredPrefs>, server_default: Mode) -> Prefs {
        let parse = |v: &[String]| v.iter().filter_map(|s| Jid::new(s).ok()).collect();
        match stored {
            Some(s) => Prefs {
                default: s
                    .default_mode
                    .as_deref()
                    .and_then(Mode::parse)
                    .unwrap_or(server_default),
                always: parse(&s.always),
                never: parse(&s.never),
            },
            None => Prefs {
                default: server_default,
                always: Vec::new(),
                never: Vec::new(),
            },
        }
    }

    /// Should a message with `other` (the contact's JID, full or bare) be
    /// archived? A bare JID in a list matches every resource of it; a full
    /// JID only itself. `never` wins over `always`.
    pub fn allows(&self, other: &Jid) -> bool {
        if matches(&self.never, other) {
            return false;
        }
        if matches(&self.always, other) {
            return true;
        }
        match self.default {
            Mode::Always => true,
            Mode::Never => false,
            // No roster on this server yet: every contact counts as in it.
            Mode::Roster => true,
        }
    }

    pub fn to_element(&self, qns: &str) -> Element {
        let list = |n: &str, v: &[Jid]| {
            Element::builder(n, qns)
                .append_all(
                    v.iter()
                        .map(|j| Element::builder("jid", qns).append(j.to_string()).build()),
                )
                .build()
        };
        Element::builder("prefs", qns)
            .attr(name("default"), self.default.as_str())
            .append(list("always", &self.always))
            .append(list("never", &self.never))
            .build()
    }

    pub fn to_stored(&self) -> StoredPrefs {
        StoredPrefs {
            default_mode: Some(self.default.as_str().to_owned()),
            always: self.always.iter().map(|j| j.to_string()).collect(),
            never: self.never.iter().map(|j| j.to_string()).collect(),
            retention_secs: None,
        }
    }
}

/// Parse a `<prefs/>` set. `max_jids` bounds always + never.
pub fn parse_prefs(el: &Element, max_jids: usize) -> Result<Prefs, StanzaError> {
    let qns = el.ns();
    let default = el.attr("default").and_then(Mode::parse).ok_or_else(|| {
        StanzaError::bad_request().with_text("prefs need default='always|never|roster'")
    })?;
    let mut lists: [Vec<Jid>; 2] = [Vec::new(), Vec::new()];
    for child in el.children() {
        let slot = match child.name() {
            "always" if child.ns() == qns => 0,
            "never" if child.ns() == qns => 1,
            _ => continue,
        };
        for j in child.children().filter(|c| c.is("jid", qns.as_str())) {
            let t = j.text();
            let jid = Jid::new(t.trim()).map_err(|_| {
                StanzaError::bad_request().with_text(format!("invalid JID in prefs: {t}"))
            })?;
            if !lists[slot].contains(&jid) {
                lists[slot].push(jid);
            }
        }
    }
    if lists[0].len() + lists[1].len() > max_jids {
        return Err(StanzaError::policy_violation().with_text(format!(
            "at most {max_jids} JIDs in the always and never lists"
        )));
    }
    let [always, never] = lists;
    Ok(Prefs {
        default,
        always,
        never,
    })
}

/// Is this message something a user archive keeps? Chat and normal
/// messages with a body, plus the payloads clients sync through the archive
/// without a body: chat markers (read state), reactions, retractions, call
/// invitations (XEP-0353), encrypted payloads (XEP-0380/OMEMO with a
/// payload), conference invitations, and anything with a `<store/>` hint.
/// Never: errors, headlines, groupchat (room archives keep those), chat
/// states and receipts alone, OMEMO key exchanges without payload, and
/// messages with a `<no-store/>` or `<no-permanent-store/>` hint.
pub fn is_archivable(msg: &Element) -> bool {
    match msg.attr("type").unwrap_or("normal") {
        "chat" | "normal" => {}
        _ => return false,
    }
    let mut keep = false;
    for c in msg.children() {
        let cns = c.ns();
        match (c.name(), cns.as_str()) {
            ("no-store" | "no-permanent-store", ns::HINTS) => return false,
            ("store", ns::HINTS) => keep = true,
            ("body", ns::CLIENT | ns::SERVER) => keep = true,
            ("encryption", ns::EME) => keep = true,
            ("encrypted", ns::OMEMO_LEGACY | ns::OMEMO2)
                if c.children().any(|p| p.name() == "payload") =>
            {
                keep = true
            }
            ("received" | "displayed" | "acknowledged", ns::CHAT_MARKERS) => keep = true,
            ("reactions", ns::REACTIONS) | ("retract", ns::RETRACT) => keep = true,
            (_, ns::JINGLE_MESSAGE) => keep = true,
            ("x", ns::CONFERENCE) => keep = true,
            ("x", ns::MUC_USER) if c.has_child("invite", ns::MUC_USER) => keep = true,
            _ => {}
        }
    }
    keep
}

/// A bounded cache of effective preferences (they are read for every
/// archived message; written only by the owner's `<prefs/>` set).
pub struct PrefsCache {
    map: Mutex<HashMap<String, (Instant, Arc<Prefs>)>>,
    capacity: usize,
    ttl: Duration,
}

impl PrefsCache {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        PrefsCache {
            map: Mutex::new(HashMap::new()),
            capacity,
            ttl,
        }
    }

    pub fn get(&self, owner: &str) -> Option<Arc<Prefs>> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(owner)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, p)| p.clone())
    }

    pub fn put(&self, owner: &str, prefs: Arc<Prefs>) {
        if self.capacity == 0 {
            return;
        }
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.capacity && !map.contains_key(owner) {
            let ttl = self.ttl;
            map.retain(|_, (at, _)| at.elapsed() < ttl);
            if map.len() >= self.capacity {
                map.clear();
            }
        }
        map.insert(owner.to_owned(), (Instant::now(), prefs));
    }

    pub fn invalidate(&self, owner: &str) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(owner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn el(xml: &str) -> Element {
        xml.parse().unwrap()
    }

    #[test]
    fn what_is_archived() {
        let yes = [
            "<message xmlns='jabber:client' type='chat'><body>hi</body></message>",
            "<message xmlns='jabber:client'><body>normal</body></message>",
            "<message xmlns='jabber:client' type='chat'><displayed xmlns='urn:xmpp:chat-markers:0' id='x'/></message>",
            "<message xmlns='jabber:client' type='chat'><reactions xmlns='urn:xmpp:reactions:0' id='x'/></message>",
            "<message xmlns='jabber:client' type='chat'><propose xmlns='urn:xmpp:jingle-message:0' id='c'/></message>",
            "<message xmlns='jabber:client' type='chat'><store xmlns='urn:xmpp:hints'/><x xmlns='y'/></message>",
            "<message xmlns='jabber:client' type='chat'><encrypted xmlns='eu.siacs.conversations.axolotl'><header/><payload>x</payload></encrypted></message>",
            "<message xmlns='jabber:client'><x xmlns='jabber:x:conference' jid='room@muc'/></message>",
        ];
        for m in yes {
            assert!(is_archivable(&el(m)), "{m}");
        }
        let no = [
            "<message xmlns='jabber:client' type='groupchat'><body>hi</body></message>",
            "<message xmlns='jabber:client' type='headline'><body>hi</body></message>",
            "<message xmlns='jabber:client' type='error'><body>hi</body></message>",
            "<message xmlns='jabber:client' type='chat'><active xmlns='http://jabber.org/protocol/chatstates'/></message>",
            "<message xmlns='jabber:client' type='chat'><received xmlns='urn:xmpp:receipts' id='x'/></message>",
            "<message xmlns='jabber:client' type='chat'><body>x</body><no-permanent-store xmlns='urn:xmpp:hints'/></message>",
            "<message xmlns='jabber:client' type='chat'><body>x</body><no-store xmlns='urn:xmpp:hints'/></message>",
            "<message xmlns='jabber:client' type='chat'><encrypted xmlns='eu.siacs.conversations.axolotl'><header/></encrypted></message>",
        ];
        for m in no {
            assert!(!is_archivable(&el(m)), "{m}");
        }
    }

    #[test]
    fn prefs_match_and_roundtrip() {
        let p = parse_prefs(
            &el("<prefs xmlns='urn:xmpp:mam:2' default='never'><always><jid>romeo@montague.lit</jid></always><never><jid>tybalt@capulet.lit/sword</jid></never></prefs>"),
            10,
        )
        .unwrap();
        assert!(p.allows(&Jid::new("romeo@montague.lit/orchard").unwrap()));
        assert!(p.allows(&Jid::new("romeo@montague.lit").unwrap()));
        assert!(!p.allows(&Jid::new("nurse@capulet.lit").unwrap()));
        let always = Prefs {
            default: Mode::Always,
            ..p.clone()
        };
        assert!(!always.allows(&Jid::new("tybalt@capulet.lit/sword").unwrap()));
        assert!(always.allows(&Jid::new("tybalt@capulet.lit/dagger").unwrap()));
        let back = parse_prefs(&p.to_element(ns::MAM), 10).unwrap();
        assert_eq!(back, p);
        let stored = p.to_stored();
        assert_eq!(Prefs::from_stored(Some(&stored), Mode::Always), p);
        assert_eq!(Prefs::from_stored(None, Mode::Roster).default, Mode::Roster);

        assert_eq!(
            parse_prefs(&el("<prefs xmlns='urn:xmpp:mam:2'/>"), 10)
                .unwrap_err()
                .condition,
            "bad-request"
        );
        assert_eq!(
            parse_prefs(&el("<prefs xmlns='urn:xmpp:mam:2' default='always'><always><jid>a@b</jid><jid>c@d</jid></always></prefs>"), 1)
                .unwrap_err()
                .condition,
            "policy-violation"
        );
    }

    #[test]
    fn cache_is_bounded() {
        let c = PrefsCache::new(2, Duration::from_secs(60));
        let p = Arc::new(Prefs::from_stored(None, Mode::Always));
        c.put("a", p.clone());
        c.put("b", p.clone());
        c.put("c", p.clone());
        assert!(c.get("c").is_some());
        assert!(c.map.lock().unwrap().len() <= 2);
        c.invalidate("c");
        assert!(c.get("c").is_none());
    }
}
