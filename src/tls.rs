//! TLS: rustls (ring provider) configurations, certificates per domain chosen
//! by SNI, self-signed certificates generated at first start, live reload,
//! and the channel-binding bytes SCRAM-PLUS needs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::ring as provider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::auth::ChannelBindings;
use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate {0}: {1}")]
    Cert(PathBuf, String),
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// Where the certificate for one domain comes from.
#[derive(Debug, Clone)]
struct CertSource {
    cert: PathBuf,
    key: PathBuf,
}

/// A certificate chain with its signing key, plus what channel binding needs.
#[derive(Debug)]
pub struct LoadedCert {
    pub certified: Arc<CertifiedKey>,
    /// `tls-server-end-point` (RFC 5929) hash of the end-entity certificate.
    pub end_point_hash: Vec<u8>,
}

/// Certificates for every local domain, chosen by SNI, reloadable.
#[derive(Debug)]
pub struct CertStore {
    sources: Vec<(String, CertSource)>,
    certs: RwLock<HashMap<String, Arc<LoadedCert>>>,
    default_domain: String,
}

impl CertStore {
    /// Set up certificates for `domains`, generating self-signed ones where
    /// allowed and missing.
    pub fn new(cfg: &TlsConfig, domains: &[String]) -> Result<Arc<CertStore>, TlsError> {
        let mut sources = Vec::new();
        for d in domains {
            let src = match (&cfg.certificate, &cfg.key) {
                (Some(c), Some(k)) => CertSource {
                    cert: c.clone(),
                    key: k.clone(),
                },
                _ => CertSource {
                    cert: cfg.cert_dir.join(format!("{d}.crt")),
                    key: cfg.cert_dir.join(format!("{d}.key")),
                },
            };
            if !src.cert.exists() || !src.key.exists() {
                if cfg.generate_self_signed && cfg.certificate.is_none() {
                    generate_self_signed(d, &src.cert, &src.key)?;
                    tracing::info!(domain = %d, cert = %src.cert.display(), "generated a self-signed certificate");
                } else {
                    return Err(TlsError::Cert(src.cert.clone(), "missing".into()));
                }
            }
            sources.push((d.clone(), src));
        }
        let store = Arc::new(CertStore {
            sources,
            certs: RwLock::new(HashMap::new()),
            default_domain: domains.first().cloned().unwrap_or_default(),
        });
        store.reload()?;
        Ok(store)
    }

    /// Re-read every certificate from disk. On error the old ones stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let mut fresh = HashMap::new();
        for (domain, src) in &self.sources {
            fresh.insert(domain.clone(), Arc::new(load_cert(&src.cert, &src.key)?));
        }
        *self.certs.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// The certificate for a server name: exact domain, or the parent
    /// domain for a service subdomain (conference.example.org).
    pub fn for_name(&self, name: Option<&str>) -> Option<Arc<LoadedCert>> {
        let certs = self.certs.read().unwrap_or_else(|p| p.into_inner());
        if let Some(name) = name {
            let name = name.to_ascii_lowercase();
            if let Some(c) = certs.get(&name) {
                return Some(c.clone());
            }
            if let Some((_, parent)) = name.split_once('.')
                && let Some(c) = certs.get(parent)
            {
                return Some(c.clone());
            }
        }
        certs.get(&self.default_domain).cloned()
    }
}

#[derive(Debug)]
struct SniResolver(Arc<CertStore>);

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0
            .for_name(hello.server_name())
            .map(|c| c.certified.clone())
    }
}

pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(provider::default_provider())
}

/// A rustls server configuration for client connections. `alpn` is set for
/// direct TLS (XEP-0368: `xmpp-client`).
pub fn server_config(
    certs: &Arc<CertStore>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver(certs.clone())));
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Keep per-connection memory small: no session resumption tickets state
    // beyond the default cache.
    Ok(Arc::new(cfg))
}

