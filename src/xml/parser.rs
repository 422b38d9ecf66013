//! Incremental XMPP stream parser.
//!
//! Bytes go in through [`StreamParser::feed`] in chunks of any size (a split
//! at every byte boundary gives the same result); [`StreamEvent`]s come out:
//! the stream header, one [`Element`] per top-level child (stanza or
//! negotiation element), and the end of the stream.
//!
//! The lexical work is done by `rxml`'s raw parser, which implements the
//! restricted XML profile of RFC 6120 section 11.1 (no DTD, comments,
//! processing instructions or entities beyond the five predefined ones).
//! Namespace resolution is done here, so that the declared default namespace
//! of the stream header is visible and unbound prefixes map to the right
//! stream error (`bad-namespace-prefix`).
//!
//! Limits: the number of bytes of one top-level element (stanza) and of the
//! stream header are bounded; a longer one gives [`XmlError::TooLarge`]
//! before more than the limit is buffered. Element nesting depth is bounded
//! too.

use minidom::Element;
use rxml::error::EndOrError;
use rxml::{NcName, Parse, RawEvent, RawParser, RawQName, WithOptions};

use super::ns;

/// Maximum element nesting inside one stanza.
pub const MAX_DEPTH: usize = 64;

/// The opening `<stream:stream>` element, with what RFC 6120 section 4.7
/// asks a receiver to check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamHeader {
    /// Namespace of the root element (must be `http://etherx.jabber.org/streams`).
    pub stream_ns: String,
    /// Local name of the root element (must be `stream`).
    pub local_name: String,
    /// Default namespace declared on the header (`jabber:client` / `jabber:server`).
    pub default_ns: String,
    pub to: Option<String>,
    pub from: Option<String>,
    pub id: Option<String>,
    pub version: Option<String>,
    pub lang: Option<String>,
    /// `xmlns:db` declaration (server dialback), if any.
    pub dialback_ns: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    Header(StreamHeader),
    Element(Element),
    /// `</stream:stream>` was received.
    End,
}

/// What went wrong, already sorted by the stream error it deserves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    #[error("not well-formed: {0}")]
    NotWellFormed(String),
    #[error("restricted XML: {0}")]
    RestrictedXml(String),
    #[error("element larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("unbound namespace prefix {0}")]
    BadNamespacePrefix(String),
}

impl XmlError {
    /// The RFC 6120 section 4.9.3 stream error condition for this error.
    pub fn condition(&self) -> &'static str {
        match self {
            XmlError::NotWellFormed(_) => "not-well-formed",
            XmlError::RestrictedXml(_) => "restricted-xml",
            XmlError::TooLarge(_) => "policy-violation",
            XmlError::BadNamespacePrefix(_) => "bad-namespace-prefix",
        }
    }
}

/// An element whose header is being read (between `<name` and `>`).
struct PendingHead {
    name: RawQName,
    attrs: Vec<(RawQName, String)>,
    decls: Vec<(Option<String>, String)>,
}

/// One open element with the namespace declarations it made.
struct Open {
    element: Element,
    /// Prefix declarations made on this element (None = default namespace).
    decls: Vec<(Option<String>, String)>,
}

pub struct StreamParser {
    raw: RawParser,
    max_element_bytes: usize,
    head: Option<PendingHead>,
    /// Namespace declarations of the stream header (depth 0).
    root_decls: Vec<(Option<String>, String)>,
    root_open: bool,
    /// Open elements below the root; `stack[0]` is the current stanza.
    stack: Vec<Open>,
    /// Bytes of the current top-level element (or of the header).
    current_bytes: usize,
    events: std::collections::VecDeque<StreamEvent>,
    failed: Option<XmlError>,
    ended: bool,
    /// Hand out elements of `jabber:server` as `jabber:client` (the
    /// namespace stanzas have inside the server).
    server_as_client: bool,
}

impl StreamParser {
    pub fn new(max_element_bytes: usize) -> Self {
        // One token (attribute value, text chunk, name) may not be longer
        // than a whole element; rxml splits longer texts into several events
        // and rejects longer names and attribute values.
        let options = rxml::Options {
            max_token_length: max_element_bytes.max(64),
            ..rxml::Options::default()
        };
        StreamParser {
            raw: RawParser::with_options(options),
            max_element_bytes,
            head: None,
            root_decls: Vec::new(),
            root_open: false,
            stack: Vec::new(),
            current_bytes: 0,
            events: Default::default(),
            failed: None,
            ended: false,
            server_as_client: false,
        }
    }

