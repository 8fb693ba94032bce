//! Loading mapping files: YAML with positions (marked-yaml), checked completely against the
//! FHIR R4 definitions. Every problem is collected and reported with `file:line:column`;
//! a file with any problem yields no mapping.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
};

use marked_yaml::{types::MarkedMappingNode, LoaderOptions, Node, Span};
use sha2::{Digest, Sha256};

use super::{
    convert::{format_reads, to_fhir, ControlCharacters, Conversion, Primitive},
    location::{LoadError, LoadErrors, Location},
    model::{
        exclusive, Case, ChoiceGroup, Comparison, Condition, ElementMapping, Lookup, Mapping,
        OnMissing, Protect, RequiredNode, ResourceMapping, Test, Transform, Translated,
        Translation, Unmapped, ValueSource,
    },
    shape::Shape,
    template::Template,
};
use crate::{
    canonical::schema,
    change::{Column, Value},
    fhir::{definitions, Segment, Sensitivity},
};

/// Files ending in this are code tables read by mappings, not mappings.
pub const CODE_TABLE_SUFFIX: &str = ".codes.yaml";

/// Load every mapping under `dir` (recursively, `*.yaml`/`*.yml` except code tables).
/// Mapping ids must be unique across the set.
pub fn load_dir(dir: &Path) -> Result<Vec<Mapping>, LoadErrors> {
    let mut files = Vec::new();
    collect_files(dir, &mut files).map_err(|e| {
        LoadErrors(vec![LoadError {
            location: Location {
                file: dir.display().to_string(),
                line: 0,
                column: 0,
            },
            message: format!("cannot read the mappings directory: {e}"),
        }])
    })?;
    files.sort();
    let mut mappings = Vec::new();
    let mut errors = Vec::new();
    let mut ids: HashMap<String, Location> = HashMap::new();
    for file in files {
        match load_file(&file) {
            Ok(mapping) => {
                let here = Location {
                    file: file.display().to_string(),
                    line: 1,
                    column: 1,
                };
                if let Some(first) = ids.get(&*mapping.id) {
                    errors.push(LoadError {
                        location: here,
                        message: format!("mapping id `{}` is already used by {first}", mapping.id),
                    });
                } else {
                    ids.insert(mapping.id.to_string(), here);
                    mappings.push(mapping);
                }
            }
            Err(LoadErrors(mut e)) => errors.append(&mut e),
        }
    }
    errors.extend(unprotected_references(&mappings));
    errors.extend(shared_ids(&mappings));
    if errors.is_empty() {
        Ok(mappings)
    } else {
        Err(LoadErrors(errors))
    }
}

/// Resource entries that can make the same type and id from one row — the same type, the
/// same literal text around their id's placeholders — unless their conditions provably
/// exclude each other (entries of different tables never do): two entries would make one
/// resource contradict itself, one deleting what the other makes.
fn shared_ids(mappings: &[Mapping]) -> Vec<LoadError> {
    let mut made: HashMap<(&str, String), Vec<(&Mapping, &ResourceMapping)>> = HashMap::new();
    let mut errors = Vec::new();
    for mapping in mappings {
        for resource in &mapping.resources {
            let makers = made
                .entry((resource.resource_type.as_str(), resource.id.skeleton()))
                .or_default();
            let clash = makers.iter().find(|(other, earlier)| {
                other.table != mapping.table || !exclusive(&earlier.when, &resource.when)
            });
            if let Some((other, earlier)) = clash {
                let why = if other.table == mapping.table {
                    "their `when` conditions do not exclude each other (on one column: `in` sets without a common value, `is_null: true` and `false`, `is_numeric: true` and `false`, bounds that leave no number between them); or make one entry and put the conditions on its elements"
                } else {
                    "they read different tables, whose rows would overwrite each other's resource"
                };
                errors.push(LoadError {
                    location: resource.location.clone(),
                    message: format!(
                        "{}/{} can also be made by the entry at {} (mapping `{}`): two entries may make one resource only when no row can meet both; {why}",
                        resource.resource_type,
                        resource.id.skeleton(),
                        earlier.location,
                        other.id
                    ),
                });
            }
            makers.push((mapping, resource));
        }
    }
    errors
}

/// References made like a resource's id (same type, same literal text around the
/// placeholders) that the id tokenizes and they do not, or the other way round: they would
/// point at no resource, silently.
fn unprotected_references(mappings: &[Mapping]) -> Vec<LoadError> {
    let mut ids: HashMap<(&str, String), (bool, &str)> = HashMap::new();
    for mapping in mappings {
        for resource in &mapping.resources {
            let made = (resource.resource_type.as_str(), resource.id.skeleton());
            ids.insert(made, (resource.id.is_tokenized(), &mapping.id));
        }
    }
    let mut errors = Vec::new();
    for (resource, element) in mappings
        .iter()
        .flat_map(|m| &m.resources)
        .flat_map(|r| r.elements.iter().map(move |e| (r, e)))
    {
        let ValueSource::Reference { resource_type, id } = &element.source else {
            continue;
        };
        let Some(&(tokenized, mapping)) = ids.get(&(resource_type.as_str(), id.skeleton())) else {
            continue;
        };
        if tokenized != id.is_tokenized() {
            let (fix, how) = if tokenized {
                ("add `protect: token`", "tokenizes")
            } else {
                ("remove `protect`", "does not tokenize")
            };
            errors.push(LoadError {
                location: element.location.clone(),
                message: format!(
                    "{}.{}: mapping `{mapping}` {how} the ids of the {resource_type}s this references; {fix} so that the reference points at them",
                    resource.resource_type,
                    display_path(&element.path)
                ),
            });
        }
    }
    errors
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            collect_files(&path, out)?;
        } else if (name.ends_with(".yaml") || name.ends_with(".yml"))
            && !name.ends_with(CODE_TABLE_SUFFIX)
        {
            out.push(path);
        }
    }
    Ok(())
}

