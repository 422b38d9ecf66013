//! Peer certificates of server-to-server streams: is the chain trusted
//! (system roots plus `s2s.ca_file`), and which XMPP domains does it name
//! (RFC 6125 as profiled by RFC 6120 section 13.7.1.2: DNS-ID with the
//! wildcard rules, SRV-ID `_xmpp-server`, `id-on-xmppAddr`, and the CN only
//! when the certificate has none of those).

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};

use crate::tls::TlsError;

/// OID 1.3.6.1.5.5.7.8.5 (id-on-xmppAddr).
const OID_XMPP_ADDR: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x08, 0x05];
/// OID 1.3.6.1.5.5.7.8.7 (id-on-dnsSRV, SRVName).
const OID_SRV_NAME: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x08, 0x07];
/// OID 2.5.29.17 (subjectAltName).
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];
/// OID 2.5.4.3 (commonName).
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];

/// The identifiers a certificate presents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertNames {
    /// dNSName entries (may start with `*.`).
    pub dns: Vec<String>,
    /// id-on-xmppAddr entries.
    pub xmpp: Vec<String>,
    /// SRVName entries (`_service.domain`).
    pub srv: Vec<String>,
    /// uniformResourceIdentifier entries (only their presence matters).
    pub uri: usize,
    /// Common names of the subject.
    pub cn: Vec<String>,
}

fn normalise(d: &str) -> String {
    d.trim_end_matches('.').to_ascii_lowercase()
}

/// RFC 6125 section 6.4.3: `*` as the whole left-most label matches exactly
/// one label; nothing else is a wildcard.
fn dns_id_matches(presented: &str, domain: &str) -> bool {
    let p = normalise(presented);
    if let Some(parent) = p.strip_prefix("*.") {
        // The wildcard must not stand for a top-level or registry label.
        if !parent.contains('.') || parent.contains('*') {
            return false;
        }
        return match domain.split_once('.') {
            Some((label, rest)) => !label.is_empty() && rest == parent,
            None => false,
        };
    }
    !p.contains('*') && p == domain
}

impl CertNames {
    /// Read the identifiers of a DER certificate.
    pub fn from_der(der: &[u8]) -> Option<CertNames> {
        let (_, cert, _) = tlv(der)?;
        let (_, mut tbs, _) = tlv(cert)?;
        let mut names = CertNames::default();
        // version [0] (optional), serial, signature, issuer, validity,
        // subject, subjectPublicKeyInfo, then optional [1], [2], [3].
        let mut index = 0;
        while !tbs.is_empty() {
            let (tag, content, rest) = tlv(tbs)?;
            tbs = rest;
            if tag == 0xa0 && index == 0 {
                continue; // version
            }
            index += 1;
            match (index, tag) {
                (5, 0x30) => names.cn = common_names(content),
                (_, 0xa3) => extensions(content, &mut names)?,
                _ => {}
            }
        }
        Some(names)
    }

    /// Is this certificate valid for the XMPP server domain `domain`?
    pub fn matches(&self, domain: &str) -> bool {
        let domain = normalise(domain);
        if domain.is_empty() {
            return false;
        }
        if self.dns.iter().any(|d| dns_id_matches(d, &domain)) {
            return true;
        }
        if self.xmpp.iter().any(|x| normalise(x) == domain) {
            return true;
        }
        if self.srv.iter().any(|s| {
            normalise(s)
                .strip_prefix("_xmpp-server.")
                .is_some_and(|d| d == domain)
        }) {
            return true;
        }
        // The CN counts only when no subjectAltName identifier is present
        // (RFC 6125 section 6.4.4).
        let has_san =
            !self.dns.is_empty() || !self.xmpp.is_empty() || !self.srv.is_empty() || self.uri > 0;
        !has_san && self.cn.iter().any(|c| normalise(c) == domain)
    }

