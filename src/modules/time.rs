//! XEP-0202 Entity Time of the server (always UTC).

use async_trait::async_trait;
use minidom::Element;

use super::{IqReply, IqRequest, Module};
use crate::server::Server;
use crate::stanza::{StanzaError, format_timestamp};
use crate::storage::now_micros;
use crate::xml::ns;

pub struct EntityTime;

#[async_trait]
impl Module for EntityTime {
    fn name(&self) -> &'static str {
        "time"
    }
    fn server_features(&self) -> Vec<&'static str> {
        vec![ns::TIME]
    }
    fn iq_namespaces(&self) -> Vec<&'static str> {
        vec![ns::TIME]
    }
    async fn handle_iq(&self, _server: &Server, req: IqRequest<'_>) -> IqReply {
        if !req.to_server() {
            return IqReply::Error(StanzaError::service_unavailable());
        }
        if req.is_set {
            return IqReply::Error(StanzaError::not_allowed());
        }
        let now = now_micros();
        let utc = format_timestamp(now - now % 1_000_000).replace(".000Z", "Z");
        let time = Element::builder("time", ns::TIME)
            .append(Element::builder("tzo", ns::TIME).append("+00:00").build())
            .append(Element::builder("utc", ns::TIME).append(utc).build())
            .build();
        IqReply::Result(Some(time))
    }
}
