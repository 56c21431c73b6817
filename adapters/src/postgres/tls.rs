//! TLS for the Postgres adapter, with rustls: the libpq `sslmode` and `sslrootcert` URL
//! parameters, read here (tokio-postgres itself knows only `disable`, `prefer` and `require`,
//! and does no certificate checks of its own).
//!
//! | `sslmode` | what keel does |
//! |---|---|
//! | absent, `disable` | no TLS |
//! | `prefer`, `allow` | TLS if the server offers it, without checking its certificate (libpq's meaning) |
//! | `require` | TLS or no connection; the certificate is not checked (libpq's meaning: protects against eavesdropping, not against an impostor) |
//! | `verify-ca` | TLS, and the certificate must chain to a trusted CA |
//! | `verify-full` | TLS, the certificate must chain to a trusted CA and name the host connected to |
//!
//! Trusted CAs are the PEM file named by `sslrootcert`, or the system's store.

use std::path::PathBuf;
use std::sync::Arc;

use keel_primitives::{Error, ErrorKind, Result};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode;

/// The TLS part of a connection string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct TlsParams {
    pub(crate) mode: Mode,
    pub(crate) root_cert: Option<PathBuf>,
}

/// `sslmode`, as keel implements it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Mode {
    #[default]
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// Takes `sslmode` and `sslrootcert` out of a URL (`postgres://…?sslmode=…`) or a key/value
/// string (`host=… sslmode=…`), returning the rest for tokio-postgres.
pub(crate) fn split(conninfo: &str) -> Result<(String, TlsParams)> {
    let mut params = TlsParams::default();
    let mut take = |name: &str, value: &str| -> Result<bool> {
        match name {
            "sslmode" => {
                params.mode = match value {
                    "disable" => Mode::Disable,
                    "allow" | "prefer" => Mode::Prefer,
                    "require" => Mode::Require,
                    "verify-ca" => Mode::VerifyCa,
                    "verify-full" => Mode::VerifyFull,
                    other => {
                        return Err(Error::new(
                            ErrorKind::InvalidInput,
                            format!(
                                "unknown sslmode {other:?}; use disable, prefer, require, \
                                 verify-ca or verify-full"
                            ),
                        ));
                    }
                };
                Ok(true)
            }
            "sslrootcert" => {
                params.root_cert = Some(PathBuf::from(value));
                Ok(true)
            }
            _ => Ok(false),
        }
    };
    let is_url = conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://");
    let rest = if is_url {
        match conninfo.split_once('?') {
            None => conninfo.to_owned(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                    if !take(name, value)? {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for word in conninfo.split_whitespace() {
            let (name, value) = word.split_once('=').unwrap_or((word, ""));
            if !take(name.trim(), value.trim_matches('\''))? {
                kept.push(word);
            }
        }
        kept.join(" ")
    };
    Ok((rest, params))
}

impl TlsParams {
    /// The mode tokio-postgres negotiates with.
    pub(crate) fn ssl_mode(&self) -> SslMode {
        match self.mode {
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
        }
    }

    /// The rustls client configuration, or `None` without TLS.
    pub(crate) fn client_config(&self) -> Result<Option<ClientConfig>> {
        if self.mode == Mode::Disable {
            if self.root_cert.is_some() {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "sslrootcert is set without an sslmode that uses TLS (require, verify-ca, \
                     verify-full)",
                ));
            }
            return Ok(None);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::new(ErrorKind::Permanent, "rustls setup failed").with_source(e))?;
        let config = match self.mode {
            Mode::Disable => unreachable!("handled above"),
            Mode::Prefer | Mode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
                .with_no_client_auth(),
            Mode::VerifyCa | Mode::VerifyFull => {
                let roots = Arc::new(self.roots()?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| {
                        Error::new(ErrorKind::InvalidInput, "no usable CA certificate")
                            .with_source(e)
                    })?;
                let verifier: Arc<dyn ServerCertVerifier> = if self.mode == Mode::VerifyCa {
                    Arc::new(ChainOnly(webpki))
                } else {
                    webpki
                };
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(verifier)
                    .with_no_client_auth()
            }
        };
        Ok(Some(config))
    }

    fn roots(&self) -> Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        match &self.root_cert {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path).map_err(|e| {
                    Error::new(
                        ErrorKind::InvalidInput,
                        format!("cannot read sslrootcert {}", path.display()),
                    )
                    .with_source(e)
                })?;
                for cert in certs {
                    let cert = cert.map_err(|e| {
                        Error::new(
                            ErrorKind::InvalidInput,
                            format!(
                                "sslrootcert {} is not a PEM certificate file",
                                path.display()
                            ),
                        )
                        .with_source(e)
                    })?;
                    roots.add(cert).map_err(|e| {
                        Error::new(
                            ErrorKind::InvalidInput,
                            "an sslrootcert certificate is invalid",
                        )
                        .with_source(e)
                    })?;
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    // A system certificate rustls cannot use is skipped, as libpq would.
                    let _ = roots.add(cert);
                }
            }
        }
        if roots.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "no trusted CA certificates for sslmode verify-ca/verify-full: set sslrootcert",
            ));
        }
        Ok(roots)
    }
}

/// `sslmode=require`/`prefer`: encrypt, accept any certificate (libpq's documented meaning).
/// Handshake signatures are still checked, so the session is bound to the presented key.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
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
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to a trusted CA; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_urls_and_key_values() {
        let (rest, p) = split(
            "postgres://u@h:5432/db?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u@h:5432/db?application_name=x");
        assert_eq!(p.mode, Mode::VerifyFull);
        assert_eq!(p.root_cert, Some(PathBuf::from("/ca.pem")));
        let (rest, p) = split("host=h user=u sslmode=require dbname=d").unwrap();
        assert_eq!(rest, "host=h user=u dbname=d");
        assert_eq!(p.mode, Mode::Require);
        let (rest, p) = split("postgres://u@h/db").unwrap();
        assert_eq!(
            (rest.as_str(), p.mode),
            ("postgres://u@h/db", Mode::Disable)
        );
        assert!(split("postgres://h/db?sslmode=bogus").is_err());
        let no_tls = TlsParams {
            mode: Mode::Disable,
            root_cert: Some(PathBuf::from("/ca.pem")),
        };
        assert!(no_tls.client_config().is_err());
    }
}