/// A rustls server configuration for incoming server-to-server streams:
/// like [`server_config`], and it asks the peer for its certificate
/// without requiring one. The certificate is judged after the handshake
/// (`s2s::pkix`), because a peer whose certificate we cannot verify can
/// still authenticate with Server Dialback (XEP-0220).
pub fn s2s_server_config(
    certs: &Arc<CertStore>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = crypto_provider();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_client_cert_verifier(Arc::new(DeferredVerifier(provider)))
        .with_cert_resolver(Arc::new(SniResolver(certs.clone())));
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// A rustls client configuration for outgoing server-to-server streams from
/// `local_domain`: it presents the certificate of that domain (for SASL
/// EXTERNAL, XEP-0178) and accepts any server certificate for the handshake;
/// the certificate is judged afterwards (`s2s::pkix`).
pub fn s2s_client_config(
    certs: &Arc<CertStore>,
    local_domain: &str,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    s2s_client_config_with(certs, local_domain, alpn, true)
}

/// As [`s2s_client_config`]; without `present_cert` no client certificate
/// is offered (for a retry with dialback after a peer dropped the stream
/// over our certificate).
pub fn s2s_client_config_with(
    certs: &Arc<CertStore>,
    local_domain: &str,
    alpn: &[&[u8]],
    present_cert: bool,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = crypto_provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(DeferredVerifier(provider)));
    let mut cfg = if present_cert {
        builder.with_client_cert_resolver(Arc::new(ClientCertResolver {
            certs: certs.clone(),
            domain: local_domain.to_owned(),
        }))
    } else {
        builder.with_no_client_auth()
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// Presents our certificate for one local domain as a TLS client.
#[derive(Debug)]
struct ClientCertResolver {
    certs: Arc<CertStore>,
    domain: String,
}

impl rustls::client::ResolvesClientCert for ClientCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.certs
            .for_name(Some(&self.domain))
            .map(|c| c.certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Checks the handshake signatures (so the peer holds the key of the
/// certificate it presents) and defers the judgement of the certificate
/// itself to the stream, which knows which domain it has to be valid for and
/// can fall back to Server Dialback when it is not.
#[derive(Debug)]
struct DeferredVerifier(Arc<rustls::crypto::CryptoProvider>);

impl DeferredVerifier {
    fn schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl rustls::client::danger::ServerCertVerifier for DeferredVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.schemes()
    }
}

impl rustls::server::danger::ClientCertVerifier for DeferredVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.schemes()
    }
}

/// Channel-binding data of an established server-side TLS connection.
pub fn channel_bindings(conn: &rustls::ServerConnection, certs: &CertStore) -> ChannelBindings {
    let mut exporter = [0u8; 32];
    let tls_exporter =
        match conn.export_keying_material(&mut exporter, b"EXPORTER-Channel-Binding", None) {
            Ok(_) => Some(exporter.to_vec()),
            Err(_) => None,
        };
    // tls-exporter is only safe with TLS 1.3 or extended master secret; rustls
    // requires EMS for TLS 1.2 by default.
    let tls_server_end_point = certs
        .for_name(conn.server_name())
        .map(|c| c.end_point_hash.clone());
    ChannelBindings {
        tls_exporter,
        tls_server_end_point,
    }
}

fn load_cert(cert_path: &Path, key_path: &Path) -> Result<LoadedCert, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| TlsError::Cert(cert_path.to_owned(), e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Cert(cert_path.to_owned(), e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::Cert(
            cert_path.to_owned(),
            "no certificate in file".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| TlsError::Cert(key_path.to_owned(), e.to_string()))?;
    let signing = provider::sign::any_supported_type(&key)
        .map_err(|e| TlsError::Cert(key_path.to_owned(), e.to_string()))?;
    let end_point_hash = end_point_hash(&chain[0]);
    Ok(LoadedCert {
        certified: Arc::new(CertifiedKey::new(chain, signing)),
        end_point_hash,
    })
}

/// RFC 5929 section 4.1: hash the certificate with its signature algorithm's
/// hash, SHA-256 when that is MD5 or SHA-1.
pub fn end_point_hash(cert: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    match signature_hash(cert) {
        SigHash::Sha384 => sha2::Sha384::digest(cert).to_vec(),
        SigHash::Sha512 => sha2::Sha512::digest(cert).to_vec(),
        SigHash::Sha256 => sha2::Sha256::digest(cert).to_vec(),
    }
}

enum SigHash {
    Sha256,
    Sha384,
    Sha512,
}

/// Read the signatureAlgorithm OID of a DER certificate (a tiny DER walk:
/// Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, ... }).
fn signature_hash(der: &[u8]) -> SigHash {
    fn header(d: &[u8]) -> Option<(u8, usize, usize)> {
        let tag = *d.first()?;
        let l0 = *d.get(1)? as usize;
        if l0 < 0x80 {
            return Some((tag, 2, l0));
        }
        let n = l0 & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *d.get(2 + i)? as usize;
        }
        Some((tag, 2 + n, len))
    }
    let oid = (|| {
        let (_, h, _) = header(der)?; // Certificate
        let rest = der.get(h..)?;
        let (_, th, tl) = header(rest)?; // tbsCertificate
        let rest = rest.get(th + tl..)?;
        let (_, ah, _) = header(rest)?; // AlgorithmIdentifier
        let rest = rest.get(ah..)?;
        let (tag, oh, ol) = header(rest)?;
        if tag != 0x06 {
            return None;
        }
        rest.get(oh..oh + ol).map(|o| o.to_vec())
    })();
    const ECDSA_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
    const ECDSA_SHA512: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04];
    const RSA_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c];
    const RSA_SHA512: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d];
    match oid.as_deref() {
        Some(o) if o == ECDSA_SHA384 || o == RSA_SHA384 => SigHash::Sha384,
        Some(o) if o == ECDSA_SHA512 || o == RSA_SHA512 => SigHash::Sha512,
        _ => SigHash::Sha256,
    }
}

