//! Stanzas: the three kinds of RFC 6120, their common attributes, and the
//! builders for replies and errors every module needs.

use jid::Jid;
use minidom::Element;
use rxml::NcName;

use crate::xml::ns;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Message,
    Presence,
    Iq,
}

/// The kind of a top-level element, if it is a stanza.
pub fn kind(el: &Element) -> Option<Kind> {
    let n = el.ns();
    if n != ns::CLIENT && n != ns::SERVER {
        return None;
    }
    match el.name() {
        "message" => Some(Kind::Message),
        "presence" => Some(Kind::Presence),
        "iq" => Some(Kind::Iq),
        _ => None,
    }
}

/// Make an attribute name (infallible for the static names we use).
pub fn name(s: &str) -> NcName {
    NcName::try_from(s.to_owned()).expect("valid attribute name")
}

/// Set (or replace) an unqualified attribute.
pub fn set_attr(el: &mut Element, attr: &str, value: impl Into<String>) {
    el.attrs_mut()
        .insert(rxml::Namespace::none().clone(), name(attr), value.into());
}

/// Remove an unqualified attribute.
pub fn remove_attr(el: &mut Element, attr: &str) {
    el.attrs_mut().remove(rxml::Namespace::none(), &*name(attr));
}

/// Parse a JID attribute; `Ok(None)` if absent, `Err` if malformed.
pub fn jid_attr(el: &Element, a: &str) -> Result<Option<Jid>, jid::Error> {
    match el.attr(a) {
        None => Ok(None),
        Some(s) => Jid::new(s).map(Some),
    }
}

pub fn stanza_type(el: &Element) -> &str {
    el.attr("type").unwrap_or(match el.name() {
        "message" => "normal",
        "presence" => "available",
        _ => "",
    })
}

/// Error types of RFC 6120 section 8.3.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    Auth,
    Cancel,
    Continue,
    Modify,
    Wait,
}

impl ErrorType {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::Auth => "auth",
            ErrorType::Cancel => "cancel",
            ErrorType::Continue => "continue",
            ErrorType::Modify => "modify",
            ErrorType::Wait => "wait",
        }
    }
}

/// A stanza error: condition, type, optional text and application element.
#[derive(Debug, Clone, PartialEq)]
pub struct StanzaError {
    pub kind: ErrorType,
    pub condition: &'static str,
    pub text: Option<String>,
    pub app: Option<Element>,
    /// The `by` attribute (the entity that generated the error).
    pub by: Option<String>,
}

impl StanzaError {
    /// An error with the condition's usual type (RFC 6120 section 8.3.3).
    pub fn new(condition: &'static str) -> Self {
        let kind = match condition {
            "bad-request" | "jid-malformed" | "not-acceptable" | "policy-violation"
            | "redirect" => ErrorType::Modify,
            "forbidden" | "not-authorized" | "registration-required" | "subscription-required" => {
                ErrorType::Auth
            }
            "internal-server-error"
            | "recipient-unavailable"
            | "remote-server-timeout"
            | "resource-constraint"
            | "unexpected-request" => ErrorType::Wait,
            _ => ErrorType::Cancel,
        };
        StanzaError {
            kind,
            condition,
            text: None,
            app: None,
            by: None,
        }
    }
    pub fn with_type(mut self, kind: ErrorType) -> Self {
        self.kind = kind;
        self
    }
    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.text = Some(text.into());
        self
    }
    pub fn with_app(mut self, app: Element) -> Self {
        self.app = Some(app);
        self
    }
    pub fn bad_request() -> Self {
        Self::new("bad-request")
    }
    pub fn service_unavailable() -> Self {
        Self::new("service-unavailable")
    }
    pub fn item_not_found() -> Self {
        Self::new("item-not-found")
    }
    pub fn feature_not_implemented() -> Self {
        Self::new("feature-not-implemented")
    }
    pub fn forbidden() -> Self {
        Self::new("forbidden")
    }
    pub fn not_allowed() -> Self {
        Self::new("not-allowed")
    }
    pub fn not_acceptable() -> Self {
        Self::new("not-acceptable")
    }
    pub fn internal() -> Self {
        Self::new("internal-server-error")
    }
    pub fn jid_malformed() -> Self {
        Self::new("jid-malformed")
    }
    pub fn conflict() -> Self {
        Self::new("conflict")
    }
    pub fn policy_violation() -> Self {
        Self::new("policy-violation")
    }
    pub fn resource_constraint() -> Self {
        Self::new("resource-constraint")
    }

    /// The `<error/>` element.
    pub fn to_element(&self) -> Element {
        let mut b = Element::builder("error", ns::CLIENT)
            .attr(name("type"), self.kind.as_str())
            .append(Element::builder(self.condition, ns::STANZA_ERRORS).build());
        if let Some(by) = &self.by {
            b = b.attr(name("by"), by.as_str());
        }
        if let Some(t) = &self.text {
            b = b.append(
                Element::builder("text", ns::STANZA_ERRORS)
                    .attr_ns(rxml::Namespace::from(ns::XML), name("lang"), "en")
                    .append(t.as_str())
                    .build(),
            );
        }
        if let Some(app) = &self.app {
            b = b.append(app.clone());
        }
        b.build()
    }
}

