//! `when`: the conditions on a resource or an element, each a column compared with a value
//! or a pattern.

use super::*;

impl Reader<'_> {
    pub(super) fn conditions(&mut self, node: &Node, table: &Table) -> Option<Vec<Condition>> {
        let Some(items) = node.as_sequence() else {
            self.error(
                node.span(),
                "`when` must be a list of conditions (`- column: …`)",
            );
            return None;
        };
        let mut conditions = Vec::new();
        for item in items.iter() {
            let map = self.as_map(item, "a condition")?;
            let span = start_of(map);
            const TESTS: [&str; 10] = [
                "in",
                "not_in",
                "is_null",
                "is_numeric",
                "gt",
                "ge",
                "lt",
                "le",
                "matches",
                "not_matches",
            ];
            let allowed: Vec<&str> = std::iter::once("column").chain(TESTS).collect();
            let fields = self.fields(map, "a condition", &allowed);
            let column = self
                .require(&fields, "column", &span, "a condition")
                .and_then(|n| self.text(n, "`column`"))?;
            self.check_columns(&span, table, [column]);
            let tests: Vec<&str> = TESTS
                .into_iter()
                .filter(|t| fields.contains_key(t))
                .collect();
            let comparison = |test: &str| match test {
                "gt" => Comparison::Gt,
                "ge" => Comparison::Ge,
                "lt" => Comparison::Lt,
                _ => Comparison::Le,
            };
            let test = match tests.as_slice() {
                ["in"] => Test::In(
                    self.texts(fields["in"], "`in`")?
                        .into_iter()
                        .map(|(v, _)| v)
                        .collect(),
                ),
                ["not_in"] => Test::NotIn(
                    self.texts(fields["not_in"], "`not_in`")?
                        .into_iter()
                        .map(|(v, _)| v)
                        .collect(),
                ),
                ["is_null"] => Test::IsNull(self.boolean(fields["is_null"], "`is_null`")?),
                ["is_numeric"] => {
                    Test::IsNumeric(self.boolean(fields["is_numeric"], "`is_numeric`")?)
                }
                [bound @ ("gt" | "ge" | "lt" | "le")] => {
                    let node = fields[bound];
                    let text = self.text(node, &format!("`{bound}`"))?;
                    match text.parse::<f64>() {
                        Ok(n) if n.is_finite() => Test::Compare(comparison(bound), n),
                        _ => {
                            self.error(
                                node.span(),
                                format!("`{bound}` takes a number (like 5 or -0.5), not `{text}`"),
                            );
                            return None;
                        }
                    }
                }
                [test @ ("matches" | "not_matches")] => {
                    let regex = self.regex(fields[test], test, |p| format!("^(?:{p})$"))?;
                    if *test == "matches" {
                        Test::Matches(regex)
                    } else {
                        Test::NotMatches(regex)
                    }
                }
                _ => {
                    self.error(
                        &span,
                        format!(
                            "a condition has exactly one test: {}",
                            TESTS.map(|t| format!("`{t}`")).join(", ")
                        ),
                    );
                    return None;
                }
            };
            conditions.push(Condition {
                column: Column::new(column),
                test,
            });
        }
        Some(conditions)
    }
}
