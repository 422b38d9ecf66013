//! Private XML storage (XEP-0049, `jabber:iq:private`): an account stores
//! XML fragments under their namespaces (bookmarks, roster notes, client
//! preferences) and only that account can read them back.

use async_trait::async_trait;
use minidom::Element;

use super::{IqReply, IqRequest, Module};
use crate::server::Server;
use crate::stanza::StanzaError;
use crate::storage::PrivateStore;
use crate::xml::{ns, writer};

pub struct PrivateStorage;

/// Namespaces that cannot be stored: the stanza namespaces (their elements
/// would be stanzas) and this protocol's own.
pub fn is_reserved(namespace: &str) -> bool {
    namespace.is_empty()
        || namespace == ns::CLIENT
        || namespace == ns::SERVER
        || namespace == ns::PRIVATE
        || namespace == ns::STREAM
}

fn query(children: impl IntoIterator<Item = Element>) -> Element {
    Element::builder("query", ns::PRIVATE)
        .append_all(children)
        .build()
}

#[async_trait]
impl Module for PrivateStorage {
    fn name(&self) -> &'static str {
        "private"
    }

    fn server_features(&self) -> Vec<&'static str> {
        vec![ns::PRIVATE]
    }

    fn iq_namespaces(&self) -> Vec<&'static str> {
        vec![ns::PRIVATE]
    }

    async fn handle_iq(&self, server: &Server, req: IqRequest<'_>) -> IqReply {
        if !req.payload.is("query", ns::PRIVATE) {
            return IqReply::Error(StanzaError::bad_request());
        }
        if !req.is_own_account() {
            return IqReply::Error(
                StanzaError::forbidden().with_text("private data belongs to its owner only"),
            );
        }
        let owner = req.to.to_bare().to_string();
        let children: Vec<&Element> = req.payload.children().collect();
        let Some(first) = children.first() else {
            return IqReply::Error(
                StanzaError::not_acceptable()
                    .with_text("a child element qualified by its own namespace is required"),
            );
        };
        if let Some(bad) = children.iter().find(|c| is_reserved(&c.ns())) {
            return IqReply::Error(
                StanzaError::not_acceptable()
                    .with_text(format!("the namespace {:?} is reserved", bad.ns())),
            );
        }
        if !req.is_set {
            let namespace = first.ns();
            if children.iter().any(|c| c.ns() != namespace) {
                return IqReply::Error(
                    StanzaError::bad_request().with_text("one namespace per request"),
                );
            }
            return match server.store.get_private(&owner, &namespace).await {
                Ok(Some(xml)) => match xml.parse::<Element>() {
                    Ok(q) if q.is("query", ns::PRIVATE) => IqReply::Result(Some(q)),
                    _ => {
                        tracing::error!(user = %owner, namespace, "stored private data is not XML");
                        IqReply::Error(StanzaError::internal())
                    }
                },
                // Nothing stored: the request's element comes back as is.
                Ok(None) => IqReply::Result(Some(query(children.into_iter().cloned()))),
                Err(e) => {
                    tracing::error!(user = %owner, error = %e, "reading private data failed");
                    IqReply::Error(StanzaError::internal())
                }
            };
        }
        // A set: the elements of each namespace replace what was stored
        // under it (several elements of one namespace are kept together).
        let mut groups: Vec<(String, Vec<Element>)> = Vec::new();
        for c in children {
            let n = c.ns();
            match groups.iter_mut().find(|(g, _)| *g == n) {
                Some((_, v)) => v.push(c.clone()),
                None => groups.push((n, vec![c.clone()])),
            }
        }
        let max = server.config.private_storage.max_bytes;
        let mut items = Vec::with_capacity(groups.len());
        for (namespace, els) in groups {
            let xml = writer::serialize(&query(els));
            if xml.len() > max {
                tracing::info!(user = %owner, namespace, size = xml.len(), max, "private data too large; refused");
                return IqReply::Error(StanzaError::not_acceptable().with_text(format!(
                    "the data for {namespace} is larger than {max} bytes"
                )));
            }
            let Ok(xml) = String::from_utf8(xml) else {
                return IqReply::Error(StanzaError::internal());
            };
            items.push((namespace, xml));
        }
        let max_ns = server.config.private_storage.max_namespaces;
        match server
            .store
            .set_private(&owner, &items, i64::try_from(max_ns).unwrap_or(i64::MAX))
            .await
        {
            Ok(true) => IqReply::Result(None),
            Ok(false) => {
                tracing::info!(user = %owner, max_ns, "private storage namespace quota reached");
                IqReply::Error(StanzaError::policy_violation().with_text(format!(
                    "at most {max_ns} namespaces of private data per account"
                )))
            }
            Err(e) => {
                tracing::error!(user = %owner, error = %e, "storing private data failed");
                IqReply::Error(StanzaError::internal())
            }
        }
    }
}
