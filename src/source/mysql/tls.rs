//! TLS to MySQL and MariaDB, in the MySQL client's words, as query parameters of the
//! source URL: `ssl-mode` (`DISABLED`, the default, `REQUIRED`, `VERIFY_CA`,
//! `VERIFY_IDENTITY`), `ssl-ca` (the CA's PEM file), `ssl-cert` and `ssl-key` (a client
//! certificate and its key, PEM). The connections (queries, snapshots and the binary-log
//! session) use them through mysql_async with rustls.
//!
//! `PREFERRED`, the MySQL client's default, is not offered: mysql_async cannot fall back
//! to plaintext, and a silent fallback is what a security review objects to. Without
//! `ssl-mode` the connection is plaintext, and `check` warns.

use std::path::PathBuf;

use mysql_async::{ClientIdentity, Opts, OptsBuilder, SslOpts};

use crate::config::{take_query_parameters, Secret};

/// The MySQL client's `--ssl-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    #[default]
    Disabled,
    Required,
    VerifyCa,
    VerifyIdentity,
}

/// `url` as mysql_async's options, with its TLS parameters applied. The error names the
/// parameter at fault, never the URL.
pub fn opts(url: &Secret) -> Result<(Opts, SslMode), String> {
    let (rest, parameters) =
        take_query_parameters(url.expose(), &["ssl-mode", "ssl-ca", "ssl-cert", "ssl-key"])?;
    let opts = Opts::from_url(&rest).map_err(|e| e.to_string())?;
    let mut mode = SslMode::default();
    let (mut ca, mut cert, mut key) = (None, None, None);
    for (name, value) in parameters {
        match name {
            "ssl-mode" => {
                mode = match value.to_ascii_uppercase().replace('-', "_").as_str() {
                    "DISABLED" => SslMode::Disabled,
                    "REQUIRED" => SslMode::Required,
                    "VERIFY_CA" => SslMode::VerifyCa,
                    "VERIFY_IDENTITY" => SslMode::VerifyIdentity,
                    "PREFERRED" => return Err("ssl-mode PREFERRED would fall back to plaintext silently: use REQUIRED, VERIFY_CA or VERIFY_IDENTITY, or DISABLED".into()),
                    _ => return Err(format!("ssl-mode `{value}` is not one of DISABLED, REQUIRED, VERIFY_CA, VERIFY_IDENTITY")),
                }
            }
            "ssl-ca" => ca = Some(PathBuf::from(value)),
            "ssl-cert" => cert = Some(PathBuf::from(value)),
            _ => key = Some(PathBuf::from(value)),
        }
    }
    if opts.ssl_opts().is_some() {
        return Err(
            "require_ssl, verify_ca and verify_identity: write ssl-mode (and ssl-ca) instead"
                .into(),
        );
    }
    let identity = match (cert, key) {
        (Some(cert), Some(key)) => Some(ClientIdentity::new(cert.into(), key.into())),
        (None, None) => None,
        _ => return Err("ssl-cert and ssl-key go together: give both or neither".into()),
    };
    if mode == SslMode::Disabled {
        if ca.is_some() || identity.is_some() {
            return Err("ssl-ca, ssl-cert or ssl-key without ssl-mode: the files would not be used; add ssl-mode=VERIFY_IDENTITY".into());
        }
        return Ok((opts, mode));
    }
    let verifying = matches!(mode, SslMode::VerifyCa | SslMode::VerifyIdentity);
    if verifying && ca.is_none() {
        return Err("ssl-mode VERIFY_CA and VERIFY_IDENTITY need ssl-ca: the CA's PEM file".into());
    }
    // rustls needs a process-wide crypto provider when more than one is built in; the
    // first call installs it, later ones find it there.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut ssl = SslOpts::default()
        .with_client_identity(identity)
        .with_danger_accept_invalid_certs(!verifying)
        .with_danger_skip_domain_validation(mode != SslMode::VerifyIdentity);
    if let Some(ca) = ca {
        ssl = ssl
            .with_root_certs(vec![ca.into()])
            .with_disable_built_in_roots(true);
    }
    Ok((OptsBuilder::from_opts(opts).ssl_opts(ssl).into(), mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(url: &str) -> Result<(Opts, SslMode), String> {
        opts(&Secret::new(url))
    }

    #[test]
    fn the_modes_set_what_mysql_async_verifies() {
        let (opts, mode) = parsed("mysql://u:p@db:3306/billing").unwrap();
        assert_eq!((mode, opts.ssl_opts().is_none()), (SslMode::Disabled, true));
        let (opts, mode) = parsed("mysql://u:p@db/billing?ssl-mode=required").unwrap();
        let ssl = opts.ssl_opts().unwrap();
        assert_eq!(mode, SslMode::Required);
        assert!(ssl.accept_invalid_certs() && ssl.skip_domain_validation());
        let (opts, _) = parsed(
            "mysql://u:p@db/billing?ssl-mode=VERIFY_IDENTITY&ssl-ca=/ca.pem&ssl-cert=/c.pem&ssl-key=/k.pem",
        )
        .unwrap();
        let ssl = opts.ssl_opts().unwrap();
        assert!(!ssl.accept_invalid_certs() && !ssl.skip_domain_validation());
        assert!(ssl.client_identity().is_some() && ssl.disable_built_in_roots());
        assert_eq!(opts.db_name(), Some("billing"));
    }

    #[test]
    fn bad_tls_parameters_are_named_without_the_url() {
        for (url, expected) in [
            (
                "mysql://u:secret@h/d?ssl-mode=PREFERRED",
                "fall back to plaintext",
            ),
            (
                "mysql://u:secret@h/d?ssl-mode=on",
                "ssl-mode `on` is not one of",
            ),
            ("mysql://u:secret@h/d?ssl-mode=VERIFY_CA", "need ssl-ca"),
            ("mysql://u:secret@h/d?ssl-ca=/ca.pem", "without ssl-mode"),
            (
                "mysql://u:secret@h/d?ssl-mode=REQUIRED&ssl-key=/k.pem",
                "go together",
            ),
            ("mysql://u:secret@h/d?require_ssl=true", "write ssl-mode"),
        ] {
            let error = parsed(url).unwrap_err();
            assert!(error.contains(expected), "{url}: {error}");
            assert!(!error.contains("secret"), "{error}");
        }
    }
}
