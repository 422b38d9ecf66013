//! XEP-0030 Service Discovery for the server and for accounts, and the
//! server's XEP-0115 entity capabilities (offered in stream features).

use async_trait::async_trait;
use base64::Engine;
use minidom::Element;
use sha1::Digest;

use super::{IqReply, IqRequest, Module};
use crate::server::Server;
use crate::stanza::{StanzaError, name};
use crate::storage::AccountStore;
use crate::xml::ns;

/// The caps node of Starling (XEP-0115 `node`).
pub const CAPS_NODE: &str = "https://starling.im";

pub struct Disco;

fn identity(category: &str, typ: &str, label: Option<&str>) -> Element {
    let mut b = Element::builder("identity", ns::DISCO_INFO)
        .attr(name("category"), category)
        .attr(name("type"), typ);
    if let Some(n) = label {
        b = b.attr(name("name"), n);
    }
    b.build()
}

fn feature(var: &str) -> Element {
    Element::builder("feature", ns::DISCO_INFO)
        .attr(name("var"), var)
        .build()
}

/// The server's features, sorted (including disco's own).
pub fn server_feature_list(server: &Server) -> Vec<&'static str> {
    let mut f = server.modules.server_features();
    f.extend([ns::DISCO_INFO, ns::DISCO_ITEMS]);
    f.sort_unstable();
    f.dedup();
    f
}

/// XEP-0115 section 5.1 verification string of the server's disco#info.
pub fn caps_ver(server: &Server) -> String {
    let mut s = String::from("server/im//Starling<");
    for f in server_feature_list(server) {
        s.push_str(f);
        s.push('<');
    }
    base64::engine::general_purpose::STANDARD.encode(sha1::Sha1::digest(s.as_bytes()))
}

/// The `<c/>` stream feature (XEP-0115 section 6.3).
pub fn caps_element(server: &Server) -> Element {
    Element::builder("c", ns::CAPS)
        .attr(name("hash"), "sha-1")
        .attr(name("node"), CAPS_NODE)
        .attr(name("ver"), caps_ver(server))
        .build()
}

#[async_trait]
impl Module for Disco {
    fn name(&self) -> &'static str {
        "disco"
    }
    fn server_features(&self) -> Vec<&'static str> {
        vec![ns::DISCO_INFO, ns::DISCO_ITEMS]
    }
    fn iq_namespaces(&self) -> Vec<&'static str> {
        vec![ns::DISCO_INFO, ns::DISCO_ITEMS]
    }
    async fn handle_iq(&self, server: &Server, req: IqRequest<'_>) -> IqReply {
        if req.is_set {
            return IqReply::Error(StanzaError::not_allowed());
        }
        let node = req.payload.attr("node");
        let info = req.payload.is("query", ns::DISCO_INFO);
        let items = req.payload.is("query", ns::DISCO_ITEMS);
        if !info && !items {
            return IqReply::Error(StanzaError::bad_request());
        }
        if req.to_server() {
            if info {
                if let Some(n) = node
                    && n != format!("{CAPS_NODE}#{}", caps_ver(server))
                {
                    return IqReply::Error(StanzaError::item_not_found());
                }
                let mut q = Element::builder("query", ns::DISCO_INFO);
                if let Some(n) = node {
                    q = q.attr(name("node"), n);
                }
                q = q.append(identity("server", "im", Some("Starling")));
                for f in server_feature_list(server) {
                    q = q.append(feature(f));
                }
                return IqReply::Result(Some(q.build()));
            }
            if node.is_some() {
                return IqReply::Error(StanzaError::item_not_found());
            }
            let mut q = Element::builder("query", ns::DISCO_ITEMS);
            let domain = req.to.domain().as_str();
            for (jid, label) in server.service_items(domain) {
                q = q.append(
                    Element::builder("item", ns::DISCO_ITEMS)
                        .attr(name("jid"), jid)
                        .attr(name("name"), label)
                        .build(),
                );
            }
            return IqReply::Result(Some(q.build()));
        }
        // An account (bare JID).
        let to = req.to.to_bare();
        let user = to.node().map(|n| n.as_str()).unwrap_or("");
        let exists = req.is_own_account()
            || server
                .store
                .account_exists(to.domain().as_str(), user)
                .await
                .unwrap_or(false);
        if !exists {
            return IqReply::Error(StanzaError::service_unavailable());
        }
        if info {
            if node.is_some() {
                return IqReply::Error(StanzaError::item_not_found());
            }
            let mut q = Element::builder("query", ns::DISCO_INFO).append(identity(
                "account",
                "registered",
                None,
            ));
            let mut features = server.modules.account_features();
            features.extend([ns::DISCO_INFO, ns::DISCO_ITEMS]);
            features.sort_unstable();
            features.dedup();
            for f in features {
                q = q.append(feature(f));
            }
            IqReply::Result(Some(q.build()))
        } else {
            let mut q = Element::builder("query", ns::DISCO_ITEMS);
            if let Some(n) = node {
                q = q.attr(name("node"), n);
            }
            IqReply::Result(Some(q.build()))
        }
    }
}
