//! A mapping file's `source` table, and the `lookups` and `translations` it defines.

use super::*;

impl Reader<'_> {
    /// The `lookups` of a mapping file that load, by name, and whether all did (each
    /// problem is reported).
    pub(super) fn lookups(
        &mut self,
        node: &Node,
        table: &Table,
    ) -> (BTreeMap<String, Arc<Lookup>>, bool) {
        let mut out = BTreeMap::new();
        let Some(map) = self.as_map(node, "`lookups`") else {
            return (out, false);
        };
        let mut complete = true;
        for (name, spec) in map.iter() {
            match self.lookup(name.as_str(), spec, table) {
                Some(lookup) => {
                    out.insert(name.as_str().to_owned(), Arc::new(lookup));
                }
                None => complete = false,
            }
        }
        (out, complete)
    }

    pub(super) fn lookup(&mut self, name: &str, node: &Node, table: &Table) -> Option<Lookup> {
        let what = format!("lookup `{name}`");
        let map = self.as_map(node, &what)?;
        let span = start_of(map);
        let fields = self.fields(
            map,
            &what,
            &["table", "key", "by", "columns", "on_missing", "max_rows"],
        );
        let looked_up = self.require(&fields, "table", &span, &what).and_then(|n| {
            let looked_up = self.text(n, "`table`")?;
            if looked_up.split('.').count() != 2 || looked_up.split('.').any(str::is_empty) {
                self.error(
                    n.span(),
                    format!("table `{looked_up}`: name it with its schema, as `schema.table`"),
                );
                return None;
            }
            Some(looked_up.to_owned())
        });
        let mut list = |key: &str| {
            let n = self.require(&fields, key, &span, &what)?;
            let items = self.texts(n, &format!("`{key}`"))?;
            if items.is_empty() {
                self.error(
                    n.span(),
                    format!("{what}: `{key}` names at least one column"),
                );
                return None;
            }
            Some((items, *n.span()))
        };
        let key = list("key");
        let by = list("by");
        let columns = list("columns");
        if let (Some((key, _)), Some((by, by_span))) = (&key, &by) {
            for (column, span) in by {
                self.check_columns(span, table, [column.as_str()]);
            }
            if key.len() != by.len() {
                self.error(by_span, format!("{what}: `by` names this row's columns whose values find the looked-up row's `key`, one for each: the key has {} column(s), `by` {}", key.len(), by.len()));
            }
        }
        let matched = matches!((&key, &by), (Some((k, _)), Some((b, _))) if k.len() == b.len());
        let on_missing = match fields.get("on_missing") {
            None => Some(OnMissing::Fail),
            Some(n) => match self.text(n, "`on_missing`")? {
                "fail" => Some(OnMissing::Fail),
                "omit" => Some(OnMissing::Omit),
                other => {
                    self.error(n.span(), format!("on_missing `{other}`: use fail (the row goes to the dead-letter topic, the default) or omit (the elements read through it are left out)"));
                    None
                }
            },
        };
        let max_rows = match fields.get("max_rows") {
            None => Some(DEFAULT_LOOKUP_ROWS),
            Some(n) => match self.text(n, "`max_rows`")?.parse::<usize>() {
                Ok(rows) if rows > 0 => Some(rows),
                _ => {
                    self.error(n.span(), format!("{what}: `max_rows` is a whole number of rows above 0 (default {DEFAULT_LOOKUP_ROWS})"));
                    None
                }
            },
        };
        let names =
            |items: Vec<(String, Span)>| items.into_iter().map(|(c, _)| Column::new(c)).collect();
        if !matched {
            return None;
        }
        Some(Lookup {
            name: name.to_owned(),
            table: looked_up?,
            key: names(key?.0),
            by: names(by?.0),
            columns: names(columns?.0),
            on_missing: on_missing?,
            max_rows: max_rows?,
            location: self.location(&span),
        })
    }

    pub(super) fn source(&mut self, node: &Node) -> Option<(String, Table)> {
        let map = self.as_map(node, "`source`")?;
        let span = start_of(map);
        let fields = self.fields(map, "`source`", &["table", "key", "columns"]);
        let table = self
            .require(&fields, "table", &span, "`source`")
            .and_then(|n| {
                let table = self.text(n, "`source.table`")?;
                if table.split('.').count() != 2 || table.split('.').any(str::is_empty) {
                    self.error(
                        n.span(),
                        format!("table `{table}`: name it with its schema, as `schema.table`"),
                    );
                }
                Some(table.to_owned())
            });
        let columns = fields
            .get("columns")
            .and_then(|n| self.texts(n, "`source.columns`"))
            .map(|cols| cols.into_iter().map(|(c, _)| c).collect::<HashSet<_>>());
        let key = self
            .require(&fields, "key", &span, "`source`")
            .and_then(|n| {
                let key = self.texts(n, "`source.key`")?;
                if key.is_empty() {
                    self.error(n.span(), "`source.key` names at least one column");
                }
                for (column, span) in &key {
                    if columns.as_ref().is_some_and(|c| !c.contains(column)) {
                        self.error(
                            span,
                            format!("key column `{column}` is not among `source.columns`"),
                        );
                    }
                }
                Some(key.into_iter().map(|(c, _)| c).collect())
            });
        Some((
            table?,
            Table {
                lookup: None,
                key: key?,
                columns,
            },
        ))
    }

    pub(super) fn translations(&mut self, node: &Node) -> HashMap<String, Arc<Translation>> {
        let mut out = HashMap::new();
        let Some(map) = self.as_map(node, "`translations`") else {
            return out;
        };
        for (name, spec) in map.iter() {
            if let Some(translation) = self.translation(name.as_str(), spec) {
                out.insert(name.as_str().to_owned(), Arc::new(translation));
            }
        }
        out
    }

    pub(super) fn translation(&mut self, name: &str, node: &Node) -> Option<Translation> {
        let what = format!("translation `{name}`");
        let map = self.as_map(node, &what)?;
        let span = start_of(map);
        let fields = self.fields(map, &what, &["codes", "file", "unmapped", "default"]);
        let mut codes = HashMap::new();
        match (fields.get("codes"), fields.get("file")) {
            (Some(n), None) => self.code_pairs(n, &what, &mut codes)?,
            (None, Some(n)) => {
                let relative = self.text(n, "`file`")?;
                let path = self.file.parent().unwrap_or(Path::new(".")).join(relative);
                let text = match std::fs::read_to_string(&path) {
                    Ok(text) => text,
                    Err(e) => {
                        self.error(
                            n.span(),
                            format!("cannot read code table {}: {e}", path.display()),
                        );
                        return None;
                    }
                };
                self.hash.update(text.as_bytes());
                let options = LoaderOptions::default()
                    .error_on_duplicate_keys(true)
                    .prevent_coercion(true);
                match marked_yaml::parse_yaml_with_options(0, &text, options) {
                    Ok(root) => {
                        let mut table_reader = Reader {
                            file: &path,
                            errors: Vec::new(),
                            hash: Sha256::new(),
                        };
                        let read = table_reader.code_pairs(
                            &root,
                            &format!("code table {relative}"),
                            &mut codes,
                        );
                        self.errors.append(&mut table_reader.errors);
                        read?;
                    }
                    Err(e) => {
                        self.errors.push(yaml_error(&path, &e));
                        return None;
                    }
                }
            }
            _ => {
                self.error(&span, format!("{what} needs either `codes` (inline) or `file` (a {CODE_TABLE_SUFFIX} file)"));
                return None;
            }
        }
        let default = fields
            .get("default")
            .and_then(|n| self.text(n, "`default`"))
            .map(str::to_owned);
        let unmapped = match fields
            .get("unmapped")
            .map(|n| (n, self.text(n, "`unmapped`")))
        {
            None | Some((_, Some("fail"))) => Unmapped::Fail,
            Some((_, Some("pass"))) => Unmapped::Pass,
            Some((n, Some("default"))) => match default {
                Some(code) => Unmapped::Default(code),
                None => {
                    self.error(
                        n.span(),
                        format!("{what}: `unmapped: default` needs `default: <code>`"),
                    );
                    return None;
                }
            },
            Some((n, Some(other))) => {
                self.error(
                    n.span(),
                    format!("{what}: unmapped `{other}`; use fail, pass or default"),
                );
                return None;
            }
            Some((_, None)) => return None,
        };
        Some(Translation {
            name: name.to_owned(),
            codes,
            unmapped,
        })
    }

    pub(super) fn code_pairs(
        &mut self,
        node: &Node,
        what: &str,
        codes: &mut HashMap<String, String>,
    ) -> Option<()> {
        let map = self.as_map(node, what)?;
        for (from, to) in map.iter() {
            let to = self.text(to, what)?;
            codes.insert(from.as_str().to_owned(), to.to_owned());
        }
        Some(())
    }
}
