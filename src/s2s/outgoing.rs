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
