//! Multi-user chat (XEP-0045) at `<subdomain>.<domain>` for every local
//! domain, with room archives (XEP-0313), occupant ids (XEP-0421) and the
//! self-ping optimisation (XEP-0410).
//!
//! - [`service`]: the service of one domain (disco of the service, room
//!   listing) and the table of live rooms;
//! - [`room`]: one actor per live room (its own task, a bounded mailbox),
//!   the occupant use cases and the fan-out;
//! - [`admin`]: roles, affiliations, configuration, registration, archive
//!   access;
//! - [`archive`]: room archives on the server's message archive
//!   (src/modules/mam), history on join, XEP-0313 queries;
//! - [`roomconfig`] and [`form`]: the room configuration form (XEP-0004).
//!
//! Joining without `<x xmlns='http://jabber.org/protocol/muc'/>` (the old
//! groupchat 1.0 protocol, or a client that lost track) is accepted as a
//! join, but no discussion history is sent (the subject is); an occupant
//! sending it again just updates its presence.

// Stanza errors are built on rare paths; boxing them everywhere would cost
// more clarity than the few bytes of stack it saves.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod archive;
pub mod form;
pub mod room;
pub mod roomconfig;
pub mod service;
pub mod types;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::Module;
use crate::server::Server;
use crate::sessions::Session;
use service::{MucService, ServiceCore};

/// The module: registers one service per local domain at start, and tells
/// rooms when a local session ends.
#[derive(Default)]
pub struct Muc {
    services: Mutex<Vec<Arc<ServiceCore>>>,
}

impl Muc {
    pub fn new() -> Self {
        Self::default()
    }

    /// The running services (for tests and metrics).
    pub fn services(&self) -> Vec<Arc<ServiceCore>> {
        self.services
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[async_trait]
impl Module for Muc {
    fn name(&self) -> &'static str {
        "muc"
    }

    fn start(&self, server: &Server) {
        let cfg = &server.config;
        if !cfg.muc.enabled {
            return;
        }
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        for domain in cfg.muc_domains() {
            let core = ServiceCore::new(domain.clone(), cfg.muc.clone());
            server.register_service(&domain, Arc::new(MucService { core: core.clone() }));
            tracing::info!(%domain, "multi-user chat service started");
            services.push(core);
        }
    }

    async fn on_session_closed(&self, server: &Server, session: &Arc<Session>) {
        for core in self.services() {
            core.session_closed(server, &session.jid, session.id).await;
        }
    }
}
