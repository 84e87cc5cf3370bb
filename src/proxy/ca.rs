//! TLS material: the per-build CA that signs the certificates the proxy
//! shows the jail when it intercepts HTTPS, and the upstream client
//! configuration, verified against the host's trust store (or the
//! executor's `upstream-ca`).
//!
//! The CA key is generated when the build starts and lives only in the
//! hook's memory: it is never written to disk, so a certificate it signed
//! is worthless after the build. The jail sees only the CA certificate,
//! together with the upstream bundle (tunnelled connections are verified by
//! the build against the real certificates).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::anyhow;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Leaf certificates kept per build (then the cache starts over).
pub const MAX_CACHED_LEAVES: usize = 1024;

/// The per-build certificate authority.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    ca_pem: String,
    /// Host → server config with a leaf certificate for it.
    leaves: Mutex<HashMap<String, Arc<ServerConfig>>>,
}

impl Authority {
    pub fn generate(label: &str) -> anyhow::Result<Authority> {
        let key = KeyPair::generate().map_err(|e| anyhow!("generating the CA key: {e}"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("nix-hatch per-build CA ({label})"),
        );
        dn.push(DnType::OrganizationName, "nix-hatch");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params
            .self_signed(&key)
            .map_err(|e| anyhow!("signing the CA certificate: {e}"))?;
        Ok(Authority {
            ca_der: cert.der().clone(),
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate (PEM), what the jail trusts.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A server config presenting a certificate for `host` (a DNS name or
    /// an IP address), cached per host (at most [`MAX_CACHED_LEAVES`]).
    pub fn server_config(&self, host: &str) -> anyhow::Result<Arc<ServerConfig>> {
        if let Some(c) = self
            .leaves
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(host)
        {
            return Ok(c.clone());
        }
        let key = KeyPair::generate().map_err(|e| anyhow!("generating a key: {e}"))?;
        let mut params = CertificateParams::new(vec![host.to_owned()])
            .map_err(|e| anyhow!("certificate for {host:?}: {e}"))?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, host);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| anyhow!("signing a certificate for {host:?}: {e}"))?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow!("TLS setup: {e}"))?
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone(), self.ca_der.clone()], key_der)
            .map_err(|e| anyhow!("TLS setup for {host:?}: {e}"))?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let cfg = Arc::new(cfg);
        let mut leaves = self.leaves.lock().unwrap_or_else(|e| e.into_inner());
        // A build may name any number of hosts a wildcard rule allows; the
        // cache saves work for the few it uses again, and stays small.
        if leaves.len() >= MAX_CACHED_LEAVES {
            leaves.clear();
        }
        leaves.insert(host.to_owned(), cfg.clone());
        Ok(cfg)
    }
}

/// The certificates of a PEM bundle and its text.
pub fn read_pem_bundle(path: &Path) -> anyhow::Result<(Vec<CertificateDer<'static>>, String)> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("{}: not a PEM certificate bundle: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("{}: no certificates in it", path.display()));
    }
    Ok((certs, text))
}

/// The client config for upstream TLS connections, trusting `bundle`.
/// Returns it with the bundle's PEM text (for the jail's CA file).
pub fn upstream_config(bundle: &Path) -> anyhow::Result<(Arc<ClientConfig>, String)> {
    let (certs, text) = read_pem_bundle(bundle)?;
    let mut roots = RootCertStore::empty();
    let (_, ignored) = roots.add_parsable_certificates(certs);
    if roots.is_empty() {
        return Err(anyhow!(
            "{}: none of its {ignored} certificates is usable",
            bundle.display()
        ));
    }
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(cfg), text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_certificates_chain_to_the_ca() {
        let ca = Authority::generate("test").unwrap();
        assert!(ca.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let a = ca.server_config("example.org").unwrap();
        let b = ca.server_config("example.org").unwrap();
        assert!(Arc::ptr_eq(&a, &b), "cached per host");
        ca.server_config("127.0.0.2").unwrap();
        ca.server_config("::1").unwrap();
    }

    /// A build naming ever new hosts does not grow the cache without end.
    #[test]
    fn the_leaf_cache_is_bounded() {
        let ca = Authority::generate("test").unwrap();
        for i in 0..MAX_CACHED_LEAVES + 10 {
            ca.server_config(&format!("h{i}.example.org")).unwrap();
            assert!(ca.leaves.lock().unwrap().len() <= MAX_CACHED_LEAVES);
        }
    }
}
