//! SCRAM (RFC 5802, RFC 7677) server over stored keys, with channel binding
//! (`-PLUS`: `tls-exporter` RFC 9266, `tls-server-end-point` RFC 5929).
//!
//! The server never sees a password-equivalent: the store keeps salt,
//! iteration count, StoredKey and ServerKey. Sans-IO: the caller looks the
//! credentials up between [`ScramServer::client_first`] and
//! [`ScramServer::server_first`].

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{KeyInit, Mac};
use subtle::ConstantTimeEq;

use super::AuthError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScramHash {
    Sha1,
    Sha256,
}

impl ScramHash {
    pub fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        match self {
            ScramHash::Sha1 => {
                let mut m = hmac::Hmac::<sha1::Sha1>::new_from_slice(key).expect("any key length");
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
            ScramHash::Sha256 => {
                let mut m =
                    hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
        }
    }

    pub fn hash(self, data: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        match self {
            ScramHash::Sha1 => sha1::Sha1::digest(data).to_vec(),
            ScramHash::Sha256 => sha2::Sha256::digest(data).to_vec(),
        }
    }

    pub fn salted_password(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        match self {
            ScramHash::Sha1 => {
                let mut out = vec![0u8; 20];
                pbkdf2::pbkdf2_hmac::<sha1::Sha1>(password, salt, iterations, &mut out);
                out
            }
            ScramHash::Sha256 => {
                let mut out = vec![0u8; 32];
                pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, iterations, &mut out);
                out
            }
        }
    }

    pub fn mechanism(self, plus: bool) -> &'static str {
        match (self, plus) {
            (ScramHash::Sha1, false) => "SCRAM-SHA-1",
            (ScramHash::Sha1, true) => "SCRAM-SHA-1-PLUS",
            (ScramHash::Sha256, false) => "SCRAM-SHA-256",
            (ScramHash::Sha256, true) => "SCRAM-SHA-256-PLUS",
        }
    }
}

/// What the store keeps for one account and one hash function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScramKeys {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

impl ScramKeys {
    /// Derive keys from a (SASLprepped) password.
    pub fn derive(hash: ScramHash, password: &str, salt: &[u8], iterations: u32) -> ScramKeys {
        let salted = hash.salted_password(password.as_bytes(), salt, iterations);
        let client_key = hash.hmac(&salted, b"Client Key");
        let server_key = hash.hmac(&salted, b"Server Key");
        ScramKeys {
            salt: salt.to_vec(),
            iterations,
            stored_key: hash.hash(&client_key),
            server_key,
        }
    }

    /// Check a plaintext password (SASL PLAIN) against stored keys.
    pub fn verify_password(&self, hash: ScramHash, password: &str) -> bool {
        let derived = ScramKeys::derive(hash, password, &self.salt, self.iterations);
        bool::from(derived.stored_key.ct_eq(&self.stored_key))
    }
}

/// Channel binding data of the TLS connection, as computed by the TLS layer.
#[derive(Debug, Clone, Default)]
pub struct ChannelBindings {
    pub tls_exporter: Option<Vec<u8>>,
    pub tls_server_end_point: Option<Vec<u8>>,
}

impl ChannelBindings {
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        match name {
            "tls-exporter" => self.tls_exporter.as_deref(),
            "tls-server-end-point" => self.tls_server_end_point.as_deref(),
            _ => None,
        }
    }

    /// Names of the binding types available, in order of preference.
    pub fn types(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.tls_exporter.is_some() {
            v.push("tls-exporter");
        }
        if self.tls_server_end_point.is_some() {
            v.push("tls-server-end-point");
        }
        v
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Step {
    AwaitClientFirst,
    AwaitCredentials,
    AwaitClientFinal,
    Done,
}

/// The parsed client-first message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFirst {
    /// The SCRAM username after unescaping (not yet normalised).
    pub username: String,
    /// The authorisation identity from the GS2 header, if any.
    pub authzid: Option<String>,
}

