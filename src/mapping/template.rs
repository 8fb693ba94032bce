//! String templates: literal text with `{column}` placeholders; `{{` and `}}` write braces.

use crate::change::{Column, Row, Value};

use super::convert::text_of;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Column(Column),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// Why a template cannot be rendered for a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenderError {
    /// The column holds NULL.
    Null(String),
    /// The row has no such column (it vanished from the table).
    Missing(String),
}

impl Template {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(format!("`{{{name}` is not closed: write `{{column}}`, or `{{{{` for a brace")),
                        }
                    }
                    let valid =
                        !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_');
                    if !valid {
                        return Err(format!("`{{{name}}}` is not a column name"));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Column(Column::new(name)));
                }
                '}' => return Err("a lone `}`: write `}}` for a brace".into()),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Self { parts })
    }

    /// The columns the template reads, in order.
    pub fn columns(&self) -> impl Iterator<Item = &Column> {
        self.parts.iter().filter_map(|p| match p {
            Part::Column(c) => Some(c),
            Part::Literal(_) => None,
        })
    }

    /// Whether the template reads no column (a literal).
    pub fn is_literal(&self) -> bool {
        self.columns().next().is_none()
    }

    /// The text with each placeholder replaced by its column's value as text.
    pub fn render(&self, row: &Row) -> Result<String, RenderError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Column(column) => match row.find(column) {
                    None => return Err(RenderError::Missing(column.to_string())),
                    Some(Value::Null) => return Err(RenderError::Null(column.to_string())),
                    Some(value) => out.push_str(text_of(value).trim_end_matches(' ')),
                },
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> Row {
        Row::new(vec![
            ("mrn".into(), Value::Text("MRN-1  ".into())),
            ("seq".into(), Value::Int(7)),
            ("gone".into(), Value::Null),
        ])
    }

    #[test]
    fn placeholders_are_replaced_and_char_padding_dropped() {
        let template = Template::parse("Patient/p-{mrn}.{seq} {{literal}}").unwrap();
        assert_eq!(
            template.columns().map(Column::as_str).collect::<Vec<_>>(),
            ["mrn", "seq"]
        );
        assert_eq!(
            template.render(&row()).unwrap(),
            "Patient/p-MRN-1.7 {literal}"
        );
        assert!(Template::parse("http://loinc.org").unwrap().is_literal());
    }

    #[test]
    fn null_and_missing_columns_are_told_apart() {
        assert_eq!(
            Template::parse("{gone}").unwrap().render(&row()),
            Err(RenderError::Null("gone".into()))
        );
        assert_eq!(
            Template::parse("{nope}").unwrap().render(&row()),
            Err(RenderError::Missing("nope".into()))
        );
    }

    #[test]
    fn malformed_templates_are_refused() {
        for bad in ["{mrn", "a}b", "{}", "{a-b}"] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }
}
