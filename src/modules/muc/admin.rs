//! What a room answers to IQs on the room JID: disco#info/#items, the
//! moderator and admin protocol (`muc#admin`: roles and affiliations), the
//! owner protocol (`muc#owner`: configuration, destruction), nickname
//! registration (`jabber:iq:register`) and archive queries (XEP-0313).

use jid::{BareJid, Jid};
use minidom::Element;

use super::archive::{run_metadata, run_query};
use super::form::{Form, FormBuilder};
use super::room::{AffEntry, Extra, Room};
use super::types::*;
use crate::modules::mam::query::{mam_ns, parse_query, query_form};
use crate::stanza::{StanzaError, name};
use crate::xml::ns;

/// Items in one admin request, at most.
const MAX_ITEMS: usize = 200;

fn feature(var: &str) -> Element {
    Element::builder("feature", ns::DISCO_INFO)
        .attr(name("var"), var)
        .build()
}

/// One requested change of an admin IQ set.
enum Change {
    Role {
        nick: String,
        role: Role,
        reason: Option<String>,
    },
    Affiliation {
        jid: BareJid,
        affiliation: Affiliation,
        nick: Option<String>,
        reason: Option<String>,
    },
}

impl Room {
    /// The requester's affiliation and, if it is in the room, its nick
    /// and role.
    fn requester(&self, from: &Jid) -> (Affiliation, Option<(String, Role)>) {
        let aff = self.affiliation_of(&from.to_bare());
        let occ = self.is_occupant(from).map(|o| (o.nick.clone(), o.role));
        (aff, occ)
    }

    /// May this requester see real JIDs (non-anonymous room, moderator,
    /// admin or owner)?
    pub(crate) fn sees_jids(&self, from: &Jid) -> bool {
        let (aff, occ) = self.requester(from);
        self.config.non_anonymous
            || aff >= Affiliation::Admin
            || occ.map(|(_, r)| r == Role::Moderator).unwrap_or(false)
    }

    pub(crate) fn disco_info(
        &self,
        from: &Jid,
        q: &Element,
    ) -> Result<Option<Element>, StanzaError> {
        if self.locked_until.is_some() && self.affiliation_of(&from.to_bare()) != Affiliation::Owner
        {
            return Err(StanzaError::item_not_found());
        }
        match q.attr("node") {
            None => {}
            Some("x-roomuser-item") => {
                // XEP-0045 section 7.12: the reserved nickname.
                let mut r =
                    Element::builder("query", ns::DISCO_INFO).attr(name("node"), "x-roomuser-item");
                if let Some(n) = self.reserved_nick(&from.to_bare()) {
                    r = r.append(
                        Element::builder("identity", ns::DISCO_INFO)
                            .attr(name("category"), "conference")
                            .attr(name("type"), "text")
                            .attr(name("name"), n)
                            .build(),
                    );
                }
                return Ok(Some(r.build()));
            }
            Some("http://jabber.org/protocol/muc#traffic") => {
                return Err(StanzaError::feature_not_implemented());
            }
            Some(_) => return Err(StanzaError::item_not_found()),
        }
        let label = if self.config.name.is_empty() {
            self.node.as_str()
        } else {
            self.config.name.as_str()
        };
        let mut b = Element::builder("query", ns::DISCO_INFO).append(
            Element::builder("identity", ns::DISCO_INFO)
                .attr(name("category"), "conference")
                .attr(name("type"), "text")
                .attr(name("name"), label)
                .build(),
        );
        let mut features: Vec<&str> = vec![
            ns::DISCO_INFO,
            ns::DISCO_ITEMS,
            ns::MUC,
            NS_MUC_STABLE_ID,
            NS_MUC_SELF_PING,
            NS_OCCUPANT_ID,
            NS_REGISTER,
            ns::PING,
        ];
        if self.config.voice_requests {
            features.push(NS_MUC_REQUEST);
        }
        if self.config.archive {
            features.extend([ns::MAM, NS_MAM_EXTENDED, ns::SID]);
        }
        features.extend(self.config.features());
        features.sort_unstable();
        for f in features {
            b = b.append(feature(f));
        }
        let occupants = self.occupants.len().to_string();
        let history = self.config.max_history_fetch.to_string();
        let mut info = FormBuilder::new("result", NS_MUC_ROOMINFO)
            .field(
                "muc#roomconfig_roomname",
                None,
                "Name",
                &[&self.config.name],
            )
            .field(
                "muc#roominfo_description",
                None,
                "Description",
                &[&self.config.description],
            )
            .field(
                "muc#roominfo_subject",
                None,
                "Subject",
                &[&self.subject.text],
            )
            .field(
                "muc#roominfo_occupants",
                None,
                "Number of occupants",
                &[&occupants],
            )
            .field(
                "muc#roomconfig_changesubject",
                None,
                "Occupants may change the subject",
                &[if self.config.change_subject { "1" } else { "0" }],
            )
            .field(
                "muc#roominfo_subjectmod",
                None,
                "The subject can be modified by participants",
                &[if self.config.change_subject { "1" } else { "0" }],
            )
            .field(
                "muc#maxhistoryfetch",
                None,
                "Maximum number of history messages",
                &[&history],
            )
            .field(
                "muc#roomconfig_allowinvites",
                None,
                "Occupants may invite",
                &[if self.config.allow_invites { "1" } else { "0" }],
            )
            .field(
                "muc#roomconfig_allowpm",
                None,
                "Who may send private messages",
                &[self.config.allow_pm.as_str()],
            );
        if !self.config.lang.is_empty() {
            info = info.field("muc#roominfo_lang", None, "Language", &[&self.config.lang]);
        }
        if self.config.non_anonymous {
            let owners = self.owners();
            let owners: Vec<&str> = owners.iter().map(|s| s.as_str()).collect();
            info = info.field("muc#roominfo_contactjid", None, "Contact", &owners);
        }
        Ok(Some(b.append(info.build()).build()))
    }

