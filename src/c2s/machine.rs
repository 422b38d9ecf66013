//! The client stream state machine (RFC 6120), sans-IO.
//!
//! It takes [`Input`]s (stream events from the parser, answers to lookups it
//! asked for) and returns [`Output`]s (elements to send, lookups to do,
//! stanzas to route, the stream to restart or close). The IO driver in
//! `connection.rs` performs them; unit tests drive it without sockets.
//!
//! States: `AwaitHeader -> Negotiating -> (STARTTLS) -> AwaitHeader ->
//! Negotiating -> SASL -> AwaitHeader -> AwaitBind -> Established -> Closed`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use jid::{BareJid, FullJid, Jid};
use minidom::Element;

use super::csi::CsiFilter;
use super::sm::{self, SmSettings, StreamManagement};
use crate::auth::{
    self, AuthError, ChannelBindings, PlainMessage, ScramHash, ScramServer, StoredCredentials,
};
use crate::stanza::{self, Kind, StanzaError, name};
use crate::xml::{StreamEvent, StreamHeader, ns};

/// Static settings of a client stream.
#[derive(Debug, Clone)]
pub struct C2sSettings {
    pub domains: Vec<String>,
    /// Require TLS before SASL.
    pub require_tls: bool,
    /// Offer PLAIN (only ever over TLS).
    pub allow_plain: bool,
    /// The listener can upgrade with STARTTLS.
    pub starttls_available: bool,
    /// Failed SASL attempts allowed on one stream before it is closed.
    pub max_auth_failures: u32,
    /// Extra stream features offered after authentication (modules, caps).
    pub post_auth_features: Vec<Element>,
    /// Seed for fake salts of unknown users.
    pub fake_salt_seed: Vec<u8>,
    /// Stream management (XEP-0198).
    pub sm: SmSettings,
}

