//! Building query results (XEP-0313 section 4.2): one
//! `<message><result><forwarded><delay/>message</forwarded></result></message>`
//! per archived message, then the `<fin/>` with the RSM `<set/>`. Public so
//! that the MUC room archive answers the same way.

use minidom::Element;

use super::archive::Page;
use crate::stanza::{self, name};
use crate::storage::archive::{ArchiveId, Archived};
use crate::xml::ns;

/// Parse a stored message back into an element.
pub fn stored_message(item: &Archived) -> Option<Element> {
    let text = std::str::from_utf8(&item.stanza).ok()?;
    match text.parse::<Element>() {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::error!(id = %item.id, error = %e, "archived message does not parse; skipped");
            None
        }
    }
}

/// One result message to the querying `to` (a full JID) from the archive
/// `from` (its bare JID), carrying `message` (as it should be forwarded)
/// with the delay stamp of the archive id.
pub fn result_message(
    to: &str,
    from: &str,
    qns: &str,
    queryid: Option<&str>,
    id: ArchiveId,
    message: Element,
) -> Element {
    let mut result = Element::builder("result", qns).attr(name("id"), id.to_string());
    if let Some(q) = queryid {
        result = result.attr(name("queryid"), q);
    }
    let forwarded = Element::builder("forwarded", ns::FORWARD)
        .append(stanza::delay(from, id.micros()))
        .append(message)
        .build();
    stanza::build(
        "message",
        Some(from),
        Some(to),
        None,
        Some(&stanza::new_id()),
    )
    .append(result.append(forwarded).build())
    .build()
}

/// The result messages of a page in sending order (oldest first, or newest
/// first with `flip-page`).
pub fn result_messages(
    to: &str,
    from: &str,
    qns: &str,
    queryid: Option<&str>,
    page: &Page,
    flip: bool,
) -> Vec<Element> {
    let build = |item: &Archived| {
        stored_message(item).map(|m| result_message(to, from, qns, queryid, item.id, m))
    };
    if flip {
        page.items.iter().rev().filter_map(build).collect()
    } else {
        page.items.iter().filter_map(build).collect()
    }
}

/// The RSM `<set/>` describing a page (`first`/`last` in archive order,
/// whatever the sending order).
pub fn rsm_set(page: &Page) -> Element {
    let mut set = Element::builder("set", ns::RSM);
    if let (Some(first), Some(last)) = (page.items.first(), page.items.last()) {
        let mut f = Element::builder("first", ns::RSM).append(first.id.to_string());
        if let Some(i) = page.first_index {
            f = f.attr(name("index"), i.to_string());
        }
        set = set.append(f.build()).append(
            Element::builder("last", ns::RSM)
                .append(last.id.to_string())
                .build(),
        );
    }
    if let Some(c) = page.count {
        set = set.append(
            Element::builder("count", ns::RSM)
                .append(c.to_string())
                .build(),
        );
    }
    set.build()
}

/// The `<fin/>` payload of the IQ result ending a query.
pub fn fin(qns: &str, queryid: Option<&str>, page: &Page) -> Element {
    let mut f = Element::builder("fin", qns);
    if page.complete {
        f = f.attr(name("complete"), "true");
    }
    if qns == ns::MAM1
        && let Some(q) = queryid
    {
        // mam:1 carried the queryid on <fin/> as well.
        f = f.attr(name("queryid"), q);
    }
    f.append(rsm_set(page)).build()
}

/// The `<metadata/>` answer (XEP-0313 section 5): the first and last ids
/// and their times, or empty for an empty archive.
pub fn metadata(bounds: Option<(ArchiveId, ArchiveId)>) -> Element {
    let mut m = Element::builder("metadata", ns::MAM);
    if let Some((first, last)) = bounds {
        for (n, id) in [("start", first), ("end", last)] {
            m = m.append(
                Element::builder(n, ns::MAM)
                    .attr(name("id"), id.to_string())
                    .attr(name("timestamp"), stanza::format_timestamp(id.micros()))
                    .build(),
            );
        }
    }
    m.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(seq: i64) -> Archived {
        Archived {
            id: ArchiveId { seq, tag: 1 },
            with_bare: "bob@x".into(),
            with_res: String::new(),
            outgoing: false,
            stanza: format!(
                "<message xmlns='jabber:client' from='bob@x/r' to='alice@x' type='chat'><body>{seq}</body></message>"
            )
            .into_bytes(),
        }
    }

    #[test]
    fn results_and_fin() {
        let page = Page {
            items: vec![item(1_000_000), item(2_000_000)],
            complete: true,
            first_index: Some(0),
            count: Some(2),
        };
        let msgs = result_messages("alice@x/r", "alice@x", ns::MAM, Some("q1"), &page, false);
        assert_eq!(msgs.len(), 2);
        let r = msgs[0].get_child("result", ns::MAM).unwrap();
        assert_eq!(r.attr("queryid"), Some("q1"));
        assert_eq!(r.attr("id"), Some(page.items[0].id.to_string().as_str()));
        let fwd = r.get_child("forwarded", ns::FORWARD).unwrap();
        assert_eq!(
            fwd.get_child("delay", ns::DELAY).unwrap().attr("stamp"),
            Some("1970-01-01T00:00:01.000Z")
        );
        let m = fwd.get_child("message", ns::CLIENT).unwrap();
        assert_eq!(m.get_child("body", ns::CLIENT).unwrap().text(), "1000000");
        assert_eq!(msgs[0].attr("to"), Some("alice@x/r"));
        assert_eq!(msgs[0].attr("from"), Some("alice@x"));

        let flipped = result_messages("alice@x/r", "alice@x", ns::MAM, None, &page, true);
        let first_sent = flipped[0].get_child("result", ns::MAM).unwrap();
        assert_eq!(
            first_sent.attr("id"),
            Some(page.items[1].id.to_string().as_str())
        );
        assert_eq!(first_sent.attr("queryid"), None);

        let f = fin(ns::MAM, Some("q1"), &page);
        assert_eq!(f.attr("complete"), Some("true"));
        assert_eq!(f.attr("queryid"), None);
        let set = f.get_child("set", ns::RSM).unwrap();
        let first = set.get_child("first", ns::RSM).unwrap();
        assert_eq!(first.attr("index"), Some("0"));
        assert_eq!(first.text(), page.items[0].id.to_string());
        assert_eq!(
            set.get_child("last", ns::RSM).unwrap().text(),
            page.items[1].id.to_string()
        );
        assert_eq!(set.get_child("count", ns::RSM).unwrap().text(), "2");

        let empty = fin(ns::MAM1, Some("q"), &Page::default());
        assert_eq!(empty.attr("complete"), None);
        assert_eq!(empty.attr("queryid"), Some("q"));
        assert_eq!(
            empty.get_child("set", ns::RSM).unwrap().children().count(),
            0
        );
    }

    #[test]
    fn corrupt_rows_are_skipped() {
        let mut bad = item(5);
        bad.stanza = b"<message".to_vec();
        let page = Page {
            items: vec![bad, item(6)],
            ..Default::default()
        };
        assert_eq!(
            result_messages("a@x/r", "a@x", ns::MAM, None, &page, false).len(),
            1
        );
    }
}
