//! SQL Server's connection strings, as DBAs write them (ADO.NET `key=value;…`, or JDBC),
//! read into tiberius's configuration and checked when the configuration loads: an error
//! names what is wrong and never quotes the password.

use super::Secret;

/// The connection string's settings, checked: an error names what is wrong and never
/// quotes the password.
pub fn config(url: &Secret) -> Result<tiberius::Config, String> {
    let text = url.expose();
    if text.contains("://") && !text.starts_with("jdbc:") {
        return Err("a sqlserver source takes an ADO.NET connection string (`Server=tcp:host,1433;Database=…;User Id=…;Password=…`), not a URL".into());
    }
    let parsed = if text.starts_with("jdbc:") {
        tiberius::Config::from_jdbc_string(text)
    } else {
        tiberius::Config::from_ado_string(text)
    };
    let config = parsed.map_err(|e| {
        format!(
            "not a connection string tiberius reads: {}",
            without_password(&e.to_string(), text)
        )
    })?;
    let keys = keys(text);
    if !keys.iter().any(|(k, v)| {
        ["database", "initial catalog", "databasename"].contains(&k.as_str()) && !v.is_empty()
    }) {
        return Err("names no database: add `Database=<the database with CDC enabled>`".into());
    }
    if !cfg!(feature = "integrated-auth")
        && keys.iter().any(|(k, v)| {
            [
                "integratedsecurity",
                "integrated security",
                "trusted_connection",
            ]
            .contains(&k.as_str())
                && ["true", "yes", "sspi"].contains(&v.to_ascii_lowercase().as_str())
        })
    {
        return Err("integrated (Windows or Kerberos) authentication is not in this build (cargo feature `integrated-auth`): use a SQL login (`User Id=…;Password=…`)".into());
    }
    Ok(config)
}

/// The database the connection string names.
pub fn database(url: &Secret) -> Option<String> {
    keys(url.expose())
        .into_iter()
        .find(|(k, _)| ["database", "initial catalog", "databasename"].contains(&k.as_str()))
        .map(|(_, v)| v)
}

/// The string's `key=value` pairs, keys in lower case, values unquoted (`{…}`, `'…'` and
/// `"…"` may hold `;`; a doubled quote is one). Only for the keys tiberius does not report
/// back (the database, the authentication asked for) and for keeping the password out of
/// messages; tiberius reads the string itself.
fn keys(text: &str) -> Vec<(String, String)> {
    let body = text
        .strip_prefix("jdbc:sqlserver://")
        .map_or(text, |rest| rest.split_once(';').map_or("", |(_, p)| p));
    let mut pairs = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.trim().is_empty() && chars.peek().is_none() {
            return pairs;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        match chars.peek().copied() {
            Some(open @ ('{' | '\'' | '"')) => {
                chars.next();
                let close = if open == '{' { '}' } else { open };
                while let Some(c) = chars.next() {
                    if c == close {
                        if open != '{' && chars.next_if_eq(&close).is_some() {
                            value.push(c);
                            continue;
                        }
                        break;
                    }
                    value.push(c);
                }
                chars.by_ref().take_while(|c| *c != ';').for_each(drop);
            }
            _ => value.extend(chars.by_ref().take_while(|c| *c != ';')),
        }
        pairs.push((key.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
}

/// `message` with the connection string's password, if it quotes it, as `***`.
fn without_password(message: &str, text: &str) -> String {
    keys(text)
        .into_iter()
        .filter(|(k, v)| ["password", "pwd"].contains(&k.as_str()) && !v.is_empty())
        .fold(message.to_owned(), |m, (_, password)| {
            m.replace(&password, "***")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ado_strings_as_dbas_write_them() {
        let url = Secret::new("Server=tcp:db.example,1433;Initial Catalog=lab;User Id=fhir;Password={p;w=d};Encrypt=true;TrustServerCertificate=false");
        assert!(keys(url.expose()).contains(&("password".to_owned(), "p;w=d".to_owned())));
        assert!(keys("a='it''s; x';b=2").contains(&("a".to_owned(), "it's; x".to_owned())));
        let config = config(&url).unwrap();
        assert_eq!(config.get_addr(), "db.example:1433");
        assert_eq!(database(&url).as_deref(), Some("lab"));
        let jdbc =
            Secret::new("jdbc:sqlserver://db.example:1433;databaseName=lab;user=fhir;password=x");
        assert_eq!(database(&jdbc).as_deref(), Some("lab"));
        assert!(super::config(&jdbc).is_ok());
    }

    #[test]
    fn bad_strings_say_what_is_wrong_without_the_password() {
        for (text, says) in [
            ("Server=db;User Id=u;Password=hunter2", "names no database"),
            ("mssql://u:hunter2@db/lab", "not a URL"),
            (
                "Server=db;Database=lab;IntegratedSecurity=true",
                "integrated",
            ),
            (
                "Server=db;Database=lab;Password=hunter2;Encrypt=hunter2",
                "hunter2",
            ),
        ] {
            let err = config(&Secret::new(text)).unwrap_err();
            if says.starts_with("hun") {
                assert!(!err.contains(says) && !err.contains("ter2"), "{err}");
            } else {
                assert!(
                    err.contains(says) && !err.contains("hunter2"),
                    "{text}: {err}"
                );
            }
        }
    }
}
