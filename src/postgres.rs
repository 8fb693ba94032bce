//! Connections to PostgreSQL — the source's queries, its replication session and the
//! projection database — from one connection string, libpq's: a URL
//! (`postgres://user:password@host:port/db?sslmode=verify-full&sslrootcert=/ca.pem`) or
//! `key=value` pairs, with libpq's TLS parameters:
//!
//! - `sslmode`: `disable`, `prefer` (the default, as in libpq: TLS when the server offers
//!   it, unverified), `require` (TLS, unverified; verified against `sslrootcert` when one
//!   is given, as libpq does), `verify-ca` (the certificate chain) or `verify-full` (the
//!   chain and the host name).
//! - `sslrootcert`: the PEM file of the CA(s) to trust, or `system` for the system's
//!   roots; the verifying modes need it (libpq's default, `~/.postgresql/root.crt`, is
//!   not read: a sidecar has no home to put it in).
//! - `sslcert` and `sslkey`: a client certificate and its key (PEM; the key PKCS#8).
//!
//! tokio-postgres knows `disable`, `prefer` and `require` only, and verifies nothing by
//! itself; the TLS parameters are taken out here, the rest goes to its parser, and the
//! verification is native-tls's (OpenSSL). The replication session (pgwire-replication)
//! does the same with rustls, from the same parameters.

use std::{path::PathBuf, str::FromStr};

use native_tls::{Certificate, Identity, TlsConnector};
use pgwire_replication::config::{SslMode as ReplicationSslMode, TlsConfig};
use postgres_native_tls::MakeTlsConnector;
use tokio_postgres::{config::SslMode as PgSslMode, Client, Config};

use crate::config::{take_query_parameters, Parameter, Secret};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Result<Self, String> {
        Ok(match text {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => {
                return Err(format!(
                "sslmode `{other}` is not one of disable, prefer, require, verify-ca, verify-full"
            ))
            }
        })
    }
}

/// The TLS parameters of a connection string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    pub mode: SslMode,
    /// `None` for the system's roots (`sslrootcert=system`) or when nothing is verified.
    pub root_cert: Option<PathBuf>,
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl Tls {
    /// The mode in effect: `require` with a root certificate verifies the chain, as in
    /// libpq.
    pub fn effective_mode(&self) -> SslMode {
        match (self.mode, &self.root_cert) {
            (SslMode::Require, Some(_)) => SslMode::VerifyCa,
            (mode, _) => mode,
        }
    }

    fn connector(&self) -> Result<MakeTlsConnector, String> {
        let mut builder = TlsConnector::builder();
        match self.effective_mode() {
            SslMode::VerifyFull => {}
            SslMode::VerifyCa => {
                builder.danger_accept_invalid_hostnames(true);
            }
            SslMode::Disable | SslMode::Prefer | SslMode::Require => {
                builder
                    .danger_accept_invalid_certs(true)
                    .danger_accept_invalid_hostnames(true);
            }
        }
        if let Some(path) = &self.root_cert {
            let pem = read(path, "sslrootcert")?;
            let roots = Certificate::stack_from_pem(&pem)
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            if roots.is_empty() {
                return Err(format!(
                    "sslrootcert {}: no PEM certificate in the file",
                    path.display()
                ));
            }
            builder.disable_built_in_roots(true);
            for root in roots {
                builder.add_root_certificate(root);
            }
        }
        if let Some((cert, key)) = &self.client_cert {
            let identity = Identity::from_pkcs8(&read(cert, "sslcert")?, &read(key, "sslkey")?)
                .map_err(|e| {
                    format!(
                        "sslcert {} with sslkey {}: {e} (the key must be PEM PKCS#8: `openssl pkcs8 -topk8 -nocrypt`)",
                        cert.display(),
                        key.display()
                    )
                })?;
            builder.identity(identity);
        }
        let connector = builder.build().map_err(|e| format!("TLS: {e}"))?;
        Ok(MakeTlsConnector::new(connector))
    }

    /// The same settings for the replication session with `host`.
    pub fn replication(&self, host: &str) -> TlsConfig {
        let mut tls = TlsConfig {
            mode: match self.effective_mode() {
                SslMode::Disable => ReplicationSslMode::Disable,
                SslMode::Prefer => ReplicationSslMode::Prefer,
                SslMode::Require => ReplicationSslMode::Require,
                SslMode::VerifyCa => ReplicationSslMode::VerifyCa,
                SslMode::VerifyFull => ReplicationSslMode::VerifyFull,
            },
            ca_pem_path: self.root_cert.clone(),
            ..TlsConfig::default()
        };
        if let Some((cert, key)) = &self.client_cert {
            tls = tls.with_client_cert(cert, key);
        }
        // pgwire-replication refuses verify-full with an IP address for a host unless the
        // name to verify is given: it is that address (rustls checks the certificate's IP
        // names, as libpq does).
        if host.parse::<std::net::IpAddr>().is_ok() {
            tls = tls.with_sni_hostname(host);
        }
        tls
    }
}

