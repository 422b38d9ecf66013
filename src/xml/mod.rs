//! XML layer: the incremental stream parser (bytes in, stream events out) and
//! the serialiser (elements out as bytes). Both are sans-IO.

pub mod parser;
pub mod writer;

pub use minidom::Element;
pub use parser::{StreamEvent, StreamHeader, StreamParser, XmlError};
pub use writer::{serialize, serialize_into, stream_header};

/// Namespaces used throughout the server.
pub mod ns {
    pub const CLIENT: &str = "jabber:client";
    pub const SERVER: &str = "jabber:server";
    pub const DIALBACK: &str = "jabber:server:dialback";
    pub const DIALBACK_FEATURE: &str = "urn:xmpp:features:dialback";
    pub const BIDI: &str = "urn:xmpp:bidi";
    pub const BIDI_FEATURE: &str = "urn:xmpp:features:bidi";
    pub const STREAM: &str = "http://etherx.jabber.org/streams";
    pub const STREAM_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
    pub const STANZA_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
    pub const TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
    pub const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
    pub const BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
    pub const SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
    pub const SASL_CB: &str = "urn:xmpp:sasl-cb:0";
    pub const XML: &str = "http://www.w3.org/XML/1998/namespace";
    pub const DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
    pub const DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
    pub const PING: &str = "urn:xmpp:ping";
    pub const VERSION: &str = "jabber:iq:version";
    pub const TIME: &str = "urn:xmpp:time";
    pub const DELAY: &str = "urn:xmpp:delay";
    pub const DATA_FORMS: &str = "jabber:x:data";
    pub const CAPS: &str = "http://jabber.org/protocol/caps";
    pub const ROSTER: &str = "jabber:iq:roster";
    pub const ROSTERVER: &str = "urn:xmpp:features:rosterver";
    pub const SM: &str = "urn:xmpp:sm:3";
    pub const CSI: &str = "urn:xmpp:csi:0";
    pub const CARBONS: &str = "urn:xmpp:carbons:2";
    pub const FORWARD: &str = "urn:xmpp:forward:0";
    pub const HINTS: &str = "urn:xmpp:hints";
    pub const SID: &str = "urn:xmpp:sid:0";
    pub const MAM: &str = "urn:xmpp:mam:2";
    pub const MAM1: &str = "urn:xmpp:mam:1";
    pub const MAM_EXTENDED: &str = "urn:xmpp:mam:2#extended";
    pub const MAM_GROUPCHAT_FIELD: &str = "urn:xmpp:mam:2#groupchat-field";
    pub const XDATA_VALIDATE: &str = "http://jabber.org/protocol/xdata-validate";
    pub const EME: &str = "urn:xmpp:eme:0";
    pub const OMEMO_LEGACY: &str = "eu.siacs.conversations.axolotl";
    pub const OMEMO2: &str = "urn:xmpp:omemo:2";
    pub const REACTIONS: &str = "urn:xmpp:reactions:0";
    pub const RETRACT: &str = "urn:xmpp:message-retract:1";
    pub const JINGLE_MESSAGE: &str = "urn:xmpp:jingle-message:0";
    pub const CONFERENCE: &str = "jabber:x:conference";
    pub const RSM: &str = "http://jabber.org/protocol/rsm";
    pub const BLOCKING: &str = "urn:xmpp:blocking";
    pub const BLOCKING_ERRORS: &str = "urn:xmpp:blocking:errors";
    pub const VCARD: &str = "vcard-temp";
    pub const VCARD_UPDATE: &str = "vcard-temp:x:update";
    pub const PRIVATE: &str = "jabber:iq:private";
    pub const LAST: &str = "jabber:iq:last";
    pub const OFFLINE: &str = "msgoffline";
    pub const MUC: &str = "http://jabber.org/protocol/muc";
    pub const MUC_USER: &str = "http://jabber.org/protocol/muc#user";
    pub const MUC_ADMIN: &str = "http://jabber.org/protocol/muc#admin";
    pub const MUC_OWNER: &str = "http://jabber.org/protocol/muc#owner";
    pub const RECEIPTS: &str = "urn:xmpp:receipts";
    pub const CHAT_MARKERS: &str = "urn:xmpp:chat-markers:0";
}