/// Load and check one mapping file.
pub fn load_file(path: &Path) -> Result<Mapping, LoadErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        LoadErrors(vec![LoadError {
            location: Location {
                file: path.display().to_string(),
                line: 0,
                column: 0,
            },
            message: format!("cannot read the file: {e}"),
        }])
    })?;
    load_str(path, &text)
}

/// Load and check a mapping from its text; `path` names it in messages and anchors the
/// code tables it reads.
pub fn load_str(path: &Path, text: &str) -> Result<Mapping, LoadErrors> {
    let mut reader = Reader {
        file: path,
        errors: Vec::new(),
        hash: Sha256::new(),
    };
    reader.hash.update(text.as_bytes());
    let options = LoaderOptions::default()
        .error_on_duplicate_keys(true)
        .prevent_coercion(true);
    let mapping = match marked_yaml::parse_yaml_with_options(0, text, options) {
        Ok(node) => reader.mapping_file(&node),
        Err(e) => {
            reader.errors.push(yaml_error(path, &e));
            None
        }
    };
    match mapping {
        Some(mapping) if reader.errors.is_empty() => Ok(mapping),
        _ => {
            if reader.errors.is_empty() {
                reader.error(&Span::new_blank(), "the mapping could not be read");
            }
            Err(LoadErrors(reader.errors))
        }
    }
}

fn yaml_error(path: &Path, error: &marked_yaml::LoadError) -> LoadError {
    use marked_yaml::LoadError as E;
    let (marker, message) = match error {
        E::TopLevelMustBeMapping(m) => (
            Some(*m),
            "a mapping file is a YAML mapping (`key: value` lines)".to_owned(),
        ),
        E::TopLevelMustBeSequence(m) => (Some(*m), "a sequence was expected".to_owned()),
        E::UnexpectedAnchor(m) => (
            Some(*m),
            "YAML anchors and aliases are not supported".to_owned(),
        ),
        E::MappingKeyMustBeScalar(m) => (Some(*m), "keys must be plain text".to_owned()),
        E::UnexpectedTag(m) => (Some(*m), "YAML tags (`!tag`) are not supported".to_owned()),
        E::ScanError(m, e) => (Some(*m), format!("not valid YAML: {}", e.info())),
        E::DuplicateKey(inner) => (
            inner.key.span().start().copied(),
            format!("key `{}` appears twice", inner.key.as_str()),
        ),
    };
    let (line, column) = marker.map_or((0, 0), |m| (m.line(), m.column()));
    LoadError {
        location: Location {
            file: path.display().to_string(),
            line,
            column,
        },
        message,
    }
}

struct Reader<'a> {
    file: &'a Path,
    errors: Vec<LoadError>,
    hash: Sha256,
}

/// Where the elements of a group go: the path they continue (with its dot), and the
/// conditions they share.
struct Group {
    prefix: String,
    when: Vec<Condition>,
}

/// What a mapping file defines by name for its elements to use.
struct Defined {
    translations: HashMap<String, Arc<Translation>>,
    lookups: BTreeMap<String, Arc<Lookup>>,
}

/// The rows a lookup holds in memory unless it says otherwise.
const DEFAULT_LOOKUP_ROWS: usize = 1_000_000;

/// The source table's shape as the mapping declares it.
struct Table {
    /// A lookup's name, when these are the columns it reads of its table.
    lookup: Option<String>,
    key: Vec<String>,
    /// When declared: every column mappings may read.
    columns: Option<HashSet<String>>,
}

