//! Just enough of XEP-0004 Data Forms for the MUC service: reading
//! submitted forms and building forms and results.

use minidom::Element;

use crate::stanza::name;
use crate::xml::ns;

/// A boolean field whose value is not `0`, `1`, `false` or `true`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidBoolean;

/// A submitted (or received) form: its type and field values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Form {
    pub typ: String,
    pub fields: Vec<(String, Vec<String>)>,
}

impl Form {
    /// Read a `<x xmlns='jabber:x:data'/>` element.
    pub fn parse(x: &Element) -> Option<Form> {
        if !x.is("x", ns::DATA_FORMS) {
            return None;
        }
        let mut form = Form {
            typ: x.attr("type").unwrap_or("form").to_owned(),
            fields: Vec::new(),
        };
        for f in x.children().filter(|c| c.is("field", ns::DATA_FORMS)) {
            let Some(var) = f.attr("var") else { continue };
            let values = f
                .children()
                .filter(|v| v.is("value", ns::DATA_FORMS))
                .map(|v| v.text())
                .collect();
            form.fields.push((var.to_owned(), values));
        }
        Some(form)
    }

    /// The first data form child of `parent`.
    pub fn find(parent: &Element) -> Option<Form> {
        parent
            .children()
            .find(|c| c.is("x", ns::DATA_FORMS))
            .and_then(Form::parse)
    }

    pub fn form_type(&self) -> Option<&str> {
        self.value("FORM_TYPE")
    }

    pub fn has(&self, var: &str) -> bool {
        self.fields.iter().any(|(v, _)| v == var)
    }

    pub fn values(&self, var: &str) -> Option<&[String]> {
        self.fields
            .iter()
            .find(|(v, _)| v == var)
            .map(|(_, vals)| vals.as_slice())
    }

    /// The first value of a field (None if the field is absent or empty).
    pub fn value(&self, var: &str) -> Option<&str> {
        self.values(var).and_then(|v| v.first()).map(|s| s.as_str())
    }

    /// A boolean field: Some(true/false), None if absent; Err if not a
    /// valid XML Schema boolean.
    pub fn bool(&self, var: &str) -> Result<Option<bool>, InvalidBoolean> {
        match self.values(var) {
            None => Ok(None),
            Some(v) => match v.first().map(|s| s.trim()) {
                None => Ok(Some(false)),
                Some("1") | Some("true") => Ok(Some(true)),
                Some("0") | Some("false") => Ok(Some(false)),
                Some(_) => Err(InvalidBoolean),
            },
        }
    }

    /// Field names other than FORM_TYPE.
    pub fn vars(&self) -> impl Iterator<Item = &str> {
        self.fields
            .iter()
            .map(|(v, _)| v.as_str())
            .filter(|v| *v != "FORM_TYPE")
    }
}

/// Builds a form (`type='form'`) or a result (`type='result'`).
pub struct FormBuilder {
    el: Element,
}

impl FormBuilder {
    pub fn new(typ: &str, form_type: &str) -> Self {
        let mut b = FormBuilder {
            el: Element::builder("x", ns::DATA_FORMS)
                .attr(name("type"), typ)
                .build(),
        };
        b.el.append_child(
            Element::builder("field", ns::DATA_FORMS)
                .attr(name("var"), "FORM_TYPE")
                .attr(name("type"), "hidden")
                .append(value(form_type))
                .build(),
        );
        b
    }

    pub fn title(mut self, t: &str) -> Self {
        self.el
            .append_child(Element::builder("title", ns::DATA_FORMS).append(t).build());
        self
    }

    pub fn instructions(mut self, t: &str) -> Self {
        self.el.append_child(
            Element::builder("instructions", ns::DATA_FORMS)
                .append(t)
                .build(),
        );
        self
    }

    /// A field with a type (None for results), a label and values.
    pub fn field(mut self, var: &str, typ: Option<&str>, label: &str, values: &[&str]) -> Self {
        self.el.append_child(field(var, typ, label, values, &[]));
        self
    }

    /// A list field with options (value, label).
    pub fn list(
        mut self,
        var: &str,
        typ: &str,
        label: &str,
        values: &[&str],
        options: &[(&str, &str)],
    ) -> Self {
        self.el
            .append_child(field(var, Some(typ), label, values, options));
        self
    }

    pub fn boolean(self, var: &str, label: &str, v: bool) -> Self {
        self.field(var, Some("boolean"), label, &[if v { "1" } else { "0" }])
    }

    pub fn build(self) -> Element {
        self.el
    }
}

fn value(v: &str) -> Element {
    Element::builder("value", ns::DATA_FORMS).append(v).build()
}

fn field(
    var: &str,
    typ: Option<&str>,
    label: &str,
    values: &[&str],
    options: &[(&str, &str)],
) -> Element {
    let mut b = Element::builder("field", ns::DATA_FORMS).attr(name("var"), var);
    if let Some(t) = typ {
        b = b.attr(name("type"), t);
    }
    if !label.is_empty() {
        b = b.attr(name("label"), label);
    }
    for v in values {
        b = b.append(value(v));
    }
    for (v, l) in options {
        b = b.append(
            Element::builder("option", ns::DATA_FORMS)
                .attr(name("label"), *l)
                .append(value(v))
                .build(),
        );
    }
    b.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_then_parse() {
        let x = FormBuilder::new("form", "urn:test")
            .title("T")
            .boolean("a", "A", true)
            .field("b", Some("text-single"), "B", &["x"])
            .list(
                "c",
                "list-multi",
                "C",
                &["1", "2"],
                &[("1", "one"), ("2", "two")],
            )
            .build();
        let f = Form::parse(&x).unwrap();
        assert_eq!(f.typ, "form");
        assert_eq!(f.form_type(), Some("urn:test"));
        assert_eq!(f.bool("a"), Ok(Some(true)));
        assert_eq!(f.value("b"), Some("x"));
        assert_eq!(f.values("c").unwrap(), &["1".to_string(), "2".to_string()]);
        assert_eq!(f.bool("zz"), Ok(None));
        assert_eq!(f.vars().collect::<Vec<_>>(), vec!["a", "b", "c"]);
        let bad: Element = "<x xmlns='jabber:x:data' type='submit'><field var='a'><value>maybe</value></field></x>"
            .parse()
            .unwrap();
        assert!(Form::parse(&bad).unwrap().bool("a").is_err());
    }
}