    /// Every identifier, for logs.
    pub fn describe(&self) -> String {
        let mut v: Vec<String> = Vec::new();
        v.extend(self.dns.iter().map(|d| format!("DNS:{d}")));
        v.extend(self.xmpp.iter().map(|d| format!("xmppAddr:{d}")));
        v.extend(self.srv.iter().map(|d| format!("SRV:{d}")));
        v.extend(self.cn.iter().map(|d| format!("CN:{d}")));
        if v.is_empty() {
            "no names".into()
        } else {
            v.join(", ")
        }
    }
}

/// One DER TLV: (tag, content, rest).
fn tlv(d: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *d.first()?;
    let l0 = *d.get(1)? as usize;
    let (hdr, len) = if l0 < 0x80 {
        (2, l0)
    } else {
        let n = l0 & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *d.get(2 + i)? as usize;
        }
        (2 + n, len)
    };
    let end = hdr.checked_add(len)?;
    Some((tag, d.get(hdr..end)?, d.get(end..)?))
}

fn common_names(mut subject: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while let Some((_, set, rest)) = tlv(subject) {
        subject = rest;
        let mut set = set;
        while let Some((_, atv, rest)) = tlv(set) {
            set = rest;
            if let Some((0x06, oid, value)) = tlv(atv)
                && oid == OID_CN
                && let Some((_, v, _)) = tlv(value)
                && let Ok(s) = std::str::from_utf8(v)
            {
                out.push(s.to_owned());
            }
        }
    }
    out
}

fn extensions(content: &[u8], names: &mut CertNames) -> Option<()> {
    let (_, mut exts, _) = tlv(content)?;
    while !exts.is_empty() {
        let (_, ext, rest) = tlv(exts)?;
        exts = rest;
        let (tag, oid, mut ext_rest) = tlv(ext)?;
        if tag != 0x06 || oid != OID_SAN {
            continue;
        }
        // Optional `critical BOOLEAN`, then the OCTET STRING.
        let (mut t, mut value, r) = tlv(ext_rest)?;
        if t == 0x01 {
            ext_rest = r;
            (t, value, _) = tlv(ext_rest)?;
        }
        if t != 0x04 {
            return None;
        }
        let (_, mut general_names, _) = tlv(value)?;
        while !general_names.is_empty() {
            let (tag, gn, rest) = tlv(general_names)?;
            general_names = rest;
            match tag {
                0x82 => {
                    if let Ok(s) = std::str::from_utf8(gn) {
                        names.dns.push(s.to_owned());
                    }
                }
                0x86 => names.uri += 1,
                0xa0 => {
                    // otherName: type-id OID, [0] EXPLICIT value.
                    let Some((0x06, type_id, rest)) = tlv(gn) else {
                        continue;
                    };
                    let Some((0xa0, explicit, _)) = tlv(rest) else {
                        continue;
                    };
                    let Some((_, v, _)) = tlv(explicit) else {
                        continue;
                    };
                    let Ok(s) = std::str::from_utf8(v) else {
                        continue;
                    };
                    if type_id == OID_XMPP_ADDR {
                        names.xmpp.push(s.to_owned());
                    } else if type_id == OID_SRV_NAME {
                        names.srv.push(s.to_owned());
                    }
                }
                _ => {}
            }
        }
    }
    Some(())
}

/// Which side of the handshake presented the certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// The server we connected to (EKU serverAuth when present).
    Server,
    /// A server that connected to us and presented a client certificate
    /// (EKU clientAuth or serverAuth when present: many server
    /// certificates carry only serverAuth).
    Client,
}

/// The certificate a peer presented, judged once after the handshake.
#[derive(Debug, Clone)]
pub struct PeerCert {
    /// Why the chain is not trusted (None: it is).
    pub chain_error: Option<String>,
    pub names: CertNames,
}

impl PeerCert {
    /// No certificate at all (plain TCP, or none presented).
    pub fn none() -> PeerCert {
        PeerCert {
            chain_error: Some("no certificate presented".into()),
            names: CertNames::default(),
        }
    }