/// Is this an error stanza (which must never be answered with an error)?
pub fn is_error(el: &Element) -> bool {
    el.attr("type") == Some("error")
}

/// The error reply to `original`: same name and id, to/from swapped,
/// `type='error'`. For messages and presence the original children are kept
/// (RFC 6120 section 8.3.1 allows it, and clients show the failed body).
/// Returns None when the original is itself an error (never answer those).
pub fn error_reply(original: &Element, err: &StanzaError) -> Option<Element> {
    if is_error(original) {
        return None;
    }
    let mut b = Element::builder(original.name(), ns::CLIENT).attr(name("type"), "error");
    if let Some(id) = original.attr("id") {
        b = b.attr(name("id"), id);
    }
    if let Some(from) = original.attr("from") {
        b = b.attr(name("to"), from);
    }
    if let Some(to) = original.attr("to") {
        b = b.attr(name("from"), to);
    }
    if original.name() != "iq" {
        for child in original.children() {
            if !child.is("error", ns::CLIENT) {
                b = b.append(child.clone());
            }
        }
    }
    Some(b.append(err.to_element()).build())
}

/// An `<iq type='result'/>` answering `request`, with an optional payload.
pub fn iq_result(request: &Element, payload: Option<Element>) -> Element {
    let mut b = Element::builder("iq", ns::CLIENT).attr(name("type"), "result");
    if let Some(id) = request.attr("id") {
        b = b.attr(name("id"), id);
    }
    if let Some(from) = request.attr("from") {
        b = b.attr(name("to"), from);
    }
    if let Some(to) = request.attr("to") {
        b = b.attr(name("from"), to);
    }
    if let Some(p) = payload {
        b = b.append(p);
    }
    b.build()
}

/// A new stanza element with optional from/to/type/id.
pub fn build(
    kind_name: &str,
    from: Option<&str>,
    to: Option<&str>,
    typ: Option<&str>,
    id: Option<&str>,
) -> minidom::ElementBuilder {
    let mut b = Element::builder(kind_name, ns::CLIENT);
    if let Some(v) = id {
        b = b.attr(name("id"), v);
    }
    if let Some(v) = typ {
        b = b.attr(name("type"), v);
    }
    if let Some(v) = from {
        b = b.attr(name("from"), v);
    }
    if let Some(v) = to {
        b = b.attr(name("to"), v);
    }
    b
}

/// The first child element of an IQ (its payload).
pub fn iq_payload(iq: &Element) -> Option<&Element> {
    iq.children().next()
}

/// A random stanza id.
pub fn new_id() -> String {
    crate::auth::random_nonce()[..16].to_owned()
}

/// XEP-0203 delay element.
pub fn delay(from: &str, stamp_micros: i64) -> Element {
    Element::builder("delay", ns::DELAY)
        .attr(name("from"), from)
        .attr(name("stamp"), format_timestamp(stamp_micros))
        .build()
}