    /// Occupants are listed only to occupants (XEP-0045 section 6.5).
    pub(crate) fn disco_items(&self, from: &Jid, q: &Element) -> Element {
        let mut b = Element::builder("query", ns::DISCO_ITEMS);
        if let Some(n) = q.attr("node") {
            return b.attr(name("node"), n).build();
        }
        if self.is_occupant(from).is_some() {
            let mut nicks: Vec<&String> = self.occupants.keys().collect();
            nicks.sort();
            for n in nicks {
                b = b.append(
                    Element::builder("item", ns::DISCO_ITEMS)
                        .attr(name("jid"), self.occupant_jid(n))
                        .build(),
                );
            }
        }
        b.build()
    }

    // ----- muc#admin ------------------------------------------------------

    pub(crate) async fn admin_iq(
        &mut self,
        from: &Jid,
        q: &Element,
        is_set: bool,
    ) -> Result<Option<Element>, StanzaError> {
        if !q.is("query", ns::MUC_ADMIN) {
            return Err(StanzaError::bad_request());
        }
        if is_set {
            self.admin_set(from, q).await.map(|()| None)
        } else {
            self.admin_get(from, q).map(Some)
        }
    }

    fn admin_get(&self, from: &Jid, q: &Element) -> Result<Element, StanzaError> {
        let mut items = q.children().filter(|c| c.is("item", ns::MUC_ADMIN));
        let (Some(item), None) = (items.next(), items.next()) else {
            return Err(StanzaError::bad_request().with_text("ask for one list"));
        };
        let (aff, occ) = self.requester(from);
        let mut out = Element::builder("query", ns::MUC_ADMIN);
        match (item.attr("affiliation"), item.attr("role")) {
            (Some(a), None) => {
                let wanted = Affiliation::parse(a)
                    .filter(|a| *a != Affiliation::None)
                    .ok_or_else(|| StanzaError::bad_request().with_text("unknown affiliation"))?;
                let allowed = aff >= Affiliation::Admin
                    || (wanted == Affiliation::Member
                        && (self.config.non_anonymous && aff >= Affiliation::Member
                            || occ.as_ref().is_some_and(|(_, r)| {
                                self.config.get_member_list.iter().any(|x| x == r.as_str())
                            })));
                if !allowed {
                    return Err(StanzaError::forbidden());
                }
                for (j, e) in self
                    .affiliations
                    .iter()
                    .filter(|(_, e)| e.affiliation == wanted)
                {
                    let mut it = Element::builder("item", ns::MUC_ADMIN)
                        .attr(name("affiliation"), wanted.as_str())
                        .attr(name("jid"), j.to_string());
                    if let Some(n) = &e.nick
                        && wanted != Affiliation::Outcast
                    {
                        it = it.attr(name("nick"), n.as_str());
                    }
                    if let Some(r) = &e.reason {
                        it = it.append(
                            Element::builder("reason", ns::MUC_ADMIN)
                                .append(r.as_str())
                                .build(),
                        );
                    }
                    out = out.append(it.build());
                }
            }
            (None, Some(r)) => {
                let wanted = Role::parse(r)
                    .filter(|r| *r != Role::None)
                    .ok_or_else(|| StanzaError::bad_request().with_text("unknown role"))?;
                if occ.map(|(_, r)| r) != Some(Role::Moderator) {
                    return Err(StanzaError::forbidden());
                }
                let mut list: Vec<_> = self
                    .occupants
                    .values()
                    .filter(|o| o.role == wanted)
                    .collect();
                list.sort_by(|a, b| a.nick.cmp(&b.nick));
                for o in list {
                    let jid = o.primary().map(|s| s.jid_str.clone()).unwrap_or_default();
                    out = out.append(
                        Element::builder("item", ns::MUC_ADMIN)
                            .attr(name("affiliation"), self.affiliation_of(&o.bare).as_str())
                            .attr(name("jid"), jid)
                            .attr(name("nick"), o.nick.as_str())
                            .attr(name("role"), o.role.as_str())
                            .build(),
                    );
                }
            }
            _ => {
                return Err(
                    StanzaError::bad_request().with_text("give either a role or an affiliation")
                );
            }
        }
        Ok(out.build())
    }

