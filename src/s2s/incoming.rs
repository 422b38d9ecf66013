//! The receiving side of a server-to-server stream (RFC 6120), sans-IO.
//!
//! A remote server connects to us: we answer its header, offer STARTTLS
//! (required by default), then SASL EXTERNAL (XEP-0178) when its
//! certificate is valid for the domain it claims, and Server Dialback
//! (XEP-0220) otherwise. As dialback's authoritative server we answer
//! `<db:verify/>` requests about keys we issued. Once a remote domain is
//! authenticated, its stanzas come out as [`Output::Stanza`] after the
//! addressing checks (`from` in an authenticated domain, else
//! `<invalid-from/>`; `to` a local host, else `<host-unknown/>`).
//!
//! The IO driver (`connection.rs`) performs the outputs and answers
//! [`Output::VerifyDialback`] with [`Input::DialbackChecked`].

use std::collections::HashSet;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use jid::Jid;
use minidom::Element;

use super::dialback;
use super::pkix::PeerCert;
use crate::stanza::{self, StanzaError};
use crate::xml::{StreamEvent, StreamHeader, ns};

/// What the stream needs to know about this server.
pub trait Policy: Send + Sync {
    /// Is this a domain (or service domain) we serve?
    fn is_local_host(&self, domain: &str) -> bool;
    /// May this remote domain federate with us?
    fn allows_remote(&self, domain: &str) -> bool;
}

/// Static settings of incoming streams.
#[derive(Clone)]
pub struct InSettings {
    pub policy: Arc<dyn Policy>,
    /// Secret for dialback keys (XEP-0185).
    pub secret: Arc<Vec<u8>>,
    pub require_tls: bool,
    pub secure_auth: bool,
    pub dialback: bool,
    /// The listener can upgrade with STARTTLS (false on direct TLS).
    pub starttls_available: bool,
    pub stream_management: bool,
    /// Dialback verifications in flight per stream.
    pub max_pending_dialback: usize,
}

/// The outcome of verifying a dialback key with the authoritative server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialbackOutcome {
    Valid,
    Invalid,
    /// The authoritative server could not be asked (a stanza error
    /// condition such as `remote-server-not-found`).
    Error(&'static str),
}

#[derive(Debug)]
pub enum Input {
    Stream(StreamEvent),
    /// TLS is up (after `<proceed/>`, or at once on direct TLS); with the
    /// judgement of the certificate the peer presented.
    TlsEstablished(PeerCert),
    /// Answer to [`Output::VerifyDialback`].
    DialbackChecked {
        local: String,
        remote: String,
        outcome: DialbackOutcome,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send our stream header.
    SendHeader {
        id: String,
        from: Option<String>,
        to: Option<String>,
        version: bool,
    },
    Send(Element),
    /// `<proceed/>` was queued: flush, TLS handshake, reset the parser,
    /// answer with [`Input::TlsEstablished`].
    StartTls,
    /// SASL succeeded: reset the parser for the stream restart.
    ResetStream,
    /// Ask the authoritative server of `remote` whether `key` is the one it
    /// issued for this stream (XEP-0220 step 2).
    VerifyDialback {
        local: String,
        remote: String,
        stream_id: String,
        key: String,
    },
    /// `remote` is authenticated on this stream.
    Authenticated {
        remote: String,
        method: &'static str,
    },
    /// A stanza from an authenticated remote domain to a local host.
    Stanza(Element),
    /// An error reply for a stanza we refuse (its sender is remote).
    Bounce(Element, StanzaError),
    /// Close with a stream error.
    StreamError {
        condition: &'static str,
        text: Option<String>,
    },
    /// The peer closed its stream: close ours.
    CloseStream,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitHeader,
    Open,
    TlsPending,
    Closed,
}

pub struct InMachine {
    settings: InSettings,
    state: State,
    secure: bool,
    peer: PeerCert,
    header_sent: bool,
    /// The stream id we gave in our latest header (dialback keys bind it).
    stream_id: String,
    /// The local host the stream is addressed to.
    local: Option<String>,
    /// The domain the peer claims in its header.
    claimed: Option<String>,
    version1: bool,
    sasl_done: bool,
    authenticated: HashSet<String>,
    pending: HashSet<(String, String)>,
    sm: Option<u32>,
    /// SASL succeeded for this domain; it counts once the stream restarts.
    sasl_identity: Option<String>,
}

fn features() -> minidom::ElementBuilder {
    Element::builder("features", ns::STREAM)
}

fn sasl_failure(condition: &str) -> Element {
    Element::builder("failure", ns::SASL)
        .append(Element::builder(condition, ns::SASL).build())
        .build()
}

/// The domain of a JID-shaped domain string, normalised; None if invalid or
/// not a bare domain.
pub fn domain_of(s: &str) -> Option<String> {
    let j = Jid::new(s).ok()?;
    if j.node().is_some() || j.resource().is_some() {
        return None;
    }
    Some(j.domain().as_str().to_owned())
}

impl InMachine {
    /// A new stream; `secure` on a direct-TLS listener (with the peer's
    /// certificate).
    pub fn new(settings: InSettings, secure: bool, peer: PeerCert) -> Self {
        InMachine {
            settings,
            state: State::AwaitHeader,
            secure,
            peer,
            header_sent: false,
            stream_id: String::new(),
            local: None,
            claimed: None,
            version1: false,
            sasl_done: false,
            authenticated: HashSet::new(),
            pending: HashSet::new(),
            sm: None,
            sasl_identity: None,
        }
    }

