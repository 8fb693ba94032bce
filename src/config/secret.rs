//! Values that must never be printed: passwords, keys, URLs with credentials.

use std::fmt;

use serde::{Deserialize, Deserializer};

use super::interpolate;

/// A configuration value that never prints. `Debug` and `Display` show `***`; the value is
/// reachable only through [`Secret::expose`], so every use of it is visible in review.
///
/// Deserializing resolves `${env:VAR}` and `${file:path}` references (see
/// [`interpolate`](super::interpolate)).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for handing to a client library. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        interpolate::resolve(&raw)
            .map(Secret)
            .map_err(serde::de::Error::custom)
    }
}

/// `text` with the password of every URL in it (`scheme://user:password@host`) shown as
/// `***`: for messages that name a URL, or quote an error that does.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        // Credentials end at the last `@` before a blank: a password written with a raw
        // `/`, `?` or `#` in it would otherwise end the authority early and be shown (an
        // `@` in a path redacts too much, which is the safe way to be wrong).
        let end = after.find(char::is_whitespace).unwrap_or(after.len());
        let authority = &after[..end];
        match authority.rfind('@') {
            Some(at_sign) => {
                let user = &authority[..at_sign];
                match user.find(':') {
                    Some(colon) => {
                        out.push_str(&user[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(user),
                }
                out.push_str(&authority[at_sign..]);
            }
            None => out.push_str(authority),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_its_value() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret}"), "***");
        assert_eq!(format!("{secret:?}"), "Secret(***)");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn passwords_in_urls_are_hidden_and_the_rest_kept() {
        assert_eq!(
            redact_urls(
                "nothing at http://user:s3cret@reg:8081/apis (refused); postgres://a:b@h/db"
            ),
            "nothing at http://user:***@reg:8081/apis (refused); postgres://a:***@h/db"
        );
        assert_eq!(
            redact_urls("http://user@h/x http://h:1"),
            "http://user@h/x http://h:1"
        );
        assert_eq!(redact_urls("https://u:p@ss@h"), "https://u:***@h");
        assert_eq!(
            redact_urls("postgres://u:pa/s?s#w@h:5432/db as u"),
            "postgres://u:***@h:5432/db as u"
        );
        assert_eq!(redact_urls("no url here"), "no url here");
    }
}
