//! XEP-0199 XMPP Ping: the server answers pings addressed to it.

use async_trait::async_trait;

use super::{IqReply, IqRequest, Module};
use crate::server::Server;
use crate::stanza::StanzaError;
use crate::xml::ns;

pub struct Ping;

#[async_trait]
impl Module for Ping {
    fn name(&self) -> &'static str {
        "ping"
    }
    fn server_features(&self) -> Vec<&'static str> {
        vec![ns::PING]
    }
    fn iq_namespaces(&self) -> Vec<&'static str> {
        vec![ns::PING]
    }
    async fn handle_iq(&self, _server: &Server, req: IqRequest<'_>) -> IqReply {
        if req.is_set || !req.payload.is("ping", ns::PING) {
            return IqReply::Error(StanzaError::bad_request());
        }
        if req.to_server() || req.is_own_account() {
            IqReply::Result(None)
        } else {
            IqReply::Error(StanzaError::service_unavailable())
        }
    }
}