    fn parse_changes(&self, q: &Element) -> Result<Vec<Change>, StanzaError> {
        let mut out = Vec::new();
        for item in q.children().filter(|c| c.is("item", ns::MUC_ADMIN)) {
            if out.len() >= MAX_ITEMS {
                return Err(StanzaError::policy_violation().with_text("too many items"));
            }
            let reason = item
                .get_child("reason", ns::MUC_ADMIN)
                .map(|r| r.text())
                .filter(|r| !r.is_empty());
            match (item.attr("role"), item.attr("affiliation")) {
                (Some(r), None) => {
                    let role = Role::parse(r)
                        .ok_or_else(|| StanzaError::bad_request().with_text("unknown role"))?;
                    let nick = item.attr("nick").ok_or_else(|| {
                        StanzaError::bad_request().with_text("role items need a nick")
                    })?;
                    out.push(Change::Role {
                        nick: nick.to_owned(),
                        role,
                        reason,
                    });
                }
                (None, Some(a)) => {
                    let affiliation = Affiliation::parse(a).ok_or_else(|| {
                        StanzaError::bad_request().with_text("unknown affiliation")
                    })?;
                    let jid = match (item.attr("jid"), item.attr("nick")) {
                        (Some(j), _) => Jid::new(j)
                            .map_err(|_| StanzaError::jid_malformed())?
                            .to_bare(),
                        // An affiliation by nick: the occupant's bare JID.
                        (None, Some(n)) => self
                            .occupants
                            .get(n)
                            .map(|o| o.bare.clone())
                            .ok_or_else(|| {
                                StanzaError::item_not_found().with_text("no such occupant")
                            })?,
                        (None, None) => {
                            return Err(StanzaError::bad_request()
                                .with_text("affiliation items need a jid"));
                        }
                    };
                    let nick = match item.attr("jid").and(item.attr("nick")) {
                        Some("") => Some(String::new()),
                        Some(n) if valid_nick(n, self.core.cfg.max_nick_chars) => {
                            Some(n.to_owned())
                        }
                        Some(_) => {
                            return Err(StanzaError::not_acceptable().with_text("invalid nick"));
                        }
                        None => None,
                    };
                    out.push(Change::Affiliation {
                        jid,
                        affiliation,
                        nick,
                        reason,
                    });
                }
                _ => {
                    return Err(StanzaError::bad_request()
                        .with_text("an item changes either a role or an affiliation"));
                }
            }
        }
        if out.is_empty() {
            return Err(StanzaError::bad_request().with_text("no items"));
        }
        Ok(out)
    }