/// XEP-0082 date-time in UTC with millisecond precision.
pub fn format_timestamp(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000) / 1000;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Parse an XEP-0082 date-time (with optional fraction and offset) into
/// microseconds since the epoch.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let s = s.trim();
    let (date, time) = s.split_once('T')?;
    let mut dp = date.split('-');
    let y: i64 = dp.next()?.parse().ok()?;
    let mo: u32 = dp.next()?.parse().ok()?;
    let d: u32 = dp.next()?.parse().ok()?;
    if dp.next().is_some() || !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    // Split off the zone.
    let (clock, offset_secs) = if let Some(c) = time.strip_suffix('Z') {
        (c, 0i64)
    } else if let Some(pos) = time.rfind(['+', '-']) {
        let (c, z) = time.split_at(pos);
        let sign = if z.starts_with('-') { -1 } else { 1 };
        let (hh, mm) = z[1..].split_once(':')?;
        (
            c,
            sign * (hh.parse::<i64>().ok()? * 3600 + mm.parse::<i64>().ok()? * 60),
        )
    } else {
        return None;
    };
    let (hms, frac) = match clock.split_once('.') {
        Some((a, f)) => (a, f),
        None => (clock, ""),
    };
    let mut tp = hms.split(':');
    let h: i64 = tp.next()?.parse().ok()?;
    let mi: i64 = tp.next()?.parse().ok()?;
    let sec: i64 = tp.next()?.parse().ok()?;
    if h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut micros_frac = 0i64;
    if !frac.is_empty() {
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits: String = frac.chars().chain("000000".chars()).take(6).collect();
        micros_frac = digits.parse().ok()?;
    }
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_secs;
    Some(secs * 1_000_000 + micros_frac)
}

// Howard Hinnant's civil date algorithms.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_roundtrip() {
        assert_eq!(format_timestamp(0), "1970-01-01T00:00:00.000Z");
        let t = parse_timestamp("2002-09-10T23:08:25Z").unwrap();
        assert_eq!(format_timestamp(t), "2002-09-10T23:08:25.000Z");
        assert_eq!(
            parse_timestamp("2002-09-10T23:08:25.123456Z").unwrap(),
            t + 123_456
        );
        assert_eq!(parse_timestamp("2002-09-11T01:08:25+02:00").unwrap(), t);
        assert_eq!(parse_timestamp("2002-09-10T20:08:25-03:00").unwrap(), t);
        assert!(parse_timestamp("2002-13-10T23:08:25Z").is_none());
        assert!(parse_timestamp("yesterday").is_none());
        let now = crate::storage::now_micros();
        let ms = now - now % 1000;
        assert_eq!(parse_timestamp(&format_timestamp(now)).unwrap(), ms);
    }

    #[test]
    fn error_reply_swaps_addresses() {
        let msg: Element = "<message xmlns='jabber:client' from='a@x/r' to='b@x' id='7' type='chat'><body>hi</body></message>"
            .parse()
            .unwrap();
        let e = error_reply(&msg, &StanzaError::service_unavailable()).unwrap();
        assert_eq!(e.attr("to"), Some("a@x/r"));
        assert_eq!(e.attr("from"), Some("b@x"));
        assert_eq!(e.attr("type"), Some("error"));
        assert_eq!(e.attr("id"), Some("7"));
        let err = e.get_child("error", ns::CLIENT).unwrap();
        assert_eq!(err.attr("type"), Some("cancel"));
        assert!(err.has_child("service-unavailable", ns::STANZA_ERRORS));
        assert!(error_reply(&e, &StanzaError::bad_request()).is_none());
    }

    #[test]
    fn error_types_follow_rfc() {
        assert_eq!(StanzaError::new("bad-request").kind, ErrorType::Modify);
        assert_eq!(StanzaError::new("forbidden").kind, ErrorType::Auth);
        assert_eq!(
            StanzaError::new("resource-constraint").kind,
            ErrorType::Wait
        );
        assert_eq!(StanzaError::new("item-not-found").kind, ErrorType::Cancel);
    }
}
