//! Parsing an archive query (XEP-0313 section 4): the data form (XEP-0004)
//! with the filters, RSM (XEP-0059) paging and `flip-page`; and the form a
//! client gets when it asks which fields are supported. Public so that the
//! MUC room archive parses queries the same way.

use jid::Jid;
use minidom::Element;

use crate::stanza::{StanzaError, name, parse_timestamp};
use crate::xml::ns;

/// RSM `<before>`: empty (the last page) or an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RsmBefore {
    Last,
    Id(String),
}

/// A parsed query. Ids are kept as the client sent them: an id that is
/// not in the archive (or not even well-formed) is `item-not-found` when the
/// query runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MamQuery {
    /// The namespace the query came in (`urn:xmpp:mam:2` or `:1`); results
    /// and `<fin/>` use it.
    pub ns: &'static str,
    pub queryid: Option<String>,
    pub with: Option<Jid>,
    /// Epoch microseconds.
    pub start: Option<i64>,
    pub end: Option<i64>,
    pub after_id: Option<String>,
    pub before_id: Option<String>,
    pub ids: Option<Vec<String>>,
    pub include_groupchat: Option<bool>,
    /// RSM.
    pub max: Option<usize>,
    pub after: Option<String>,
    pub before: Option<RsmBefore>,
    pub flip_page: bool,
}

fn bad(text: impl Into<String>) -> StanzaError {
    StanzaError::bad_request().with_text(text)
}

/// The namespace of a MAM payload, if it is one we answer.
pub fn mam_ns(el: &Element) -> Option<&'static str> {
    if el.has_ns(ns::MAM) {
        Some(ns::MAM)
    } else if el.has_ns(ns::MAM1) {
        Some(ns::MAM1)
    } else {
        None
    }
}

/// Parse a `<query xmlns='urn:xmpp:mam:2'>` (or `:1`) of an IQ set.
pub fn parse_query(query: &Element) -> Result<MamQuery, StanzaError> {
    let Some(qns) = mam_ns(query).filter(|_| query.name() == "query") else {
        return Err(bad("not a MAM query"));
    };
    if query.attr("node").is_some() {
        return Err(
            StanzaError::feature_not_implemented().with_text("this archive has no pubsub nodes")
        );
    }
    let mut q = MamQuery {
        ns: qns,
        queryid: query.attr("queryid").map(str::to_owned),
        ..Default::default()
    };
    for child in query.children() {
        if child.is("x", ns::DATA_FORMS) {
            parse_form(child, &mut q)?;
        } else if child.is("set", ns::RSM) {
            parse_rsm(child, &mut q)?;
        } else if child.is("flip-page", qns) {
            q.flip_page = true;
        } else {
            return Err(bad(format!("unexpected <{}/> in the query", child.name())));
        }
    }
    Ok(q)
}

fn single<'a>(var: &str, values: &'a [String]) -> Result<&'a str, StanzaError> {
    match values {
        [v] => Ok(v.trim()),
        [] => Err(bad(format!("field {var} has no value"))),
        _ => Err(bad(format!("field {var} takes one value"))),
    }
}

fn parse_form(x: &Element, q: &mut MamQuery) -> Result<(), StanzaError> {
    match x.attr("type") {
        None | Some("submit") => {}
        Some(t) => return Err(bad(format!("a query form has type submit, not {t}"))),
    }
    for field in x.children().filter(|c| c.is("field", ns::DATA_FORMS)) {
        let Some(var) = field.attr("var") else {
            return Err(bad("a form field without var"));
        };
        let values: Vec<String> = field
            .children()
            .filter(|c| c.is("value", ns::DATA_FORMS))
            .map(|v| v.text())
            .collect();
        // A field with no value is as good as absent (clients send empty
        // fields from the form they fetched).
        if values.is_empty() || (values.len() == 1 && values[0].trim().is_empty() && var != "ids") {
            continue;
        }
        match var {
            "FORM_TYPE" => {
                let v = single(var, &values)?;
                if v != q.ns {
                    return Err(bad(format!("FORM_TYPE must be {}", q.ns)));
                }
            }
            "with" => {
                let v = single(var, &values)?;
                q.with = Some(Jid::new(v).map_err(|_| bad(format!("with: invalid JID {v}")))?);
            }
            "start" | "end" => {
                let v = single(var, &values)?;
                let t = parse_timestamp(v)
                    .ok_or_else(|| bad(format!("{var}: not an XEP-0082 date-time: {v}")))?;
                if var == "start" {
                    q.start = Some(t);
                } else {
                    q.end = Some(t);
                }
            }
            "after-id" => q.after_id = Some(single(var, &values)?.to_owned()),
            "before-id" => q.before_id = Some(single(var, &values)?.to_owned()),
            "ids" => {
                q.ids = Some(
                    values
                        .iter()
                        .map(|v| v.trim().to_owned())
                        .filter(|v| !v.is_empty())
                        .collect(),
                )
            }
            "include-groupchat" if q.ns == ns::MAM => {
                q.include_groupchat = Some(match single(var, &values)? {
                    "1" | "true" => true,
                    "0" | "false" => false,
                    v => return Err(bad(format!("include-groupchat: not a boolean: {v}"))),
                });
            }
            other => {
                return Err(StanzaError::feature_not_implemented()
                    .with_text(format!("unknown query field {other}")));
            }
        }
    }
    Ok(())
}

