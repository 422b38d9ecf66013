//! A small certificate authority for tests and local federation trials:
//! one CA certificate, and leaf certificates signed by it for server
//! domains (DNS-IDs only, as public CAs issue them; EKU serverAuth and
//! clientAuth, because an initiating server presents its certificate as a
//! TLS client). Trust the CA with `s2s.ca_file` to get SASL EXTERNAL
//! (XEP-0178) between servers.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("empty SAN list");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("key generation");
        TestCa {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate for these DNS names: (DER, key PEM).
    pub fn leaf(&self, names: &[&str]) -> (Vec<u8>, String) {
        let (cert, key) = self.leaf_cert(names);
        (cert.der().to_vec(), key.serialize_pem())
    }

    fn leaf_cert(&self, names: &[&str]) -> (rcgen::Certificate, KeyPair) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("valid names");
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().expect("key generation");
        let cert = params.signed_by(&key, &self.issuer).expect("signing");
        (cert, key)
    }

    /// Write `<dir>/<stem>.crt` (leaf and CA, PEM) and `<dir>/<stem>.key`.
    pub fn write_leaf(&self, dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let (cert, key) = self.leaf_cert(names);
        std::fs::create_dir_all(dir).expect("create cert dir");
        let crt = dir.join(format!("{stem}.crt"));
        let kp = dir.join(format!("{stem}.key"));
        std::fs::write(&crt, format!("{}{}", cert.pem(), self.cert_pem())).expect("write cert");
        std::fs::write(&kp, key.serialize_pem()).expect("write key");
        (crt, kp)
    }

    /// Write the CA certificate to `path`.
    pub fn write_ca(&self, path: &Path) {
        std::fs::write(path, self.cert_pem()).expect("write CA");
    }
}