    /// Check every change first; apply only if all are allowed.
    async fn admin_set(&mut self, from: &Jid, q: &Element) -> Result<(), StanzaError> {
        let changes = self.parse_changes(q)?;
        let (actor_aff, actor_occ) = self.requester(from);
        let actor_bare = from.to_bare();
        // Owners left after the affiliation changes (a room keeps one).
        let mut owners: Vec<BareJid> = self
            .affiliations
            .iter()
            .filter(|(_, e)| e.affiliation == Affiliation::Owner)
            .map(|(j, _)| j.clone())
            .collect();
        for c in &changes {
            match c {
                Change::Role { nick, role, .. } => {
                    let Some((_, actor_role)) = &actor_occ else {
                        return Err(StanzaError::forbidden()
                            .with_text("only moderators in the room change roles"));
                    };
                    if *actor_role != Role::Moderator {
                        return Err(StanzaError::forbidden());
                    }
                    let target = self.occupants.get(nick).ok_or_else(|| {
                        StanzaError::item_not_found().with_text("no such occupant")
                    })?;
                    let t_aff = self.affiliation_of(&target.bare);
                    match role {
                        Role::Moderator => {
                            if actor_aff < Affiliation::Admin {
                                return Err(StanzaError::forbidden()
                                    .with_text("only admins and owners grant moderator status"));
                            }
                        }
                        Role::None => {
                            if t_aff > actor_aff
                                || (t_aff >= Affiliation::Admin && actor_aff < Affiliation::Admin)
                            {
                                return Err(StanzaError::not_allowed().with_text(
                                    "you cannot kick someone with a higher affiliation",
                                ));
                            }
                        }
                        Role::Visitor | Role::Participant => {
                            if t_aff >= Affiliation::Admin {
                                return Err(StanzaError::not_allowed()
                                    .with_text("admins and owners keep voice and moderation"));
                            }
                            if target.role == Role::Moderator && actor_aff < Affiliation::Admin {
                                return Err(StanzaError::not_allowed()
                                    .with_text("only admins and owners revoke moderator status"));
                            }
                            if t_aff > actor_aff {
                                return Err(StanzaError::not_allowed());
                            }
                        }
                    }
                }
                Change::Affiliation {
                    jid, affiliation, ..
                } => {
                    if actor_aff < Affiliation::Admin {
                        return Err(StanzaError::forbidden()
                            .with_text("only admins and owners change affiliations"));
                    }
                    let cur = self
                        .affiliations
                        .get(jid)
                        .map(|e| e.affiliation)
                        .unwrap_or(Affiliation::None);
                    if (*affiliation >= Affiliation::Admin || cur >= Affiliation::Admin)
                        && actor_aff != Affiliation::Owner
                    {
                        return Err(StanzaError::not_allowed()
                            .with_text("only owners change admins and owners"));
                    }
                    if *affiliation == Affiliation::Outcast && *jid == actor_bare {
                        return Err(StanzaError::conflict().with_text("you cannot ban yourself"));
                    }
                    if cur == Affiliation::Owner && *affiliation != Affiliation::Owner {
                        owners.retain(|o| o != jid);
                        if owners.is_empty() {
                            return Err(StanzaError::conflict()
                                .with_text("a room needs at least one owner"));
                        }
                    }
                    if *affiliation == Affiliation::Owner && !owners.contains(jid) {
                        owners.push(jid.clone());
                    }
                    if *affiliation != Affiliation::None
                        && !self.affiliations.contains_key(jid)
                        && self.affiliations.len() >= self.core.cfg.max_affiliations
                    {
                        return Err(StanzaError::resource_constraint()
                            .with_text("the affiliation lists of this room are full"));
                    }
                }
            }
        }
        let actor_nick = actor_occ.map(|(n, _)| n);
        for c in changes {
            match c {
                Change::Role { nick, role, reason } => {
                    if role == Role::None {
                        let extra = Extra {
                            actor: actor_nick.clone(),
                            reason,
                            ..Default::default()
                        };
                        self.remove_occupant(&nick, &[status::KICKED], extra).await;
                    } else {
                        self.set_role(&nick, role, actor_nick.clone(), reason);
                    }
                }
                Change::Affiliation {
                    jid,
                    affiliation,
                    nick,
                    reason,
                } => {
                    self.apply_affiliation(jid, affiliation, nick, reason, actor_nick.clone())
                        .await;
                }
            }
        }
        Ok(())
    }

