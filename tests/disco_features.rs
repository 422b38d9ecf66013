//! The disco#info feature lists (server and account) are exactly what the
//! registered modules implement: the list on the wire equals the union of
//! the modules' features, and every advertised feature has something behind
//! it: an IQ handler for its namespace, or a hook listed in
//! `modules::HOOK_FEATURES` whose proving test exists.

mod common;

use std::collections::BTreeSet;

use common::*;
use minidom::Element;
use starling::modules::HOOK_FEATURES;
use starling::xml::ns;

fn features(r: &Element) -> BTreeSet<String> {
    r.get_child("query", ns::DISCO_INFO)
        .unwrap_or_else(|| panic!("no disco#info in {r:?}"))
        .children()
        .filter(|c| c.name() == "feature")
        .filter_map(|c| c.attr("var"))
        .map(str::to_owned)
        .collect()
}

fn with_disco(list: Vec<&'static str>) -> BTreeSet<String> {
    let mut s: BTreeSet<String> = list.into_iter().map(str::to_owned).collect();
    s.insert(ns::DISCO_INFO.to_owned());
    s.insert(ns::DISCO_ITEMS.to_owned());
    s
}

/// Does `tests/<file>.rs` define `async fn <name>(`?
fn test_exists(path: &str) -> bool {
    let Some((file, name)) = path.split_once("::") else {
        return false;
    };
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(format!("{file}.rs"));
    std::fs::read_to_string(src)
        .map(|s| s.contains(&format!("async fn {name}(")))
        .unwrap_or(false)
}

#[tokio::test]
async fn advertised_features_are_exactly_what_the_modules_implement() {
    let srv = TestServer::start().await;
    srv.add_user("alice").await;
    let mut a = srv.login("alice", "a").await;
    let modules = &srv.server().modules;

    let server = features(&iq(&mut a, "<iq xmlns='jabber:client' type='get' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>").await);
    assert_eq!(server, with_disco(modules.server_features()));
    let account = features(&iq(&mut a, "<iq xmlns='jabber:client' type='get' to='alice@localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>").await);
    assert_eq!(account, with_disco(modules.account_features()));

    // Nothing advertised without a handler.
    let unhandled = modules.unhandled_features();
    assert!(
        unhandled.is_empty(),
        "advertised without an IQ handler or a HOOK_FEATURES row: {unhandled:?}"
    );
    // Each hook feature: its module is registered, advertises it, and its
    // proving test exists.
    for h in HOOK_FEATURES {
        let m = modules
            .iter()
            .find(|m| m.name() == h.module)
            .unwrap_or_else(|| {
                panic!(
                    "HOOK_FEATURES names module {} which is not registered",
                    h.module
                )
            });
        assert!(
            m.server_features().contains(&h.feature) || m.account_features().contains(&h.feature),
            "{} does not advertise {}",
            h.module,
            h.feature
        );
        assert!(
            test_exists(h.test),
            "test {} for {} not found",
            h.test,
            h.feature
        );
    }
    // The caps hash in the stream features covers the same list.
    let caps = a
        .features
        .as_ref()
        .and_then(|f| f.get_child("c", ns::CAPS))
        .and_then(|c| c.attr("ver"))
        .map(str::to_owned);
    assert_eq!(
        caps.as_deref(),
        Some(starling::modules::disco::caps_ver(srv.server()).as_str())
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn features_follow_the_configured_modules() {
    let on = TestServer::start().await;
    let off = TestServer::start_with(|c| c.offline.max_per_user = 0).await;
    for srv in [&on, &off] {
        srv.add_user("alice").await;
    }
    let mut a_on = on.login("alice", "a").await;
    let mut a_off = off.login("alice", "a").await;
    let q = "<iq xmlns='jabber:client' type='get' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>";
    let f_on = features(&iq(&mut a_on, q).await);
    let f_off = features(&iq(&mut a_off, q).await);
    assert!(f_on.contains(ns::OFFLINE));
    assert!(
        !f_off.contains(ns::OFFLINE),
        "no offline module, no msgoffline"
    );
    let diff: Vec<&String> = f_on.symmetric_difference(&f_off).collect();
    assert_eq!(diff, vec![ns::OFFLINE]);
    assert_ne!(
        starling::modules::disco::caps_ver(on.server()),
        starling::modules::disco::caps_ver(off.server())
    );
    // And without the module, messages to offline users bounce (RFC 6121).
    off.add_user("bob").await;
    a_off.send(&chat("bob@localhost", "x")).await.unwrap();
    let e = expect_message(&mut a_off).await;
    assert_eq!(error_condition(&e).as_deref(), Some("service-unavailable"));
    on.shutdown().await;
    off.shutdown().await;
}
