//! Server Dialback (XEP-0220): keys as XEP-0185 recommends, and the
//! `<db:result/>` / `<db:verify/>` elements.
//!
//! `key = HEX( HMAC-SHA256( SHA256(secret), receiving ' ' originating ' ' stream-id ) )`

use hmac::{KeyInit, Mac};
use minidom::Element;
use sha2::{Digest, Sha256};

use crate::stanza::name;
use crate::xml::ns;

/// The dialback key for a stream with id `stream_id` that the originating
/// server opened to the receiving server.
pub fn key(secret: &[u8], receiving: &str, originating: &str, stream_id: &str) -> String {
    let k = Sha256::digest(secret);
    let hex_key = hex(&k);
    // XEP-0185: the HMAC key is the hex-encoded SHA-256 of the secret.
    let mut mac = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(hex_key.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(receiving.as_bytes());
    mac.update(b" ");
    mac.update(originating.as_bytes());
    mac.update(b" ");
    mac.update(stream_id.as_bytes());
    hex(&mac.finalize().into_bytes())
}

/// Constant-time comparison of a presented key with the expected one.
pub fn key_matches(presented: &str, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    let p = presented.trim().as_bytes();
    p.len() == expected.len() && bool::from(p.ct_eq(expected.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

fn db(el_name: &str, from: &str, to: &str) -> minidom::ElementBuilder {
    Element::builder(el_name, ns::DIALBACK)
        .attr(name("from"), from)
        .attr(name("to"), to)
}

/// `<db:result from to>key</db:result>` (step 1).
pub fn result_request(from: &str, to: &str, key: &str) -> Element {
    db("result", from, to).append(key).build()
}

/// `<db:result type='valid|invalid'/>` (step 4).
pub fn result_answer(from: &str, to: &str, valid: bool) -> Element {
    db("result", from, to)
        .attr(name("type"), if valid { "valid" } else { "invalid" })
        .build()
}

/// `<db:verify from to id>key</db:verify>` (step 2).
pub fn verify_request(from: &str, to: &str, id: &str, key: &str) -> Element {
    db("verify", from, to)
        .attr(name("id"), id)
        .append(key)
        .build()
}

/// `<db:verify type='valid|invalid'/>` (step 3).
pub fn verify_answer(from: &str, to: &str, id: &str, valid: bool) -> Element {
    db("verify", from, to)
        .attr(name("id"), id)
        .attr(name("type"), if valid { "valid" } else { "invalid" })
        .build()
}

/// A dialback element of `type='error'` with a stanza error condition
/// (XEP-0220 section 2.4). `id` for `<db:verify/>`.
pub fn error(
    el_name: &str,
    from: &str,
    to: &str,
    id: Option<&str>,
    condition: &'static str,
) -> Element {
    let err = crate::stanza::StanzaError::new(condition);
    let mut b = db(el_name, from, to).attr(name("type"), "error");
    if let Some(id) = id {
        b = b.attr(name("id"), id);
    }
    b.append(
        Element::builder("error", ns::CLIENT)
            .attr(name("type"), err.kind.as_str())
            .append(Element::builder(condition, ns::STANZA_ERRORS).build())
            .build(),
    )
    .build()
}

/// The stanza error condition inside a dialback error element.
pub fn error_condition(el: &Element) -> Option<String> {
    el.children()
        .find(|c| c.name() == "error")
        .and_then(|e| e.children().find(|c| c.ns() == ns::STANZA_ERRORS))
        .map(|c| c.name().to_owned())
}

/// The `<dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>`
/// stream feature.
pub fn feature() -> Element {
    Element::builder("dialback", ns::DIALBACK_FEATURE)
        .append(Element::builder("errors", ns::DIALBACK_FEATURE).build())
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xep_0185_example() {
        // XEP-0185 section 3 (and every implementation's test vector).
        assert_eq!(
            key(
                b"s3cr3tf0rd14lb4ck",
                "xmpp.example.com",
                "example.org",
                "D60000229F"
            ),
            "37c69b1cf07a3f67c04a5ef5902fa5114f2c76fe4a2686482ba5b89323075643"
        );
    }

    #[test]
    fn xep_0220_examples() {
        // XEP-0220 section 2.1.1: capulet.example sends to montague.example
        // on the stream D60000229F.
        assert_eq!(
            key(
                b"s3cr3tf0rd14lb4ck",
                "montague.example",
                "capulet.example",
                "D60000229F"
            ),
            "b4835385f37fe2895af6c196b59097b16862406db80559900d96bf6fa7d23df3"
        );
    }

    #[test]
    fn keys_bind_every_input_and_compare_in_constant_time() {
        let k = key(b"secret", "a.test", "b.test", "id1");
        assert_eq!(k.len(), 64);
        assert_ne!(k, key(b"secret2", "a.test", "b.test", "id1"));
        assert_ne!(k, key(b"secret", "b.test", "a.test", "id1"));
        assert_ne!(k, key(b"secret", "a.test", "b.test", "id2"));
        assert!(key_matches(&format!(" {k}\n"), &k));
        assert!(!key_matches(&k[..63], &k));
        assert!(!key_matches("", &k));
    }

    #[test]
    fn elements() {
        let e = error("result", "a.test", "b.test", None, "item-not-found");
        assert_eq!(e.attr("type"), Some("error"));
        assert_eq!(error_condition(&e).as_deref(), Some("item-not-found"));
        let v = verify_request("a.test", "b.test", "S1", "k");
        assert!(v.is("verify", ns::DIALBACK));
        assert_eq!(v.attr("id"), Some("S1"));
        assert_eq!(v.text(), "k");
    }
}
