//! vCard-temp (XEP-0054): each account stores one vCard, which its owner
//! sets and anyone can read through the account's bare JID. Avatar hashes
//! in presence (XEP-0153, `vcard-temp:x:update`) are routed untouched.

use async_trait::async_trait;
use minidom::Element;

use super::{IqReply, IqRequest, Module};
use crate::server::Server;
use crate::stanza::StanzaError;
use crate::storage::VCardStore;
use crate::xml::{ns, writer};

pub struct VCard;

fn empty_vcard() -> Element {
    Element::builder("vCard", ns::VCARD).build()
}

#[async_trait]
impl Module for VCard {
    fn name(&self) -> &'static str {
        "vcard"
    }

    fn server_features(&self) -> Vec<&'static str> {
        vec![ns::VCARD]
    }

    fn account_features(&self) -> Vec<&'static str> {
        vec![ns::VCARD]
    }

    fn iq_namespaces(&self) -> Vec<&'static str> {
        vec![ns::VCARD]
    }

    async fn handle_iq(&self, server: &Server, req: IqRequest<'_>) -> IqReply {
        if !req.payload.is("vCard", ns::VCARD) {
            return IqReply::Error(StanzaError::bad_request());
        }
        if req.to_server() {
            // The server itself has no vCard.
            return IqReply::Error(if req.is_set {
                StanzaError::not_allowed()
            } else {
                StanzaError::service_unavailable()
            });
        }
        let owner = req.to.to_bare().to_string();
        if req.is_set {
            // Only the owner, to their bare JID or without `to` (3.2).
            if !req.is_own_account() {
                return IqReply::Error(
                    StanzaError::forbidden().with_text("only the owner may change a vCard"),
                );
            }
            let empty =
                req.payload.children().next().is_none() && req.payload.text().trim().is_empty();
            if empty {
                // An empty vCard removes it.
                return match server.store.delete_vcard(&owner).await {
                    Ok(_) => IqReply::Result(None),
                    Err(e) => {
                        tracing::error!(user = %owner, error = %e, "deleting a vCard failed");
                        IqReply::Error(StanzaError::internal())
                    }
                };
            }
            let xml = writer::serialize(req.payload);
            let max = server.config.vcard.max_bytes;
            if xml.len() > max {
                tracing::info!(user = %owner, size = xml.len(), max, "vCard too large; refused");
                return IqReply::Error(
                    StanzaError::not_acceptable()
                        .with_text(format!("the vCard is larger than {max} bytes")),
                );
            }
            let Ok(xml) = String::from_utf8(xml) else {
                return IqReply::Error(StanzaError::internal());
            };
            return match server.store.set_vcard(&owner, &xml).await {
                Ok(()) => IqReply::Result(None),
                Err(e) => {
                    tracing::error!(user = %owner, error = %e, "storing a vCard failed");
                    IqReply::Error(StanzaError::internal())
                }
            };
        }
        let stored = match server.store.get_vcard(&owner).await {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(user = %owner, error = %e, "reading a vCard failed");
                return IqReply::Error(StanzaError::internal());
            }
        };
        let vcard = stored.and_then(|x| match x.parse::<Element>() {
            Ok(el) if el.is("vCard", ns::VCARD) => Some(el),
            _ => {
                tracing::error!(user = %owner, "stored vCard is not a vCard; ignored");
                None
            }
        });
        match vcard {
            Some(v) => IqReply::Result(Some(v)),
            // Section 3.1: one's own missing vCard is an empty one.
            None if req.is_own_account() => IqReply::Result(Some(empty_vcard())),
            // Section 3.3: the same error as for a user who does not exist.
            None => IqReply::Error(StanzaError::service_unavailable()),
        }
    }
}