fn read(path: &PathBuf, key: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{key} {}: {e}", path.display()))
}

/// A parsed connection string. Its `Debug` shows no password (tokio-postgres redacts it).
#[derive(Debug, Clone)]
pub struct Target {
    pub config: Config,
    pub tls: Tls,
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The connection string, or a TLS file it names: fixing the configuration is the cure.
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

impl crate::error::Kinded for ConnectError {
    fn kind(&self) -> crate::error::Kind {
        match self {
            ConnectError::Setup(_) => crate::error::Kind::Configuration,
            ConnectError::Postgres(e) => e.kind(),
        }
    }
}

impl Target {
    /// Parse `url`. The error names the parameter at fault, never the string itself (it
    /// holds the password).
    pub fn parse(url: &Secret) -> Result<Self, String> {
        let (rest, parameters) = take_tls_parameters(url.expose())?;
        let mut config = Config::from_str(&rest).map_err(|e| e.to_string())?;
        let mut tls = Tls::default();
        let mut cert = None;
        let mut key = None;
        let mut system_roots = false;
        for (name, value) in parameters {
            match name {
                "sslmode" => tls.mode = SslMode::parse(&value)?,
                "sslrootcert" if value == "system" => system_roots = true,
                "sslrootcert" => tls.root_cert = Some(value.into()),
                "sslcert" => cert = Some(PathBuf::from(value)),
                _ => key = Some(PathBuf::from(value)),
            }
        }
        tls.client_cert = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => return Err("sslcert and sslkey go together: give both or neither".into()),
        };
        let verifying = matches!(tls.mode, SslMode::VerifyCa | SslMode::VerifyFull);
        if verifying && tls.root_cert.is_none() && !system_roots {
            return Err(
                "sslmode verify-ca and verify-full need sslrootcert: the CA's PEM file, or `system` for the system's trusted roots"
                    .into(),
            );
        }
        if tls.mode == SslMode::Disable && (tls.root_cert.is_some() || tls.client_cert.is_some()) {
            return Err(
                "sslmode=disable with sslrootcert, sslcert or sslkey: the files would not be used"
                    .into(),
            );
        }
        config.ssl_mode(match tls.mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            _ => PgSslMode::Require,
        });
        Ok(Self { config, tls })
    }

    /// A client; its connection runs as a task of its own.
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        let connector = self.tls.connector().map_err(ConnectError::Setup)?;
        let (client, connection) = self.config.connect(connector).await?;
        tokio::spawn(connection);
        Ok(client)
    }
}

/// [`Target::parse`] and [`Target::connect`].
pub async fn connect(url: &Secret) -> Result<Client, ConnectError> {
    Target::parse(url)
        .map_err(ConnectError::Setup)?
        .connect()
        .await
}

