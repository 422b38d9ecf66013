//! Authentication: our own SCRAM server over stored keys, PLAIN, credential
//! derivation for the account store, and throttling of failed attempts.

pub mod scram;
pub mod throttle;

use rand::RngCore;
pub use scram::{ChannelBindings, ClientFirst, ScramHash, ScramKeys, ScramServer};
pub use throttle::AuthThrottle;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("malformed request")]
    Malformed,
    #[error("not authorized")]
    NotAuthorized,
    #[error("channel binding does not match")]
    ChannelBindingMismatch,
    #[error("channel binding type not supported")]
    ChannelBindingUnsupported,
    #[error("invalid authorization identity")]
    InvalidAuthzid,
    #[error("account disabled")]
    AccountDisabled,
    #[error("too many attempts")]
    Throttled,
}

impl AuthError {
    /// The RFC 6120 section 6.5 SASL failure condition.
    pub fn condition(&self) -> &'static str {
        match self {
            AuthError::Malformed => "malformed-request",
            AuthError::NotAuthorized => "not-authorized",
            AuthError::ChannelBindingMismatch => "not-authorized",
            AuthError::ChannelBindingUnsupported => "invalid-mechanism",
            AuthError::InvalidAuthzid => "invalid-authzid",
            AuthError::AccountDisabled => "account-disabled",
            AuthError::Throttled => "temporary-auth-failure",
        }
    }
}

/// A random printable nonce of 24 bytes' entropy (base64, no commas).
pub fn random_nonce() -> String {
    use base64::Engine;
    let mut b = [0u8; 24];
    rand::rng().fill_bytes(&mut b);
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(b)
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    rand::rng().fill_bytes(&mut b);
    b
}

/// Both hash variants of the stored credentials of one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCredentials {
    pub sha1: ScramKeys,
    pub sha256: ScramKeys,
}

impl StoredCredentials {
    /// Derive storage keys from a password. The password is SASLprepped
    /// (RFC 4013) first, as clients do before hashing.
    pub fn from_password(password: &str, iterations: u32) -> Result<Self, AuthError> {
        let prepped = prep_password(password)?;
        let salt1 = random_bytes(16);
        let salt256 = random_bytes(16);
        Ok(StoredCredentials {
            sha1: ScramKeys::derive(ScramHash::Sha1, &prepped, &salt1, iterations),
            sha256: ScramKeys::derive(ScramHash::Sha256, &prepped, &salt256, iterations),
        })
    }

    pub fn keys(&self, hash: ScramHash) -> &ScramKeys {
        match hash {
            ScramHash::Sha1 => &self.sha1,
            ScramHash::Sha256 => &self.sha256,
        }
    }

    pub fn verify_password(&self, password: &str) -> bool {
        match prep_password(password) {
            Ok(p) => self.sha256.verify_password(ScramHash::Sha256, &p),
            Err(_) => false,
        }
    }
}

/// SASLprep a password; an empty or prohibited one is refused.
pub fn prep_password(password: &str) -> Result<String, AuthError> {
    if password.is_empty() {
        return Err(AuthError::Malformed);
    }
    stringprep::saslprep(password)
        .map(|p| p.into_owned())
        .map_err(|_| AuthError::Malformed)
}

/// Normalise a username (the localpart of a JID) with nodeprep.
pub fn prep_username(username: &str) -> Result<String, AuthError> {
    if username.is_empty() || username.len() > 1023 {
        return Err(AuthError::Malformed);
    }
    let p = stringprep::nodeprep(username).map_err(|_| AuthError::Malformed)?;
    if p.is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(p.into_owned())
}

/// Parsed SASL PLAIN message: `[authzid] NUL authcid NUL passwd` (RFC 4616).
#[derive(Debug, PartialEq, Eq)]
pub struct PlainMessage {
    pub authzid: Option<String>,
    pub authcid: String,
    pub password: String,
}

pub fn parse_plain(msg: &[u8]) -> Result<PlainMessage, AuthError> {
    let msg = std::str::from_utf8(msg).map_err(|_| AuthError::Malformed)?;
    let mut parts = msg.split('\0');
    let authzid = parts.next().ok_or(AuthError::Malformed)?;
    let authcid = parts.next().ok_or(AuthError::Malformed)?;
    let password = parts.next().ok_or(AuthError::Malformed)?;
    if parts.next().is_some() || authcid.is_empty() || password.is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(PlainMessage {
        authzid: (!authzid.is_empty()).then(|| authzid.to_owned()),
        authcid: authcid.to_owned(),
        password: password.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_parsing() {
        assert_eq!(
            parse_plain(b"\0juliet\0pw").unwrap(),
            PlainMessage {
                authzid: None,
                authcid: "juliet".into(),
                password: "pw".into()
            }
        );
        assert_eq!(
            parse_plain(b"juliet@x\0juliet\0pw")
                .unwrap()
                .authzid
                .as_deref(),
            Some("juliet@x")
        );
        for bad in [&b""[..], b"\0\0pw", b"\0u\0", b"\0u\0p\0x", b"\xff\0u\0p"] {
            assert!(parse_plain(bad).is_err());
        }
    }

    #[test]
    fn credentials_roundtrip() {
        let c = StoredCredentials::from_password("I\u{00AD}X", 4096).unwrap();
        // SASLprep maps soft hyphen to nothing: "IX".
        assert!(c.verify_password("IX"));
        assert!(!c.verify_password("ix"));
        assert!(StoredCredentials::from_password("", 4096).is_err());
    }

    #[test]
    fn usernames_are_nodeprepped() {
        assert_eq!(prep_username("Juliet").unwrap(), "juliet");
        assert!(prep_username("a@b").is_err());
        assert!(prep_username("").is_err());
    }
}