    pub fn is_authenticated(&self) -> bool {
        !self.authenticated.is_empty()
    }
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }
    pub fn authenticated(&self) -> &HashSet<String> {
        &self.authenticated
    }
    pub fn local(&self) -> Option<&str> {
        self.local.as_deref()
    }
    pub fn claimed(&self) -> Option<&str> {
        self.claimed.as_deref()
    }
    pub fn stream_id(&self) -> &str {
        &self.stream_id
    }

    pub fn handle(&mut self, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        if self.state == State::Closed {
            return out;
        }
        match input {
            Input::Stream(StreamEvent::Header(h)) => self.on_header(h, &mut out),
            Input::Stream(StreamEvent::End) => {
                self.state = State::Closed;
                out.push(Output::CloseStream);
            }
            Input::Stream(StreamEvent::Element(el)) => self.on_element(el, &mut out),
            Input::TlsEstablished(peer) => {
                if self.state == State::TlsPending {
                    self.secure = true;
                    self.peer = peer;
                    self.state = State::AwaitHeader;
                    self.header_sent = false;
                }
            }
            Input::DialbackChecked {
                local,
                remote,
                outcome,
            } => self.on_dialback_checked(local, remote, outcome, &mut out),
        }
        out
    }

    /// Close with a stream error (XML errors, timeouts, limits).
    pub fn fail(&mut self, condition: &'static str, text: Option<&str>) -> Vec<Output> {
        let mut out = Vec::new();
        if self.state != State::Closed {
            self.stream_error(condition, text, &mut out);
        }
        out
    }

    fn stream_error(&mut self, condition: &'static str, text: Option<&str>, out: &mut Vec<Output>) {
        if !self.header_sent {
            self.send_header(None, None, true, out);
        }
        self.state = State::Closed;
        out.push(Output::StreamError {
            condition,
            text: text.map(str::to_owned),
        });
    }

    fn send_header(
        &mut self,
        from: Option<String>,
        to: Option<String>,
        version: bool,
        out: &mut Vec<Output>,
    ) {
        self.stream_id = stanza::new_id();
        self.header_sent = true;
        out.push(Output::SendHeader {
            id: self.stream_id.clone(),
            from,
            to,
            version,
        });
    }

    fn on_header(&mut self, h: StreamHeader, out: &mut Vec<Output>) {
        if self.state != State::AwaitHeader {
            return self.stream_error("bad-format", Some("unexpected stream header"), out);
        }
        let to = h.to.as_deref().and_then(domain_of);
        let claimed = h.from.as_deref().and_then(domain_of);
        let version1 = h
            .version
            .as_deref()
            .is_some_and(|v| v.split('.').next() == Some("1"));
        // Answer with a header first, so that errors have a stream to go in.
        let our_from = to.clone().filter(|d| self.settings.policy.is_local_host(d));
        self.send_header(our_from, claimed.clone(), h.version.is_some(), out);
        if h.stream_ns != ns::STREAM || h.local_name != "stream" {
            return self.stream_error("invalid-namespace", None, out);
        }
        if h.default_ns != ns::SERVER {
            return self.stream_error("invalid-namespace", Some("expected jabber:server"), out);
        }
        if let Some(v) = &h.version
            && !version1
        {
            tracing::debug!(version = %v, "unsupported stream version");
            return self.stream_error("unsupported-version", None, out);
        }
        let Some(to) = to else {
            return self.stream_error("host-unknown", Some("no valid 'to' domain"), out);
        };
        if !self.settings.policy.is_local_host(&to) {
            return self.stream_error(
                "host-unknown",
                Some("this server does not serve that domain"),
                out,
            );
        }
        if let Some(prev) = &self.local
            && *prev != to
        {
            return self.stream_error("host-unknown", Some("the 'to' domain changed"), out);
        }
        if h.from.is_some() && claimed.is_none() {
            return self.stream_error("invalid-from", None, out);
        }
        if let Some(c) = &claimed {
            if !self.settings.policy.allows_remote(c) {
                return self.stream_error(
                    "policy-violation",
                    Some("federation with this domain is not allowed"),
                    out,
                );
            }
            if let Some(prev) = &self.claimed
                && prev != c
            {
                return self.stream_error("invalid-from", Some("the 'from' domain changed"), out);
            }
        }
        self.local = Some(to);
        if claimed.is_some() {
            self.claimed = claimed;
        }
        self.version1 = version1;
        if !version1 {
            // A pre-1.0 peer: no features, dialback only, no TLS.
            if self.settings.require_tls && !self.secure {
                return self.stream_error("unsupported-version", Some("TLS is required"), out);
            }
            self.state = State::Open;
            return;
        }
        self.state = State::Open;
        if let Some(identity) = self.sasl_identity.take()
            && self.authenticated.insert(identity.clone())
        {
            // Authenticated once the stream restarted after SASL.
            out.push(Output::Authenticated {
                remote: identity,
                method: "EXTERNAL",
            });
            if self.state == State::Closed {
                return;
            }
        }
        out.push(Output::Send(self.features()));
    }