    /// Set an affiliation (already allowed), persist it, and update or
    /// remove the occupants it concerns.
    pub(crate) async fn apply_affiliation(
        &mut self,
        jid: BareJid,
        affiliation: Affiliation,
        nick: Option<String>,
        reason: Option<String>,
        actor: Option<String>,
    ) {
        let cur = self.affiliations.get(&jid).cloned();
        let cur_aff = cur
            .as_ref()
            .map(|e| e.affiliation)
            .unwrap_or(Affiliation::None);
        if affiliation == Affiliation::None {
            self.affiliations.remove(&jid);
        } else {
            let nick = match nick {
                Some(n) if n.is_empty() => None,
                Some(n) => Some(n),
                None if affiliation == Affiliation::Outcast => None,
                None => cur.and_then(|e| e.nick),
            };
            self.affiliations.insert(
                jid.clone(),
                AffEntry {
                    affiliation,
                    nick,
                    reason: reason.clone(),
                },
            );
        }
        self.persist_affiliation(&jid).await;
        // The occupants of this user (or of this domain, for a domain).
        let domain_wide = jid.node().is_none();
        let nicks: Vec<String> = self
            .occupants
            .values()
            .filter(|o| o.bare == jid || (domain_wide && o.bare.domain() == jid.domain()))
            .map(|o| o.nick.clone())
            .collect();
        let extra = Extra {
            actor: actor.clone(),
            reason: reason.clone(),
            ..Default::default()
        };
        for n in &nicks {
            let eff = self.affiliation_of(&self.occupants[n].bare);
            if eff == Affiliation::Outcast {
                self.remove_occupant(n, &[status::BANNED], extra.clone())
                    .await;
                continue;
            }
            if self.config.members_only && eff < Affiliation::Member {
                self.remove_occupant(n, &[status::AFFILIATION_REMOVED], extra.clone())
                    .await;
                continue;
            }
            let role = self.occupants[n].role;
            let new_role = if eff >= Affiliation::Admin {
                Role::Moderator
            } else if cur_aff >= Affiliation::Admin {
                default_role(eff, self.config.moderated)
            } else if eff == Affiliation::Member && role == Role::Visitor {
                Role::Participant
            } else {
                role
            };
            if let Some(o) = self.occupants.get_mut(n) {
                o.role = new_role;
            }
            self.invalidate(n);
            let v = self.view(&self.occupants[n]);
            self.announce(&v, false, &[], &[], &extra, &[], true);
            // A new moderator of a semi-anonymous room learns the real JIDs.
            if new_role == Role::Moderator && role != Role::Moderator && !self.config.non_anonymous
            {
                let sessions: Vec<jid::FullJid> = self.occupants[n]
                    .sessions
                    .iter()
                    .map(|s| s.jid.clone())
                    .collect();
                for s in sessions {
                    self.send_roster(n, &s);
                }
            }
        }
        // SHOULD: a new member of a members-only room who is not there gets
        // an invitation.
        if nicks.is_empty()
            && self.config.members_only
            && affiliation == Affiliation::Member
            && cur_aff == Affiliation::None
            && jid.node().is_some()
        {
            let mut x = Element::builder("x", ns::MUC_USER).append(
                Element::builder("invite", ns::MUC_USER)
                    .attr(name("from"), self.jid_str.as_str())
                    .build(),
            );
            if self.config.password_protected {
                x = x.append(
                    Element::builder("password", ns::MUC_USER)
                        .append(self.config.password.as_str())
                        .build(),
                );
            }
            let msg = crate::stanza::build(
                "message",
                Some(&self.jid_str),
                Some(&jid.to_string()),
                None,
                Some(&crate::stanza::new_id()),
            )
            .append(x.build())
            .build();
            self.send_direct(msg);
        }
    }