fn parse_rsm(set: &Element, q: &mut MamQuery) -> Result<(), StanzaError> {
    for c in set.children() {
        if c.ns() != ns::RSM {
            continue;
        }
        match c.name() {
            "max" => {
                let t = c.text();
                q.max = Some(
                    t.trim()
                        .parse::<usize>()
                        .map_err(|_| bad(format!("RSM max is not a number: {t}")))?,
                );
            }
            "after" => {
                let t = c.text();
                if !t.trim().is_empty() {
                    q.after = Some(t.trim().to_owned());
                }
            }
            "before" => {
                let t = c.text();
                q.before = Some(if t.trim().is_empty() {
                    RsmBefore::Last
                } else {
                    RsmBefore::Id(t.trim().to_owned())
                });
            }
            "index" => {
                return Err(StanzaError::feature_not_implemented()
                    .with_text("paging by index is not supported; page with after/before"));
            }
            _ => {}
        }
    }
    Ok(())
}

fn field(var: &str, typ: &str) -> minidom::ElementBuilder {
    Element::builder("field", ns::DATA_FORMS)
        .attr(name("type"), typ)
        .attr(name("var"), var)
}

/// The `<query/>` answering a form request (XEP-0313 section 4.1.5): every
/// field this archive understands. `include_groupchat` adds the
/// `include-groupchat` field (user archives, namespace `urn:xmpp:mam:2`).
pub fn query_form(qns: &str, include_groupchat: bool) -> Element {
    let mut x = Element::builder("x", ns::DATA_FORMS)
        .attr(name("type"), "form")
        .append(
            field("FORM_TYPE", "hidden")
                .append(
                    Element::builder("value", ns::DATA_FORMS)
                        .append(qns)
                        .build(),
                )
                .build(),
        )
        .append(field("with", "jid-single").build())
        .append(field("start", "text-single").build())
        .append(field("end", "text-single").build());
    if qns == ns::MAM {
        x = x
            .append(field("before-id", "text-single").build())
            .append(field("after-id", "text-single").build())
            .append(
                field("ids", "list-multi")
                    .append(
                        Element::builder("validate", ns::XDATA_VALIDATE)
                            .attr(name("datatype"), "xs:string")
                            .append(Element::builder("open", ns::XDATA_VALIDATE).build())
                            .build(),
                    )
                    .build(),
            );
        if include_groupchat {
            x = x.append(field("include-groupchat", "boolean").build());
        }
    }
    Element::builder("query", qns).append(x.build()).build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(xml: &str) -> Result<MamQuery, StanzaError> {
        parse_query(&xml.parse::<Element>().unwrap())
    }

    const FORM: &str = "<field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:2</value></field>";

    #[test]
    fn full_query_parses() {
        let got = q(&format!(
            "<query xmlns='urn:xmpp:mam:2' queryid='f27'>\
             <x xmlns='jabber:x:data' type='submit'>{FORM}\
             <field var='with'><value>juliet@capulet.lit/balcony</value></field>\
             <field var='start'><value>2010-06-07T00:00:00Z</value></field>\
             <field var='end'><value>2010-07-07T13:23:54Z</value></field>\
             <field var='after-id'><value>A</value></field>\
             <field var='before-id'><value>B</value></field>\
             <field var='ids'><value>C</value><value>D</value></field>\
             <field var='include-groupchat'><value>false</value></field>\
             </x><set xmlns='http://jabber.org/protocol/rsm'><max>10</max><after>E</after>\
             <before/></set><flip-page/></query>"
        ))
        .unwrap();
        assert_eq!(got.ns, ns::MAM);
        assert_eq!(got.queryid.as_deref(), Some("f27"));
        assert_eq!(got.with.unwrap().to_string(), "juliet@capulet.lit/balcony");
        assert_eq!(got.start, parse_timestamp("2010-06-07T00:00:00Z"));
        assert_eq!(got.end, parse_timestamp("2010-07-07T13:23:54Z"));
        assert_eq!(got.after_id.as_deref(), Some("A"));
        assert_eq!(got.before_id.as_deref(), Some("B"));
        assert_eq!(got.ids, Some(vec!["C".to_string(), "D".to_string()]));
        assert_eq!(got.include_groupchat, Some(false));
        assert_eq!(got.max, Some(10));
        assert_eq!(got.after.as_deref(), Some("E"));
        assert_eq!(got.before, Some(RsmBefore::Last));
        assert!(got.flip_page);
    }

    #[test]
    fn empty_query_and_mam1() {
        let got = q("<query xmlns='urn:xmpp:mam:1'/>").unwrap();
        assert_eq!(got.ns, ns::MAM1);
        assert_eq!(got.max, None);
        let got = q("<query xmlns='urn:xmpp:mam:2'><set xmlns='http://jabber.org/protocol/rsm'><before>X</before></set></query>").unwrap();
        assert_eq!(got.before, Some(RsmBefore::Id("X".into())));
    }

    #[test]
    fn bad_queries_get_the_right_errors() {
        let cond = |xml: &str| q(xml).unwrap_err().condition;
        let form = |fields: &str| {
            format!(
                "<query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data' type='submit'>{FORM}{fields}</x></query>"
            )
        };
        assert_eq!(
            cond(&form("<field var='color'><value>red</value></field>")),
            "feature-not-implemented"
        );
        assert_eq!(
            cond(&form("<field var='start'><value>yesterday</value></field>")),
            "bad-request"
        );
        assert_eq!(
            cond(&form("<field var='with'><value>@@</value></field>")),
            "bad-request"
        );
        assert_eq!(
            cond(&form(
                "<field var='with'><value>a@b</value><value>c@d</value></field>"
            )),
            "bad-request"
        );
        assert_eq!(
            cond(
                "<query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>urn:xmpp:mam:1</value></field></x></query>"
            ),
            "bad-request"
        );
        assert_eq!(
            cond(
                "<query xmlns='urn:xmpp:mam:2'><set xmlns='http://jabber.org/protocol/rsm'><max>ten</max></set></query>"
            ),
            "bad-request"
        );
        assert_eq!(
            cond(
                "<query xmlns='urn:xmpp:mam:2'><set xmlns='http://jabber.org/protocol/rsm'><index>3</index></set></query>"
            ),
            "feature-not-implemented"
        );
        assert_eq!(
            cond("<query xmlns='urn:xmpp:mam:2' node='x'/>"),
            "feature-not-implemented"
        );
        // include-groupchat is a mam:2 field only.
        assert_eq!(
            cond(
                "<query xmlns='urn:xmpp:mam:1'><x xmlns='jabber:x:data'><field var='include-groupchat'><value>true</value></field></x></query>"
            ),
            "feature-not-implemented"
        );
        // Empty fields are ignored.
        assert!(
            q(&form("<field var='with'><value/></field>"))
                .unwrap()
                .with
                .is_none()
        );
    }

    #[test]
    fn form_lists_every_field() {
        let f = query_form(ns::MAM, true);
        let x = f.get_child("x", ns::DATA_FORMS).unwrap();
        let vars: Vec<&str> = x.children().filter_map(|c| c.attr("var")).collect();
        assert_eq!(
            vars,
            [
                "FORM_TYPE",
                "with",
                "start",
                "end",
                "before-id",
                "after-id",
                "ids",
                "include-groupchat"
            ]
        );
        assert!(
            x.children()
                .all(|c| !c.has_child("required", ns::DATA_FORMS))
        );
    }
}