pub struct ScramServer {
    hash: ScramHash,
    plus: bool,
    /// Whether the server offered a -PLUS variant on this connection (a
    /// client sending `y` then indicates a downgrade).
    server_offers_plus: bool,
    bindings: ChannelBindings,
    step: Step,
    gs2_header: String,
    cb_name: Option<String>,
    client_first_bare: String,
    nonce: String,
    server_first: String,
    keys: Option<ScramKeys>,
}

fn unescape_username(s: &str) -> Result<String, AuthError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('=') {
        out.push_str(&rest[..pos]);
        let code = rest.get(pos + 1..pos + 3).ok_or(AuthError::Malformed)?;
        match code {
            "2C" => out.push(','),
            "3D" => out.push('='),
            _ => return Err(AuthError::Malformed),
        }
        rest = &rest[pos + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

fn is_printable_nonce(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

impl ScramServer {
    pub fn new(
        hash: ScramHash,
        plus: bool,
        server_offers_plus: bool,
        bindings: ChannelBindings,
    ) -> Self {
        ScramServer {
            hash,
            plus,
            server_offers_plus,
            bindings,
            step: Step::AwaitClientFirst,
            gs2_header: String::new(),
            cb_name: None,
            client_first_bare: String::new(),
            nonce: String::new(),
            server_first: String::new(),
            keys: None,
        }
    }

    /// Parse the client-first message.
    pub fn client_first(&mut self, msg: &[u8]) -> Result<ClientFirst, AuthError> {
        if self.step != Step::AwaitClientFirst {
            return Err(AuthError::Malformed);
        }
        let msg = std::str::from_utf8(msg).map_err(|_| AuthError::Malformed)?;
        // gs2-header = gs2-cbind-flag "," [ authzid ] ","
        let mut parts = msg.splitn(3, ',');
        let cbind = parts.next().ok_or(AuthError::Malformed)?;
        let authz = parts.next().ok_or(AuthError::Malformed)?;
        let bare = parts.next().ok_or(AuthError::Malformed)?;
        match (cbind, self.plus) {
            ("n", false) => {}
            ("y", false) => {
                if self.server_offers_plus {
                    // The client believes we do not support channel binding
                    // although we advertised it: a downgrade (RFC 5802 6).
                    return Err(AuthError::ChannelBindingMismatch);
                }
            }
            (p, true) if p.starts_with("p=") => {
                let name = &p[2..];
                if self.bindings.get(name).is_none() {
                    return Err(AuthError::ChannelBindingUnsupported);
                }
                self.cb_name = Some(name.to_owned());
            }
            (p, false) if p.starts_with("p=") => {
                // Channel binding requested with a non-PLUS mechanism.
                return Err(AuthError::ChannelBindingMismatch);
            }
            (_, true) => return Err(AuthError::ChannelBindingMismatch),
            _ => return Err(AuthError::Malformed),
        }
        let authzid = if authz.is_empty() {
            None
        } else {
            let a = authz.strip_prefix("a=").ok_or(AuthError::Malformed)?;
            Some(unescape_username(a)?)
        };
        // client-first-message-bare = [reserved-mext ","] username "," nonce ["," extensions]
        let mut fields = bare.split(',');
        let user_field = fields.next().ok_or(AuthError::Malformed)?;
        if user_field.starts_with("m=") {
            return Err(AuthError::Malformed);
        }
        let username =
            unescape_username(user_field.strip_prefix("n=").ok_or(AuthError::Malformed)?)?;
        let nonce = fields
            .next()
            .and_then(|f| f.strip_prefix("r="))
            .ok_or(AuthError::Malformed)?;
        if !is_printable_nonce(nonce) || username.is_empty() {
            return Err(AuthError::Malformed);
        }
        self.gs2_header = format!("{cbind},{authz},");
        self.client_first_bare = bare.to_owned();
        self.nonce = format!("{nonce}{}", super::random_nonce());
        self.step = Step::AwaitCredentials;
        Ok(ClientFirst { username, authzid })
    }

    /// Produce server-first from the account's keys. For an unknown account,
    /// pass `None`: a fake salt is used so the exchange looks the same and
    /// fails only at the proof (no user enumeration).
    pub fn server_first(&mut self, keys: Option<ScramKeys>, fake_salt_seed: &[u8]) -> Vec<u8> {
        let keys = keys.unwrap_or_else(|| ScramKeys {
            salt: self
                .hash
                .hmac(fake_salt_seed, self.client_first_bare.as_bytes())[..16]
                .to_vec(),
            iterations: 4096,
            stored_key: vec![0xff; 1],
            server_key: vec![0xff; 1],
        });
        self.server_first = format!(
            "r={},s={},i={}",
            self.nonce,
            B64.encode(&keys.salt),
            keys.iterations
        );
        self.keys = Some(keys);
        self.step = Step::AwaitClientFinal;
        self.server_first.clone().into_bytes()
    }

    /// Verify client-final and return server-final (`v=...`).
    pub fn client_final(&mut self, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        if self.step != Step::AwaitClientFinal {
            return Err(AuthError::Malformed);
        }
        self.step = Step::Done;
        let msg = std::str::from_utf8(msg).map_err(|_| AuthError::Malformed)?;
        let proof_pos = msg.rfind(",p=").ok_or(AuthError::Malformed)?;
        let without_proof = &msg[..proof_pos];
        let proof = B64
            .decode(&msg[proof_pos + 3..])
            .map_err(|_| AuthError::Malformed)?;
        let mut fields = without_proof.split(',');
        let cb = fields
            .next()
            .and_then(|f| f.strip_prefix("c="))
            .ok_or(AuthError::Malformed)?;
        let nonce = fields
            .next()
            .and_then(|f| f.strip_prefix("r="))
            .ok_or(AuthError::Malformed)?;
        if nonce != self.nonce {
            return Err(AuthError::Malformed);
        }
        let cb = B64.decode(cb).map_err(|_| AuthError::Malformed)?;
        let mut expected_cb = self.gs2_header.as_bytes().to_vec();
        if let Some(name) = &self.cb_name {
            let data = self
                .bindings
                .get(name)
                .ok_or(AuthError::ChannelBindingUnsupported)?;
            expected_cb.extend_from_slice(data);
        }
        if !bool::from(cb.ct_eq(&expected_cb)) {
            return Err(AuthError::ChannelBindingMismatch);
        }
        let keys = self.keys.as_ref().ok_or(AuthError::Malformed)?;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = self.hash.hmac(&keys.stored_key, auth_message.as_bytes());
        if proof.len() != client_signature.len() {
            return Err(AuthError::NotAuthorized);
        }
        let client_key: Vec<u8> = proof
            .iter()
            .zip(client_signature.iter())
            .map(|(a, b)| a ^ b)
            .collect();
        let stored = self.hash.hash(&client_key);
        if !bool::from(stored.ct_eq(&keys.stored_key)) {
            return Err(AuthError::NotAuthorized);
        }
        let server_signature = self.hash.hmac(&keys.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)).into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> Vec<u8> {
        B64.decode(s).unwrap()
    }

    /// RFC 5802 section 5 example, driven through our server with the RFC's
    /// server nonce substituted (the nonce suffix is random in production).
    #[allow(clippy::too_many_arguments)]
    fn rfc_exchange(
        hash: ScramHash,
        password: &str,
        salt_b64: &str,
        iterations: u32,
        client_first: &str,
        server_nonce_suffix: &str,
        client_final: &str,
        server_final: &str,
    ) {
        let keys = ScramKeys::derive(hash, password, &b64(salt_b64), iterations);
        let mut s = ScramServer::new(hash, false, false, ChannelBindings::default());
        let cf = s.client_first(client_first.as_bytes()).unwrap();
        assert_eq!(cf.username, "user");
        // Replace the random suffix by the RFC's.
        let client_nonce = client_first.rsplit("r=").next().unwrap();
        s.nonce = format!("{client_nonce}{server_nonce_suffix}");
        let sf = String::from_utf8(s.server_first(Some(keys), b"x")).unwrap();
        assert_eq!(
            sf,
            format!("r={client_nonce}{server_nonce_suffix},s={salt_b64},i={iterations}")
        );
        let fin = s.client_final(client_final.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(fin).unwrap(), server_final);
    }

    #[test]
    fn rfc5802_sha1_vector() {
        rfc_exchange(
            ScramHash::Sha1,
            "pencil",
            "QSXCR+Q6sek8bf92",
            4096,
            "n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
            "3rfcNHYJY1ZVvWVs7j",
            "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
            "v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
        );
    }

    #[test]
    fn rfc7677_sha256_vector() {
        rfc_exchange(
            ScramHash::Sha256,
            "pencil",
            "W22ZaJ0SNY7soEsUEjb6gQ==",
            4096,
            "n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
             p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
        );
    }

    #[test]
    fn wrong_proof_is_not_authorized() {
        let keys = ScramKeys::derive(ScramHash::Sha256, "pencil", b"saltsaltsalt", 4096);
        let mut s = ScramServer::new(ScramHash::Sha256, false, false, ChannelBindings::default());
        s.client_first(b"n,,n=user,r=abc").unwrap();
        let sf = String::from_utf8(s.server_first(Some(keys), b"x")).unwrap();
        let nonce = sf.split(',').next().unwrap();
        let msg = format!("c=biws,{nonce},p={}", B64.encode([0u8; 32]));
        assert_eq!(
            s.client_final(msg.as_bytes()),
            Err(AuthError::NotAuthorized)
        );
    }

    #[test]
    fn wrong_nonce_and_garbage_are_malformed() {
        let keys = ScramKeys::derive(ScramHash::Sha1, "pencil", b"saltsaltsalt", 4096);
        let mut s = ScramServer::new(ScramHash::Sha1, false, false, ChannelBindings::default());
        s.client_first(b"n,,n=user,r=abc").unwrap();
        s.server_first(Some(keys), b"x");
        let msg = format!("c=biws,r=abcdef,p={}", B64.encode([0u8; 20]));
        assert_eq!(s.client_final(msg.as_bytes()), Err(AuthError::Malformed));
        for bad in [
            &b""[..],
            b"x,,n=user,r=abc",
            b"n,,r=abc",
            b"n,,n=user",
            b"n,,m=ext,n=user,r=abc",
            b"n,,n=us=41er,r=abc",
            b"\xff\xfe",
        ] {
            let mut s = ScramServer::new(ScramHash::Sha1, false, false, ChannelBindings::default());
            assert!(s.client_first(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn username_escapes() {
        let mut s = ScramServer::new(ScramHash::Sha1, false, false, ChannelBindings::default());
        let cf = s.client_first(b"n,a=x=2Cy,n=a=3Db=2Cc,r=abc").unwrap();
        assert_eq!(cf.username, "a=b,c");
        assert_eq!(cf.authzid.as_deref(), Some("x,y"));
    }

    #[test]
    fn downgrade_is_detected() {
        let mut s = ScramServer::new(ScramHash::Sha1, false, true, ChannelBindings::default());
        assert_eq!(
            s.client_first(b"y,,n=user,r=abc"),
            Err(AuthError::ChannelBindingMismatch)
        );
        // Without a PLUS offer, y is fine.
        let mut s = ScramServer::new(ScramHash::Sha1, false, false, ChannelBindings::default());
        assert!(s.client_first(b"y,,n=user,r=abc").is_ok());
    }

    fn plus_exchange(
        bindings: ChannelBindings,
        client_cb: &[u8],
        cb_type: &str,
    ) -> Result<Vec<u8>, AuthError> {
        let keys = ScramKeys::derive(ScramHash::Sha256, "pencil", b"0123456789abcdef", 4096);
        let mut s = ScramServer::new(ScramHash::Sha256, true, true, bindings);
        let cfirst = format!("p={cb_type},,n=user,r=clientnonce");
        s.client_first(cfirst.as_bytes())?;
        let sf = String::from_utf8(s.server_first(Some(keys.clone()), b"x")).unwrap();
        // compute a client proof by hand
        let salted = ScramHash::Sha256.salted_password(b"pencil", b"0123456789abcdef", 4096);
        let client_key = ScramHash::Sha256.hmac(&salted, b"Client Key");
        let stored_key = ScramHash::Sha256.hash(&client_key);
        let nonce = sf.split(',').next().unwrap();
        let mut cbind = format!("p={cb_type},,").into_bytes();
        cbind.extend_from_slice(client_cb);
        let without_proof = format!("c={},{nonce}", B64.encode(&cbind));
        let auth = format!("n=user,r=clientnonce,{sf},{without_proof}");
        let sig = ScramHash::Sha256.hmac(&stored_key, auth.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(sig).map(|(a, b)| a ^ b).collect();
        s.client_final(format!("{without_proof},p={}", B64.encode(proof)).as_bytes())
    }

    #[test]
    fn plus_with_matching_binding_succeeds_and_mismatch_fails() {
        let bindings = ChannelBindings {
            tls_exporter: Some(vec![1, 2, 3, 4]),
            tls_server_end_point: Some(vec![9, 9]),
        };
        assert!(plus_exchange(bindings.clone(), &[1, 2, 3, 4], "tls-exporter").is_ok());
        assert!(plus_exchange(bindings.clone(), &[9, 9], "tls-server-end-point").is_ok());
        assert_eq!(
            plus_exchange(bindings.clone(), &[1, 2, 3, 5], "tls-exporter"),
            Err(AuthError::ChannelBindingMismatch)
        );
        assert_eq!(
            plus_exchange(bindings, &[1], "tls-unique"),
            Err(AuthError::ChannelBindingUnsupported)
        );
    }

    /// The `sasl` crate as an independent reference client.
    #[test]
    fn sasl_crate_client_logs_in() {
        use sasl::client::Mechanism;
        use sasl::client::mechanisms::Scram;
        use sasl::common::scram::{Sha1, Sha256};
        use sasl::common::{ChannelBinding, Credentials};

        for hash in [ScramHash::Sha1, ScramHash::Sha256] {
            for (password, good) in [("s3cr3t", true), ("wrong", false)] {
                let creds = Credentials::default()
                    .with_username("juliet")
                    .with_password(password)
                    .with_channel_binding(ChannelBinding::None);
                let mut client: Box<dyn Mechanism> = match hash {
                    ScramHash::Sha1 => Box::new(Scram::<Sha1>::from_credentials(creds).unwrap()),
                    ScramHash::Sha256 => {
                        Box::new(Scram::<Sha256>::from_credentials(creds).unwrap())
                    }
                };
                assert_eq!(client.name(), hash.mechanism(false));
                let keys = ScramKeys::derive(hash, "s3cr3t", b"NaCl-NaCl-NaCl!!", 4096);
                let mut server = ScramServer::new(hash, false, false, ChannelBindings::default());
                let first = client.initial();
                let cf = server.client_first(&first).unwrap();
                assert_eq!(cf.username, "juliet");
                let sf = server.server_first(Some(keys), b"seed");
                let cfinal = client.response(&sf).unwrap();
                let result = server.client_final(&cfinal);
                if good {
                    let v = result.expect("good password refused");
                    client.success(&v).expect("client rejects server signature");
                } else {
                    assert_eq!(result, Err(AuthError::NotAuthorized));
                }
            }
        }
    }

    #[test]
    fn unknown_user_fails_only_at_proof() {
        let mut s = ScramServer::new(ScramHash::Sha256, false, false, ChannelBindings::default());
        s.client_first(b"n,,n=nobody,r=abc").unwrap();
        let sf = String::from_utf8(s.server_first(None, b"seed")).unwrap();
        assert!(sf.contains(",s=") && sf.ends_with(",i=4096"));
        let nonce = sf.split(',').next().unwrap();
        let msg = format!("c=biws,{nonce},p={}", B64.encode([0u8; 32]));
        assert_eq!(
            s.client_final(msg.as_bytes()),
            Err(AuthError::NotAuthorized)
        );
    }

    #[test]
    fn plain_password_verification() {
        let keys = ScramKeys::derive(ScramHash::Sha256, "pw", b"salt", 4096);
        assert!(keys.verify_password(ScramHash::Sha256, "pw"));
        assert!(!keys.verify_password(ScramHash::Sha256, "pw2"));
    }
}