    fn tls_missing(&self) -> bool {
        self.settings.require_tls && !self.secure
    }

    fn features(&self) -> Element {
        let mut f = features();
        if !self.secure && self.settings.starttls_available {
            let mut st = Element::builder("starttls", ns::TLS);
            if self.settings.require_tls {
                st = st.append(Element::builder("required", ns::TLS).build());
            }
            f = f.append(st.build());
        }
        if self.tls_missing() {
            return f.build();
        }
        if !self.sasl_done {
            let external = self
                .claimed
                .as_deref()
                .is_some_and(|c| self.peer.valid_for(c).is_ok());
            if external {
                f = f.append(
                    Element::builder("mechanisms", ns::SASL)
                        .append(
                            Element::builder("mechanism", ns::SASL)
                                .append("EXTERNAL")
                                .build(),
                        )
                        .build(),
                );
            }
            if self.settings.dialback && !self.settings.secure_auth {
                f = f.append(dialback::feature());
            }
        }
        if self.settings.stream_management && self.secure {
            f = f.append(Element::builder("sm", ns::SM).build());
        }
        f.build()
    }

    fn on_element(&mut self, el: Element, out: &mut Vec<Output>) {
        match self.state {
            State::Open => {}
            State::TlsPending => {
                return self.stream_error(
                    "policy-violation",
                    Some("data after <starttls/> before the TLS handshake"),
                    out,
                );
            }
            State::AwaitHeader => return self.stream_error("bad-format", None, out),
            State::Closed => return,
        }
        let el_ns = el.ns();
        if el_ns == ns::TLS && el.name() == "starttls" {
            return self.starttls(out);
        }
        if el_ns == ns::SASL {
            return self.sasl(el, out);
        }
        if el_ns == ns::DIALBACK {
            return match (el.name(), el.attr("type")) {
                ("result", None) => self.db_result(el, out),
                ("verify", None) => self.db_verify(el, out),
                (n, Some(t)) => {
                    // We never send dialback requests on an incoming
                    // stream: answers here are unsolicited (XEP-0220
                    // section 4.1) and ignored.
                    tracing::info!(
                        element = n,
                        r#type = t,
                        "unsolicited dialback answer ignored"
                    );
                }
                _ => self.stream_error("unsupported-stanza-type", None, out),
            };
        }
        if el_ns == ns::SM {
            return self.sm(el, out);
        }
        if stanza::kind(&el).is_some() {
            return self.stanza(el, out);
        }
        self.stream_error("unsupported-stanza-type", None, out)
    }

    fn starttls(&mut self, out: &mut Vec<Output>) {
        if self.secure || !self.settings.starttls_available || !self.version1 {
            out.push(Output::Send(Element::builder("failure", ns::TLS).build()));
            self.state = State::Closed;
            out.push(Output::CloseStream);
            return;
        }
        out.push(Output::Send(Element::builder("proceed", ns::TLS).build()));
        self.state = State::TlsPending;
        out.push(Output::StartTls);
    }

