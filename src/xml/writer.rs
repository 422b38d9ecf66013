//! Serialisation of elements for the wire.
//!
//! Stanzas are kept internally in the `jabber:client` namespace. When written
//! into a stream whose default namespace is `jabber:client` or
//! `jabber:server`, elements in either of those namespaces are written without
//! an `xmlns` so they take the stream's default. Nested stanzas (e.g. inside
//! `<forwarded/>`) get an explicit `xmlns='jabber:client'` where the default
//! changed.

use minidom::{Element, Node};

use super::ns;

fn is_content_ns(n: &str) -> bool {
    n == ns::CLIENT || n == ns::SERVER
}

pub fn escape_text(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, b) in bytes.iter().enumerate() {
        let rep: &[u8] = match b {
            b'&' => b"&amp;",
            b'<' => b"&lt;",
            b'>' => b"&gt;",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(rep);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

pub fn escape_attr(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, b) in bytes.iter().enumerate() {
        let rep: &[u8] = match b {
            b'&' => b"&amp;",
            b'<' => b"&lt;",
            b'>' => b"&gt;",
            b'\'' => b"&apos;",
            b'"' => b"&quot;",
            b'\t' => b"&#9;",
            b'\n' => b"&#10;",
            b'\r' => b"&#13;",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(rep);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// Serialise `el` as a top-level child of a stream whose default namespace is
/// `stream_ns` (`jabber:client`, `jabber:server`, or anything for standalone).
pub fn serialize_into(out: &mut Vec<u8>, el: &Element, stream_ns: &str) {
    write_element(out, el, stream_ns);
}

/// Serialise to a fresh buffer (standalone element, namespaces explicit
/// except that stanza namespaces are written as `jabber:client`).
pub fn serialize(el: &Element) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_element(&mut out, el, "");
    out
}

/// Serialise to a String (for logs and tests).
pub fn to_string(el: &Element) -> String {
    String::from_utf8(serialize(el)).unwrap_or_default()
}

fn write_element(out: &mut Vec<u8>, el: &Element, parent_default: &str) {
    let el_ns = el.ns();
    if el_ns == ns::STREAM {
        return write_stream_element(out, el, parent_default);
    }
    // Server dialback elements on a server stream use the `db:` prefix the
    // stream header declares (XEP-0220 section 2: some implementations
    // accept nothing else); their children stay in the stream's namespace.
    let dialback = el_ns == ns::DIALBACK && parent_default == ns::SERVER;
    out.push(b'<');
    if dialback {
        out.extend_from_slice(b"db:");
    }
    out.extend_from_slice(el.name().as_bytes());
    let inherit = dialback
        || el_ns == parent_default
        || (is_content_ns(&el_ns) && is_content_ns(parent_default));
    if !inherit {
        out.extend_from_slice(b" xmlns='");
        escape_attr(out, &el_ns);
        out.push(b'\'');
    }
    let child_default: &str = if inherit { parent_default } else { &el_ns };
    let mut extra_prefix = 0u32;
    for ((attr_ns, name), value) in el.attrs() {
        let attr_ns: &str = attr_ns.as_str();
        if attr_ns.is_empty() {
            out.push(b' ');
        } else if attr_ns == ns::XML {
            out.extend_from_slice(b" xml:");
        } else {
            extra_prefix += 1;
            let p = format!("ns{extra_prefix}");
            out.extend_from_slice(b" xmlns:");
            out.extend_from_slice(p.as_bytes());
            out.extend_from_slice(b"='");
            escape_attr(out, attr_ns);
            out.extend_from_slice(b"' ");
            out.extend_from_slice(p.as_bytes());
            out.push(b':');
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b"='");
        escape_attr(out, value);
        out.push(b'\'');
    }
    let mut nodes = el.nodes().peekable();
    if nodes.peek().is_none() {
        out.extend_from_slice(b"/>");
        return;
    }
    out.push(b'>');
    for node in nodes {
        match node {
            Node::Element(child) => write_element(out, child, child_default),
            Node::Text(t) => escape_text(out, t),
        }
    }
    out.extend_from_slice(b"</");
    if dialback {
        out.extend_from_slice(b"db:");
    }
    out.extend_from_slice(el.name().as_bytes());
    out.push(b'>');
}

/// Elements of the stream namespace (`stream:features`, `stream:error`) are
/// written with the `stream:` prefix, which the stream header declares; when
/// written standalone (WebSocket framing) the prefix is declared on them.
fn write_stream_element(out: &mut Vec<u8>, el: &Element, parent_default: &str) {
    out.extend_from_slice(b"<stream:");
    out.extend_from_slice(el.name().as_bytes());
    if parent_default.is_empty() {
        out.extend_from_slice(b" xmlns:stream='http://etherx.jabber.org/streams'");
    }
    for ((_, name), value) in el.attrs() {
        out.push(b' ');
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b"='");
        escape_attr(out, value);
        out.push(b'\'');
    }
    out.push(b'>');
    for node in el.nodes() {
        match node {
            // Children are in their own namespaces (never the stream's).
            Node::Element(child) => write_element(out, child, ""),
            Node::Text(t) => escape_text(out, t),
        }
    }
    out.extend_from_slice(b"</stream:");
    out.extend_from_slice(el.name().as_bytes());
    out.push(b'>');
}

/// The opening of a stream as a responding entity sends it.
pub fn stream_header(
    content_ns: &str,
    from: Option<&str>,
    to: Option<&str>,
    id: Option<&str>,
    extra_decls: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"<?xml version='1.0'?><stream:stream xmlns='");
    escape_attr(&mut out, content_ns);
    out.extend_from_slice(b"' xmlns:stream='http://etherx.jabber.org/streams'");
    out.extend_from_slice(extra_decls.as_bytes());
    if let Some(id) = id {
        out.extend_from_slice(b" id='");
        escape_attr(&mut out, id);
        out.push(b'\'');
    }
    if let Some(from) = from {
        out.extend_from_slice(b" from='");
        escape_attr(&mut out, from);
        out.push(b'\'');
    }
    if let Some(to) = to {
        out.extend_from_slice(b" to='");
        escape_attr(&mut out, to);
        out.push(b'\'');
    }
    out.extend_from_slice(b" version='1.0' xml:lang='en'>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xml::parser::{StreamEvent, StreamParser};

    fn reparse(bytes: &[u8]) -> Element {
        let mut p = StreamParser::new(1 << 20);
        p.feed(b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
            .unwrap();
        p.feed(bytes).unwrap();
        let _ = p.next_event();
        match p.next_event() {
            Some(StreamEvent::Element(e)) => e,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stanza_in_client_stream_has_no_xmlns() {
        let el: Element = "<message xmlns='jabber:client' to='a@b'><body>x &lt; y</body></message>"
            .parse()
            .unwrap();
        let mut out = Vec::new();
        serialize_into(&mut out, &el, ns::CLIENT);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "<message to='a@b'><body>x &lt; y</body></message>"
        );
        assert_eq!(reparse(&out), el);
    }

    #[test]
    fn nested_stanza_gets_explicit_namespace() {
        let el: Element = "<message xmlns='jabber:client'><forwarded xmlns='urn:xmpp:forward:0'>\
            <message xmlns='jabber:client' from='a@b'><body>hi</body></message></forwarded></message>"
            .parse()
            .unwrap();
        let mut out = Vec::new();
        serialize_into(&mut out, &el, ns::SERVER);
        let s = String::from_utf8(out.clone()).unwrap();
        assert_eq!(
            s,
            "<message><forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' from='a@b'>\
             <body>hi</body></message></forwarded></message>"
        );
        assert_eq!(reparse(&out), el);
    }

    #[test]
    fn stream_namespace_elements_use_the_prefix() {
        let el = Element::builder("features", ns::STREAM)
            .append(Element::builder("bind", ns::BIND).build())
            .build();
        let mut out = Vec::new();
        serialize_into(&mut out, &el, ns::CLIENT);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></stream:features>"
        );
        assert_eq!(reparse(&out), el);
        let standalone = String::from_utf8(serialize(&el)).unwrap();
        assert!(
            standalone
                .starts_with("<stream:features xmlns:stream='http://etherx.jabber.org/streams'>")
        );
    }

    #[test]
    fn client_stanzas_go_into_server_streams_and_dialback_gets_its_prefix() {
        let el: Element = "<message xmlns='jabber:client' to='a@b'><body>x</body></message>"
            .parse()
            .unwrap();
        let mut out = Vec::new();
        serialize_into(&mut out, &el, ns::SERVER);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "<message to='a@b'><body>x</body></message>"
        );
        let db = Element::builder("result", ns::DIALBACK)
            .attr(crate::stanza::name("type"), "error")
            .append(
                Element::builder("error", ns::CLIENT)
                    .attr(crate::stanza::name("type"), "cancel")
                    .append(Element::builder("item-not-found", ns::STANZA_ERRORS).build())
                    .build(),
            )
            .build();
        let mut out = Vec::new();
        serialize_into(&mut out, &db, ns::SERVER);
        let s = String::from_utf8(out.clone()).unwrap();
        assert_eq!(
            s,
            "<db:result type='error'><error type='cancel'><item-not-found \
             xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></db:result>"
        );
        // Read back by a server stream that declares the prefix.
        let mut p = StreamParser::new(1 << 20).server_stanzas_as_client();
        p.feed(
            b"<stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' \
            xmlns:stream='http://etherx.jabber.org/streams'>",
        )
        .unwrap();
        p.feed(&out).unwrap();
        let _ = p.next_event();
        match p.next_event() {
            Some(StreamEvent::Element(e)) => assert_eq!(e, db),
            other => panic!("{other:?}"),
        }
        // Standalone (logs): an explicit namespace.
        assert!(to_string(&db).starts_with("<result xmlns='jabber:server:dialback'"));
    }

    #[test]
    fn attributes_are_escaped_and_roundtrip() {
        let el: Element = "<iq xmlns='jabber:client' id='a&apos;b&quot;c&lt;' xml:lang='en'>\
            <q xmlns='urn:x' v='line&#10;two'/></iq>"
            .parse()
            .unwrap();
        let out = serialize(&el);
        assert_eq!(reparse(&out), el);
    }
}