/// Generate a self-signed certificate for `domain` and `*.domain`.
pub fn generate_self_signed(domain: &str, cert: &Path, key: &Path) -> Result<(), TlsError> {
    let names = vec![domain.to_owned(), format!("*.{domain}")];
    let ck = rcgen::generate_simple_self_signed(names)
        .map_err(|e| TlsError::Cert(cert.to_owned(), e.to_string()))?;
    if let Some(dir) = cert.parent() {
        std::fs::create_dir_all(dir).map_err(|e| TlsError::Cert(cert.to_owned(), e.to_string()))?;
    }
    write_private(key, ck.signing_key.serialize_pem().as_bytes())
        .map_err(|e| TlsError::Cert(key.to_owned(), e.to_string()))?;
    std::fs::write(cert, ck.cert.pem())
        .map_err(|e| TlsError::Cert(cert.to_owned(), e.to_string()))?;
    Ok(())
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(data)
    }
    #[cfg(not(unix))]
    {
        std::fs::write(path, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_and_loads_and_picks_by_name() {
        let dir = std::env::temp_dir().join(format!("starling-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = TlsConfig {
            cert_dir: dir.clone(),
            ..TlsConfig::default()
        };
        let store = CertStore::new(&cfg, &["a.test".into(), "b.test".into()]).unwrap();
        let a = store.for_name(Some("a.test")).unwrap();
        let b = store.for_name(Some("b.test")).unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        let sub = store.for_name(Some("conference.b.test")).unwrap();
        assert!(Arc::ptr_eq(&sub, &b));
        let dflt = store.for_name(Some("other")).unwrap();
        assert!(Arc::ptr_eq(&dflt, &a));
        assert_eq!(a.end_point_hash.len(), 32);
        store.reload().unwrap();
        server_config(&store, &[b"xmpp-client"]).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