    fn sasl(&mut self, el: Element, out: &mut Vec<Output>) {
        match el.name() {
            "auth" => {}
            "abort" => {
                out.push(Output::Send(sasl_failure("aborted")));
                return;
            }
            _ => {
                return self.stream_error("policy-violation", Some("unexpected SASL element"), out);
            }
        }
        if self.tls_missing() {
            out.push(Output::Send(sasl_failure("encryption-required")));
            return;
        }
        if self.sasl_done {
            return self.stream_error("policy-violation", Some("already authenticated"), out);
        }
        if el.attr("mechanism") != Some("EXTERNAL") {
            out.push(Output::Send(sasl_failure("invalid-mechanism")));
            return;
        }
        let text = el.text();
        let authzid = match text.trim() {
            "" | "=" => None,
            t => match B64.decode(t).ok().and_then(|b| String::from_utf8(b).ok()) {
                Some(s) => Some(s),
                None => {
                    out.push(Output::Send(sasl_failure("incorrect-encoding")));
                    return;
                }
            },
        };
        // XEP-0178: the identity is the authzid if given, else the 'from'
        // of the stream header; a given authzid must be that 'from'.
        let identity = match (&authzid, &self.claimed) {
            (Some(a), claimed) => match domain_of(a) {
                Some(d) if claimed.as_ref().is_none_or(|c| *c == d) => d,
                _ => {
                    out.push(Output::Send(sasl_failure("invalid-authzid")));
                    return;
                }
            },
            (None, Some(c)) => c.clone(),
            (None, None) => {
                out.push(Output::Send(sasl_failure("invalid-authzid")));
                return;
            }
        };
        if !self.settings.policy.allows_remote(&identity) {
            out.push(Output::Send(sasl_failure("not-authorized")));
            return;
        }
        if let Err(why) = self.peer.valid_for(&identity) {
            tracing::info!(remote = %identity, reason = %why, "SASL EXTERNAL refused");
            out.push(Output::Send(sasl_failure("not-authorized")));
            return;
        }
        out.push(Output::Send(Element::builder("success", ns::SASL).build()));
        out.push(Output::ResetStream);
        self.sasl_done = true;
        self.claimed = Some(identity.clone());
        self.state = State::AwaitHeader;
        // The restarted stream needs our header before anything else.
        self.header_sent = false;
        self.sasl_identity = Some(identity);
    }

    /// XEP-0220 step 1 received: we are the receiving server.
    fn db_result(&mut self, el: Element, out: &mut Vec<Output>) {
        let from = el.attr("from").and_then(domain_of);
        let to = el.attr("to").and_then(domain_of);
        let raw_from = el.attr("from").unwrap_or("");
        let raw_to = el.attr("to").unwrap_or("");
        let (Some(remote), Some(local)) = (from, to) else {
            return self.stream_error(
                "improper-addressing",
                Some("dialback without valid from/to"),
                out,
            );
        };
        let err =
            |c: &'static str| Output::Send(dialback::error("result", raw_to, raw_from, None, c));
        if !self.settings.dialback {
            out.push(err("feature-not-implemented"));
            return;
        }
        if self.tls_missing() {
            out.push(err("policy-violation"));
            return;
        }
        if !self.settings.policy.is_local_host(&local) {
            out.push(err("item-not-found"));
            return;
        }
        if !self.settings.policy.allows_remote(&remote) {
            out.push(err("forbidden"));
            return;
        }
        if self.authenticated.contains(&remote) {
            out.push(Output::Send(dialback::result_answer(&local, &remote, true)));
            return;
        }
        // A certificate valid for the sender domain proves more than the
        // dialback round trip would.
        if self.peer.valid_for(&remote).is_ok() {
            return self.on_dialback_checked(local, remote, DialbackOutcome::Valid, out);
        }
        if self.settings.secure_auth {
            out.push(err("not-authorized"));
            return;
        }
        if self.pending.len() >= self.settings.max_pending_dialback {
            out.push(err("resource-constraint"));
            return;
        }
        if !self.pending.insert((local.clone(), remote.clone())) {
            return; // already being verified
        }
        out.push(Output::VerifyDialback {
            local,
            remote,
            stream_id: self.stream_id.clone(),
            key: el.text().trim().to_owned(),
        });
    }

    fn on_dialback_checked(
        &mut self,
        local: String,
        remote: String,
        outcome: DialbackOutcome,
        out: &mut Vec<Output>,
    ) {
        self.pending.remove(&(local.clone(), remote.clone()));
        match outcome {
            DialbackOutcome::Valid => {
                out.push(Output::Send(dialback::result_answer(&local, &remote, true)));
                if self.authenticated.insert(remote.clone()) {
                    out.push(Output::Authenticated {
                        remote,
                        method: "dialback",
                    });
                }
            }
            DialbackOutcome::Invalid => {
                tracing::info!(%remote, %local, "dialback key invalid");
                out.push(Output::Send(dialback::result_answer(
                    &local, &remote, false,
                )));
            }
            DialbackOutcome::Error(condition) => {
                out.push(Output::Send(dialback::error(
                    "result", &local, &remote, None, condition,
                )));
            }
        }
    }

