//! The xeps/ pages stay true: every feature the server advertises in
//! disco#info (server, account, and each local service) is covered by a
//! page, every test a page names exists, every page is well-formed and
//! listed in xeps/README.md, and `starling.doap` (the DOAP file the XSF lists
//! server software with) is generated from the pages and up to date.
//!
//! Regenerate the DOAP after changing a page:
//! `STARLING_UPDATE_DOAP=1 cargo test --test xeps_pages`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use common::*;
use minidom::Element;
use starling::xml::ns;

/// One xeps/*.md page: its front matter.
#[derive(Debug)]
struct Page {
    file: String,
    keys: BTreeMap<String, String>,
}

impl Page {
    fn get(&self, key: &str) -> &str {
        self.keys.get(key).map(String::as_str).unwrap_or("")
    }
    fn list(&self, key: &str) -> Vec<&str> {
        self.get(key).split_whitespace().collect()
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Parse the front matter: the page starts with a ``` fence, `key: value`
/// lines, and a closing ``` fence.
fn parse_page(file: &str, text: &str) -> Result<Page, String> {
    let mut lines = text.lines();
    if lines.next().map(str::trim) != Some("```") {
        return Err(format!("{file}: must start with a ``` front-matter block"));
    }
    let mut keys = BTreeMap::new();
    for line in lines.by_ref() {
        if line.trim() == "```" {
            return Ok(Page {
                file: file.to_owned(),
                keys,
            });
        }
        let Some((k, v)) = line.split_once(':') else {
            return Err(format!("{file}: front-matter line without a key: {line:?}"));
        };
        keys.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    Err(format!("{file}: front matter is not closed with ```"))
}

fn pages() -> Vec<Page> {
    let dir = root().join("xeps");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("xeps/ exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md") && !p.ends_with("README.md"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            parse_page(&name, &std::fs::read_to_string(p).unwrap())
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect()
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn defines_fn(text: &str, name: &str) -> bool {
    text.match_indices(&format!("fn {name}")).any(|(i, m)| {
        let rest = &text[i + m.len()..];
        rest.starts_with('(') || rest.starts_with('<')
    })
}

#[test]
fn every_page_is_well_formed_and_listed() {
    let readme = std::fs::read_to_string(root().join("xeps/README.md")).unwrap();
    let pages = pages();
    assert!(!pages.is_empty());
    let mut specs = BTreeSet::new();
    for p in &pages {
        let spec = p.get("spec");
        assert!(
            spec.starts_with("XEP-") || spec.starts_with("RFC "),
            "{}: spec {spec:?} must be XEP-NNNN or RFC NNNN",
            p.file
        );
        assert!(
            specs.insert(spec.to_owned()),
            "{}: a second page for {spec}",
            p.file
        );
        let status = p.get("status");
        assert!(
            ["complete", "partial", "planned"].contains(&status),
            "{}: status {status:?} must be complete, partial or planned",
            p.file
        );
        assert!(!p.get("module").is_empty(), "{}: no module", p.file);
        for m in p
            .get("module")
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
        {
            assert!(
                root().join(m).exists(),
                "{}: module {m} does not exist",
                p.file
            );
        }
        if status != "planned" {
            assert!(!p.list("tests").is_empty(), "{}: names no test", p.file);
        }
        assert!(
            readme.contains(&format!("]({})", p.file)),
            "{}: not linked from the table in xeps/README.md",
            p.file
        );
    }
}

#[test]
fn every_test_a_page_names_exists() {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    rust_files(&root().join("tests"), &mut files);
    let sources: Vec<(PathBuf, String)> = files
        .into_iter()
        .map(|p| {
            let t = std::fs::read_to_string(&p).unwrap();
            (p, t)
        })
        .collect();
    let mut missing = Vec::new();
    for p in pages() {
        for t in p.list("tests") {
            let mut parts: Vec<&str> = t.split("::").collect();
            let name = parts.pop().unwrap_or_default();
            let found = match parts.first() {
                // `file::test` with tests/<file>.rs: the function must be there.
                Some(file) if root().join(format!("tests/{file}.rs")).exists() => {
                    let text =
                        std::fs::read_to_string(root().join(format!("tests/{file}.rs"))).unwrap();
                    defines_fn(&text, name)
                }
                // Otherwise a unit test somewhere in src/ (or tests/).
                _ => sources.iter().any(|(_, text)| defines_fn(text, name)),
            };
            if parts.is_empty() || !found {
                missing.push(format!("{}: {t}", p.file));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "tests named in xeps/ pages that do not exist (write them as file::fn_name):\n  {}",
        missing.join("\n  ")
    );
}

fn features_of(iq: &Element) -> Vec<String> {
    iq.get_child("query", ns::DISCO_INFO)
        .map(|q| {
            q.children()
                .filter(|c| c.name() == "feature")
                .filter_map(|c| c.attr("var").map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn every_advertised_feature_has_a_page() {
    let srv = TestServer::start().await;
    srv.add_user("alice").await;
    let mut c = srv.login("alice", "xeps").await;
    let disco = |to: &str| {
        let to = if to.is_empty() {
            String::new()
        } else {
            format!(" to='{to}'")
        };
        parse(&format!(
            "<iq xmlns='jabber:client' type='get'{to}><query xmlns='{}'/></iq>",
            ns::DISCO_INFO
        ))
    };
    let mut advertised: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let server = c.iq(disco(DOMAIN)).await.unwrap();
    for f in features_of(&server) {
        advertised.entry(f).or_default().insert("server".into());
    }
    let account = c.iq(disco("")).await.unwrap();
    assert_eq!(account.attr("type"), Some("result"));
    for f in features_of(&account) {
        advertised.entry(f).or_default().insert("account".into());
    }
    let items = c
        .iq(parse(&format!(
            "<iq xmlns='jabber:client' type='get' to='{DOMAIN}'><query xmlns='{}'/></iq>",
            ns::DISCO_ITEMS
        )))
        .await
        .unwrap();
    let services: Vec<String> = items
        .get_child("query", ns::DISCO_ITEMS)
        .map(|q| {
            q.children()
                .filter_map(|i| i.attr("jid").map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for jid in services {
        let info = c.iq(disco(&jid)).await.unwrap();
        for f in features_of(&info) {
            advertised.entry(f).or_default().insert(jid.clone());
        }
    }
    assert!(advertised.contains_key(ns::DISCO_INFO), "{advertised:?}");
    let documented: BTreeSet<String> = pages()
        .iter()
        .flat_map(|p| p.list("features"))
        .map(str::to_owned)
        .collect();
    let undocumented: Vec<String> = advertised
        .iter()
        .filter(|(f, _)| !documented.contains(*f))
        .map(|(f, on)| {
            format!(
                "{f} (advertised by {})",
                on.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    assert!(
        undocumented.is_empty(),
        "features advertised in disco#info but on no xeps/ page (add them to the `features:` \
         of the page of their spec):\n  {}",
        undocumented.join("\n  ")
    );
    srv.shutdown().await;
}

// --- DOAP -------------------------------------------------------------------

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `starling.doap` from the pages: DOAP with the XSF's xmpp-doap vocabulary
/// (one `xmpp:SupportedXep` per XEP page, `implements` for each RFC).
fn generate_doap(pages: &[Page]) -> String {
    let mut out = String::from(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated from the front matter of xeps/*.md by tests/xeps_pages.rs:
     STARLING_UPDATE_DOAP=1 cargo test --test xeps_pages
     Do not edit by hand. -->
<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
         xmlns="http://usefulinc.com/ns/doap#"
         xmlns:xmpp="https://linkmauve.fr/ns/xmpp-doap#"
         xmlns:schema="https://schema.org/">
  <Project>
    <name>Starling</name>
    <shortdesc xml:lang="en">A fast, standards-compliant XMPP server</shortdesc>
    <description xml:lang="en">Starling is an XMPP server written in Rust: standards-compliant (RFC 6120/6121 and the XEPs of the XMPP Compliance Suites), built for the clients people use, and designed to lose no message and to be fast and small. It stores its data in SQLite or PostgreSQL.</description>
    <homepage rdf:resource="https://starling.im"/>
    <license rdf:resource="https://www.gnu.org/licenses/agpl-3.0.html"/>
    <programming-language>Rust</programming-language>
    <os>Linux</os>
    <category rdf:resource="https://linkmauve.fr/ns/xmpp-doap#category-jabber"/>
    <category rdf:resource="https://linkmauve.fr/ns/xmpp-doap#category-server"/>
    <category rdf:resource="https://linkmauve.fr/ns/xmpp-doap#category-xmpp"/>
"#,
    );
    let mut rfcs: Vec<&Page> = pages
        .iter()
        .filter(|p| p.get("spec").starts_with("RFC "))
        .collect();
    rfcs.sort_by_key(|p| {
        p.get("spec")
            .trim_start_matches("RFC ")
            .parse::<u32>()
            .unwrap_or(0)
    });
    for p in rfcs {
        let n = p.get("spec").trim_start_matches("RFC ").trim();
        writeln!(
            out,
            "    <implements rdf:resource=\"https://www.rfc-editor.org/info/rfc{n}\"/>"
        )
        .unwrap();
    }
    let mut xeps: Vec<&Page> = pages
        .iter()
        .filter(|p| p.get("spec").starts_with("XEP-"))
        .collect();
    xeps.sort_by_key(|p| p.get("spec").to_owned());
    for p in xeps {
        let n = p.get("spec").trim_start_matches("XEP-").trim();
        out.push_str("    <implements>\n      <xmpp:SupportedXep>\n");
        writeln!(
            out,
            "        <xmpp:xep rdf:resource=\"https://xmpp.org/extensions/xep-{n}.html\"/>"
        )
        .unwrap();
        writeln!(
            out,
            "        <xmpp:status>{}</xmpp:status>",
            xml_escape(p.get("status"))
        )
        .unwrap();
        for (key, tag) in [("version", "version"), ("since", "since"), ("note", "note")] {
            if !p.get(key).is_empty() {
                writeln!(
                    out,
                    "        <xmpp:{tag}>{}</xmpp:{tag}>",
                    xml_escape(p.get(key))
                )
                .unwrap();
            }
        }
        out.push_str("      </xmpp:SupportedXep>\n    </implements>\n");
    }
    out.push_str("  </Project>\n</rdf:RDF>\n");
    out
}

#[test]
fn doap_is_generated_from_the_pages_and_up_to_date() {
    let pages = pages();
    let doap = generate_doap(&pages);
    // Well-formed XML, and every XEP page is in it.
    let parsed: Element = doap
        .split_once("-->\n")
        .map(|(_, rest)| rest)
        .unwrap()
        .parse()
        .expect("the generated DOAP is well-formed XML");
    assert_eq!(parsed.name(), "RDF");
    for p in pages.iter().filter(|p| p.get("spec").starts_with("XEP-")) {
        let n = p.get("spec").trim_start_matches("XEP-");
        assert!(
            doap.contains(&format!("xep-{n}.html")),
            "{} missing",
            p.file
        );
    }
    let path = root().join("starling.doap");
    if std::env::var_os("STARLING_UPDATE_DOAP").is_some() {
        std::fs::write(&path, &doap).unwrap();
        return;
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        current == doap,
        "starling.doap is out of date with xeps/*.md: run \
         `STARLING_UPDATE_DOAP=1 cargo test --test xeps_pages` and commit it"
    );
}
