//! The initiating side of a server-to-server stream (RFC 6120), sans-IO.
//!
//! We connect for one (local domain, remote domain) pair: send our header,
//! STARTTLS (required by default), then authenticate with SASL EXTERNAL
//! (XEP-0178) when the peer offers it, falling back to Server Dialback
//! (XEP-0220) on the same stream when EXTERNAL fails or is not offered.
//! Once established, stanzas go out, counted by stream management
//! (XEP-0198) when the peer offers it. The stream also carries our
//! `<db:verify/>` requests when we act as a receiving server that checks a
//! key with this remote domain's authoritative server.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use minidom::Element;
use tokio::time::Instant;

use super::dialback;
use super::incoming::DialbackOutcome;
use super::pkix::PeerCert;
use crate::c2s::sm::{self, SmSettings, StreamManagement};
use crate::stanza::name;
use crate::xml::{StreamEvent, StreamHeader, ns};

#[derive(Clone)]
pub struct OutSettings {
    pub local: String,
    pub remote: String,
    pub secret: Arc<Vec<u8>>,
    pub require_tls: bool,
    pub secure_auth: bool,
    pub dialback: bool,
    /// Try SASL EXTERNAL when offered (off after a peer dropped the stream
    /// during EXTERNAL).
    pub try_external: bool,
    pub stream_management: bool,
    pub sm: SmSettings,
}

#[derive(Debug)]
pub enum Input {
    Stream(StreamEvent),
    /// TLS is up (after `<proceed/>`), with the judgement of the peer's
    /// certificate.
    TlsEstablished(PeerCert),
    /// Ask the peer (as authoritative server of the remote domain) whether
    /// `key` is valid for its stream `id` to us (XEP-0220 step 2).
    Verify {
        id: String,
        key: String,
    },
    /// A stanza to send (only once established).
    Stanza(Element),
    /// Time passed (stream-management timers).
    Tick,
    /// The queue is empty for now: ask for an acknowledgement of what was
    /// sent, so that a connection lost later costs as little as possible.
    Drained,
}

/// Why a stream could not be set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The stanza error for what was queued.
    pub condition: &'static str,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send our stream header (from local, to remote).
    SendHeader,
    Send(Element),
    /// `<proceed/>` arrived: TLS handshake as client, reset the parser,
    /// answer with [`Input::TlsEstablished`].
    StartTls,
    /// SASL succeeded: reset the parser (a header follows).
    ResetStream,
    /// Stanzas may flow now.
    Established {
        method: &'static str,
    },
    /// The peer answered one of our verification requests.
    VerifyResult {
        id: String,
        outcome: DialbackOutcome,
    },
    /// Negotiation failed; close the stream.
    Failed(Failure),
    /// We close the stream with an error.
    StreamError {
        condition: &'static str,
        text: Option<String>,
    },
    /// The peer closed its stream (with this stream error, if any).
    PeerClosed {
        error: Option<String>,
    },
    /// An ack request went unanswered: the connection is dead.
    Dead,
}

/// Where the negotiation stands (for the driver's decisions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Negotiating,
    External,
    Dialback,
    Established,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    AwaitHeader,
    AwaitFeatures,
    AwaitProceed,
    TlsHandshake,
    SaslPending,
    DialbackPending,
    Established,
    Closed,
}

pub struct OutMachine {
    s: OutSettings,
    state: State,
    secure: bool,
    peer: PeerCert,
    stream_id: Option<String>,
    dialback_declared: bool,
    dialback_offered: bool,
    sm_offered: bool,
    sasl_done: bool,
    method: &'static str,
    verify_queue: VecDeque<(String, String)>,
    verify_sent: HashSet<String>,
    sm: Option<StreamManagement>,
}

impl OutMachine {
    /// A new stream; `secure` when connected with direct TLS (XEP-0368).
    pub fn new(s: OutSettings, secure: bool, peer: PeerCert) -> Self {
        OutMachine {
            s,
            state: State::Start,
            secure,
            peer,
            stream_id: None,
            dialback_declared: false,
            dialback_offered: false,
            sm_offered: false,
            sasl_done: false,
            method: "",
            verify_queue: VecDeque::new(),
            verify_sent: HashSet::new(),
            sm: None,
        }
    }