    /// XEP-0220 step 2 received: we are the authoritative server.
    fn db_verify(&mut self, el: Element, out: &mut Vec<Output>) {
        let raw_from = el.attr("from").unwrap_or("").to_owned();
        let raw_to = el.attr("to").unwrap_or("").to_owned();
        let Some(id) = el.attr("id").map(str::to_owned) else {
            return self.stream_error("bad-format", Some("db:verify without id"), out);
        };
        let (Some(receiving), Some(originating)) = (domain_of(&raw_from), domain_of(&raw_to))
        else {
            return self.stream_error(
                "improper-addressing",
                Some("dialback without valid from/to"),
                out,
            );
        };
        if self.tls_missing() {
            out.push(Output::Send(dialback::error(
                "verify",
                &raw_to,
                &raw_from,
                Some(&id),
                "policy-violation",
            )));
            return;
        }
        if !self.settings.policy.is_local_host(&originating) {
            out.push(Output::Send(dialback::error(
                "verify",
                &raw_to,
                &raw_from,
                Some(&id),
                "item-not-found",
            )));
            return;
        }
        let expected = dialback::key(&self.settings.secret, &receiving, &originating, &id);
        let valid = dialback::key_matches(&el.text(), &expected);
        tracing::debug!(%receiving, %originating, valid, "answered a dialback verification");
        out.push(Output::Send(dialback::verify_answer(
            &originating,
            &receiving,
            &id,
            valid,
        )));
    }

    fn sm(&mut self, el: Element, out: &mut Vec<Output>) {
        match el.name() {
            "enable" => {
                if !self.settings.stream_management || !self.is_authenticated() || self.sm.is_some()
                {
                    out.push(Output::Send(crate::c2s::sm::failed(
                        "unexpected-request",
                        None,
                    )));
                } else {
                    self.sm = Some(0);
                    out.push(Output::Send(Element::builder("enabled", ns::SM).build()));
                }
            }
            "r" => {
                if let Some(h) = self.sm {
                    out.push(Output::Send(crate::c2s::sm::ack_element(h)));
                }
            }
            // We send no stanzas on an incoming stream: nothing to ack.
            _ => {}
        }
    }

    fn stanza(&mut self, mut el: Element, out: &mut Vec<Output>) {
        if !self.is_authenticated() {
            return self.stream_error("not-authorized", Some("authenticate first"), out);
        }
        let (Some(from), Some(to)) = (el.attr("from"), el.attr("to")) else {
            return self.stream_error(
                "improper-addressing",
                Some("stanzas need 'from' and 'to'"),
                out,
            );
        };
        let Ok(from) = Jid::new(from) else {
            return self.stream_error("invalid-from", Some("malformed 'from'"), out);
        };
        if !self.authenticated.contains(from.domain().as_str()) {
            return self.stream_error(
                "invalid-from",
                Some("the 'from' domain is not authenticated on this stream"),
                out,
            );
        }
        let to = match Jid::new(to) {
            Ok(t) => t,
            Err(_) => {
                self.handled();
                out.push(Output::Bounce(el, StanzaError::jid_malformed()));
                return;
            }
        };
        if !self.settings.policy.is_local_host(to.domain().as_str()) {
            return self.stream_error(
                "host-unknown",
                Some("the 'to' domain is not served here"),
                out,
            );
        }
        // Normalised addresses from here on.
        stanza::set_attr(&mut el, "from", from.to_string());
        stanza::set_attr(&mut el, "to", to.to_string());
        self.handled();
        out.push(Output::Stanza(el));
    }

    fn handled(&mut self) {
        if let Some(h) = self.sm.as_mut() {
            *h = h.wrapping_add(1);
        }
    }
}

