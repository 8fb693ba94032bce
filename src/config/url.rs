//! Parameters of a connection URL's query that fhir-cdc reads itself before the driver
//! parses the rest (TLS settings the driver spells differently or does not know).

/// A parameter's name and its percent-decoded value.
pub type Parameter = (&'static str, String);

/// `url` without the query parameters named in `names`, and those parameters. The error
/// names the parameter, never the URL (it holds the password).
pub fn take_query_parameters(
    url: &str,
    names: &[&'static str],
) -> Result<(String, Vec<Parameter>), String> {
    let mut taken = Vec::new();
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), taken));
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match names.iter().find(|known| **known == name) {
            Some(known) => {
                let value = percent_encoding::percent_decode_str(value)
                    .decode_utf8()
                    .map_err(|_| format!("the value of `{name}` is not UTF-8 once decoded"))?;
                taken.push((*known, value.into_owned()));
            }
            None => kept.push(pair),
        }
    }
    let rest = match kept.is_empty() {
        true => base.to_owned(),
        false => format!("{base}?{}", kept.join("&")),
    };
    Ok((rest, taken))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_parameters_are_taken_decoded_and_the_rest_kept_in_order() {
        let (rest, taken) = take_query_parameters(
            "mysql://u:p@h/db?a=1&ssl-ca=%2Fetc%2Fca.pem&b=2",
            &["ssl-ca", "ssl-mode"],
        )
        .unwrap();
        assert_eq!(rest, "mysql://u:p@h/db?a=1&b=2");
        assert_eq!(taken, [("ssl-ca", "/etc/ca.pem".to_owned())]);
        let (rest, taken) = take_query_parameters("mysql://u:p@h/db", &["ssl-ca"]).unwrap();
        assert_eq!((rest.as_str(), taken.len()), ("mysql://u:p@h/db", 0));
        let (rest, _) = take_query_parameters("mysql://h/db?ssl-ca=x", &["ssl-ca"]).unwrap();
        assert_eq!(rest, "mysql://h/db");
    }
}
