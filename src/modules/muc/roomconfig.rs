//! Room configuration (XEP-0045 section 10.2): the settings of a room, the
//! `muc#roomconfig` form an owner fills in, and the `muc#roominfo` result
//! and `muc_*` features of disco#info.

use jid::BareJid;
use minidom::Element;
use serde::{Deserialize, Serialize};

use super::form::{Form, FormBuilder};
use super::types::{NS_MUC_ROOMCONFIG, Role};
use crate::config::MucConfig;
use crate::stanza::StanzaError;

/// Who may send private messages (`muc#roomconfig_allowpm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllowPm {
    Anyone,
    Participants,
    Moderators,
    None,
}

impl AllowPm {
    pub fn as_str(self) -> &'static str {
        match self {
            AllowPm::Anyone => "anyone",
            AllowPm::Participants => "participants",
            AllowPm::Moderators => "moderators",
            AllowPm::None => "none",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "anyone" => AllowPm::Anyone,
            "participants" => AllowPm::Participants,
            "moderators" => AllowPm::Moderators,
            "none" => AllowPm::None,
            _ => return None,
        })
    }
    /// May an occupant with this role send private messages?
    pub fn allows(self, role: Role) -> bool {
        match self {
            AllowPm::Anyone => role >= Role::Visitor,
            AllowPm::Participants => role >= Role::Participant,
            AllowPm::Moderators => role >= Role::Moderator,
            AllowPm::None => false,
        }
    }
}

/// The owner and admin lists a configuration form sets (None: not in the form).
pub type ListChanges = (Option<Vec<BareJid>>, Option<Vec<BareJid>>);

/// The configuration of one room.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RoomConfig {
    pub name: String,
    pub description: String,
    pub lang: String,
    pub persistent: bool,
    pub public: bool,
    pub members_only: bool,
    pub moderated: bool,
    pub password_protected: bool,
    pub password: String,
    /// Real JIDs visible to everyone (non-anonymous) or only to moderators.
    pub non_anonymous: bool,
    /// 0: no room limit (the service limit still applies).
    pub max_users: u32,
    /// Participants (not only moderators) may change the subject.
    pub change_subject: bool,
    /// Members may invite others (in members-only rooms, adding them).
    pub allow_invites: bool,
    pub allow_pm: AllowPm,
    /// Roles whose presence is broadcast.
    pub presence_broadcast: Vec<String>,
    /// Roles that may retrieve the member list.
    pub get_member_list: Vec<String>,
    /// Messages are archived (MAM on the room JID, history on join).
    pub archive: bool,
    /// History messages sent on join at most (`muc#maxhistoryfetch`).
    pub max_history_fetch: u32,
    /// Visitors may ask for voice (XEP-0045 section 7.13).
    pub voice_requests: bool,
}

impl Default for RoomConfig {
    fn default() -> Self {
        RoomConfig::new(&MucConfig::default())
    }
}

fn all_roles() -> Vec<String> {
    vec!["moderator".into(), "participant".into(), "visitor".into()]
}

