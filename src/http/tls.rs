//! TLS client configuration for HTTPS upstreams.
//!
//! Built once at startup (it may read a CA file from disk, which a worker
//! must never do) and shared by every worker's client as an `Arc`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{pem::PemObject, CertificateDer};
use rustls::{ClientConfig, RootCertStore};

/// Why the TLS client configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading CA file {path}: {source}")]
    ReadCa {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing CA file {path}: {source}")]
    ParseCa {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("CA file {0} holds no certificates")]
    NoCertificates(PathBuf),
    #[error("CA file {path}: certificate rejected: {source}")]
    BadCertificate {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("TLS provider setup: {0}")]
    Provider(rustls::Error),
}

/// Client config trusting the webpki roots plus, optionally, every
/// certificate in a PEM file (private CAs, test CAs). Offers only
/// `http/1.1` over ALPN, since that is all the client speaks.
pub fn client_config(extra_roots_pem: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_with(extra_roots_pem.as_slice())
}

/// As [`client_config`], trusting the certificates of several PEM files.
pub fn client_config_with(extra_roots_pem: &[&Path]) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for path in extra_roots_pem {
        add_pem_roots(&mut roots, path)?;
    }
    // Explicit provider: rustls' process default is ambiguous when another
    // crate in the tree enables a second provider feature.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Provider)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn add_pem_roots(roots: &mut RootCertStore, path: &Path) -> Result<(), TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::ReadCa {
        path: path.to_owned(),
        source,
    })?;
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|source| TlsError::ParseCa {
            path: path.to_owned(),
            source,
        })?;
        roots.add(cert).map_err(|source| TlsError::BadCertificate {
            path: path.to_owned(),
            source,
        })?;
        added += 1;
    }
    if added == 0 {
        return Err(TlsError::NoCertificates(path.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_temp(contents: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(contents).expect("write");
        f
    }

    #[test]
    fn default_config_offers_http11() {
        let cfg = client_config(None).expect("config");
        assert_eq!(cfg.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn extra_ca_file_is_loaded() {
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).expect("cert");
        let f = write_temp(ca.cert.pem().as_bytes());
        client_config(Some(f.path())).expect("config with extra CA");
    }

    #[test]
    fn missing_empty_and_garbage_files_are_errors() {
        let missing = Path::new("/nonexistent/ncro-ca.pem");
        assert!(matches!(
            client_config(Some(missing)),
            Err(TlsError::ReadCa { .. })
        ));
        let empty = write_temp(b"no pem here\n");
        assert!(matches!(
            client_config(Some(empty.path())),
            Err(TlsError::NoCertificates(_))
        ));
        let broken = write_temp(b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n");
        assert!(client_config(Some(broken.path())).is_err());
    }
}