    /// Is the certificate trusted and valid for `domain`? Err says why not.
    pub fn valid_for(&self, domain: &str) -> Result<(), String> {
        if let Some(e) = &self.chain_error {
            return Err(e.clone());
        }
        if self.names.matches(domain) {
            Ok(())
        } else {
            Err(format!(
                "certificate is not valid for {domain} ({})",
                self.names.describe()
            ))
        }
    }
}

/// Trust anchors for peers: the system's roots plus an optional CA file.
#[derive(Debug, Clone)]
pub struct PeerVerifier {
    anchors: Arc<Vec<TrustAnchor<'static>>>,
}

/// EKU check: the required usage, or none stated.
struct AnyOf(&'static [&'static [usize]]);

impl webpki::ExtendedKeyUsageValidator for AnyOf {
    fn validate(&self, iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        let mut empty = true;
        for id in iter {
            empty = false;
            let oid = id?.to_decoded_oid();
            if self.0.contains(&oid.as_slice()) {
                return Ok(());
            }
        }
        if empty {
            Ok(())
        } else {
            // The context variant cannot be built outside webpki.
            #[allow(deprecated)]
            Err(webpki::Error::RequiredEkuNotFound)
        }
    }
}

impl PeerVerifier {
    /// Load the trust anchors.
    pub fn load(ca_file: Option<&Path>, system_roots: bool) -> Result<PeerVerifier, TlsError> {
        let mut anchors = Vec::new();
        if system_roots {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::debug!(error = %e, "reading a system root certificate failed");
            }
            for c in found.certs {
                if let Ok(a) = webpki::anchor_from_trusted_cert(&c) {
                    anchors.push(a.to_owned());
                }
            }
        }
        if let Some(path) = ca_file {
            use rustls_pki_types::pem::PemObject;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| TlsError::Cert(path.to_owned(), e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| TlsError::Cert(path.to_owned(), e.to_string()))?;
            if certs.is_empty() {
                return Err(TlsError::Cert(
                    path.to_owned(),
                    "no certificate in file".into(),
                ));
            }
            for c in certs {
                let a = webpki::anchor_from_trusted_cert(&c)
                    .map_err(|e| TlsError::Cert(path.to_owned(), e.to_string()))?;
                anchors.push(a.to_owned());
            }
        }
        Ok(PeerVerifier {
            anchors: Arc::new(anchors),
        })
    }

    pub fn anchor_count(&self) -> usize {
        self.anchors.len()
    }

    /// Judge the chain a peer presented (end entity first).
    pub fn check(&self, chain: &[CertificateDer<'static>], role: PeerRole) -> PeerCert {
        let Some(end) = chain.first() else {
            return PeerCert::none();
        };
        let names = CertNames::from_der(end).unwrap_or_default();
        let chain_error = self.verify_chain(chain, role).err();
        PeerCert { chain_error, names }
    }

    fn verify_chain(
        &self,
        chain: &[CertificateDer<'static>],
        role: PeerRole,
    ) -> Result<(), String> {
        let end = chain.first().ok_or("no certificate presented")?;
        let cert =
            webpki::EndEntityCert::try_from(end).map_err(|e| format!("bad certificate: {e}"))?;
        const SERVER_AUTH: &[usize] = &[1, 3, 6, 1, 5, 5, 7, 3, 1];
        const CLIENT_AUTH: &[usize] = &[1, 3, 6, 1, 5, 5, 7, 3, 2];
        let usage = match role {
            PeerRole::Server => AnyOf(&[SERVER_AUTH]),
            PeerRole::Client => AnyOf(&[CLIENT_AUTH, SERVER_AUTH]),
        };
        let algs = crate::tls::crypto_provider()
            .signature_verification_algorithms
            .all;
        cert.verify_for_usage(
            algs,
            &self.anchors,
            &chain[1..],
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .map(|_| ())
        .map_err(|e| format!("certificate not trusted: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dns: &[&str], xmpp: &[&str], srv: &[&str], cn: &[&str]) -> CertNames {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        CertNames {
            dns: v(dns),
            xmpp: v(xmpp),
            srv: v(srv),
            uri: 0,
            cn: v(cn),
        }
    }

    #[test]
    fn dns_ids_and_wildcards_follow_rfc6125() {
        let n = names(&["example.org", "*.example.net"], &[], &[], &[]);
        assert!(n.matches("example.org"));
        assert!(n.matches("EXAMPLE.org."));
        assert!(!n.matches("www.example.org"));
        assert!(n.matches("conference.example.net"));
        // One label only, and not the parent itself.
        assert!(!n.matches("a.b.example.net"));
        assert!(!n.matches("example.net"));
        // No wildcards over a single label (a TLD), no partial wildcards.
        assert!(!names(&["*.test"], &[], &[], &[]).matches("a.test"));
        assert!(!names(&["f*.example.org"], &[], &[], &[]).matches("foo.example.org"));
        assert!(!names(&["*.*.example.org"], &[], &[], &[]).matches("a.b.example.org"));
    }

    #[test]
    fn xmpp_addr_and_srv_ids() {
        let n = names(&[], &["chat.example"], &["_xmpp-server.im.example"], &[]);
        assert!(n.matches("chat.example"));
        assert!(n.matches("im.example"));
        assert!(!n.matches("other.example"));
        // xmppAddr has no wildcards.
        assert!(!names(&[], &["*.example"], &[], &[]).matches("a.example"));
        // A client SRV-ID does not authenticate a server.
        assert!(!names(&[], &[], &["_xmpp-client.im.example"], &[]).matches("im.example"));
    }

    #[test]
    fn common_name_only_without_subject_alt_names() {
        assert!(names(&[], &[], &[], &["old.example"]).matches("old.example"));
        assert!(!names(&["new.example"], &[], &[], &["old.example"]).matches("old.example"));
    }

    #[test]
    fn names_are_read_from_real_certificates() {
        let mut params =
            rcgen::CertificateParams::new(vec!["a.test".into(), "*.a.test".into()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::OtherName((
            vec![1, 3, 6, 1, 5, 5, 7, 8, 5],
            rcgen::OtherNameValue::Utf8String("x.a.test".into()),
        )));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "a.test");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let n = CertNames::from_der(cert.der()).unwrap();
        assert_eq!(n.dns, vec!["a.test".to_string(), "*.a.test".to_string()]);
        assert_eq!(n.xmpp, vec!["x.a.test".to_string()]);
        assert_eq!(n.cn, vec!["a.test".to_string()]);
        assert!(n.matches("conference.a.test"));
        assert!(n.matches("x.a.test"));
        assert!(!n.matches("b.test"));
    }

    #[test]
    fn chains_are_checked_against_the_anchors() {
        let dir = crate::storage::testing::temp_dir("pkix");
        let ca = crate::s2s::testca::TestCa::new("Starling test CA");
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();
        let (leaf, _key) = ca.leaf(&["a.test", "conference.a.test"]);
        let verifier = PeerVerifier::load(Some(&ca_file), false).unwrap();
        assert_eq!(verifier.anchor_count(), 1);
        let chain = vec![CertificateDer::from(leaf.clone())];
        let p = verifier.check(&chain, PeerRole::Server);
        assert_eq!(p.chain_error, None);
        assert!(p.valid_for("a.test").is_ok());
        assert!(p.valid_for("conference.a.test").is_ok());
        assert!(
            p.valid_for("b.test")
                .unwrap_err()
                .contains("not valid for b.test")
        );
        let p = verifier.check(&chain, PeerRole::Client);
        assert_eq!(p.chain_error, None);
        // Another CA's certificate is not trusted.
        let other = crate::s2s::testca::TestCa::new("Other CA");
        let (leaf2, _) = other.leaf(&["a.test"]);
        let p = verifier.check(&[CertificateDer::from(leaf2)], PeerRole::Server);
        assert!(p.valid_for("a.test").unwrap_err().contains("not trusted"));
        // No certificate.
        assert!(
            verifier
                .check(&[], PeerRole::Client)
                .valid_for("a.test")
                .is_err()
        );
    }
}
