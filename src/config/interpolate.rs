//! `${env:VAR}` and `${file:path}` references inside configuration strings.
//!
//! A reference may stand alone (`"${env:PG_URL}"`) or inside a longer string
//! (`"postgres://cdc:${file:/run/secrets/pg}@db:5432/lab"`). A file's content is used with one
//! trailing newline removed, as secret files usually end with one. `$${` writes a literal `${`.
//! An unset variable, an unreadable file or an unknown reference kind is an error — never an
//! empty string, which would only fail later and more obscurely.

use std::{env, fs};

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum InterpolateError {
    #[error("environment variable {0} is not set (referenced as ${{env:{0}}})")]
    UnsetVariable(String),
    #[error("cannot read secret file {path} (referenced as ${{file:{path}}}): {reason}")]
    UnreadableFile { path: String, reason: String },
    #[error("unknown reference ${{{0}}}: only ${{env:VAR}} and ${{file:path}} are supported")]
    UnknownKind(String),
    #[error("unterminated reference starting at `${{{0}`: a closing `}}` is missing")]
    Unterminated(String),
}

/// Replace every reference in `raw` by what it names.
pub fn resolve(raw: &str) -> Result<String, InterpolateError> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        if let Some(escaped) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = escaped;
        } else if let Some(body) = after.strip_prefix("${") {
            let end = body
                .find('}')
                .ok_or_else(|| InterpolateError::Unterminated(body.chars().take(20).collect()))?;
            out.push_str(&lookup(&body[..end])?);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn lookup(reference: &str) -> Result<String, InterpolateError> {
    match reference.split_once(':') {
        Some(("env", name)) => {
            env::var(name).map_err(|_| InterpolateError::UnsetVariable(name.to_owned()))
        }
        Some(("file", path)) => fs::read_to_string(path)
            .map(|content| {
                let trimmed = content.strip_suffix('\n').unwrap_or(&content);
                trimmed.strip_suffix('\r').unwrap_or(trimmed).to_owned()
            })
            .map_err(|e| InterpolateError::UnreadableFile {
                path: path.to_owned(),
                reason: e.to_string(),
            }),
        _ => Err(InterpolateError::UnknownKind(reference.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn plain_strings_pass_through() {
        assert_eq!(
            resolve("no references, $5 and $x").unwrap(),
            "no references, $5 and $x"
        );
    }

    #[test]
    fn env_and_file_references_resolve_inside_strings() {
        // PATH is set in every environment these tests run in.
        let path = env::var("PATH").unwrap();
        assert_eq!(resolve("a${env:PATH}b").unwrap(), format!("a{path}b"));

        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "s3cret").unwrap();
        let reference = format!("pw=${{file:{}}};", file.path().display());
        assert_eq!(resolve(&reference).unwrap(), "pw=s3cret;");
    }

    #[test]
    fn escapes_write_a_literal_reference() {
        assert_eq!(resolve("$${env:X}").unwrap(), "${env:X}");
    }

    #[test]
    fn failures_name_what_is_missing() {
        assert_eq!(
            resolve("${env:FHIR_CDC_SURELY_UNSET_VARIABLE}"),
            Err(InterpolateError::UnsetVariable(
                "FHIR_CDC_SURELY_UNSET_VARIABLE".into()
            ))
        );
        assert_eq!(
            resolve("${vault:x}"),
            Err(InterpolateError::UnknownKind("vault:x".into()))
        );
        assert!(matches!(
            resolve("${env:X"),
            Err(InterpolateError::Unterminated(_))
        ));
        assert!(matches!(
            resolve("${file:/nonexistent/secret}"),
            Err(InterpolateError::UnreadableFile { .. })
        ));
    }
}