    /// For server-to-server streams: elements qualified by `jabber:server`
    /// come out qualified by `jabber:client`, so that stanzas from remote
    /// servers look like every other stanza inside Starling (the writer
    /// turns them back when they go out on a `jabber:server` stream).
    pub fn server_stanzas_as_client(mut self) -> Self {
        self.server_as_client = true;
        self
    }

    /// True once `</stream:stream>` was parsed.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// True while inside a top-level element (a stanza is partly received).
    pub fn in_element(&self) -> bool {
        !self.stack.is_empty() || (self.head.is_some() && self.root_open)
    }

    /// Feed bytes. Parsed events are queued for [`StreamParser::next_event`].
    /// After an error, every later call returns the same error.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), XmlError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        // rxml may produce several events from one byte (`/>` closes a head
        // and ends the element), so keep asking until it needs more data.
        while !self.ended {
            let before = data.len();
            match self.raw.parse(&mut data, false) {
                Ok(Some(ev)) => {
                    if let Err(e) = self.handle(ev) {
                        self.failed = Some(e.clone());
                        return Err(e);
                    }
                }
                Ok(None) | Err(EndOrError::NeedMoreData) => {
                    if data.is_empty() || data.len() == before {
                        break;
                    }
                }
                Err(EndOrError::Error(e)) => {
                    let err = map_rxml_error(e, self.max_element_bytes);
                    self.failed = Some(err.clone());
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    pub fn next_event(&mut self) -> Option<StreamEvent> {
        self.events.pop_front()
    }

    fn count(&mut self, n: usize) -> Result<(), XmlError> {
        self.current_bytes += n;
        if self.current_bytes > self.max_element_bytes {
            return Err(XmlError::TooLarge(self.max_element_bytes));
        }
        Ok(())
    }

    fn handle(&mut self, ev: RawEvent) -> Result<(), XmlError> {
        match ev {
            RawEvent::XmlDeclaration(..) => Ok(()),
            RawEvent::ElementHeadOpen(m, name) => {
                if self.root_open && self.stack.is_empty() {
                    self.current_bytes = 0;
                }
                self.count(m.len())?;
                if self.stack.len() >= MAX_DEPTH {
                    return Err(XmlError::TooLarge(self.max_element_bytes));
                }
                self.head = Some(PendingHead {
                    name,
                    attrs: Vec::new(),
                    decls: Vec::new(),
                });
                Ok(())
            }
            RawEvent::Attribute(m, (prefix, local), value) => {
                self.count(m.len())?;
                let head = self
                    .head
                    .as_mut()
                    .ok_or_else(|| XmlError::NotWellFormed("attribute outside a tag".into()))?;
                match prefix {
                    None if local.as_str() == "xmlns" => head.decls.push((None, value)),
                    Some(p) if p.as_str() == "xmlns" => {
                        head.decls.push((Some(local.as_str().to_owned()), value))
                    }
                    _ => head.attrs.push(((prefix, local), value)),
                }
                Ok(())
            }
            RawEvent::ElementHeadClose(m) => {
                self.count(m.len())?;
                let head = self
                    .head
                    .take()
                    .ok_or_else(|| XmlError::NotWellFormed("tag close without open".into()))?;
                if !self.root_open {
                    self.open_root(head)
                } else {
                    self.open_child(head)
                }
            }
            RawEvent::Text(m, text) => {
                if let Some(top) = self.stack.last_mut() {
                    self.current_bytes += m.len();
                    if self.current_bytes > self.max_element_bytes {
                        return Err(XmlError::TooLarge(self.max_element_bytes));
                    }
                    top.element.append_text(text);
                }
                // Text directly inside the stream element is whitespace
                // keepalive (RFC 6120 section 4.6.1); anything else is ignored.
                Ok(())
            }
            RawEvent::ElementFoot(m) => {
                match self.stack.pop() {
                    Some(open) => {
                        self.count(m.len())?;
                        if let Some(parent) = self.stack.last_mut() {
                            parent.element.append_child(open.element);
                        } else {
                            self.current_bytes = 0;
                            self.events.push_back(StreamEvent::Element(open.element));
                        }
                    }
                    None => {
                        self.ended = true;
                        self.events.push_back(StreamEvent::End);
                    }
                }
                Ok(())
            }
        }
    }

    fn lookup(&self, prefix: Option<&str>, extra: &[(Option<String>, String)]) -> Option<String> {
        let matches = |d: &&(Option<String>, String)| d.0.as_deref() == prefix;
        if let Some(d) = extra.iter().rev().find(matches) {
            return Some(d.1.clone());
        }
        for open in self.stack.iter().rev() {
            if let Some(d) = open.decls.iter().rev().find(matches) {
                return Some(d.1.clone());
            }
        }
        if let Some(d) = self.root_decls.iter().rev().find(matches) {
            return Some(d.1.clone());
        }
        match prefix {
            Some("xml") => Some(ns::XML.to_owned()),
            None => Some(String::new()),
            Some(_) => None,
        }
    }

    fn resolve_element_ns(
        &self,
        head: &PendingHead,
        decls: &[(Option<String>, String)],
    ) -> Result<String, XmlError> {
        let prefix = head.name.0.as_ref().map(|p| p.as_str());
        self.lookup(prefix, decls)
            .ok_or_else(|| XmlError::BadNamespacePrefix(prefix.unwrap_or("").to_owned()))
    }

    fn open_root(&mut self, head: PendingHead) -> Result<(), XmlError> {
        let stream_ns = self.resolve_element_ns(&head, &head.decls)?;
        let mut header = StreamHeader {
            stream_ns,
            local_name: head.name.1.as_str().to_owned(),
            default_ns: head
                .decls
                .iter()
                .rev()
                .find(|d| d.0.is_none())
                .map(|d| d.1.clone())
                .unwrap_or_default(),
            dialback_ns: head
                .decls
                .iter()
                .find(|d| d.0.as_deref() == Some("db"))
                .map(|d| d.1.clone()),
            ..Default::default()
        };
        for ((prefix, local), value) in head.attrs {
            match (prefix.as_ref().map(|p| p.as_str()), local.as_str()) {
                (None, "to") => header.to = Some(value),
                (None, "from") => header.from = Some(value),
                (None, "id") => header.id = Some(value),
                (None, "version") => header.version = Some(value),
                (Some("xml"), "lang") => header.lang = Some(value),
                (Some(p), _) if self.lookup(Some(p), &head.decls).is_none() => {
                    return Err(XmlError::BadNamespacePrefix(p.to_owned()));
                }
                _ => {}
            }
        }
        self.root_decls = head.decls;
        self.root_open = true;
        self.current_bytes = 0;
        self.events.push_back(StreamEvent::Header(header));
        Ok(())
    }

    fn open_child(&mut self, head: PendingHead) -> Result<(), XmlError> {
        let mut element_ns = self.resolve_element_ns(&head, &head.decls)?;
        if self.server_as_client && element_ns == ns::SERVER {
            element_ns = ns::CLIENT.to_owned();
        }
        let mut builder = Element::builder(head.name.1.as_str(), element_ns);
        let mut seen: Vec<(String, &str)> = Vec::with_capacity(head.attrs.len());
        for ((prefix, local), _) in &head.attrs {
            let attr_ns = match prefix {
                None => String::new(),
                Some(p) => self
                    .lookup(Some(p.as_str()), &head.decls)
                    .ok_or_else(|| XmlError::BadNamespacePrefix(p.as_str().to_owned()))?,
            };
            if seen
                .iter()
                .any(|(n, l)| *n == attr_ns && *l == local.as_str())
            {
                return Err(XmlError::NotWellFormed(format!(
                    "duplicate attribute {}",
                    local.as_str()
                )));
            }
            seen.push((attr_ns, local.as_str()));
        }
        let namespaces: Vec<String> = seen.into_iter().map(|(n, _)| n).collect();
        for (((_, local), value), attr_ns) in head.attrs.into_iter().zip(namespaces) {
            let local: NcName = local;
            if attr_ns.is_empty() {
                builder = builder.attr(local, value);
            } else {
                builder = builder.attr_ns(rxml::Namespace::from(attr_ns), local, value);
            }
        }
        self.stack.push(Open {
            element: builder.build(),
            decls: head.decls,
        });
        Ok(())
    }
}

fn map_rxml_error(e: rxml::Error, max: usize) -> XmlError {
    match e {
        rxml::Error::RestrictedXml(what) => {
            if what.contains("too long") || what.contains("long name") {
                XmlError::TooLarge(max)
            } else {
                XmlError::RestrictedXml(what.to_owned())
            }
        }
        rxml::Error::UndeclaredEntity => XmlError::RestrictedXml("undeclared entity".into()),
        rxml::Error::UnexpectedChar(_, '!', _) | rxml::Error::UnexpectedByte(_, b'!', _) => {
            XmlError::RestrictedXml("document type declaration".into())
        }
        rxml::Error::InvalidSyntax(s) if s.contains("cdata") || s.contains("DOCTYPE") => {
            // `<!` followed by anything other than `[CDATA[` is a DTD or a
            // comment variant: both are restricted.
            XmlError::RestrictedXml(format!("markup declaration ({s})"))
        }
        other => XmlError::NotWellFormed(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0' xml:lang='en'>";

    fn parse_all(input: &[u8], max: usize) -> (Vec<StreamEvent>, Option<XmlError>) {
        let mut p = StreamParser::new(max);
        let err = p.feed(input).err();
        let mut out = Vec::new();
        while let Some(e) = p.next_event() {
            out.push(e);
        }
        (out, err)
    }

    #[test]
    fn header_and_stanzas() {
        let doc = format!(
            "{HEADER}<message to='a@b' type='chat'><body>hi &amp; &#x263A;</body></message> \
             <iq type='get' id='1'><query xmlns='jabber:iq:roster'/></iq></stream:stream>"
        );
        let (evs, err) = parse_all(doc.as_bytes(), 1 << 20);
        assert_eq!(err, None);
        assert_eq!(evs.len(), 4);
        match &evs[0] {
            StreamEvent::Header(h) => {
                assert_eq!(h.stream_ns, ns::STREAM);
                assert_eq!(h.local_name, "stream");
                assert_eq!(h.default_ns, ns::CLIENT);
                assert_eq!(h.to.as_deref(), Some("localhost"));
                assert_eq!(h.version.as_deref(), Some("1.0"));
                assert_eq!(h.lang.as_deref(), Some("en"));
            }
            other => panic!("unexpected {other:?}"),
        }
        match &evs[1] {
            StreamEvent::Element(e) => {
                assert!(e.is("message", ns::CLIENT));
                assert_eq!(e.attr("to"), Some("a@b"));
                let body = e.get_child("body", ns::CLIENT).unwrap();
                assert_eq!(body.text(), "hi & \u{263A}");
            }
            other => panic!("unexpected {other:?}"),
        }
        match &evs[2] {
            StreamEvent::Element(e) => {
                assert!(e.is("iq", ns::CLIENT));
                assert!(e.get_child("query", ns::ROSTER).is_some());
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(evs[3], StreamEvent::End);
    }

    #[test]
    fn split_at_every_byte_boundary_gives_same_events() {
        let doc = format!(
            "{HEADER}<message to='a@b'><body>h\u{e9}llo &lt;&gt; w\u{263A}rld</body>\
             <x xmlns='urn:x' xmlns:p='urn:p' p:attr='v'><p:y/></x></message>\
             <presence/></stream:stream>"
        );
        let bytes = doc.as_bytes();
        let (expected, err) = parse_all(bytes, 1 << 20);
        assert_eq!(err, None);
        assert_eq!(expected.len(), 4);
        for split in 0..bytes.len() {
            let mut p = StreamParser::new(1 << 20);
            p.feed(&bytes[..split]).unwrap();
            p.feed(&bytes[split..]).unwrap();
            let mut got = Vec::new();
            while let Some(e) = p.next_event() {
                got.push(e);
            }
            assert_eq!(got, expected, "split at {split}");
        }
        // And one byte at a time.
        let mut p = StreamParser::new(1 << 20);
        for b in bytes {
            p.feed(std::slice::from_ref(b)).unwrap();
        }
        let mut got = Vec::new();
        while let Some(e) = p.next_event() {
            got.push(e);
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn prefixed_namespaces_resolve() {
        let doc = format!("{HEADER}<x:iq xmlns:x='jabber:client' type='get'><x:a/></x:iq>");
        let (evs, err) = parse_all(doc.as_bytes(), 1 << 20);
        assert_eq!(err, None);
        match &evs[1] {
            StreamEvent::Element(e) => {
                assert!(e.is("iq", ns::CLIENT));
                assert!(e.get_child("a", ns::CLIENT).is_some());
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn xml_lang_attribute_is_namespaced() {
        let doc = format!("{HEADER}<message xml:lang='de'><body>x</body></message>");
        let (evs, _) = parse_all(doc.as_bytes(), 1 << 20);
        match &evs[1] {
            StreamEvent::Element(e) => assert_eq!(e.attr_ns(ns::XML, "lang"), Some("de")),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn restricted_xml_is_rejected() {
        for bad in [
            "<!-- comment --><message/>",
            "<?pi data?><message/>",
            "<message><body>&foo;</body></message>",
            "<message><!-- c --></message>",
        ] {
            let doc = format!("{HEADER}{bad}");
            let (_, err) = parse_all(doc.as_bytes(), 1 << 20);
            let err = err.unwrap_or_else(|| panic!("{bad} accepted"));
            assert_eq!(err.condition(), "restricted-xml", "{bad}: {err:?}");
        }
        let doc = "<?xml version='1.0'?><!DOCTYPE foo [<!ENTITY x 'y'>]><stream:stream/>";
        let (_, err) = parse_all(doc.as_bytes(), 1 << 20);
        assert_eq!(err.unwrap().condition(), "restricted-xml");
    }

    #[test]
    fn malformed_xml_is_not_well_formed() {
        for bad in [
            "<message></presence>",
            "<message a='1' a='2'/>",
            "<message><</message>",
            "<message>\u{1}</message>",
        ] {
            let doc = format!("{HEADER}{bad}");
            let (_, err) = parse_all(doc.as_bytes(), 1 << 20);
            let err = err.unwrap_or_else(|| panic!("{bad} accepted"));
            assert_eq!(err.condition(), "not-well-formed", "{bad}: {err:?}");
        }
        // invalid UTF-8
        let mut doc = HEADER.as_bytes().to_vec();
        doc.extend_from_slice(b"<message><body>\xff\xfe</body></message>");
        let (_, err) = parse_all(&doc, 1 << 20);
        assert_eq!(err.unwrap().condition(), "not-well-formed");
    }

    #[test]
    fn unbound_prefix_is_bad_namespace_prefix() {
        let doc = format!("{HEADER}<foo:message/>");
        let (_, err) = parse_all(doc.as_bytes(), 1 << 20);
        assert_eq!(err.unwrap().condition(), "bad-namespace-prefix");
    }

    #[test]
    fn oversized_stanza_is_policy_violation_before_buffering_it_all() {
        let max = 1024;
        let mut p = StreamParser::new(max);
        p.feed(HEADER.as_bytes()).unwrap();
        p.feed(b"<message><body>").unwrap();
        let chunk = vec![b'a'; 100];
        let mut failed = None;
        for i in 0..100 {
            if let Err(e) = p.feed(&chunk) {
                failed = Some((i, e));
                break;
            }
        }
        let (i, e) = failed.expect("limit not enforced");
        assert_eq!(e.condition(), "policy-violation");
        assert!(i * 100 <= 2 * max, "failed only after {} bytes", i * 100);
        // A huge attribute value too.
        let mut p = StreamParser::new(max);
        p.feed(HEADER.as_bytes()).unwrap();
        let big = format!("<message to='{}'/>", "x".repeat(5000));
        assert_eq!(
            p.feed(big.as_bytes()).unwrap_err().condition(),
            "policy-violation"
        );
        // Many small stanzas of a legal size never trip the limit.
        let mut p = StreamParser::new(max);
        p.feed(HEADER.as_bytes()).unwrap();
        for _ in 0..100 {
            p.feed(b"<message><body>0123456789012345678901234567890</body></message>")
                .unwrap();
        }
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut doc = HEADER.to_owned();
        for _ in 0..(MAX_DEPTH + 2) {
            doc.push_str("<a>");
        }
        let (_, err) = parse_all(doc.as_bytes(), 1 << 20);
        assert_eq!(err.unwrap().condition(), "policy-violation");
    }

    #[test]
    fn whitespace_keepalives_are_ignored() {
        let doc = format!("{HEADER} \n <presence/>\n\n ");
        let (evs, err) = parse_all(doc.as_bytes(), 1 << 20);
        assert_eq!(err, None);
        assert_eq!(evs.len(), 2);
    }

    #[test]
    fn server_stanzas_can_come_out_as_client() {
        let doc = "<stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' \
            xmlns:stream='http://etherx.jabber.org/streams' to='a.test' version='1.0'>\
            <message from='x@b.test' to='y@a.test'><body>hi</body>\
            <forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client'/></forwarded></message>\
            <db:result from='b.test' to='a.test'>abc</db:result>";
        let mut p = StreamParser::new(1 << 20).server_stanzas_as_client();
        p.feed(doc.as_bytes()).unwrap();
        match p.next_event() {
            Some(StreamEvent::Header(h)) => {
                assert_eq!(h.default_ns, ns::SERVER);
                assert_eq!(h.dialback_ns.as_deref(), Some(ns::DIALBACK));
            }
            other => panic!("{other:?}"),
        }
        match p.next_event() {
            Some(StreamEvent::Element(e)) => {
                assert!(e.is("message", ns::CLIENT));
                assert!(e.get_child("body", ns::CLIENT).is_some());
            }
            other => panic!("{other:?}"),
        }
        match p.next_event() {
            Some(StreamEvent::Element(e)) => {
                assert!(e.is("result", ns::DIALBACK));
                assert_eq!(e.text(), "abc");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_are_sticky() {
        let mut p = StreamParser::new(1024);
        p.feed(HEADER.as_bytes()).unwrap();
        assert!(p.feed(b"<a></b>").is_err());
        assert!(p.feed(b"<presence/>").is_err());
    }
}