#[derive(Debug)]
pub enum Input {
    Stream(StreamEvent),
    /// The TLS handshake after `<proceed/>` completed.
    TlsEstablished(ChannelBindings),
    /// Answer to [`Output::LookupCredentials`]: the account's keys (None if
    /// there is no such account), or an error such as throttling.
    Credentials(Result<Option<StoredCredentials>, AuthError>),
    /// Answer to [`Output::Bind`].
    Bound(Result<FullJid, StanzaError>),
    /// A stanza for the client (from the session mailbox).
    Deliver(Element),
    /// Time passed (stream-management timers).
    Tick,
    /// Answer to [`Output::Resume`] when the session cannot be resumed.
    ResumeFailed {
        condition: &'static str,
        h: Option<u32>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send our stream header.
    SendHeader {
        id: String,
        from: String,
    },
    Send(Element),
    /// `<proceed/>` was queued: flush it, run the TLS handshake, reset the
    /// parser and answer with [`Input::TlsEstablished`].
    StartTls,
    /// SASL succeeded: reset the parser for the stream restart.
    ResetStream,
    LookupCredentials {
        domain: String,
        username: String,
    },
    AuthSucceeded {
        username: String,
        mechanism: &'static str,
    },
    AuthFailed {
        username: Option<String>,
        mechanism: &'static str,
    },
    /// Bind a resource (None: let the server choose); answer with
    /// [`Input::Bound`].
    Bind {
        user: BareJid,
        resource: Option<String>,
    },
    /// A validated, `from`-stamped stanza from the bound client.
    Stanza(Element),
    /// Close with a stream error (the header was already sent).
    StreamError {
        condition: &'static str,
        text: Option<String>,
        app: Option<Element>,
    },
    /// The client closed its stream: send ours and close.
    CloseStream,
    /// Stream management was enabled; with an id, the session is resumable
    /// for `max` seconds.
    SmEnabled {
        id: Option<String>,
        max: u32,
    },
    /// The client asks to resume the session `previd`, having handled `h`
    /// of our stanzas; answer with [`Input::ResumeFailed`] if it cannot be.
    Resume {
        previd: String,
        h: u32,
    },
    /// An ack request went unanswered: the transport is dead.
    TransportDead,
    /// Too many unacknowledged stanzas: the session cannot keep them.
    Overflow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitHeader,
    Negotiating,
    TlsPending,
    SaslLookup,
    SaslChallenge,
    AwaitBind,
    BindPending,
    ResumePending,
    Established,
    Closed,
}

enum Sasl {
    Scram(ScramServer, ScramHash, bool),
    Plain(PlainMessage),
}

pub struct C2sMachine {
    settings: std::sync::Arc<C2sSettings>,
    state: State,
    secure: bool,
    bindings: ChannelBindings,
    domain: Option<String>,
    header_sent: bool,
    sasl: Option<Sasl>,
    sasl_user: Option<String>,
    authenticated: Option<BareJid>,
    auth_failures: u32,
    jid: Option<FullJid>,
    pending_bind: Option<Element>,
    sm: Option<StreamManagement>,
    csi: CsiFilter,
}

fn sasl_el(name_: &str) -> minidom::ElementBuilder {
    Element::builder(name_, ns::SASL)
}

fn sasl_failure(condition: &str) -> Element {
    sasl_el("failure")
        .append(Element::builder(condition, ns::SASL).build())
        .build()
}

impl C2sMachine {
    /// A new machine; `secure` for direct TLS (with its channel bindings).
    pub fn new(
        settings: std::sync::Arc<C2sSettings>,
        secure: bool,
        bindings: ChannelBindings,
    ) -> Self {
        C2sMachine {
            settings,
            state: State::AwaitHeader,
            secure,
            bindings,
            domain: None,
            header_sent: false,
            sasl: None,
            sasl_user: None,
            authenticated: None,
            auth_failures: 0,
            jid: None,
            pending_bind: None,
            sm: None,
            csi: CsiFilter::default(),
        }
    }

    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }
    pub fn is_secure(&self) -> bool {
        self.secure
    }
    pub fn jid(&self) -> Option<&FullJid> {
        self.jid.as_ref()
    }
    pub fn domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }
    pub fn authenticated(&self) -> Option<&BareJid> {
        self.authenticated.as_ref()
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
            Input::TlsEstablished(b) => {
                if self.state == State::TlsPending {
                    self.secure = true;
                    self.bindings = b;
                    self.state = State::AwaitHeader;
                }
            }
            Input::Credentials(c) => self.on_credentials(c, &mut out),
            Input::Bound(r) => self.on_bound(r, &mut out),
            Input::Deliver(el) => self.deliver(el, &mut out),
            Input::Tick => self.tick(&mut out),
            Input::ResumeFailed { condition, h } => {
                if self.state == State::ResumePending {
                    self.state = State::AwaitBind;
                    out.push(Output::Send(sm::failed(condition, h)));
                }
            }
        }
        out
    }

    fn stream_error(&mut self, condition: &'static str, text: Option<&str>, out: &mut Vec<Output>) {
        if !self.header_sent {
            let from = self.settings.domains.first().cloned().unwrap_or_default();
            out.push(Output::SendHeader {
                id: stanza::new_id(),
                from,
            });
            self.header_sent = true;
        }
        self.state = State::Closed;
        out.push(Output::StreamError {
            condition,
            text: text.map(str::to_owned),
            app: None,
        });
    }

    /// Close with a stream error caused by the peer (e.g. XML errors found
    /// by the parser, timeouts).
    pub fn fail(&mut self, condition: &'static str, text: Option<&str>) -> Vec<Output> {
        let mut out = Vec::new();
        if self.state != State::Closed {
            self.stream_error(condition, text, &mut out);
        }
        out
    }

    fn on_header(&mut self, h: StreamHeader, out: &mut Vec<Output>) {
        if self.state != State::AwaitHeader {
            return self.stream_error("bad-format", Some("unexpected stream header"), out);
        }
        let domain =
            h.to.as_deref()
                .and_then(|t| jid::BareJid::new(t).ok())
                .filter(|j| j.node().is_none())
                .map(|j| j.domain().as_str().to_owned())
                .filter(|d| self.settings.domains.iter().any(|x| x == d));
        // After a restart the domain must stay the same.
        let domain = match (&self.domain, domain) {
            (Some(prev), Some(d)) if *prev == d => Some(d),
            (Some(_), _) => None,
            (None, d) => d,
        };
        out.push(Output::SendHeader {
            id: stanza::new_id(),
            from: domain
                .clone()
                .or_else(|| self.settings.domains.first().cloned())
                .unwrap_or_default(),
        });
        self.header_sent = true;
        if h.stream_ns != ns::STREAM || h.local_name != "stream" {
            return self.stream_error("invalid-namespace", None, out);
        }
        if h.default_ns != ns::CLIENT {
            return self.stream_error("invalid-namespace", Some("expected jabber:client"), out);
        }
        match h
            .version
            .as_deref()
            .map(|v| v.split('.').next().unwrap_or(""))
        {
            Some("1") => {}
            _ => return self.stream_error("unsupported-version", None, out),
        }
        let Some(domain) = domain else {
            return self.stream_error("host-unknown", None, out);
        };
        self.domain = Some(domain);
        if self.authenticated.is_some() {
            self.state = State::AwaitBind;
            out.push(Output::Send(self.bind_features()));
        } else {
            self.state = State::Negotiating;
            out.push(Output::Send(self.pre_auth_features()));
        }
    }

    /// Mechanisms on offer now, strongest first.
    pub fn mechanisms(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if !self.secure && self.settings.require_tls {
            return v;
        }
        if self.secure && !self.bindings.types().is_empty() {
            v.push("SCRAM-SHA-256-PLUS");
            v.push("SCRAM-SHA-1-PLUS");
        }
        v.push("SCRAM-SHA-256");
        v.push("SCRAM-SHA-1");
        if self.secure && self.settings.allow_plain {
            v.push("PLAIN");
        }
        v
    }

    fn pre_auth_features(&self) -> Element {
        let mut f = Element::builder("features", ns::STREAM);
        if !self.secure && self.settings.starttls_available {
            let mut st = Element::builder("starttls", ns::TLS);
            if self.settings.require_tls {
                st = st.append(Element::builder("required", ns::TLS).build());
            }
            f = f.append(st.build());
        }
        let mechs = self.mechanisms();
        if !mechs.is_empty() {
            let mut m = Element::builder("mechanisms", ns::SASL);
            for mech in mechs {
                m = m.append(sasl_el("mechanism").append(mech).build());
            }
            f = f.append(m.build());
            let types = self.bindings.types();
            if self.secure && !types.is_empty() {
                // XEP-0440: the channel-binding types we support.
                let mut cb = Element::builder("sasl-channel-binding", ns::SASL_CB);
                for t in types {
                    cb = cb.append(
                        Element::builder("channel-binding", ns::SASL_CB)
                            .attr(name("type"), t)
                            .build(),
                    );
                }
                f = f.append(cb.build());
            }
        }
        f.build()
    }

    fn bind_features(&self) -> Element {
        let mut f = Element::builder("features", ns::STREAM)
            .append(Element::builder("bind", ns::BIND).build())
            .append(
                Element::builder("session", ns::SESSION)
                    .append(Element::builder("optional", ns::SESSION).build())
                    .build(),
            );
        for extra in &self.settings.post_auth_features {
            f = f.append(extra.clone());
        }
        f.build()
    }

    fn on_element(&mut self, el: Element, out: &mut Vec<Output>) {
        match self.state {
            State::Negotiating => self.negotiate(el, out),
            State::SaslChallenge => self.sasl_response(el, out),
            State::AwaitBind => self.await_bind(el, out),
            State::Established => self.established(el, out),
            State::SaslLookup | State::BindPending | State::TlsPending | State::ResumePending => {
                // The client must wait for our answer.
                self.stream_error(
                    "policy-violation",
                    Some("pipelined before the server answered"),
                    out,
                )
            }
            State::AwaitHeader => self.stream_error("bad-format", None, out),
            State::Closed => {}
        }
    }

    fn negotiate(&mut self, el: Element, out: &mut Vec<Output>) {
        if el.is("starttls", ns::TLS) {
            if self.secure || !self.settings.starttls_available {
                out.push(Output::Send(Element::builder("failure", ns::TLS).build()));
                self.state = State::Closed;
                out.push(Output::CloseStream);
                return;
            }
            out.push(Output::Send(Element::builder("proceed", ns::TLS).build()));
            self.state = State::TlsPending;
            out.push(Output::StartTls);
            return;
        }
        if el.is("auth", ns::SASL) {
            return self.sasl_auth(el, out);
        }
        if el.is("abort", ns::SASL) {
            out.push(Output::Send(sasl_failure("aborted")));
            return;
        }
        if stanza::kind(&el).is_some() {
            return self.stream_error("not-authorized", None, out);
        }
        self.stream_error("unsupported-stanza-type", None, out)
    }

    fn sasl_auth(&mut self, el: Element, out: &mut Vec<Output>) {
        if !self.secure && self.settings.require_tls {
            out.push(Output::Send(sasl_failure("encryption-required")));
            return;
        }
        let mech_name = el.attr("mechanism").unwrap_or("");
        let offered = self.mechanisms();
        let Some(&mech) = offered.iter().find(|m| **m == mech_name) else {
            out.push(Output::Send(sasl_failure("invalid-mechanism")));
            return;
        };
        let text = el.text();
        let data = match text.trim() {
            "" => None,
            "=" => Some(Vec::new()),
            t => match B64.decode(t) {
                Ok(d) => Some(d),
                Err(_) => {
                    out.push(Output::Send(sasl_failure("incorrect-encoding")));
                    return;
                }
            },
        };
        let scram = |hash, plus| {
            ScramServer::new(
                hash,
                plus,
                !self.bindings.types().is_empty() && self.secure,
                self.bindings.clone(),
            )
        };
        let sasl = match mech {
            "SCRAM-SHA-256-PLUS" => {
                Sasl::Scram(scram(ScramHash::Sha256, true), ScramHash::Sha256, true)
            }
            "SCRAM-SHA-1-PLUS" => Sasl::Scram(scram(ScramHash::Sha1, true), ScramHash::Sha1, true),
            "SCRAM-SHA-256" => {
                Sasl::Scram(scram(ScramHash::Sha256, false), ScramHash::Sha256, false)
            }
            "SCRAM-SHA-1" => Sasl::Scram(scram(ScramHash::Sha1, false), ScramHash::Sha1, false),
            _ => Sasl::Plain(PlainMessage {
                authzid: None,
                authcid: String::new(),
                password: String::new(),
            }),
        };
        self.sasl = Some(sasl);
        match data {
            None => {
                // No initial response: an empty challenge asks for it.
                out.push(Output::Send(sasl_el("challenge").build()));
                self.state = State::SaslChallenge;
                self.sasl_user = None;
            }
            Some(d) => self.sasl_first(d, out),
        }
    }

    fn mechanism_name(&self) -> &'static str {
        match &self.sasl {
            Some(Sasl::Scram(_, h, plus)) => h.mechanism(*plus),
            Some(Sasl::Plain(_)) => "PLAIN",
            None => "",
        }
    }

    /// The first client message of a mechanism.
    fn sasl_first(&mut self, data: Vec<u8>, out: &mut Vec<Output>) {
        let domain = self.domain.clone().unwrap_or_default();
        let result = match self.sasl.as_mut() {
            Some(Sasl::Scram(s, _, _)) => s.client_first(&data).map(|cf| (cf.username, cf.authzid)),
            Some(Sasl::Plain(p)) => auth::parse_plain(&data).map(|m| {
                let r = (m.authcid.clone(), m.authzid.clone());
                *p = m;
                r
            }),
            None => Err(AuthError::Malformed),
        };
        let (username, authzid) = match result {
            Ok(x) => x,
            Err(e) => return self.sasl_fail(e, None, out),
        };
        let username = match auth::prep_username(&username) {
            Ok(u) => u,
            Err(_) => return self.sasl_fail(AuthError::NotAuthorized, None, out),
        };
        if let Some(a) = authzid {
            let ok = BareJid::new(&a)
                .map(|j| {
                    j.node().map(|n| n.as_str()) == Some(username.as_str())
                        && j.domain().as_str() == domain
                })
                .unwrap_or(false);
            if !ok {
                return self.sasl_fail(AuthError::InvalidAuthzid, Some(username), out);
            }
        }
        self.sasl_user = Some(username.clone());
        self.state = State::SaslLookup;
        out.push(Output::LookupCredentials { domain, username });
    }

    fn on_credentials(
        &mut self,
        creds: Result<Option<StoredCredentials>, AuthError>,
        out: &mut Vec<Output>,
    ) {
        if self.state != State::SaslLookup {
            return;
        }
        let user = self.sasl_user.clone();
        let creds = match creds {
            Ok(c) => c,
            Err(e) => return self.sasl_fail(e, user, out),
        };
        match self.sasl.as_mut() {
            Some(Sasl::Scram(s, hash, _)) => {
                let keys = creds.map(|c| c.keys(*hash).clone());
                let first = s.server_first(keys, &self.settings.fake_salt_seed);
                out.push(Output::Send(
                    sasl_el("challenge").append(B64.encode(first)).build(),
                ));
                self.state = State::SaslChallenge;
            }
            Some(Sasl::Plain(p)) => {
                let ok = creds
                    .map(|c| c.verify_password(&p.password))
                    .unwrap_or(false);
                p.password.clear();
                if ok {
                    self.sasl_success(None, out);
                } else {
                    self.sasl_fail(AuthError::NotAuthorized, user, out);
                }
            }
            None => {}
        }
    }

    fn sasl_response(&mut self, el: Element, out: &mut Vec<Output>) {
        if el.is("abort", ns::SASL) {
            self.sasl = None;
            self.state = State::Negotiating;
            out.push(Output::Send(sasl_failure("aborted")));
            return;
        }
        if !el.is("response", ns::SASL) {
            return self.stream_error("policy-violation", Some("expected a SASL response"), out);
        }
        let data = match el.text().trim() {
            "" | "=" => Vec::new(),
            t => match B64.decode(t) {
                Ok(d) => d,
                Err(_) => {
                    self.sasl = None;
                    self.state = State::Negotiating;
                    out.push(Output::Send(sasl_failure("incorrect-encoding")));
                    return;
                }
            },
        };
        if self.sasl_user.is_none() {
            // The answer to our empty challenge: the initial response.
            return self.sasl_first(data, out);
        }
        let user = self.sasl_user.clone();
        let result = match self.sasl.as_mut() {
            Some(Sasl::Scram(s, _, _)) => s.client_final(&data),
            _ => Err(AuthError::Malformed),
        };
        match result {
            Ok(v) => self.sasl_success(Some(v), out),
            Err(e) => self.sasl_fail(e, user, out),
        }
    }

    fn sasl_success(&mut self, additional: Option<Vec<u8>>, out: &mut Vec<Output>) {
        let mechanism = self.mechanism_name();
        let (Some(user), Some(domain)) = (self.sasl_user.clone(), self.domain.clone()) else {
            return self.stream_error("internal-server-error", None, out);
        };
        let Ok(bare) = BareJid::new(&format!("{user}@{domain}")) else {
            return self.sasl_fail(AuthError::NotAuthorized, Some(user), out);
        };
        let mut s = sasl_el("success");
        if let Some(v) = additional {
            s = s.append(B64.encode(v));
        }
        out.push(Output::Send(s.build()));
        out.push(Output::AuthSucceeded {
            username: user,
            mechanism,
        });
        out.push(Output::ResetStream);
        self.authenticated = Some(bare);
        self.sasl = None;
        self.state = State::AwaitHeader;
    }

    fn sasl_fail(&mut self, e: AuthError, user: Option<String>, out: &mut Vec<Output>) {
        let mechanism = self.mechanism_name();
        out.push(Output::Send(sasl_failure(e.condition())));
        out.push(Output::AuthFailed {
            username: user,
            mechanism,
        });
        self.sasl = None;
        self.sasl_user = None;
        self.auth_failures += 1;
        self.state = State::Negotiating;
        if self.auth_failures >= self.settings.max_auth_failures {
            self.stream_error(
                "policy-violation",
                Some("too many failed authentication attempts"),
                out,
            );
        }
    }

    fn await_bind(&mut self, el: Element, out: &mut Vec<Output>) {
        if el.ns() == ns::SM {
            if el.name() == "resume" {
                if !self.settings.sm.resumption {
                    out.push(Output::Send(sm::failed("feature-not-implemented", None)));
                    return;
                }
                let previd = el.attr("previd").map(str::to_owned);
                let h = el.attr("h").and_then(|h| h.parse::<u32>().ok());
                let (Some(previd), Some(h)) = (previd, h) else {
                    out.push(Output::Send(sm::failed("bad-request", None)));
                    return;
                };
                self.state = State::ResumePending;
                out.push(Output::Resume { previd, h });
                return;
            }
            // <enable/> before binding, <r/>, <a/>: out of order.
            out.push(Output::Send(sm::failed("unexpected-request", None)));
            return;
        }
        if stanza::kind(&el) == Some(Kind::Iq)
            && el.attr("type") == Some("set")
            && let Some(bind) = el.get_child("bind", ns::BIND)
        {
            let resource = bind
                .get_child("resource", ns::BIND)
                .map(|r| r.text())
                .filter(|r| !r.trim().is_empty());
            let Some(user) = self.authenticated.clone() else {
                return self.stream_error("internal-server-error", None, out);
            };
            self.pending_bind = Some(el);
            self.state = State::BindPending;
            out.push(Output::Bind { user, resource });
            return;
        }
        if stanza::kind(&el).is_some() {
            return self.stream_error("not-authorized", Some("bind a resource first"), out);
        }
        self.stream_error("unsupported-stanza-type", None, out)
    }

    fn on_bound(&mut self, r: Result<FullJid, StanzaError>, out: &mut Vec<Output>) {
        if self.state != State::BindPending {
            return;
        }
        let Some(req) = self.pending_bind.take() else {
            return;
        };
        match r {
            Ok(jid) => {
                let payload = Element::builder("bind", ns::BIND)
                    .append(
                        Element::builder("jid", ns::BIND)
                            .append(jid.to_string())
                            .build(),
                    )
                    .build();
                let mut reply = stanza::iq_result(&req, Some(payload));
                stanza::remove_attr(&mut reply, "to");
                self.jid = Some(jid);
                self.state = State::Established;
                out.push(Output::Send(reply));
            }
            Err(e) => {
                self.state = State::AwaitBind;
                if let Some(reply) = stanza::error_reply(&req, &e) {
                    out.push(Output::Send(reply));
                }
            }
        }
    }

    fn established(&mut self, mut el: Element, out: &mut Vec<Output>) {
        if el.ns() == ns::SM {
            return self.sm_element(el, out);
        }
        if el.ns() == ns::CSI {
            match el.name() {
                "active" => {
                    for e in self.csi.set_active() {
                        self.send_stanza(e, out);
                    }
                }
                "inactive" => self.csi.set_inactive(),
                _ => return self.stream_error("unsupported-stanza-type", None, out),
            }
            return;
        }
        let Some(kind) = stanza::kind(&el) else {
            return self.stream_error("unsupported-stanza-type", None, out);
        };
        // XEP-0198: every stanza counts as handled once processed; the
        // driver processes it completely before the next input, so an <a/>
        // sent later covers only stanzas delivered, stored or bounced.
        if let Some(sm) = self.sm.as_mut() {
            sm.handled_inbound();
        }
        let Some(jid) = self.jid.clone() else {
            return self.stream_error("internal-server-error", None, out);
        };
        // RFC 6120 8.1.2.1: the server stamps `from`; a client may only
        // give its own full or bare JID.
        if let Some(from) = el.attr("from") {
            let ok = match Jid::new(from) {
                Ok(f) => f == jid.clone() || f == jid.to_bare(),
                Err(_) => false,
            };
            if !ok {
                return self.stream_error("invalid-from", None, out);
            }
        }
        stanza::set_attr(&mut el, "from", jid.to_string());
        let typ = el.attr("type").map(str::to_owned);
        let reply_error = |el: &Element, e: StanzaError, out: &mut Vec<Output>| {
            if let Some(mut r) = stanza::error_reply(el, &e) {
                // Errors generated for the client come from the server.
                stanza::remove_attr(&mut r, "from");
                out.push(Output::Send(r));
            }
        };
        if let Some(to) = el.attr("to")
            && Jid::new(to).is_err()
        {
            return reply_error(&el, StanzaError::jid_malformed(), out);
        }
        match kind {
            Kind::Iq => {
                if el.attr("id").is_none() {
                    return reply_error(
                        &el,
                        StanzaError::bad_request().with_text("IQ without id"),
                        out,
                    );
                }
                match typ.as_deref() {
                    Some("get") | Some("set") => {
                        if el.children().count() != 1 {
                            return reply_error(
                                &el,
                                StanzaError::bad_request()
                                    .with_text("an IQ request needs exactly one payload"),
                                out,
                            );
                        }
                        if el.has_child("bind", ns::BIND) {
                            return reply_error(&el, StanzaError::not_allowed(), out);
                        }
                        if typ.as_deref() == Some("set") && el.has_child("session", ns::SESSION) {
                            // RFC 3921 session establishment: a no-op now.
                            let mut r = stanza::iq_result(&el, None);
                            stanza::remove_attr(&mut r, "from");
                            out.push(Output::Send(r));
                            return;
                        }
                    }
                    Some("result") | Some("error") => {}
                    _ => return reply_error(&el, StanzaError::bad_request(), out),
                }
            }
            Kind::Presence => match typ.as_deref() {
                None | Some("unavailable") | Some("subscribe") | Some("subscribed")
                | Some("unsubscribe") | Some("unsubscribed") | Some("probe") | Some("error") => {}
                Some(_) => return reply_error(&el, StanzaError::bad_request(), out),
            },
            Kind::Message => {}
        }
        out.push(Output::Stanza(el));
    }

    fn sm_element(&mut self, el: Element, out: &mut Vec<Output>) {
        match el.name() {
            "enable" => {
                if self.sm.is_some() {
                    out.push(Output::Send(sm::failed("unexpected-request", None)));
                    return;
                }
                let s = &self.settings.sm;
                let wants_resume =
                    matches!(el.attr("resume"), Some("true") | Some("1")) && s.resumption;
                let max = el
                    .attr("max")
                    .and_then(|m| m.parse::<u32>().ok())
                    .unwrap_or(s.default_timeout)
                    .clamp(1, s.max_timeout.max(1));
                let id = wants_resume.then(|| format!("{}{}", stanza::new_id(), stanza::new_id()));
                let state = StreamManagement::new(id.clone(), max);
                out.push(Output::Send(state.enabled_element(wants_resume)));
                self.sm = Some(state);
                out.push(Output::SmEnabled { id, max });
            }
            "r" => match &self.sm {
                Some(sm) => out.push(Output::Send(sm::ack_element(sm.inbound))),
                None => out.push(Output::Send(sm::failed("unexpected-request", None))),
            },
            "a" => {
                let h = el.attr("h").and_then(|h| h.parse::<u32>().ok());
                match (self.sm.as_mut(), h) {
                    (Some(sm), Some(h)) => {
                        if let Err(e) = sm.ack(h) {
                            let app = Element::builder("handled-count-too-high", ns::SM)
                                .attr(name("h"), e.h.to_string())
                                .attr(name("send-count"), e.send_count.to_string())
                                .build();
                            self.state = State::Closed;
                            out.push(Output::StreamError {
                                condition: "undefined-condition",
                                text: Some(format!(
                                    "You acknowledged {} stanzas, but I only sent you {} so far.",
                                    e.h, e.send_count
                                )),
                                app: Some(app),
                            });
                        }
                    }
                    (Some(_), None) => {
                        self.stream_error("invalid-xml", Some("<a/> without a valid h"), out)
                    }
                    (None, _) => out.push(Output::Send(sm::failed("unexpected-request", None))),
                }
            }
            "resume" => out.push(Output::Send(sm::failed("unexpected-request", None))),
            _ => self.stream_error("unsupported-stanza-type", None, out),
        }
    }

    /// Send a stanza to the client, counting it for stream management.
    fn send_stanza(&mut self, el: Element, out: &mut Vec<Output>) {
        if let Some(sm) = self.sm.as_mut() {
            sm.sent(el.clone(), tokio::time::Instant::now());
            if sm.unacked.len() > self.settings.sm.max_unacked {
                out.push(Output::Overflow);
            }
        }
        out.push(Output::Send(el));
    }

    fn deliver(&mut self, el: Element, out: &mut Vec<Output>) {
        if self.state != State::Established {
            return;
        }
        for e in self.csi.filter(el) {
            self.send_stanza(e, out);
        }
        self.maybe_request(out);
    }

    fn maybe_request(&mut self, out: &mut Vec<Output>) {
        let now = tokio::time::Instant::now();
        if let Some(sm) = self.sm.as_mut()
            && sm.should_request(&self.settings.sm, now)
        {
            sm.requested(now);
            out.push(Output::Send(sm::request_element()));
        }
    }

    fn tick(&mut self, out: &mut Vec<Output>) {
        if self.state != State::Established {
            return;
        }
        let now = tokio::time::Instant::now();
        if let Some(sm) = &self.sm
            && sm.ack_overdue(&self.settings.sm, now)
        {
            out.push(Output::TransportDead);
            return;
        }
        self.maybe_request(out);
    }

    /// When stream-management timers next need a [`Input::Tick`].
    pub fn next_deadline(&self) -> Option<tokio::time::Instant> {
        self.sm
            .as_ref()
            .and_then(|sm| sm.next_deadline(&self.settings.sm))
    }

    /// The SM-ID and timeout if this session can be resumed.
    pub fn resumable(&self) -> Option<(&str, u32)> {
        match (&self.sm, self.state) {
            (Some(sm), State::Established) => sm.id.as_deref().map(|id| (id, sm.max)),
            _ => None,
        }
    }

    /// Stanzas handled from the client (our h).
    pub fn sm_inbound(&self) -> Option<u32> {
        self.sm.as_ref().map(|sm| sm.inbound)
    }

    /// Everything sent but not acknowledged, and what CSI holds back.
    pub fn take_unacked(&mut self) -> Vec<Element> {
        let mut v = self
            .sm
            .as_mut()
            .map(|sm| sm.take_unacked())
            .unwrap_or_default();
        v.extend(self.csi.flush());
        v
    }

    /// This (old) session is being resumed on a new transport by a client
    /// that handled `h` of our stanzas: `<resumed/>` and the retransmission,
    /// or the `<failed/>` condition.
    pub fn resume_here(
        &mut self,
        h: u32,
        secure: bool,
    ) -> Result<Vec<Output>, (&'static str, Option<u32>)> {
        let Some(sm) = self.sm.as_mut().filter(|sm| sm.id.is_some()) else {
            return Err(("item-not-found", None));
        };
        if self.state != State::Established {
            return Err(("item-not-found", None));
        }
        if sm.ack(h).is_err() {
            return Err(("unexpected-request", Some(sm.inbound)));
        }
        let mut out = Vec::with_capacity(sm.unacked.len() + 1);
        let resumed = Element::builder("resumed", ns::SM)
            .attr(name("previd"), sm.id.clone().unwrap_or_default())
            .attr(name("h"), sm.inbound.to_string())
            .build();
        out.push(Output::Send(resumed));
        for e in sm.unacked.iter() {
            out.push(Output::Send(e.clone()));
        }
        sm.request_outstanding = None;
        sm.since_request = 0;
        sm.unrequested_since = None;
        self.secure = secure;
        self.maybe_request(&mut out);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::ScramKeys;

    fn settings() -> std::sync::Arc<C2sSettings> {
        std::sync::Arc::new(C2sSettings {
            domains: vec!["example.org".into()],
            require_tls: true,
            allow_plain: true,
            starttls_available: true,
            max_auth_failures: 3,
            post_auth_features: vec![Element::builder("sm", ns::SM).build()],
            fake_salt_seed: b"seed".to_vec(),
            sm: SmSettings::default(),
        })
    }

    fn header(to: &str) -> Input {
        Input::Stream(StreamEvent::Header(StreamHeader {
            stream_ns: ns::STREAM.into(),
            local_name: "stream".into(),
            default_ns: ns::CLIENT.into(),
            to: Some(to.into()),
            version: Some("1.0".into()),
            ..Default::default()
        }))
    }

    fn el(s: &str) -> Input {
        let e: Element = s.parse().unwrap();
        Input::Stream(StreamEvent::Element(e))
    }

    fn sent(out: &[Output]) -> Vec<Element> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send(e) => Some(e.clone()),
                _ => None,
            })
            .collect()
    }

    fn cb() -> ChannelBindings {
        ChannelBindings {
            tls_exporter: Some(vec![7; 32]),
            tls_server_end_point: Some(vec![8; 32]),
        }
    }

    /// Drive a machine to an authenticated, bound session with PLAIN.
    fn logged_in() -> C2sMachine {
        let mut m = C2sMachine::new(settings(), true, cb());
        m.handle(header("example.org"));
        let out = m.handle(el("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGp1bGlldABwdw==</auth>"));
        assert!(
            matches!(&out[0], Output::LookupCredentials { username, .. } if username == "juliet")
        );
        let creds = StoredCredentials::from_password("pw", 4096).unwrap();
        let out = m.handle(Input::Credentials(Ok(Some(creds))));
        assert!(sent(&out)[0].is("success", ns::SASL));
        assert!(out.contains(&Output::ResetStream));
        let out = m.handle(header("example.org"));
        let features = &sent(&out)[0];
        assert!(features.has_child("bind", ns::BIND));
        assert!(features.has_child("sm", ns::SM));
        let out = m.handle(el("<iq xmlns='jabber:client' type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>balcony</resource></bind></iq>"));
        assert_eq!(
            out,
            vec![Output::Bind {
                user: BareJid::new("juliet@example.org").unwrap(),
                resource: Some("balcony".into())
            }]
        );
        let out = m.handle(Input::Bound(Ok(
            FullJid::new("juliet@example.org/balcony").unwrap()
        )));
        let r = &sent(&out)[0];
        assert_eq!(r.attr("type"), Some("result"));
        assert_eq!(
            r.get_child("bind", ns::BIND)
                .unwrap()
                .get_child("jid", ns::BIND)
                .unwrap()
                .text(),
            "juliet@example.org/balcony"
        );
        assert!(m.is_established());
        m
    }

    #[test]
    fn starttls_is_required_first() {
        let mut m = C2sMachine::new(settings(), false, ChannelBindings::default());
        let out = m.handle(header("example.org"));
        assert!(matches!(&out[0], Output::SendHeader { from, .. } if from == "example.org"));
        let f = &sent(&out)[0];
        assert!(
            f.get_child("starttls", ns::TLS)
                .unwrap()
                .has_child("required", ns::TLS)
        );
        assert!(!f.has_child("mechanisms", ns::SASL), "no SASL before TLS");
        let out = m.handle(el("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGp1bGlldABwdw==</auth>"));
        assert!(sent(&out)[0].has_child("encryption-required", ns::SASL));
        let out = m.handle(el("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"));
        assert!(sent(&out)[0].is("proceed", ns::TLS));
        assert!(out.contains(&Output::StartTls));
        m.handle(Input::TlsEstablished(cb()));
        let out = m.handle(header("example.org"));
        let f = &sent(&out)[0];
        assert!(!f.has_child("starttls", ns::TLS));
        let mechs: Vec<String> = f
            .get_child("mechanisms", ns::SASL)
            .unwrap()
            .children()
            .map(|c| c.text())
            .collect();
        assert_eq!(
            mechs,
            [
                "SCRAM-SHA-256-PLUS",
                "SCRAM-SHA-1-PLUS",
                "SCRAM-SHA-256",
                "SCRAM-SHA-1",
                "PLAIN"
            ]
        );
        let cbs = f.get_child("sasl-channel-binding", ns::SASL_CB).unwrap();
        assert_eq!(cbs.children().count(), 2);
    }

    #[test]
    fn bad_headers_get_stream_errors() {
        let mut m = C2sMachine::new(settings(), true, cb());
        let out = m.handle(header("unknown.org"));
        assert!(matches!(
            out.last(),
            Some(Output::StreamError {
                condition: "host-unknown",
                ..
            })
        ));
        assert!(m.is_closed());

        let mut m = C2sMachine::new(settings(), true, cb());
        let out = m.handle(Input::Stream(StreamEvent::Header(StreamHeader {
            stream_ns: "urn:wrong".into(),
            local_name: "stream".into(),
            default_ns: ns::CLIENT.into(),
            to: Some("example.org".into()),
            version: Some("1.0".into()),
            ..Default::default()
        })));
        assert!(
            matches!(out[0], Output::SendHeader { .. }),
            "header before the error"
        );
        assert!(matches!(
            out.last(),
            Some(Output::StreamError {
                condition: "invalid-namespace",
                ..
            })
        ));

        let mut m = C2sMachine::new(settings(), true, cb());
        let out = m.handle(Input::Stream(StreamEvent::Header(StreamHeader {
            stream_ns: ns::STREAM.into(),
            local_name: "stream".into(),
            default_ns: ns::CLIENT.into(),
            to: Some("example.org".into()),
            version: None,
            ..Default::default()
        })));
        assert!(matches!(
            out.last(),
            Some(Output::StreamError {
                condition: "unsupported-version",
                ..
            })
        ));
    }

    #[test]
    fn scram_login_with_channel_binding() {
        let mut m = C2sMachine::new(settings(), true, cb());
        m.handle(header("example.org"));
        let cfirst = "p=tls-exporter,,n=romeo,r=abcdef";
        let out = m.handle(el(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256-PLUS'>{}</auth>",
            B64.encode(cfirst)
        )));
        assert!(
            matches!(&out[0], Output::LookupCredentials { username, .. } if username == "romeo")
        );
        let creds = StoredCredentials {
            sha1: ScramKeys::derive(ScramHash::Sha1, "pw", b"salt1", 4096),
            sha256: ScramKeys::derive(ScramHash::Sha256, "pw", b"salt256", 4096),
        };
        let out = m.handle(Input::Credentials(Ok(Some(creds))));
        let challenge = B64.decode(sent(&out)[0].text()).unwrap();
        let sf = String::from_utf8(challenge).unwrap();
        let nonce = sf.split(',').next().unwrap();
        let salted = ScramHash::Sha256.salted_password(b"pw", b"salt256", 4096);
        let client_key = ScramHash::Sha256.hmac(&salted, b"Client Key");
        let stored = ScramHash::Sha256.hash(&client_key);
        let mut cbind = b"p=tls-exporter,,".to_vec();
        cbind.extend_from_slice(&[7; 32]);
        let without = format!("c={},{nonce}", B64.encode(&cbind));
        let auth_msg = format!("n=romeo,r=abcdef,{sf},{without}");
        let sig = ScramHash::Sha256.hmac(&stored, auth_msg.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(sig).map(|(a, b)| a ^ b).collect();
        let fin = format!("{without},p={}", B64.encode(proof));
        let out = m.handle(el(&format!(
            "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
            B64.encode(fin)
        )));
        let success = &sent(&out)[0];
        assert!(success.is("success", ns::SASL));
        assert!(
            String::from_utf8(B64.decode(success.text()).unwrap())
                .unwrap()
                .starts_with("v=")
        );
        assert_eq!(m.authenticated().unwrap().to_string(), "romeo@example.org");
    }

    #[test]
    fn failures_then_policy_violation() {
        let mut m = C2sMachine::new(settings(), true, cb());
        m.handle(header("example.org"));
        for i in 0..3 {
            let out = m.handle(el("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGp1bGlldAB3cm9uZw==</auth>"));
            assert!(matches!(&out[0], Output::LookupCredentials { .. }));
            let creds = StoredCredentials::from_password("pw", 4096).unwrap();
            let out = m.handle(Input::Credentials(Ok(Some(creds))));
            assert!(sent(&out)[0].has_child("not-authorized", ns::SASL));
            if i == 2 {
                assert!(matches!(
                    out.last(),
                    Some(Output::StreamError {
                        condition: "policy-violation",
                        ..
                    })
                ));
            }
        }
        // Unknown mechanism, bad base64.
        let mut m = C2sMachine::new(settings(), true, cb());
        m.handle(header("example.org"));
        let out = m.handle(el(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='DIGEST-MD5'/>",
        ));
        assert!(sent(&out)[0].has_child("invalid-mechanism", ns::SASL));
        let out = m.handle(el(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>!!!</auth>",
        ));
        assert!(sent(&out)[0].has_child("incorrect-encoding", ns::SASL));
        let out = m.handle(el("<message xmlns='jabber:client' to='a@example.org'/>"));
        assert!(matches!(
            out.last(),
            Some(Output::StreamError {
                condition: "not-authorized",
                ..
            })
        ));
    }

    #[test]
    fn plain_with_empty_initial_response_and_throttling() {
        let mut m = C2sMachine::new(settings(), true, cb());
        m.handle(header("example.org"));
        let out = m.handle(el(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'/>",
        ));
        assert!(sent(&out)[0].is("challenge", ns::SASL));
        let out = m.handle(el(
            "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>AGp1bGlldABwdw==</response>",
        ));
        assert!(matches!(&out[0], Output::LookupCredentials { .. }));
        let out = m.handle(Input::Credentials(Err(AuthError::Throttled)));
        assert!(sent(&out)[0].has_child("temporary-auth-failure", ns::SASL));
    }

    #[test]
    fn established_stamps_from_and_validates() {
        let mut m = logged_in();
        let out = m.handle(el("<message xmlns='jabber:client' to='romeo@example.org' type='chat'><body>hi</body></message>"));
        match &out[0] {
            Output::Stanza(s) => assert_eq!(s.attr("from"), Some("juliet@example.org/balcony")),
            o => panic!("{o:?}"),
        }
        let out = m.handle(el(
            "<message xmlns='jabber:client' from='juliet@example.org' to='romeo@example.org'/>",
        ));
        assert!(
            matches!(&out[0], Output::Stanza(_)),
            "bare own JID is accepted"
        );
        let out = m.handle(el("<iq xmlns='jabber:client' type='get' to='example.org'><ping xmlns='urn:xmpp:ping'/></iq>"));
        assert_eq!(sent(&out)[0].attr("type"), Some("error"), "IQ without id");
        let out = m.handle(el("<iq xmlns='jabber:client' type='get' id='1'/>"));
        assert!(
            sent(&out)[0]
                .get_child("error", ns::CLIENT)
                .unwrap()
                .has_child("bad-request", ns::STANZA_ERRORS)
        );
        let out = m.handle(el("<message xmlns='jabber:client' to='@@@'/>"));
        assert!(
            sent(&out)[0]
                .get_child("error", ns::CLIENT)
                .unwrap()
                .has_child("jid-malformed", ns::STANZA_ERRORS)
        );
        let out = m.handle(el("<iq xmlns='jabber:client' type='set' id='s'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>"));
        assert_eq!(sent(&out)[0].attr("type"), Some("result"));
        let out = m.handle(el(
            "<message xmlns='jabber:client' from='romeo@example.org/x' to='a@example.org'/>",
        ));
        assert!(matches!(
            out.last(),
            Some(Output::StreamError {
                condition: "invalid-from",
                ..
            })
        ));
    }

    #[test]
    fn unknown_elements_and_close() {
        let mut m = logged_in();
        let out = m.handle(el("<foo xmlns='urn:bar'/>"));
        assert!(matches!(
            out.last(),
            Some(Output::StreamError {
                condition: "unsupported-stanza-type",
                ..
            })
        ));
        let mut m = logged_in();
        assert_eq!(
            m.handle(Input::Stream(StreamEvent::End)),
            vec![Output::CloseStream]
        );
        assert!(m.is_closed());
    }

    #[test]
    fn bind_conflict_error_lets_client_retry() {
        let mut m = C2sMachine::new(settings(), true, cb());
        m.handle(header("example.org"));
        m.handle(el("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGp1bGlldABwdw==</auth>"));
        m.handle(Input::Credentials(Ok(Some(
            StoredCredentials::from_password("pw", 4096).unwrap(),
        ))));
        m.handle(header("example.org"));
        m.handle(el("<iq xmlns='jabber:client' type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"));
        let out = m.handle(Input::Bound(Err(StanzaError::resource_constraint())));
        assert_eq!(sent(&out)[0].attr("type"), Some("error"));
        assert!(!m.is_established());
        let out = m.handle(el("<iq xmlns='jabber:client' type='set' id='c'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"));
        assert!(matches!(&out[0], Output::Bind { resource: None, .. }));
    }
}