impl RoomConfig {
    /// The configuration of a new room.
    pub fn new(svc: &MucConfig) -> Self {
        RoomConfig {
            name: String::new(),
            description: String::new(),
            lang: String::new(),
            persistent: svc.persistent_by_default,
            public: svc.public_by_default,
            members_only: false,
            moderated: false,
            password_protected: false,
            password: String::new(),
            non_anonymous: false,
            max_users: svc.default_max_users,
            change_subject: false,
            allow_invites: false,
            allow_pm: AllowPm::Anyone,
            presence_broadcast: all_roles(),
            get_member_list: all_roles(),
            archive: svc.archive_by_default,
            max_history_fetch: svc.max_history as u32,
            voice_requests: true,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }

    /// Read a stored configuration; unknown or missing keys take defaults.
    pub fn from_json(s: &str, svc: &MucConfig) -> Self {
        match serde_json::from_str::<serde_json::Value>(s) {
            Ok(v) => {
                let mut base = serde_json::to_value(RoomConfig::new(svc)).unwrap_or_default();
                if let (Some(b), Some(o)) = (base.as_object_mut(), v.as_object()) {
                    for (k, v) in o {
                        b.insert(k.clone(), v.clone());
                    }
                }
                serde_json::from_value(base).unwrap_or_else(|e| {
                    tracing::error!(error = %e, "stored room configuration is invalid; using defaults");
                    RoomConfig::new(svc)
                })
            }
            Err(e) => {
                tracing::error!(error = %e, "stored room configuration is not JSON; using defaults");
                RoomConfig::new(svc)
            }
        }
    }

    pub fn broadcasts(&self, role: Role) -> bool {
        self.presence_broadcast.iter().any(|r| r == role.as_str())
    }

    /// The effective occupant limit.
    pub fn occupant_limit(&self, svc: &MucConfig) -> usize {
        if self.max_users == 0 {
            svc.max_users_limit as usize
        } else {
            self.max_users.min(svc.max_users_limit) as usize
        }
    }

    /// The `muc#roomconfig` form with the current values.
    pub fn to_form(&self, owners: &[String], admins: &[String], svc: &MucConfig) -> Element {
        let roles = [
            ("moderator", "Moderator"),
            ("participant", "Participant"),
            ("visitor", "Visitor"),
        ];
        let max_users = if self.max_users == 0 {
            "none".to_string()
        } else {
            self.max_users.to_string()
        };
        let mut max_opts: Vec<String> = [10u32, 20, 30, 50, 100, 200, 500, 1000, 2000, 5000]
            .iter()
            .filter(|v| **v <= svc.max_users_limit)
            .map(|v| v.to_string())
            .collect();
        if self.max_users != 0 && !max_opts.contains(&max_users) {
            max_opts.push(max_users.clone());
        }
        let max_opts: Vec<(&str, &str)> = max_opts
            .iter()
            .map(|s| (s.as_str(), s.as_str()))
            .chain(std::iter::once(("none", "No limit")))
            .collect();
        let pb: Vec<&str> = self.presence_broadcast.iter().map(|s| s.as_str()).collect();
        let gml: Vec<&str> = self.get_member_list.iter().map(|s| s.as_str()).collect();
        let owners: Vec<&str> = owners.iter().map(|s| s.as_str()).collect();
        let admins: Vec<&str> = admins.iter().map(|s| s.as_str()).collect();
        let history = self.max_history_fetch.to_string();
        FormBuilder::new("form", NS_MUC_ROOMCONFIG)
            .title("Room configuration")
            .instructions("Complete this form to change the configuration of the room.")
            .field(
                "muc#roomconfig_roomname",
                Some("text-single"),
                "Name",
                &[&self.name],
            )
            .field(
                "muc#roomconfig_roomdesc",
                Some("text-single"),
                "Description",
                &[&self.description],
            )
            .field(
                "muc#roomconfig_lang",
                Some("text-single"),
                "Language of discussion",
                &[&self.lang],
            )
            .boolean(
                "muc#roomconfig_persistentroom",
                "Keep the room when the last occupant leaves",
                self.persistent,
            )
            .boolean(
                "muc#roomconfig_publicroom",
                "List the room publicly",
                self.public,
            )
            .boolean(
                "muc#roomconfig_membersonly",
                "Only members may enter",
                self.members_only,
            )
            .boolean(
                "muc#roomconfig_allowinvites",
                "Occupants may invite others",
                self.allow_invites,
            )
            .boolean(
                "muc#roomconfig_moderatedroom",
                "Only participants with voice may speak",
                self.moderated,
            )
            .boolean(
                "muc#roomconfig_changesubject",
                "Participants may change the subject",
                self.change_subject,
            )
            .list(
                "muc#roomconfig_allowpm",
                "list-single",
                "Who may send private messages",
                &[self.allow_pm.as_str()],
                &[
                    ("anyone", "Anyone"),
                    ("participants", "Anyone with voice"),
                    ("moderators", "Moderators only"),
                    ("none", "Nobody"),
                ],
            )
            .boolean(
                "muc#roomconfig_passwordprotectedroom",
                "A password is required to enter",
                self.password_protected,
            )
            .field(
                "muc#roomconfig_roomsecret",
                Some("text-private"),
                "Password",
                &[&self.password],
            )
            .list(
                "muc#roomconfig_whois",
                "list-single",
                "Who may discover real JIDs",
                &[if self.non_anonymous {
                    "anyone"
                } else {
                    "moderators"
                }],
                &[("moderators", "Moderators only"), ("anyone", "Anyone")],
            )
            .list(
                "muc#roomconfig_maxusers",
                "list-single",
                "Maximum number of occupants",
                &[&max_users],
                &max_opts,
            )
            .list(
                "muc#roomconfig_presencebroadcast",
                "list-multi",
                "Roles whose presence is broadcast",
                &pb,
                &roles,
            )
            .list(
                "muc#roomconfig_getmemberlist",
                "list-multi",
                "Roles that may retrieve the member list",
                &gml,
                &roles,
            )
            .boolean(
                "muc#roomconfig_enablearchiving",
                "Archive messages (history and message archive)",
                self.archive,
            )
            .field(
                "muc#maxhistoryfetch",
                Some("text-single"),
                "Maximum number of history messages sent on join",
                &[&history],
            )
            .boolean(
                "muc#roomconfig_allowvoicerequests",
                "Visitors may request voice",
                self.voice_requests,
            )
            .field(
                "muc#roomconfig_roomowners",
                Some("jid-multi"),
                "Room owners",
                &owners,
            )
            .field(
                "muc#roomconfig_roomadmins",
                Some("jid-multi"),
                "Room admins",
                &admins,
            )
            .build()
    }

    /// Apply a submitted form. Returns the owner/admin lists when the form
    /// sets them. Nothing changes when the form is invalid.
    pub fn apply_form(&mut self, form: &Form, svc: &MucConfig) -> Result<ListChanges, StanzaError> {
        if let Some(ft) = form.form_type()
            && ft != NS_MUC_ROOMCONFIG
        {
            return Err(StanzaError::bad_request().with_text("not a muc#roomconfig form"));
        }
        let bad = |what: &str| StanzaError::not_acceptable().with_text(format!("invalid {what}"));
        let mut c = self.clone();
        let text = |var: &str| form.values(var).map(|v| v.join("\n"));
        let boolean = |var: &str| form.bool(var).map_err(|_| bad(var));
        if let Some(v) = text("muc#roomconfig_roomname") {
            if v.chars().count() > svc.max_description_chars {
                return Err(bad("room name (too long)"));
            }
            c.name = v;
        }
        if let Some(v) = text("muc#roomconfig_roomdesc") {
            if v.chars().count() > svc.max_description_chars {
                return Err(bad("room description (too long)"));
            }
            c.description = v;
        }
        if let Some(v) = text("muc#roomconfig_lang") {
            if v.len() > 35 {
                return Err(bad("language"));
            }
            c.lang = v;
        }
        if let Some(v) = boolean("muc#roomconfig_persistentroom")? {
            c.persistent = v;
        }
        if let Some(v) = boolean("muc#roomconfig_publicroom")? {
            c.public = v;
        }
        if let Some(v) = boolean("muc#roomconfig_membersonly")? {
            c.members_only = v;
        }
        if let Some(v) = boolean("muc#roomconfig_allowinvites")? {
            c.allow_invites = v;
        }
        if let Some(v) = boolean("muc#roomconfig_moderatedroom")? {
            c.moderated = v;
        }
        if let Some(v) = boolean("muc#roomconfig_changesubject")? {
            c.change_subject = v;
        }
        if let Some(v) = form.value("muc#roomconfig_allowpm") {
            c.allow_pm = AllowPm::parse(v).ok_or_else(|| bad("muc#roomconfig_allowpm"))?;
        }
        if let Some(v) = boolean("muc#roomconfig_passwordprotectedroom")? {
            c.password_protected = v;
        }
        if let Some(v) = text("muc#roomconfig_roomsecret") {
            if v.len() > 1024 {
                return Err(bad("password (too long)"));
            }
            c.password = v;
        }
        if let Some(v) = form.value("muc#roomconfig_whois") {
            c.non_anonymous = match v {
                "anyone" => true,
                "moderators" => false,
                _ => return Err(bad("muc#roomconfig_whois")),
            };
        }
        if form.has("muc#roomconfig_maxusers") {
            c.max_users = match form.value("muc#roomconfig_maxusers") {
                None | Some("none") | Some("") => 0,
                Some(v) => match v.trim().parse::<u32>() {
                    Ok(n) if n > 0 && n <= svc.max_users_limit => n,
                    _ => {
                        return Err(StanzaError::not_acceptable().with_text(format!(
                            "muc#roomconfig_maxusers must be between 1 and {}",
                            svc.max_users_limit
                        )));
                    }
                },
            };
        }
        for (var, target) in [
            (
                "muc#roomconfig_presencebroadcast",
                &mut c.presence_broadcast,
            ),
            ("muc#roomconfig_getmemberlist", &mut c.get_member_list),
        ] {
            if let Some(vals) = form.values(var) {
                let mut roles = Vec::new();
                for v in vals {
                    if !matches!(v.as_str(), "moderator" | "participant" | "visitor") {
                        return Err(bad(var));
                    }
                    if !roles.contains(v) {
                        roles.push(v.clone());
                    }
                }
                *target = roles;
            }
        }
        for var in [
            "muc#roomconfig_enablearchiving",
            "muc#roomconfig_enablelogging",
            "mam",
        ] {
            if let Some(v) = boolean(var)? {
                c.archive = v;
            }
        }
        if let Some(v) = form.value("muc#maxhistoryfetch") {
            c.max_history_fetch = match v.trim().parse::<u32>() {
                Ok(n) => n.min(svc.max_history as u32),
                Err(_) => return Err(bad("muc#maxhistoryfetch")),
            };
        }
        if let Some(v) = boolean("muc#roomconfig_allowvoicerequests")? {
            c.voice_requests = v;
        }
        if c.password_protected && c.password.is_empty() {
            return Err(StanzaError::not_acceptable()
                .with_text("a password-protected room needs a password"));
        }
        let jids = |var: &str| -> Result<Option<Vec<BareJid>>, StanzaError> {
            match form.values(var) {
                None => Ok(None),
                Some(vals) => {
                    let mut out = Vec::new();
                    for v in vals.iter().filter(|v| !v.trim().is_empty()) {
                        let j = jid::Jid::new(v.trim()).map_err(|_| {
                            StanzaError::jid_malformed().with_text(format!("invalid JID {v}"))
                        })?;
                        let b = j.to_bare();
                        if !out.contains(&b) {
                            out.push(b);
                        }
                    }
                    Ok(Some(out))
                }
            }
        };
        let owners = jids("muc#roomconfig_roomowners")?;
        let admins = jids("muc#roomconfig_roomadmins")?;
        if let Some(o) = &owners
            && o.is_empty()
        {
            return Err(StanzaError::conflict().with_text("a room needs at least one owner"));
        }
        *self = c;
        Ok((owners, admins))
    }

    /// The `muc_*` features of disco#info (XEP-0045 section 6.4).
    pub fn features(&self) -> [&'static str; 6] {
        [
            if self.public {
                "muc_public"
            } else {
                "muc_hidden"
            },
            if self.persistent {
                "muc_persistent"
            } else {
                "muc_temporary"
            },
            if self.members_only {
                "muc_membersonly"
            } else {
                "muc_open"
            },
            if self.moderated {
                "muc_moderated"
            } else {
                "muc_unmoderated"
            },
            if self.non_anonymous {
                "muc_nonanonymous"
            } else {
                "muc_semianonymous"
            },
            if self.password_protected {
                "muc_passwordprotected"
            } else {
                "muc_unsecured"
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit(fields: &[(&str, &[&str])]) -> Form {
        Form {
            typ: "submit".into(),
            fields: std::iter::once(("FORM_TYPE".to_string(), vec![NS_MUC_ROOMCONFIG.to_string()]))
                .chain(
                    fields
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect())),
                )
                .collect(),
        }
    }

    #[test]
    fn form_roundtrip_keeps_values() {
        let svc = MucConfig::default();
        let mut c = RoomConfig::new(&svc);
        c.name = "Ops".into();
        c.moderated = true;
        c.max_users = 50;
        let form = c.to_form(&["a@x".into()], &[], &svc);
        let mut parsed = Form::parse(&form).unwrap();
        parsed.typ = "submit".into();
        let mut d = RoomConfig::new(&svc);
        let (owners, admins) = d.apply_form(&parsed, &svc).unwrap();
        assert_eq!(d, c);
        assert_eq!(owners.unwrap(), vec![BareJid::new("a@x").unwrap()]);
        assert_eq!(admins.unwrap(), Vec::<BareJid>::new());
    }

    #[test]
    fn invalid_forms_change_nothing() {
        let svc = MucConfig::default();
        let mut c = RoomConfig::new(&svc);
        let before = c.clone();
        assert!(
            c.apply_form(
                &submit(&[
                    ("muc#roomconfig_persistentroom", &["1"]),
                    ("muc#roomconfig_passwordprotectedroom", &["1"])
                ]),
                &svc
            )
            .is_err(),
            "password-protected without a password"
        );
        assert!(
            c.apply_form(&submit(&[("muc#roomconfig_maxusers", &["999999"])]), &svc)
                .is_err()
        );
        assert!(
            c.apply_form(&submit(&[("muc#roomconfig_whois", &["nobody"])]), &svc)
                .is_err()
        );
        assert!(
            c.apply_form(
                &submit(&[("muc#roomconfig_membersonly", &["perhaps"])]),
                &svc
            )
            .is_err()
        );
        assert!(
            c.apply_form(&submit(&[("muc#roomconfig_roomowners", &[])]), &svc)
                .is_err()
        );
        assert_eq!(c, before);
        c.apply_form(
            &submit(&[
                ("muc#roomconfig_passwordprotectedroom", &["true"]),
                ("muc#roomconfig_roomsecret", &["s3"]),
                ("muc#roomconfig_whois", &["anyone"]),
                ("muc#roomconfig_maxusers", &["none"]),
                ("muc#roomconfig_enablelogging", &["0"]),
            ]),
            &svc,
        )
        .unwrap();
        assert!(c.password_protected && c.non_anonymous && !c.archive);
        assert_eq!(c.max_users, 0);
        assert_eq!(c.occupant_limit(&svc), svc.max_users_limit as usize);
        assert!(c.features().contains(&"muc_passwordprotected"));
        assert!(c.features().contains(&"muc_nonanonymous"));
    }

    #[test]
    fn json_roundtrip_and_defaults() {
        let svc = MucConfig::default();
        let mut c = RoomConfig::new(&svc);
        c.description = "d".into();
        c.allow_pm = AllowPm::Moderators;
        assert_eq!(RoomConfig::from_json(&c.to_json(), &svc), c);
        let partial = RoomConfig::from_json("{\"name\":\"x\"}", &svc);
        assert_eq!(partial.name, "x");
        assert_eq!(partial.max_users, svc.default_max_users);
        assert_eq!(
            RoomConfig::from_json("garbage", &svc),
            RoomConfig::new(&svc)
        );
        assert!(AllowPm::Participants.allows(Role::Participant));
        assert!(!AllowPm::Participants.allows(Role::Visitor));
    }
}
