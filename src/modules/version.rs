//! XEP-0092 Software Version of the server.

use async_trait::async_trait;
use minidom::Element;

use super::{IqReply, IqRequest, Module};
use crate::server::Server;
use crate::stanza::StanzaError;
use crate::xml::ns;

pub struct Version;

#[async_trait]
impl Module for Version {
    fn name(&self) -> &'static str {
        "version"
    }
    fn server_features(&self) -> Vec<&'static str> {
        vec![ns::VERSION]
    }
    fn iq_namespaces(&self) -> Vec<&'static str> {
        vec![ns::VERSION]
    }
    async fn handle_iq(&self, _server: &Server, req: IqRequest<'_>) -> IqReply {
        if !req.to_server() {
            return IqReply::Error(StanzaError::service_unavailable());
        }
        if req.is_set {
            return IqReply::Error(StanzaError::not_allowed());
        }
        let query = Element::builder("query", ns::VERSION)
            .append(
                Element::builder("name", ns::VERSION)
                    .append("Starling")
                    .build(),
            )
            .append(
                Element::builder("version", ns::VERSION)
                    .append(env!("CARGO_PKG_VERSION"))
                    .build(),
            )
            .append(
                Element::builder("os", ns::VERSION)
                    .append(std::env::consts::OS)
                    .build(),
            )
            .build();
        IqReply::Result(Some(query))
    }
}
