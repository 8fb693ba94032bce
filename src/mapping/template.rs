//! String templates: literal text with `{column}` placeholders; `{{` and `}}` write braces.

use crate::change::{Column, Row, Value};

use super::apply::MapContext;
use crate::change::text_of;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Column(Column),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
    /// Each placeholder is replaced by the token of its value (`protect: token` on an id).
    tokenized: bool,
}

/// Why a template cannot be rendered for a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenderError {
    /// The column holds NULL.
    Null(String),
    /// The row has no such column (it vanished from the table).
    Missing(String),
    /// The template is tokenized and the connector has no token key.
    NoTokenKey,
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
        Ok(Self {
            parts,
            tokenized: false,
        })
    }

    /// This template with each placeholder replaced by the token of its value.
    pub fn tokenized(self) -> Self {
        Self {
            tokenized: true,
            ..self
        }
    }

    pub fn is_tokenized(&self) -> bool {
        self.tokenized
    }

    /// The columns the template reads, in order.
    pub fn columns(&self) -> impl Iterator<Item = &Column> {
        self.parts.iter().filter_map(|p| match p {
            Part::Column(c) => Some(c),
            Part::Literal(_) => None,
        })
    }

    /// The template with `{}` for every placeholder: what two templates that make the same
    /// ids from different columns share.
    pub fn skeleton(&self) -> String {
        self.parts
            .iter()
            .map(|part| match part {
                Part::Literal(text) => text.as_str(),
                Part::Column(_) => "{}",
            })
            .collect()
    }

    /// Whether the template reads no column (a literal).
    pub fn is_literal(&self) -> bool {
        self.columns().next().is_none()
    }

    /// The text with each placeholder replaced by its column's value as text (CHAR padding
    /// dropped), or by the token of that text when the template is tokenized (the token an
    /// element with `protect: token` makes of the same value, unless it has leading
    /// whitespace, which elements trim and ids keep).
    pub fn render(&self, row: &Row, context: &MapContext) -> Result<String, RenderError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Column(column) => match row.find(column) {
                    None => return Err(RenderError::Missing(column.to_string())),
                    Some(Value::Null) => return Err(RenderError::Null(column.to_string())),
                    Some(value) => {
                        let text = text_of(value);
                        let text = text.trim_end_matches(' ');
                        if self.tokenized {
                            out.push_str(&context.token(text).ok_or(RenderError::NoTokenKey)?);
                        } else {
                            out.push_str(text);
                        }
                    }
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
            template.render(&row(), &MapContext::default()).unwrap(),
            "Patient/p-MRN-1.7 {literal}"
        );
        assert!(Template::parse("http://loinc.org").unwrap().is_literal());
    }

    #[test]
    fn null_and_missing_columns_are_told_apart() {
        assert_eq!(
            Template::parse("{gone}")
                .unwrap()
                .render(&row(), &MapContext::default()),
            Err(RenderError::Null("gone".into()))
        );
        assert_eq!(
            Template::parse("{nope}")
                .unwrap()
                .render(&row(), &MapContext::default()),
            Err(RenderError::Missing("nope".into()))
        );
    }

    #[test]
    fn a_tokenized_template_holds_the_tokens_of_its_values() {
        let template = Template::parse("p-{mrn}.{seq}").unwrap().tokenized();
        let keyed = MapContext {
            token_key: Some(crate::config::Secret::new("k")),
            ..MapContext::default()
        };
        let (mrn, seq) = (keyed.token("MRN-1").unwrap(), keyed.token("7").unwrap());
        assert_eq!(
            template.render(&row(), &keyed).unwrap(),
            format!("p-{mrn}.{seq}")
        );
        assert_eq!(
            template.render(&row(), &MapContext::default()),
            Err(RenderError::NoTokenKey)
        );
    }

    #[test]
    fn malformed_templates_are_refused() {
        for bad in ["{mrn", "a}b", "{}", "{a-b}"] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }
}