impl Reader<'_> {
    fn error(&mut self, span: &Span, message: impl Into<String>) {
        self.errors.push(LoadError {
            location: Location::new(self.file, span),
            message: message.into(),
        });
    }

    fn location(&self, span: &Span) -> Location {
        Location::new(self.file, span)
    }

    /// The fields of a YAML mapping; unknown keys are reported with the allowed ones.
    fn fields<'n>(
        &mut self,
        map: &'n MarkedMappingNode,
        what: &str,
        allowed: &[&str],
    ) -> BTreeMap<&'n str, &'n Node> {
        let mut fields = BTreeMap::new();
        for (key, value) in map.iter() {
            if allowed.contains(&key.as_str()) {
                fields.insert(key.as_str(), value);
            } else {
                self.error(
                    key.span(),
                    format!(
                        "unknown key `{}` in {what}; allowed: {}",
                        key.as_str(),
                        allowed.join(", ")
                    ),
                );
            }
        }
        fields
    }

    fn require<'n>(
        &mut self,
        fields: &BTreeMap<&str, &'n Node>,
        key: &str,
        span: &Span,
        what: &str,
    ) -> Option<&'n Node> {
        let found = fields.get(key).copied();
        if found.is_none() {
            self.error(span, format!("{what} needs `{key}`"));
        }
        found
    }

    fn as_map<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n MarkedMappingNode> {
        let map = node.as_mapping();
        if map.is_none() {
            self.error(
                node.span(),
                format!("{what} must be a mapping of `key: value` lines"),
            );
        }
        map
    }

    fn text<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n str> {
        let text = node.as_scalar().map(|s| s.as_str());
        if text.is_none() {
            self.error(node.span(), format!("{what} must be a single value"));
        }
        text
    }

    fn texts(&mut self, node: &Node, what: &str) -> Option<Vec<(String, Span)>> {
        let Some(items) = node.as_sequence() else {
            self.error(node.span(), format!("{what} must be a list, like [a, b]"));
            return None;
        };
        let mut out = Vec::new();
        for item in items.iter() {
            out.push((self.text(item, what)?.to_owned(), *item.span()));
        }
        Some(out)
    }

    /// The regular expression `node` holds as the value of `key`, as `whole` writes it.
    fn regex(
        &mut self,
        node: &Node,
        key: &str,
        whole: impl Fn(&str) -> String,
    ) -> Option<regex::Regex> {
        let pattern = self.text(node, &format!("`{key}`"))?;
        match regex::Regex::new(&whole(pattern)) {
            Ok(regex) => Some(regex),
            Err(e) => {
                // The parser's message spans lines, drawing the pattern; the last says why.
                let why = e.to_string();
                let why = why.lines().last().unwrap_or_default().trim();
                let why = why.strip_prefix("error: ").unwrap_or(why);
                self.error(
                    node.span(),
                    format!("`{key}`: not a regular expression: {why}"),
                );
                None
            }
        }
    }

    fn boolean(&mut self, node: &Node, what: &str) -> Option<bool> {
        match self.text(node, what)? {
            "true" => Some(true),
            "false" => Some(false),
            _ => {
                self.error(node.span(), format!("{what} must be true or false"));
                None
            }
        }
    }

    fn mapping_file(&mut self, root: &Node) -> Option<Mapping> {
        let map = self.as_map(root, "a mapping file")?;
        let span = start_of(map);
        let fields = self.fields(
            map,
            "a mapping file",
            &[
                "mapping",
                "description",
                "domain",
                "sensitivity",
                "source",
                "resources",
                "translations",
                "lookups",
            ],
        );
        let id = self
            .require(&fields, "mapping", &span, "a mapping file")
            .and_then(|n| {
                let id = self.text(n, "`mapping`")?;
                let valid = id.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && id.chars().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'
                    });
                if !valid {
                    self.error(
                        n.span(),
                        format!("mapping id `{id}`: use lower-case letters, digits, `-` and `.`"),
                    );
                }
                Some(id.to_owned())
            });
        let description = fields
            .get("description")
            .and_then(|n| self.text(n, "`description`"))
            .map(str::to_owned);
        let domain = self.require(&fields, "domain", &span, "a mapping file").and_then(|n| {
            let domain = self.text(n, "`domain`")?;
            let valid = domain.starts_with(|c: char| c.is_ascii_lowercase())
                && domain.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !valid {
                self.error(n.span(), format!("domain `{domain}` becomes a topic name part: use lower-case letters, digits and `-`"));
            }
            Some(domain.to_owned())
        });
        let sensitivity = match fields.get("sensitivity") {
            None => Some(Sensitivity::Normal),
            Some(n) => match self.text(n, "`sensitivity`") {
                Some("normal") => Some(Sensitivity::Normal),
                Some("restricted") => Some(Sensitivity::Restricted),
                Some(other) => {
                    self.error(
                        n.span(),
                        format!("sensitivity `{other}`: use normal or restricted"),
                    );
                    None
                }
                None => None,
            },
        };
        let source = self
            .require(&fields, "source", &span, "a mapping file")
            .and_then(|n| self.source(n));
        let translations = match fields.get("translations") {
            Some(n) => self.translations(n),
            None => HashMap::new(),
        };
        let (lookups, lookups_complete) = match (fields.get("lookups"), &source) {
            (Some(n), Some((_, table))) => self.lookups(n, table),
            _ => (BTreeMap::new(), true),
        };
        let defined = Defined {
            translations,
            lookups,
        };
        let resources = match (
            self.require(&fields, "resources", &span, "a mapping file"),
            &source,
        ) {
            (Some(node), Some((_, table))) => self.resources(node, table, &defined),
            _ => None,
        };
        let (table, Table { key, .. }) = source?;
        let content_hash = hex::encode(&std::mem::take(&mut self.hash).finalize()[..8]);
        Some(Mapping {
            id: id?.into(),
            description,
            domain: domain?.into(),
            sensitivity: sensitivity?,
            table,
            key,
            content_hash: content_hash.into(),
            file: self.file.to_path_buf(),
            resources: resources?,
            lookups: lookups_complete.then(|| defined.lookups.into_values().collect())?,
        })
    }

    /// The `lookups` of a mapping file that load, by name, and whether all did (each
    /// problem is reported).
    fn lookups(&mut self, node: &Node, table: &Table) -> (BTreeMap<String, Arc<Lookup>>, bool) {
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

    fn lookup(&mut self, name: &str, node: &Node, table: &Table) -> Option<Lookup> {
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

    fn source(&mut self, node: &Node) -> Option<(String, Table)> {
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

    fn translations(&mut self, node: &Node) -> HashMap<String, Arc<Translation>> {
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

    fn translation(&mut self, name: &str, node: &Node) -> Option<Translation> {
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

    fn code_pairs(
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

    fn resources(
        &mut self,
        node: &Node,
        table: &Table,
        defined: &Defined,
    ) -> Option<Vec<ResourceMapping>> {
        let Some(items) = node.as_sequence() else {
            self.error(
                node.span(),
                "`resources` must be a list of resources (`- type: …`)",
            );
            return None;
        };
        if items.is_empty() {
            self.error(node.span(), "`resources` lists no resource");
        }
        let mut resources = Vec::new();
        for item in items.iter() {
            if let Some(resource) = self.resource(item, table, defined) {
                resources.push(resource);
            }
        }
        (resources.len() == items.len()).then_some(resources)
    }

    fn check_columns<'c>(
        &mut self,
        span: &Span,
        table: &Table,
        columns: impl IntoIterator<Item = &'c str>,
    ) {
        let Some(known) = &table.columns else { return };
        for column in columns {
            if !known.contains(column) {
                let mut names: Vec<&str> = known.iter().map(String::as_str).collect();
                names.sort_unstable();
                let message = match &table.lookup {
                    None => format!(
                        "unknown column `{column}`; the table has: {}",
                        names.join(", ")
                    ),
                    Some(lookup) => format!(
                        "lookup `{lookup}` reads no column `{column}`; its `key` and `columns` name: {}",
                        names.join(", ")
                    ),
                };
                self.error(span, message);
            }
        }
    }

    fn resource(
        &mut self,
        node: &Node,
        table: &Table,
        defined: &Defined,
    ) -> Option<ResourceMapping> {
        let map = self.as_map(node, "a resource")?;
        let span = start_of(map);
        let fields = self.fields(map, "a resource", &["type", "id", "when", "elements"]);
        let resource_type = self
            .require(&fields, "type", &span, "a resource")
            .and_then(|n| {
                let name = self.text(n, "`type`")?;
                if !definitions().is_resource(name) {
                    self.error(n.span(), format!("`{name}` is not a FHIR R4 resource type"));
                    return None;
                }
                Some(name.to_owned())
            });
        let id = self
            .require(&fields, "id", &span, "a resource")
            .and_then(|n| self.id_template(n, table));
        if let Some(id) = &id {
            if id.is_literal() {
                self.error(fields["id"].span(), "`id` must read at least one column (e.g. \"result-{result_id}\"), or every row makes the same resource");
            }
        }
        let when = match fields.get("when") {
            Some(n) => self.conditions(n, table),
            None => Some(Vec::new()),
        };
        let elements_node = self.require(&fields, "elements", &span, "a resource");
        let (resource_type, elements_node) = (resource_type?, elements_node?);
        let elements = self.elements(elements_node, &resource_type, table, defined)?;
        let elements_span = elements_node
            .as_mapping()
            .map_or(*elements_node.span(), start_of);
        self.spreads_split(&resource_type, &elements, &elements_span);
        let required = self.required_nodes(&resource_type, &elements, &elements_span);
        let choices = choice_groups(&resource_type, &elements);
        let required = required?;
        Some(ResourceMapping {
            resource_type,
            id: id?,
            when: when?,
            shape: Shape::compile(&elements, &required, &choices),
            elements,
            required,
            choices,
            location: self.location(&span),
        })
    }

    /// A resource's `id`: a template, or `{ template: …, protect: token }` for an id whose
    /// placeholders hold the tokens of their values.
    fn id_template(&mut self, node: &Node, table: &Table) -> Option<Template> {
        if node.as_scalar().is_some() {
            return self.template(node, "`id`", table);
        }
        let map = self.as_map(node, "`id`")?;
        let span = start_of(map);
        let fields = self.fields(map, "`id`", &["template", "protect"]);
        let template = self.require(&fields, "template", &span, "`id`");
        let template = self.template(template?, "`id`", table)?;
        match fields.get("protect") {
            None => Some(template),
            Some(n) => self.id_protection(n, template),
        }
    }

    /// `template` as `protect` (on an id or a reference) asks: only tokens keep ids apart.
    fn id_protection(&mut self, node: &Node, template: Template) -> Option<Template> {
        match self.text(node, "`protect`")? {
            "token" => Some(template.tokenized()),
            other => {
                let why = match other {
                    "mask" => "a masked id would make every row the same resource",
                    _ => "the only protection an id takes",
                };
                self.error(
                    node.span(),
                    format!("protect `{other}` on an id: use token ({why})"),
                );
                None
            }
        }
    }

    fn template(&mut self, node: &Node, what: &str, table: &Table) -> Option<Template> {
        let text = self.text(node, what)?;
        match Template::parse(text) {
            Ok(template) => {
                self.check_columns(node.span(), table, template.columns().map(|c| c.as_str()));
                Some(template)
            }
            Err(e) => {
                self.error(node.span(), format!("{what}: {e}"));
                None
            }
        }
    }

    fn conditions(&mut self, node: &Node, table: &Table) -> Option<Vec<Condition>> {
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

    fn elements(
        &mut self,
        node: &Node,
        resource_type: &str,
        table: &Table,
        defined: &Defined,
    ) -> Option<Vec<ElementMapping>> {
        let mut elements = Vec::new();
        let group = Group {
            prefix: String::new(),
            when: Vec::new(),
        };
        self.group(node, &group, resource_type, table, defined, &mut elements)
            .then_some(elements)
    }

    /// The elements of `node` (an `elements` map) into `out`, each under `group`'s path and
    /// conditions; whether all loaded. An entry whose value holds `elements` is a group: its
    /// key a path the group's elements continue, its `when` conditions they all share.
    fn group(
        &mut self,
        node: &Node,
        group: &Group,
        resource_type: &str,
        table: &Table,
        defined: &Defined,
        out: &mut Vec<ElementMapping>,
    ) -> bool {
        let Some(map) = self.as_map(node, "`elements`") else {
            return false;
        };
        let mut complete = true;
        for (key, spec) in map.iter() {
            let path = format!("{}{}", group.prefix, key.as_str());
            let nested = spec
                .as_mapping()
                .filter(|m| m.get_node("elements").is_some());
            if let Some(inner) = nested {
                let fields = self.fields(inner, "a group of elements", &["when", "elements"]);
                let own = match fields.get("when") {
                    Some(n) => self.conditions(n, table),
                    None => Some(Vec::new()),
                };
                let Some(own) = own else {
                    complete = false;
                    continue;
                };
                let inner_group = Group {
                    prefix: format!("{path}."),
                    when: group.when.iter().cloned().chain(own).collect(),
                };
                complete &= self.group(
                    fields["elements"],
                    &inner_group,
                    resource_type,
                    table,
                    defined,
                    out,
                );
                continue;
            }
            match self.element(&path, key.span(), spec, resource_type, table, defined) {
                Some(mut element) => {
                    element.when.splice(0..0, group.when.iter().cloned());
                    out.push(element);
                }
                None => complete = false,
            }
        }
        complete
    }

    #[allow(clippy::too_many_arguments)]
    fn element(
        &mut self,
        path_text: &str,
        key_span: &Span,
        spec: &Node,
        resource_type: &str,
        table: &Table,
        defined: &Defined,
    ) -> Option<ElementMapping> {
        let path = match Segment::parse_path(path_text) {
            Ok(path) => path,
            Err(e) => {
                self.error(key_span, format!("element path `{path_text}`: {e}"));
                return None;
            }
        };
        let resolved = match definitions().resolve(resource_type, &path) {
            Ok(resolved) => resolved,
            Err(e) => {
                self.error(key_span, format!("{resource_type}.{path_text}: {e}"));
                return None;
            }
        };
        let leaf = resolved.leaf;
        let what = format!("{resource_type}.{path_text}");
        if path.iter().filter(|s| s.is_each()).count() > 1 {
            self.error(
                key_span,
                format!("{what}: one `[*]` per path (a split column makes one level of items)"),
            );
            return None;
        }
        let containers =
            std::iter::once(resource_type).chain(resolved.nodes.iter().map(String::as_str));
        if let Some((container, left_out)) = containers
            .zip(&path)
            .find(|(container, segment)| !schema::carried(segment.name, container))
        {
            self.error(
                key_span,
                format!(
                    "{what}: `{}` of {container} is not carried by the canonical events' Avro schemas (they leave out modifierExtension, the extensions of datatypes other than Extension, and the id of datatypes and backbone elements: docs/events.md), so no event could hold it",
                    left_out.name
                ),
            );
            return None;
        }
        let location = self.location(key_span);
        let Some(fhir_type) = Primitive::of(&leaf.code) else {
            self.error(
                key_span,
                format!("{what}: fhir-cdc cannot fill FHIR {} elements", leaf.code),
            );
            return None;
        };
        let mut element = ElementMapping {
            path,
            when: Vec::new(),
            source: ValueSource::Template(Template::parse("").ok()?),
            fhir_type,
            required_codes: leaf.required_codes,
            definition: leaf.definition.clone(),
            written: what.clone(),
            required: false,
            anchor: None,
            conversion: Conversion::default(),
            transform: Transform::default(),
            translate: None,
            protect: None,
            lookup: None,
            split: None,
            default: None,
            fixed: None,
            translated: None,
            location,
        };
        if spec.as_scalar().is_some() {
            element.source = ValueSource::Template(self.template(spec, &what, table)?);
        } else {
            let map = self.as_map(spec, &what)?;
            let span = start_of(map);
            let fields = self.fields(
                map,
                "an element",
                &[
                    "column",
                    "template",
                    "value",
                    "reference",
                    "id",
                    "translate",
                    "required",
                    "anchor",
                    "trim",
                    "zone",
                    "true_values",
                    "false_values",
                    "protect",
                    "default",
                    "zero_date",
                    "control_characters",
                    "when",
                    "capture",
                    "case",
                    "format",
                    "lookup",
                    "split",
                ],
            );
            // Read through a lookup, the source's columns are the looked-up table's.
            let looked_up: Table;
            let source_table = match fields.get("lookup") {
                None => table,
                Some(n) => {
                    let name = self.text(n, "`lookup`")?;
                    let Some(lookup) = defined.lookups.get(name) else {
                        let known: Vec<&str> = defined.lookups.keys().map(String::as_str).collect();
                        self.error(
                            n.span(),
                            format!(
                                "no lookup `{name}`; `lookups` defines: {}",
                                if known.is_empty() {
                                    "none".to_owned()
                                } else {
                                    known.join(", ")
                                }
                            ),
                        );
                        return None;
                    };
                    element.lookup = Some(lookup.clone());
                    looked_up = Table {
                        lookup: Some(name.to_owned()),
                        key: Vec::new(),
                        columns: Some(
                            lookup
                                .key
                                .iter()
                                .chain(&lookup.columns)
                                .map(|c| c.to_string())
                                .collect(),
                        ),
                    };
                    &looked_up
                }
            };
            let sources: Vec<&str> = ["column", "template", "value", "reference"]
                .into_iter()
                .filter(|k| fields.contains_key(k))
                .collect();
            element.source = match sources.as_slice() {
                ["column"] => {
                    let column = self.text(fields["column"], "`column`")?;
                    self.check_columns(fields["column"].span(), source_table, [column]);
                    ValueSource::Column(Column::new(column))
                }
                ["template"] | ["value"] => {
                    ValueSource::Template(self.template(fields[sources[0]], &what, source_table)?)
                }
                ["reference"] => {
                    let target = self.text(fields["reference"], "`reference`")?;
                    if !definitions().is_resource(target) {
                        self.error(
                            fields["reference"].span(),
                            format!("`{target}` is not a FHIR R4 resource type"),
                        );
                        return None;
                    }
                    if leaf.code != "string" || !leaf.definition.ends_with("Reference.reference") {
                        self.error(key_span, format!("{what}: `reference` fills a Reference's `reference` element (e.g. `subject.reference`), not a {}", leaf.definition));
                        return None;
                    }
                    let Some(id_node) = fields.get("id") else {
                        self.error(&span, format!("{what}: `reference` needs `id`, the referenced resource's id template"));
                        return None;
                    };
                    let id = self.template(id_node, "`id`", source_table)?;
                    // `protect` tokenizes the referenced id, as `protect` on that resource's
                    // own `id` does, not the reference's text.
                    let id = match fields.get("protect") {
                        Some(n) => self.id_protection(n, id)?,
                        None => id,
                    };
                    ValueSource::Reference {
                        resource_type: target.to_owned(),
                        id,
                    }
                }
                _ => {
                    self.error(&span, format!("{what}: give exactly one of `column`, `template`, `value` or `reference`"));
                    return None;
                }
            };
            if let (Some(n), ValueSource::Template(t)) = (fields.get("lookup"), &element.source) {
                if t.is_literal() {
                    self.error(n.span(), format!("{what}: a literal reads no column, so `lookup` has nothing to read: give `column`, `template` or `reference`"));
                    return None;
                }
            }
            if let Some(n) = fields.get("split") {
                let separator = self.text(n, "`split`")?;
                let literal = matches!(&element.source, ValueSource::Template(t) if t.is_literal());
                if separator.is_empty() || literal {
                    self.error(n.span(), format!("{what}: `split` takes the separator the column's parts are written with (like \"|\" or \",\"), and a column or template to split"));
                    return None;
                }
                if !element.path.iter().any(Segment::is_each) {
                    self.error(n.span(), format!("{what}: `split` makes one item per part: write the repeating element the items go into with `[*]`, as in `code.coding[*].code`"));
                    return None;
                }
                element.split = Some(separator.to_owned());
            }
            if fields.contains_key("id") && sources != ["reference"] {
                self.error(
                    fields["id"].span(),
                    format!("{what}: `id` belongs to a `reference`"),
                );
            }
            if let Some(n) = fields.get("required") {
                element.required = self.boolean(n, "`required`")?;
            }
            if let Some(n) = fields.get("when") {
                element.when = self.conditions(n, table)?;
            }
            if let Some(n) = fields.get("anchor") {
                let ancestor = match self.text(n, "`anchor`")? {
                    "true" => Some(element.path.len() - 1),
                    "false" => None,
                    prefix => match Segment::parse_path(prefix) {
                        Ok(p)
                            if p.len() < element.path.len() && element.path[..p.len()] == p[..] =>
                        {
                            Some(p.len())
                        }
                        _ => {
                            self.error(n.span(), format!("{what}: `anchor` is true, or an element path that contains this one (like `{}`)", display_path(&element.path[..1])));
                            return None;
                        }
                    },
                };
                if ancestor == Some(0) {
                    self.error(
                        n.span(),
                        format!(
                            "{what}: `anchor` needs a parent element; a top-level element has none"
                        ),
                    );
                    return None;
                }
                element.anchor = ancestor;
            }
            if let Some(n) = fields.get("trim") {
                element.conversion.trim = self.boolean(n, "`trim`")?;
            }
            if let Some(n) = fields.get("zone") {
                let zone = self.text(n, "`zone`")?;
                match chrono_tz::Tz::from_str(zone) {
                    Ok(tz) => element.conversion.zone = Some(tz),
                    Err(_) => {
                        self.error(n.span(), format!("`{zone}` is not an IANA time zone (e.g. America/Chicago, Europe/Berlin, UTC)"));
                        return None;
                    }
                }
            }
            for (key, target) in [
                ("true_values", &mut element.conversion.true_values),
                ("false_values", &mut element.conversion.false_values),
            ] {
                if let Some(n) = fields.get(key) {
                    *target = self.texts(n, key)?.into_iter().map(|(v, _)| v).collect();
                }
            }
            if (fields.contains_key("true_values") || fields.contains_key("false_values"))
                && leaf.code != "boolean"
            {
                self.error(
                    &span,
                    format!(
                        "{what} is a {}; `true_values`/`false_values` apply to booleans",
                        leaf.code
                    ),
                );
            }
            if let Some(n) = fields.get("capture") {
                let regex = self.regex(n, "capture", str::to_owned)?;
                if regex.captures_len() != 2 {
                    self.error(n.span(), format!("`capture` needs exactly one group `( … )`, whose text becomes the value; this pattern has {} (write `(?: … )` for a group that captures nothing)", regex.captures_len() - 1));
                    return None;
                }
                element.transform.capture = Some(regex);
            }
            if let Some(n) = fields.get("case") {
                element.transform.case = match self.text(n, "`case`")? {
                    "upper" => Some(Case::Upper),
                    "lower" => Some(Case::Lower),
                    other => {
                        self.error(n.span(), format!("case `{other}`: use upper or lower"));
                        return None;
                    }
                };
            }
            if let Some(n) = fields.get("format") {
                let format = self.text(n, "`format`")?;
                let (date, time, offset) = match format_reads(format) {
                    Ok(reads) => reads,
                    Err(why) => {
                        self.error(n.span(), why);
                        return None;
                    }
                };
                let fits = match leaf.code.as_str() {
                    "date" => date && !time,
                    "dateTime" => date,
                    "instant" => date && time,
                    "time" => time && !date && !offset,
                    _ => {
                        self.error(n.span(), format!("{what} is of FHIR type {}; `format` reads text as a date, dateTime, instant or time", leaf.code));
                        return None;
                    }
                };
                if !fits {
                    self.error(
                        n.span(),
                        format!(
                            "{what} is of FHIR type {}; `{format}` reads {}",
                            leaf.code,
                            match (date, time) {
                                (true, true) => "a date and a time",
                                (true, false) => "a date only",
                                (false, true) => "a time only",
                                (false, false) => "neither a date nor a time",
                            }
                        ),
                    );
                    return None;
                }
                if date && time && !offset && !fields.contains_key("zone") {
                    self.error(n.span(), format!("{what}: `{format}` reads a time without its offset: add `zone`, the IANA zone it was written in"));
                    return None;
                }
                element.transform.format = Some(format.to_owned());
            }
            if let Some(n) = fields.get("zero_date") {
                element.conversion.zero_date_as_null = match self.text(n, "`zero_date`")? {
                    "null" => true,
                    "reject" => false,
                    other => {
                        self.error(n.span(), format!("zero_date `{other}`: use null (leave MySQL's zero dates out) or reject (send the row to the dead-letter topic, the default)"));
                        return None;
                    }
                };
            }
            if let Some(n) = fields.get("control_characters") {
                element.conversion.control = match self.text(n, "`control_characters`")? {
                    "reject" => ControlCharacters::Reject,
                    "strip" => ControlCharacters::Strip,
                    "space" => ControlCharacters::Space,
                    other => {
                        self.error(n.span(), format!("control_characters `{other}`: use reject (send the row to the dead-letter topic, the default), strip or space"));
                        return None;
                    }
                };
            }
            if let (Some(n), false) = (
                fields.get("protect"),
                matches!(element.source, ValueSource::Reference { .. }),
            ) {
                element.protect = match self.text(n, "`protect`")? {
                    "mask" => Some(Protect::Mask),
                    "token" => Some(Protect::Token),
                    other => {
                        self.error(n.span(), format!("protect `{other}`: use mask or token"));
                        return None;
                    }
                };
                if !matches!(leaf.code.as_str(), "string" | "code" | "id" | "markdown") {
                    self.error(n.span(), format!("{what} is a {}; only string, code, id and markdown elements can be protected", leaf.code));
                }
            }
            if let Some(n) = fields.get("default") {
                element.default = Some(self.text(n, "`default`")?.to_owned());
            }
            if let Some(n) = fields.get("translate") {
                let name = self.text(n, "`translate`")?;
                match defined.translations.get(name) {
                    Some(t) => element.translate = Some(t.clone()),
                    None => {
                        let mut known: Vec<&str> =
                            defined.translations.keys().map(String::as_str).collect();
                        known.sort_unstable();
                        self.error(
                            n.span(),
                            format!(
                                "no translation `{name}`; `translations` defines: {}",
                                if known.is_empty() {
                                    "none".to_owned()
                                } else {
                                    known.join(", ")
                                }
                            ),
                        );
                        return None;
                    }
                }
            }
        }
        self.check_values(&element, key_span, &what);
        // What never depends on a row is converted now, once, to values shared by every
        // resource (checked above: errors are reported, not converted).
        let constant = |text: &str| {
            to_fhir(
                &Value::Text(text.to_owned()),
                element.fhir_type,
                &element.conversion,
            )
            .ok()
            .map(|value| match value {
                crate::fhir::Element::String(text) => {
                    crate::fhir::Element::Shared(crate::fhir::intern(&text))
                }
                other => other,
            })
        };
        if let ValueSource::Template(t) = &element.source {
            if t.is_literal() && element.translate.is_none() && element.protect.is_none() {
                let text = t
                    .render(&crate::change::Row::default(), &Default::default())
                    .ok()?;
                element.fixed = constant(&text);
            }
        }
        if let (Some(translation), None) = (&element.translate, element.protect) {
            element.translated = Some(Translated {
                codes: translation
                    .codes
                    .iter()
                    .filter_map(|(code, target)| Some((code.clone(), constant(target)?)))
                    .collect(),
                default: match &translation.unmapped {
                    Unmapped::Default(target) => constant(target),
                    _ => None,
                },
            });
        }
        Some(element)
    }

    /// Literal values, defaults and translation targets must fit the element's type and
    /// required binding.
    fn check_values(&mut self, element: &ElementMapping, span: &Span, what: &str) {
        let mut fixed: Vec<(String, &str)> = Vec::new();
        if let ValueSource::Template(t) = &element.source {
            if t.is_literal() {
                if let Ok(text) = t.render(&crate::change::Row::default(), &Default::default()) {
                    fixed.push((text, "value"));
                }
            }
        }
        if let Some(default) = &element.default {
            fixed.push((default.clone(), "default"));
        }
        if let Some(translation) = &element.translate {
            fixed.extend(
                translation
                    .codes
                    .values()
                    .map(|c| (c.clone(), "translation target")),
            );
            if let Unmapped::Default(code) = &translation.unmapped {
                fixed.push((code.clone(), "translation default"));
            }
        }
        for (text, role) in fixed {
            if let Err(e) = to_fhir(
                &Value::Text(text.clone()),
                element.fhir_type,
                &element.conversion,
            ) {
                self.error(span, format!("{what}: {role} `{text}` does not fit: {e}"));
            } else if let Some(codes) = element.required_codes {
                if !codes.contains(&text) {
                    let mut allowed: Vec<&str> = codes.iter().map(String::as_str).collect();
                    allowed.sort_unstable();
                    self.error(span, format!("{what}: {role} `{text}` is not in the required value set of {}; allowed: {}", element.definition, allowed.join(", ")));
                }
            }
        }
    }

    /// Every node the elements create must have the children FHIR requires; check that the
    /// mapping fills them, and list them for the runtime check.
    fn required_nodes(
        &mut self,
        resource_type: &str,
        elements: &[ElementMapping],
        span: &Span,
    ) -> Option<Vec<RequiredNode>> {
        let mut nodes: BTreeMap<Vec<Segment>, String> = BTreeMap::new();
        nodes.insert(Vec::new(), resource_type.to_owned());
        for element in elements {
            let resolved = definitions().resolve(resource_type, &element.path).ok()?;
            for (depth, definition) in resolved.nodes.into_iter().enumerate() {
                nodes.insert(element.path[..=depth].to_vec(), definition);
            }
        }
        let mut required = Vec::new();
        let mut complete = true;
        for (path, definition) in nodes {
            let children: Vec<String> = definitions()
                .required_children(&definition)
                .map(str::to_owned)
                .collect();
            for child in &children {
                if !fills(elements, &path, child) {
                    let node = if path.is_empty() {
                        resource_type.to_owned()
                    } else {
                        format!("{resource_type}.{}", display_path(&path))
                    };
                    self.error(span, format!("{node} must have `{child}` ({definition}.{child} is required), but no element fills it"));
                    complete = false;
                }
            }
            if definition == "Extension"
                && !self.extension_content(&path, elements, resource_type, span)
            {
                complete = false;
            }
            if !children.is_empty() {
                required.push(RequiredNode {
                    path,
                    definition,
                    children,
                });
            }
        }
        complete.then_some(required)
    }

    /// Every `[*]` array has an element that splits a column under it: the parts decide how
    /// many items it has.
    fn spreads_split(&mut self, resource_type: &str, elements: &[ElementMapping], span: &Span) {
        let mut spreads: BTreeMap<Vec<Segment>, bool> = BTreeMap::new();
        for element in elements {
            if let Some(at) = element.path.iter().position(Segment::is_each) {
                *spreads.entry(element.path[..=at].to_vec()).or_default() |=
                    element.split.is_some();
            }
        }
        for (path, _) in spreads.into_iter().filter(|(_, split)| !split) {
            self.error(span, format!("{resource_type}.{}: `[*]` makes one item per part of a split column, but no element under it has `split`", display_path(&path)));
        }
    }

    /// FHIR's ext-1 for the extension at `path`: the mapping fills its `value[x]` or nested
    /// extensions, not both and not neither. (A row whose value is NULL leaves the
    /// extension out, url and all: see [`Shape`].)
    fn extension_content(
        &mut self,
        path: &[Segment],
        elements: &[ElementMapping],
        resource_type: &str,
        span: &Span,
    ) -> bool {
        let filled = |child| fills(elements, path, child);
        let problem = match (filled("value[x]"), filled("extension")) {
            (true, true) => "fills both a value[x] and nested extensions",
            (false, false) => "fills neither a value[x] nor nested extensions",
            _ => return true,
        };
        self.error(
            span,
            format!(
                "{resource_type}.{} {problem}; FHIR's ext-1 wants exactly one of the two (a complex extension such as US Core race holds only nested extensions, each with its own url and value)",
                display_path(path)
            ),
        );
        false
    }
}

/// Where a YAML mapping begins for a reader: its first key (marked-yaml marks a block
/// mapping at its first value).
fn start_of(map: &MarkedMappingNode) -> Span {
    map.keys().next().map_or(*map.span(), |key| *key.span())
}

/// The choice elements filled with more than one type, for the one-type-per-row check.
fn choice_groups(resource_type: &str, elements: &[ElementMapping]) -> Vec<ChoiceGroup> {
    let mut groups: BTreeMap<(Vec<Segment>, String), Vec<String>> = BTreeMap::new();
    for element in elements {
        let Ok(resolved) = definitions().resolve(resource_type, &element.path) else {
            continue;
        };
        for (depth, segment) in element.path.iter().enumerate() {
            let container = if depth == 0 {
                resource_type
            } else {
                &resolved.nodes[depth - 1]
            };
            if let Some(base) = definitions().choice_base(container, segment.name) {
                let names = groups
                    .entry((element.path[..depth].to_vec(), format!("{base}[x]")))
                    .or_default();
                if !names.iter().any(|n| **n == *segment.name) {
                    names.push(segment.name.to_string());
                }
            }
        }
    }
    groups
        .into_iter()
        .filter(|(_, names)| names.len() > 1)
        .map(|((path, choice), names)| ChoiceGroup {
            path,
            choice,
            names,
        })
        .collect()
}

/// Whether some element fills the child `child` of the node at `path`.
fn fills(elements: &[ElementMapping], path: &[Segment], child: &str) -> bool {
    elements.iter().any(|e| {
        e.path.len() > path.len()
            && e.path[..path.len()] == path[..]
            && child_matches(child, e.path[path.len()].name)
    })
}

/// Whether a JSON element name fills the child `child` (`value[x]` is filled by `valueQuantity`).
pub fn child_matches(child: &str, name: &str) -> bool {
    match child.strip_suffix("[x]") {
        Some(base) => {
            name.starts_with(base)
                && name[base.len()..].starts_with(|c: char| c.is_ascii_uppercase())
        }
        None => child == name,
    }
}

/// `component[0].code` from segments.
pub fn display_path(path: &[Segment]) -> String {
    path.iter()
        .map(|s| match s.index {
            Some(Segment::EACH) => format!("{}[*]", s.name),
            Some(i) => format!("{}[{i}]", s.name),
            None => s.name.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".")
}