    // ----- muc#owner ------------------------------------------------------

    pub(crate) async fn owner_iq(
        &mut self,
        from: &Jid,
        q: &Element,
        is_set: bool,
    ) -> Result<Option<Element>, StanzaError> {
        if !q.is("query", ns::MUC_OWNER) {
            return Err(StanzaError::bad_request());
        }
        if self.affiliation_of(&from.to_bare()) != Affiliation::Owner {
            return Err(StanzaError::forbidden().with_text("only owners configure the room"));
        }
        if !is_set {
            let owners = self.owners();
            let admins = self.list_of(Affiliation::Admin);
            let form = self.config.to_form(&owners, &admins, &self.core.cfg);
            return Ok(Some(
                Element::builder("query", ns::MUC_OWNER)
                    .append(form)
                    .build(),
            ));
        }
        if let Some(d) = q.get_child("destroy", ns::MUC_OWNER) {
            let alt = match d.attr("jid") {
                Some(j) => Some(
                    Jid::new(j)
                        .map_err(|_| {
                            StanzaError::jid_malformed().with_text("invalid alternate venue")
                        })?
                        .to_string(),
                ),
                None => None,
            };
            let reason = d.get_child("reason", ns::MUC_OWNER).map(|r| r.text());
            let password = d.get_child("password", ns::MUC_OWNER).map(|r| r.text());
            self.destroy(alt.as_deref(), reason.as_deref(), password.as_deref())
                .await;
            return Ok(None);
        }
        let Some(x) = q.get_child("x", ns::DATA_FORMS) else {
            return Err(StanzaError::bad_request().with_text("expected a form or <destroy/>"));
        };
        let form = Form::parse(x).ok_or_else(StanzaError::bad_request)?;
        match form.typ.as_str() {
            "cancel" => {
                if self.locked_until.is_some() {
                    tracing::info!(room = %self.jid, "initial configuration cancelled; destroyed");
                    self.destroy(None, None, None).await;
                }
                Ok(None)
            }
            "submit" => {
                self.configure(from, &form).await?;
                Ok(None)
            }
            _ => Err(StanzaError::bad_request().with_text("the form must be submitted")),
        }
    }

