//! The one TLS client configuration, for HTTPS and MQTTS alike: rustls with ring (never
//! aws-lc-rs), the system's root certificates, and `server.ca_file` for a private CA.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, pem::PemObject};

use crate::config::Config;
use crate::error::Error;

/// The roots: the system's, and `server.ca_file`'s certificates beside them.
pub fn root_store(config: &Config) -> Result<rustls::RootCertStore, Error> {
    let mut roots = rustls::RootCertStore::empty();
    // the system's roots (a certificate it cannot parse is skipped), only where TLS is used:
    // parsed, they are a megabyte of the agent's memory
    let server = &config.server;
    let secure = server
        .url
        .as_deref()
        .is_some_and(|u| u.starts_with("https://"))
        || server
            .mqtt_url
            .as_deref()
            .is_some_and(|u| u.starts_with("mqtts://"));
    if secure {
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    }
    if let Some(ca) = &config.server.ca_file {
        let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .and_then(|certs| certs.collect::<Result<_, _>>())
            .map_err(|e| Error::Config(format!("server.ca_file {}: {e}", ca.display())))?;
        for certificate in certificates {
            roots
                .add(certificate)
                .map_err(|e| Error::Config(format!("server.ca_file {}: {e}", ca.display())))?;
        }
    }
    Ok(roots)
}

/// A client configuration trusting [`root_store`], with ring as the crypto provider.
pub fn client_config(config: &Config) -> Result<Arc<rustls::ClientConfig>, Error> {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Client(e.to_string()))?
    .with_root_certificates(root_store(config)?)
    .with_no_client_auth();
    Ok(Arc::new(tls))
}