    /// The connection is up: our header goes first.
    pub fn start(&mut self) -> Vec<Output> {
        self.state = State::AwaitHeader;
        vec![Output::SendHeader]
    }

    pub fn phase(&self) -> Phase {
        match self.state {
            State::SaslPending => Phase::External,
            State::DialbackPending => Phase::Dialback,
            State::Established => Phase::Established,
            State::Closed => Phase::Closed,
            _ => Phase::Negotiating,
        }
    }

    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    pub fn method(&self) -> &'static str {
        self.method
    }

    pub fn sm_enabled(&self) -> bool {
        self.sm.is_some()
    }

    /// May another stanza go out now (the unacked window has room)?
    pub fn can_send(&self) -> bool {
        self.state == State::Established
            && self
                .sm
                .as_ref()
                .is_none_or(|sm| sm.unacked.len() < self.s.sm.max_unacked)
    }

    /// Stanzas sent but not acknowledged (with stream management).
    pub fn unacked(&self) -> usize {
        self.sm.as_ref().map_or(0, |sm| sm.unacked.len())
    }

    /// Take the unacknowledged stanzas (the stream is gone).
    pub fn take_unacked(&mut self) -> Vec<Element> {
        self.sm
            .as_mut()
            .map(|sm| sm.take_unacked())
            .unwrap_or_default()
    }

    /// Verification requests not answered (the stream is gone).
    pub fn take_verifies(&mut self) -> Vec<String> {
        let mut ids: Vec<String> = self.verify_sent.drain().collect();
        ids.extend(self.verify_queue.drain(..).map(|(id, _)| id));
        ids
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.sm.as_ref().and_then(|sm| sm.next_deadline(&self.s.sm))
    }

    pub fn handle(&mut self, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        if self.state == State::Closed {
            return out;
        }
        match input {
            Input::Stream(StreamEvent::Header(h)) => self.on_header(h, &mut out),
            Input::Stream(StreamEvent::Element(el)) => self.on_element(el, &mut out),
            Input::Stream(StreamEvent::End) => {
                self.state = State::Closed;
                out.push(Output::PeerClosed { error: None });
            }
            Input::TlsEstablished(peer) => {
                if self.state == State::TlsHandshake {
                    self.secure = true;
                    self.peer = peer;
                    self.state = State::AwaitHeader;
                    out.push(Output::SendHeader);
                }
            }
            Input::Verify { id, key } => {
                self.verify_queue.push_back((id, key));
                self.flush_verifies(&mut out);
            }
            Input::Stanza(el) => {
                if let Some(sm) = self.sm.as_mut() {
                    sm.sent(el.clone(), Instant::now());
                }
                out.push(Output::Send(el));
                self.maybe_request(&mut out);
            }
            Input::Tick => self.tick(&mut out),
            Input::Drained => {
                if let Some(sm) = self.sm.as_mut()
                    && sm.request_outstanding.is_none()
                    && sm.since_request > 0
                {
                    sm.requested(Instant::now());
                    out.push(Output::Send(sm::request_element()));
                }
            }
        }
        out
    }

    fn fail(&mut self, condition: &'static str, reason: String, out: &mut Vec<Output>) {
        self.state = State::Closed;
        out.push(Output::Failed(Failure { condition, reason }));
    }

    fn stream_error(&mut self, condition: &'static str, text: &str, out: &mut Vec<Output>) {
        self.state = State::Closed;
        out.push(Output::StreamError {
            condition,
            text: Some(text.to_owned()),
        });
    }

    fn on_header(&mut self, h: StreamHeader, out: &mut Vec<Output>) {
        if self.state != State::AwaitHeader {
            return self.stream_error("bad-format", "unexpected stream header", out);
        }
        if h.stream_ns != ns::STREAM || h.local_name != "stream" {
            return self.stream_error("invalid-namespace", "not an XMPP stream", out);
        }
        if h.default_ns != ns::SERVER {
            return self.stream_error("invalid-namespace", "expected jabber:server", out);
        }
        self.stream_id = h.id.filter(|i| !i.is_empty());
        self.dialback_declared = h.dialback_ns.as_deref() == Some(ns::DIALBACK);
        let version1 = h
            .version
            .as_deref()
            .is_some_and(|v| v.split('.').next() == Some("1"));
        if version1 {
            self.state = State::AwaitFeatures;
            return;
        }
        // A pre-1.0 server sends no features: no TLS, dialback only.
        if self.s.require_tls && !self.secure {
            let reason = "the remote server does not support TLS (no stream version 1.0)";
            return self.fail("remote-server-timeout", reason.into(), out);
        }
        self.dialback_offered = false;
        self.authenticate(out);
    }

    fn on_element(&mut self, el: Element, out: &mut Vec<Output>) {
        if el.is("error", ns::STREAM) {
            let condition = el
                .children()
                .find(|c| c.ns() == ns::STREAM_ERRORS && c.name() != "text")
                .map(|c| c.name().to_owned())
                .unwrap_or_else(|| "undefined-condition".into());
            self.state = State::Closed;
            out.push(Output::PeerClosed {
                error: Some(condition),
            });
            return;
        }
        match self.state {
            State::AwaitFeatures if el.is("features", ns::STREAM) => self.on_features(el, out),
            State::AwaitProceed if el.ns() == ns::TLS => {
                if el.name() == "proceed" {
                    self.state = State::TlsHandshake;
                    out.push(Output::StartTls);
                } else {
                    self.fail(
                        "remote-server-timeout",
                        "the remote server refused STARTTLS".into(),
                        out,
                    );
                }
            }
            State::SaslPending if el.ns() == ns::SASL => self.on_sasl(el, out),
            State::DialbackPending | State::Established if el.ns() == ns::DIALBACK => {
                self.on_dialback(el, out)
            }
            State::Established if el.ns() == ns::SM => self.on_sm(el, out),
            State::Established | State::DialbackPending if crate::stanza::kind(&el).is_some() => {
                // Streams are one-way without XEP-0288.
                tracing::warn!(remote = %self.s.remote, "stanza on an outgoing stream ignored");
            }
            _ => {
                tracing::debug!(remote = %self.s.remote, name = el.name(), state = ?self.state, "unexpected element");
                self.stream_error(
                    "unsupported-stanza-type",
                    "unexpected element during negotiation",
                    out,
                );
            }
        }
    }

    fn on_features(&mut self, f: Element, out: &mut Vec<Output>) {
        self.sm_offered = f.get_child("sm", ns::SM).is_some();
        self.dialback_offered = f.get_child("dialback", ns::DIALBACK_FEATURE).is_some();
        if self.sasl_done {
            return self.established(out);
        }
        if !self.secure {
            if f.get_child("starttls", ns::TLS).is_some() {
                self.state = State::AwaitProceed;
                out.push(Output::Send(Element::builder("starttls", ns::TLS).build()));
                return;
            }
            if self.s.require_tls {
                let reason = "the remote server does not offer STARTTLS".into();
                return self.fail("remote-server-timeout", reason, out);
            }
        }
        let external = f.get_child("mechanisms", ns::SASL).is_some_and(|m| {
            m.children()
                .any(|c| c.name() == "mechanism" && c.text().trim() == "EXTERNAL")
        });
        if external && self.s.try_external && self.secure {
            self.state = State::SaslPending;
            out.push(Output::Send(
                Element::builder("auth", ns::SASL)
                    .attr(name("mechanism"), "EXTERNAL")
                    .append(B64.encode(self.s.local.as_bytes()))
                    .build(),
            ));
            return;
        }
        self.authenticate(out);
    }

    /// Dialback (or a failure when it is not possible).
    fn authenticate(&mut self, out: &mut Vec<Output>) {
        if self.s.secure_auth
            && let Err(why) = self.peer.valid_for(&self.s.remote)
        {
            return self.fail("remote-server-timeout", format!("secure_auth: {why}"), out);
        }
        let can_dialback = self.s.dialback && (self.dialback_offered || self.dialback_declared);
        if !can_dialback {
            let reason = if self.s.dialback {
                "no authentication method in common (no EXTERNAL for us, no dialback)"
            } else {
                "dialback is disabled and SASL EXTERNAL did not succeed"
            };
            return self.fail("remote-server-timeout", reason.into(), out);
        }
        let Some(id) = self.stream_id.clone() else {
            return self.fail(
                "remote-server-timeout",
                "the remote server gave no stream id".into(),
                out,
            );
        };
        let key = dialback::key(&self.s.secret, &self.s.remote, &self.s.local, &id);
        self.state = State::DialbackPending;
        out.push(Output::Send(dialback::result_request(
            &self.s.local,
            &self.s.remote,
            &key,
        )));
        self.flush_verifies(out);
    }

    fn on_sasl(&mut self, el: Element, out: &mut Vec<Output>) {
        match el.name() {
            "success" => {
                self.sasl_done = true;
                self.method = "EXTERNAL";
                self.state = State::AwaitHeader;
                out.push(Output::ResetStream);
                out.push(Output::SendHeader);
            }
            "failure" => {
                let condition = el
                    .children()
                    .find(|c| c.name() != "text")
                    .map(|c| c.name().to_owned())
                    .unwrap_or_default();
                tracing::info!(local = %self.s.local, remote = %self.s.remote, %condition, "SASL EXTERNAL failed; trying dialback");
                self.authenticate(out);
            }
            _ => self.stream_error("policy-violation", "unexpected SASL element", out),
        }
    }

    fn on_dialback(&mut self, el: Element, out: &mut Vec<Output>) {
        let from = el.attr("from").unwrap_or("");
        let to = el.attr("to").unwrap_or("");
        let typ = el.attr("type");
        match el.name() {
            "result" if self.state == State::DialbackPending => {
                if from != self.s.remote || to != self.s.local {
                    tracing::warn!(%from, %to, "dialback result for another domain pair ignored");
                    return;
                }
                match typ {
                    Some("valid") => {
                        self.method = "dialback";
                        self.established(out)
                    }
                    Some("invalid") => self.fail(
                        "remote-server-timeout",
                        "the remote server refused our dialback key".into(),
                        out,
                    ),
                    Some("error") => {
                        let c = dialback::error_condition(&el).unwrap_or_default();
                        self.fail(
                            "remote-server-timeout",
                            format!("dialback error from the remote server: {c}"),
                            out,
                        )
                    }
                    _ => {}
                }
            }
            "verify" if typ.is_some() => {
                let id = el.attr("id").unwrap_or("").to_owned();
                if from != self.s.remote || to != self.s.local || !self.verify_sent.remove(&id) {
                    tracing::warn!(%from, %to, %id, "unsolicited dialback verification answer ignored");
                    return;
                }
                let outcome = match typ {
                    Some("valid") => DialbackOutcome::Valid,
                    Some("invalid") => DialbackOutcome::Invalid,
                    _ => DialbackOutcome::Error("remote-server-not-found"),
                };
                out.push(Output::VerifyResult { id, outcome });
            }
            _ => tracing::warn!(name = el.name(), "unexpected dialback element ignored"),
        }
    }

    fn established(&mut self, out: &mut Vec<Output>) {
        self.state = State::Established;
        out.push(Output::Established {
            method: self.method,
        });
        if self.sm_offered && self.s.stream_management {
            out.push(Output::Send(Element::builder("enable", ns::SM).build()));
            self.sm = Some(StreamManagement::new(None, 0));
        }
        self.flush_verifies(out);
    }

    fn flush_verifies(&mut self, out: &mut Vec<Output>) {
        if !matches!(self.state, State::DialbackPending | State::Established) {
            return;
        }
        while let Some((id, key)) = self.verify_queue.pop_front() {
            out.push(Output::Send(dialback::verify_request(
                &self.s.local,
                &self.s.remote,
                &id,
                &key,
            )));
            self.verify_sent.insert(id);
        }
    }

    fn on_sm(&mut self, el: Element, out: &mut Vec<Output>) {
        match el.name() {
            "enabled" => {}
            "failed" => {
                tracing::info!(remote = %self.s.remote, "the remote server refused stream management");
                self.sm = None;
            }
            "a" => {
                let Some(sm) = self.sm.as_mut() else { return };
                let Some(h) = el.attr("h").and_then(|h| h.parse::<u32>().ok()) else {
                    return self.stream_error("bad-format", "<a/> without a valid h", out);
                };
                if let Err(e) = sm.ack(h) {
                    tracing::warn!(remote = %self.s.remote, h = e.h, sent = e.send_count, "peer acknowledged more than we sent");
                    self.state = State::Closed;
                    out.push(Output::StreamError {
                        condition: "undefined-condition",
                        text: Some("handled-count-too-high".into()),
                    });
                }
            }
            // We receive no stanzas on an outgoing stream.
            "r" => out.push(Output::Send(sm::ack_element(0))),
            _ => {}
        }
    }

    fn maybe_request(&mut self, out: &mut Vec<Output>) {
        let now = Instant::now();
        if let Some(sm) = self.sm.as_mut()
            && sm.should_request(&self.s.sm, now)
        {
            sm.requested(now);
            out.push(Output::Send(sm::request_element()));
        }
    }

    fn tick(&mut self, out: &mut Vec<Output>) {
        let now = Instant::now();
        if let Some(sm) = self.sm.as_ref()
            && sm.ack_overdue(&self.s.sm, now)
        {
            out.push(Output::Dead);
            return;
        }
        self.maybe_request(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s2s::incoming::tests::{events, settings as in_settings, trusted, untrusted};
    use crate::s2s::incoming::{self, InMachine, header_bytes};
    use crate::xml::{StreamParser, serialize_into};

    fn settings() -> OutSettings {
        OutSettings {
            local: "a.test".into(),
            remote: "b.test".into(),
            secret: Arc::new(b"secret-a".to_vec()),
            require_tls: true,
            secure_auth: false,
            dialback: true,
            try_external: true,
            stream_management: true,
            sm: SmSettings {
                request_after_stanzas: 2,
                ..SmSettings::default()
            },
        }
    }

    const PEER_HDR: &str = "<stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' \
        xmlns:stream='http://etherx.jabber.org/streams' from='b.test' to='a.test' id='S1' version='1.0'>";

    fn feed(m: &mut OutMachine, xml: &str) -> Vec<Output> {
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

    fn failed(out: &[Output]) -> Option<&Failure> {
        out.iter().find_map(|o| match o {
            Output::Failed(f) => Some(f),
            _ => None,
        })
    }

    /// Past STARTTLS with this certificate for the peer; returns the
    /// outputs for the post-TLS features.
    fn secured(s: OutSettings, cert: PeerCert, features: &str) -> (OutMachine, Vec<Output>) {
        let mut m = OutMachine::new(s, false, PeerCert::none());
        assert_eq!(m.start(), vec![Output::SendHeader]);
        let out = feed(
            &mut m,
            &format!(
                "{PEER_HDR}<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls></stream:features>"
            ),
        );
        assert!(sent(&out)[0].is("starttls", ns::TLS));
        let out = feed(&mut m, "<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>");
        assert_eq!(out, vec![Output::StartTls]);
        assert_eq!(
            m.handle(Input::TlsEstablished(cert)),
            vec![Output::SendHeader]
        );
        let out = feed(
            &mut m,
            &format!("{PEER_HDR}<stream:features>{features}</stream:features>"),
        );
        (m, out)
    }

    const DIALBACK_F: &str = "<dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>";
    const EXTERNAL_F: &str = "<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>EXTERNAL</mechanism></mechanisms>";
    const SM_F: &str = "<sm xmlns='urn:xmpp:sm:3'/>";

    #[test]
    fn starttls_is_required() {
        let mut m = OutMachine::new(settings(), false, PeerCert::none());
        m.start();
        let out = feed(
            &mut m,
            &format!("{PEER_HDR}<stream:features>{DIALBACK_F}</stream:features>"),
        );
        let f = failed(&out).unwrap();
        assert_eq!(f.condition, "remote-server-timeout");
        assert!(f.reason.contains("STARTTLS"));
        // Without the requirement, dialback goes ahead in the clear.
        let mut s = settings();
        s.require_tls = false;
        let mut m = OutMachine::new(s, false, PeerCert::none());
        m.start();
        let out = feed(
            &mut m,
            &format!("{PEER_HDR}<stream:features>{DIALBACK_F}</stream:features>"),
        );
        let r = sent(&out)[0];
        assert!(r.is("result", ns::DIALBACK));
        assert_eq!(
            r.text(),
            dialback::key(b"secret-a", "b.test", "a.test", "S1")
        );
    }

    #[test]
    fn external_then_restart() {
        let (mut m, out) = secured(
            settings(),
            trusted(&["b.test"]),
            &format!("{EXTERNAL_F}{DIALBACK_F}"),
        );
        let auth = sent(&out)[0];
        assert_eq!(auth.attr("mechanism"), Some("EXTERNAL"));
        assert_eq!(auth.text(), "YS50ZXN0");
        assert_eq!(m.phase(), Phase::External);
        let out = feed(
            &mut m,
            "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>",
        );
        assert_eq!(out, vec![Output::ResetStream, Output::SendHeader]);
        let out = feed(
            &mut m,
            &format!("{PEER_HDR}<stream:features>{SM_F}</stream:features>"),
        );
        assert_eq!(out[0], Output::Established { method: "EXTERNAL" });
        assert!(sent(&out)[0].is("enable", ns::SM));
        assert!(m.is_established());
    }

    #[test]
    fn external_failure_falls_back_to_dialback_on_the_same_stream() {
        let (mut m, _) = secured(
            settings(),
            untrusted(),
            &format!("{EXTERNAL_F}{DIALBACK_F}"),
        );
        let out = feed(
            &mut m,
            "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>",
        );
        assert!(sent(&out)[0].is("result", ns::DIALBACK));
        assert_eq!(m.phase(), Phase::Dialback);
        let out = feed(
            &mut m,
            "<db:result from='b.test' to='a.test' type='valid'/>",
        );
        assert_eq!(out[0], Output::Established { method: "dialback" });
    }

    #[test]
    fn a_peer_dropping_the_stream_during_external_is_visible() {
        let (mut m, _) = secured(settings(), trusted(&["b.test"]), EXTERNAL_F);
        assert_eq!(m.phase(), Phase::External);
        // The driver reads the phase before the close to decide on a
        // retry with dialback.
        let out = m.handle(Input::Stream(StreamEvent::End));
        assert_eq!(out, vec![Output::PeerClosed { error: None }]);
        // On the retry EXTERNAL is not tried: dialback (declared with the
        // xmlns:db of the header) is used.
        let mut s = settings();
        s.try_external = false;
        let (m, out) = secured(s.clone(), trusted(&["b.test"]), EXTERNAL_F);
        assert!(sent(&out)[0].is("result", ns::DIALBACK));
        assert_eq!(m.phase(), Phase::Dialback);
        // With dialback off too there is no method left.
        s.dialback = false;
        let (_, out) = secured(s, trusted(&["b.test"]), EXTERNAL_F);
        assert!(failed(&out).is_some());
    }

    #[test]
    fn dialback_refusals_fail() {
        let (mut m, _) = secured(settings(), untrusted(), DIALBACK_F);
        let out = feed(
            &mut m,
            "<db:result from='b.test' to='a.test' type='invalid'/>",
        );
        assert_eq!(failed(&out).unwrap().condition, "remote-server-timeout");
        let (mut m, _) = secured(settings(), untrusted(), DIALBACK_F);
        // A result for another pair is not ours.
        let out = feed(
            &mut m,
            "<db:result from='c.test' to='a.test' type='valid'/>",
        );
        assert!(out.is_empty());
        let out = feed(
            &mut m,
            "<db:result from='b.test' to='a.test' type='error'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></db:result>",
        );
        assert!(failed(&out).unwrap().reason.contains("item-not-found"));
    }

    #[test]
    fn secure_auth_needs_a_valid_certificate() {
        let mut s = settings();
        s.secure_auth = true;
        let (_, out) = secured(s.clone(), untrusted(), DIALBACK_F);
        assert!(failed(&out).unwrap().reason.contains("secure_auth"));
        let (_, out) = secured(s, trusted(&["b.test"]), DIALBACK_F);
        assert!(sent(&out)[0].is("result", ns::DIALBACK));
    }

    #[test]
    fn verification_requests_wait_for_the_stream_and_answers_are_matched() {
        let mut m = OutMachine::new(settings(), false, PeerCert::none());
        m.start();
        assert!(
            m.handle(Input::Verify {
                id: "X1".into(),
                key: "k".into()
            })
            .is_empty()
        );
        feed(
            &mut m,
            &format!(
                "{PEER_HDR}<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:features>"
            ),
        );
        feed(&mut m, "<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>");
        m.handle(Input::TlsEstablished(untrusted()));
        let out = feed(
            &mut m,
            &format!("{PEER_HDR}<stream:features>{DIALBACK_F}</stream:features>"),
        );
        let s = sent(&out);
        assert!(s[0].is("result", ns::DIALBACK));
        assert!(s[1].is("verify", ns::DIALBACK));
        assert_eq!(s[1].attr("id"), Some("X1"));
        assert_eq!(s[1].attr("from"), Some("a.test"));
        // An answer to something never asked is ignored.
        assert!(
            feed(
                &mut m,
                "<db:verify from='b.test' to='a.test' id='X9' type='valid'/>"
            )
            .is_empty()
        );
        let out = feed(
            &mut m,
            "<db:verify from='b.test' to='a.test' id='X1' type='valid'/>",
        );
        assert_eq!(
            out,
            vec![Output::VerifyResult {
                id: "X1".into(),
                outcome: DialbackOutcome::Valid
            }]
        );
    }

    #[test]
    fn stream_management_keeps_unacked_stanzas() {
        let (mut m, _) = secured(settings(), trusted(&["b.test"]), EXTERNAL_F);
        feed(
            &mut m,
            "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>",
        );
        feed(
            &mut m,
            &format!("{PEER_HDR}<stream:features>{SM_F}</stream:features>"),
        );
        let msg = |n: u32| {
            crate::stanza::build(
                "message",
                Some("x@a.test"),
                Some("y@b.test"),
                Some("chat"),
                Some(&n.to_string()),
            )
            .build()
        };
        let out = m.handle(Input::Stanza(msg(1)));
        assert_eq!(sent(&out).len(), 1);
        let out = m.handle(Input::Stanza(msg(2)));
        // The second stanza triggers an ack request.
        assert!(sent(&out)[1].is("r", ns::SM));
        m.handle(Input::Stanza(msg(3)));
        assert_eq!(m.unacked(), 3);
        feed(
            &mut m,
            "<enabled xmlns='urn:xmpp:sm:3'/><a xmlns='urn:xmpp:sm:3' h='2'/>",
        );
        assert_eq!(m.unacked(), 1);
        let left = m.take_unacked();
        assert_eq!(left[0].attr("id"), Some("3"));
        // Acknowledging more than was sent is an error.
        let (mut m, _) = secured(settings(), trusted(&["b.test"]), EXTERNAL_F);
        feed(
            &mut m,
            "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>",
        );
        feed(
            &mut m,
            &format!("{PEER_HDR}<stream:features>{SM_F}</stream:features>"),
        );
        let out = feed(&mut m, "<a xmlns='urn:xmpp:sm:3' h='5'/>");
        assert!(matches!(
            out[0],
            Output::StreamError {
                condition: "undefined-condition",
                ..
            }
        ));
    }

    /// Bytes out of one machine, parsed as the other side would.
    struct Wire(StreamParser);
    impl Wire {
        fn new() -> Wire {
            Wire(StreamParser::new(1 << 16).server_stanzas_as_client())
        }
        fn pass(&mut self, bytes: &[u8]) -> Vec<StreamEvent> {
            self.0.feed(bytes).unwrap();
            let mut v = Vec::new();
            while let Some(e) = self.0.next_event() {
                v.push(e);
            }
            v
        }
    }

    /// An outgoing machine and an incoming machine talk through the real
    /// serialiser and parser until neither has anything to say.
    fn converse(
        out_s: OutSettings,
        authority_secret: &[u8],
        in_s: incoming::InSettings,
        out_cert: PeerCert,
        in_cert: PeerCert,
    ) -> (OutMachine, InMachine, Vec<Element>) {
        let mut om = OutMachine::new(out_s.clone(), false, PeerCert::none());
        let mut im = InMachine::new(in_s, false, PeerCert::none());
        let (mut to_in, mut to_out) = (Wire::new(), Wire::new());
        let mut delivered = Vec::new();
        let mut o_outs = om.start();
        for _ in 0..50 {
            let mut bytes = Vec::new();
            let mut next_in = Vec::new();
            for o in o_outs.drain(..) {
                match o {
                    Output::SendHeader => bytes.extend(header_bytes(
                        Some(&out_s.local),
                        Some(&out_s.remote),
                        None,
                        true,
                    )),
                    Output::Send(e) => serialize_into(&mut bytes, &e, ns::SERVER),
                    Output::StartTls => to_out = Wire::new(),
                    Output::ResetStream => to_out = Wire::new(),
                    _ => {}
                }
            }
            for ev in to_in.pass(&bytes) {
                next_in.extend(im.handle(incoming::Input::Stream(ev)));
            }
            let mut back = Vec::new();
            let mut queue: VecDeque<incoming::Output> = next_in.into();
            while let Some(o) = queue.pop_front() {
                match o {
                    incoming::Output::SendHeader {
                        id,
                        from,
                        to,
                        version,
                    } => back.extend(header_bytes(
                        from.as_deref(),
                        to.as_deref(),
                        Some(&id),
                        version,
                    )),
                    incoming::Output::Send(e) => serialize_into(&mut back, &e, ns::SERVER),
                    incoming::Output::StartTls => {
                        to_in = Wire::new();
                        queue.extend(im.handle(incoming::Input::TlsEstablished(in_cert.clone())));
                    }
                    incoming::Output::ResetStream => to_in = Wire::new(),
                    incoming::Output::VerifyDialback {
                        local,
                        remote,
                        stream_id,
                        key,
                    } => {
                        // The authoritative server of a.test knows its secret.
                        let ok = dialback::key_matches(
                            &key,
                            &dialback::key(authority_secret, &local, &remote, &stream_id),
                        );
                        let outcome = if ok {
                            DialbackOutcome::Valid
                        } else {
                            DialbackOutcome::Invalid
                        };
                        queue.extend(im.handle(incoming::Input::DialbackChecked {
                            local,
                            remote,
                            outcome,
                        }));
                    }
                    incoming::Output::Stanza(e) => delivered.push(e),
                    _ => {}
                }
            }
            for ev in to_out.pass(&back) {
                o_outs.extend(om.handle(Input::Stream(ev)));
            }
            if o_outs.contains(&Output::StartTls) {
                o_outs.retain(|o| *o != Output::StartTls);
                to_out = Wire::new();
                o_outs.extend(om.handle(Input::TlsEstablished(out_cert.clone())));
            }
            if o_outs.is_empty() {
                if om.is_established() && delivered.is_empty() {
                    let st = crate::stanza::build(
                        "message",
                        Some("x@a.test/r"),
                        Some("y@b.test"),
                        Some("chat"),
                        None,
                    )
                    .append(
                        Element::builder("body", ns::CLIENT)
                            .append("over the wire")
                            .build(),
                    )
                    .build();
                    o_outs = om.handle(Input::Stanza(st));
                    continue;
                }
                break;
            }
        }
        (om, im, delivered)
    }

    #[test]
    fn both_machines_negotiate_dialback_over_the_wire() {
        let (om, im, delivered) = converse(
            settings(),
            b"secret-a",
            in_settings(),
            untrusted(),
            untrusted(),
        );
        assert_eq!(om.method(), "dialback");
        assert!(im.authenticated().contains("a.test"));
        assert_eq!(delivered.len(), 1);
        assert!(delivered[0].is("message", ns::CLIENT));
        assert_eq!(
            delivered[0].get_child("body", ns::CLIENT).unwrap().text(),
            "over the wire"
        );
    }

    #[test]
    fn both_machines_negotiate_external_over_the_wire() {
        let (om, im, delivered) = converse(
            settings(),
            b"secret-a",
            in_settings(),
            trusted(&["b.test"]),
            trusted(&["a.test"]),
        );
        assert_eq!(om.method(), "EXTERNAL");
        assert!(im.authenticated().contains("a.test"));
        assert_eq!(delivered.len(), 1);
        assert!(om.sm_enabled());
    }

    #[test]
    fn a_key_from_another_secret_is_refused_over_the_wire() {
        let (om, im, delivered) = converse(
            settings(),
            b"the real secret of a.test",
            in_settings(),
            untrusted(),
            untrusted(),
        );
        assert!(!om.is_established());
        assert_eq!(om.phase(), Phase::Closed);
        assert!(!im.is_authenticated());
        assert!(delivered.is_empty());
    }
}