    /// Apply a submitted configuration form (an empty one accepts the
    /// defaults: an instant room).
    async fn configure(&mut self, from: &Jid, form: &Form) -> Result<(), StanzaError> {
        let old = self.config.clone();
        let mut new = old.clone();
        let (owners, admins) = new.apply_form(form, &self.core.cfg)?;
        let was_locked = self.locked_until.is_some();
        self.config = new;
        let actor = self.is_occupant(from).map(|o| o.nick.clone());
        // Owner and admin lists given in full.
        for (list, aff) in [(owners, Affiliation::Owner), (admins, Affiliation::Admin)] {
            let Some(list) = list else { continue };
            let current: Vec<BareJid> = self
                .affiliations
                .iter()
                .filter(|(_, e)| e.affiliation == aff)
                .map(|(j, _)| j.clone())
                .collect();
            for j in &list {
                if !current.contains(j) {
                    self.apply_affiliation(j.clone(), aff, None, None, actor.clone())
                        .await;
                }
            }
            for j in current {
                if !list.contains(&j) {
                    self.apply_affiliation(j, Affiliation::None, None, None, actor.clone())
                        .await;
                }
            }
        }
        if !old.persistent && self.config.persistent {
            if !was_locked {
                self.persist_all().await;
            }
        } else if old.persistent && !self.config.persistent {
            self.unpersist().await;
        } else if self.persisted {
            self.persist_room().await;
        }
        if was_locked {
            self.unlock().await;
        } else {
            self.publish_listing();
        }
        if self.config.members_only && !old.members_only {
            let outsiders: Vec<String> = self
                .occupants
                .values()
                .filter(|o| self.affiliation_of(&o.bare) < Affiliation::Member)
                .map(|o| o.nick.clone())
                .collect();
            for n in outsiders {
                self.remove_occupant(&n, &[status::MEMBERS_ONLY_REMOVED], Extra::default())
                    .await;
            }
        }
        if !was_locked && self.config != old {
            let mut codes = vec![status::CONFIG_CHANGED];
            if self.config.archive != old.archive {
                codes.push(if self.config.archive {
                    status::LOGGING_ON
                } else {
                    status::LOGGING_OFF
                });
            }
            if self.config.non_anonymous != old.non_anonymous {
                codes.push(if self.config.non_anonymous {
                    status::NOW_NON_ANONYMOUS
                } else {
                    status::NOW_SEMI_ANONYMOUS
                });
            }
            self.room_notice(&codes);
        }
        if self.config.moderated != old.moderated || self.config.non_anonymous != old.non_anonymous
        {
            let nicks: Vec<String> = self.occupants.keys().cloned().collect();
            for n in nicks {
                self.invalidate(&n);
            }
        }
        tracing::info!(room = %self.jid, "room configured");
        Ok(())
    }

    // ----- jabber:iq:register ---------------------------------------------

