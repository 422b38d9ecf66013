//! Client State Indication (XEP-0352), sans-IO: while the client says it is
//! inactive, presence updates are held back (only the latest per sender is
//! kept) and everything else goes out at once, after the held presences so
//! that order is kept. `<active/>` flushes.

use minidom::Element;

/// Most distinct senders whose presence is held before everything is flushed.
const MAX_HELD: usize = 1000;

#[derive(Debug, Default)]
pub struct CsiFilter {
    inactive: bool,
    held: Vec<(String, Element)>,
}

/// Presence that can wait: availability updates (not subscription requests,
/// not errors).
fn is_deferrable(el: &Element) -> bool {
    el.name() == "presence" && matches!(el.attr("type"), None | Some("unavailable"))
}

impl CsiFilter {
    pub fn is_inactive(&self) -> bool {
        self.inactive
    }

    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    pub fn set_inactive(&mut self) {
        self.inactive = true;
    }

    /// The client is active again: everything held, in order.
    pub fn set_active(&mut self) -> Vec<Element> {
        self.inactive = false;
        self.flush()
    }

    pub fn flush(&mut self) -> Vec<Element> {
        self.held.drain(..).map(|(_, e)| e).collect()
    }

    /// What to send now for a stanza going to the client.
    pub fn filter(&mut self, el: Element) -> Vec<Element> {
        if !self.inactive {
            return vec![el];
        }
        if is_deferrable(&el) {
            let key = el.attr("from").unwrap_or("").to_owned();
            if let Some(pos) = self.held.iter().position(|(k, _)| *k == key) {
                self.held.remove(pos);
            }
            self.held.push((key, el));
            if self.held.len() > MAX_HELD {
                return self.flush();
            }
            return Vec::new();
        }
        if el.name() == "iq" {
            return vec![el];
        }
        // Messages and other presence go at once, after what is held.
        let mut out = self.flush();
        out.push(el);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(from: &str, show: &str) -> Element {
        format!("<presence xmlns='jabber:client' from='{from}'><show>{show}</show></presence>")
            .parse()
            .unwrap()
    }

    #[test]
    fn holds_latest_presence_per_sender_and_flushes_on_active() {
        let mut f = CsiFilter::default();
        assert_eq!(f.filter(p("a@x/1", "away")).len(), 1, "active: passes");
        f.set_inactive();
        assert!(f.filter(p("a@x/1", "away")).is_empty());
        assert!(f.filter(p("b@x/1", "dnd")).is_empty());
        assert!(f.filter(p("a@x/1", "xa")).is_empty());
        assert_eq!(f.held_count(), 2);
        let iq: Element = "<iq xmlns='jabber:client' type='get' id='1'/>"
            .parse()
            .unwrap();
        assert_eq!(f.filter(iq).len(), 1, "IQs are not held");
        let out = f.set_active();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].attr("from"), Some("b@x/1"));
        assert_eq!(
            out[1].get_child("show", "jabber:client").unwrap().text(),
            "xa"
        );
    }

    #[test]
    fn messages_and_subscriptions_go_at_once_after_held_presence() {
        let mut f = CsiFilter::default();
        f.set_inactive();
        f.filter(p("a@x/1", "away"));
        let m: Element = "<message xmlns='jabber:client' from='a@x/1'><body>hi</body></message>"
            .parse()
            .unwrap();
        let out = f.filter(m);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].name(), "presence");
        assert_eq!(out[1].name(), "message");
        let sub: Element = "<presence xmlns='jabber:client' from='c@x' type='subscribe'/>"
            .parse()
            .unwrap();
        assert_eq!(f.filter(sub).len(), 1);
    }
}