/// Our stream header on a server-to-server stream.
pub fn header_bytes(
    from: Option<&str>,
    to: Option<&str>,
    id: Option<&str>,
    version: bool,
) -> Vec<u8> {
    use crate::xml::writer::escape_attr;
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(
        b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' \
          xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback'",
    );
    for (attr, value) in [("from", from), ("to", to), ("id", id)] {
        if let Some(v) = value {
            out.push(b' ');
            out.extend_from_slice(attr.as_bytes());
            out.extend_from_slice(b"='");
            escape_attr(&mut out, v);
            out.push(b'\'');
        }
    }
    if version {
        out.extend_from_slice(b" version='1.0'");
    }
    out.push(b'>');
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::s2s::pkix::CertNames;
    use crate::xml::StreamParser;

    pub struct Hosts;
    impl Policy for Hosts {
        fn is_local_host(&self, d: &str) -> bool {
            d == "b.test" || d == "muc.b.test"
        }
        fn allows_remote(&self, d: &str) -> bool {
            d != "evil.test" && !self.is_local_host(d)
        }
    }

    pub fn settings() -> InSettings {
        InSettings {
            policy: Arc::new(Hosts),
            secret: Arc::new(b"secret-b".to_vec()),
            require_tls: true,
            secure_auth: false,
            dialback: true,
            starttls_available: true,
            stream_management: true,
            max_pending_dialback: 4,
        }
    }

    /// A certificate judged trusted and valid for these names.
    pub fn trusted(names: &[&str]) -> PeerCert {
        PeerCert {
            chain_error: None,
            names: CertNames {
                dns: names.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
        }
    }

    pub fn untrusted() -> PeerCert {
        PeerCert {
            chain_error: Some("certificate not trusted: UnknownIssuer".into()),
            names: CertNames::default(),
        }
    }

    /// Parse stream data into events: a stream header with elements, or
    /// elements alone (read as inside a server stream declaring `db:`).
    pub fn events(xml: &str) -> Vec<StreamEvent> {
        let mut p = StreamParser::new(1 << 16).server_stanzas_as_client();
        let inner = !xml.starts_with("<stream:stream");
        if inner {
            p.feed(HDR.as_bytes()).unwrap();
            let _ = p.next_event();
        }
        p.feed(xml.as_bytes()).unwrap();
        let mut v = Vec::new();
        while let Some(e) = p.next_event() {
            v.push(e);
        }
        v
    }

    pub const HDR: &str = "<stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' \
        xmlns:stream='http://etherx.jabber.org/streams' from='a.test' to='b.test' version='1.0'>";

    fn feed(m: &mut InMachine, xml: &str) -> Vec<Output> {
        let mut out = Vec::new();
        for e in events(xml) {
            out.extend(m.handle(Input::Stream(e)));
        }
        out
    }

    fn sent(out: &[Output]) -> Vec<&Element> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    fn error_of(out: &[Output]) -> Option<&'static str> {
        out.iter().find_map(|o| match o {
            Output::StreamError { condition, .. } => Some(*condition),
            _ => None,
        })
    }

    /// A machine past STARTTLS with the given peer certificate.
    fn after_tls(s: InSettings, cert: PeerCert) -> (InMachine, Vec<Output>) {
        let mut m = InMachine::new(s, false, PeerCert::none());
        let out = feed(
            &mut m,
            &format!("{HDR}<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"),
        );
        assert!(out.contains(&Output::StartTls), "{out:?}");
        let f = sent(&out)[0].clone();
        assert!(
            f.get_child("starttls", ns::TLS)
                .unwrap()
                .get_child("required", ns::TLS)
                .is_some()
        );
        assert!(f.get_child("dialback", ns::DIALBACK_FEATURE).is_none());
        assert!(m.handle(Input::TlsEstablished(cert)).is_empty());
        let out = feed(&mut m, HDR);
        (m, out)
    }

    #[test]
    fn header_checks() {
        let mut m = InMachine::new(settings(), false, PeerCert::none());
        let out = feed(&mut m, &HDR.replace("to='b.test'", "to='other.test'"));
        assert_eq!(error_of(&out), Some("host-unknown"));
        let mut m = InMachine::new(settings(), false, PeerCert::none());
        let out = feed(&mut m, &HDR.replace("jabber:server'", "jabber:client'"));
        assert_eq!(error_of(&out), Some("invalid-namespace"));
        let mut m = InMachine::new(settings(), false, PeerCert::none());
        let out = feed(&mut m, &HDR.replace("from='a.test'", "from='evil.test'"));
        assert_eq!(error_of(&out), Some("policy-violation"));
        let mut m = InMachine::new(settings(), false, PeerCert::none());
        let out = feed(&mut m, &HDR.replace("version='1.0'", "version='2.0'"));
        assert_eq!(error_of(&out), Some("unsupported-version"));
        // A header always goes out first, with our domain when we serve it.
        match &out[0] {
            Output::SendHeader { from, version, .. } => {
                assert_eq!(from.as_deref(), Some("b.test"));
                assert!(version);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tls_is_required_before_anything_else() {
        let mut m = InMachine::new(settings(), false, PeerCert::none());
        let out = feed(
            &mut m,
            &format!("{HDR}<db:result from='a.test' to='b.test'>k</db:result>"),
        );
        let answers = sent(&out);
        let e = answers.last().unwrap();
        assert_eq!(e.attr("type"), Some("error"));
        assert_eq!(
            dialback::error_condition(e).as_deref(),
            Some("policy-violation")
        );
        let out = feed(&mut m, "<message from='x@a.test' to='y@b.test'/>");
        assert_eq!(error_of(&out), Some("not-authorized"));
    }

    #[test]
    fn external_for_a_valid_certificate() {
        let (mut m, out) = after_tls(settings(), trusted(&["a.test"]));
        let f = sent(&out)[0];
        let mechs = f.get_child("mechanisms", ns::SASL).unwrap();
        assert_eq!(mechs.children().next().unwrap().text(), "EXTERNAL");
        assert!(f.get_child("dialback", ns::DIALBACK_FEATURE).is_some());
        assert!(f.get_child("sm", ns::SM).is_some());
        // authzid "a.test" in base64.
        let out = feed(
            &mut m,
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>YS50ZXN0</auth>",
        );
        assert!(sent(&out)[0].is("success", ns::SASL));
        assert!(out.contains(&Output::ResetStream));
        assert!(!m.is_authenticated());
        let out = feed(&mut m, HDR);
        assert!(matches!(out[0], Output::SendHeader { .. }));
        assert!(out.contains(&Output::Authenticated {
            remote: "a.test".into(),
            method: "EXTERNAL"
        }));
        let f = sent(&out)[0];
        assert!(f.get_child("mechanisms", ns::SASL).is_none());
        assert!(f.get_child("sm", ns::SM).is_some());
        let out = feed(
            &mut m,
            "<message from='x@a.test/r' to='y@b.test' type='chat'><body>hi</body></message>",
        );
        match &out[0] {
            Output::Stanza(s) => {
                assert!(s.is("message", ns::CLIENT));
                assert!(s.get_child("body", ns::CLIENT).is_some());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn external_refused_for_another_domain_then_dialback_works() {
        let (mut m, out) = after_tls(settings(), trusted(&["other.test"]));
        let f = sent(&out)[0];
        assert!(f.get_child("mechanisms", ns::SASL).is_none());
        let out = feed(
            &mut m,
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>",
        );
        let fail = sent(&out)[0];
        assert!(fail.is("failure", ns::SASL));
        assert!(fail.get_child("not-authorized", ns::SASL).is_some());
        // Same stream, dialback.
        let out = feed(
            &mut m,
            "<db:result from='a.test' to='b.test'>KEY</db:result>",
        );
        let id = m.stream_id().to_owned();
        assert_eq!(
            out,
            vec![Output::VerifyDialback {
                local: "b.test".into(),
                remote: "a.test".into(),
                stream_id: id,
                key: "KEY".into()
            }]
        );
        // Stanzas must wait for the verdict.
        let out = feed(&mut m, "<message from='x@a.test' to='y@b.test'/>");
        assert_eq!(error_of(&out), Some("not-authorized"));
    }

    fn dialback_authenticated() -> InMachine {
        let (mut m, _) = after_tls(settings(), untrusted());
        feed(
            &mut m,
            "<db:result from='a.test' to='b.test'>KEY</db:result>",
        );
        let out = m.handle(Input::DialbackChecked {
            local: "b.test".into(),
            remote: "a.test".into(),
            outcome: DialbackOutcome::Valid,
        });
        let ok = sent(&out)[0];
        assert!(ok.is("result", ns::DIALBACK));
        assert_eq!(ok.attr("type"), Some("valid"));
        assert_eq!(ok.attr("from"), Some("b.test"));
        assert_eq!(ok.attr("to"), Some("a.test"));
        assert!(out.contains(&Output::Authenticated {
            remote: "a.test".into(),
            method: "dialback"
        }));
        m
    }

    #[test]
    fn stanza_addressing_rules() {
        let mut m = dialback_authenticated();
        let out = feed(&mut m, "<message from='x@a.test' to='y@muc.b.test'/>");
        assert!(matches!(out[0], Output::Stanza(_)));
        let out = feed(&mut m, "<message from='x@a.test' to='y@b@test'/>");
        assert!(matches!(&out[0], Output::Bounce(_, e) if e.condition == "jid-malformed"));
        let mut m2 = dialback_authenticated();
        let out = feed(&mut m2, "<message to='y@b.test'/>");
        assert_eq!(error_of(&out), Some("improper-addressing"));
        let mut m3 = dialback_authenticated();
        let out = feed(&mut m3, "<message from='x@c.test' to='y@b.test'/>");
        assert_eq!(error_of(&out), Some("invalid-from"));
        let out = feed(&mut m, "<message from='x@a.test' to='y@elsewhere.test'/>");
        assert_eq!(error_of(&out), Some("host-unknown"));
        assert!(m.is_closed());
    }

    #[test]
    fn dialback_outcomes_and_errors() {
        let (mut m, _) = after_tls(settings(), untrusted());
        feed(
            &mut m,
            "<db:result from='a.test' to='b.test'>KEY</db:result>",
        );
        let out = m.handle(Input::DialbackChecked {
            local: "b.test".into(),
            remote: "a.test".into(),
            outcome: DialbackOutcome::Invalid,
        });
        assert_eq!(sent(&out)[0].attr("type"), Some("invalid"));
        assert!(!m.is_authenticated());
        feed(
            &mut m,
            "<db:result from='a.test' to='b.test'>KEY</db:result>",
        );
        let out = m.handle(Input::DialbackChecked {
            local: "b.test".into(),
            remote: "a.test".into(),
            outcome: DialbackOutcome::Error("remote-server-not-found"),
        });
        let e = sent(&out)[0];
        assert_eq!(e.attr("type"), Some("error"));
        assert_eq!(
            dialback::error_condition(e).as_deref(),
            Some("remote-server-not-found")
        );
        // A target domain we do not serve.
        let out = feed(
            &mut m,
            "<db:result from='a.test' to='x.test'>KEY</db:result>",
        );
        assert_eq!(
            dialback::error_condition(sent(&out)[0]).as_deref(),
            Some("item-not-found")
        );
        // A trusted certificate valid for the sender needs no round trip.
        let (mut m, _) = after_tls(settings(), trusted(&["a.test"]));
        let out = feed(
            &mut m,
            "<db:result from='a.test' to='b.test'>whatever</db:result>",
        );
        assert_eq!(sent(&out)[0].attr("type"), Some("valid"));
        assert!(m.is_authenticated());
    }

    #[test]
    fn secure_auth_refuses_dialback_only_peers() {
        let mut s = settings();
        s.secure_auth = true;
        let (mut m, out) = after_tls(s, untrusted());
        assert!(
            sent(&out)[0]
                .get_child("dialback", ns::DIALBACK_FEATURE)
                .is_none()
        );
        let out = feed(
            &mut m,
            "<db:result from='a.test' to='b.test'>KEY</db:result>",
        );
        assert_eq!(
            dialback::error_condition(sent(&out)[0]).as_deref(),
            Some("not-authorized")
        );
        assert!(!m.is_authenticated());
    }

    #[test]
    fn authoritative_answers_verification_requests() {
        let (mut m, _) = after_tls(settings(), untrusted());
        let key = dialback::key(b"secret-b", "c.test", "b.test", "S1");
        let out = feed(
            &mut m,
            &format!("<db:verify from='c.test' to='b.test' id='S1'>{key}</db:verify>"),
        );
        let v = sent(&out)[0];
        assert_eq!(
            (v.attr("type"), v.attr("from"), v.attr("to"), v.attr("id")),
            (Some("valid"), Some("b.test"), Some("c.test"), Some("S1"))
        );
        let out = feed(
            &mut m,
            &format!("<db:verify from='c.test' to='b.test' id='S2'>{key}</db:verify>"),
        );
        assert_eq!(sent(&out)[0].attr("type"), Some("invalid"));
        let out = feed(
            &mut m,
            "<db:verify from='c.test' to='z.test' id='S3'>k</db:verify>",
        );
        assert_eq!(
            dialback::error_condition(sent(&out)[0]).as_deref(),
            Some("item-not-found")
        );
        // Verification does not authenticate the stream.
        assert!(!m.is_authenticated());
    }

    #[test]
    fn stream_management_counts_handled_stanzas() {
        let (mut m, _) = after_tls(settings(), untrusted());
        let out = feed(&mut m, "<enable xmlns='urn:xmpp:sm:3'/>");
        assert!(sent(&out)[0].is("failed", ns::SM));
        let mut m = dialback_authenticated();
        let out = feed(&mut m, "<enable xmlns='urn:xmpp:sm:3'/>");
        assert!(sent(&out)[0].is("enabled", ns::SM));
        feed(
            &mut m,
            "<message from='x@a.test' to='y@b.test'/><presence from='x@a.test' to='y@b.test'/>",
        );
        let out = feed(&mut m, "<r xmlns='urn:xmpp:sm:3'/>");
        assert_eq!(sent(&out)[0].attr("h"), Some("2"));
    }

    #[test]
    fn unsolicited_dialback_answers_are_ignored() {
        let (mut m, _) = after_tls(settings(), untrusted());
        let out = feed(
            &mut m,
            "<db:result from='a.test' to='b.test' type='valid'/>",
        );
        assert!(out.is_empty());
        assert!(!m.is_authenticated());
    }
}