    pub(crate) async fn register_iq(
        &mut self,
        from: &Jid,
        q: &Element,
        is_set: bool,
    ) -> Result<Option<Element>, StanzaError> {
        if !q.is("query", NS_REGISTER) {
            return Err(StanzaError::bad_request());
        }
        let bare = from.to_bare();
        let aff = self.affiliation_of(&bare);
        if aff == Affiliation::Outcast {
            return Err(StanzaError::forbidden().with_text("you are banned from this room"));
        }
        let registered = self
            .affiliations
            .get(&bare)
            .is_some_and(|e| e.affiliation >= Affiliation::Member);
        if !is_set {
            if registered {
                let mut r = Element::builder("query", NS_REGISTER)
                    .append(Element::bare("registered", NS_REGISTER));
                if let Some(n) = self.reserved_nick(&bare) {
                    r = r.append(Element::builder("username", NS_REGISTER).append(n).build());
                }
                return Ok(Some(r.build()));
            }
            if self.config.members_only {
                return Err(
                    StanzaError::not_allowed().with_text("only admins add members to this room")
                );
            }
            let form = FormBuilder::new("form", NS_MUC_REGISTER)
                .title("Register with the room")
                .instructions("Choose the nickname to reserve in this room.")
                .field(
                    "muc#register_roomnick",
                    Some("text-single"),
                    "Nickname",
                    &[],
                )
                .build();
            return Ok(Some(
                Element::builder("query", NS_REGISTER)
                    .append(
                        Element::builder("instructions", NS_REGISTER)
                            .append("Choose the nickname to reserve in this room.")
                            .build(),
                    )
                    .append(form)
                    .build(),
            ));
        }
        if q.has_child("remove", NS_REGISTER) {
            match self.affiliations.get(&bare).map(|e| e.affiliation) {
                Some(Affiliation::Member) => {
                    self.apply_affiliation(bare, Affiliation::None, None, None, None)
                        .await;
                    return Ok(None);
                }
                Some(_) => {
                    return Err(StanzaError::not_allowed()
                        .with_text("admins and owners are not unregistered this way"));
                }
                None => return Err(StanzaError::item_not_found()),
            }
        }
        let nick = match Form::find(q) {
            Some(f) => {
                if f.typ == "cancel" {
                    return Ok(None);
                }
                if f.form_type().is_some_and(|t| t != NS_MUC_REGISTER) {
                    return Err(StanzaError::bad_request().with_text("not a muc#register form"));
                }
                f.value("muc#register_roomnick").map(str::to_owned)
            }
            None => q.get_child("username", NS_REGISTER).map(|u| u.text()),
        };
        let Some(nick) = nick else {
            return Err(StanzaError::bad_request().with_text("a nickname is required"));
        };
        // The nick must be a valid resource (resourceprep) and allowed.
        let prepped = jid::FullJid::new(&format!("{}/{nick}", self.jid_str))
            .map(|j| j.resource().as_str().to_owned())
            .map_err(|_| StanzaError::not_acceptable().with_text("invalid nickname"))?;
        if !valid_nick(&prepped, self.core.cfg.max_nick_chars) {
            return Err(StanzaError::not_acceptable().with_text("invalid nickname"));
        }
        if self.affiliations.iter().any(|(j, e)| {
            *j != bare
                && e.affiliation != Affiliation::Outcast
                && e.nick.as_deref() == Some(&prepped)
        }) || self.occupants.get(&prepped).is_some_and(|o| o.bare != bare)
        {
            return Err(StanzaError::conflict().with_text("this nickname is taken"));
        }
        if registered {
            let aff = self.affiliations[&bare].affiliation;
            self.apply_affiliation(bare, aff, Some(prepped), None, None)
                .await;
            return Ok(None);
        }
        if self.config.members_only {
            return Err(
                StanzaError::not_allowed().with_text("only admins add members to this room")
            );
        }
        self.apply_affiliation(bare, Affiliation::Member, Some(prepped), None, None)
            .await;
        Ok(None)
    }

    // ----- XEP-0313 -------------------------------------------------------

    /// May this JID read the archive? Open rooms: anyone not banned;
    /// password-protected rooms: occupants and affiliated users;
    /// members-only rooms: members, admins, owners (XEP-0313 section 6.1.3).
    fn may_read_archive(&self, from: &Jid) -> bool {
        let aff = self.affiliation_of(&from.to_bare());
        if aff == Affiliation::Outcast {
            return false;
        }
        let occupant = self.is_occupant(from).is_some();
        if self.config.members_only {
            return aff >= Affiliation::Member;
        }
        if self.config.password_protected {
            return occupant || aff >= Affiliation::Member;
        }
        true
    }

    /// Ok(Some(form)): answer with the query form; Ok(None): answered by a
    /// task of its own.
    pub(crate) fn mam_iq(
        &mut self,
        iq: &Element,
        from: &Jid,
        q: &Element,
        is_set: bool,
    ) -> Result<Option<Element>, StanzaError> {
        if !self.config.archive {
            return Err(StanzaError::service_unavailable().with_text("this room keeps no archive"));
        }
        if !self.may_read_archive(from) {
            return Err(StanzaError::forbidden().with_text("you may not read this room's archive"));
        }
        let Some(qns) = mam_ns(q) else {
            return Err(StanzaError::bad_request());
        };
        let server = self.server.clone();
        let room = self.jid_str.clone();
        let iq = iq.clone();
        if !is_set && q.name() == "metadata" {
            self.server
                .tasks
                .spawn(async move { run_metadata(server, room, iq).await });
            return Ok(None);
        }
        if q.name() != "query" {
            return Err(StanzaError::bad_request());
        }
        if !is_set {
            return Ok(Some(query_form(qns, false)));
        }
        let mq = parse_query(q)?;
        let show = self.sees_jids(from);
        self.server
            .tasks
            .spawn(async move { run_query(server, room, iq, mq, show).await });
        Ok(None)
    }
}