const TLS_PARAMETERS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// The connection string without its TLS parameters, and those parameters.
fn take_tls_parameters(url: &str) -> Result<(String, Vec<Parameter>), String> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return take_query_parameters(url, &TLS_PARAMETERS);
    }
    let mut taken = Vec::new();
    // key = value pairs, a value optionally in single quotes with \' and \\ escapes.
    let mut rest = String::new();
    let mut chars = url.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut name = String::new();
        while let Some(&(_, c)) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            name.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
            chars.next();
        }
        if chars.next().is_none_or(|(_, c)| c != '=') {
            return Err(format!(
                "`{name}` in the connection string has no `= value`"
            ));
        }
        while chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek().is_some_and(|(_, c)| *c == '\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some((_, '\'')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, c)) => value.push(c),
                        None => break,
                    },
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("the value of `{name}` has no closing quote")),
                }
            }
        } else {
            while let Some(&(_, c)) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        let end = chars.peek().map_or(url.len(), |(i, _)| *i);
        match TLS_PARAMETERS.iter().find(|known| **known == name) {
            Some(known) => taken.push((*known, value)),
            None => {
                rest.push_str(&url[start..end]);
                rest.push(' ');
            }
        }
    }
    Ok((rest.trim_end().to_owned(), taken))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> Result<Target, String> {
        Target::parse(&Secret::new(url))
    }

    #[test]
    fn the_tls_parameters_of_a_url_are_taken_and_the_rest_is_tokio_postgres_s() {
        let parsed = target("postgres://u:p%40ss@db:5433/lab?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem&sslcert=/c.pem&sslkey=/k.pem").unwrap();
        assert_eq!(parsed.tls.mode, SslMode::VerifyFull);
        assert_eq!(parsed.tls.root_cert, Some("/etc/ca.pem".into()));
        assert_eq!(
            parsed.tls.client_cert,
            Some(("/c.pem".into(), "/k.pem".into()))
        );
        assert_eq!(parsed.config.get_application_name(), Some("x"));
        assert_eq!(parsed.config.get_password(), Some(&b"p@ss"[..]));
        assert_eq!(parsed.config.get_ssl_mode(), PgSslMode::Require);
        let replication = parsed.tls.replication("db");
        assert_eq!(replication.mode, ReplicationSslMode::VerifyFull);
        assert!(replication.is_mtls());
    }

    #[test]
    fn key_value_strings_take_quoted_values_and_keep_the_rest() {
        let parsed = target(
            r"host=db user=u password='it''s \'quoted\'' sslmode = require sslrootcert='/a b/ca.pem' dbname=lab",
        );
        // A doubled quote is not an escape in libpq: the value ends at the second quote.
        assert!(parsed.is_err(), "{parsed:?}");
        let parsed = target(
            r"host=db user=u password='it\'s quoted' sslmode = require sslrootcert='/a b/ca.pem' dbname=lab",
        )
        .unwrap();
        assert_eq!(parsed.tls.mode, SslMode::Require);
        assert_eq!(parsed.tls.effective_mode(), SslMode::VerifyCa);
        assert_eq!(parsed.tls.root_cert, Some("/a b/ca.pem".into()));
        assert_eq!(parsed.config.get_password(), Some(&b"it's quoted"[..]));
        assert_eq!(parsed.config.get_dbname(), Some("lab"));
    }

    #[test]
    fn bad_tls_parameters_are_named_without_the_string() {
        for (url, expected) in [
            (
                "postgres://u:secret@h/d?sslmode=verify",
                "sslmode `verify` is not one of",
            ),
            (
                "postgres://u:secret@h/d?sslmode=verify-full",
                "need sslrootcert",
            ),
            (
                "postgres://u:secret@h/d?sslcert=/c.pem",
                "sslcert and sslkey go together",
            ),
            (
                "postgres://u:secret@h/d?sslmode=disable&sslrootcert=/ca.pem",
                "would not be used",
            ),
            ("host=h password='secret", "`password` has no closing quote"),
        ] {
            let error = target(url).unwrap_err();
            assert!(error.contains(expected), "{url}: {error}");
            assert!(!error.contains("secret"), "{error}");
        }
        let system = target("postgres://u@h/d?sslmode=verify-full&sslrootcert=system").unwrap();
        assert_eq!(system.tls.root_cert, None);
        assert_eq!(
            target("postgres://u@h/d").unwrap().tls.mode,
            SslMode::Prefer
        );
    }
}
