//! Roles, affiliations and small shared helpers of the MUC service.

use std::time::Instant;

use minidom::Element;

use crate::stanza::name;
use crate::xml::ns;

/// Namespaces used only by the MUC service.
pub const NS_OCCUPANT_ID: &str = "urn:xmpp:occupant-id:0";
pub const NS_MUC_REQUEST: &str = "http://jabber.org/protocol/muc#request";
pub const NS_MUC_REGISTER: &str = "http://jabber.org/protocol/muc#register";
pub const NS_MUC_ROOMCONFIG: &str = "http://jabber.org/protocol/muc#roomconfig";
pub const NS_MUC_ROOMINFO: &str = "http://jabber.org/protocol/muc#roominfo";
pub const NS_MUC_STABLE_ID: &str = "http://jabber.org/protocol/muc#stable_id";
pub const NS_MUC_SELF_PING: &str = "http://jabber.org/protocol/muc#self-ping-optimization";
pub const NS_REGISTER: &str = "jabber:iq:register";
pub const NS_CONFERENCE: &str = "jabber:x:conference";
pub const NS_MAM_EXTENDED: &str = "urn:xmpp:mam:2#extended";
pub const NS_VCARD: &str = "vcard-temp";
pub const NS_ADDRESS: &str = "http://jabber.org/protocol/address";

/// Long-lived association of a bare JID with a room, in rank order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Affiliation {
    Outcast,
    None,
    Member,
    Admin,
    Owner,
}

impl Affiliation {
    pub fn as_str(self) -> &'static str {
        match self {
            Affiliation::Outcast => "outcast",
            Affiliation::None => "none",
            Affiliation::Member => "member",
            Affiliation::Admin => "admin",
            Affiliation::Owner => "owner",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "outcast" => Affiliation::Outcast,
            "none" => Affiliation::None,
            "member" => Affiliation::Member,
            "admin" => Affiliation::Admin,
            "owner" => Affiliation::Owner,
            _ => return None,
        })
    }
}

/// Session-long role of an occupant, in rank order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    None,
    Visitor,
    Participant,
    Moderator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::None => "none",
            Role::Visitor => "visitor",
            Role::Participant => "participant",
            Role::Moderator => "moderator",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => Role::None,
            "visitor" => Role::Visitor,
            "participant" => Role::Participant,
            "moderator" => Role::Moderator,
            _ => return None,
        })
    }
}

/// The role an occupant gets on entering (XEP-0045 section 5.1.2).
pub fn default_role(aff: Affiliation, moderated: bool) -> Role {
    match aff {
        Affiliation::Owner | Affiliation::Admin => Role::Moderator,
        Affiliation::Member => Role::Participant,
        Affiliation::None if moderated => Role::Visitor,
        Affiliation::None => Role::Participant,
        Affiliation::Outcast => Role::None,
    }
}

/// MUC status codes (XEP-0045 section 15.6).
pub mod status {
    pub const NON_ANONYMOUS: u16 = 100;
    pub const AFFILIATION_CHANGED_OFFLINE: u16 = 101;
    pub const CONFIG_CHANGED: u16 = 104;
    pub const SELF: u16 = 110;
    pub const LOGGING_ON: u16 = 170;
    pub const LOGGING_OFF: u16 = 171;
    pub const NOW_NON_ANONYMOUS: u16 = 172;
    pub const NOW_SEMI_ANONYMOUS: u16 = 173;
    pub const CREATED: u16 = 201;
    pub const BANNED: u16 = 301;
    pub const NICK_CHANGED: u16 = 303;
    pub const KICKED: u16 = 307;
    pub const AFFILIATION_REMOVED: u16 = 321;
    pub const MEMBERS_ONLY_REMOVED: u16 = 322;
    pub const SHUTDOWN: u16 = 332;
    pub const TECHNICAL: u16 = 333;
}

/// A `<status code='…'/>` element of muc#user.
pub fn status_el(code: u16) -> Element {
    Element::builder("status", ns::MUC_USER)
        .attr(name("code"), code.to_string())
        .build()
}

/// A token bucket: `rate` tokens per second up to `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(burst: f64) -> Self {
        TokenBucket {
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Take one token if available.
    pub fn take(&mut self, rate: f64, burst: f64) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A nickname fit for a room: resourceprep was applied by the JID parser;
/// it must not be empty or only spaces, and not too long.
pub fn valid_nick(nick: &str, max_chars: usize) -> bool {
    !nick.trim().is_empty() && nick.chars().count() <= max_chars
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_and_defaults() {
        assert!(Affiliation::Owner > Affiliation::Admin);
        assert!(Affiliation::None > Affiliation::Outcast);
        assert!(Role::Moderator > Role::Visitor);
        for a in ["outcast", "none", "member", "admin", "owner"] {
            assert_eq!(Affiliation::parse(a).unwrap().as_str(), a);
        }
        for r in ["none", "visitor", "participant", "moderator"] {
            assert_eq!(Role::parse(r).unwrap().as_str(), r);
        }
        assert_eq!(default_role(Affiliation::None, true), Role::Visitor);
        assert_eq!(default_role(Affiliation::None, false), Role::Participant);
        assert_eq!(default_role(Affiliation::Member, true), Role::Participant);
        assert_eq!(default_role(Affiliation::Admin, false), Role::Moderator);
        assert!(Affiliation::parse("god").is_none());
    }

    #[test]
    fn bucket_limits_bursts() {
        let mut b = TokenBucket::new(3.0);
        assert!(b.take(0.001, 3.0));
        assert!(b.take(0.001, 3.0));
        assert!(b.take(0.001, 3.0));
        assert!(!b.take(0.001, 3.0));
    }

    #[test]
    fn nicks() {
        assert!(valid_nick("alice", 10));
        assert!(!valid_nick("   ", 10));
        assert!(!valid_nick("", 10));
        assert!(!valid_nick("abcdefghijk", 10));
        assert!(valid_nick("ünïcødé", 10));
    }
}
